"""One shard task: skip if already complete (checksum verified), else encode, write the tar, then its record.

Exactly-once: the shard's object key is fixed by the plan and its bytes are deterministic, so a retried task
(its worker died) overwrites rather than duplicates. S3 PUTs are atomic, and the completion record is written
only after the shard, so a record always describes a complete shard object.
"""
from __future__ import annotations

import hashlib
import json

from data_pipeline.encode import encode_shard
from data_pipeline.plan import PrecomputeConfig
from igscale.latents.format import shard_key, sidecar_key, write_tar
from igscale.storage import Storage, open_storage


def verify_existing(out: Storage, shard: int, fp: str) -> dict | None:
    """The shard's completion record if the shard object exists, matches the record's sha256, and was made
    by a job with the same fingerprint; else None (the shard must be (re)written)."""
    try:
        rec = json.loads(out.get_text(sidecar_key(shard)))
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("fingerprint") != fp or not out.exists(shard_key(shard)):
        return None
    if out.size(shard_key(shard)) != rec["size"]:
        return None
    h = hashlib.sha256()
    with out.open_read(shard_key(shard)) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return rec if h.hexdigest() == rec["sha256"] else None


def run_shard(cfg_dict: dict, shard: int, indices: list[int], files: list[str], labels: list[int], fp: str,
              progress=None) -> dict:
    """Returns the shard's completion record, with "skipped": True when an existing shard was reused."""
    cfg = PrecomputeConfig.from_dict(cfg_dict)
    out = open_storage(cfg.output, endpoint_url=cfg.endpoint_url)
    rec = verify_existing(out, shard, fp)
    if rec is not None:
        if progress is not None:
            progress(len(files))
        return {**rec, "skipped": True}
    res = encode_shard(cfg, shard, indices, files, labels, progress)
    data = write_tar(res.samples)
    out.put_bytes(shard_key(shard), data)
    rec = {
        "shard": shard, "key": shard_key(shard), "first_index": min(indices), "last_index": max(indices),
        "count": len(res.samples), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
        "corrupt": res.corrupt, "latent_shape": list(res.latent_shape), "fingerprint": fp,
        "stats": {"n": res.n, "sum": None if res.sum is None else res.sum.tolist(),
                  "sumsq": None if res.sumsq is None else res.sumsq.tolist()},
    }
    out.put_text(sidecar_key(shard), json.dumps(rec))
    return {**rec, "skipped": False}
