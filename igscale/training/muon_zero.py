"""Muon under DeepSpeed ZeRO-2 and ZeRO-3: DeepSpeed partitions the gradients (and, at ZeRO-3, the weights) as
for any optimizer, and each whole matrix is orthogonalised by one owner rank.

`optim.name: muon` with `engine.zero_stage: 2 | 3`. DeepSpeed hands the client optimizer flat 1-D partitions, on
which Newton-Schulz would be wrong, so this optimizer maps every partition back to whole tensors:

  1. one all-to-all sends each rank's pieces of every tensor's averaged gradient and fp32 weight to the tensor's
     owner (owners as in muon_sharded.assign_owners: balanced by Newton-Schulz FLOPs, Adam tensors by size);
  2. the owner holds the tensor whole, clips by the global norm (one all-reduce of one norm per tensor) and runs
     MuonWithAdam's own update on it, with the optimizer state of its tensors only;
  3. one all-to-all returns the new weights to the ranks that hold their pieces in DeepSpeed's fp32 partitions.

Given the same averaged gradients this is bitwise the ZeRO-0 reference (the same code on the same whole tensors,
the same norm). DeepSpeed keeps its own fp32 partitions, gradient reduction and parameter gathering; its own
Muon was measured against the reference and differs (docs/benchmarks.md). The layout is read from DeepSpeed's
optimizer once (`bind_zero`) and checked against the weights there, so a changed DeepSpeed layout fails loudly.

Checkpoints: DeepSpeed saves its fp32 partitions and an empty optimizer state for this class; the trainer saves
`shard_state_dict()` of every rank (the format of ShardedMuonWithAdam's shards, so shards move between stages).
"""
from __future__ import annotations

import torch

from igscale.distributed.collectives import all_reduce, all_to_all
from igscale.training.muon import MuonWithAdam, clip_coef, grad_norms
from igscale.training.muon_sharded import assign_owners, merge_shards

__all__ = ["ZeroMuonWithAdam", "zero_pieces"]


def zero_pieces(ds_optimizer, stage: int, params: list[torch.nn.Parameter], world_size: int
                ) -> tuple[list[list[tuple[int, int, int, int]]], int]:
    """Where DeepSpeed put each tensor: per rank, (tensor index, start in the flattened tensor, length, offset in
    that rank's fp32 partition) for every piece it holds, and the partition's numel. Padding is left out."""
    index = {id(p): k for k, p in enumerate(params)}
    pieces: list[list[tuple[int, int, int, int]]] = [[] for _ in range(world_size)]
    if stage == 2:
        if len(ds_optimizer.bit16_groups) != 1:
            raise RuntimeError(f"expected one DeepSpeed parameter group, got {len(ds_optimizer.bit16_groups)}")
        size = int(ds_optimizer.partition_size[0])
        for p, off in zip(ds_optimizer.round_robin_bit16_groups[0], ds_optimizer.round_robin_bit16_offsets[0]):
            k, n = index[id(p)], p.numel()
            for r in range(world_size):
                lo, hi = max(off, r * size), min(off + n, (r + 1) * size)
                if hi > lo:
                    pieces[r].append((k, lo - off, hi - lo, lo - r * size))
        return pieces, size
    if stage == 3:
        if len(ds_optimizer.fp16_groups) != 1:
            raise RuntimeError(f"expected one ZeRO-3 sub-group, got {len(ds_optimizer.fp16_groups)} (sub_group_size)")
        off = 0
        for p in ds_optimizer.fp16_groups[0]:
            k, n, part = index[id(p)], int(p.ds_numel), int(p.partition_numel())
            for r in range(world_size):
                length = max(0, min(part, n - r * part))
                if length:
                    pieces[r].append((k, r * part, length, off))
            off += part
        return pieces, off
    raise ValueError(f"ZeroMuonWithAdam runs at ZeRO stage 2 or 3, got {stage}")


