"""The one attention op of igscale: FlashAttention on CUDA when importable, torch SDPA otherwise.

Contract: q, k, v are (B, H, L, Dh); the result is (B, H, L, Dh). Non-causal, no mask (DiT tokens attend to all tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flash_available", "attention_kind", "attention", "reference_attention"]

try:  # optional GPU extra; never required
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import time
    _flash_attn_func = None

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def attention_kind(device: torch.device | str) -> str:
    """What `backend="auto"` runs on this device for bf16/fp16 inputs (for start-up logs and benchmarks)."""
    if torch.device(device).type != "cuda":
        return "sdpa (cpu)"
    return "flash_attn" if _flash_attn_func is not None else "sdpa (flash kernel)"


def _use_flash(q: torch.Tensor) -> bool:
    # flash_attn refuses an empty batch, which an elastic resume's epoch tail can hand a rank; SDPA takes it
    return (_flash_attn_func is not None and q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] <= 256
            and q.shape[0] > 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q kᵀ / sqrt(Dh)) v over (B, H, L, Dh) tensors.

    backend: "auto" (flash if possible, else SDPA), "flash" (error if unavailable), "sdpa", or "math" (plain reference).
    """
    if backend == "math":
        return reference_attention(q, k, v)
    if backend == "flash" or (backend == "auto" and _use_flash(q)):
        if not _use_flash(q):
            raise RuntimeError("FlashAttention requested but flash_attn is not installed or inputs are not fp16/bf16 CUDA")
        # flash_attn wants (B, L, H, Dh)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend not in ("auto", "sdpa"):
        raise ValueError(f"unknown attention backend {backend!r}; valid: auto, flash, sdpa, math")
    return F.scaled_dot_product_attention(q, k, v)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QKᵀ/sqrt(d))V in at least fp32: the reference the fast paths are tested against."""
    dt = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5
    w = torch.softmax((q.to(dt) @ k.to(dt).transpose(-2, -1)) * scale, dim=-1)  # (B, H, L, L)
    return (w @ v.to(dt)).to(q.dtype)
