"""routing.throughput: priors, EWMA estimators, staleness, the serial service clock, queued uncached
tokens and the local-prefill interference charge; and that measured values change ``decide``."""

from __future__ import annotations

import pytest
from routing_factories import decode, links, prefill, request

from dynamo_ext.routing import OptionKind, RoutingConfig, decide
from dynamo_ext.routing.throughput import Priors, RateEwma, StepEwma, WorkerMeter


def test_priors_scale_with_layers():
    p2, p16 = Priors.for_layers(2), Priors.for_layers(16)
    assert p2.prefill_tokens_per_s == 20_000.0 and p2.decode_step_s == pytest.approx(0.002)
    assert p16.prefill_tokens_per_s == pytest.approx(2_500.0)  # 8x slower prefill
    assert p16.decode_step_s == pytest.approx(0.016)
    with pytest.raises(ValueError, match="num_layers"):
        Priors.for_layers(0)
    with pytest.raises(ValueError, match="local_prefill_factor"):
        Priors(local_prefill_factor=0.0)


def test_rate_ewma_prior_then_ratio_of_means():
    e = RateEwma(1000.0, alpha=0.5)
    assert e.value(0.0) == 1000.0 and e.measured() is None
    e.observe(100, 1.0, now=1.0)  # 100 tok/s
    assert e.value(1.0) == pytest.approx(100.0)
    e.observe(1000, 1.0, now=2.0)  # tokens EWMA 550, seconds EWMA 1.0
    assert e.value(2.0) == pytest.approx(550.0)
    with pytest.raises(ValueError, match="seconds"):
        e.observe(10, 0.0, now=3.0)
    with pytest.raises(ValueError, match="tokens"):
        e.observe(float("nan"), 1.0, now=3.0)


def test_staleness_drifts_back_to_the_prior():
    e = RateEwma(1000.0, alpha=1.0, stale_after_s=10.0, half_life_s=5.0)
    e.observe(100, 1.0, now=0.0)
    assert e.value(10.0) == pytest.approx(100.0)  # fresh
    # 5 s past stale: half measured, half prior, blended in seconds per token
    assert e.value(15.0) == pytest.approx(1.0 / (0.5 / 100 + 0.5 / 1000))
    assert e.value(1e6) == pytest.approx(1000.0)
    s = StepEwma(0.01, alpha=1.0, stale_after_s=0.0, half_life_s=1.0)
    s.observe(0.05, now=0.0)
    assert s.value(0.0) == pytest.approx(0.05) and s.value(1.0) == pytest.approx(0.03)


def test_meter_prefill_service_excludes_queueing():
    m = WorkerMeter(Priors(prefill_tokens_per_s=1e6), alpha=1.0)
    # two requests planned on worker 1 at t=0; the worker serves them one after the other
    m.planned("a", 1, 1000, local=False, now=0.0)
    m.planned("b", 1, 3000, local=False, now=0.0)
    assert m.queued_tokens(1) == 4000
    assert m.prefill_done("a", now=1.0) == pytest.approx(1.0)
    assert m.queued_tokens(1) == 3000
    # b waited for a: its service is 1.0 -> 4.0, not 0 -> 4.0
    assert m.prefill_done("b", now=4.0) == pytest.approx(3.0)
    assert m.prefill_tokens_per_s(1, now=4.0) == pytest.approx(1000.0)
    assert m.queued_tokens(1) == 0 and m.prefill_samples == 2
    # a failed prefill call measures nothing but frees the queue
    m.planned("c", 1, 500, local=False, now=5.0)
    assert m.prefill_done("c", now=5.1, ok=False) is None
    assert m.queued_tokens(1) == 0 and m.prefill_samples == 2
    # an unknown or repeated report is ignored
    assert m.prefill_done("c", now=6.0) is None and m.prefill_done("zzz", now=6.0) is None


