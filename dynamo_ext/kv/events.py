"""KV events: what a pool tells the router about its cache, and the sinks that carry it.

Protocol::

    KvEventSink (typing.Protocol)
      publish_stored(token_ids, block_ids, parent)   blocks just registered in the prefix cache, in
                                                     sequence order; token_ids are exactly their tokens
                                                     (len == len(block_ids) * block_size); parent is the
                                                     block id holding the preceding block's content, or
                                                     None at the start of a sequence
      publish_removed(block_ids)                     blocks evicted from the prefix cache

    Block ids are the pool's physical ids. They play the part of Dynamo's "external block hash":
    an id is stored at most once at a time and is removed before it is stored again, so the router
    can key on (worker, id). The router matches on the token hash that Dynamo computes from
    ``token_ids`` (``hashing.block_hashes``).

Sinks:
    NullKvEventSink        drops everything (a pool without a router)
    RecordingKvEventSink   keeps the events in a list (tests; replay)
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
]


@runtime_checkable
class KvEventSink(Protocol):
    def publish_stored(self, token_ids: Sequence[int], block_ids: Sequence[int], parent: int | None) -> None: ...

    def publish_removed(self, block_ids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class StoredEvent:
    token_ids: tuple[int, ...]
    block_ids: tuple[int, ...]
    parent: int | None


@dataclass(frozen=True)
class RemovedEvent:
    block_ids: tuple[int, ...]


KvEvent = Union[StoredEvent, RemovedEvent]


class NullKvEventSink:
    def publish_stored(self, token_ids: Sequence[int], block_ids: Sequence[int], parent: int | None) -> None:
        pass

    def publish_removed(self, block_ids: Sequence[int]) -> None:
        pass


@dataclass
class RecordingKvEventSink:
    events: list[KvEvent] = field(default_factory=list)

    def publish_stored(self, token_ids: Sequence[int], block_ids: Sequence[int], parent: int | None) -> None:
        self.events.append(StoredEvent(tuple(token_ids), tuple(block_ids), parent))

    def publish_removed(self, block_ids: Sequence[int]) -> None:
        self.events.append(RemovedEvent(tuple(block_ids)))

    def live_blocks(self) -> set[int]:
        """Block ids stored and not removed since (what a router that saw every event believes)."""
        live: set[int] = set()
        for ev in self.events:
            if isinstance(ev, StoredEvent):
                live.update(ev.block_ids)
            else:
                live.difference_update(ev.block_ids)
        return live


class _BlockEventSink:
    """Shared checks of the sinks below: full blocks only, ``token_ids`` exactly their tokens; empty events dropped."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def publish_stored(self, token_ids: Sequence[int], block_ids: Sequence[int], parent: int | None) -> None:
        n = len(block_ids)
        if n == 0:
            return
        if len(token_ids) != n * self.block_size:
            raise ValueError(f"{len(token_ids)} tokens for {n} blocks of {self.block_size}")
        self._stored(list(token_ids), [int(b) for b in block_ids], parent)

    def publish_removed(self, block_ids: Sequence[int]) -> None:
        if block_ids:
            self._removed([int(b) for b in block_ids])

    def _stored(self, token_ids: list[int], block_ids: list[int], parent: int | None) -> None:
        raise NotImplementedError

    def _removed(self, block_ids: list[int]) -> None:
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

    def _stored(self, token_ids: list[int], block_ids: list[int], parent: int | None) -> None:
        from .hashing import block_hashes  # noqa: PLC0415

        blocks = [{"block_hash": b, "tokens_hash": h, "mm_extra_info": None}
                  for b, h in zip(block_ids, block_hashes(token_ids, self.block_size))]
        self._event({"stored": {"parent_hash": parent, "start_position": None, "blocks": blocks}})

    def _removed(self, block_ids: list[int]) -> None:
        self._event({"removed": {"block_hashes": block_ids}})


class DynamoKvEventSink(_BlockEventSink):
    """Adapter: ``KvEventSink`` -> ``dynamo.llm.KvEventPublisher``.

    ``publisher`` must have been created with ``kv_block_size == block_size``.
    """

    def __init__(self, publisher: Any, block_size: int) -> None:
        super().__init__(block_size)
        self.publisher = publisher

    def _stored(self, token_ids: list[int], block_ids: list[int], parent: int | None) -> None:
        self.publisher.publish_stored(token_ids=token_ids, num_block_tokens=[self.block_size] * len(block_ids),
                                      block_hashes=block_ids, parent_hash=parent)

    def _removed(self, block_ids: list[int]) -> None:
        self.publisher.publish_removed(block_hashes=block_ids)
