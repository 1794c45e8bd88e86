"""`igscale export --checkpoint URL [--tag step_...] --out DIR_OR_URL`: EMA weights of a checkpoint -> inference export.

Reads only the EMA and model config of the checkpoint through igscale.checkpoint.layout (no DeepSpeed, no optimizer
state), consolidates sharded EMA slices, and writes `model.safetensors` + `model_config.json`
(igscale.eval.export_io.save_export).
"""
from __future__ import annotations

import argparse
import sys
import tempfile

__all__ = ["main", "ema_state_dict_from_checkpoint"]


def ema_state_dict_from_checkpoint(ckpt_url: str, tag: str | None = None, endpoint_url: str | None = None):
    """(model_config dict, full EMA model state dict) for checkpoint `tag` (default: latest)."""
    from igscale.checkpoint.layout import read_export_inputs
    from igscale.checkpoint.store import Checkpointer
    from igscale.models import build_model_from_config

    with tempfile.TemporaryDirectory() as tmp:
        ck = Checkpointer(ckpt_url, tmp, endpoint_url=endpoint_url)
        tag = tag or ck.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_url}")
        model_config, ema = read_export_inputs(ck, tag, tmp)
    model = build_model_from_config(model_config)
    sd = model.state_dict()  # frozen tensors (sin-cos pos_embed) are not in the EMA; they come from the model
    missing = set(ema) - set(sd)
    if missing:
        raise ValueError(f"EMA has tensors the model lacks: {sorted(missing)[:5]}")
    sd.update(ema)
    return model_config, sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="igscale export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint URL (the run's checkpoint.url)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the `latest` pointer)")
    p.add_argument("--out", required=True, help="export folder or s3:// prefix")
    p.add_argument("--endpoint-url", default=None)
    a = p.parse_args(argv)
    from igscale.checkpoint.store import CheckpointError, check_tag
    from igscale.eval.export_io import save_export
    from igscale.models import build_model_from_config
    from igscale.storage import USER_ERRORS

    try:
        if a.tag is not None:
            check_tag(a.tag, "--tag")
        cfg, sd = ema_state_dict_from_checkpoint(a.checkpoint, a.tag, a.endpoint_url)
    except (CheckpointError, *USER_ERRORS) as e:
        print(f"igscale export: error: {e}", file=sys.stderr)
        return 2
    model = build_model_from_config(cfg)
    model.load_state_dict(sd)
    save_export(model, a.out)
    print(f"exported EMA weights of {a.checkpoint} ({a.tag or 'latest'}) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
