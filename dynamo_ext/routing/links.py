"""The link table as plain data: bandwidth, latency and health of every (src, dst) worker pair.

Who fills it: topology/ gives an expected ``LinkInfo`` per pair from its ``TransportChoice``;
``LinkEstimator`` (link_estimator.py) replaces the bandwidth with measured EWMAs and marks failed
pairs unhealthy. The router builds a ``LinkTable`` from those and hands it to ``decide`` and
``plan_migrations``; the table is immutable, so one table serves many decisions.

Lookup of a pair (src = the worker that holds the KV, dst = the worker that pulls it)::

    explicit entry (src, dst)                      if present
    else same_node default                         if given and both workers report the same node
    else default

Bandwidth is in GB/s with GB = 1e9 bytes (not gigabits). Transfer time of ``n`` bytes over a link is
``n / (gb_per_s * 1e9) + latency_s``.

For speed, the table keeps per destination a lower bound of the transfer time over any healthy link
into it (``transfer_lower_bound``); ``decide`` uses it to skip prefill workers that cannot win.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from dataclasses import dataclass

_GB = 1e9


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """One direction of one worker pair."""

    gb_per_s: float
    latency_s: float = 0.0
    healthy: bool = True

    def __post_init__(self) -> None:
        if not self.gb_per_s > 0:
            raise ValueError(f"gb_per_s must be > 0, got {self.gb_per_s}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")

    def transfer_s(self, nbytes: int | float) -> float:
        """Seconds to move ``nbytes`` over this link, latency included."""
        return nbytes * (1.0 / (self.gb_per_s * _GB)) + self.latency_s


class LinkTable:
    """Immutable view of the pair links, with defaults for pairs not listed.

    ``links`` maps ``(src_worker, dst_worker)`` to ``LinkInfo``. ``default`` applies to any missing
    pair; ``same_node`` (optional) to missing pairs whose workers report the same node.
    """

    __slots__ = ("_links", "default", "same_node", "rows_by_dst", "bound_by_dst", "global_bound", "min_bound", "_unhealthy")

    def __init__(
        self,
        links: Mapping[tuple[int, int], LinkInfo] | None = None,
        *,
        default: LinkInfo = LinkInfo(gb_per_s=10.0, latency_s=50e-6),
        same_node: LinkInfo | None = None,
    ) -> None:
        if not default.healthy or (same_node is not None and not same_node.healthy):
            raise ValueError("default links must be healthy: list unhealthy pairs explicitly")
        self._links: dict[tuple[int, int], LinkInfo] = dict(links or {})
        self.default = default
        self.same_node = same_node
        # dst -> {src: (seconds per byte, latency, healthy)}: nested, so the hot loop builds no tuples.
        by_dst: dict[int, dict[int, tuple[float, float, bool]]] = {}
        for (src, dst), info in self._links.items():
            by_dst.setdefault(dst, {})[src] = (1.0 / (info.gb_per_s * _GB), info.latency_s, info.healthy)
        #: dst -> {src: (seconds per byte, latency_s, healthy)} of the explicit entries (hot path).
        self.rows_by_dst = by_dst
        defaults = [default] + ([same_node] if same_node is not None else [])
        d_inv = min(1.0 / (d.gb_per_s * _GB) for d in defaults)
        d_lat = min(d.latency_s for d in defaults)
        self.global_bound: tuple[float, float] = (d_inv, d_lat)
        bound: dict[int, tuple[float, float]] = {}
        for dst, row in by_dst.items():
            inv, lat = d_inv, d_lat
            for s_inv, s_lat, ok in row.values():
                if ok:
                    inv = min(inv, s_inv)
                    lat = min(lat, s_lat)
            bound[dst] = (inv, lat)
        #: dst -> (seconds per byte, latency): lower bounds over healthy links into dst (hot path).
        self.bound_by_dst: dict[int, tuple[float, float]] = bound
        #: (seconds per byte, latency) no larger than on any healthy link at all (cheapest first test).
        self.min_bound: tuple[float, float] = (min([d_inv] + [b[0] for b in bound.values()]),
                                               min([d_lat] + [b[1] for b in bound.values()]))
        self._unhealthy = tuple(sorted(k for k, v in self._links.items() if not v.healthy))

    @classmethod
    def from_topology_snapshot(
        cls,
        snapshot: Mapping[str, Any],
        *,
        worker_ids: Mapping[str, int] | None = None,
        default: LinkInfo,
        same_node: LinkInfo | None = None,
    ) -> LinkTable:
        """Build from ``topology.links.LinkTable.snapshot()`` (plain dicts; topology is not imported).

        Each entry ``{"src", "dst", "gbps", "expected_gbps", "latency_us", "expected_latency_us",
        "healthy", ...}`` becomes ``LinkInfo`` (GB/s; latency measured, else expected). Labels map to
        worker ids through ``worker_ids`` (labels it lacks are skipped), else ``int(label)``.
        An unhealthy entry keeps its expected bandwidth and is marked unhealthy.
        """
        if snapshot.get("version") != 1:
            raise ValueError(f"unsupported link snapshot version {snapshot.get('version')!r}")
        entries: dict[tuple[int, int], LinkInfo] = {}
        for e in snapshot.get("links", ()):
            if worker_ids is not None:
                if e["src"] not in worker_ids or e["dst"] not in worker_ids:
                    continue
                src, dst = worker_ids[e["src"]], worker_ids[e["dst"]]
            else:
                src, dst = int(e["src"]), int(e["dst"])
            healthy = bool(e.get("healthy", True))
            gbps = e.get("gbps") or 0.0
            if not gbps > 0:
                gbps = e.get("measured_gbps") or e.get("expected_gbps") or default.gb_per_s
            lat_us = e.get("latency_us")
            if lat_us is None:
                lat_us = e.get("expected_latency_us") or 0.0
            entries[(src, dst)] = LinkInfo(float(gbps), float(lat_us) * 1e-6, healthy)
        return cls(entries, default=default, same_node=same_node)

    # -- lookups -------------------------------------------------------------------------------
    def link(self, src: int, dst: int, src_node: str | None = None, dst_node: str | None = None) -> LinkInfo:
        """The link ``src -> dst`` (explicit entry, else same-node default, else default)."""
        info = self._links.get((src, dst))
        if info is not None:
            return info
        if self.same_node is not None and src_node is not None and src_node == dst_node:
            return self.same_node
        return self.default

    def row_into(self, dst: int) -> Mapping[int, tuple[float, float, bool]]:
        """Explicit links into ``dst`` as ``{src: (seconds_per_byte, latency_s, healthy)}``."""
        return self.rows_by_dst.get(dst, _EMPTY)

    def default_for(self, same_node: bool) -> LinkInfo:
        if same_node and self.same_node is not None:
            return self.same_node
        return self.default

    def transfer_lower_bound(self, dst: int) -> tuple[float, float]:
        """``(seconds_per_byte, latency_s)``, each no larger than on any healthy link into ``dst``."""
        return self.bound_by_dst.get(dst, self.global_bound)

    @property
    def unhealthy_pairs(self) -> tuple[tuple[int, int], ...]:
        """Explicit pairs marked unhealthy, sorted."""
        return self._unhealthy

    def items(self) -> Iterator[tuple[tuple[int, int], LinkInfo]]:
        return iter(sorted(self._links.items()))

    def __len__(self) -> int:
        return len(self._links)

    def __repr__(self) -> str:
        return (
            f"LinkTable({len(self._links)} pairs, default={self.default}, same_node={self.same_node}, "
            f"unhealthy={len(self._unhealthy)})"
        )


_EMPTY: Mapping[int, tuple[float, float, bool]] = {}

__all__ = ["LinkInfo", "LinkTable"]
