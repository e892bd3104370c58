"""Router-side KV index: workers' KV events from NATS into Dynamo's ``RadixTree``.

(``dynamo.llm.KvIndexer`` is missing from the 1.6.1 binary; this is option 1 of the integration
notes §2.)

Wire format (core NATS, no JetStream), one message per published batch::

    subject   namespace.<ns>.component.<comp>.endpoint.<ep>.kv-events
    data      msgpack {publisher_id, sequence, published_at (ms), topic: "kv-events", payload}
    payload   msgpack [ {worker_id, storage_tier, residency_domain,
                         event: {event_id, dp_rank,
                                 data: {stored: {parent_hash, start_position,
                                                 blocks: [{block_hash, tokens_hash, mm_extra_info}]}}
                                     | {removed: {block_hashes: [...]}}}} , ... ]

Each ``event`` is handed to ``RadixTree.apply_event(worker_id, json(event))`` unchanged. Queries use
Dynamo's local block hashes (``hashing.block_hashes``); ``find_matches`` answers
``{(worker_id, dp_rank): matched_blocks}``.

    KvEventIndexer(block_size)
      await start(nats_url, subject) / await subscribe(nc, subject) / await close()
      apply_message(bytes) -> events applied      (the NATS callback; also usable without NATS)
      scores(tokens) -> {worker_id: blocks}       best dp rank of each worker; workers with 0 omitted
      scores_for_hashes(hashes), scores_by_rank(hashes)
      remove_worker(worker_id)                    the caller does this when an instance disappears
      stats: messages, events, decode_errors, sequence_gaps (per publisher ``sequence`` holes)

Events are live-only: an indexer started late knows nothing of earlier blocks (Dynamo's worker-local
indexer recovery is not used here). Dynamo is imported lazily (``RadixTree`` when the indexer is
built without one); nats-py only in ``start``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .hashing import block_hashes

__all__ = ["KvEventIndexer", "IndexerStats", "kv_events_subject", "decode_kv_message"]

log = logging.getLogger(__name__)


def kv_events_subject(namespace: str, component: str = "*", endpoint: str = "*") -> str:
    """NATS subject of the KV events of one endpoint (``*`` wildcards allowed)."""
    return f"namespace.{namespace}.component.{component}.endpoint.{endpoint}.kv-events"


def decode_kv_message(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(envelope without payload, list of router events) of one NATS message."""
    env = msgpack.unpackb(data, raw=False)
    payload = env.pop("payload")
    events = msgpack.unpackb(payload, raw=False) if isinstance(payload, (bytes, bytearray)) else payload
    if isinstance(events, dict):
        events = [events]
    return env, list(events)


@dataclass
class IndexerStats:
    messages: int = 0
    events: int = 0
    decode_errors: int = 0
    sequence_gaps: int = 0
    last_sequence: dict[int, int] = field(default_factory=dict)
    #: events the tree refused, by reason ("parent_missing", "block_missing", "other")
    refused: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"messages": self.messages, "events": self.events, "decode_errors": self.decode_errors,
                "sequence_gaps": self.sequence_gaps, "refused": dict(self.refused)}


def _refusal(e: Exception) -> str:
    text = str(e).lower()
    if "parent" in text:
        return "parent_missing"
    if "not found" in text or "find" in text:
        return "block_missing"
    return "other"


class KvEventIndexer:
    def __init__(self, block_size: int, tree: Any | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if tree is None:
            from dynamo.llm import RadixTree

            tree = RadixTree()
        self.block_size = block_size
        self.tree = tree
        self.stats = IndexerStats()
        self._nc: Any = None
        self._own_nc = False
        self._sub: Any = None

    # -- NATS -------------------------------------------------------------------------------------
    async def start(self, nats_url: str, subject: str) -> None:
        import nats

        from dynamo_ext.discovery.env import nats_options  # TLS + token from the variables Dynamo reads

        nc = await nats.connect(nats_url, **nats_options())
        self._own_nc = True
        await self.subscribe(nc, subject)

    async def subscribe(self, nc: Any, subject: str) -> None:
        """Subscribe on a connected nats-py client; returns once the server has the subscription."""
        self._nc = nc

        async def _cb(msg: Any) -> None:
            self.apply_message(msg.data)

        self._sub = await nc.subscribe(subject, cb=_cb)
        await nc.flush()

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # connection already closed
                pass
            self._sub = None
        if self._own_nc and self._nc is not None:
            await self._nc.close()
        self._nc = None

    # -- events -----------------------------------------------------------------------------------
    def apply_message(self, data: bytes) -> int:
        self.stats.messages += 1
        try:
            env, events = decode_kv_message(data)
        except Exception as e:  # a foreign or corrupt message must not kill the subscription
            self.stats.decode_errors += 1
            log.warning("undecodable KV event message (%d bytes): %s", len(data), e)
            return 0
        pub, seq = env.get("publisher_id"), env.get("sequence")
        if isinstance(pub, int) and isinstance(seq, int):
            last = self.stats.last_sequence.get(pub)
            if last is not None and seq > last + 1:
                self.stats.sequence_gaps += seq - last - 1
            self.stats.last_sequence[pub] = seq
        n = 0
        for rev in events:
            try:
                self.apply_event(int(rev["worker_id"]), rev["event"])
                n += 1
            except Exception as e:
                self.stats.decode_errors += 1
                why = _refusal(e)
                self.stats.refused[why] = self.stats.refused.get(why, 0) + 1
                log.warning("KV event not applied (%s, worker %s, event %s): %s", why, rev.get("worker_id"),
                            (rev.get("event") or {}).get("event_id"), e)
        return n

    def apply_event(self, worker_id: int, event: dict[str, Any]) -> None:
        self.tree.apply_event(worker_id, json.dumps(event).encode())
        self.stats.events += 1

    def remove_worker(self, worker_id: int) -> None:
        self.tree.remove_worker(worker_id)

    # -- queries ----------------------------------------------------------------------------------
    def scores_by_rank(self, hashes: Sequence[int]) -> dict[tuple[int, int], int]:
        raw = self.tree.find_matches(list(hashes)).scores
        out: dict[tuple[int, int], int] = {}
        for k, v in raw.items():
            key = (int(k[0]), int(k[1])) if isinstance(k, tuple) else (int(k), 0)
            out[key] = int(v)
        return out

    def scores_for_hashes(self, hashes: Sequence[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for (wid, _rank), v in self.scores_by_rank(hashes).items():
            if v > out.get(wid, 0):
                out[wid] = v
        return out

    def scores(self, tokens: Sequence[int]) -> dict[int, int]:
        """Matched leading full blocks of ``tokens`` per worker."""
        return self.scores_for_hashes(block_hashes(tokens, self.block_size))
