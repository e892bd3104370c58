"""decide(): every term of the TTFT estimate and every rule, on hand-sized inputs."""

from __future__ import annotations

import math
import random

import pytest
from routing_factories import BLOCK, KV_PER_TOKEN, decode, links, prefill, request

from dynamo_ext.routing import (
    DecisionReason,
    ExclusionReason,
    LinkInfo,
    LinkTable,
    NoCandidateError,
    OptionKind,
    RoutingConfig,
    Tier,
    decide,
    estimate_all,
)


def test_terms_add_up_to_the_estimate():
    req = request(4096)
    p = prefill(1, thr=10_000, queue_tokens=2_000, queued_requests=3)
    d = decode(7, admission_delay_s=0.02)
    lt = links({(1, 7): LinkInfo(gb_per_s=20.0, latency_s=1e-3)})
    cfg = RoutingConfig(per_request_overhead_s=0.01)
    dec = decide(req, [p, d], lt, config=RoutingConfig(allow_local_prefill=False, per_request_overhead_s=0.01))
    t = dec.chosen.terms
    assert dec.chosen.kind is OptionKind.DISAGG and (dec.chosen.prefill_id, dec.chosen.decode_id) == (1, 7)
    assert t.queue_wait_s == pytest.approx(2_000 / 10_000 + 3 * 0.01)
    assert t.prefill_s == pytest.approx(4096 / 10_000)
    assert t.onload_s == 0.0
    kv = (4096 // BLOCK) * BLOCK * KV_PER_TOKEN
    assert dec.chosen.kv_bytes == kv
    assert t.transfer_s == pytest.approx(kv / 20e9)
    assert t.link_latency_s == 1e-3
    assert t.admission_s == 0.02
    assert t.total_s == pytest.approx(t.queue_wait_s + t.prefill_s + t.transfer_s + t.link_latency_s + t.admission_s)
    assert dec.reason is DecisionReason.NO_LOCAL_OPTION
    del cfg


def test_whole_blocks_move_and_cached_part_still_moves():
    req = request(1000)  # 63 blocks (last one partial)
    dec = decide(req, [prefill(1, overlap_blocks=10), decode(2)], links(),
                 config=RoutingConfig(allow_local_prefill=False))
    assert dec.chosen.kv_bytes == 63 * BLOCK * KV_PER_TOKEN
    assert dec.chosen.uncached_tokens == 1000 - 160


def test_cheaper_pair_wins():
    req = request(4096)
    ws = [prefill(1, queue_tokens=20_000), prefill(2, queue_tokens=0), decode(10), decode(11, admission_delay_s=0.5)]
    dec = decide(req, ws, links())
    assert dec.disaggregated and (dec.chosen.prefill_id, dec.chosen.decode_id) == (2, 10)
    assert dec.reason is DecisionReason.DISAGG_CHEAPER
    assert dec.runner_up is not None and dec.margin_s > 0


def test_high_overlap_on_a_prefill_worker_wins():
    req = request(8192)  # 512 blocks
    ws = [prefill(1, queue_tokens=2_000, overlap_blocks=448), prefill(2, queue_tokens=0), decode(10)]
    dec = decide(req, ws, links())
    assert dec.chosen.prefill_id == 1
    assert dec.chosen.overlap_blocks == 448 and dec.chosen.uncached_tokens == 8192 - 448 * BLOCK
    assert dec.runner_up.prefill_id == 2


def test_slow_link_loses_to_local_prefill():
    req = request(4096)
    ws = [prefill(1, thr=20_000), decode(10, thr=5_000)]
    fast = decide(req, ws, links(gbps=50.0))
    assert fast.disaggregated
    slow = decide(req, ws, links(gbps=0.2))  # 409.6 MB at 0.2 GB/s = 2 s
    assert not slow.disaggregated and slow.chosen.decode_id == 10
    assert slow.reason is DecisionReason.LOCAL_CHEAPER
    assert slow.runner_up.kind is OptionKind.DISAGG and slow.runner_up.terms.transfer_s == pytest.approx(2.048)
    assert slow.best_disagg_s > slow.best_local_s


def test_decode_worker_holding_the_prefix_prefills_locally():
    req = request(8192)
    ws = [prefill(1, thr=20_000), decode(10, thr=5_000, overlap_blocks=512)]
    dec = decide(req, ws, links())
    assert dec.chosen.kind is OptionKind.LOCAL and dec.chosen.uncached_tokens == 1  # last token recomputed


def test_short_prompt_stays_local_even_if_a_pair_is_cheaper():
    req = request(100)
    ws = [prefill(1, thr=1_000_000), decode(10, thr=1_000, admission_delay_s=0.1)]
    dec = decide(req, ws, links(), config=RoutingConfig(local_prefill_max_tokens=256))
    assert dec.chosen.kind is OptionKind.LOCAL and dec.reason is DecisionReason.SHORT_PROMPT
    assert dec.best_disagg_s is None
    longer = decide(req, ws, links(), config=RoutingConfig(local_prefill_max_tokens=64))
    assert longer.disaggregated


def test_incompatible_layouts_excluded_with_reason():
    req = request(4096)
    ws = [prefill(1, layout_key="bf16"), prefill(2, layout_key="fp8"), decode(10, layout_key="bf16"),
          decode(11, layout_key="fp8")]
    dec = decide(req, ws, links())
    assert dec.excluded_pair(1, 11) is ExclusionReason.LAYOUT_MISMATCH
    assert dec.excluded_pair(2, 10) is ExclusionReason.LAYOUT_MISMATCH
    assert dec.excluded_pair(1, 10) is None
    opts = estimate_all(req, ws, links())
    assert {(o.prefill_id, o.decode_id) for o in opts if o.kind is OptionKind.DISAGG} == {(1, 10), (2, 11)}
    assert "layout_mismatch:2" in dec.to_log()
    only_mismatch = decide(req, [prefill(1, layout_key="bf16"), decode(11, layout_key="fp8")], links())
    assert only_mismatch.reason is DecisionReason.NO_HEALTHY_PAIR and not only_mismatch.disaggregated
    assert "'bf16' != decode layout 'fp8'" in only_mismatch.exclusions[0].detail


def test_unhealthy_link_and_worker_excluded_with_reason():
    req = request(4096)
    ws = [prefill(1), prefill(2, queue_tokens=5_000), prefill(3, healthy=False), decode(10, thr=1_000),
          decode(11, healthy=False)]
    lt = links({(1, 10): LinkInfo(100.0, 0.0, healthy=False)})
    dec = decide(req, ws, lt)
    assert (dec.chosen.prefill_id, dec.chosen.decode_id) == (2, 10)
    assert dec.excluded_pair(1, 10) is ExclusionReason.LINK_UNHEALTHY
    assert dec.excluded_pair(3, 10) is ExclusionReason.WORKER_UNHEALTHY
    assert dec.excluded_pair(1, 11) is ExclusionReason.WORKER_UNHEALTHY
    assert dec.excluded_local(11) is ExclusionReason.WORKER_UNHEALTHY
    assert dec.excluded_local(10) is None
    m = dec.metrics()
    assert m["excluded_link_unhealthy"] == 1.0
    # prefill 3 x decode {10, 11} + usable prefill {1, 2} x decode 11 + local option of 11
    assert m["excluded_worker_unhealthy"] == 2 + 2 + 1


def test_no_free_blocks_excludes_the_decode_target():
    req = request(4096)  # 256 blocks
    ws = [prefill(1), decode(10, free_blocks=100), decode(11, free_blocks=300, admission_delay_s=0.3)]
    dec = decide(req, ws, links())
    assert dec.chosen.decode_id == 11
    assert dec.excluded_pair(1, 10) is ExclusionReason.NO_FREE_BLOCKS
    assert dec.excluded_local(10) is ExclusionReason.NO_FREE_BLOCKS


def test_no_candidates_raises_with_reasons():
    req = request(4096)
    with pytest.raises(NoCandidateError) as e:
        decide(req, [prefill(1, healthy=False), decode(10, healthy=False)], links())
    assert "worker_unhealthy" in str(e.value) and len(e.value.exclusions) == 2
    with pytest.raises(NoCandidateError):
        decide(req, [], links())
    with pytest.raises(NoCandidateError):  # prefill workers only, nobody can decode
        decide(req, [prefill(1)], links())


def test_only_local_when_no_prefill_workers():
    dec = decide(request(4096), [decode(10), decode(11, queue_tokens=100)], links())
    assert dec.reason is DecisionReason.NO_PREFILL_WORKERS and dec.chosen.decode_id == 10
    # a prefill worker exists but is unhealthy: no pair left, which is another reason
    dec = decide(request(4096), [prefill(1, healthy=False), decode(10)], links())
    assert dec.reason is DecisionReason.NO_HEALTHY_PAIR and dec.chosen.decode_id == 10


def test_host_tier_overlap_pays_onload_and_slow_tier_is_ignored():
    req = request(8192)  # 512 blocks
    p = prefill(1, thr=10_000, overlap_blocks=256, overlap_tier=Tier.HOST)
    dec = decide(req, [p, decode(10)], links(), config=RoutingConfig(allow_local_prefill=False))
    bytes_cached = 256 * BLOCK * KV_PER_TOKEN
    assert dec.chosen.terms.onload_s == pytest.approx(bytes_cached / 20e9)
    assert dec.chosen.overlap_blocks == 256
    # from an object store at 0.01 GB/s the copy is slower than recomputing those tokens: ignored
    p_slow = prefill(1, thr=10_000, overlap_blocks=256, overlap_tier=Tier.OBJECT, onload_gb_per_s=0.01)
    slow = decide(req, [p_slow, decode(10)], links(), config=RoutingConfig(allow_local_prefill=False))
    assert slow.chosen.overlap_blocks == 0 and slow.chosen.terms.onload_s == 0.0
    assert slow.chosen.uncached_tokens == 8192


def test_same_node_default_beats_cross_node_default():
    req = request(16384)
    ws = [prefill(1, node="a"), prefill(2, node="b"), decode(10, node="b")]
    lt = LinkTable({}, default=LinkInfo(1.0, 1e-4), same_node=LinkInfo(200.0, 1e-6))
    dec = decide(req, ws, lt, config=RoutingConfig(allow_local_prefill=False))
    assert dec.chosen.prefill_id == 2 and dec.chosen.link_gb_per_s == 200.0
    assert dec.runner_up.prefill_id == 1 and dec.runner_up.link_gb_per_s == 1.0


def test_tie_breaks_prefer_overlap_then_local_then_lower_ids():
    req = request(4096)
    cfg = RoutingConfig(allow_local_prefill=False)
    # identical estimates: same costs, same links
    same = [prefill(5), prefill(3), decode(12), decode(11)]
    dec = decide(req, same, links(), config=cfg)
    assert (dec.chosen.prefill_id, dec.chosen.decode_id) == (3, 11)
    assert (dec.runner_up.prefill_id, dec.runner_up.decode_id) == (3, 12)
    assert dec.margin_s == 0.0
    # equal estimate, more overlap wins: worker 5 caches 64 blocks but its queue costs exactly that much
    ov = [prefill(5, thr=8192, overlap_blocks=64, queue_tokens=64 * BLOCK), prefill(3, thr=8192), decode(11)]
    dec = decide(req, ov, links(), config=cfg)
    assert dec.chosen.terms.total_s == dec.runner_up.terms.total_s
    assert dec.chosen.prefill_id == 5


def test_determinism_under_shuffled_input_order():
    rng = random.Random(7)
    req = request(6000)
    ws = [prefill(i, thr=rng.choice([8e3, 1e4, 2e4]), queue_tokens=rng.choice([0, 1000, 5000]),
                  overlap_blocks=rng.choice([0, 0, 100]), layout_key=rng.choice("LLLM")) for i in range(8)]
    ws += [decode(i, thr=rng.choice([4e3, 5e3]), admission_delay_s=rng.choice([0.0, 0.01]),
                  layout_key=rng.choice("LLLM"), healthy=rng.random() > 0.1) for i in range(8, 24)]
    entries = {(p, d): LinkInfo(rng.choice([5.0, 25.0, 50.0]), 1e-5, rng.random() > 0.1)
               for p in range(8) for d in range(8, 24) if rng.random() < 0.5}
    base = decide(req, ws, links(entries))
    for _ in range(20):
        rng.shuffle(ws)
        items = list(entries.items())
        rng.shuffle(items)
        again = decide(req, ws, links(dict(items)))
        assert again == base
        assert again.to_log() == base.to_log()


def test_log_line_and_metrics_are_plain():
    req = request(4096, request_id="abc")
    dec = decide(req, [prefill(1), decode(10), decode(11, layout_key="other")], links())
    line = dec.to_log()
    assert "\n" not in line and line.startswith("route req=abc disagg prefill=1 decode=10")
    assert "reason=disagg_cheaper" in line and "runner_up=" in line and "xfer=" in line
    m = dec.metrics()
    assert all(type(v) is float and math.isfinite(v) for v in m.values())
    assert m["disaggregated"] == 1.0 and m["estimate_s"] == dec.chosen.terms.total_s
    assert m["runner_up_margin_s"] == dec.margin_s and m["excluded_layout_mismatch"] == 1.0


def test_duplicate_worker_ids_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        decide(request(), [prefill(1), decode(1)], links())


def test_invalid_inputs_rejected_at_construction():
    with pytest.raises(ValueError):
        LinkInfo(gb_per_s=0.0)
    with pytest.raises(ValueError):
        request(-1)
    with pytest.raises(ValueError):
        prefill(1, queue_tokens=-5)
    with pytest.raises(ValueError):
        LinkTable({}, default=LinkInfo(1.0, healthy=False))


def test_pruned_decide_matches_unpruned_reference_at_64_workers():
    rng = random.Random(11)
    for trial in range(30):
        req = request(rng.randint(300, 20_000))
        ws = [prefill(i, thr=rng.uniform(5e3, 4e4), queue_tokens=rng.randint(0, 30_000),
                      overlap_blocks=rng.randint(0, 300) if rng.random() < 0.3 else 0,
                      overlap_tier=rng.choice(list(Tier)), node=f"n{i // 8}") for i in range(16)]
        ws += [decode(i, thr=rng.uniform(2e3, 1e4), admission_delay_s=rng.uniform(0, 0.2),
                      free_blocks=rng.randint(0, 3000), node=f"n{i // 8}") for i in range(16, 64)]
        entries = {(p, d): LinkInfo(rng.uniform(0.5, 60.0), rng.uniform(0, 1e-4), rng.random() > 0.05)
                   for p in range(16) for d in range(16, 64) if rng.random() < 0.2}
        lt = LinkTable(entries, default=LinkInfo(20.0, 2e-5), same_node=LinkInfo(150.0, 5e-6))
        dec = decide(req, ws, lt)
        ref = estimate_all(req, ws, lt)
        assert dec.chosen == ref[0], trial
        assert dec.runner_up == ref[1], trial
        assert dec.pruned > 0 or trial >= 0


def test_work_weight_prefers_reusing_a_cached_prefix_when_ttfts_are_close():
    """Issue 14.5: a worker holding the prompt's prefix but busy for a moment against an idle one without
    it: by TTFT alone the idle worker wins by a hair and computes the whole prefix again (a second copy in a
    second cache, and compute later requests wait behind); work_weight charges that compute."""
    from dynamo_ext.routing import RequestShape, RoutingConfig, WorkerSnapshot, decide
    from dynamo_ext.routing.links import LinkTable

    req = RequestShape(prompt_tokens=1024, block_size=16, kv_bytes_per_token=4096)
    busy = WorkerSnapshot(worker_id=1, role="agg", prefill_tokens_per_s=10_000.0, overlap_blocks=60,
                          admission_delay_s=0.1, free_blocks=1000)
    idle = WorkerSnapshot(worker_id=2, role="agg", prefill_tokens_per_s=10_000.0, free_blocks=1000)
    links = LinkTable({})
    assert decide(req, [busy, idle], links).chosen.decode_id == 2  # 0.1024 s vs 0.1064 s
    dec = decide(req, [busy, idle], links, config=RoutingConfig(work_weight=1.0))
    assert dec.chosen.decode_id == 1 and dec.chosen.terms.work_s == pytest.approx(64 / 10_000)
    assert dec.chosen.terms.ttft_s == pytest.approx(0.1 + 64 / 10_000)


def test_shared_compute_queue_sends_the_prefill_to_a_worker_with_compute_of_its_own():
    """Two prefill workers, equally idle themselves; p1 shares its GPU with a worker that has 8,000 tokens
    queued (shared_queue_tokens), p2 computes alone: p2 wins, and the reported queue wait counts the shared
    queue at p1's throughput."""
    req = request(2048)
    p1 = prefill(1, thr=10_000, shared_queue_tokens=8_000)
    p2 = prefill(2, thr=8_000)
    d = decode(7)
    cfg = RoutingConfig(allow_local_prefill=False)
    dec = decide(req, [p1, p2, d], links(), config=cfg)
    assert dec.chosen.prefill_id == 2, dec.to_log()
    assert dec.runner_up is not None and dec.runner_up.prefill_id == 1
    assert dec.runner_up.terms.queue_wait_s == pytest.approx(8_000 / 10_000)
    # without the shared queue p1 is the faster one
    dec0 = decide(req, [prefill(1, thr=10_000), p2, d], links(), config=cfg)
    assert dec0.chosen.prefill_id == 1
    with pytest.raises(ValueError, match="shared_queue_tokens"):
        prefill(3, shared_queue_tokens=-1)
