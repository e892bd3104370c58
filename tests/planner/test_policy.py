"""Propose policy over synthetic signal series (pure, no Dynamo): hysteresis, cool-down, idle, cold start."""

from __future__ import annotations

import random

import pytest

from planner.policy import PolicyConfig, ScalingPolicy
from planner.signals import Signals, summarize_fpm

TICK = 10.0


def run(policy: ScalingPolicy, series, ready_follows: bool = True, t0: float = 0.0):
    """Feed (t, fields) samples; the fake cluster lands every decision before the next tick."""
    p = policy.state.prefill.target
    d = policy.state.decode.target
    out = []
    t = t0
    for fields in series:
        if callable(fields):  # a load model: signals depend on the replicas now running
            fields = fields(p, d)
        fields = dict(fields)
        rp = fields.pop("ready_prefill", p if p is not None else 1)
        rd = fields.pop("ready_decode", d if d is not None else 1)
        prop = policy.step(Signals(t=t, ready_prefill=rp, ready_decode=rd, **fields))
        out.append(prop)
        if ready_follows:
            p, d = prop.prefill, prop.decode
        t += TICK
    return out


def warm_policy(**kw) -> ScalingPolicy:
    cfg = PolicyConfig(**{"warmup_s": 0.0, "startup_hold_s": 0.0, "up_cooldown_s": 30.0, "down_cooldown_s": 120.0, **kw})
    return ScalingPolicy(cfg)


def busy(**kw):
    base = dict(requests=50.0, ttft_s=0.2, itl_s=0.02, kv_usage=0.5, transfer_share=0.1)
    base.update(kw)
    return base


def test_step_load_scales_decode_up_after_hysteresis():
    pol = warm_policy()
    series = [busy(ready_prefill=1, ready_decode=2)] + [busy() for _ in range(3)] + [busy(kv_usage=0.95) for _ in range(4)]
    props = run(pol, series)
    decodes = [p.decode for p in props]
    # tick 4 is the first high-KV tick; up_ticks=2 -> change on tick 5, not before
    assert decodes[:5] == [2, 2, 2, 2, 2]
    assert decodes[5] == 3 and props[5].changed and "KV usage" in props[5].reason
    assert all(p.prefill == 1 for p in props)


def test_prefill_queue_step_scales_prefill():
    pol = warm_policy()
    series = [busy(ready_prefill=1, ready_decode=2)] + [busy(prefill_queue=9.0) for _ in range(3)]
    props = run(pol, series)
    assert props[-2].prefill > 1 and "prefill queue" in props[-2].reason


def test_ttft_over_sla_blamed_on_transfer_scales_decode_not_prefill():
    pol = warm_policy()
    slow = [busy(ttft_s=1.0, transfer_share=0.7) for _ in range(3)]
    props = run(pol, [busy(ready_prefill=1, ready_decode=2)] + slow)
    assert props[-1].prefill == 1 and props[-1].decode > 2 and "KV transfer" in props[-2].reason
    pol2 = warm_policy()
    props2 = run(pol2, [busy(ready_prefill=1, ready_decode=2)] + [busy(ttft_s=1.0, transfer_share=0.1) for _ in range(3)])
    assert props2[-1].prefill > 1 and props2[-1].decode == 2


def test_no_oscillation_on_noisy_signal_around_threshold():
    rng = random.Random(7)
    pol = warm_policy()
    series = [busy(ready_prefill=1, ready_decode=2)]
    # KV demand of 1.6 workers' worth: at 2 decode workers usage is noisy around the 0.8 threshold
    series += [lambda p, d: busy(kv_usage=min(1.0, 1.6 / d + rng.uniform(-0.08, 0.08))) for _ in range(200)]
    props = run(pol, series)
    decodes = [p.decode for p in props]
    changes = [(a, b) for a, b in zip(decodes, decodes[1:]) if a != b]
    ups = [c for c in changes if c[1] > c[0]]
    downs = [c for c in changes if c[1] < c[0]]
    assert not (ups and downs), changes  # never both directions: no 2<->1 style flapping
    assert len(changes) <= 1


def test_two_to_one_oscillation_prevented_by_projection():
    # At 2 decode workers with KV 0.45 each, one worker would sit at 0.9 > kv_high: never shrink.
    pol = warm_policy(min_decode=1)
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, kv_usage=0.35)] + [busy(kv_usage=0.35) for _ in range(40)])
    assert all(p.decode == 2 for p in props)


