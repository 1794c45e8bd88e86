"""Chunked, resumable, world-size-invariant generation of evaluation samples.

Sample i has seed `seed + i`. Its initial noise (stream 0), label (stream 1, random protocol) and SDE increments
(the sampler's stream) all derive from that seed alone. Work is cut into fixed chunks of `chunk_size` consecutive
samples; chunk k belongs to rank k % world_size and is cut, from its start, into batches of `batch_size`. A sample's
batch therefore depends on (chunk_size, batch_size) only, never on the world size or the rank layout, so the images
are bitwise independent of both in either mode. The default (fast) mode runs plain batched kernels, whose last bits
depend on the batch, so batch_size is part of the job identity; batch-invariant mode (opt-in, slower) also makes the
images independent of batch_size. A finished chunk is one atomic object `chunks/chunk_<k>.npz` (local folder or
S3), so a rerun of the same job skips it and regenerates only what is missing. Rank 0 then streams the chunks, in
index order, into the ADM-format `samples.npz` (`arr_0` uint8 NHWC, `arr_1` labels) and writes `samples.json` with
every setting.

With random labels, sample i does not depend on how many samples the job asks for, so `num_samples` is left out of
the job identity: rerunning a folder with a larger count extends it (every full chunk is reused; a last chunk cut
short by the old count is regenerated, which its record's sample range detects), and a smaller count assembles a
prefix. `igscale tune` relies on this to score a candidate at 5k and then at 10k samples for the cost of 10k.
Balanced labels are a permutation of the whole label list, so there `num_samples` stays in the identity.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from igscale.core.typed import to_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.noise import per_sample_randn
from igscale.diffusion.samplers import SamplerConfig, sample
from igscale.distributed.env import DistEnv, barrier
from igscale.eval.labels import make_labels
from igscale.eval.npz import write_npz_streaming
from igscale.ops.linear import batch_invariant
from igscale.storage import Storage, is_s3_url, open_storage
from igscale.vae import quantize

__all__ = ["GenerationConfig", "chunk_key", "decode_batch", "generate", "assemble", "latents_to_uint8", "JOB_FILE",
           "SAMPLES_NPZ"]

JOB_FILE, SAMPLES_NPZ, SAMPLES_JSON = "job.json", "samples.npz", "samples.json"
NOISE_STREAM = 0


@dataclass
class GenerationConfig:
    """job (the samples, their seeds and labels, and how they are cut into chunks and per-rank batches)"""

    num_samples: int = 50_000
    """Images to generate."""
    seed: int = 0
    """Sample i uses seed + i."""
    labels: Literal["random", "balanced"] = "random"
    """Class labels: random (seeded per sample) or balanced (num_samples / num_classes of every class)."""
    chunk_size: int = 1000
    """Samples per resumable unit (fixed per job; changing it needs a new output folder)."""
    batch_size: int = 64
    """Per-rank batch. Fast mode: changes the images in the last bits, so it is fixed per job (job.json).
    Batch-invariant mode: does not change the images, so a rerun may use another one."""
    batch_invariant: bool = False
    """On: per-sample GEMMs in the model and per-image VAE decode, so images are bitwise independent of batch size
    (igscale.ops.linear.batch_invariant); slower, especially on GPUs. Off (default): plain batched kernels; images
    are still bitwise independent of the world size at a fixed batch_size."""

    def __post_init__(self):
        for k in ("num_samples", "chunk_size", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.num_samples)


def chunk_key(k: int) -> str:
    return f"chunks/chunk_{k:06d}.npz"


def _record_key(k: int) -> str:
    return f"chunks/chunk_{k:06d}.json"


def _chunk_ok(store: Storage, k: int, lo: int, hi: int) -> bool:
    """A chunk counts as done when it exists at the size its record (written after it) gives and holds samples
    [lo, hi) or more from lo (a job extended to more samples regenerates its old short last chunk; a shorter job
    uses a prefix); chunks without a record or without a range in it are opened once to check them."""
    if not store.exists(chunk_key(k)):
        return False
    if store.exists(_record_key(k)):
        try:
            rec = json.loads(store.get_text(_record_key(k)))
            if store.size(chunk_key(k)) != rec["size"]:
                return False
            if "range" in rec:
                return rec["range"][0] == lo and rec["range"][1] >= hi
        except (ValueError, KeyError):
            return False
    try:
        with np.load(io.BytesIO(store.get_bytes(chunk_key(k)))) as z:
            return {"arr_0", "labels", "indices"} <= set(z.files) and np.array_equal(z["indices"][:hi - lo],
                                                                                       np.arange(lo, hi))
    except Exception:  # noqa: BLE001 - any unreadable chunk is regenerated
        return False


def _remove_stale_temps(store: Storage) -> None:
    """Temp files of a killed local writer (`.chunk_*.tmp`); S3 uploads are atomic and leave none."""
    root = store.url("chunks")
    if not is_s3_url(root) and os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(root, name))


def latents_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Identity 'decode' for latent-space runs: (B, C, H, W) in ~[-1, 1] -> uint8 NHWC, VA-VAE rounding."""
    return quantize(x.float(), "vavae").numpy()


