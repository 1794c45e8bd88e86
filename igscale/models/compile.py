"""Regional torch.compile for IGDiT: each block and head is compiled on its own.

Compiling blocks (not the whole model) keeps compile time flat in depth, composes with per-block activation
checkpointing, and lets inductor fuse the adaLN modulate/norm/gate elementwise chains around the matmuls.
"""
from __future__ import annotations

from igscale.models.dit import IGDiT

__all__ = ["COMPILE_MODES", "resolve_compile_mode", "apply_compile", "compile_blocks"]

COMPILE_MODES = ("auto", "blocks", "full", "none")


def resolve_compile_mode(mode: str, device_type: str, zero_stage: int = 0) -> str:
    """`auto` -> blocks on CUDA below ZeRO-3, else none (CPU inductor compiles slowly and gains little)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"model.compile={mode!r}; valid: {', '.join(COMPILE_MODES)}")
    if mode != "auto":
        return mode
    return "blocks" if device_type == "cuda" and zero_stage < 3 else "none"


def apply_compile(model: IGDiT, mode: str, *, backend: str = "inductor", fullgraph: bool = True) -> IGDiT:
    """Compile `model` in place (parameter names, hence checkpoints, stay unprefixed) for a resolved mode."""
    if mode == "blocks":
        compile_blocks(model, backend=backend, fullgraph=fullgraph)
    elif mode == "full":
        model.compile(backend=backend, dynamic=False)
    elif mode != "none":
        raise ValueError(f"unresolved compile mode {mode!r}")
    return model


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