class ZeroMuonWithAdam(torch.optim.Optimizer):
    """The client optimizer DeepSpeed ZeRO-2/3 steps: one parameter group of every trainable tensor (DeepSpeed
    turns it into one flat fp32 partition per rank); the per-tensor hyperparameters live in `model_groups`."""

    shards_itself = True  # the trainer saves every rank's shard_state_dict()
    whole_params = False  # DeepSpeed partitions underneath
    single_group = True  # one DeepSpeed group (one ZeRO-3 sub-group): one all-to-all each way per step
    clips_itself = True
    supports_found_inf = True

    def __init__(self, param_groups: list[dict], *, rank: int, world_size: int, max_grad_norm: float = 0.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
        self.rank, self.world_size, self.max_grad_norm = rank, world_size, float(max_grad_norm)
        self._params = [p for g in param_groups for p in g["params"]]  # the canonical tensor order
        if len({p.dtype for p in self._params}) > 1 or self._params[0].dtype != torch.float32:
            raise ValueError("Muon under ZeRO-2/3 needs fp32 weights (precision fp32 or bf16_autocast)")
        self._shapes = [tuple(p.shape) for p in self._params]  # whole: ZeRO-3 empties the parameters later
        self._numels = [p.numel() for p in self._params]
        self._use_muon = [bool(g["use_muon"]) for g in param_groups for _ in g["params"]]
        self._owner = [o for own in assign_owners(param_groups, world_size) for o in own]
        self.model_groups = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
        self._group_idx = []  # per group, the canonical indices of its tensors
        k = 0
        for g in param_groups:
            self._group_idx.append(list(range(k, k + len(g["params"]))))
            k += len(g["params"])
        for mg in self.model_groups:
            mg.setdefault("base_lr", mg["lr"])
        # this rank's tensors, whole. Their storage is a weight and a gradient buffer that exist only during a
        # step (between steps DeepSpeed's partitions hold the values); the tensors themselves stay, as the keys of
        # the reference optimizer's state
        self._mine = [k for k, o in enumerate(self._owner) if o == rank]
        self._start, self._numel = {}, 0
        for k in self._mine:
            self._start[k] = self._numel
            self._numel += self._numels[k]
        self._dev = self._params[0].device
        self._full = {k: torch.zeros(self._shapes[k], dtype=torch.float32, device=self._dev) for k in self._mine}
        inner = [dict(mg, params=[self._full[k] for k in idx if k in self._full])
                 for mg, idx in zip(self.model_groups, self._group_idx)]
        self._inner_of = [gi for gi, g in enumerate(inner) if g["params"]]  # model group of each inner group
        # the reference update on this rank's whole tensors (clipping is done here, with the global norm)
        self.inner = MuonWithAdam([inner[gi] for gi in self._inner_of] or [dict(inner[0], params=[])])
        self.ns_per_step = sum(self._use_muon[k] for k in self._mine)
        self._release()
        self._bound = False
        super().__init__([{"params": self._params, "lr": self.model_groups[0]["lr"]}], defaults={})

    def _view(self, buf: torch.Tensor, k: int) -> torch.Tensor:
        s = self._start[k]
        return buf[s:s + self._numels[k]].view(self._shapes[k])

    @property
    def ns_calls(self) -> int:
        return self.inner.ns_calls

    @property
    def step_buffer_bytes(self) -> int:
        """Bytes of the owned tensors' whole weights and gradients, allocated during a step only."""
        return 2 * self._numel * 4

    def _hold(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.empty(self._numel, dtype=torch.float32, device=self._dev)
        g = torch.empty(self._numel, dtype=torch.float32, device=self._dev)
        for k, t in self._full.items():
            t.data = self._view(w, k)
            t.grad = self._view(g, k)
        return w, g

    def _release(self) -> None:
        empty = torch.empty(0, dtype=torch.float32, device=self._dev)
        for t in self._full.values():
            t.grad = None
            t.data = empty

    def muon_shapes(self) -> list[tuple[int, ...]]:
        """Every Muon matrix of the model, whole (what the owners orthogonalise)."""
        return [shape for shape, muon in zip(self._shapes, self._use_muon) if muon]

    # -- layout ----------------------------------------------------------------------------------------------
    def bind_zero(self, ds_optimizer, stage: int) -> None:
        """Read DeepSpeed's partition layout (after deepspeed.initialize) and check it against the weights."""
        pieces, size = zero_pieces(ds_optimizer, stage, self._params, self.world_size)
        flat = (ds_optimizer.single_partition_of_fp32_groups[0] if stage == 2
                else ds_optimizer.fp32_partitioned_groups_flat[0])
        if flat.numel() != size or flat.dtype != torch.float32:
            raise RuntimeError(f"DeepSpeed's fp32 partition has {flat.numel()} {flat.dtype} elements, expected "
                               f"{size} fp32: its ZeRO-{stage} layout changed; Muon cannot find whole matrices")
        seen = [0] * len(self._params)
        for r in range(self.world_size):
            for k, _, length, _ in pieces[r]:
                seen[k] += length
        if seen != [p.numel() if stage == 2 else int(p.ds_numel) for p in self._params]:
            raise RuntimeError(f"DeepSpeed's ZeRO-{stage} partitions do not cover every tensor exactly once")
        for k, start, length, at in pieces[self.rank]:  # this rank's pieces hold the weights they claim to
            p = self._params[k]
            want = (p.detach().reshape(-1)[start:start + length] if stage == 2 else p.ds_tensor.reshape(-1)[:length])
            if not torch.equal(flat.detach()[at:at + length], want.float()):
                raise RuntimeError(f"DeepSpeed's ZeRO-{stage} partition layout is not the expected one (tensor {k})")
        self._stage, self._pieces, self._flat = stage, pieces, flat
        mine = pieces[self.rank]
        # outgoing: this rank's pieces as (offset in its partition, length) runs, grouped by owner; incoming: every
        # rank's pieces of this rank's tensors as runs in the owned buffers, in the order the sender packs them
        order = sorted(range(len(mine)), key=lambda i: self._owner[mine[i][0]])
        self._send_runs = [(mine[i][3], mine[i][2]) for i in order]
        self._send_rows = [sum(length for k, _, length, _ in mine if self._owner[k] == r)
                           for r in range(self.world_size)]
        recv = [[(self._start[k] + start, length) for k, start, length, _ in pieces[r] if self._owner[k] == self.rank]
                for r in range(self.world_size)]
        self._recv_rows = [sum(n for _, n in rows) for rows in recv]
        self._recv_runs = [run for rows in recv for run in rows]
        covered = torch.zeros(self._numel, dtype=torch.int32)
        for s0, n in self._recv_runs:
            covered[s0:s0 + n] += 1
        if not bool((covered == 1).all()):
            raise RuntimeError("the pieces sent to this rank do not make up its tensors exactly once")
        self._send_lens = [n for _, n in self._send_runs]
        self._recv_lens = [n for _, n in self._recv_runs]
        self._mine_idx = torch.tensor(self._mine, dtype=torch.long, device=self._dev)
        self._bound = True

    @staticmethod
    def _gather(buf: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        if not runs:
            return buf.new_zeros(0)
        return torch.cat([buf[s0:s0 + n] for s0, n in runs])

    @staticmethod
    def _scatter(dst: list[torch.Tensor], src: torch.Tensor, lens: list[int]) -> None:
        if dst:
            torch._foreach_copy_(dst, list(src.split(lens)))

    # -- step ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if not self._bound:
            raise RuntimeError("ZeroMuonWithAdam.step before bind_zero: it needs DeepSpeed's partition layout")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        (flat,) = group["params"]
        grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)
        # 1. to the owners: rows of (gradient, weight)
        out = torch.stack([self._gather(grad, self._send_runs), self._gather(flat.detach(), self._send_runs)], 1)
        got = all_to_all(out, self._send_rows, self._recv_rows).to(self._dev).t()  # (2, rows)
        w, g = self._hold()
        self._scatter([g[s0:s0 + n] for s0, n in self._recv_runs], got[0], self._recv_lens)
        self._scatter([w[s0:s0 + n] for s0, n in self._recv_runs], got[1], self._recv_lens)
        del out, got
        # 2. the global norm from one norm per whole tensor (zeros elsewhere: the sum over ranks is exact)
        if self.max_grad_norm > 0:
            norms = torch.zeros(len(self._params), dtype=torch.float32, device=self._dev)
            if self._mine:
                norms.index_copy_(0, self._mine_idx, grad_norms([self._full[k].grad for k in self._mine], self._dev))
            norms = all_reduce(norms).to(self._dev)
            g.mul_(clip_coef(norms, self.max_grad_norm))
        factor = group["lr"] / group.get("base_lr", group["lr"])
        for mg in self.model_groups:
            mg["lr"] = mg["base_lr"] * factor
        for gi, ig in zip(self._inner_of, self.inner.param_groups):
            ig["lr"] = self.model_groups[gi]["lr"]
        self.inner.found_inf = getattr(self, "found_inf", None)
        self.inner._update()
        # 3. the new weights back to the ranks that hold them
        back = all_to_all(self._gather(w, self._recv_runs), self._recv_rows, self._send_rows)
        self._release()
        self._scatter([flat.data[s0:s0 + n] for s0, n in self._send_runs], back.to(flat.device), self._send_lens)
        return loss

    # -- checkpoints -----------------------------------------------------------------------------------------
    def shard_state_dict(self) -> dict:
        """This rank's tensors' state, indexed and grouped like MuonWithAdam's state_dict of the whole model."""
        inner_sd = self.inner.state_dict()
        local = [k for g in self.inner.param_groups for k in self._keys(g["params"])]
        return {"state": {local[j]: st for j, st in inner_sd["state"].items()},
                "param_groups": [dict(mg, params=list(idx)) for mg, idx in zip(self.model_groups, self._group_idx)]}

    def _keys(self, tensors: list[torch.Tensor]) -> list[int]:
        by_id = {id(t): k for k, t in self._full.items()}
        return [by_id[id(t)] for t in tensors]

    def load_shards(self, shards: list[dict]) -> None:
        """The state from every saved rank's shard (any stage's, any number of ranks): this rank keeps its own."""
        merged = merge_shards(shards)
        if [g["params"] for g in merged["param_groups"]] != self._group_idx:
            raise ValueError("the optimizer shards were saved for another set of parameters")
        for mg, saved in zip(self.model_groups, merged["param_groups"]):
            mg.update({k: v for k, v in saved.items() if k not in ("params", "use_muon")})
        for gi, g in zip(self._inner_of, self.inner.param_groups):
            g["lr"] = self.model_groups[gi]["lr"]
        local = [k for g in self.inner.param_groups for k in self._keys(g["params"])]
        groups, j = [], 0
        for g in self.inner.param_groups:  # torch's format: the tensors numbered in group order
            groups.append(dict(g, params=list(range(j, j + len(g["params"])))))
            j += len(g["params"])
        self.inner.load_state_dict({"state": {j: merged["state"][k] for j, k in enumerate(local)
                                              if k in merged["state"]}, "param_groups": groups})

    @torch.no_grad()
    def load_full_weights(self, named: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
        """Whole fp32 weights by name (a checkpoint saved at another world size) into DeepSpeed's fp32 partitions
        and its working copies: the parameters (ZeRO-2) or their partitions (ZeRO-3)."""
        names = {id(p): n for n, p in module.named_parameters()}
        full = []
        for p in self._params:
            v = named.get(names.get(id(p)))
            if v is None or v.numel() != (p.numel() if self._stage == 2 else int(p.ds_numel)):
                raise ValueError(f"the consolidated checkpoint has no weight of the right size for {names.get(id(p))}")
            full.append(v.reshape(-1).to(self._flat.device, torch.float32))
        for k, start, length, at in self._pieces[self.rank]:
            self._flat.data[at:at + length].copy_(full[k][start:start + length])
            if self._stage == 3:
                self._params[k].ds_tensor.data.reshape(-1)[:length].copy_(full[k][start:start + length])
        if self._stage == 2:  # every rank holds every parameter whole
            for p, v in zip(self._params, full):
                p.data.copy_(v.view_as(p))

    def load_state_dict(self, state_dict: dict) -> None:
        """What DeepSpeed restores (its copy of state_dict(): no state); the shards come through load_shards."""
        saved = state_dict.get("param_groups") or [{}]
        if "lr" in saved[0]:
            self.param_groups[0]["lr"] = saved[0]["lr"]
