"""``plan_migrations``: move running decode requests' KV between decode workers, or say why not.

Three triggers (``MigrationReason``)::

    imbalance  utilisation spread (max - min of active/total blocks over healthy decode workers)
               above ``imbalance_threshold``: move requests from the most loaded worker to less
               loaded ones until the spread is within it (or nothing more can move). A request that
               cannot move stays: ``Wait``.
    drain      every request on ``source_ids`` (scale-down) must leave: ``Move``, else ``Recompute``
               on a target with room, else ``Wait`` (no target has room).
    failure    every request on ``source_ids`` (default: the unhealthy decode workers) lost its device
               KV. With a surviving lower-tier copy (``copy_worker_id`` / ``copy_tier``) it may be
               moved from there; without one, or when that is slower, ``Recompute``; else ``Wait``.

The rule for every ``Move`` (terms recorded on the action)::

    transfer_s  = kv_bytes / (min(link GB/s, tier read GB/s) * 1e9) + link latency
    recompute_s = tokens so far / target prefill tokens/s
    Move only if transfer_s < recompute_s and target.free_blocks (after earlier actions) >= blocks

Targets: healthy decode/agg workers outside ``source_ids`` with the request's layout key.
Among the targets that qualify, the least utilised wins (then faster transfer, then lower id), so a
drain spreads its requests. Requests are handled largest first (then by request id); the plan
is a pure function of its inputs (deterministic, no clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from .inputs import Tier, WorkerSnapshot
from .links import LinkTable

_GB = 1e9
_INF = float("inf")


class MigrationReason(str, Enum):
    IMBALANCE = "imbalance"
    DRAIN = "drain"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request decoding on ``worker_id``; ``tokens`` = prompt + tokens generated so far."""

    request_id: str
    worker_id: int
    tokens: int
    blocks: int
    kv_bytes: int
    layout_key: str = ""
    #: Where a copy survives when the device copy is lost (failure): the worker/node id the link
    #: table knows it by, and its tier. None: no copy.
    copy_worker_id: int | None = None
    copy_tier: Tier | None = None


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    imbalance_threshold: float = 0.2
    max_moves: int = 64
    host_read_gb_per_s: float = 20.0
    disk_read_gb_per_s: float = 2.0
    object_read_gb_per_s: float = 0.5

    def read_gb_per_s(self, tier: Tier | None) -> float:
        if tier is Tier.HOST:
            return self.host_read_gb_per_s
        if tier is Tier.DISK:
            return self.disk_read_gb_per_s
        if tier is Tier.OBJECT:
            return self.object_read_gb_per_s
        return _INF


@dataclass(frozen=True, slots=True)
class MigrationTerms:
    """The numbers behind an action. ``None`` where a term does not apply or no target was found."""

    blocks: int
    kv_bytes: int
    transfer_s: float | None = None
    recompute_s: float | None = None
    link_gb_per_s: float | None = None
    target_free_blocks: int | None = None  # before this action
    source_utilisation: float | None = None
    target_utilisation: float | None = None  # before this action


@dataclass(frozen=True, slots=True)
class Move:
    """Pull the request's KV to ``target_id`` (from ``copy_from``: the source or a surviving copy)."""

    request_id: str
    source_id: int
    target_id: int
    copy_from: int
    reason: MigrationReason
    why: str
    terms: MigrationTerms