def _job_identity(cfg: GenerationConfig, settings: dict) -> dict:
    # Everything that changes the pixels. World size never does (batches are cut per chunk); batch_size does only
    # with plain batched kernels, so it is recorded in fast mode and left out in batch-invariant mode.
    ident = {"seed": cfg.seed, "labels": cfg.labels, "chunk_size": cfg.chunk_size,
             "batch_invariant": cfg.batch_invariant, **settings}
    if cfg.labels != "random":  # a balanced label list depends on the total count
        ident["num_samples"] = cfg.num_samples
    if not cfg.batch_invariant:
        ident["batch_size"] = cfg.batch_size
    return ident


def _check_job(store: Storage, ident: dict, env: DistEnv) -> None:
    """Rank 0 records the job identity; a rerun into the same folder must match it (no mixed chunks)."""
    if env.is_main:
        if store.exists(JOB_FILE):
            old = json.loads(store.get_text(JOB_FILE))
            if old != ident:
                diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
                hint = ""
                if "batch_invariant" in diff:  # e.g. a folder started before fast mode became the default
                    hint = f"; the folder was made with batch_invariant={old.get('batch_invariant')}"
                elif "batch_size" in diff:
                    hint = f"; fast mode fixes batch_size per job and the folder has batch_size={old.get('batch_size')}"
                raise ValueError(
                    f"{store.url()} holds chunks of a different job (settings differ in {diff}){hint}; "
                    "use a new output folder or delete the old one"
                )
        else:
            store.put_text(JOB_FILE, json.dumps(ident, indent=2, sort_keys=True))
        _remove_stale_temps(store)  # before the barrier: no rank is writing yet
    barrier()


def decode_batch(decode: Callable[[torch.Tensor], np.ndarray], lat: torch.Tensor, per_image: bool) -> list[np.ndarray]:
    """Fast mode: one batched decode. Batch-invariant mode: the VAE's convs pick kernels by batch size, so each
    image is decoded alone."""
    if per_image:
        return [decode(lat[i:i + 1]) for i in range(lat.shape[0])]
    return [decode(lat)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    decode: Callable[[torch.Tensor], np.ndarray],
    cfg: GenerationConfig,
    sampler: SamplerConfig,
    guidance: GuidanceConfig,
    out_url: str,
    env: DistEnv,
    *,
    settings: dict,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> list[int]:
    """Generate this rank's missing chunks into `out_url`. Returns the chunk ids written by this call.

    settings: JSON-able description of model / decoder / quantisation; stored and checked against reruns.
    """
    mc = model.config
    latent_shape = (mc.in_channels, mc.input_size, mc.input_size)
    store = open_storage(out_url)
    store.check()
    labels = make_labels(cfg.num_samples, mc.num_classes, cfg.labels, cfg.seed)  # validates N first
    ident = _job_identity(cfg, {**settings, "sampler": to_dict(sampler), "guidance": to_dict(guidance)})
    _check_job(store, ident, env)
    mine = [k for k in range(cfg.num_chunks()) if k % env.world_size == env.rank]
    todo = [k for k in mine if not _chunk_ok(store, k, *cfg.chunk_range(k))]
    damaged = [k for k in todo if store.exists(chunk_key(k))]
    if damaged:
        log(f"[rank {env.rank}] chunks {damaged[:10]} are damaged or incomplete; regenerating them")
    if len(todo) < len(mine):
        log(f"[rank {env.rank}] resuming: {len(mine) - len(todo)} of {len(mine)} chunks already done")
    model = model.to(device).eval()
    written = []
    total = sum(cfg.chunk_range(k)[1] - cfg.chunk_range(k)[0] for k in todo)
    bar = tqdm(total=total, desc=f"sample r{env.rank}", unit="img", disable=not env.is_main, dynamic_ncols=True)
    t_start, n_done = time.perf_counter(), 0
    for k in todo:
        lo, hi = cfg.chunk_range(k)
        images = []
        for s in range(lo, hi, cfg.batch_size):
            e = min(s + cfg.batch_size, hi)
            seeds = list(range(cfg.seed + s, cfg.seed + e))
            noise = per_sample_randn(seeds, latent_shape, stream=NOISE_STREAM, device=device)  # (b, C, H, W)
            y = torch.as_tensor(labels[s:e], device=device)
            with batch_invariant(cfg.batch_invariant):
                lat = sample(model, noise, y, sampler, guidance, null_class=mc.num_classes, seeds=seeds)
            images.extend(decode_batch(decode, lat, cfg.batch_invariant))
            bar.update(e - s)
        buf = io.BytesIO()
        np.savez(buf, arr_0=np.concatenate(images), labels=labels[lo:hi], indices=np.arange(lo, hi))
        data = buf.getvalue()
        store.put_bytes(chunk_key(k), data)  # atomic: the chunk exists completely or not at all
        store.put_text(_record_key(k), json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                   "range": [lo, hi]}))
        written.append(k)
        n_done += hi - lo
        log(f"[rank {env.rank}] chunk {k} written ({n_done / (time.perf_counter() - t_start):.2f} img/s)")
    bar.close()
    return written


