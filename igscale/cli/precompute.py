"""`igscale precompute`: VAE latents of an image tree into WebDataset shards + manifest (on Ray, or inline).

The same command as `python -m data_pipeline.run` (data_pipeline/run.py), under the igscale entry point.
"""
from __future__ import annotations

from data_pipeline.run import main as _precompute_main


def main(argv: list[str] | None = None) -> int:
    return _precompute_main(argv, prog="igscale precompute")