def test_cooldown_respected_between_scale_ups():
    pol = warm_policy(up_ticks=1, up_cooldown_s=60.0)
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, kv_usage=0.9)] + [busy(kv_usage=0.9) for _ in range(12)])
    change_ticks = [i for i, (a, b) in enumerate(zip(props, props[1:]), start=1) if a.decode != b.decode]
    change_ticks = [0] + change_ticks if props[0].changed else change_ticks
    gaps = [b - a for a, b in zip(change_ticks, change_ticks[1:])]
    assert gaps and all(g * TICK >= 60.0 for g in gaps), (change_ticks, [p.reason for p in props])
    assert any("cooling down" in p.reason for p in props)


def test_scale_down_to_min_at_zero_traffic():
    pol = warm_policy(down_cooldown_s=0.0)
    series = [busy(ready_prefill=3, ready_decode=8)]
    # zero traffic: no requests, empty queues, and latency metrics absent (Prometheus has no samples)
    series += [dict(requests=0.0) for _ in range(5)]
    props = run(pol, series)
    assert (props[-1].prefill, props[-1].decode) == (1, 1)
    assert "zero traffic" in props[3].reason and props[3].changed
    # also when even the request counter is missing (no metrics at all)
    pol2 = warm_policy(down_cooldown_s=0.0)
    props2 = run(pol2, [busy(ready_prefill=2, ready_decode=4)] + [dict() for _ in range(4)])
    assert (props2[-1].prefill, props2[-1].decode) == (1, 1)


def test_cold_start_samples_ignored():
    # Fresh policy (planner just started) sees huge ITL/KV from cold workers: no scale-up during warm-up.
    pol = ScalingPolicy(PolicyConfig(warmup_s=60.0, up_ticks=2))
    cold = [busy(ready_prefill=1, ready_decode=2, itl_s=0.5, kv_usage=0.99)] + [busy(itl_s=0.5, kv_usage=0.99) for _ in range(4)]
    props = run(pol, cold)  # t = 0..40 s < 60 s warm-up
    assert all(p.decode == 2 for p in props)
    # a new decode worker restarts the warm-up for decode samples
    pol = warm_policy()
    pol.config = PolicyConfig(warmup_s=60.0, up_cooldown_s=0.0, up_ticks=1)
    pol.state.started_at = -1000.0
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, kv_usage=0.9)], t0=0.0)
    assert props[0].decode == 3
    props = run(pol, [busy(ready_decode=3, itl_s=0.5, kv_usage=0.99) for _ in range(5)], t0=10.0)
    assert all(p.decode == 3 for p in props), [p.reason for p in props]
    # but too few requests in a window is ignored even when warm
    pol = warm_policy(up_ticks=1, min_requests=5)
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, requests=2.0, itl_s=0.5, ttft_s=5.0)] * 1 + [busy(requests=2.0, itl_s=0.5, ttft_s=5.0) for _ in range(3)])
    assert all((p.prefill, p.decode) == (1, 2) for p in props)


def test_holds_while_previous_decision_not_landed():
    pol = warm_policy(up_ticks=1, up_cooldown_s=0.0)
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, kv_usage=0.9)] + [busy(kv_usage=0.9, ready_decode=2) for _ in range(3)], ready_follows=False)
    assert props[0].decode == 3
    assert all(p.decode == 3 and "not landed" in p.reason for p in props[1:])
    props = run(pol, [busy(kv_usage=0.9, ready_prefill=1, ready_decode=2, scaling_in_progress=False)], t0=400.0, ready_follows=False)
    assert props[0].decode == 3  # landing timeout: re-synced to 2, then scaled up again


def test_bounds_and_config_validation():
    pol = warm_policy(max_decode=3, up_ticks=1, up_cooldown_s=0.0)
    props = run(pol, [busy(ready_prefill=1, ready_decode=2, kv_usage=0.99)] + [busy(kv_usage=0.99) for _ in range(5)])
    assert max(p.decode for p in props) == 3
    with pytest.raises(ValueError):
        PolicyConfig(kv_low=0.9, kv_high=0.8)
    with pytest.raises(ValueError):
        PolicyConfig(min_decode=5, max_decode=2)


