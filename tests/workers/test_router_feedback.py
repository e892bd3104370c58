"""Router link feedback (serving/router.py ``LinkFeedback``): a decode chunk's ``kv_transfer`` report is taken
out of the stream and fed to ``routing.LinkEstimator`` for the chosen (prefill, decode) pair; the measured
GB/s replaces the topology's expectation; a failed pull marks the pair unhealthy, ``decide`` avoids it, and
after the back-off the pair is offered once more (the probe). Pure: no processes, times are arguments."""

from __future__ import annotations

import pytest

from dynamo_ext.routing import LinkInfo, LinkTable, OptionKind, RequestShape, RoutingConfig, WorkerSnapshot, decide
from dynamo_ext.serving.router import LinkFeedback

EXPECTED = LinkInfo(gb_per_s=10.0, latency_s=0.0)


def test_transfer_report_is_popped_and_measured():
    fb = LinkFeedback()
    chunk = {"token_ids": [7], "kv_transfer": {"bytes": 4 << 20, "seconds": 0.004}}
    out = fb.observe(chunk, 1, 2, now=0.0)
    assert out == {"token_ids": [7]} and "kv_transfer" in chunk  # the caller's chunk is not changed
    link = fb.link(1, 2, EXPECTED, now=0.0)
    assert link.healthy and link.gb_per_s == pytest.approx((4 << 20) / 0.004 / 1e9)
    assert fb.link(1, 3, EXPECTED, now=0.0) == EXPECTED  # never measured: the expectation
    # EWMA: a slower second sample pulls the estimate down, not all the way
    fb.observe({"token_ids": [], "kv_transfer": {"bytes": 4 << 20, "seconds": 0.04}}, 1, 2, now=1.0)
    g = fb.link(1, 2, EXPECTED, now=1.0).gb_per_s
    assert (4 << 20) / 0.04 / 1e9 < g < (4 << 20) / 0.004 / 1e9
    assert fb.observed == 2
    # no handle (local prefill) or a malformed report: dropped from the chunk, nothing recorded
    assert fb.observe({"token_ids": [1], "kv_transfer": {"bytes": 1}}, 1, 2, now=2.0) == {"token_ids": [1]}
    assert fb.observe({"token_ids": [1], "kv_transfer": {"bytes": 1, "seconds": 1}}, None, 2, now=2.0) == {
        "token_ids": [1]}
    assert fb.observed == 2


def test_failed_pull_backs_off_then_probes():
    fb = LinkFeedback()
    fb.observe({"token_ids": [], "kv_transfer": {"error": "TransferTimeout"}}, 1, 2, now=100.0)
    assert not fb.link(1, 2, EXPECTED, now=100.5).healthy
    assert fb.link(1, 2, EXPECTED, now=101.0).healthy  # 1 s back-off passed: offered as the probe
    fb.observe({"token_ids": [], "kv_transfer": {"error": "PeerUnreachable"}}, 1, 2, now=101.0)
    assert not fb.link(1, 2, EXPECTED, now=102.5).healthy  # second failure: 2 s
    assert fb.link(1, 2, EXPECTED, now=103.0).healthy
    fb.observe({"token_ids": [], "kv_transfer": {"bytes": 2 << 20, "seconds": 0.001}}, 1, 2, now=103.0)
    assert fb.link(1, 2, EXPECTED, now=103.0).healthy and fb.est.failures(1, 2) == 0
    assert fb.failed == 2


def _decide(fb: LinkFeedback, now: float):
    snaps = [WorkerSnapshot(worker_id=p, role="prefill", prefill_tokens_per_s=20_000.0, layout_key="m",
                            free_blocks=1024, node="n") for p in (1, 2)]
    snaps += [WorkerSnapshot(worker_id=9, role="decode", prefill_tokens_per_s=100.0, layout_key="m", free_blocks=1024,
                             node="n")]
    links = LinkTable({(p, 9): fb.link(p, 9, EXPECTED, now) for p in (1, 2)}, default=EXPECTED)
    shape = RequestShape(prompt_tokens=1024, block_size=16, kv_bytes_per_token=256, request_id="r")
    return decide(shape, snaps, links, config=RoutingConfig(local_prefill_max_tokens=0)).chosen


def test_decide_avoids_the_failed_pair_until_its_probe():
    fb = LinkFeedback()
    first = _decide(fb, 0.0)
    assert first.kind is not OptionKind.LOCAL
    bad = first.prefill_id
    other = 3 - bad
    fb.observe({"token_ids": [], "kv_transfer": {"error": "TransferTimeout"}}, bad, 9, now=0.0)
    c = _decide(fb, 0.5)
    assert c.kind is not OptionKind.LOCAL and c.prefill_id == other
    # a slow measured link also steers away: the healthy pair with the faster measurement wins
    fb2 = LinkFeedback()
    fb2.observe({"token_ids": [], "kv_transfer": {"bytes": 8 << 20, "seconds": 4.0}}, bad, 9, now=0.0)
    assert _decide(fb2, 0.0).prefill_id == other
