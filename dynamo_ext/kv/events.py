"""KV events: what a pool tells the router about its cache, and the sinks that carry it.

Protocol::

    KvEventSink (typing.Protocol)
      publish_stored(token_ids, block_hashes, parent)  blocks just registered in the prefix cache, in
                                                     sequence order; token_ids are exactly their tokens
                                                     (len == len(block_hashes) * block_size); parent is the
                                                     hash of the block holding the preceding content, or
                                                     None at the start of a sequence
      publish_removed(block_hashes)                  blocks evicted from the prefix cache

    Block hashes are the pool's *sequence hashes* (``pool.sequence_hashes``: a chain over Dynamo's local
    block hashes, unsigned 64-bit), and they play the part of Dynamo's "external block hash" (vLLM's
    block hash). They name content, not storage: the same prefix has the same hashes on every worker,
    which Dynamo's ``RadixTree`` requires - its tree nodes are shared by the workers holding the same
    content, and a worker storing a path another worker created is only found again by the same external
    hashes. (Physical block ids were used before: a decode worker that stored a prefix the prefill worker
    already held lost those blocks from the router's index - "Failed to find parent block" on every later
    child, issue 14.3.) A pool stores a hash at most once at a time and removes it before storing it
    again. The router matches on the token hash that Dynamo computes from ``token_ids``
    (``hashing.block_hashes``).

Sinks:
    NullKvEventSink        drops everything (a pool without a router)
    RecordingKvEventSink   keeps the events in a list (tests; replay)
    snapshot_events(runs)  a pool's ``cached_runs()`` as the same router events (stored only), for a router
                           that rebuilds a worker's part of its index after a gap in the worker's events
    RouterEventSink        the same events as Dynamo's publisher puts on NATS (``{event_id, dp_rank, data:
                           {stored | removed}}``, tokens_hash = ``hashing.block_hashes``), handed to a
                           callback: request planes without NATS (bench/direct_worker.py) forward them and
                           the router applies them with ``KvEventIndexer.apply_event`` unchanged
    DynamoKvEventSink      over ``dynamo.llm.KvEventPublisher``: the worker (workers/) builds the
                           publisher on its served endpoint and hands it in; this module never
                           imports Dynamo. Wire format: notes §2 (msgpack envelope on core NATS,
                           subject ``namespace.<ns>.component.<comp>.endpoint.<ep>.kv-events``).

Nothing here imports Dynamo at module import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Union, runtime_checkable

__all__ = [
    "KvEventSink",
    "StoredEvent",
    "RemovedEvent",
    "KvEvent",
    "NullKvEventSink",
    "RecordingKvEventSink",
    "DynamoKvEventSink",
    "RouterEventSink",
    "snapshot_events",
]


@runtime_checkable
class KvEventSink(Protocol):
    def publish_stored(self, token_ids: Sequence[int], block_hashes: Sequence[int], parent: int | None) -> None: ...

    def publish_removed(self, block_hashes: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class StoredEvent:
    token_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]
    parent: int | None


@dataclass(frozen=True)
class RemovedEvent:
    block_hashes: tuple[int, ...]


KvEvent = Union[StoredEvent, RemovedEvent]


class NullKvEventSink:
    def publish_stored(self, token_ids: Sequence[int], block_hashes: Sequence[int], parent: int | None) -> None:
        pass

    def publish_removed(self, block_hashes: Sequence[int]) -> None:
        pass


@dataclass
class RecordingKvEventSink:
    events: list[KvEvent] = field(default_factory=list)

    def publish_stored(self, token_ids: Sequence[int], block_hashes: Sequence[int], parent: int | None) -> None:
        self.events.append(StoredEvent(tuple(token_ids), tuple(block_hashes), parent))

    def publish_removed(self, block_hashes: Sequence[int]) -> None:
        self.events.append(RemovedEvent(tuple(block_hashes)))

    def live_blocks(self) -> set[int]:
        """Block hashes stored and not removed since (what a router that saw every event believes)."""
        live: set[int] = set()
        for ev in self.events:
            if isinstance(ev, StoredEvent):
                live.update(ev.block_hashes)
            else:
                live.difference_update(ev.block_hashes)
        return live


class _BlockEventSink:
    """Shared checks of the sinks below: full blocks only, ``token_ids`` exactly their tokens; empty events dropped."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def publish_stored(self, token_ids: Sequence[int], block_hashes: Sequence[int], parent: int | None) -> None:
        n = len(block_hashes)
        if n == 0:
            return
        if len(token_ids) != n * self.block_size:
            raise ValueError(f"{len(token_ids)} tokens for {n} blocks of {self.block_size}")
        self._stored(list(token_ids), [int(b) for b in block_hashes], None if parent is None else int(parent))

    def publish_removed(self, block_hashes: Sequence[int]) -> None:
        if block_hashes:
            self._removed([int(b) for b in block_hashes])

    def _stored(self, token_ids: list[int], block_hashes: list[int], parent: int | None) -> None:
        raise NotImplementedError

    def _removed(self, block_hashes: list[int]) -> None:
        raise NotImplementedError


