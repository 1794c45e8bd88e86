"""A small, CPU-sized study of Internal Guidance's two claims on 8×8 digits upsampled to 16×16 (issue 7).

Claim 1: the auxiliary (intermediate-head) loss speeds up training. Claim 2: IG sampling improves samples at no extra
model evaluations, alone and with CFG. Everything runs through igscale's own model, loss, sampler and metric code;
`python -m bench.ig_study` is the one command that reruns it and regenerates docs/ig_study.md.
"""
from bench.ig_study.config import PRESETS, StudyConfig, get_study_config

__all__ = ["PRESETS", "StudyConfig", "get_study_config"]
