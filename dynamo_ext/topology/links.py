"""Link table: per ordered pair (src label, dst label), what we expect and what we measured.

- Starts from ``TransportChoice.expected_gbps`` / ``expected_latency_us`` (``set_expected``).
- ``record_transfer(pair, nbytes, seconds)``: transfers of at least ``min_bw_bytes`` update the
  bandwidth EWMA (bytes / seconds: large transfers make the fixed latency negligible); smaller ones
  update the latency EWMA. A success on an unhealthy pair makes it healthy again.
- ``record_failure(pair, now)``: unhealthy, consecutive failures + 1, next probe at
  now + min(max_backoff, base_backoff * 2**(failures-1)).
- ``due_for_probe(now)``: unhealthy pairs whose back-off has passed, and (by default) pairs never
  measured, in sorted order.
- ``snapshot()``: plain builtins only (dicts, lists, str, float, int, bool, None) — the routing layer
  reads it without importing topology. ``gbps`` is what routing should use: 0.0 when unhealthy,
  else the measured EWMA, else the expectation.

Pairs are ordered: READ and WRITE, and the two directions, can differ (nixl#610).
Thread-safe (one lock); times are caller-supplied seconds (monotonic or wall, but consistent).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

Pair = tuple[str, str]

SNAPSHOT_VERSION = 1


@dataclass
class LinkState:
    kind: str = ""
    expected_gbps: float = 0.0
    expected_latency_us: float = 0.0
    measured_gbps: float | None = None
    latency_us: float | None = None
    samples: int = 0
    healthy: bool = True
    failures: int = 0  # consecutive
    next_probe_at: float | None = None
    last_error: str = ""


class LinkTable:
    def __init__(
        self,
        alpha: float = 0.3,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        min_bw_bytes: int = 1 << 20,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.min_bw_bytes = min_bw_bytes
        self._links: dict[Pair, LinkState] = {}
        self._lock = threading.Lock()

    def _get(self, pair: Pair) -> LinkState:
        st = self._links.get(pair)
        if st is None:
            st = self._links[pair] = LinkState()
        return st

    def set_expected(self, pair: Pair, expected_gbps: float, expected_latency_us: float = 0.0, kind: str = "") -> None:
        with self._lock:
            st = self._get(pair)
            st.expected_gbps, st.expected_latency_us, st.kind = float(expected_gbps), float(expected_latency_us), kind

    def add_choice(self, pair: Pair, choice: Any) -> None:
        """``set_expected`` from a ``TransportChoice`` (duck-typed)."""
        self.set_expected(pair, choice.expected_gbps, choice.expected_latency_us, choice.kind)

    def record_transfer(self, pair: Pair, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 0:
            raise ValueError(f"record_transfer: need nbytes >= 0 and seconds > 0, got {nbytes}, {seconds}")
        with self._lock:
            st = self._get(pair)
            if nbytes >= self.min_bw_bytes:
                gbps = nbytes / seconds / 1e9
                st.measured_gbps = gbps if st.measured_gbps is None else self._ewma(st.measured_gbps, gbps)
            else:
                us = seconds * 1e6
                st.latency_us = us if st.latency_us is None else self._ewma(st.latency_us, us)
            st.samples += 1
            st.healthy, st.failures, st.next_probe_at, st.last_error = True, 0, None, ""

    def record_failure(self, pair: Pair, now: float, error: str = "") -> float:
        """Mark ``pair`` unhealthy; returns the time of its next probe."""
        with self._lock:
            st = self._get(pair)
            st.failures += 1
            st.healthy = False
            st.last_error = error
            st.next_probe_at = now + min(self.max_backoff_s, self.base_backoff_s * 2 ** (st.failures - 1))
            return st.next_probe_at

    def due_for_probe(self, now: float, include_unmeasured: bool = True) -> list[Pair]:
        with self._lock:
            return sorted(
                p for p, st in self._links.items()
                if (not st.healthy and st.next_probe_at is not None and st.next_probe_at <= now)
                or (include_unmeasured and st.healthy and st.samples == 0)
            )  # fmt: skip

    def gbps(self, pair: Pair) -> float:
        with self._lock:
            st = self._links.get(pair)
            return 0.0 if st is None else self._effective(st)

    def get(self, pair: Pair) -> LinkState | None:
        with self._lock:
            st = self._links.get(pair)
            return None if st is None else LinkState(**asdict(st))

    def snapshot(self) -> dict[str, Any]:
        """{"version": 1, "links": [{"src", "dst", "kind", "expected_gbps", "measured_gbps", "gbps",
        "expected_latency_us", "latency_us", "healthy", "failures", "samples", "next_probe_at",
        "last_error"}, ...]} sorted by (src, dst); builtins only."""
        with self._lock:
            links = []
            for (src, dst), st in sorted(self._links.items()):
                d = asdict(st)
                d.update(src=src, dst=dst, gbps=self._effective(st))
                links.append(d)
            return {"version": SNAPSHOT_VERSION, "links": links}

    def _ewma(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    @staticmethod
    def _effective(st: LinkState) -> float:
        if not st.healthy:
            return 0.0
        return st.measured_gbps if st.measured_gbps is not None else st.expected_gbps
