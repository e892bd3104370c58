"""KV events end to end: BlockPool -> DynamoKvEventSink -> KvEventPublisher -> NATS -> KvEventIndexer
(Dynamo's RadixTree); plus the sink adapter and the message decoder on their own."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable

import msgpack
import pytest

from dynamo_ext.kv.events import DynamoKvEventSink, KvEventSink, RecordingKvEventSink
from dynamo_ext.kv.hashing import block_hashes
from dynamo_ext.kv.indexer import KvEventIndexer, kv_events_subject
from dynamo_ext.kv.pool import BlockPool

pytest.importorskip("dynamo.llm")
BS = 16


class FakePublisher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def publish_stored(self, **kw) -> None:
        self.calls.append(("stored", kw))

    def publish_removed(self, **kw) -> None:
        self.calls.append(("removed", kw))


def test_dynamo_sink_maps_to_publisher_arguments():
    pub = FakePublisher()
    sink = DynamoKvEventSink(pub, BS)
    assert isinstance(sink, KvEventSink) and isinstance(RecordingKvEventSink(), KvEventSink)
    sink.publish_stored(list(range(32)), [5, 6], 4)
    sink.publish_removed([5])
    sink.publish_removed([])
    big = (1 << 64) - 2  # sequence hashes are unsigned 64-bit; the publisher takes signed 64-bit
    sink.publish_removed([big])
    assert pub.calls == [
        ("stored", dict(token_ids=list(range(32)), num_block_tokens=[BS, BS], block_hashes=[5, 6], parent_hash=4)),
        ("removed", dict(block_hashes=[5])),
        ("removed", dict(block_hashes=[-2])),
    ]
    with pytest.raises(ValueError):
        sink.publish_stored(list(range(31)), [5, 6], None)


def _msg(seq: int, events: list[dict]) -> bytes:
    payload = msgpack.packb(events)
    return msgpack.packb({"publisher_id": 7, "sequence": seq, "published_at": 0, "topic": "kv-events", "payload": payload})


def _stored(wid: int, eid: int, toks: list[int], ids: list[int], parent: int | None) -> dict:
    blocks = [{"block_hash": b, "tokens_hash": h, "mm_extra_info": None} for b, h in zip(ids, block_hashes(toks, BS))]
    data = {"stored": {"parent_hash": parent, "start_position": None, "blocks": blocks}}
    return {"worker_id": wid, "storage_tier": "device", "residency_domain": "worker", "event": {"event_id": eid, "dp_rank": 0, "data": data}}


def test_indexer_applies_messages_without_nats():
    idx = KvEventIndexer(BS)
    toks = list(range(100, 164))
    assert idx.apply_message(_msg(0, [_stored(1, 1, toks, [10, 11, 12, 13], None), _stored(2, 1, toks[:32], [0, 1], None)])) == 2
    assert idx.scores(toks) == {1: 4, 2: 2}
    removed = {"worker_id": 1, "event": {"event_id": 2, "dp_rank": 0, "data": {"removed": {"block_hashes": [12, 13]}}}}
    idx.apply_message(_msg(3, [removed]))  # sequence 1 and 2 lost
    assert idx.scores(toks) == {1: 2, 2: 2} and idx.stats.sequence_gaps == 2
    assert idx.apply_message(b"\xc1not msgpack") == 0 and idx.stats.decode_errors == 1
    idx.remove_worker(2)
    assert idx.scores(toks) == {1: 2}
    assert idx.scores(toks[:15]) == {}


async def _until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.timeout(60)
async def test_pool_events_reach_dynamo_radix_tree_over_nats(shared_etcd, shared_nats, monkeypatch):
    monkeypatch.setenv("ETCD_ENDPOINTS", shared_etcd.url)
    monkeypatch.setenv("NATS_SERVER", shared_nats.url)
    monkeypatch.setenv("DYN_EVENT_PLANE", "nats")
    from dynamo.runtime import DistributedRuntime

    ns = "kvtest" + uuid.uuid4().hex[:8]
    rt = DistributedRuntime(asyncio.get_running_loop(), "etcd", "tcp", event_plane="nats")
    serve = None
    idx = KvEventIndexer(BS)
    try:
        ep = rt.endpoint(f"{ns}.worker.generate")

        async def handler(request, context):
            yield {"ok": True}

        serve = asyncio.ensure_future(ep.serve_endpoint(handler))
        client = await ep.client()
        await asyncio.wait_for(client.wait_for_instances(), 10)
        worker_id = ep.connection_id()
        assert client.instance_ids() == [worker_id]

        await idx.start(shared_nats.url, kv_events_subject(ns))
        from dynamo.llm import KvEventPublisher

        sink = DynamoKvEventSink(KvEventPublisher(ep, kv_block_size=BS, enable_local_indexer=True), BS)
        pool = BlockPool(8, BS, sink)

        rng = random.Random(3)
        toks = [rng.randrange(50_000) for _ in range(4 * BS + 5)]
        ids = pool.allocate(4)
        pool.commit(ids, toks[: 4 * BS])
        await _until(lambda: idx.scores(toks) == {worker_id: 4})
        assert idx.scores(toks[: 2 * BS + 3]) == {worker_id: 2}
        assert idx.scores(list(reversed(toks))) == {}

        # a second sequence sharing two blocks: its new blocks name the shared block as parent
        other = toks[: 2 * BS] + [rng.randrange(50_000) for _ in range(BS)]
        hit = pool.match_tokens(other)
        assert hit == ids[:2]
        (new,) = pool.allocate(1)
        pool.commit([new], other[2 * BS :], parent=hit[-1])
        await _until(lambda: idx.scores(other) == {worker_id: 3})

        # release everything; eviction (tail first) publishes removed events
        pool.free(hit + [new])  # LRU: new
        pool.free(ids)  # LRU: new, ids[3], ids[2], ids[1], ids[0]
        pool.allocate(5)  # 3 free blocks, then evicts new and ids[3]
        await _until(lambda: idx.scores(other) == {worker_id: 2} and idx.scores(toks) == {worker_id: 3})
        pool.allocate(2)  # evicts ids[2], ids[1]
        await _until(lambda: idx.scores(toks) == {worker_id: 1})
        assert idx.stats.decode_errors == 0 and idx.stats.sequence_gaps == 0
        idx.remove_worker(worker_id)
        assert idx.scores(toks) == {}
    finally:
        await idx.close()
        rt.shutdown()
        if serve is not None:
            await asyncio.wait_for(serve, 10)


def test_router_event_sink_feeds_the_indexer_like_dynamos_publisher():
    """Without NATS (the direct request plane): RouterEventSink's events, applied unchanged, give the same scores."""
    from dynamo_ext.kv.events import RouterEventSink

    got: list[dict] = []
    pool = BlockPool(8, BS, RouterEventSink(BS, got.append))
    toks = list(range(300, 300 + 3 * BS + 4))
    ids = pool.allocate(3)
    pool.commit(ids, toks[: 3 * BS])
    idx = KvEventIndexer(BS)
    for ev in got:
        idx.apply_event(5, ev)
    assert idx.scores(toks) == {5: 3}
    pool.free(ids)
    pool.allocate(8)  # evicts the cached blocks: removed events
    for ev in got[len(got) - 1:]:
        idx.apply_event(5, ev)
    assert "removed" in got[-1]["data"] and idx.scores(toks) == {}


