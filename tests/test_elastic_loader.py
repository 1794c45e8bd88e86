"""The elastic data position (igscale.latents.elastic) on the real S3 server: a run that changes world size
mid-epoch takes, round by round, exactly the samples of the uninterrupted run, each once.

The reference is the uninterrupted 2-rank run read through LatentLoader itself (an independent reading of the
stream); the shards are uneven (7 vs 6 per rank, one short batch), so the canonical streams end their epochs at
different rounds and one world size (12) gets empty pieces.
"""
from __future__ import annotations

import collections
import os

import pytest

from igscale.latents.elastic import ElasticLoader, merge_states, spans_for
from igscale.latents.loader import LatentLoader
from tests.test_train_deepspeed import write_tiny_latents

ROUND = 12  # samples per round: 2 canonical ranks x 6


@pytest.fixture(scope="module")
def manifest(s3_server):
    os.environ.update(s3_server.env)  # credentials for the loaders, as the other loader tests do
    return write_tiny_latents(s3_server, s3_server.create_bucket(), num=130, per_shard=10).manifest


def _kw(s3_server):
    return dict(num_workers=2, seed=3, shuffle_buffer=18, endpoint_url=s3_server.endpoint_url, return_keys=True)


def _reference_rounds(manifest, s3_server, n) -> tuple[list[collections.Counter], list[int]]:
    """Rounds 0..n-1 of the uninterrupted 2-rank run as multisets of keys (the rank streams read directly), and the
    keys those rounds took from epoch 0."""
    rounds, epoch0 = [collections.Counter() for _ in range(n)], []
    for r in range(2):
        ld = LatentLoader(manifest, batch_size=ROUND // 2, rank=r, world_size=2, **_kw(s3_server))
        g = 0
        while g < n:
            e = ld.epoch
            for b in ld:
                if g == n:
                    break
                rounds[g].update(b["key"].tolist())
                epoch0 += b["key"].tolist() if e == 0 else []
                g += 1
    return rounds, epoch0


def _stage(manifest, s3_server, world, rounds, state) -> tuple[list[collections.Counter], dict]:
    """`rounds` rounds at `world` ranks from the merged `state` (None: a fresh run). Returns each round's keys over
    all ranks and the merged state the ranks saved."""
    got = [collections.Counter() for _ in range(rounds)]
    saved = []
    for r in range(world):
        ld = ElasticLoader(manifest, batch_size=ROUND // world, rank=r, world_size=world, **_kw(s3_server))
        if state is not None:
            ld.load_state_dict(state)
        it = iter(ld)
        for g in range(rounds):
            keys = next(it)["key"].tolist()
            assert len(keys) <= ROUND // world
            got[g].update(keys)
        it.close()
        saved.append(ld.state_dict())
    return got, merge_states(saved)


def test_rounds_are_the_same_samples_at_any_world_size(manifest, s3_server):
    plan = [(2, 3), (1, 3), (3, 3), (12, 4)]  # (world size, rounds): 13 rounds cross both streams' epoch ends
    ref, epoch0 = _reference_rounds(manifest, s3_server, sum(n for _, n in plan))
    state, got = None, []
    for world, n in plan:
        rounds, state = _stage(manifest, s3_server, world, n, state)
        got += rounds
    for g, (a, b) in enumerate(zip(got, ref)):
        assert a == b, g  # the same samples, as many times, in every round
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 130  # and so the epoch, each sample once
    assert sum(len(c) == ROUND for c in got) < len(got)  # the tail's short round was exercised


def test_spans_cover_every_round_once():
    for cw, cb in ((2, 6), (3, 4), (8, 2)):
        for w in (1, 2, 3, 4, 6, 12, 16, 24):
            if (cw * cb) % w:
                with pytest.raises(ValueError, match="does not split"):
                    spans_for(0, w, cw, cb)
                continue
            cover = collections.Counter()
            for r in range(w):
                for c, lo, hi in spans_for(r, w, cw, cb):
                    assert 0 <= lo < hi <= cb
                    cover.update(c * cb + i for i in range(lo, hi))
            assert cover == collections.Counter(range(cw * cb)), (cw, cb, w)


def test_same_layout_is_the_plain_stream_and_bad_states_are_refused(manifest, s3_server):
    kw = _kw(s3_server)
    el = ElasticLoader(manifest, batch_size=6, rank=1, world_size=2, **kw)
    plain = LatentLoader(manifest, batch_size=6, rank=1, world_size=2, **kw)
    assert not el.elastic
    for a, b in zip(iter(el), plain):
        assert a["key"].tolist() == b["key"].tolist() and a["latent"].equal(b["latent"])
    s0 = ElasticLoader(manifest, batch_size=6, rank=0, world_size=2, **kw).state_dict()
    s1 = el.state_dict()
    with pytest.raises(ValueError, match="lacks the position of canonical stream"):
        merge_states([s0])
    bad = {**s1, "streams": {1: {"epoch": 0, "batches": 3}}}
    with pytest.raises(ValueError, match="disagree on canonical stream 1"):
        merge_states([s0, s1, bad])
    one = ElasticLoader(manifest, batch_size=8, rank=0, world_size=1, **kw)
    with pytest.raises(ValueError, match="global batch or grad_accum changed"):
        one.load_state_dict(merge_states([s0, s1]))
    legacy = {"epoch": 0, "batches": 2, "num_workers": 2, "rank": 0, "world_size": 1, "batch_size": 12, "seed": 3,
              "shuffle_buffer": 18}  # a plain LatentLoader state, as checkpoints before the elastic loader hold
    one = ElasticLoader(manifest, batch_size=6, rank=1, world_size=2, **kw)
    one.load_state_dict(merge_states([legacy]))
    assert one.spans == [(0, 6, 12)] and one.streams[0].state_dict()["batches"] == 2


def test_ray_auto_workers_take_the_cluster_slots_the_round_splits_over():
    from igscale.cli.train import auto_workers

    cpu = dict(use_gpu=False, cpus_per_worker=2.0)
    assert auto_workers({"CPU": 16.0, "GPU": 0}, round_size=64, **cpu) == 8
    assert auto_workers({"CPU": 14.0}, round_size=64, **cpu) == 4  # 7 slots; 64 splits over 4, not 7, 6 or 5
    assert auto_workers({"CPU": 64.0, "GPU": 48.0}, use_gpu=True, cpus_per_worker=1, round_size=1024) == 32
    assert auto_workers({"GPU": 8.0}, use_gpu=True, cpus_per_worker=1, round_size=4) == 4
    with pytest.raises(ValueError, match="no worker slot"):
        auto_workers({"CPU": 1.0}, round_size=8, **cpu)


def test_closing_mid_epoch_stops_every_worker_thread(manifest, s3_server):
    """The trainer closes its data iterator when a run ends mid-epoch: the epoch's worker threads must be gone at
    once (a thread still inside a torch op while the interpreter finalises aborts the process), for the
    pass-through stream and for a resized one alike."""
    import gc
    import threading

    def loader_threads():
        return [t for t in threading.enumerate() if t.name.startswith("latent-loader")]

    for world, rank in ((2, 1), (3, 2)):  # canonical size, then a resize from a 2-rank layout
        el = ElasticLoader(manifest, batch_size=12 // world, rank=rank, world_size=world, **_kw(s3_server))
        if world == 3:
            el.load_state_dict(merge_states([ElasticLoader(manifest, batch_size=6, rank=r, world_size=2,
                                                           **_kw(s3_server)).state_dict() for r in range(2)]))
        it = iter(el)
        next(it)
        assert loader_threads()
        gc.disable()  # the close must not rely on the collector
        try:
            it.close()
            assert not loader_threads(), loader_threads()
        finally:
            gc.enable()
