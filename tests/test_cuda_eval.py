"""GPU facts about the sampling modes (cuBLAS / cuDNN); skipped without CUDA, run on an H100/H200 by the device check.

Each check prints a short table of what it measured (and writes JSON under $IGSCALE_CUDA_REPORT when that is set),
and asserts only the claim of batch-invariant mode: a sample's bits do not depend on the batch it is computed in.
Fast (default) mode is not required to be batch invariant; its facts are printed, never asserted.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch

from igscale.diffusion.guidance import GuidanceConfig
from igscale.diffusion.samplers import SamplerConfig
from igscale.distributed.env import DistEnv
from igscale.eval.generate import GenerationConfig, chunk_key, decode_batch, generate
from igscale.models import build_model
from igscale.ops.attention import flash_available
from igscale.ops.linear import batch_invariant

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FULL, BATCHES = 64, (1, 3, 8)  # every batch size is compared against the same samples inside one batch of 64
SETTINGS = ("fp32", "fp32+tf32", "bf16-autocast")


@contextmanager
def numerics(setting: str):
    """TF32 flags and autocast for one setting; restores the flags afterwards."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = setting != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if setting == "bf16-autocast" else nullcontext()
    try:
        with amp:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def randomize_cuda_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Non-zero adaLN and heads (zero-initialised ones would make every output trivially equal)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(1.0 if "norm" in n else 0.0, std, generator=g)
    return model


def _env_facts() -> dict:
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "flash_attn": flash_available(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def report(capsys, name: str, header: str, rows: list[str], facts: dict) -> None:
    with capsys.disabled():
        print(f"\n== {name} ({header})\n" + "\n".join(rows))
    out = os.environ.get("IGSCALE_CUDA_REPORT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"env": _env_facts(), **facts}, f, indent=2, default=str)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------- model forward
@pytest.fixture(scope="module")
def forward_facts():
    """SiT-XL/2 (random weights, 32x32x4 latents = 256 tokens) forward: for each setting and mode, whether the outputs
    of every sample computed in batches of 1, 3 and 8 are bitwise equal to those computed in one batch of 64."""
    model = randomize_cuda_(build_model("SiT-XL/2").cuda().eval())
    c = model.config
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(FULL, *c.latent_shape, device="cuda", generator=g)
    t = torch.rand(FULL, device="cuda", generator=g)
    y = torch.randint(0, c.num_classes + 1, (FULL,), device="cuda", generator=g)  # includes null-class rows
    facts: dict = {}
    with torch.no_grad():
        for setting in SETTINGS:
            for mode, inv in (("batch_invariant", True), ("fast", False)):
                with numerics(setting), batch_invariant(inv):
                    full = model(x, t, y)
                    res = {"finite": all(bool(torch.isfinite(o).all()) for o in full)}
                    for bs in BATCHES:
                        parts = [model(x[i:i + bs], t[i:i + bs], y[i:i + bs]) for i in range(0, FULL, bs)]
                        cat = [torch.cat([p[k] for p in parts]) for k in range(2)]
                        res[bs] = {"equal": all(torch.equal(a, b) for a, b in zip(cat, full)),
                                   "max_abs_diff": max(_max_diff(a, b) for a, b in zip(cat, full))}
                facts[(setting, mode)] = res
    return facts


def _forward_table(facts: dict, mode: str) -> list[str]:
    rows = ["| setting | " + " | ".join(f"batch {bs} vs {FULL}" for bs in BATCHES) + " |",
            "|---|" + "---|" * len(BATCHES)]
    for setting in SETTINGS:
        r = facts[(setting, mode)]
        cells = [("bitwise" if r[bs]["equal"] else f"differs (max {r[bs]['max_abs_diff']:.2e})") for bs in BATCHES]
        rows.append(f"| {setting} | " + " | ".join(cells) + " |")
    return rows


def _json_facts(facts: dict, mode: str) -> dict:
    return {s: {str(k): v for k, v in facts[(s, mode)].items()} for s in SETTINGS}


@pytest.mark.parametrize("setting", SETTINGS)
def test_model_forward_batch_invariant_mode_is_bitwise(forward_facts, setting, capsys):
    if setting == SETTINGS[0]:  # one table for all settings
        report(capsys, "forward_batch_invariant_mode", "SiT-XL/2, batch-invariant mode",
               _forward_table(forward_facts, "batch_invariant"), _json_facts(forward_facts, "batch_invariant"))
    r = forward_facts[(setting, "batch_invariant")]
    assert r["finite"]
    bad = {bs: r[bs]["max_abs_diff"] for bs in BATCHES if not r[bs]["equal"]}
    assert not bad, f"{setting}: batch-invariant mode is not bitwise batch invariant on this GPU: {bad}"


def test_model_forward_fast_mode_report(forward_facts, capsys):
    """Fast mode may differ across batch sizes: print the facts only."""
    report(capsys, "forward_fast_mode", "SiT-XL/2, fast (default) mode: facts only",
           _forward_table(forward_facts, "fast"), _json_facts(forward_facts, "fast"))
    assert all(forward_facts[(s, "fast")]["finite"] for s in SETTINGS)


# ---------------------------------------------------------------------------------------------- VAE decode
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "fp32+tf32"])
def test_vae_decode_per_image_is_invariant(tf32, capsys):
    """The batch-invariant path decodes each image alone, so sample i's pixels cannot depend on its batch (this checks
    that the per-image decode is also deterministic); whether the fast batched decode matches is printed only."""
    from igscale.latents.norm import LatentNorm
    from igscale.vae import build_vae, decode_to_uint8

    torch.manual_seed(0)
    vae = build_vae("sd-vae", None, device="cuda")  # the full SD-VAE architecture, random weights
    norm = LatentNorm.scalar()
    lat = torch.randn(max(BATCHES), 4, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(2))

    def dec(z):  # exactly the eval decode (igscale.eval.setup.build_decoder): SiT quantisation, uint8 NHWC
        return decode_to_uint8(vae, z, quantization="sit", norm=norm).numpy()

    with numerics("fp32+tf32" if tf32 else "fp32"):
        ref = np.concatenate(decode_batch(dec, lat, per_image=True))
        per_image = {bs: all(np.array_equal(np.concatenate(decode_batch(dec, lat[i:i + bs], per_image=True)),
                                            ref[i:i + bs]) for i in range(0, len(lat), bs)) for bs in BATCHES}
        batched = np.concatenate(decode_batch(dec, lat, per_image=False))
    n_diff = int((batched != ref).sum())
    setting = "fp32+tf32" if tf32 else "fp32"
    rows = ["| path | result |", "|---|---|",
            *(f"| per image, batch {bs} | {'bitwise' if ok else 'differs'} |" for bs, ok in per_image.items()),
            f"| fast: one batched decode of {len(lat)} vs per image | "
            f"{'bitwise' if n_diff == 0 else f'{n_diff} of {ref.size} uint8 values differ'} |"]
    report(capsys, f"vae_decode_{setting}", f"SD-VAE 256 px, {setting}", rows,
           {"per_image_equal": {str(k): v for k, v in per_image.items()}, "batched_uint8_values_differing": n_diff,
            "uint8_values": int(ref.size)})
    assert ref.std() > 1  # not a degenerate decode
    assert all(per_image.values()), per_image