def assemble(out_url: str, cfg: GenerationConfig, meta: dict, log: Callable[[str], None] = print) -> str:
    """Stream all chunks in index order into samples.npz (+ samples.json). Returns the npz URL/path."""
    store = open_storage(out_url)
    missing = [k for k in range(cfg.num_chunks()) if not store.exists(chunk_key(k))]
    if missing:
        raise RuntimeError(f"cannot assemble {store.url()}: chunks {missing[:10]} are missing; rerun the sampling job")

    def load(k):
        data = store.get_bytes(chunk_key(k))
        try:
            rec = json.loads(store.get_text(_record_key(k))) if store.exists(_record_key(k)) else None
            if rec is not None and (len(data) != rec["size"] or hashlib.sha256(data).hexdigest() != rec["sha256"]):
                raise ValueError("size or sha256 differs from its record")
            with np.load(io.BytesIO(data)) as z:
                arr, labs, idx = z["arr_0"], z["labels"], z["indices"]
        except Exception as e:  # noqa: BLE001 - a damaged chunk: name it and make the rerun regenerate it
            store.delete(chunk_key(k))
            raise RuntimeError(f"{store.url(chunk_key(k))} is damaged ({type(e).__name__}: {e}); it was deleted, "
                               "rerun the sampling job to regenerate it") from e
        lo, hi = cfg.chunk_range(k)
        if not np.array_equal(idx[:hi - lo], np.arange(lo, hi)):  # a longer chunk of an extended job: its prefix
            raise RuntimeError(f"{store.url(chunk_key(k))} holds samples {idx[:3]}..., expected {lo}..")
        return arr[:hi - lo], labs[:hi - lo]

    first, _ = load(0)
    shape = (cfg.num_samples, *first.shape[1:])
    all_labels = np.empty(cfg.num_samples, np.int64)

    def chunks():
        for k in tqdm(range(cfg.num_chunks()), desc="assemble", unit="chunk"):
            imgs, labs = load(k)
            lo, hi = cfg.chunk_range(k)
            all_labels[lo:hi] = labs
            yield imgs

    local_dir = None if not is_s3_url(out_url) else tempfile.mkdtemp()
    path = os.path.join(local_dir or out_url.removeprefix("file://"), SAMPLES_NPZ)
    # labels are filled while streaming, so they are written as a second zip entry afterwards
    write_npz_streaming(path + ".img", "arr_0", shape, np.uint8, chunks())
    _append_array(path + ".img", "arr_1", all_labels)
    os.replace(path + ".img", path)
    meta = {**meta, "num_samples": cfg.num_samples, "arr_0_shape": list(shape),
            "label_counts_min_max": [int(np.bincount(all_labels).min()), int(np.bincount(all_labels).max())]}
    if local_dir:
        store.put_file(SAMPLES_NPZ, path)
        os.remove(path)
        os.rmdir(local_dir)
    store.put_text(SAMPLES_JSON, json.dumps(meta, indent=2, sort_keys=True))
    log(f"wrote {store.url(SAMPLES_NPZ)} {shape} and {SAMPLES_JSON}")
    return store.url(SAMPLES_NPZ)


def _append_array(npz_path: str, key: str, arr: np.ndarray) -> None:
    import zipfile

    with zipfile.ZipFile(npz_path, "a", allowZip64=True) as zf, zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)


def describe(cfg: GenerationConfig) -> dict:
    return asdict(cfg)
