"""Muon with its optimizer state and Newton-Schulz work divided over the data-parallel ranks (ZeRO-1 for Muon).

`optim.name: muon` with `engine.zero_stage: 1`. DeepSpeed runs without partitioning underneath, so every rank gets
the whole averaged gradient of every matrix. Each trainable tensor has one owner rank, which keeps its optimizer
state and computes its update with MuonWithAdam's own code. Matrices are assigned greedily by Newton-Schulz FLOPs,
largest first onto the least loaded rank; the Adam tensors by size. One all-gather of the owners' new values then
gives every rank the whole model. The result is bitwise MuonWithAdam's on every rank (the same code on the same
inputs), with the state and the orthogonalisation FLOPs divided by the world size (docs/benchmarks.md).
DeepSpeed's own Muon was measured against the reference and differs (docs/benchmarks.md), so it is not used.

Checkpoints: `state_dict()` is this rank's shard (DeepSpeed stores rank 0's copy; the trainer stores every rank's,
see igscale.checkpoint.layout), and `load_shards` takes every saved rank's shard, at any world size.
"""
from __future__ import annotations

import torch

from igscale.distributed.collectives import all_gather
from igscale.training.muon import MuonWithAdam

__all__ = ["ShardedMuonWithAdam", "assign_owners", "ns_flops", "merge_shards"]


def ns_flops(shape: torch.Size, steps: int) -> float:
    """FLOPs of one quintic Newton-Schulz on a weight of `shape` (flattened to rows x rest, wide orientation)."""
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    r, c = min(rows, cols), max(rows, cols)
    return steps * (4.0 * r * r * c + 2.0 * r ** 3)


def assign_owners(param_groups: list[dict], world_size: int) -> list[list[int]]:
    """Owner rank of every tensor, [group][index]: the same on every rank (a pure function of the shapes)."""
    load = [[0.0, 0] for _ in range(world_size)]  # per rank: NS FLOPs, Adam elements
    owners = [[0] * len(g["params"]) for g in param_groups]
    items = [(gi, i, p, g) for gi, g in enumerate(param_groups) for i, p in enumerate(g["params"])]
    muon = sorted((t for t in items if t[3]["use_muon"]), key=lambda t: (-ns_flops(t[2].shape, t[3]["ns_steps"]),
                                                                          t[0], t[1]))
    adam = sorted((t for t in items if not t[3]["use_muon"]), key=lambda t: (-t[2].numel(), t[0], t[1]))
    for gi, i, p, g in muon:
        r = min(range(world_size), key=lambda k: (load[k][0], k))
        load[r][0] += ns_flops(p.shape, g["ns_steps"])
        owners[gi][i] = r
    for gi, i, p, _ in adam:
        r = min(range(world_size), key=lambda k: (load[k][1], k))
        load[r][1] += p.numel()
        owners[gi][i] = r
    return owners


def merge_shards(shards: list[dict]) -> dict:
    """One optimizer state dict from every rank's shard (each holds the state of the tensors that rank owned)."""
    if not shards:
        raise ValueError("no optimizer shards to merge")
    merged = {"state": {}, "param_groups": shards[0]["param_groups"]}
    for sd in shards:
        if [g["params"] for g in sd["param_groups"]] != [g["params"] for g in merged["param_groups"]]:
            raise ValueError("the optimizer shards disagree on their parameter groups")
        merged["state"].update(sd["state"])
    return merged


class ShardedMuonWithAdam(MuonWithAdam):
    """MuonWithAdam whose step updates only this rank's tensors, then all-gathers everyone's."""

    shards_itself = True  # the trainer saves every rank's state_dict() (its shard)
    whole_params = True  # the engine runs DeepSpeed unpartitioned underneath (whole matrices, whole gradients)

    def __init__(self, param_groups: list[dict], *, rank: int, world_size: int, max_grad_norm: float = 0.0):
        super().__init__(param_groups, max_grad_norm=max_grad_norm)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        self.rank, self.world_size = rank, world_size
        dtypes = {p.dtype for g in self.param_groups for p in g["params"]}
        if len(dtypes) > 1:
            raise ValueError(f"sharded Muon needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self._owners = assign_owners(self.param_groups, world_size)
        self._all = [list(g["params"]) for g in self.param_groups]
        self._mine = [[p for p, o in zip(ps, own) if o == rank] for ps, own in zip(self._all, self._owners)]
        # per rank, its tensors in one fixed order: what it contributes to (and reads from) the all-gather
        self._by_rank = [[p for ps, own in zip(self._all, self._owners) for p, o in zip(ps, own) if o == r]
                         for r in range(world_size)]
        self._width = max(sum(p.numel() for p in ps) for ps in self._by_rank)
        self.ns_per_step = sum(len(m) for m, g in zip(self._mine, self.param_groups) if g["use_muon"])

    def _update(self) -> None:
        # gradients were clipped over the whole model (MuonWithAdam.step); each rank updates its own tensors
        for g, mine in zip(self.param_groups, self._mine):
            g["params"] = mine
        try:
            super()._update()
        finally:
            for g, ps in zip(self.param_groups, self._all):
                g["params"] = ps
        self._exchange()

    def _exchange(self) -> None:
        """One all-gather: every rank's updated tensors, flattened into a buffer padded to the widest rank's."""
        mine = self._by_rank[self.rank]
        ref = self._all[0][0]
        buf = torch.zeros(self._width, dtype=ref.dtype, device=ref.device)
        if mine:
            buf[:sum(p.numel() for p in mine)].copy_(torch.cat([p.detach().reshape(-1) for p in mine]))
        for r, part in enumerate(all_gather(buf)):
            if r == self.rank:
                continue
            off = 0
            for p in self._by_rank[r]:
                p.copy_(part[off:off + p.numel()].view_as(p), non_blocking=True)
                off += p.numel()

    def load_state_dict(self, state_dict: dict) -> None:
        """Any one shard (DeepSpeed hands every rank rank 0's): keeps only the state of the tensors this rank owns."""
        super().load_state_dict(state_dict)
        self._drop_foreign()

    def load_shards(self, shards: list[dict]) -> None:
        """The state from every saved rank's `state_dict()` (any number of ranks): this rank keeps its own."""
        super().load_state_dict(merge_shards(shards))
        self._drop_foreign()

    def _drop_foreign(self) -> None:
        owned = {id(p) for ps in self._mine for p in ps}
        for p in [p for p in self.state if id(p) not in owned]:
            del self.state[p]
