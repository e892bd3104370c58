"""Issue 14.3: a gap in a worker's KV events (messages lost between the worker and the router's index) is
detected from the publisher's sequence numbers and that worker's part of the index is rebuilt from a
snapshot of its prefix cache (``BlockPool.cached_runs`` -> ``events.snapshot_events``), with the live events
that arrive meanwhile buffered and applied after it. Dynamo's real RadixTree; no NATS (the messages are the
wire format, handed to ``apply_message``)."""

from __future__ import annotations

import random

import msgpack
import msgspec
import pytest

from dynamo_ext.kv.events import RouterEventSink, snapshot_events
from dynamo_ext.kv.indexer import KvEventIndexer
from dynamo_ext.kv.pool import BlockPool, OutOfBlocks

pytest.importorskip("dynamo.llm")
BS = 4
SYSTEMS = [[1000 * s + i for i in range(3 * BS)] for s in range(4)]


def _prompt(rng: random.Random) -> list[int]:
    return rng.choice(SYSTEMS) + [rng.randrange(50) for _ in range(rng.randrange(0, 4 * BS))]


def _run_requests(pool: BlockPool, rng: random.Random, n: int) -> None:
    """What an engine does to its pool: match the cached prefix, allocate the rest (evicting), commit, free."""
    held: list[list[int]] = []
    for _ in range(n):
        toks = _prompt(rng)
        full = len(toks) // BS
        hit = pool.match_tokens(toks[: full * BS])
        try:
            new = pool.allocate(full - len(hit))
        except OutOfBlocks:
            pool.free(hit)
            continue
        if new:
            pool.commit(new, toks[len(hit) * BS: full * BS], parent=hit[-1] if hit else None)
        held.append(hit + new)
        if len(held) > 2 or rng.random() < 0.5:
            pool.free(held.pop(0))
    for h in held:
        pool.free(h)


def _scores(idx: KvEventIndexer, w: int) -> list[int]:
    return [idx.scores(p).get(w, 0) for p in [s + [7] * (3 * BS) for s in SYSTEMS] + [s[:BS] for s in SYSTEMS]]


@pytest.mark.parametrize("seed", range(6))
def test_a_snapshot_rebuilds_what_the_live_events_built(seed):
    rng = random.Random(seed)
    live = KvEventIndexer(BS)
    pool = BlockPool(24, BS, RouterEventSink(BS, lambda ev: live.apply_event(3, ev)))
    _run_requests(pool, rng, 60)
    pool.check_invariants()
    runs = pool.cached_runs()
    assert sum(len(b) for _p, b in runs) <= pool.stats().registered
    rebuilt = KvEventIndexer(BS)
    for ev in snapshot_events(runs):
        rebuilt.apply_event(3, ev)
    assert _scores(rebuilt, 3) == _scores(live, 3) and any(_scores(live, 3))
    assert rebuilt.stats.refused == {} and live.stats.refused == {}


def _msg(seq: int, wid: int, events: list[dict]) -> bytes:
    payload = msgpack.packb([{"worker_id": wid, "storage_tier": "device", "event": e} for e in events])
    return msgpack.packb({"publisher_id": 70 + wid, "sequence": seq, "published_at": 0, "topic": "kv-events",
                          "payload": payload})


def test_a_lost_message_is_detected_and_the_worker_resynced_from_its_snapshot():
    rng = random.Random(1)
    sent: list[dict] = []
    pool = BlockPool(24, BS, RouterEventSink(BS, sent.append))
    idx = KvEventIndexer(BS)
    gaps: list[list[int]] = []
    idx.on_gap = gaps.append
    truth = KvEventIndexer(BS)  # every event, none lost
    seq = 0

    def deliver(drop: bool = False) -> None:
        nonlocal seq
        for ev in sent:
            truth.apply_event(5, ev)
            seq += 1
            if not drop:
                idx.apply_message(_msg(seq, 5, [ev]))
            drop = False  # only the first one is lost
        sent.clear()

    _run_requests(pool, rng, 20)
    deliver()
    assert _scores(idx, 5) == _scores(truth, 5)
    _run_requests(pool, rng, 20)
    deliver(drop=True)  # one message lost: the next one shows the gap
    assert gaps == [[5]] and idx.stats.sequence_gaps == 1 and idx.resyncing() == [5]
    _run_requests(pool, rng, 5)  # live events while the snapshot is on its way: buffered
    deliver()
    snap = [{"events": snapshot_events(pool.cached_runs()), "total": 0}]
    _run_requests(pool, rng, 5)  # and after it was taken
    deliver()
    with pytest.raises(msgspec.ValidationError):  # peer data is validated: nothing changes on a bad one
        idx.finish_resync(5, [{"events": [{"event_id": 1, "data": {"removed": {}}}]}])
    assert idx.resyncing() == [5]
    assert idx.finish_resync(5, snap) > 0
    gone = KvEventIndexer(BS)  # a worker removed while its snapshot was on the way stays removed
    gone.begin_resync(8)
    gone.remove_worker(8)
    assert gone.finish_resync(8, [{"events": snap[0]["events"]}]) == 0 and gone.scores(SYSTEMS[0] * 2) == {}
    assert idx.resyncing() == [] and idx.stats.resyncs == 1
    assert _scores(idx, 5) == _scores(truth, 5) and any(_scores(truth, 5))
    _run_requests(pool, rng, 10)  # live again
    deliver()
    assert _scores(idx, 5) == _scores(truth, 5)
    assert idx.stats.refused == {}, idx.stats.summary()


def test_without_a_snapshot_the_buffered_events_are_applied():
    idx = KvEventIndexer(BS)
    idx.on_gap = lambda ws: None
    sent: list[dict] = []
    pool = BlockPool(24, BS, RouterEventSink(BS, sent.append))
    _run_requests(pool, random.Random(2), 10)
    idx.apply_message(_msg(1, 6, sent[:1]))
    idx.apply_message(_msg(3, 6, sent[1:]))  # sequence 2 lost
    assert idx.resyncing() == [6] and idx.stats.events == 1  # the message after the gap waits for the snapshot
    idx.abort_resync(6, "worker did not answer")
    assert idx.resyncing() == [] and idx.stats.resync_failures == 1 and idx.stats.events == len(sent)


def test_a_late_index_resyncs_each_publisher_at_its_first_message():
    """resync_new_publishers (the router's setting): an index that starts after the worker (a restarted router)
    asks for the worker's cache at its first message, so blocks cached before it started are found."""
    sent: list[dict] = []
    pool = BlockPool(24, BS, RouterEventSink(BS, sent.append))
    _run_requests(pool, random.Random(3), 20)  # before the index exists
    before = len(sent)
    _run_requests(pool, random.Random(4), 3)
    late, plain = KvEventIndexer(BS, resync_new_publishers=True), KvEventIndexer(BS)
    asked: list[list[int]] = []
    late.on_gap, plain.on_gap = asked.append, asked.append
    for i, ev in enumerate(sent[before:], start=before + 1):
        late.apply_message(_msg(i, 9, [ev]))
        plain.apply_message(_msg(i, 9, [ev]))
    assert asked == [[9]] and late.resyncing() == [9] and plain.resyncing() == []
    late.finish_resync(9, [{"events": snapshot_events(pool.cached_runs())}])
    truth = KvEventIndexer(BS)
    for ev in sent:
        truth.apply_event(9, ev)
    assert _scores(late, 9) == _scores(truth, 9) != _scores(plain, 9)
