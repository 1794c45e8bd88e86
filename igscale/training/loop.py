"""Trainer: data -> step -> EMA -> metrics -> samples -> checkpoints, with resume, preemption and NaN limits.

The trainer is handed its adapters (engine, loader, checkpointer, metrics sink) by the CLI and never builds them.
The host runs one step ahead of its bookkeeping: step j's forward/backward are queued, then step j-1's flags (ready
by then) are read, its EMA update queued and its losses logged, then step j's optimizer update is queued. So the
device never waits for the host. A stop that step j-1 asks for (preemption, too many non-finite losses) voids step j
on the device and checkpoints the state after step j-1, exactly where a synchronous loop would have stopped.
Before checkpoints, sample grids and the last step the loop reads the flags at once.
Exit codes (docs/training.md): 0 finished, 75 preempted after a checkpoint (requeue), 3 stopped after too many
non-finite losses (checkpointed; do not requeue blindly).
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import torch

from igscale.checkpoint import layout, universal
from igscale.config.schema import RunConfig
from igscale.core.typed import ConfigError, to_dict
from igscale.distributed.collectives import all_ok, everywhere
from igscale.latents.elastic import merge_states
from igscale.training.ema import EMA
from igscale.training.lr_schedule import lr_at
from igscale.training.muon import MuonGuard
from igscale.training.muon_sharded import merge_shards
from igscale.training.resume_check import frozen_changes
from igscale.training.rng import seed_global
from igscale.training.state import TrainState
from igscale.training.step import StepResult, launch_step

__all__ = ["Trainer", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_NONFINITE", "total_steps_for"]

EXIT_OK, EXIT_PREEMPTED, EXIT_NONFINITE = 0, 75, 3
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def total_steps_for(cfg: RunConfig, num_samples: int | None) -> int:
    if cfg.train.total_steps:
        return cfg.train.total_steps
    if cfg.train.epochs and num_samples:
        return math.ceil(cfg.train.epochs * num_samples / cfg.train.global_batch)
    raise ValueError("set train.total_steps, or train.epochs with a manifest that reports its sample count")


class Trainer:
    def __init__(self, cfg: RunConfig, engine, loader, checkpointer, metrics, *, rank: int, world_size: int,
                 device: torch.device, num_samples: int | None = None, sampler=None, log=print):
        self.cfg, self.engine, self.loader, self.ckpt, self.metrics = cfg, engine, loader, checkpointer, metrics
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_samples = num_samples
        self.total_steps = total_steps_for(cfg, num_samples)
        self.sampler = sampler  # callable(ema_state_dict) -> {tag: image}; rank 0 only
        self.log = log if rank == 0 else (lambda *a, **k: None)
        self.state = TrainState()
        self.ema = EMA(engine.param_views(), cfg.train.ema_decay)
        # a Muon config must run Muon: checked on the optimizer DeepSpeed steps, and again after the first step
        self._muon = MuonGuard(engine.client_optimizer) if cfg.optim.name == "muon" else None
        if self._muon is not None:
            self.log(f"{self._muon.describe()}; the first step must run one Newton-Schulz per matrix")
        self._signal: int | None = None
        self._data = None
        self._loader_state: dict | None = None  # set when a voided step's batches were already drawn
        self._corrupt_seen: set[str] = set()

    # -- signals -------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signal = signum  # acted on after the current step, agreed on by all ranks

        if threading.current_thread() is not threading.main_thread():
            # e.g. a Ray Train worker thread: Python only lets the main thread install handlers
            self.log("warning: not in the main thread; SIGTERM/SIGUSR1 preemption handling is off for this run")
            return
        for s in PREEMPT_SIGNALS:
            signal.signal(s, handler)

    # -- checkpoint contents -------------------------------------------------------------------------------
    def _ema_owner(self) -> bool:
        # Sharded views: every rank owns a different part of the EMA. Otherwise all hold the same full copy.
        return self.engine.sharded_views or self.rank == 0

    def _write(self, staging: str, tag: str) -> None:
        self.engine.save(staging, tag)
        loader_state = self._loader_state if self._loader_state is not None else self.loader.state_dict()
        owner, main = self._ema_owner(), self.rank == 0
        layout.write_rank_files(
            os.path.join(staging, tag), self.rank,
            trainer={"state": self.state.state_dict(), "loader": loader_state, "torch_rng": torch.get_rng_state()},
            ema=self.ema.state_dict() if owner else None, ema_layout=self.engine.view_layout() if owner else None,
            ema_sharded=self.engine.sharded_views, world_size=self.world_size,
            config=to_dict(self.cfg) if main else None,
            model_config=to_dict(self.engine.module.config) if main else None,
            optim=self._optim_shard() if self._shards_optim() else None)

    def _optim_shard(self) -> dict:
        opt = self.engine.client_optimizer
        return opt.shard_state_dict() if hasattr(opt, "shard_state_dict") else opt.state_dict()

    def _shards_optim(self) -> bool:
        return getattr(self.engine.client_optimizer, "shards_itself", False)

    def _load_optim_shards(self, d: str) -> None:
        """A checkpoint of an optimizer that sharded itself holds every rank's shard, and DeepSpeed restored only
        rank 0's: a sharding optimizer takes its own part of all of them, a replicated one (a resume with
        zero_stage 1 -> 0) all of them. Without shard files DeepSpeed's copy was whole, and a sharding optimizer
        (0 -> 1) already kept its part of it."""
        shards = layout.read_optim_shards(d)
        if not shards:
            return
        opt = self.engine.client_optimizer
        if self._shards_optim():
            opt.load_shards(shards)
        else:
            opt.load_state_dict(merge_shards(shards))

    def save(self) -> str:
        t0 = time.time()
        tag = self.ckpt.save(self.state.step, self._write, meta={"nimg": self.state.nimg})
        self.log(f"checkpoint {tag} saved to {self.ckpt.url} in {time.time() - t0:.1f}s")
        return tag

    def resume(self) -> bool:
        tag = self.ckpt.latest_tag() if self.cfg.checkpoint.resume else None
        if tag is None:
            return False
        saved = int(self.ckpt.read_meta(tag).get("world_size", self.world_size))
        if saved == self.world_size:
            local = everywhere(f"downloading {self.ckpt.url}/{tag}", lambda: self.ckpt.download(tag))
            d = os.path.join(local, tag)
            self._check_config(d, tag)
            self.engine.load(local, tag)
            self._load_optim_shards(d)
            tr = layout.read_trainer(d, self.rank)
            self.loader.load_state_dict(tr["loader"])
            self.ema.load_state_dict(layout.read_ema(d, self.rank, self.engine.sharded_views))
        else:
            d, tr = self._resume_resized(tag, saved)
        self.state.load_state_dict(tr["state"])
        torch.set_rng_state(tr["torch_rng"])
        self.log(f"resumed from {self.ckpt.url}/{tag} at step {self.state.step} ({self.state.nimg} images)")
        return True

    def _resume_resized(self, tag: str, saved: int) -> tuple[str, dict]:
        """Resume at another world size: weights and optimizer through DeepSpeed's universal checkpoint, the EMA
        consolidated and re-sliced for this rank's views, the data from every saved rank's canonical streams."""
        t0 = time.time()
        self.log(f"resuming at world size {self.world_size} from a checkpoint saved at world size {saved} "
                 f"({self.ckpt.url}/{tag})")
        convert, have = everywhere(f"reading {self.ckpt.url}/{tag}", lambda: (
            universal.needs_conversion(self.ckpt.verify(tag)), self.ckpt.folder_meta(tag, universal.NAME) is not None))
        # Muon at ZeRO-2/3 leaves DeepSpeed no optimizer moments, which its universal form needs: the fp32 weights
        # come from DeepSpeed's consolidation of the partitions, the optimizer state from igscale's shards
        opt = self.engine.client_optimizer
        own_weights = convert and hasattr(opt, "load_full_weights")
        convert = convert and not own_weights
        is_cached = convert and all_ok(have)
        small = lambda rel: rel.startswith(layout.SMALL_PREFIXES) or rel.endswith(".json")  # noqa: E731
        # the DeepSpeed files are needed by whoever converts (rank 0), or by all ranks if there is nothing to convert
        full = own_weights or not convert or (self.rank == 0 and not is_cached)
        local = everywhere(f"downloading {self.ckpt.url}/{tag}",
                           lambda: self.ckpt.download(tag, only=None if full else small))
        d = os.path.join(local, tag)
        self._check_config(d, tag)
        if own_weights:
            t1 = time.time()
            opt.load_full_weights(universal.fp32_weights(d), self.engine.module)
            self.log(f"fp32 weights consolidated from the saved ZeRO partitions in {time.time() - t1:.1f}s")
        elif convert:
            self.engine.load(universal.prepare(self.ckpt, tag, local, rank=self.rank, is_cached=is_cached,
                                               log=self.log), universal.NAME, universal=True)
        else:
            self.engine.load(local, tag)
        self._load_optim_shards(d)
        trainers = [layout.read_trainer(d, r) for r in range(saved)]
        self.loader.load_state_dict(merge_states([t["loader"] for t in trainers]))
        self.ema.load_state_dict(layout.reshard_ema(layout.consolidate_ema(d), self.engine.param_views(),
                                                    self.engine.view_layout()))
        tr = trainers[min(self.rank, saved - 1)]  # step counters are the same on every rank
        self.log(f"resharded {saved} -> {self.world_size} ranks in {time.time() - t0:.1f}s; data: "
                 f"{self.loader.position() if hasattr(self.loader, 'position') else 'restored'}")
        return d, tr

    def _check_config(self, d: str, tag: str) -> None:
        """Refuse to resume into a different experiment (model, loss, data order), unless explicitly allowed."""
        saved = layout.read_config(d)
        if saved is None:
            return
        changes = frozen_changes(saved, to_dict(self.cfg))
        if not changes:
            return
        if not self.cfg.checkpoint.allow_config_change:
            raise ConfigError(f"resuming {self.ckpt.url}/{tag} with a config that changes the experiment: "
                              f"{'; '.join(changes)}. Use the saved config, a new checkpoint.url, or "
                              f"--allow-config-change to continue anyway (recorded in the run)")
        self.log(f"warning: resuming {tag} with config changes (allowed): {'; '.join(changes)}")
        if self.rank == 0:
            with open(os.path.join(self.cfg.run_dir, "config_changes.jsonl"), "a") as f:
                f.write(json.dumps({"checkpoint": f"{self.ckpt.url}/{tag}", "time": time.time(),
                                    "changes": changes}) + "\n")

    # -- data ----------------------------------------------------------------------------------------------
    def _next_batches(self) -> list[dict]:
        out = []
        while len(out) < self.cfg.engine.grad_accum:
            if self._data is None:
                self._data = iter(self.loader)
            try:
                batch = next(self._data)
            except StopIteration:  # end of an epoch: the loader starts the next one
                self._data = None
                continue
            # the loader finishes its batches on the device (posterior sampling there, if configured)
            out.append(self.loader.to_device(batch, self.device))
        return out

    # -- EMA export ----------------------------------------------------------------------------------------
    def ema_full_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Collective: full model state dict with EMA weights in place of the trainable parameters (fp32)."""
        sd = self.engine.full_state_dict(frozen_only=True, device=device)
        sd.update({k: v.to(device) for k, v in self.ema.full_state_dict(self.engine.gather_shard).items()})
        return sd

    def _samples(self) -> None:
        sd = self.ema_full_state_dict(self.device)  # gathered on the device: the grid is drawn there
        if self.rank == 0 and self.sampler is not None:
            for tag, img in self.sampler(sd).items():
                self.metrics.image(self.state.step, tag, img)

    # -- loop ----------------------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self._data is not None:  # stop the loader's workers (an epoch is usually left mid-way)
                self._data.close()
                self._data = None

    def _run(self) -> int:
        cfg, st = self.cfg, self.state
        self.resume()
        self._t_last, self._wait, self._n_last = time.time(), 0.0, st.step
        pending = None  # (step, handle, lr) launched but not yet read back
        while st.step + (pending is not None) < self.total_steps:
            step = st.step + (pending is not None)
            lr_factor = lr_at(step, 1.0, cfg.optim.warmup_steps)
            self.engine.set_lr_factor(lr_factor)
            seed_global(cfg.train.seed, self.rank, step)
            before = self.loader.state_dict() if pending is not None else None
            t0 = time.time()
            batches = self._next_batches()
            self._wait += time.time() - t0
            handle = launch_step(self.engine, batches, cfg, rank=self.rank, world_size=self.world_size, step=step,
                                 device=self.device, stop_flag=self._signal is not None)
            code = self._resolve(*pending) if pending is not None else None  # the previous step, ready by now
            handle.finish(halt=code is not None)
            if code is not None:  # step `step` was voided on the device: save the state after the previous one
                self._loader_state = before
                return self._stop(code)
            pending = (step, handle, self.engine.lr(), self._keys(batches))
            nxt = step + 1
            if nxt == self.total_steps or any(e and nxt % e == 0 for e in (cfg.sample.every_steps,
                                                                             cfg.checkpoint.every_steps)):
                code = self._resolve(*pending)  # a host decision is due after this step: read it now
                pending = None
                if code is not None:
                    return self._stop(code)
                if cfg.sample.every_steps and st.step % cfg.sample.every_steps == 0:
                    self._samples()
                if st.step % cfg.checkpoint.every_steps == 0 and st.step < self.total_steps:
                    self.save()
        if not self.ckpt.latest_is(st.step):
            self.save()
        self.metrics.flush()
        return EXIT_OK

    def _keys(self, batches: list[dict]) -> list[int] | None:
        """The step's sample keys (CPU tensors: no device sync) when logging.sample_keys audits the data order."""
        return [k for b in batches for k in b["key"].tolist()] if self.cfg.logging.sample_keys else None

    def _audit(self, step: int, keys: list[int], skipped: bool) -> None:
        d = os.path.join(self.cfg.run_dir, "sample_keys")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"rank{self.rank:05d}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "world_size": self.world_size, "skipped": skipped, "keys": keys}) + "\n")

    def _resolve(self, step: int, handle, lr: float, keys: list[int] | None = None) -> int | None:
        """Book step `step` from its flags: EMA, counters, logs. Returns an exit code if the run must stop."""
        cfg, st = self.cfg, self.state
        res = handle.result()
        if self._muon is not None and not self._muon.checked:
            self._muon.check_first_step()  # a host counter: no device sync
        if keys is not None:  # the step's data is consumed even when its update was skipped
            self._audit(step, keys, res.skipped)
        if not res.skipped:
            self.ema.update(self.engine.param_views())  # queued before the next step's optimizer update
        st.step += 1
        st.nimg += cfg.train.global_batch
        if res.skipped:
            st.nonfinite += 1
            self.log(f"step {step}: non-finite loss on some rank, step skipped ({st.nonfinite} so far)")
        new = set(getattr(self.loader, "corrupt_shards", ())) - self._corrupt_seen
        if new:  # data.on_corrupt=skip: never silent
            self._corrupt_seen |= new
            self.log(f"warning: skipped {len(new)} corrupt shard(s) ({len(self._corrupt_seen)} so far): "
                     f"{', '.join(sorted(new)[:5])}")
        if st.step % cfg.logging.every_steps == 0 or st.step == self.total_steps:
            dt = time.time() - self._t_last
            self._log(res, lr, (st.step - self._n_last) * cfg.train.global_batch / max(dt, 1e-9),
                      self._wait / max(dt, 1e-9))
            self._t_last, self._wait, self._n_last = time.time(), 0.0, st.step
        if st.nonfinite > cfg.train.max_nonfinite:
            return EXIT_NONFINITE
        if res.stop_requested:
            return EXIT_PREEMPTED
        return None

    def _stop(self, code: int) -> int:
        st = self.state
        self.save()
        if code == EXIT_NONFINITE:
            self.log(f"stopping: {st.nonfinite} non-finite losses exceed train.max_nonfinite="
                     f"{self.cfg.train.max_nonfinite}; checkpoint saved at step {st.step}. Lower the LR, check the "
                     f"data, or resume from an earlier checkpoint (exit {EXIT_NONFINITE})")
        else:
            self.log(f"preempted: checkpoint saved at step {st.step}; exiting with {EXIT_PREEMPTED} (requeue)")
        self.metrics.flush()
        return code

    def _log(self, res: StepResult, lr: float, img_per_s: float, wait_frac: float) -> None:
        self.metrics.log_step(self.state.step, self.total_steps, {
            "train/loss": res.loss, "train/loss_main": res.main, "train/loss_aux": res.aux, "train/loss_cos": res.cos,
            "train/grad_norm": res.grad_norm, "train/lr": lr,
            "train/nonfinite_skipped": self.state.nonfinite, "data/corrupt_shards_skipped": len(self._corrupt_seen),
            "perf/img_per_s": img_per_s,
            "perf/data_wait_frac": wait_frac, "progress/images": self.state.nimg,
            "progress/epoch": self.state.nimg / self.num_samples if self.num_samples else 0.0,
        })
