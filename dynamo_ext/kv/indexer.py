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

    KvEventIndexer(block_size, *, resync_new_publishers=False)
      await start(nats_url, subject) / await subscribe(nc, subject) / await close()
      apply_message(bytes) -> events applied      (the NATS callback; also usable without NATS)
      scores(tokens) -> {worker_id: blocks}       best dp rank of each worker; workers with 0 omitted
      scores_for_hashes(hashes), scores_by_rank(hashes)
      remove_worker(worker_id)                    the caller does this when an instance disappears
      stats: messages, events, decode_errors, sequence_gaps (per publisher ``sequence`` holes), resyncs

Gaps (events lost between a worker and this index) and their resync::

    apply_message: publisher's sequence jumps   begin_resync(w) for each worker of that publisher: its
    (or, with resync_new_publishers, its        live events are buffered from now on; on_gap([w, ...])
    first message: an index started late)
    the caller (workers/router.py), on_gap:     asks worker w for its prefix cache as stored events
                                                (its ``kv_blocks`` endpoint: ``pool.cached_runs`` ->
                                                ``events.snapshot_events``, taken on its engine thread)
      finish_resync(w, chunks)                  validate (msgspec), remove_worker(w), apply the snapshot,
                                                then the buffered live events; stats.resyncs += 1
      abort_resync(w, why)                      (the call failed) apply the buffered events as they are

A buffered event older than the snapshot is applied again after it: a stored block already there is
harmless, a removed block the snapshot no longer has is counted under ``resync_replay_refused``, not
``refused``.

Events are live-only: an indexer started late knows nothing of earlier blocks (Dynamo's worker-local
indexer recovery is not used here). Dynamo is imported lazily (``RadixTree`` when the indexer is
built without one); nats-py only in ``start``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import msgspec

from .hashing import block_hashes

__all__ = ["KvEventIndexer", "IndexerStats", "SnapshotChunk", "kv_events_subject", "decode_kv_message"]

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
    resyncs: int = 0  # workers' parts of the index rebuilt from their snapshot after a gap
    resync_failures: int = 0  # snapshots asked for and not had (the buffered events were applied as they were)
    resync_replay_refused: int = 0  # buffered events refused when applied after a snapshot (see the docstring)

    def summary(self) -> dict[str, Any]:
        return {"messages": self.messages, "events": self.events, "decode_errors": self.decode_errors,
                "sequence_gaps": self.sequence_gaps, "refused": dict(self.refused), "resyncs": self.resyncs,
                "resync_failures": self.resync_failures, "resync_replay_refused": self.resync_replay_refused}


class _SnapBlock(msgspec.Struct, forbid_unknown_fields=True):
    block_hash: int
    tokens_hash: int
    mm_extra_info: None = None


class _SnapStored(msgspec.Struct, forbid_unknown_fields=True):
    parent_hash: int | None
    blocks: list[_SnapBlock]
    start_position: int | None = None


class _SnapData(msgspec.Struct, forbid_unknown_fields=True):
    stored: _SnapStored


class _SnapEvent(msgspec.Struct, forbid_unknown_fields=True):
    event_id: int
    data: _SnapData
    dp_rank: int = 0


class SnapshotChunk(msgspec.Struct, forbid_unknown_fields=True):
    """One chunk of a worker's ``kv_blocks`` answer (peer data: validated before use)."""

    events: list[_SnapEvent]
    total: int = 0


def _refusal(e: Exception) -> str:
    text = str(e).lower()
    if "parent" in text:
        return "parent_missing"
    if "not found" in text or "find" in text:
        return "block_missing"
    return "other"


