"""Block pool with a prefix cache: block ids, reference counts, LRU eviction, KV events.

Every block is in exactly one state::

    free      refcount 0, no cached content         (free list; handed out first)
    cached    refcount 0, registered in the cache    (LRU list; evicted oldest first when needed)
    active    refcount > 0 (registered or not)

Operations (``BlockPool(num_blocks, block_size, sink)``)::

    allocate(n) -> ids           n ids, one reference each; takes free blocks, then evicts cached
                                 ones (oldest first; one ``publish_removed`` per call). All or nothing:
                                 raises OutOfBlocks when fewer than n are free + cached.
    free(ids)                    drop one reference of each id. A block reaching 0 becomes *cached*
                                 if it is registered, otherwise *free*. Ids are queued for eviction
                                 tail first (pass a sequence's blocks in sequence order, as the engine
                                 holds them, so its last block is evicted first). Dropping a reference
                                 that is not held raises DoubleFree and changes nothing.
    commit(ids, tokens, parent)  the blocks (active, not yet committed) now hold the KV of ``tokens``
                                 (len == len(ids) * block_size), following block ``parent`` (a committed
                                 block holding the preceding block, or None at the sequence start).
                                 Registers them in the cache and emits ``publish_stored`` for the
                                 registered runs. A block whose content is already cached in another
                                 block, or whose parent content is not cached, stays unregistered (it
                                 becomes free on release).
    match_prefix(hashes) -> ids  longest cached prefix for Dynamo block hashes (``hashing.block_hashes``),
                                 one reference taken on each hit. ``peek_prefix`` counts without taking.
    evict_all()                  drop every unreferenced cached block (one ``publish_removed``)
    cached_runs() -> runs        the prefix cache as stored runs ``(parent, [(sequence hash, local hash), ...])``,
                                 parents first: what a router that lost events rebuilds this worker's part of
                                 its index from (``events.snapshot_events``; blocks whose parent was evicted
                                 are left out: no match reaches them)
    stats() / kv_cache_usage_perc / num_free / num_active / num_cached

Cache key: the *sequence hash* of a block, a chain over Dynamo's local block hashes
(``seq[0] = h[0]``, ``seq[i] = xxh3_64(le64(seq[i-1]) + le64(h[i]), 1337)``), so equal token blocks after
different prefixes are different entries. The chain is internal to the pool (Dynamo's router keeps
the same structure as a tree keyed by local hashes plus parent links).

KV events name blocks by their sequence hash (``block_hash(id)``), never by id: the same content has the same
name on every worker, as Dynamo's router needs (kv/events.py). Router consistency: the hashes of the
registered blocks equal the hashes stored and not yet removed in the sink's event stream, and each stored
run names a parent hash that is registered at that moment.
Evicting a parent before its children is allowed (the router then stops matching at the parent, as
``match_prefix`` does). Not thread-safe: one owner (the engine's scheduler) calls it.
"""

from __future__ import annotations

import operator
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from .events import KvEventSink, NullKvEventSink
from .hashing import DYNAMO_HASH_SEED, block_hashes, xxh3_64

__all__ = ["BlockPool", "PoolStats", "OutOfBlocks", "DoubleFree", "PoolError", "sequence_hashes"]


class PoolError(Exception):
    """Base class of pool errors."""


class OutOfBlocks(PoolError, RuntimeError):
    """Fewer allocatable (free + evictable) blocks than asked for; nothing was allocated."""


class DoubleFree(PoolError, ValueError):
    """A reference was dropped that is not held; nothing was changed."""


def _chain(parent_seq: int | None, local: int) -> int:
    if parent_seq is None:
        return local
    return xxh3_64(struct.pack("<QQ", parent_seq, local), DYNAMO_HASH_SEED)


def sequence_hashes(local_hashes: Sequence[int], parent_seq: int | None = None) -> list[int]:
    """The pool's cache keys for consecutive blocks with these Dynamo (local) block hashes."""
    out: list[int] = []
    for h in local_hashes:
        parent_seq = _chain(parent_seq, h)
        out.append(parent_seq)
    return out


