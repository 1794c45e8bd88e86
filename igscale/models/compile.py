"""Regional torch.compile for IGDiT: each block and head is compiled on its own.

Compiling blocks (not the whole model) keeps compile time flat in depth, composes with per-block activation
checkpointing, and lets inductor fuse the adaLN modulate/norm/gate elementwise chains around the matmuls.
"""
from __future__ import annotations

from igscale.models.dit import IGDiT


def compile_blocks(model: IGDiT, *, mode: str | None = None, backend: str = "inductor", fullgraph: bool = True) -> IGDiT:
    """Compile every transformer block and output head of `model` in place; returns the model."""
    kw = dict(backend=backend, fullgraph=fullgraph, dynamic=False)
    if mode is not None:
        kw["mode"] = mode
    for blk in model.blocks:
        blk.compile(**kw)
    model.final_layer.compile(**kw)
    for head in model.ig_heads:
        head.compile(**kw)
    return model