class KvEventIndexer:
    def __init__(self, block_size: int, tree: Any | None = None, *, resync_new_publishers: bool = False) -> None:
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
        #: called with the worker ids of a publisher whose events have a gap (after begin_resync of each)
        self.on_gap: Callable[[list[int]], None] | None = None
        #: also resync a publisher at its first message: an index that starts late (a restarted router) gets
        #: the blocks its workers cached before it started
        self.resync_new_publishers = resync_new_publishers
        self._publisher_workers: dict[int, set[int]] = {}
        self._resyncing: dict[int, list[dict[str, Any]]] = {}  # worker -> live events buffered meanwhile

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
            workers = self._publisher_workers.setdefault(pub, set())
            for rev in events:
                try:
                    workers.add(int(rev["worker_id"]))
                except (KeyError, TypeError, ValueError):
                    pass
            last = self.stats.last_sequence.get(pub)
            self.stats.last_sequence[pub] = seq
            gap = last is not None and seq > last + 1
            if gap:
                self.stats.sequence_gaps += seq - last - 1  # type: ignore[operator]
                log.warning("KV events lost: publisher %s sequence %d -> %d (workers %s)%s", pub, last, seq,
                            sorted(workers), "; resyncing them" if self.on_gap is not None else "")
            if gap or (last is None and self.resync_new_publishers):
                if self.on_gap is not None and workers:
                    for w in workers:
                        self.begin_resync(w)
                    try:
                        self.on_gap(sorted(workers))
                    except Exception as e:  # noqa: BLE001 - the subscription must survive its caller
                        for w in workers:
                            self.abort_resync(w, f"on_gap failed: {e}")
        n = 0
        for rev in events:
            try:
                wid = int(rev["worker_id"])
                if wid in self._resyncing:
                    self._resyncing[wid].append(rev["event"])
                    continue
                self.apply_event(wid, rev["event"])
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
        self._resyncing.pop(worker_id, None)
        self.tree.remove_worker(worker_id)

    # -- resync after a gap -------------------------------------------------------------------------
    def resyncing(self) -> list[int]:
        return sorted(self._resyncing)

    def begin_resync(self, worker_id: int) -> None:
        """Buffer ``worker_id``'s live events until ``finish_resync`` / ``abort_resync``."""
        self._resyncing.setdefault(worker_id, [])

    def finish_resync(self, worker_id: int, chunks: Sequence[Any]) -> int:
        """Rebuild the worker's part of the index from its snapshot (``kv_blocks`` chunks, validated here; an
        invalid one raises ``msgspec.ValidationError`` and changes nothing), then apply the events buffered
        since ``begin_resync``. Returns the snapshot's events applied (0 when the worker was removed meanwhile)."""
        snap = [msgspec.convert(c, type=SnapshotChunk) for c in chunks]
        if worker_id not in self._resyncing:  # removed meanwhile (remove_worker): its blocks must not come back
            return 0
        buffered = self._resyncing.pop(worker_id)
        self.tree.remove_worker(worker_id)
        n = 0
        for chunk in snap:
            for ev in chunk.events:
                try:
                    self.apply_event(worker_id, msgspec.to_builtins(ev))
                    n += 1
                except Exception as e:  # noqa: BLE001
                    why = _refusal(e)
                    self.stats.refused[why] = self.stats.refused.get(why, 0) + 1
                    log.warning("KV snapshot event of worker %s not applied (%s): %s", worker_id, why, e)
        for ev in buffered:
            try:
                self.apply_event(worker_id, ev)
            except Exception:  # noqa: BLE001 - older than the snapshot (see the module docstring)
                self.stats.resync_replay_refused += 1
        self.stats.resyncs += 1
        log.info("KV index of worker %s resynced: %d snapshot events, %d buffered events", worker_id, n, len(buffered))
        return n

    def abort_resync(self, worker_id: int, why: str = "") -> None:
        """No snapshot: apply the buffered events as they are (the index keeps what it had)."""
        buffered = self._resyncing.pop(worker_id, None)
        if buffered is None:
            return
        self.stats.resync_failures += 1
        log.warning("KV index of worker %s not resynced (%s); %d buffered events applied", worker_id, why,
                    len(buffered))
        for ev in buffered:
            try:
                self.apply_event(worker_id, ev)
            except Exception as e:  # noqa: BLE001
                w = _refusal(e)
                self.stats.refused[w] = self.stats.refused.get(w, 0) + 1

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
