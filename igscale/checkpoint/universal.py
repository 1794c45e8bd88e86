"""Resuming a checkpoint at another data-parallel size through DeepSpeed's universal checkpoint.

DeepSpeed's ZeRO (and bf16 optimizer) partitions are tied to the world size that wrote them; DeepSpeed's own
converter (`deepspeed.checkpoint.ds_to_universal`) turns a tag into per-parameter fp32 weights and optimizer
moments, which its engine loads at any world size (`load_universal`). Rank 0 converts once and uploads the result
next to the checkpoint as <tag>/universal/ (removed with the tag by retention), so a later resume of the same tag
at any size downloads it instead of converting again. Checkpoints without partitions (ZeRO-0 in fp32) load as they
are at any size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable

from igscale.checkpoint.store import Checkpointer
from igscale.distributed.collectives import everywhere

__all__ = ["NAME", "needs_conversion", "prepare", "convert", "fp32_weights"]

NAME = "universal"


def needs_conversion(files) -> bool:
    """Whether a tag (its files, as the rank markers list them) holds world-size-bound optimizer partitions."""
    return any(os.path.basename(rel).endswith("optim_states.pt") for rel in files)


def convert(tag_dir: str, out_dir: str, workers: int = 1) -> float:
    """DeepSpeed's converter on the tag folder `tag_dir` into out_dir (replaced). Returns seconds. Its progress
    output is kept and shown only if it fails."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    # workers > 1: DeepSpeed's process pools (fork); 1 runs in this process
    args = argparse.Namespace(input_folder=tag_dir, output_folder=out_dir, num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    out = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            ds_to_universal.main(args)
    except Exception as e:
        raise RuntimeError(f"DeepSpeed's universal conversion of {tag_dir} failed: {type(e).__name__}: {e}\n"
                           f"{out.getvalue()[-2000:]}") from e
    return time.time() - t0


def fp32_weights(tag_dir: str) -> dict:
    """name -> whole fp32 weight, from a downloaded tag's ZeRO-2/3 partitions (DeepSpeed's zero_to_fp32; it needs
    the fp32 partitions only, no optimizer moments)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir.rstrip("/")),
                                                        tag=os.path.basename(tag_dir.rstrip("/")))


def folder_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def prepare(ckpt: Checkpointer, tag: str, local_root: str, *, rank: int, is_cached: bool,
            log: Callable[[str], None] = print) -> str:
    """Collective. Makes <local_root>/<tag>/universal on every rank: converted by rank 0 from its downloaded tag
    (then uploaded), or downloaded from the cache. Returns the load_dir for `engine.load(load_dir, NAME)`."""
    tag_dir = os.path.join(local_root, tag)
    dest = os.path.join(tag_dir, NAME)
    def convert_and_cache() -> None:
        # in-process: DeepSpeed's worker pools would fork this process (communicators, CUDA context);
        # SiT-B/2 converts in ~12 s (docs/training.md), so even XL sizes take about a minute
        secs = convert(tag_dir, dest)
        nbytes = folder_bytes(dest)
        t0 = time.time()
        ckpt.put_folder(tag, NAME, dest, meta={"seconds": secs, "bytes": nbytes})
        log(f"converted {tag} to DeepSpeed's universal checkpoint in {secs:.1f}s ({nbytes / 2**20:.1f} MiB); "
            f"cached at {ckpt.url}/{tag}/{NAME} in {time.time() - t0:.1f}s")

    if not is_cached:  # the other ranks wait in the agreement while rank 0 converts
        everywhere(f"the universal conversion of {ckpt.url}/{tag} (rank 0)",
                   convert_and_cache if rank == 0 else (lambda: None))
    t0 = time.time()
    # every rank takes part (rank 0 already has the folder it converted), so a failed download fails all ranks
    converted_here = not is_cached and rank == 0
    everywhere(f"downloading {ckpt.url}/{tag}/{NAME}",
               (lambda: None) if converted_here else (lambda: ckpt.get_folder(tag, NAME, dest)))
    if is_cached:
        rec = ckpt.folder_meta(tag, NAME) or {}
        log(f"using the cached universal form of {tag} ({rec.get('bytes', 0) / 2**20:.1f} MiB, downloaded in "
            f"{time.time() - t0:.1f}s)")
    return tag_dir
