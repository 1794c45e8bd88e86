"""GPU checks of the training path (skipped without CUDA; bench/device_check.sh runs them on an H100/H200).

- compiled blocks + the auto attention backend agree with the eager SDPA model in bf16 (loss, gradients < 1e-2);
- FlashAttention (when installed) and SDPA's flash kernel agree with fp32 attention at the XL head dim (72);
- the collective helper under nccl with one rank: CPU inputs come back on the GPU, one call per helper call;
- torch's fused AdamW on CUDA honours found_inf (no update, state kept); the foreach EMA equals the loop;
- one full training step (real DeepSpeed ZeRO-2, bf16) makes no synchronizing CUDA call after warm-up.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _report(name: str, data: dict) -> None:
    print(name, json.dumps(data))
    d = os.environ.get("IGSCALE_CUDA_REPORT")
    if d:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _randomized(name, **kw):
    from igscale.models import build_model

    torch.manual_seed(0)
    m = build_model(name, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "norm" in n else 0.0))
    return m


@pytest.mark.parametrize("name", ["SiT-B/2", "LightningDiT-B/1"])
def test_compiled_fast_path_matches_eager_sdpa_in_bf16(name):
    from igscale.diffusion.losses import ig_loss
    from igscale.models.compile import compile_blocks

    kw = dict(depth=4, ig_layers=(2,))
    ref = _randomized(name, attn_backend="sdpa", **kw).cuda()
    fast = _randomized(name, **kw).cuda()
    fast.load_state_dict(ref.state_dict())
    compile_blocks(fast)
    C, H, W = ref.config.latent_shape
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, C, H, W, generator=g).cuda(), torch.randn(8, C, H, W, generator=g).cuda()
    y, t = torch.randint(0, 1000, (8,), generator=g).cuda(), torch.rand(8, generator=g).cuda()
    out = {}
    for tag, m in (("ref", ref), ("fast", fast)):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ig_loss(m.forward_heads, x0, y, t, eps)["loss"].mean()
        loss.backward()
        out[tag] = (loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    res = {"loss_rel": _rel(out["fast"][0], out["ref"][0]), "grad_rel": _rel(out["fast"][1], out["ref"][1])}
    _report(f"fast_vs_eager_{name.replace('/', '_')}", res)
    assert res["loss_rel"] < 1e-2 and res["grad_rel"] < 1e-2, res


def test_attention_backends_agree_at_the_xl_head_dim():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from igscale.ops.attention import attention, attention_kind, flash_available, reference_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 16, 256, 72, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = reference_attention(q.float(), k.float(), v.float())
    res = {"auto_runs": attention_kind("cuda")}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if SDPA cannot use its flash kernel here
        res["sdpa_flash_rel"] = _rel(attention(q, k, v, backend="sdpa"), ref)
    res["auto_rel"] = _rel(attention(q, k, v), ref)
    if flash_available():
        res["flash_attn_rel"] = _rel(attention(q, k, v, backend="flash"), ref)
    _report("attention_backends", res)
    # bf16 inputs and output: a few bf16 ulps (2^-8 relative) of error, far under 1e-2
    assert all(v < 1e-2 for k, v in res.items() if k.endswith("_rel")), res


def test_fused_adamw_found_inf_and_foreach_ema_on_cuda():
    from igscale.training.ema import EMA

    p = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")) for _ in range(3)]
    opt = torch.optim.AdamW(p, lr=1e-2, fused=True)
    for q in p:
        q.grad = torch.randn_like(q)
    opt.step()
    before = [q.detach().clone() for q in p]
    state = [{k: v.clone() for k, v in opt.state[q].items()} for q in p]
    for q in p:
        q.grad = torch.full_like(q, float("nan"))
    opt.found_inf, opt.grad_scale = torch.ones((), device="cuda"), None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, p))
    assert all(torch.equal(s[k], opt.state[q][k]) for s, q in zip(state, p) for k in s)
    a, b = EMA([(str(i), q) for i, q in enumerate(p)], 0.9), EMA([(str(i), q) for i, q in enumerate(p)], 0.9)
    w = [(str(i), torch.randn_like(q)) for i, q in enumerate(p)]
    a.update(w)
    b.update(w, foreach=False)
    assert all(torch.equal(a.shadow[n], b.shadow[n]) for n in a.shadow)


@pytest.fixture(scope="module")
def nccl_group():
    from tests.helpers_core import one_rank_group

    yield from one_rank_group("nccl")


def test_collective_helper_under_nccl(nccl_group):
    from igscale.distributed.collectives import all_gather, all_ok, all_reduce, backend_device, calls

    n0 = calls["n"]
    out = all_reduce(torch.tensor([1.0, 2.0]))  # a CPU tensor: nccl needs it on the GPU
    assert out.is_cuda and backend_device().type == "cuda" and out.tolist() == [1.0, 2.0]
    parts = all_gather(torch.arange(3))
    assert parts[0].is_cuda and parts[0].tolist() == [0, 1, 2]
    assert all_ok(True) and calls["n"] - n0 == 3


def test_training_step_makes_no_host_sync(nccl_group):
    from igscale.config.load import load_config
    from igscale.distributed.engine import DeepSpeedEngine
    from igscale.training.ema import EMA
    from igscale.training.step import launch_step

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "sit_b2_ig.yaml"),
                      ["data.manifest_url=unused", "train.global_batch=16"])
    model = _randomized("SiT-B/2", depth=4, ig_layers=(2,)).cuda()
    eng = DeepSpeedEngine(model, cfg, world_size=1)
    ema = EMA(eng.param_views(), 0.999)
    dev = torch.device("cuda")
    x = torch.randn(16, 4, 32, 32, device=dev)
    y = torch.randint(0, 1000, (16,), device=dev)
    prev = None
    caught = []
    for step in range(4):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if step >= 2:  # after warm-up (lazy state allocation may sync once)
                torch.cuda.set_sync_debug_mode("warn")
            h = launch_step(eng, [{"latent": x, "label": y}], cfg, rank=0, world_size=1, step=step, device=dev)
            if prev is not None:
                torch.cuda.set_sync_debug_mode("default")
                prev.result()  # the one intended wait, for a step the device already finished
                if step >= 2:
                    torch.cuda.set_sync_debug_mode("warn")
                ema.update(eng.param_views())
            h.finish()
            torch.cuda.set_sync_debug_mode("default")
        caught += [str(m.message) for m in w if "synchroniz" in str(m.message)] if step >= 2 else []
        prev = h
    res = prev.result()
    _report("host_syncs_in_step", {"sync_warnings": len(caught), "first": caught[:5], "loss": res.loss})
    assert not caught, caught[:5]
