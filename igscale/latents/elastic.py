"""The training data stream as a function of the run, not of the world size: a run can resume on other ranks.

A run's first start fixes its canonical layout: C ranks, workers, micro-batch b_c, shuffle window, seed. Canonical
stream c is exactly what LatentLoader(rank=c, world_size=C, ...) yields, epoch after epoch. Round g of the run is the
g-th batch of every canonical stream, concatenated in stream order (C * b_c samples, fewer where a stream's epoch
ends); every optimizer step consumes grad_accum rounds.

At world size W the round is cut into W equal spans of b = C * b_c / W positions; rank r takes span r, i.e. the
overlapping part of each canonical stream's slot [c * b_c, (c + 1) * b_c), clipped to that stream's batch (short at
its epoch's end, so a span can be short or, rarely, empty). The union over the ranks of every round is the round,
each sample once, for any W that divides the round. So the checkpointed position, each canonical stream's (epoch,
batches), means the same samples at any world size: a resume at W' continues the run's global sample order.

At W = C each rank reads its own stream unchanged (this class is then LatentLoader plus a pass-through), so a
same-size resume stays bit-identical. A rank whose span covers k streams reads all k (k <= ceil(b / b_c) + 1), and
a stream cut between two ranks is read by both: W' below C multiplies each rank's reads and shuffle windows by
C / W', W' above C reads each stream W' / C times (docs/training.md, "Elastic resume").
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from igscale.latents.loader import LatentLoader

__all__ = ["ElasticLoader", "merge_states", "spans_for"]

FORMAT = "elastic-1"
_CANON = ("world_size", "num_workers", "batch_size", "seed", "shuffle_buffer")


def spans_for(rank: int, world_size: int, canon_world: int, canon_batch: int) -> list[tuple[int, int, int]]:
    """[(canonical stream c, lo, hi)]: the part [lo, hi) of stream c's batch that `rank` takes from every round."""
    total = canon_world * canon_batch
    if total % world_size:
        raise ValueError(f"a round of {total} samples ({canon_world} canonical ranks x {canon_batch}) does not split "
                         f"over {world_size} ranks")
    b = total // world_size
    start, stop = rank * b, (rank + 1) * b
    return [(c, max(start, c * canon_batch) - c * canon_batch, min(stop, (c + 1) * canon_batch) - c * canon_batch)
            for c in range(start // canon_batch, -(-stop // canon_batch))]


def _as_elastic(state: dict[str, Any]) -> dict[str, Any]:
    """A loader state in this module's format; a plain LatentLoader state is one canonical stream of its layout."""
    if state.get("format") == FORMAT:
        return state
    canon = {k: state.get(k) for k in _CANON}
    return {"format": FORMAT, "canonical": canon,
            "streams": {int(state["rank"]): {"epoch": int(state["epoch"]), "batches": int(state["batches"])}}}


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state holding every canonical stream, from the loader states all ranks of a checkpoint saved. A stream
    read by two ranks appears twice with the same position; a disagreement is an error."""
    out: dict[str, Any] | None = None
    for st in map(_as_elastic, states):
        if out is None:
            out = copy.deepcopy(st)
            continue
        if st["canonical"] != out["canonical"]:
            raise ValueError(f"the checkpoint's ranks disagree on the data layout: {st['canonical']} vs "
                             f"{out['canonical']}")
        for c, pos in st["streams"].items():
            if out["streams"].setdefault(c, pos) != pos:
                raise ValueError(f"the checkpoint's ranks disagree on canonical stream {c}: {pos} vs "
                                 f"{out['streams'][c]}")
    if out is None:
        raise ValueError("no loader states to merge")
    missing = set(range(out["canonical"]["world_size"])) - {int(c) for c in out["streams"]}
    if missing:
        raise ValueError(f"the checkpoint lacks the position of canonical stream(s) {sorted(missing)}")
    return out


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch from per-stream pieces (dicts of (n, ...) tensors; "flip" may be None)."""
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}


def _piece(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {k: None if v is None else v[lo:hi] for k, v in batch.items()}


class ElasticLoader:
    """Iterate it for this rank's batches of the run's rounds (endless: epochs follow one another); `state_dict()`
    is this rank's canonical streams' positions, `load_state_dict` takes `merge_states` of every saved rank's (or
    this rank's own, at the same world size and layout). Other arguments are LatentLoader's."""

    def __init__(self, manifest_url: str, *, batch_size: int, rank: int, world_size: int, num_workers: int = 2,
                 seed: int = 0, shuffle_buffer: int = 1000, **loader_kw):
        self._url, self._kw = manifest_url, loader_kw
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.canonical = {"world_size": world_size, "num_workers": num_workers, "batch_size": batch_size,
                          "seed": seed, "shuffle_buffer": shuffle_buffer}
        self._build({})

    def _build(self, positions: dict[int, dict[str, int]]) -> None:
        cw, cb = self.canonical["world_size"], self.canonical["batch_size"]
        self.spans = spans_for(self.rank, self.world_size, cw, cb)
        self.streams: dict[int, LatentLoader] = {}
        for c, _, _ in self.spans:
            ld = LatentLoader(self._url, batch_size=cb, rank=c, world_size=cw, num_workers=self.canonical["num_workers"],
                              seed=self.canonical["seed"], shuffle_buffer=self.canonical["shuffle_buffer"], **self._kw)
            if c in positions:
                ld.load_state_dict({**ld.state_dict(), **positions[c]})
            self.streams[c] = ld
        first = next(iter(self.streams.values()))
        self.manifest, self.norm, self.num_samples = first.manifest, first.norm, first.num_samples
        self.latent_shape = first.latent_shape

    @property
    def elastic(self) -> bool:
        """True when this rank's batches are not one canonical stream's own (a resume at another world size)."""
        return len(self.spans) != 1 or self.spans[0][1:] != (0, self.canonical["batch_size"])

    @property
    def corrupt_shards(self) -> set[str]:
        return set().union(*(ld.corrupt_shards for ld in self.streams.values()))

    @property
    def epoch(self) -> int:
        return min(ld.epoch for ld in self.streams.values())

    def state_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "canonical": dict(self.canonical),
                "streams": {c: {"epoch": ld.epoch, "batches": ld.state_dict()["batches"]}
                            for c, ld in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _as_elastic(state)
        canon = state["canonical"]
        for k in ("seed", "shuffle_buffer"):
            if canon.get(k) != self.canonical[k]:
                raise ValueError(f"loader state has {k}={canon.get(k)} but this run has {self.canonical[k]}: "
                                 "the data order would change")
        if canon["world_size"] * canon["batch_size"] != self.world_size * self.batch_size:
            raise ValueError(f"the checkpoint's rounds hold {canon['world_size']} x {canon['batch_size']} samples, "
                             f"this run's {self.world_size} x {self.batch_size}: the global batch or grad_accum "
                             "changed")
        self.canonical = {k: canon[k] for k in _CANON}
        positions = {int(c): pos for c, pos in state["streams"].items()}
        self._build(positions)
        if missing := set(self.streams) - set(positions):
            raise ValueError(f"loader state lacks canonical stream(s) {sorted(missing)} that rank {self.rank} reads")

    def position(self) -> str:
        """Where the run is, in words, for logs."""
        return ", ".join(f"stream {c}: epoch {ld.epoch} batch {ld.state_dict()['batches']}"
                         for c, ld in self.streams.items())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        its = {c: self._endless(ld) for c, ld in self.streams.items()}
        try:
            if not self.elastic:  # this rank's own canonical stream: its batches, unchanged
                yield from its[self.spans[0][0]]
                return
            while True:
                yield _cat([_piece(next(its[c]), lo, hi) for c, lo, hi in self.spans])
        finally:
            for it in its.values():
                it.close()

    @staticmethod
    def _endless(ld: LatentLoader) -> Iterator[dict[str, Any]]:
        empty = 0  # a resume at an epoch's very end reads one empty epoch; two in a row would loop forever
        while True:
            n = 0
            # closed explicitly: closing this generator must stop the epoch's worker threads now, not whenever the
            # iterator is collected (a thread still inside a torch op at interpreter exit aborts the process)
            with contextlib.closing(iter(ld)) as epoch:
                for batch in epoch:
                    n += 1
                    yield batch
            empty = 0 if n else empty + 1
            if empty > 1:
                raise RuntimeError(f"canonical data stream {ld.rank} yielded no batch in two epochs: every one of its "
                                   f"shards is corrupt or skipped ({len(ld.corrupt_shards)} skipped)")

    def to_device(self, batch: dict[str, Any], device: torch.device | str,
                  non_blocking: bool = True) -> dict[str, torch.Tensor]:
        return next(iter(self.streams.values())).to_device(batch, device, non_blocking)
