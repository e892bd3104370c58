"""BlockPool: unit tests and a stateful property test against a plain reference model.

The model knows requests (token list + the blocks they hold, in sequence order), the content of
every committed block (the full token prefix it ends), and an LRU list. After every step:
refcounts match the references requests hold, nothing allocated is held by a live request, the
LRU order is the model's, the router's view (events replayed) equals the registered blocks, and a
prefix match returns the longest registered prefix with exactly the right content.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynamo_ext.kv.events import RecordingKvEventSink, RemovedEvent, StoredEvent
from dynamo_ext.kv.hashing import block_hashes
from dynamo_ext.kv.pool import BlockPool, DoubleFree, OutOfBlocks, PoolError

BS = 2


def _pool(n: int = 8, bs: int = BS) -> tuple[BlockPool, RecordingKvEventSink]:
    sink = RecordingKvEventSink()
    return BlockPool(n, bs, sink), sink


def test_allocate_free_and_stats():
    pool, sink = _pool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1 and pool.num_active == 3
    assert pool.kv_cache_usage_perc == 0.75
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    assert pool.num_free == 1  # all or nothing
    pool.free(a)
    assert pool.stats().free == 4 and pool.num_active == 0 and sink.events == []
    with pytest.raises(DoubleFree):
        pool.free([a[0]])
    with pytest.raises(ValueError):
        pool.free([99])


def test_prefix_cache_hit_dedupe_and_eviction_events():
    pool, sink = _pool(4)
    toks = [1, 2, 3, 4, 5, 6]
    a = pool.allocate(3)
    pool.commit(a, toks)
    h = {b: pool.block_hash(b) for b in a}  # events name blocks by content (sequence hash), not by id
    assert h[a[0]] == block_hashes(toks, BS)[0] and len(set(h.values())) == 3
    assert sink.events == [StoredEvent(tuple(toks), tuple(h[b] for b in a), None)]
    pool.free(a)
    assert pool.stats().cached == 3 and pool.lru_order() == a[::-1]  # tail evicted first
    hit = pool.match_tokens([1, 2, 3, 4, 9, 9])
    assert hit == a[:2] and pool.refcount(a[0]) == 1
    assert pool.peek_prefix(block_hashes(toks, BS)) == 3
    # same content committed again in a fresh block: stays unregistered, no event
    b = pool.allocate(1)
    pool.commit(b, [5, 6], parent=a[1])
    assert len(sink.events) == 1 and not pool.is_registered(b[0])
    # a new child after the duplicate names the registered block as its parent
    (c,) = pool.allocate(1)  # evicts a[2] (the only cached block)
    assert sink.events[-1] == RemovedEvent((h[a[2]],))
    n_events = len(sink.events)
    pool.commit([c], [7, 8], parent=b[0])
    assert len(sink.events) == n_events
    # b[0] was unregistered and a[2] evicted: parent content not cached -> c not registered either
    assert not pool.is_registered(c)
    pool.free(hit + b + [c])
    pool.check_invariants()
    assert sink.live_blocks() == {h[a[0]], h[a[1]]}
    assert sorted(pool.evict_all()) == sorted([a[0], a[1]]) and sink.live_blocks() == set()


def test_same_block_tokens_after_different_prefixes_are_different_entries():
    pool, _ = _pool(4)
    x, y = pool.allocate(2)
    pool.commit([x, y], [1, 1, 7, 7])
    (z,) = pool.allocate(1)
    pool.commit([z], [7, 7])  # same tokens as y, but at the start of a sequence
    assert pool.is_registered(y) and pool.is_registered(z)
    pool.free([x, y, z])
    assert pool.match_tokens([7, 7]) == [z]
    assert pool.match_tokens([1, 1, 7, 7]) == [x, y]


def test_commit_errors():
    pool, _ = _pool(4)
    a = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.commit(a, [1, 2, 3])
    with pytest.raises(PoolError):
        pool.commit([3], [1, 2])  # not held
    pool.commit(a[:1], [1, 2])
    with pytest.raises(PoolError):
        pool.commit(a[:1], [1, 2])  # already committed
    with pytest.raises(PoolError):
        pool.commit(a[1:], [3, 4], parent=a[1])  # parent holds nothing


class PoolMachine(RuleBasedStateMachine):
    NUM = 6

    def __init__(self) -> None:
        super().__init__()
        self.sink = RecordingKvEventSink()
        self.pool = BlockPool(self.NUM, BS, self.sink)
        self.requests: list[list[int]] = []  # blocks held, in sequence order
        self.tokens: list[list[int] | None] = []  # their tokens (None: bare allocation)
        self.content: dict[int, tuple[int, ...]] = {}  # committed block -> token prefix it ends
        self.lru: list[int] = []  # model eviction order

    # -- model helpers ------------------------------------------------------------------------
    def held(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for r in self.requests:
            for b in r:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def registered_contents(self) -> dict[tuple[int, ...], int]:
        return {self.content[b]: b for b in range(self.NUM) if self.pool.is_registered(b)}

    def allocate(self, n: int) -> list[int] | None:
        held_before = set(self.held())
        n_free = self.NUM - len(held_before) - len(self.lru)
        if n > n_free + len(self.lru):
            with pytest.raises(OutOfBlocks):
                self.pool.allocate(n)
            return None
        n_events = len(self.sink.events)
        n_evict = max(0, n - n_free)
        evicted_hashes = tuple(self.pool.block_hash(b) for b in self.lru[:n_evict])
        ids = self.pool.allocate(n)
        assert not set(ids) & held_before, "allocated a block that is still referenced"
        self.lru = self.lru[n_evict:]
        new = self.sink.events[n_events:]
        assert new == ([RemovedEvent(evicted_hashes)] if n_evict else []), "eviction is not LRU"
        for b in ids:
            self.content.pop(b, None)
        return ids

    # -- rules ----------------------------------------------------------------------------------
    @rule(tokens=st.lists(st.integers(0, 1), max_size=4 * BS))
    def new_request(self, tokens: list[int]) -> None:
        nfull = len(tokens) // BS
        hits = self.pool.match_tokens(tokens)
        reg = self.registered_contents()
        # longest registered prefix, with the right content
        k = 0
        while k < nfull and tuple(tokens[: (k + 1) * BS]) in reg:
            k += 1
        assert len(hits) == k
        for i, b in enumerate(hits):
            assert self.content[b] == tuple(tokens[: (i + 1) * BS])
            if b in self.lru:
                self.lru.remove(b)
        self.requests.append(hits)  # held now, even if the allocation below fails
        self.tokens.append(tokens[: k * BS])
        self.grow(len(self.requests) - 1, tokens[k * BS : nfull * BS])

    def grow(self, r: int, more: list[int]) -> None:
        """Allocate and commit blocks for ``more`` tokens after request r's blocks."""
        ids = self.allocate(len(more) // BS)
        if not ids:
            return
        blocks, prefix = self.requests[r], self.tokens[r]
        assert prefix is not None
        parent = blocks[-1] if blocks else None
        reg = self.registered_contents()
        self.pool.commit(ids, more, parent=parent)
        for i, b in enumerate(ids):
            c = tuple(prefix + more[: (i + 1) * BS])
            expect = c not in reg and (len(c) == BS or c[:-BS] in reg)
            assert self.pool.is_registered(b) == expect
            if expect:
                reg[c] = b
            self.content[b] = c
        blocks.extend(ids)
        prefix.extend(more)

    @precondition(lambda self: any(t is not None for t in self.tokens))
    @rule(i=st.integers(0, 100), more=st.lists(st.integers(0, 1), min_size=BS, max_size=2 * BS))
    def extend_request(self, i: int, more: list[int]) -> None:
        live = [r for r, t in enumerate(self.tokens) if t is not None]
        self.grow(live[i % len(live)], more[: len(more) // BS * BS])

    @rule(n=st.integers(0, 3))
    def bare_allocate(self, n: int) -> None:
        ids = self.allocate(n)
        if ids is not None:
            self.requests.append(ids)
            self.tokens.append(None)

    @precondition(lambda self: self.requests)
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        blocks = self.requests.pop(i % len(self.requests))
        self.tokens.pop(i % (len(self.requests) + 1))
        self.pool.free(blocks)
        refs = self.held()
        for b in reversed(blocks):
            if b not in refs and b not in self.lru:
                if self.pool.is_registered(b):
                    self.lru.append(b)
                else:
                    self.content.pop(b, None)

    @rule(b=st.integers(0, NUM - 1))
    def double_free_is_refused(self, b: int) -> None:
        if b in self.held():
            return
        before = (self.pool.stats(), self.pool.lru_order(), len(self.sink.events))
        with pytest.raises(DoubleFree):
            self.pool.free([b])
        assert before == (self.pool.stats(), self.pool.lru_order(), len(self.sink.events))

    @rule()
    def evict_all(self) -> None:
        evicted = self.pool.evict_all()
        assert evicted == self.lru
        self.lru = []
        for b in evicted:
            self.content.pop(b, None)

    # -- invariants -------------------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        self.pool.check_invariants()
        refs = self.held()
        for b in range(self.NUM):
            assert self.pool.refcount(b) == refs.get(b, 0)
        assert self.pool.lru_order() == self.lru
        st_ = self.pool.stats()
        assert st_.active == len(refs) and st_.cached == len(self.lru)
        assert st_.free + st_.cached + st_.active == self.NUM
        assert self.pool.kv_cache_usage_perc == len(refs) / self.NUM
        registered = {self.pool.block_hash(b) for b in range(self.NUM) if self.pool.is_registered(b)}
        assert self.sink.live_blocks() == registered
        # each stored run's parent was registered when it was announced; hashes stored once at a time
        live: set[int] = set()
        for ev in self.sink.events:
            if isinstance(ev, StoredEvent):
                assert ev.parent is None or ev.parent in live
                assert not live & set(ev.block_hashes)
                assert len(ev.token_ids) == BS * len(ev.block_hashes)
                live.update(ev.block_hashes)
            else:
                assert set(ev.block_hashes) <= live
                live.difference_update(ev.block_hashes)


PoolMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestPoolMachine = PoolMachine.TestCase


def test_child_of_a_duplicate_whose_canonical_block_was_evicted_is_not_registered():
    pool, sink = _pool(4)
    a = pool.allocate(2)
    pool.commit(a, [0, 1, 1, 1])
    h = {b: pool.block_hash(b) for b in a}
    hit = pool.match_tokens([0, 1])  # request B shares A's first block
    (dup,) = pool.allocate(1)
    pool.commit([dup], [1, 1], parent=hit[0])  # same content as a[1]: unregistered duplicate
    assert not pool.is_registered(dup)
    pool.free(a)  # A leaves: a[1] cached (evicted first), a[0] still held by B
    (c,) = pool.allocate(1)  # takes the last free block
    (d,) = pool.allocate(1)  # evicts a[1], the duplicate's canonical block
    assert sink.events[-1] == RemovedEvent((h[a[1]],))
    n = len(sink.events)
    pool.commit([c], [0, 0], parent=dup)  # parent content no longer cached
    assert not pool.is_registered(c) and len(sink.events) == n
    pool.free(hit + [dup, c, d])
    pool.check_invariants()
    assert sink.live_blocks() == {h[a[0]]}