class RouterEventSink(_BlockEventSink):
    """``KvEventSink`` -> router events (the ``event`` of Dynamo's wire format, notes §2) through ``emit``."""

    def __init__(self, block_size: int, emit: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(block_size)
        self.emit = emit
        self.event_id = 0

    def _event(self, data: dict[str, Any]) -> None:
        self.event_id += 1
        self.emit({"event_id": self.event_id, "dp_rank": 0, "data": data})

    def _stored(self, token_ids: list[int], block_hashes: list[int], parent: int | None) -> None:
        from .hashing import block_hashes as local_hashes  # noqa: PLC0415

        self._event(_stored_data(parent, list(zip(block_hashes, local_hashes(token_ids, self.block_size)))))

    def _removed(self, block_hashes: list[int]) -> None:
        self._event({"removed": {"block_hashes": block_hashes}})


def _stored_data(parent: int | None, blocks: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """The ``data`` of a stored router event: blocks as (sequence hash, local tokens hash)."""
    return {"stored": {"parent_hash": parent, "start_position": None,
                       "blocks": [{"block_hash": int(b), "tokens_hash": int(h), "mm_extra_info": None} for b, h in blocks]}}


def snapshot_events(runs: Sequence[tuple[int | None, Sequence[tuple[int, int]]]]) -> list[dict[str, Any]]:
    """Router events (``{event_id, dp_rank, data: {stored}}``, as ``RouterEventSink`` emits) for a pool's
    ``cached_runs()``: applied in order to an empty part of a ``RadixTree`` they give what the live stream of
    stored/removed events gives (tests/kv/test_kv_resync.py)."""
    return [{"event_id": i + 1, "dp_rank": 0, "data": _stored_data(parent, blocks)}
            for i, (parent, blocks) in enumerate(runs)]


def _signed(h: int) -> int:
    """An unsigned 64-bit hash as the signed 64-bit integer ``KvEventPublisher`` takes (it puts the same 64
    bits on the wire, so the router sees the unsigned value ``RouterEventSink`` sends)."""
    return h - (1 << 64) if h >= 1 << 63 else h


class DynamoKvEventSink(_BlockEventSink):
    """Adapter: ``KvEventSink`` -> ``dynamo.llm.KvEventPublisher``.

    ``publisher`` must have been created with ``kv_block_size == block_size``.
    """

    def __init__(self, publisher: Any, block_size: int) -> None:
        super().__init__(block_size)
        self.publisher = publisher

    def _stored(self, token_ids: list[int], block_hashes: list[int], parent: int | None) -> None:
        self.publisher.publish_stored(token_ids=token_ids, num_block_tokens=[self.block_size] * len(block_hashes),
                                      block_hashes=[_signed(h) for h in block_hashes],
                                      parent_hash=None if parent is None else _signed(parent))

    def _removed(self, block_hashes: list[int]) -> None:
        self.publisher.publish_removed(block_hashes=[_signed(h) for h in block_hashes])
