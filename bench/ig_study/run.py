"""The study driver: classifier, paired training runs, FD-vs-steps curves, guidance sweeps, fresh-noise confirmation.

Work is split into per-(seed, arm) jobs that run in `cfg.workers` spawned processes with one torch thread each (tiny
models use two cores better as two processes than as two threads); results do not depend on the worker count.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import numpy as np
import torch
from tqdm import tqdm

from bench.ig_study.classifier import DigitNet, embed, train_classifier
from bench.ig_study.config import StudyConfig
from bench.ig_study.data import load_digits_16
from bench.ig_study.evaluate import Reference, generate, make_reference, score
from bench.ig_study.train import load_weights, train_run
from igscale.core.typed import from_dict
from igscale.diffusion.guidance import GuidanceConfig
from igscale.eval.fid import compute_stats

ARMS = ("aux", "noaux")
GRID_IMAGES = 40  # first 40 samples of each sweep setting (4 per class) are kept for the sample grids


def _setup(cfg_dict: dict, clf_state: dict, ref_feats: np.ndarray):
    cfg = from_dict(StudyConfig, cfg_dict)
    net = DigitNet(cfg.classifier.feature_dim)
    net.load_state_dict(clf_state)
    return cfg, net.eval(), Reference(ref_feats, compute_stats(ref_feats))


def _guidance(cfg: StudyConfig, w_cfg: float, w_ig: float) -> GuidanceConfig:
    s = cfg.sample
    return GuidanceConfig(w_cfg=w_cfg, cfg_interval=s.cfg_interval, w_ig=w_ig, ig_interval=s.ig_interval)


def _arm_job(cfg_dict, clf_state, ref_feats, x, y, seed: int, arm: str, show_progress: bool = False) -> dict:
    """Train one arm of one seed, then its FD-vs-steps curve and its guidance sweep (final EMA weights)."""
    cpu0 = time.process_time()
    cfg, net, ref = _setup(cfg_dict, clf_state, ref_feats)
    s = cfg.sample
    bar = tqdm(total=cfg.train.steps, desc=f"train seed {seed} {arm}", leave=False, disable=not show_progress)
    run = train_run(cfg, x, y, seed, cfg.train.aux_weight if arm == "aux" else 0.0, progress=lambda _: bar.update())
    bar.close()
    t0 = time.perf_counter()
    curve = []
    for step, w in sorted(run.snapshots.items()):  # unguided samples: claim 1 compares the final head alone
        xs, ys, _ = generate(load_weights(cfg, w), s.curve_samples, s.num_steps, GuidanceConfig())
        curve.append({"step": step, **score(net, ref, xs, ys)})
    final = load_weights(cfg, run.snapshots[cfg.train.steps])
    # IG needs a trained head: the no-aux arm's head is still the zero init (IG would just rescale D_f), so that arm
    # is swept over CFG only.
    grid = [(wc, wi) for wc in s.w_cfg for wi in (s.w_ig if arm == "aux" else (1.0,))]
    sweep, images = [], {}
    for wc, wi in grid:
        xs, ys, st = generate(final, s.num_samples, s.num_steps, _guidance(cfg, wc, wi))
        sweep.append({"w_cfg": wc, "w_ig": wi, "nfe": st["nfe"], "rows_per_sample": st["rows_per_sample"],
                      **score(net, ref, xs, ys)})
        images[(wc, wi)] = xs[:GRID_IMAGES].clone()
    # Compute-matched reference for CFG (which evaluates 2 rows per step): unguided with twice the steps.
    xs, ys, st = generate(final, s.num_samples, 2 * s.num_steps, GuidanceConfig())
    plain2x = {"nfe": st["nfe"], "rows_per_sample": st["rows_per_sample"], **score(net, ref, xs, ys)}
    stride = max(1, cfg.train.steps // 200)
    return {
        "seed": seed, "arm": arm, "curve": curve, "sweep": sweep, "plain_2x_steps": plain2x, "images": images,
        "final_weights": run.snapshots[cfg.train.steps], "train_seconds": run.seconds,
        "train_cpu_seconds": run.cpu_seconds,
        "eval_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "main_loss": [float(np.mean(run.main_loss[i : i + stride])) for i in range(0, len(run.main_loss), stride)],
        "aux_loss": [float(np.mean(run.aux_loss[i : i + stride])) for i in range(0, len(run.aux_loss), stride)],
        "loss_stride": stride,
    }


def _confirm_job(cfg_dict, clf_state, ref_feats, weights, seed: int, arm: str, settings: list) -> dict:
    """Re-measure chosen settings on fresh noise seeds, so the reported best is not the max of a noisy sweep."""
    cpu0 = time.process_time()
    cfg, net, ref = _setup(cfg_dict, clf_state, ref_feats)
    model, s = load_weights(cfg, weights), cfg.sample
    out, done = [], {}
    for label, wc, wi in settings:
        if (wc, wi) not in done:  # a setting chosen under two labels is measured once
            xs, ys, _ = generate(model, s.num_samples, s.num_steps, _guidance(cfg, wc, wi), seed_base=s.confirm_seed_offset)
            done[(wc, wi)] = score(net, ref, xs, ys)
        out.append({"label": label, "w_cfg": wc, "w_ig": wi, **done[(wc, wi)]})
    return {"seed": seed, "arm": arm, "confirm": out, "cpu_seconds": time.process_time() - cpu0}


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)


def _mean_fd(arm_results: list[dict], key: tuple[float, float]) -> float:
    return float(np.mean([r["fd"] for a in arm_results for r in a["sweep"] if (r["w_cfg"], r["w_ig"]) == key]))


def choose_best(arm_results: list[dict], w_cfg: tuple, w_ig: tuple) -> dict[str, tuple[float, float]]:
    """Best (w_cfg, w_ig) by seed-mean FD of the sweep: IG alone, CFG alone, both (> 1 each), and the best of all
    settings including no guidance ('best') — each recipe is entitled to switch guidance off."""
    cands = {
        "IG": [(1.0, wi) for wi in w_ig if wi != 1.0],
        "CFG": [(wc, 1.0) for wc in w_cfg if wc != 1.0],
        "CFG+IG": [(wc, wi) for wc in w_cfg for wi in w_ig if wc != 1.0 and wi != 1.0],
        "best": [(wc, wi) for wc in w_cfg for wi in w_ig],
    }
    return {k: min(v, key=lambda kk: _mean_fd(arm_results, kk)) for k, v in cands.items() if v}


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> dict:
    """Run everything; returns a results dict (JSON-friendly except 'images' and 'final_weights')."""
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0]  # the CPU is shared: the document reports the load the study ran under
    torch.set_num_threads(cfg.threads)
    data = load_digits_16(cfg.heldout_fraction)
    c = cfg.classifier
    t0 = time.perf_counter()
    net = train_classifier(data.x_train, data.y_train, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                           feature_dim=c.feature_dim)
    _, pred = embed(net, data.x_heldout)
    clf_acc = float(np.mean(pred == data.y_heldout.numpy()))
    log(f"classifier: held-out accuracy {clf_acc:.3f} ({time.perf_counter() - t0:.0f}s)")
    ref = make_reference(net, data.x_heldout)
    # Floor of the metric: real training images (same count as a sweep setting) against the held-out split.
    n_real = min(cfg.sample.num_samples, len(data.x_train))
    real_idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))[:n_real]
    real = score(net, ref, data.x_train[real_idx], data.y_train[real_idx])
    noise_ref = score(net, ref, torch.randn(n_real, 1, 16, 16), data.y_train[real_idx])
    log(f"real train vs held-out: FD {real['fd']:.3f}; pure noise: FD {noise_ref['fd']:.3f}")

    cfg_dict = dataclasses.asdict(cfg)
    clf_state = {k: v.clone() for k, v in net.state_dict().items()}
    common = (cfg_dict, clf_state, ref.feats)
    arm_args = [(*common, data.x_train, data.y_train, seed, arm) for arm in ARMS for seed in cfg.seeds]
    pool = None
    if cfg.workers > 1:
        pool = ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"), initializer=_set_threads,
                                   initargs=(cfg.threads,))
    try:
        arms = _map(pool, _arm_job, arm_args, "train + sweep jobs", inline_kw={"show_progress": True})
        by_arm = {a: sorted([r for r in arms if r["arm"] == a], key=lambda r: r["seed"]) for a in ARMS}
        best = choose_best(by_arm["aux"], cfg.sample.w_cfg, cfg.sample.w_ig)
        best_noaux = choose_best(by_arm["noaux"], cfg.sample.w_cfg, (1.0,))
        best_noaux_cfg = best_noaux.get("CFG")
        aux_settings = [("none", 1.0, 1.0)] + [(k, *v) for k, v in best.items()]
        noaux_settings = [("none", 1.0, 1.0)] + [(k, *v) for k, v in best_noaux.items()]
        conf_args = [(*common, r["final_weights"], r["seed"], "aux", aux_settings) for r in by_arm["aux"]]
        conf_args += [(*common, r["final_weights"], r["seed"], "noaux", noaux_settings) for r in by_arm["noaux"]]
        confirms = _map(pool, _confirm_job, conf_args, "confirmation jobs")
    finally:
        if pool is not None:
            pool.shutdown()
    for r in confirms:
        job = next(a for a in arms if a["seed"] == r["seed"] and a["arm"] == r["arm"])
        job["confirm"], job["cpu_seconds"] = r["confirm"], job["cpu_seconds"] + r["cpu_seconds"]
    return {
        "config": cfg_dict, "classifier_accuracy": clf_acc, "real_floor": real, "noise_ceiling": noise_ref,
        "num_train": len(data.x_train), "num_heldout": len(data.x_heldout),
        "runs": by_arm, "best": best, "best_noaux_cfg": best_noaux_cfg, "best_noaux": best_noaux,
        "real_images": data.x_heldout[_first_per_class(data.y_heldout, GRID_IMAGES // 10)],
        "wall_seconds": time.perf_counter() - t_start,
        # CPU seconds actually spent (this process + all jobs): the cost on an otherwise idle machine.
        "cpu_seconds": time.process_time() - cpu_start + sum(a["cpu_seconds"] for a in arms),
        "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }


def _first_per_class(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ordered like balanced_labels: k images of each class, interleaved (i -> class i % 10)."""
    per = [torch.nonzero(y == c).flatten()[:k] for c in range(10)]
    return torch.stack([per[c][j] for j in range(k) for c in range(10)])


def _map(pool, fn, args_list: list, desc: str, inline_kw: dict | None = None) -> list:
    if pool is None:
        return [fn(*a, **(inline_kw or {})) for a in tqdm(args_list, desc=desc)]
    futs = [pool.submit(fn, *a) for a in args_list]
    out = [f.result() for f in tqdm(as_completed(futs), total=len(futs), desc=desc)]
    return out


def summarize(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) — std is 0 for a single seed."""
    v = [float(x) for x in values]
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def steps_to_reach(curve: list[dict], target: float) -> float:
    """First (linearly interpolated) training step where the curve's FD is <= target; inf if never."""
    prev = None
    for p in curve:
        if p["fd"] <= target:
            if prev is None:
                return float(p["step"])
            frac = (prev["fd"] - target) / max(prev["fd"] - p["fd"], 1e-12)
            return prev["step"] + frac * (p["step"] - prev["step"])
        prev = p
    return math.inf