def test_meter_local_prefill_steps_and_running():
    m = WorkerMeter(Priors(prefill_tokens_per_s=1000.0, decode_step_s=0.5, local_prefill_factor=0.5), alpha=1.0,
                    interference_weight=0.5)
    assert m.local_prefill_tokens_per_s(7, now=0.0) == pytest.approx(500.0)  # prior * factor
    m.planned("x", 7, 200, local=True, now=0.0)
    assert m.queued_tokens(7) == 200
    m.decode_chunk("x", 7, now=2.0, n_tokens=1)  # first token after 2 s: 100 tok/s local
    assert m.queued_tokens(7) == 0 and m.running(7) == 1 and m.local_samples == 1
    assert m.local_prefill_tokens_per_s(7, now=2.0, with_interference=False) == pytest.approx(100.0)
    # one running stream: charged 1 + 0.5 * 1
    assert m.local_prefill_tokens_per_s(7, now=2.0) == pytest.approx(100.0 / 1.5)
    assert m.decode_step_s(7, now=2.0) == 0.5  # prior until a gap is seen
    m.decode_chunk("x", 7, now=2.2, n_tokens=2)  # two tokens in 0.2 s
    assert m.decode_step_s(7, now=2.2) == pytest.approx(0.1) and m.step_samples == 1
    m.decode_chunk("x", 7, now=100.0, n_tokens=1)  # a gap above max_step_sample_s is not a step
    assert m.step_samples == 1
    m.decode_done("x", 7)
    assert m.running(7) == 0 and m.open_requests == 0


def test_meter_retry_moves_the_running_stream():
    m = WorkerMeter()
    m.planned("r", 1, 100, local=False, now=0.0)
    m.prefill_done("r", now=0.1)
    m.decode_chunk("r", 7, now=0.2, n_tokens=1)
    assert m.running(7) == 1
    m.decode_chunk("r", 8, now=0.3, n_tokens=1)  # retried on another decode worker
    assert m.running(7) == 0 and m.running(8) == 1
    m.forget("r")
    assert m.running(8) == 0


def test_meter_bounds_open_requests():
    m = WorkerMeter(max_open=2)
    for i, rid in enumerate("abc"):
        m.planned(rid, 1, 10, local=False, now=float(i))
    assert m.open_requests == 2 and m.queued_tokens(1) == 20  # "a" was dropped with its tokens
    assert m.prefill_done("a", now=5.0) is None
    assert m.summary(5.0)["1"]["queued_tokens"] == 20.0


def test_measured_throughput_changes_the_decision():
    """Shared prefix, 16-layer model. Decode worker 7 holds 112 of the prompt's 128 blocks. With the old
    2-layer constants its local prefill (16 blocks) looks cheapest. With the 16-layer prior and the charge
    for the 8 streams a local prefill would stall on it, the idle prefill worker wins although it
    computes the whole prompt."""
    req = request(2048)
    m = WorkerMeter(Priors.for_layers(16), alpha=1.0, interference_weight=0.5)
    for i in range(8):  # 8 streams decoding on worker 7
        m.planned(f"r{i}", 1, 100, local=False, now=0.0)
        m.prefill_done(f"r{i}", now=0.04 * (i + 1))  # served one after the other: 0.04 s each
        m.decode_chunk(f"r{i}", 7, now=1.0, n_tokens=1)
    assert m.running(7) == 8
    cfg = RoutingConfig(local_prefill_max_tokens=0)
    naive = decide(req, [prefill(1, thr=20_000), decode(7, thr=10_000, overlap_blocks=112)], links(), config=cfg)
    snaps = [prefill(1, thr=m.prefill_tokens_per_s(1, now=1.0)),
             decode(7, thr=m.local_prefill_tokens_per_s(7, now=1.0), overlap_blocks=112,
                    admission_delay_s=m.decode_step_s(7, now=1.0) + m.backlog_s(7, now=1.0))]
    measured = decide(req, snaps, links(), config=cfg)
    assert naive.chosen.kind is OptionKind.LOCAL  # the 2-layer constants' choice
    assert measured.chosen.kind is OptionKind.DISAGG
    # 100 tokens in 0.04 s per prefill: 2,500 tok/s measured on prefill worker 1
    assert m.prefill_samples == 8 and measured.chosen.terms.prefill_s == pytest.approx(2048 / 2500)
    # local on 7: 256 tokens at the 16-layer local prior 1,250 tok/s, divided by 1 + 0.5 * 8
    assert measured.runner_up.terms.prefill_s == pytest.approx(256 / (1250 / 5))


def test_local_prior_follows_the_measured_prefill_workers():
    """A decode worker never chosen for a local prefill has no samples of its own: its prior follows what
    the prefill workers measure (x local_prefill_factor), not the fixed prior."""
    m = WorkerMeter(Priors.for_layers(16), alpha=1.0)  # fixed local prior: 2,500 x 0.5
    assert m.local_prefill_tokens_per_s(7, now=0.0) == pytest.approx(1250.0)
    m.planned("a", 1, 9000, local=False, now=0.0)
    m.prefill_done("a", now=1.0)  # prefill worker 1: 9,000 tok/s
    m.planned("b", 2, 5000, local=False, now=0.0)
    m.prefill_done("b", now=1.0)  # prefill worker 2: 5,000 tok/s
    assert m.fleet_prefill_tokens_per_s(now=1.0) == pytest.approx(7000.0)
    assert m.local_prefill_tokens_per_s(7, now=1.0) == pytest.approx(3500.0)
    m.planned("c", 7, 1000, local=True, now=1.0)
    m.decode_chunk("c", 7, now=2.0, n_tokens=1)  # its own sample wins once it has one
    assert m.local_prefill_tokens_per_s(7, now=2.0) == pytest.approx(1000.0 / 1.5)  # 1 running stream


