"""The router's WorkerSnapshots come from measured throughput (routing.throughput.WorkerMeter), not constants:
serving.RouterCore.snapshots on a router core without processes (real WorkerMeter, real decide)."""

from __future__ import annotations

import pytest

from dynamo_ext.routing import LinkInfo, LinkTable, OptionKind, RequestShape, RoutingConfig, decide, estimate_all
from dynamo_ext.routing.throughput import Priors, WorkerMeter
from dynamo_ext.serving.router import DECODE_STEP_S, PREFILL_TOKENS_PER_S, RouterCore, RouterSettings


class _NoPlane:
    """No worker records: snapshots use the defaults for layout and node."""

    def info(self, role, worker):
        return None


def _router(layers: int) -> RouterCore:
    r = RouterCore(RouterSettings(num_layers=layers, decode_num_blocks=1024), _NoPlane(), metrics=None)
    r.meter = WorkerMeter(Priors.for_layers(layers, ref_prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                            ref_decode_step_s=DECODE_STEP_S), alpha=1.0)
    return r


def _snaps(r: RouterCore, scores: dict[int, int], now: float, decodes: tuple[int, ...] = (7,)):
    return r.snapshots(scores, [1], list(decodes), now)


def test_snapshots_start_from_layer_scaled_priors():
    p, d = _snaps(_router(16), {}, now=0.0)
    assert p.prefill_tokens_per_s == pytest.approx(PREFILL_TOKENS_PER_S / 8)
    assert d.prefill_tokens_per_s == pytest.approx(PREFILL_TOKENS_PER_S / 8 / 2)  # local factor 0.5
    assert d.admission_delay_s == pytest.approx(DECODE_STEP_S * 8)


def test_snapshots_follow_measurements_and_queued_uncached_tokens():
    r = _router(2)
    r.meter.planned("a", 1, 3000, local=False, now=0.0)
    r.meter.planned("b", 7, 500, local=True, now=0.0)
    p, d = _snaps(r, {1: 3, 7: 5}, now=0.0)
    assert p.queue_tokens == 3000  # uncached tokens, not prompt lengths
    # d's local backlog is in its admission delay (d runs it before any new request): 500 tok at the prior
    assert d.queue_tokens == 0 and d.admission_delay_s == pytest.approx(0.002 + 500 / (PREFILL_TOKENS_PER_S / 2))
    assert (p.overlap_blocks, d.overlap_blocks) == (3, 5)
    r.meter.prefill_done("a", now=1.5)  # 2,000 tok/s measured on prefill worker 1
    r.meter.decode_chunk("b", 7, now=1.0, n_tokens=1)  # local prefill: 500 tok/s; one stream running on 7
    r.meter.decode_chunk("b", 7, now=1.05, n_tokens=1)  # one decode step: 50 ms
    p, d = _snaps(r, {}, now=1.05)
    assert p.prefill_tokens_per_s == pytest.approx(2000.0) and p.queue_tokens == 0
    assert d.prefill_tokens_per_s == pytest.approx(500.0 / 1.5)  # charged for the stalled stream
    assert d.admission_delay_s == pytest.approx(0.05) and d.queue_tokens == 0


def test_shared_prefix_backlog_on_the_decode_worker_sends_the_request_to_the_prefill_worker():
    """Decode worker 7 holds most of the prefix; 8 holds nothing. Idle: local prefill on 7 (only the tail
    is computed). With local prefills queued on 7: hand-off from the idle prefill worker to the idle
    decode worker 8, not to 7 (its backlog delays every new request on it)."""
    r = _router(16)
    req = RequestShape(prompt_tokens=2048, block_size=16, kv_bytes_per_token=4096)
    links = LinkTable({}, default=LinkInfo(3.0, 0.002))
    cfg = RoutingConfig(local_prefill_max_tokens=0)
    idle = decide(req, _snaps(r, {7: 112}, now=0.0, decodes=(7, 8)), links, config=cfg)
    assert (idle.chosen.kind, idle.chosen.decode_id) == (OptionKind.LOCAL, 7)  # the cached prefix wins
    r.meter.planned("x", 7, 2048, local=True, now=0.0)
    r.meter.planned("y", 7, 2048, local=True, now=0.0)
    snaps = _snaps(r, {7: 112}, now=0.0, decodes=(7, 8))
    busy = decide(req, snaps, links, config=cfg)
    assert busy.chosen.kind is OptionKind.DISAGG and (busy.chosen.prefill_id, busy.chosen.decode_id) == (1, 8)
    backlog = 4096 / (PREFILL_TOKENS_PER_S / 8 / 2)  # 3.3 s at the 16-layer local prior
    opts = {o.label(): o for o in estimate_all(req, snaps, links, config=cfg)}
    assert opts["local@7"].terms.admission_s == pytest.approx(DECODE_STEP_S * 8 + backlog)
    assert opts["1->8"].terms.admission_s == pytest.approx(DECODE_STEP_S * 8)
    assert opts["1->7"].kv_bytes == 16 * 4096 * (128 - 112) < opts["1->8"].kv_bytes  # 7 pulls only the tail
    assert opts["1->7"].terms.total_s > opts["1->8"].terms.total_s