def test_two_workers_holding_the_same_prefix_are_both_indexed():
    """Issue 14.3: the router's index lost a worker's blocks when another worker already held the same
    content (Dynamo's RadixTree shares tree nodes between workers, and finds a worker's blocks again by
    their external hashes): every later child of those blocks was refused with 'Failed to find parent
    block' and removals with 'Failed to find block'. Events name blocks by content now, so the prefill
    worker and a decode worker that prefilled the same system prompt locally are both indexed."""
    from dynamo_ext.kv.events import RouterEventSink

    idx = KvEventIndexer(BS)
    pools = {}
    for wid, offset in ((1, 0), (2, 3)):  # different physical ids for the same content
        pools[wid] = BlockPool(16, BS, RouterEventSink(BS, lambda ev, w=wid: idx.apply_event(w, ev)))
        pools[wid].allocate(offset)
    system = list(range(1000, 1000 + 4 * BS))
    held = {}
    for wid in (1, 2):
        held[wid] = pools[wid].allocate(4)
        pools[wid].commit(held[wid], system)
    assert idx.scores(system) == {1: 4, 2: 4}
    # worker 2 stores a question after the system prompt: its parent is the shared last block
    question = system + list(range(5000, 5000 + 2 * BS))
    (q1, q2) = pools[2].allocate(2)
    pools[2].commit([q1, q2], question[4 * BS:], parent=held[2][-1])
    assert idx.scores(question) == {1: 4, 2: 6}
    # worker 2 evicts everything (removals of blocks worker 1 also holds)
    pools[2].free(held[2] + [q1, q2])
    pools[2].evict_all()
    assert idx.scores(question) == {1: 4}
    assert idx.stats.decode_errors == 0 and idx.stats.refused == {}