def test_agg_workers_never_chosen_take_the_measured_workers_rate():
    """Issue 14.5: in an aggregated graph (no prefill workers) every request went to one of 3 agg workers:
    the one measured at ~12,000 tok/s beat the others' fixed prior (2,500 x 0.5) even with 5 streams
    running, so they were never chosen and never measured. A worker without samples now takes the fastest
    measured local rate of the others."""
    m = WorkerMeter(Priors.for_layers(16), alpha=1.0)
    assert m.local_prefill_tokens_per_s(8, now=0.0) == pytest.approx(1250.0)  # nothing measured yet
    m.planned("a", 7, 12000, local=True, now=0.0)
    m.decode_chunk("a", 7, now=1.0, n_tokens=1)  # agg worker 7: 12,000 tok/s, one stream running
    assert m.local_prefill_tokens_per_s(8, now=1.0) == pytest.approx(12000.0)
    assert m.local_prefill_tokens_per_s(8, now=1.0) > m.local_prefill_tokens_per_s(7, now=1.0)  # 7 is busy
    assert m.local_prefill_tokens_per_s(7, now=1.0, with_interference=False) == pytest.approx(12000.0)
    m.planned("b", 9, 6000, local=True, now=1.0)
    m.decode_chunk("b", 9, now=2.0, n_tokens=1)  # agg worker 9: 6,000 tok/s
    assert m.local_prefill_tokens_per_s(8, now=2.0) == pytest.approx(12000.0)  # the fastest, not the mean


def test_backlog_is_the_local_work_planned_on_a_decode_worker():
    m = WorkerMeter(Priors(prefill_tokens_per_s=2000.0, local_prefill_factor=0.5))
    assert m.backlog_s(7, now=0.0) == 0.0
    m.planned("a", 7, 500, local=True, now=0.0)
    m.planned("b", 7, 1500, local=True, now=0.0)
    assert m.backlog_s(7, now=0.0) == pytest.approx(2000 / 1000)
    m.planned("c", 1, 999, local=False, now=0.0)  # work on another worker is not 7's backlog
    assert m.backlog_s(7, now=0.0) == pytest.approx(2.0) and m.backlog_s(1, now=0.0) == pytest.approx(999 / 1000)


def test_hand_off_moves_only_the_blocks_the_decode_worker_lacks():
    """The decode worker pulls only what its prefix cache lacks (at least the last block); decide's
    KV bytes and transfer term are for those blocks, so a decode worker holding the prefix is the
    cheaper hand-off target."""
    from dynamo_ext.routing import LinkInfo, Tier, estimate_all
    from dynamo_ext.routing.ttft_model import pulled_blocks

    req = request(4096)  # 256 blocks of 16
    per_block = 16 * 100_000
    lt = links({(1, 7): LinkInfo(1.0, 0.0), (1, 8): LinkInfo(1.0, 0.0)})
    p = prefill(1)
    d_cold, d_warm = decode(7), decode(8, overlap_blocks=200)
    assert pulled_blocks(d_cold, req) == 256 and pulled_blocks(d_warm, req) == 56
    assert pulled_blocks(decode(9, overlap_blocks=999), req) == 1  # never fewer than one block
    assert pulled_blocks(decode(9, overlap_blocks=200, overlap_tier=Tier.HOST), req) == 256  # not on device
    dec = decide(req, [p, d_cold, d_warm], lt, config=RoutingConfig(allow_local_prefill=False))
    assert (dec.chosen.prefill_id, dec.chosen.decode_id) == (1, 8)
    assert dec.chosen.kv_bytes == 56 * per_block
    assert dec.chosen.terms.transfer_s == pytest.approx(56 * per_block / 1e9)
    assert dec.runner_up.kv_bytes == 256 * per_block
    ref = estimate_all(req, [p, d_cold, d_warm], lt, config=RoutingConfig(allow_local_prefill=False))
    assert [o.kv_bytes for o in ref] == [56 * per_block, 256 * per_block]
