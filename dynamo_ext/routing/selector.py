"""``decide``: which (prefill, decode) pair serves a request, or local prefill on a decode worker.

Steps (all on plain data, no I/O)::

    1. exclusions   unhealthy workers; prefill workers without throughput; decode targets without
                    free blocks; pairs with different layout keys; pairs whose link is unhealthy.
                    Each is recorded with its reason (decision.Exclusion).
    2. local        estimate local prefill on every usable decode/agg worker (O(D)); keep the top two.
    3. short prompt prompt_tokens < local_prefill_max_tokens and a local option exists: best local.
    4. pairs        side cost of every usable prefill worker once (O(P)), sorted ascending per layout.
                    For decode worker d, no pair into d can cost less than
                        (side cost + (kv_bytes * fastest s/B into d + lowest latency)) + adm(d)
                    (the table keeps those per-destination bounds). Prefill workers are scanned by
                    ascending side cost and a scan stops once that bound exceeds the threshold
                    max(best pair, min(second pair, best local)): beyond it a pair can be neither the
                    best pair nor one of the two best options. Worst case O(P*D); the inner loop
                    allocates nothing unless a pair enters the top two.
    5. choose       the minimum of the top-two pairs and top-two local options by Option.sort_key
                    (estimate, then more overlap, then local before disagg, then lower ids);
                    the next one is the runner-up.

``estimate_all`` enumerates every option without pruning: the reference ``decide`` must agree with
(property-tested), and a debugging aid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import attrgetter

from .decision import (
    Decision,
    DecisionReason,
    Exclusion,
    ExclusionReason,
    NoCandidateError,
    Option,
    OptionKind,
)
from .inputs import RequestShape, Role, RoutingConfig, Tier, WorkerSnapshot
from .links import LinkTable
from .ttft_model import local_option, pair_option, pulled_blocks, side_cost

_INF = float("inf")
_worker_id = attrgetter("worker_id")
_DEFAULT_CONFIG = RoutingConfig()


class _Candidates:
    """Workers split by role and usability for one request, with the exclusions that made the split.

    One pass over the workers. With ``score_local`` the same pass estimates every local option and
    keeps the keys of the best two (``local1``, ``local2``); Exclusion objects are built only for
    what was excluded.
    """

    __slots__ = ("prefill", "pair_decode", "local_decode", "exclusions", "by_id", "local1", "local2", "any_prefill")

    def __init__(self, req: RequestShape, workers: Iterable[WorkerSnapshot], links: LinkTable,
                 cfg: RoutingConfig, score_local: bool = False) -> None:
        by_id: dict[int, WorkerSnapshot] = {}
        prefill: list[WorkerSnapshot] = []
        pair_decode: list[WorkerSnapshot] = []
        local: list[WorkerSnapshot] = []
        bad_p: list[int] = []
        slow_p: list[int] = []
        bad_d: list[int] = []
        full_d: list[int] = []
        slow_d: list[int] = []
        full_local: list[tuple[int, int, int]] = []
        pblocks = req.prompt_blocks
        prompt = req.prompt_tokens
        ovh = cfg.per_request_overhead_s
        room = cfg.require_decode_room
        allow_local = cfg.allow_local_prefill
        ww = cfg.work_weight
        prefill_role = Role.PREFILL
        device = Tier.DEVICE
        l1 = l2 = None
        l2t = _INF
        for w in workers:
            wid = w.worker_id
            if wid in by_id:
                raise ValueError(f"duplicate worker_id {wid}")
            by_id[wid] = w
            if w.role is prefill_role:
                if not w.healthy:
                    bad_p.append(wid)
                elif not w.prefill_tokens_per_s > 0:
                    slow_p.append(wid)
                else:
                    prefill.append(w)
                continue
            if not w.healthy:
                bad_d.append(wid)
                continue
            free = w.free_blocks
            if room and free < pblocks:
                full_d.append(wid)
                ov = w.overlap_blocks
                need = pblocks - (ov if ov < pblocks else pblocks) if w.overlap_tier is device else pblocks
                if free < need and allow_local and w.prefill_tokens_per_s > 0:
                    full_local.append((wid, free, need))
                    continue
            else:
                pair_decode.append(w)
            if not allow_local:
                continue
            thr = w.prefill_tokens_per_s
            if not thr > 0:
                slow_d.append(wid)
                continue
            local.append(w)
            if score_local:
                if w.overlap_blocks:
                    sc = side_cost(w, req, cfg)
                    cost, negov = sc.cost_s, -sc.overlap_blocks
                else:  # the same float as side_cost(): ((queue + 0.0) + prompt / thr) + work_weight * prompt / thr
                    pf = prompt / thr
                    cost, negov = (((w.queue_tokens + w.shared_queue_tokens) / thr + w.queued_requests * ovh) + pf) + ww * pf, 0
                t = w.admission_delay_s + cost
                if t > l2t:
                    continue
                key = (t, negov, 0, wid, wid)
                if l1 is None or key < l1:
                    l1, l2 = key, l1
                elif l2 is None or key < l2:
                    l2 = key
                if l2 is not None:
                    l2t = l2[0]
        self.by_id = by_id
        pair_decode.sort(key=_worker_id)  # scan order fixes the evaluated/pruned counts: make it the ids'
        self.prefill = prefill
        self.any_prefill = bool(prefill or bad_p or slow_p)
        self.pair_decode = pair_decode
        self.local_decode = local
        self.local1, self.local2 = l1, l2
        self.exclusions: tuple[Exclusion, ...] = _exclusions(
            by_id, prefill, pair_decode, links, pblocks, room, bad_p, slow_p, bad_d, full_d, slow_d, full_local)


def _exclusions(by_id, prefill, pair_decode, links, pblocks, room, bad_p, slow_p, bad_d, full_d, slow_d,
                full_local) -> tuple[Exclusion, ...]:
    """The Exclusion records of one split, in a fixed order (ids sorted). O(excluded) except layouts."""
    ex: list[Exclusion] = []
    n_p = len(prefill)
    if bad_p or slow_p:
        n_d = len(by_id) - n_p - len(bad_p) - len(slow_p)  # every decode/agg worker
    if bad_p:
        bad_p = sorted(bad_p)
        ex.append(Exclusion(ExclusionReason.WORKER_UNHEALTHY, tuple(bad_p), (), False,
                            f"prefill workers {bad_p} unhealthy", len(bad_p) * n_d, True))
    if slow_p:
        slow_p = sorted(slow_p)
        ex.append(Exclusion(ExclusionReason.NO_THROUGHPUT, tuple(slow_p), (), False,
                            f"prefill workers {slow_p} report no prefill throughput", len(slow_p) * n_d, True))
    if bad_d:
        bad_d = sorted(bad_d)
        ex.append(Exclusion(ExclusionReason.WORKER_UNHEALTHY, (), tuple(bad_d), True,
                            f"decode workers {bad_d} unhealthy", n_p * len(bad_d), True))
    if full_d:
        full_d = sorted(full_d)
        ex.append(Exclusion(ExclusionReason.NO_FREE_BLOCKS, (), tuple(full_d), False,
                            f"decode workers {full_d} have < {pblocks} free blocks for the prompt's KV",
                            n_p * len(full_d), True))
    if slow_d:
        slow_d = sorted(slow_d)
        ex.append(Exclusion(ExclusionReason.NO_THROUGHPUT, (), tuple(slow_d), True,
                            f"decode workers {slow_d} report no prefill throughput (no local prefill)", 0))
    for wid, free, need in sorted(full_local):
        ex.append(Exclusion(ExclusionReason.NO_FREE_BLOCKS, (), (wid,), True,
                            f"decode worker {wid} has {free} < {need} free blocks for a local prefill", 0))
    if prefill and pair_decode:
        first = prefill[0].layout_key
        mixed = False
        for w in prefill:
            if w.layout_key != first:
                mixed = True
                break
        if not mixed:
            for w in pair_decode:
                if w.layout_key != first:
                    mixed = True
                    break
        if mixed:
            ex.extend(_layout_exclusions(prefill, pair_decode))
    if links.unhealthy_pairs:
        prefill_role = Role.PREFILL
        for s, d in links.unhealthy_pairs:
            ws, wd = by_id.get(s), by_id.get(d)
            if (ws is not None and wd is not None and ws.role is prefill_role and wd.role is not prefill_role
                    and ws.healthy and ws.prefill_tokens_per_s > 0 and wd.healthy
                    and (not room or wd.free_blocks >= pblocks) and ws.layout_key == wd.layout_key):
                ex.append(Exclusion(ExclusionReason.LINK_UNHEALTHY, (s,), (d,), False, f"link {s}->{d} unhealthy", 1))
    return tuple(ex)


def _layout_exclusions(prefill, pair_decode) -> list[Exclusion]:
    ex: list[Exclusion] = []
    p_by_layout: dict[str, list[int]] = {}
    for w in prefill:
        p_by_layout.setdefault(w.layout_key, []).append(w.worker_id)
    d_by_layout: dict[str, list[int]] = {}
    for w in pair_decode:
        d_by_layout.setdefault(w.layout_key, []).append(w.worker_id)
    for dk in sorted(d_by_layout):
        for pk in sorted(p_by_layout):
            if pk != dk:
                ex.append(Exclusion(ExclusionReason.LAYOUT_MISMATCH, tuple(sorted(p_by_layout[pk])),
                                    tuple(sorted(d_by_layout[dk])), False,
                                    f"prefill layout {pk!r} != decode layout {dk!r}",
                                    len(p_by_layout[pk]) * len(d_by_layout[dk])))
    return ex


def decide(
    request: RequestShape,
    workers: Iterable[WorkerSnapshot],
    links: LinkTable,
    *,
    config: RoutingConfig = _DEFAULT_CONFIG,
) -> Decision:
    """Choose the option with the lowest estimated TTFT (see module docstring and README.md).

    Raises ``NoCandidateError`` (carrying the exclusions) when no option is left.
    """
    cfg = config
    req = request
    cand = _Candidates(req, workers, links, cfg, score_local=True)
    prompt = req.prompt_tokens
    l1, l2 = cand.local1, cand.local2
    n_local = len(cand.local_decode)
    best_local = local_option(cand.by_id[l1[3]], req, cfg) if l1 is not None else None
    second_local = local_option(cand.by_id[l2[3]], req, cfg) if l2 is not None else None
    best_local_s = best_local.terms.total_s if best_local is not None else None

    if best_local is not None and prompt < cfg.local_prefill_max_tokens:
        return Decision(best_local, DecisionReason.SHORT_PROMPT, second_local, cand.exclusions, best_local_s,
                        None, n_local, 0, prompt, req.request_id)

    pair1, pair2, evaluated, pruned = _best_pairs(req, cand, links, cfg, l1[0] if l1 is not None else _INF)
    pairs = [o for o in (pair1, pair2) if o is not None]
    chosen, runner_up = _pick([o for o in (best_local, second_local) if o is not None] + pairs)
    if chosen is None:
        raise NoCandidateError(cand.exclusions)
    if not pairs:
        reason = DecisionReason.NO_HEALTHY_PAIR if cand.any_prefill else DecisionReason.NO_PREFILL_WORKERS
    elif best_local is None:
        reason = DecisionReason.NO_LOCAL_OPTION
    elif chosen.kind is OptionKind.LOCAL:
        reason = DecisionReason.LOCAL_CHEAPER
    else:
        reason = DecisionReason.DISAGG_CHEAPER
    return Decision(chosen, reason, runner_up, cand.exclusions, best_local_s,
                    pair1.terms.total_s if pair1 is not None else None,
                    n_local + evaluated, pruned, prompt, req.request_id)


def _pick(options: Sequence[Option]) -> tuple[Option | None, Option | None]:
    ranked = sorted(options, key=Option.sort_key)
    return (ranked[0] if ranked else None, ranked[1] if len(ranked) > 1 else None)


def _best_pairs(
    req: RequestShape, cand: _Candidates, links: LinkTable, cfg: RoutingConfig, best_local_t: float
) -> tuple[Option | None, Option | None, int, int]:
    """The pairs that can matter, with bound pruning. Returns (best, second, evaluated, pruned).

    A pair matters if it is the best pair (``best_disagg_s``) or among the two best options overall.
    So a pair whose total exceeds ``max(pair1, min(pair2, best_local))`` cannot matter: that is the
    pruning threshold. ``second`` is the second-best pair among those evaluated; it can differ from
    the true second-best pair only when both are worse than the best local option (so it never
    changes the chosen option or the runner-up).
    """
    if not cand.prefill or not cand.pair_decode:
        return None, None, 0, 0
    prompt = req.prompt_tokens
    ovh = cfg.per_request_overhead_s
    ww = cfg.work_weight
    # Per prefill worker, once: (side cost, -overlap, id, node), grouped by layout, ascending.
    groups: dict[str, list[tuple[float, int, int, str | None]]] = {}
    for w in cand.prefill:
        thr = w.prefill_tokens_per_s
        if w.overlap_blocks:
            sc = side_cost(w, req, cfg)
            entry = (sc.cost_s, -sc.overlap_blocks, w.worker_id, w.node)
        else:  # the same float as side_cost() (see _Candidates)
            pf = prompt / thr
            entry = ((((w.queue_tokens + w.shared_queue_tokens) / thr + w.queued_requests * ovh) + pf) + ww * pf, 0, w.worker_id, w.node)
        g = groups.get(w.layout_key)
        if g is None:
            groups[w.layout_key] = [entry]
        else:
            g.append(entry)
    for g in groups.values():
        g.sort()

    dflt = links.default
    d_inv, d_lat = 1.0 / (dflt.gb_per_s * 1e9), dflt.latency_s
    sn = links.same_node
    s_inv, s_lat = (1.0 / (sn.gb_per_s * 1e9), sn.latency_s) if sn is not None else (d_inv, d_lat)
    has_sn = sn is not None
    rows = links.rows_by_dst
    bounds = links.bound_by_dst
    gbound = links.global_bound
    empty: dict = {}

    thr = _INF  # max(pair1, min(pair2, best_local)): above it a pair cannot matter
    p1t = p2t = _INF
    best1 = best2 = None
    evaluated = pruned = 0
    min_inv, min_lat = links.min_bound
    bpb = req.kv_bytes_per_block
    for d in cand.pair_decode:
        g = groups.get(d.layout_key)
        if not g:
            continue
        kvb = pulled_blocks(d, req) * bpb  # the blocks d's own prefix cache lacks (== pair_kv_bytes)
        xmin = kvb * min_inv + min_lat  # no transfer into d is faster
        adm = d.admission_delay_s
        if (g[0][0] + xmin) + adm > thr:  # cheap test first: no table lookup
            pruned += len(g)
            continue
        did = d.worker_id
        inv_b, lat_b = bounds.get(did, gbound)
        xb = kvb * inv_b + lat_b
        if (g[0][0] + xb) + adm > thr:
            pruned += len(g)
            continue
        row = rows.get(did, empty)
        dnode = d.node
        i = 0
        for cost, negov, pid, pnode in g:
            if (cost + xb) + adm > thr:
                pruned += len(g) - i
                break
            i += 1
            e = row.get(pid)
            if e is None:
                if has_sn and pnode is not None and pnode == dnode:
                    inv, lat = s_inv, s_lat
                else:
                    inv, lat = d_inv, d_lat
            else:
                inv, lat, ok = e
                if not ok:
                    continue
            t = (cost + (kvb * inv + lat)) + adm
            evaluated += 1
            if t > thr:
                continue
            key = (t, negov, 1, pid, did)
            if best1 is None or key < best1:
                best2, best1 = best1, key
            elif best2 is None or key < best2:
                best2 = key
            else:
                continue
            p1t = best1[0]
            p2t = best2[0] if best2 is not None else _INF
            thr = max(p1t, min(p2t, best_local_t))

    def build(key):
        if key is None:
            return None
        return pair_option(cand.by_id[key[3]], cand.by_id[key[4]], req, links, cfg)

    return build(best1), build(best2), evaluated, pruned


def estimate_all(
    request: RequestShape,
    workers: Iterable[WorkerSnapshot],
    links: LinkTable,
    *,
    config: RoutingConfig = _DEFAULT_CONFIG,
) -> list[Option]:
    """Every non-excluded option with its full terms, ranked by ``Option.sort_key`` (no pruning).

    O(P*D) allocations: for tests, audits and debugging, not the request path.
    """
    cfg = config
    cand = _Candidates(request, workers, links, cfg)
    out = [local_option(w, request, cfg) for w in cand.local_decode]
    unhealthy = set(links.unhealthy_pairs)
    for p in cand.prefill:
        s = side_cost(p, request, cfg)
        for d in cand.pair_decode:
            if p.layout_key != d.layout_key or (p.worker_id, d.worker_id) in unhealthy:
                continue
            out.append(pair_option(p, d, request, links, cfg, s))
    out.sort(key=Option.sort_key)
    return out


__all__ = ["decide", "estimate_all"]
