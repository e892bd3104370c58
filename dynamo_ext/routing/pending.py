"""Prefixes on their way into a worker's cache: what the router routed there before the KV events say so.

A worker's KV events reach the router's prefix index only after its prefill ran (tens to hundreds of
milliseconds later). Two requests with the same new system prompt arriving within that time both see no
overlap anywhere, and a choice by estimate can send them to different workers: both compute the prefix and
both caches hold it, which halves what the workers' caches hold together (issue 14: on 3 agg workers the
prefix hit rate of dynamo-ext was 41-44% against 57-63% for Dynamo's KV router, which predicts the blocks of
the requests it routed). ``PendingPrefixes`` is that prediction: the router records the block hashes of each
request on the worker(s) that will hold them, and counts them as cached there until ``ttl_s`` passed (by
then the worker's own events have arrived, or it evicted them).

    p = PendingPrefixes(ttl_s=5.0)
    p.add(worker, hashes, now)           # routed: worker will hold these blocks (local block hashes, in order)
    p.match(hashes, now) -> {worker: n}  # leading blocks of ``hashes`` each worker is expected to hold
    p.forget(worker)                     # the worker is gone

Pure: times are passed in; hashes are any hashable sequence items (the router passes Dynamo's local block
hashes, ``kv.hashing.block_hashes``; two prompts share a prefix of n blocks iff their first n hashes match).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["PendingPrefixes"]


class PendingPrefixes:
    def __init__(self, ttl_s: float = 5.0, max_entries: int = 4096) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: deque[tuple[float, int, tuple[int, ...]]] = deque()  # (expires, worker, hashes), oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries and (self._entries[0][0] <= now or len(self._entries) > self.max_entries):
            self._entries.popleft()

    def add(self, worker: int, hashes: Sequence[int], now: float) -> None:
        if hashes:
            self._entries.append((now + self.ttl_s, worker, tuple(hashes)))
        self._expire(now)

    def match(self, hashes: Sequence[int], now: float) -> dict[int, int]:
        """Per worker, the longest run of leading ``hashes`` found in one of its pending entries."""
        self._expire(now)
        out: dict[int, int] = {}
        for _, w, h in self._entries:
            n = 0
            for a, b in zip(h, hashes):
                if a != b:
                    break
                n += 1
            if n > out.get(w, 0):
                out[w] = n
        return out

    def forget(self, worker: int) -> None:
        self._entries = deque(e for e in self._entries if e[1] != worker)