@dataclass(frozen=True)
class PoolStats:
    num_blocks: int
    free: int  # refcount 0, nothing cached
    cached: int  # refcount 0, registered (evictable)
    active: int  # refcount > 0
    registered: int  # all blocks in the prefix cache (cached + active registered)

    @property
    def kv_cache_usage_perc(self) -> float:
        """Share of blocks held by requests (Dynamo's / vLLM's gpu_cache_usage: evictable = unused)."""
        return self.active / self.num_blocks


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, sink: KvEventSink | None = None) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self._num_blocks = num_blocks
        self.block_size = block_size
        self.sink: KvEventSink = sink if sink is not None else NullKvEventSink()
        self._ref = [0] * num_blocks
        self._seq: list[int | None] = [None] * num_blocks  # content (sequence hash) of committed blocks
        self._cache: dict[int, int] = {}  # sequence hash -> registered block id
        self._meta: dict[int, tuple[int, int | None]] = {}  # registered sequence hash -> (local hash, parent's)
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached (refcount 0, registered), oldest first
        self._free: deque[int] = deque(range(num_blocks))
        self._active = 0

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now (free + evictable cached)."""
        return len(self._free) + len(self._lru)

    @property
    def num_active(self) -> int:
        return self._active

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def kv_cache_usage_perc(self) -> float:
        return self._active / self._num_blocks

    def stats(self) -> PoolStats:
        return PoolStats(self._num_blocks, len(self._free), len(self._lru), self._active, len(self._cache))

    def refcount(self, block_id: int) -> int:
        return self._ref[self._check_id(block_id)]

    def block_hash(self, block_id: int) -> int | None:
        """The sequence hash (content) of a committed block, its name in KV events; None if uncommitted."""
        return self._seq[self._check_id(block_id)]

    def is_registered(self, block_id: int) -> bool:
        s = self._seq[block_id]
        return s is not None and self._cache.get(s) == block_id

    def lru_order(self) -> list[int]:
        """Evictable blocks, next to be evicted first."""
        return list(self._lru)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} allocatable of {self._num_blocks}")
        out: list[int] = []
        evicted: list[int] = []
        evicted_hashes: list[int] = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._lru.popitem(last=False)
                h = self._seq[b]
                del self._cache[h]  # type: ignore[arg-type]
                self._meta.pop(h, None)  # type: ignore[arg-type]
                self._seq[b] = None
                evicted.append(b)
                evicted_hashes.append(h)
            self._ref[b] = 1
            out.append(b)
        self._active += n
        if evicted:
            self.sink.publish_removed(evicted_hashes)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        block_ids = self._ids(block_ids)
        drops: dict[int, int] = {}
        for b in block_ids:
            drops[b] = drops.get(b, 0) + 1
        over = [b for b, k in drops.items() if k > self._ref[b]]
        if over:
            raise DoubleFree(f"blocks without a reference to drop: {over[:8]}")
        for b in reversed(block_ids):  # tail first: a sequence's last block is evicted first
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._active -= 1
                if self.is_registered(b):
                    self._lru[b] = None
                else:
                    self._seq[b] = None
                    self._free.append(b)

    def _incref(self, b: int) -> None:
        if self._ref[b] == 0:
            self._lru.pop(b)
            self._active += 1
        self._ref[b] += 1

    def incref(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each (active or cached) block."""
        block_ids = self._ids(block_ids)
        for b in block_ids:
            if self._ref[b] == 0 and b not in self._lru:
                raise PoolError(f"block {b} is free: allocate it instead")
        for b in block_ids:
            self._incref(b)

    # -- prefix cache -------------------------------------------------------------------------------
    def _walk(self, local_hashes: Sequence[int]) -> list[int]:
        hits: list[int] = []
        seq: int | None = None
        for h in local_hashes:
            seq = _chain(seq, h)
            b = self._cache.get(seq)
            if b is None:
                break
            hits.append(b)
        return hits

    def match_prefix(self, local_hashes: Sequence[int]) -> list[int]:
        """Blocks holding the longest cached prefix; one reference taken on each."""
        hits = self._walk(local_hashes)
        for b in hits:
            self._incref(b)
        return hits

    def peek_prefix(self, local_hashes: Sequence[int]) -> int:
        """Number of leading blocks cached (no reference taken, LRU order untouched)."""
        return len(self._walk(local_hashes))

    def match_tokens(self, tokens: Sequence[int]) -> list[int]:
        return self.match_prefix(block_hashes(tokens, self.block_size))

    def commit(self, block_ids: Sequence[int], tokens: Sequence[int], parent: int | None = None) -> list[int]:
        """Register full blocks; returns their sequence hashes. See the module docstring."""
        bs = self.block_size
        if len(tokens) != len(block_ids) * bs:
            raise ValueError(f"{len(tokens)} tokens for {len(block_ids)} blocks of {bs}")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError("duplicate block ids in commit")
        block_ids = self._ids(block_ids)
        for b in block_ids:
            if self._ref[b] == 0:
                raise PoolError(f"block {b} is not held: commit blocks you allocated")
            if self._seq[b] is not None:
                raise PoolError(f"block {b} is already committed")
        parent_seq: int | None = None
        if parent is not None:
            parent = self._check_id(parent)
            parent_seq = self._seq[parent]
            if parent_seq is None:
                raise PoolError(f"parent block {parent} holds no committed content")
        local = block_hashes(tokens, bs)
        seqs = sequence_hashes(local, parent_seq)

        run: list[int] = []  # sequence hashes of registered blocks not yet announced
        run_start = 0
        run_parent: int | None = None  # the sequence hash before the run
        prev_seq = parent_seq
        for i, (b, s) in enumerate(zip(block_ids, seqs)):
            self._seq[b] = s
            parent_cached = prev_seq is None or prev_seq in self._cache
            if s not in self._cache and parent_cached:
                if not run:
                    run_start = i
                    run_parent = prev_seq
                self._cache[s] = b
                self._meta[s] = (local[i], prev_seq)
                run.append(s)
            elif run:
                self.sink.publish_stored(tokens[run_start * bs : (run_start + len(run)) * bs], run, run_parent)
                run = []
            prev_seq = s
        if run:
            self.sink.publish_stored(tokens[run_start * bs : (run_start + len(run)) * bs], run, run_parent)
        return seqs

    def evict_all(self) -> list[int]:
        """Drop every evictable cached block; returns their ids."""
        evicted = list(self._lru)
        hashes = [self._seq[b] for b in evicted]
        for b, h in zip(evicted, hashes):
            del self._cache[h]  # type: ignore[arg-type]
            self._meta.pop(h, None)  # type: ignore[arg-type]
            self._seq[b] = None
            self._free.append(b)
        self._lru.clear()
        if evicted:
            self.sink.publish_removed(hashes)  # type: ignore[arg-type]
        return evicted

    def cached_runs(self) -> list[tuple[int | None, list[tuple[int, int]]]]:
        """The registered blocks as stored runs ``(parent sequence hash or None, [(sequence hash, local hash)])``,
        depth first from the sequence starts, so every run's parent is in an earlier run (or None). Blocks whose
        parent content was evicted are left out (the router stops matching at the parent anyway)."""
        children: dict[int | None, list[int]] = {}
        for s, (_lh, parent) in self._meta.items():
            children.setdefault(parent, []).append(s)
        runs: list[tuple[int | None, list[tuple[int, int]]]] = []
        stack: list[int] = list(reversed(children.get(None, [])))
        while stack:
            s = stack.pop()
            parent = self._meta[s][1]
            if runs and runs[-1][1][-1][0] == parent:
                runs[-1][1].append((s, self._meta[s][0]))
            else:
                runs.append((parent, [(s, self._meta[s][0])]))
            stack.extend(reversed(children.get(s, [])))
        return runs

    # -- helpers ----------------------------------------------------------------------------------
    def _check_id(self, b: int) -> int:
        try:
            i = operator.index(b)
        except TypeError:
            i = -1
        if isinstance(b, bool) or not 0 <= i < self._num_blocks:
            raise ValueError(f"block id {b!r} out of range [0, {self._num_blocks})")
        return i

    def _ids(self, block_ids: Sequence[int]) -> list[int]:
        return [self._check_id(b) for b in block_ids]

    def check_invariants(self) -> None:
        """Internal consistency (tests call it after every operation)."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "free list has duplicates"
        assert not free & lru
        for b in range(self._num_blocks):
            r = self._ref[b]
            assert r >= 0
            if r > 0:
                assert b not in free and b not in lru
            elif b in lru:
                assert self.is_registered(b)
            else:
                assert b in free and self._seq[b] is None
        assert self._active == sum(1 for r in self._ref if r > 0)
        assert len(free) + len(lru) + self._active == self._num_blocks
        for s, b in self._cache.items():
            assert self._seq[b] == s
        assert set(self._meta) == set(self._cache), "registered blocks without meta (or meta left over)"
