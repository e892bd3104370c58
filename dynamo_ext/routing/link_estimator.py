"""``LinkEstimator``: the link table learned from measured transfers (pure: time is an argument).

Protocol::

    workers/ (after each KV transfer)  observe_transfer(src, dst, nbytes, seconds, now)
    workers/ (transfer failed)         observe_failure(src, dst, now)
    router (periodically)              due_for_probe(now) -> pairs to probe with a small transfer
                                       table(default=..., same_node=...) -> LinkTable for decide()

Per pair (src, dst)::

    sample_gb_per_s = nbytes / (seconds - latency_s) / 1e9      (latency from the prior, if known;
                                                                 at least half the time is kept)
    gb_per_s        = sample                                    first sample without a prior
                    = alpha * sample + (1 - alpha) * gb_per_s   afterwards (prior seeds the EWMA)
    failure n       -> unhealthy; next probe at now + min(base_backoff_s * 2**(n-1), max_backoff_s)
    success         -> healthy, failure count reset

Samples below ``min_sample_bytes`` are latency-dominated and ignored for bandwidth (they still prove
the link works). No clock is read here; every time comes from the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .links import LinkInfo, LinkTable

_GB = 1e9


@dataclass(slots=True)
class _PairState:
    gb_per_s: float | None
    latency_s: float
    samples: int = 0
    failures: int = 0
    healthy: bool = True
    next_probe_at: float | None = None
    last_update: float | None = None


class LinkEstimator:
    """EWMA of measured GB/s per pair, with failure back-off. Not thread-safe; deterministic."""

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        min_sample_bytes: int = 1 << 20,
        priors: Mapping[tuple[int, int], LinkInfo] | None = None,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if base_backoff_s <= 0 or max_backoff_s < base_backoff_s:
            raise ValueError("need 0 < base_backoff_s <= max_backoff_s")
        self.alpha = alpha
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.min_sample_bytes = min_sample_bytes
        self._pairs: dict[tuple[int, int], _PairState] = {}
        for pair, info in (priors or {}).items():
            self._pairs[pair] = _PairState(info.gb_per_s, info.latency_s, healthy=info.healthy)

    def _state(self, src: int, dst: int) -> _PairState:
        st = self._pairs.get((src, dst))
        if st is None:
            st = self._pairs[(src, dst)] = _PairState(None, 0.0)
        return st

    def observe_transfer(self, src: int, dst: int, nbytes: int, seconds: float, now: float) -> None:
        """A transfer of ``nbytes`` from ``src`` to ``dst`` completed in ``seconds``."""
        if seconds <= 0 or nbytes < 0:
            raise ValueError("seconds must be > 0 and nbytes >= 0")
        st = self._state(src, dst)
        st.healthy, st.failures, st.next_probe_at, st.last_update = True, 0, None, now
        if nbytes < self.min_sample_bytes:
            return
        wire_s = max(seconds - st.latency_s, seconds * 0.5)
        sample = nbytes / wire_s / _GB
        if st.gb_per_s is None:
            st.gb_per_s = sample
        else:
            st.gb_per_s = self.alpha * sample + (1.0 - self.alpha) * st.gb_per_s
        st.samples += 1

    def observe_failure(self, src: int, dst: int, now: float) -> float:
        """A transfer on the pair failed. Marks it unhealthy; returns the time of the next probe."""
        st = self._state(src, dst)
        st.failures += 1
        st.healthy = False
        st.last_update = now
        backoff = min(self.base_backoff_s * 2.0 ** (st.failures - 1), self.max_backoff_s)
        st.next_probe_at = now + backoff
        return st.next_probe_at

    def due_for_probe(self, now: float) -> list[tuple[int, int]]:
        """Unhealthy pairs whose back-off has elapsed at ``now``, sorted."""
        return sorted(p for p, st in self._pairs.items()
                      if not st.healthy and st.next_probe_at is not None and st.next_probe_at <= now)

    def gb_per_s(self, src: int, dst: int) -> float | None:
        st = self._pairs.get((src, dst))
        return st.gb_per_s if st is not None else None

    def is_healthy(self, src: int, dst: int) -> bool:
        st = self._pairs.get((src, dst))
        return st.healthy if st is not None else True

    def failures(self, src: int, dst: int) -> int:
        st = self._pairs.get((src, dst))
        return st.failures if st is not None else 0

    def info(self, src: int, dst: int, fallback: LinkInfo) -> LinkInfo:
        """The pair's current LinkInfo (``fallback`` fills what was never measured)."""
        st = self._pairs.get((src, dst))
        if st is None:
            return fallback
        gbps = st.gb_per_s if st.gb_per_s is not None else fallback.gb_per_s
        lat = st.latency_s if st.latency_s > 0 else fallback.latency_s
        return LinkInfo(gbps, lat, st.healthy)

    def table(self, *, default: LinkInfo, same_node: LinkInfo | None = None,
              nodes: Mapping[int, str | None] | None = None) -> LinkTable:
        """A LinkTable of every pair seen, over the given defaults (``nodes`` picks same-node ones)."""
        nodes = nodes or {}
        entries = {}
        for (s, d), _st in sorted(self._pairs.items()):
            sn = nodes.get(s)
            fb = same_node if (same_node is not None and sn is not None and sn == nodes.get(d)) else default
            entries[(s, d)] = self.info(s, d, fb)
        return LinkTable(entries, default=default, same_node=same_node)


__all__ = ["LinkEstimator"]