class _Q:
    def __init__(self, **kw):
        self.__dict__.update(dict(num_prefill_requests=0, num_decode_requests=0, sum_decode_kv_tokens=0), **kw)


class _M:
    def __init__(self, queued=None, scheduled=None):
        self.queued_requests = queued or _Q()
        self.scheduled_requests = scheduled or _Q()


def test_summarize_fpm():
    s = summarize_fpm(
        [_M(_Q(num_prefill_requests=3)), None, _M(_Q(num_prefill_requests=2))],
        [_M(_Q(num_decode_requests=1), _Q(sum_decode_kv_tokens=800)), _M(scheduled=_Q(sum_decode_kv_tokens=200))],
        kv_capacity_tokens=1000,
    )
    assert (s.prefill_queue, s.decode_queue, s.engines) == (5.0, 1.0, 4)
    assert s.kv_usage == pytest.approx(0.8)
    assert summarize_fpm([], []).kv_usage is None


def test_no_shrink_under_traffic_without_evidence():
    # Traffic flows, queues are empty, but no latency/KV metrics: hold (an empty queue may mean "just keeping up").
    pol = warm_policy(down_cooldown_s=0.0)
    props = run(pol, [dict(ready_prefill=3, ready_decode=6, requests=40.0)] + [dict(requests=40.0) for _ in range(10)])
    assert all((p.prefill, p.decode) == (3, 6) for p in props)


def test_scale_down_one_step_at_a_time_under_light_load():
    pol = warm_policy(down_cooldown_s=60.0)
    props = run(pol, [busy(ready_prefill=3, ready_decode=6, kv_usage=0.05, ttft_s=0.05, itl_s=0.005)]
                + [busy(kv_usage=0.05, ttft_s=0.05, itl_s=0.005) for _ in range(40)])
    decodes = [p.decode for p in props]
    steps = [a - b for a, b in zip(decodes, decodes[1:]) if a != b]
    assert steps and all(s == 1 for s in steps) and min(decodes) >= 1


def test_startup_hold_follows_registering_workers_and_decides_nothing():
    # The launcher started 2 prefill + 6 decode; they register over the first ticks (ready 0 -> 8).
    pol = ScalingPolicy(PolicyConfig(startup_hold_s=30.0, warmup_s=0.0, down_cooldown_s=0.0))
    ready = [(0, 0), (1, 2), (2, 5), (2, 6)]
    props = [pol.step(Signals(t=10.0 * i, ready_prefill=p, ready_decode=d, requests=0.0)) for i, (p, d) in enumerate(ready)]
    assert all(p.no_decision and not p.changed for p in props[:3]) and "start-up hold" in props[0].reason
    # after the hold the targets are what registered, not the (0, 0) seen at the start
    assert (props[3].prefill, props[3].decode) == (2, 6) and not props[3].no_decision


def test_count_moved_by_someone_else_becomes_the_target():
    pol = warm_policy(up_ticks=1, up_cooldown_s=0.0)
    run(pol, [busy(ready_prefill=1, ready_decode=2)])
    # CONSTRAIN raised decode to 4 (ratio), or an operator did: the policy adopts it instead of proposing 2 again
    props = run(pol, [busy(ready_prefill=2, ready_decode=4)], t0=10.0, ready_follows=False)
    assert (props[0].prefill, props[0].decode) == (2, 4) and "not landed" not in props[0].reason
    # a crashed decode worker: the count drops and the policy starts from 3
    props = run(pol, [busy(ready_prefill=2, ready_decode=3)], t0=20.0, ready_follows=False)
    assert props[0].decode == 3


def test_decision_clamped_downstream_does_not_freeze_the_policy():
    pol = warm_policy(down_cooldown_s=0.0, down_ticks=1)
    light = dict(kv_usage=0.05, itl_s=0.005, ttft_s=0.05, requests=50.0)
    props = run(pol, [dict(ready_prefill=2, ready_decode=4, expected_prefill=2, expected_decode=4, **light)], ready_follows=False)
    assert props[0].decode == 3  # propose 4 -> 3 ...
    # ... CONSTRAIN kept decode at 4 (ratio 2:1): desired stays 4, nothing is scaling
    props = run(pol, [dict(ready_prefill=2, ready_decode=4, expected_prefill=2, expected_decode=4, **light)], t0=10.0, ready_follows=False)
    assert "not landed" not in props[0].reason
