"""Properties: decide() is the argmin of the reported estimates, and independent of input order."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from routing_factories import BLOCK, KV_PER_TOKEN

from dynamo_ext.routing import (
    DecisionReason,
    LinkInfo,
    LinkTable,
    NoCandidateError,
    OptionKind,
    RequestShape,
    Role,
    RoutingConfig,
    RunningRequest,
    Tier,
    WorkerSnapshot,
    decide,
    estimate_all,
    plan_migrations,
)

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Coarse grids make exact ties (the tie-break rules) common.
thr = st.sampled_from([1_000.0, 4_096.0, 8_192.0, 10_000.0, 0.0])
small = st.sampled_from([0, 0, 512, 4_096, 20_000])


@st.composite
def worker(draw, wid: int):
    role = draw(st.sampled_from([Role.PREFILL, Role.DECODE, Role.AGG]))
    return WorkerSnapshot(
        worker_id=wid,
        role=role,
        prefill_tokens_per_s=draw(thr),
        layout_key=draw(st.sampled_from(["A", "A", "A", "B"])),
        queue_tokens=draw(small),
        shared_queue_tokens=draw(small),
        queued_requests=draw(st.integers(0, 3)),
        active_blocks=draw(st.integers(0, 2_000)),
        free_blocks=draw(st.sampled_from([0, 100, 2_000, 100_000])),
        admission_delay_s=draw(st.sampled_from([0.0, 0.0, 0.01, 0.25])),
        overlap_blocks=draw(st.sampled_from([0, 0, 8, 64, 1_000])),
        overlap_tier=draw(st.sampled_from(list(Tier))),
        healthy=draw(st.sampled_from([True, True, True, False])),
        node=draw(st.sampled_from([None, "n0", "n1"])),
    )


@st.composite
def scenario(draw):
    n = draw(st.integers(1, 10))
    ids = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n, unique=True))
    ws = [draw(worker(i)) for i in ids]
    entries = {}
    for s in ids:
        for d in ids:
            if s != d and draw(st.integers(0, 3)) == 0:
                entries[(s, d)] = LinkInfo(draw(st.sampled_from([0.5, 12.5, 50.0])),
                                           draw(st.sampled_from([0.0, 1e-5])), draw(st.booleans()))
    same = draw(st.sampled_from([None, LinkInfo(200.0, 1e-6)]))
    lt = LinkTable(entries, default=LinkInfo(draw(st.sampled_from([1.0, 25.0])), 2e-5), same_node=same)
    req = RequestShape(prompt_tokens=draw(st.sampled_from([0, 100, 1_000, 4_096, 16_000])), block_size=BLOCK,
                       kv_bytes_per_token=KV_PER_TOKEN)
    cfg = RoutingConfig(local_prefill_max_tokens=draw(st.sampled_from([0, 256])),
                        allow_local_prefill=draw(st.sampled_from([True, True, False])),
                        per_request_overhead_s=draw(st.sampled_from([0.0, 0.005])),
                        work_weight=draw(st.sampled_from([0.0, 0.0, 1.0])))
    return req, ws, lt, cfg, entries


@SETTINGS
@given(scenario())
def test_decision_is_the_argmin_of_the_reported_estimates(sc):
    req, ws, lt, cfg, _ = sc
    ref = estimate_all(req, ws, lt, config=cfg)
    try:
        dec = decide(req, ws, lt, config=cfg)
    except NoCandidateError:
        assert ref == []
        return
    if dec.reason is DecisionReason.SHORT_PROMPT:
        ref = [o for o in ref if o.kind is OptionKind.LOCAL]
    assert dec.chosen == ref[0]  # same option, same terms, bit for bit
    assert all(dec.chosen.terms.total_s <= o.terms.total_s for o in ref)
    assert dec.runner_up == (ref[1] if len(ref) > 1 else None)
    if dec.margin_s is not None:
        assert dec.margin_s >= 0.0
    pairs = [o for o in ref if o.kind is OptionKind.DISAGG]
    if dec.reason is not DecisionReason.SHORT_PROMPT:
        assert dec.best_disagg_s == (pairs[0].terms.total_s if pairs else None)
    for o in ref:  # nothing excluded was estimated
        if o.kind is OptionKind.DISAGG:
            assert dec.excluded_pair(o.prefill_id, o.decode_id) is None
        else:
            assert dec.excluded_local(o.decode_id) is None
    t = dec.chosen.terms
    assert t.work_s == cfg.work_weight * t.prefill_s
    if dec.chosen.kind is OptionKind.LOCAL:
        assert t.total_s == t.admission_s + (((t.queue_wait_s + t.onload_s) + t.prefill_s) + t.work_s)
    else:
        assert t.total_s == ((((t.queue_wait_s + t.onload_s) + t.prefill_s) + t.work_s)
                             + (t.transfer_s + t.link_latency_s)) + t.admission_s


@SETTINGS
@given(scenario(), st.randoms(use_true_random=False))
def test_decision_is_invariant_to_input_order(sc, rnd):
    req, ws, lt, cfg, entries = sc
    try:
        base = decide(req, ws, lt, config=cfg)
    except NoCandidateError as e:
        base = ("error", e.exclusions)
    shuffled = list(ws)
    rnd.shuffle(shuffled)
    items = list(entries.items())
    rnd.shuffle(items)
    lt2 = LinkTable(dict(items), default=lt.default, same_node=lt.same_node)
    try:
        again = decide(req, shuffled, lt2, config=cfg)
    except NoCandidateError as e:
        again = ("error", e.exclusions)
    assert again == base


@SETTINGS
@given(scenario(), st.randoms(use_true_random=False), st.sampled_from(["drain", "failure", "imbalance"]),
       st.lists(st.tuples(st.integers(0, 50), st.integers(1, 40_000), st.integers(1, 900),
                          st.sampled_from([10**7, 10**9, 10**10])), max_size=12))
def test_migration_plan_is_invariant_and_respects_room(sc, rnd, reason, reqs):
    _, ws, lt, _, _ = sc
    decoders = [w for w in ws if w.can_decode]
    if not decoders:
        return
    ids = [w.worker_id for w in decoders]
    running = [RunningRequest(f"r{i}", ids[wid % len(ids)], tokens, blocks, kv, "A",
                              copy_worker_id=ids[0] if i % 2 else None, copy_tier=Tier.HOST if i % 2 else None)
               for i, (wid, tokens, blocks, kv) in enumerate(reqs)]
    src = [ids[0]] if reason == "drain" else None
    plan = plan_migrations(decoders, running, lt, reason=reason, source_ids=src)
    shuffled_w, shuffled_r = list(decoders), list(running)
    rnd.shuffle(shuffled_w)
    rnd.shuffle(shuffled_r)
    assert plan_migrations(shuffled_w, shuffled_r, lt, reason=reason, source_ids=src) == plan
    free = {w.worker_id: w.free_blocks for w in decoders}
    blocks = {r.request_id: r.blocks for r in running}
    for a in plan:
        if hasattr(a, "target_id"):
            free[a.target_id] -= blocks[a.request_id]
            if a.reason.value == "imbalance":
                free[a.source_id] += blocks[a.request_id]
            assert free[a.target_id] >= 0
        if type(a).__name__ == "Move":
            assert a.terms.transfer_s < a.terms.recompute_s