# ---------------------------------------------------------------------------------------------- end to end
def _raw(lat: torch.Tensor) -> np.ndarray:  # the float32 bits, so nothing is hidden by quantisation
    return lat.float().cpu().numpy().view(np.uint32)


def test_generate_end_to_end_batch_sizes(tmp_path, capsys):
    """generate() on the GPU as `igscale sample` runs it (fp32 + TF32, guided SDE): latents with batch 1, 3 and 8.
    Batch-invariant mode must be bitwise equal; fast mode is reported only."""
    model = randomize_cuda_(build_model("SiT-B/2").cuda().eval())
    sampler = SamplerConfig(method="sde", num_steps=4)
    guidance = GuidanceConfig(w_cfg=1.5, cfg_interval=(0.0, 0.7), w_ig=1.4)
    out: dict = {}
    ref_bs, batches = max(BATCHES), BATCHES[:-1]  # 8 samples = one chunk: batch 8 is the reference
    with numerics("fp32+tf32"):
        for inv in (True, False):
            for bs in BATCHES:
                cfg = GenerationConfig(num_samples=8, seed=5, chunk_size=8, batch_size=bs, batch_invariant=inv)
                d = tmp_path / f"inv{int(inv)}_b{bs}"
                generate(model, _raw, cfg, sampler, guidance, str(d), DistEnv(), settings={}, device="cuda",
                         log=lambda s: None)
                out[(inv, bs)] = np.load(d / chunk_key(0))["arr_0"]
    ref = {inv: out[(inv, ref_bs)] for inv in (True, False)}
    eq = {(inv, bs): bool(np.array_equal(out[(inv, bs)], ref[inv])) for inv in (True, False) for bs in batches}
    rows = ["| mode | " + " | ".join(f"batch {bs} vs {ref_bs}" for bs in batches) + " |",
            "|---|" + "---|" * len(batches)]
    for inv, name in ((True, "batch_invariant"), (False, "fast")):
        rows.append(f"| {name} | " + " | ".join("bitwise" if eq[(inv, bs)] else "differs" for bs in batches) + " |")
    report(capsys, "generate_end_to_end", "SiT-B/2, SDE 4 steps, CFG+IG, fp32+TF32", rows,
           {f"{'batch_invariant' if inv else 'fast'}_batch{bs}": v for (inv, bs), v in eq.items()})
    assert np.isfinite(ref[True].view(np.float32)).all()
    assert all(eq[(True, bs)] for bs in batches), eq
