"""Worker side: read + crop images (threads, overlapped with encoding), batched VAE encode, per-shard stats."""
from __future__ import annotations

import io
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from data_pipeline.crop import center_crop_adm
from data_pipeline.plan import PrecomputeConfig
from igscale.core.seeding import Stream, generator
from igscale.latents.format import FIELDS, encode_array, sample_key
from igscale.storage import open_storage
from igscale.vae import build_vae, encode

log = logging.getLogger("data_pipeline")
_VAE_CACHE: dict = {}


class CorruptImageError(RuntimeError):
    pass


def get_vae(cfg: PrecomputeConfig, device: str) -> torch.nn.Module:
    """One VAE per worker process, reused by every shard task that lands on it."""
    key = (cfg.vae_kind, cfg.vae_weights, device)
    if key not in _VAE_CACHE:
        _VAE_CACHE.clear()
        torch.manual_seed(0)  # random-weight VAEs (tests, benchmarks) are identical in every worker
        _VAE_CACHE[key] = build_vae(cfg.vae_kind, cfg.vae_weights, device=device)
    return _VAE_CACHE[key]


def load_crop(data: bytes, size: int) -> np.ndarray:
    """Decode + ADM crop -> (size, size, 3) uint8. Raises on unreadable/corrupt data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode, so truncated files fail here rather than later
        return np.asarray(center_crop_adm(im, size))


@dataclass
class ShardResult:
    samples: list[dict] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)
    latent_shape: tuple = ()
    # float64 sums for the dataset-wide per-channel statistics of the training latent distribution
    n: int = 0  # number of (h, w) positions summed per channel
    sum: np.ndarray | None = None
    sumsq: np.ndarray | None = None


def _posterior_noise(seed: int, index: int, stream: int, shape: tuple) -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed, Stream.PRECOMPUTE, index, stream))


def _maybe_inject_fault(shard: int, done: int, total: int) -> None:
    """Test hook: SIGKILL this worker halfway through one shard, once (marker file), to exercise Ray retries."""
    target, marker = os.environ.get("IGSCALE_FAULT_KILL_SHARD"), os.environ.get("IGSCALE_FAULT_MARKER")
    if target is None or marker is None or int(target) != shard or done < total // 2:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def encode_shard(cfg: PrecomputeConfig, shard: int, indices: list[int], files: list[str], labels: list[int],
                 progress=None) -> ShardResult:
    """Encode the images at `indices` of the sorted list (their keys; `files`/`labels` are theirs, in the same
    order). `progress(n)` is called after each batch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = get_vae(cfg, device)
    src = open_storage(cfg.input, endpoint_url=cfg.endpoint_url)
    res = ShardResult()

    def read(i: int):
        try:
            return load_crop(src.get_bytes(files[i]), cfg.resolution), None
        except Exception as e:  # noqa: BLE001 - any decode failure marks the input corrupt
            return None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        # map() runs ahead of the consumer, so decoding of later batches overlaps the encode of this one.
        it = iter(pool.map(read, range(len(files))))
        done = 0
        while done < len(files):
            idx, imgs, before = [], [], done
            while len(imgs) < cfg.batch_size and done < len(files):
                arr, err = next(it)
                if err is not None:
                    path = src.url(files[done])
                    if cfg.on_corrupt == "abort":
                        raise CorruptImageError(f"corrupt or unreadable image {path}: {err}")
                    log.warning("skipping corrupt image %s: %s", path, err)
                    res.corrupt.append({"path": path, "index": indices[done], "error": err})
                else:
                    idx.append(done)
                    imgs.append(arr)
                done += 1
            if imgs:
                _encode_batch(cfg, vae, np.stack(imgs), [indices[i] for i in idx], [labels[i] for i in idx], res)
            if progress is not None:
                progress(done - before)
            _maybe_inject_fault(shard, done, len(files))
    return res


def _encode_batch(cfg, vae, pixels: np.ndarray, indices: list[int], labels: list[int], res: ShardResult) -> None:
    x = torch.from_numpy(pixels)  # (B, H, W, 3) uint8
    if cfg.mode == "mean_std":
        mean, std = encode(vae, x)  # (B, C, h, w) each
        fields = (mean.cpu(), std.cpu())
        stat_src, extra_var = mean.double().cpu(), (std.double().cpu() ** 2)
    else:
        # LightningDiT recipe: one frozen posterior sample of the image and one of its mirror image.
        mean, std = encode(vae, torch.cat([x, x.flip(2)]))
        b = len(indices)
        shape = tuple(mean.shape[1:])
        eps = torch.stack([torch.stack([_posterior_noise(cfg.seed, i, s, shape) for i in indices]) for s in (0, 1)])
        z = mean.cpu().view(2, b, *shape) + std.cpu().view(2, b, *shape) * eps
        fields = (z[0], z[1])
        stat_src, extra_var = z[0].double(), None
    res.latent_shape = tuple(fields[0].shape[1:])
    c = res.latent_shape[0]
    s = stat_src.transpose(0, 1).reshape(c, -1)  # (C, B*h*w)
    sq = (s**2).sum(1)
    if extra_var is not None:  # Var of posterior samples = Var(mean) + E[std^2]
        sq = sq + extra_var.transpose(0, 1).reshape(c, -1).sum(1)
    res.sum = s.sum(1).numpy() + (0 if res.sum is None else res.sum)
    res.sumsq = sq.numpy() + (0 if res.sumsq is None else res.sumsq)
    res.n += s.shape[1]
    names = FIELDS[cfg.mode]
    for j, (i, y) in enumerate(zip(indices, labels)):
        sample = {"__key__": sample_key(i), "cls": str(y).encode()}
        for name, t in zip(names, fields):
            sample[f"{name}.npy"] = encode_array(t[j], cfg.dtype)
        res.samples.append(sample)