@dataclass(frozen=True, slots=True)
class Recompute:
    """Resume the request on ``target_id`` by prefilling its tokens again."""

    request_id: str
    source_id: int
    target_id: int
    reason: MigrationReason
    why: str
    terms: MigrationTerms


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do for now: the request stays (imbalance) or waits for room (drain/failure)."""

    request_id: str
    source_id: int
    reason: MigrationReason
    why: str
    terms: MigrationTerms


MigrationAction = Move | Recompute | Wait


class _Pool:
    """Simulated block accounting of the targets while a plan is built."""

    def __init__(self, workers: Sequence[WorkerSnapshot]) -> None:
        self.w = {w.worker_id: w for w in workers}
        self.active = {w.worker_id: w.active_blocks for w in workers}
        self.free = {w.worker_id: w.free_blocks for w in workers}

    def util(self, wid: int) -> float:
        total = self.active[wid] + self.free[wid]
        return self.active[wid] / total if total else 0.0

    def shift(self, src: int | None, dst: int, blocks: int) -> None:
        if src is not None and src in self.active:
            self.active[src] -= blocks
            self.free[src] += blocks
        self.active[dst] += blocks
        self.free[dst] -= blocks


def _transfer_s(r: RunningRequest, src: int, src_node: str | None, dst: WorkerSnapshot, links: LinkTable,
                cfg: MigrationConfig, tier: Tier | None) -> tuple[float, float]:
    info = links.link(src, dst.worker_id, src_node, dst.node)
    gbps = min(info.gb_per_s, cfg.read_gb_per_s(tier))
    return r.kv_bytes / (gbps * _GB) + info.latency_s, gbps


def _recompute_s(r: RunningRequest, dst: WorkerSnapshot) -> float:
    thr = dst.prefill_tokens_per_s
    return r.tokens / thr if thr > 0 else _INF


def _relocate(r: RunningRequest, pool: _Pool, targets: list[WorkerSnapshot], links: LinkTable,
              cfg: MigrationConfig, reason: MigrationReason, nodes: dict[int, str | None]) -> MigrationAction:
    """Drain/failure: the request must leave its worker."""
    if reason is MigrationReason.FAILURE:
        copy_from, tier = r.copy_worker_id, r.copy_tier
    else:
        copy_from, tier = r.worker_id, None
    fits = [t for t in targets if t.layout_key == r.layout_key and pool.free[t.worker_id] >= r.blocks]
    base = MigrationTerms(r.blocks, r.kv_bytes)
    if not fits:
        return Wait(r.request_id, r.worker_id, reason,
                    f"no healthy compatible target with {r.blocks} free blocks", base)
    best_move = None  # (util, transfer, id, target, transfer, recompute, gbps)
    slower = None  # the best target where transfer was not faster (for the why)
    if copy_from is not None:
        for t in fits:
            xfer, gbps = _transfer_s(r, copy_from, nodes.get(copy_from), t, links, cfg, tier)
            rec = _recompute_s(r, t)
            key = (pool.util(t.worker_id), xfer, t.worker_id)
            if xfer < rec:
                if best_move is None or key < best_move[0]:
                    best_move = (key, t, xfer, rec, gbps)
            elif slower is None or (xfer - rec, t.worker_id) < (slower[2] - slower[3], slower[1].worker_id):
                slower = (key, t, xfer, rec, gbps)
    if best_move is not None:
        _, t, xfer, rec, gbps = best_move
        terms = MigrationTerms(r.blocks, r.kv_bytes, xfer, rec, gbps, pool.free[t.worker_id],
                               None, pool.util(t.worker_id))
        pool.shift(None, t.worker_id, r.blocks)
        src = "surviving copy" if reason is MigrationReason.FAILURE else "source"
        return Move(r.request_id, r.worker_id, t.worker_id, copy_from, reason,
                    f"transfer {xfer:.6f}s from {src} {copy_from} < recompute {rec:.6f}s on {t.worker_id}", terms)
    recomputable = [t for t in fits if t.prefill_tokens_per_s > 0]
    if not recomputable:
        return Wait(r.request_id, r.worker_id, reason, "no target can recompute (no prefill throughput)", base)
    t = min(recomputable, key=lambda t: (pool.util(t.worker_id), _recompute_s(r, t), t.worker_id))
    rec = _recompute_s(r, t)
    if copy_from is None:
        why = f"no surviving copy: recompute {rec:.6f}s on {t.worker_id}"
        terms = MigrationTerms(r.blocks, r.kv_bytes, None, rec, None, pool.free[t.worker_id], None,
                               pool.util(t.worker_id))
    else:
        assert slower is not None
        xfer, srec, gbps = slower[2], slower[3], slower[4]
        why = (f"transfer {xfer:.6f}s >= recompute {srec:.6f}s on {slower[1].worker_id}"
               f" (best transfer target): recompute {rec:.6f}s on {t.worker_id}")
        terms = MigrationTerms(r.blocks, r.kv_bytes, xfer, rec, gbps, pool.free[t.worker_id], None,
                               pool.util(t.worker_id))
    pool.shift(None, t.worker_id, r.blocks)
    return Recompute(r.request_id, r.worker_id, t.worker_id, reason, why, terms)


def _rebalance(requests: list[RunningRequest], pool: _Pool, targets: list[WorkerSnapshot], links: LinkTable,
               cfg: MigrationConfig, nodes: dict[int, str | None]) -> list[MigrationAction]:
    out: list[MigrationAction] = []
    by_worker: dict[int, list[RunningRequest]] = {}
    for r in requests:
        if r.worker_id in pool.w:
            by_worker.setdefault(r.worker_id, []).append(r)
    for lst in by_worker.values():
        lst.sort(key=lambda r: (-r.blocks, r.request_id))
    decided: set[str] = set()
    ids = sorted(pool.w)
    if len(ids) < 2:
        return out  # nothing to balance between
    moves = 0
    while moves < cfg.max_moves:
        src = min(ids, key=lambda i: (-pool.util(i), i))
        lo = min(pool.util(i) for i in ids)
        if pool.util(src) - lo <= cfg.imbalance_threshold:
            break
        moved = False
        s_tot = pool.active[src] + pool.free[src]
        for r in by_worker.get(src, []):
            if r.request_id in decided:
                continue
            best = None
            slower = None
            for t in targets:
                tid = t.worker_id
                if tid == src or t.layout_key != r.layout_key or pool.free[tid] < r.blocks:
                    continue
                t_tot = pool.active[tid] + pool.free[tid]
                # no overshoot: the target must stay at or below the source after the move
                if t_tot == 0 or (pool.active[tid] + r.blocks) / t_tot > (pool.active[src] - r.blocks) / s_tot:
                    continue
                xfer, gbps = _transfer_s(r, src, nodes.get(src), t, links, cfg, None)
                rec = _recompute_s(r, t)
                key = (pool.util(tid), xfer, tid)
                if xfer < rec:
                    if best is None or key < best[0]:
                        best = (key, t, xfer, rec, gbps)
                elif slower is None or key < slower[0]:
                    slower = (key, t, xfer, rec, gbps)
            if best is not None:
                _, t, xfer, rec, gbps = best
                terms = MigrationTerms(r.blocks, r.kv_bytes, xfer, rec, gbps, pool.free[t.worker_id],
                                       pool.util(src), pool.util(t.worker_id))
                pool.shift(src, t.worker_id, r.blocks)
                out.append(Move(r.request_id, src, t.worker_id, src, MigrationReason.IMBALANCE,
                                f"utilisation {terms.source_utilisation:.3f} -> {terms.target_utilisation:.3f};"
                                f" transfer {xfer:.6f}s < recompute {rec:.6f}s", terms))
                decided.add(r.request_id)
                moves += 1
                moved = True
                break
            decided.add(r.request_id)
            if slower is not None:
                _, t, xfer, rec, gbps = slower
                out.append(Wait(r.request_id, src, MigrationReason.IMBALANCE,
                                f"transfer {xfer:.6f}s >= recompute {rec:.6f}s on {t.worker_id}: stays",
                                MigrationTerms(r.blocks, r.kv_bytes, xfer, rec, gbps, pool.free[t.worker_id],
                                               pool.util(src), pool.util(t.worker_id))))
            else:
                out.append(Wait(r.request_id, src, MigrationReason.IMBALANCE,
                                "no compatible target with room that stays below the source: stays",
                                MigrationTerms(r.blocks, r.kv_bytes, source_utilisation=pool.util(src))))
        if not moved:
            break
    return out


def plan_migrations(
    decode_workers: Iterable[WorkerSnapshot],
    running_requests: Iterable[RunningRequest],
    links: LinkTable,
    *,
    reason: MigrationReason | str,
    source_ids: Iterable[int] | None = None,
    config: MigrationConfig = MigrationConfig(),
) -> list[MigrationAction]:
    """Plan moves of running requests (see module docstring). Deterministic in its inputs.

    ``source_ids``: workers to empty (drain: required; failure: defaults to the unhealthy ones;
    imbalance: workers excluded from the balance, e.g. already draining).
    """
    reason = MigrationReason(reason)
    workers = sorted((w for w in decode_workers if w.can_decode), key=lambda w: w.worker_id)
    if len({w.worker_id for w in workers}) != len(workers):
        raise ValueError("duplicate worker_id")
    if source_ids is None:
        if reason is MigrationReason.DRAIN:
            raise ValueError("drain needs source_ids (the workers to drain)")
        sources = {w.worker_id for w in workers if not w.healthy} if reason is MigrationReason.FAILURE else set()
    else:
        sources = set(source_ids)
    targets = [w for w in workers if w.healthy and w.worker_id not in sources]
    nodes = {w.worker_id: w.node for w in workers}
    reqs = sorted(running_requests, key=lambda r: (-r.blocks, r.request_id))
    pool = _Pool(targets)

    if reason is MigrationReason.IMBALANCE:
        return _rebalance(reqs, pool, targets, links, config, nodes)
    return [_relocate(r, pool, targets, links, config, reason, nodes) for r in reqs if r.worker_id in sources]


__all__ = [
    "MigrationReason",
    "RunningRequest",
    "MigrationConfig",
    "MigrationTerms",
    "Move",
    "Recompute",
    "Wait",
    "MigrationAction",
    "plan_migrations",
]
