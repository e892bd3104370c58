"""LinkTable lookups and bounds, the topology-snapshot adapter, and LinkEstimator (EWMA, back-off)."""

from __future__ import annotations

import pytest

from dynamo_ext.routing import LinkEstimator, LinkInfo, LinkTable

MB = 1 << 20


def test_lookup_order_explicit_then_same_node_then_default():
    lt = LinkTable({(1, 2): LinkInfo(7.0, 1e-3)}, default=LinkInfo(10.0, 5e-5), same_node=LinkInfo(100.0, 1e-6))
    assert lt.link(1, 2, "a", "a").gb_per_s == 7.0
    assert lt.link(2, 1, "a", "a").gb_per_s == 100.0
    assert lt.link(2, 1, "a", "b").gb_per_s == 10.0
    assert lt.link(2, 1, None, None).gb_per_s == 10.0
    assert LinkInfo(10.0, 1e-3).transfer_s(10**9) == pytest.approx(0.101)


def test_transfer_lower_bound_ignores_unhealthy_links():
    lt = LinkTable({(1, 2): LinkInfo(400.0, 0.0, healthy=False), (3, 2): LinkInfo(40.0, 1e-6)},
                   default=LinkInfo(10.0, 5e-5))
    inv, lat = lt.transfer_lower_bound(2)
    assert inv == pytest.approx(1 / 40e9) and lat == 1e-6
    assert lt.transfer_lower_bound(9) == (pytest.approx(1 / 10e9), 5e-5)
    assert lt.unhealthy_pairs == ((1, 2),)


def test_from_topology_snapshot():
    snap = {"version": 1, "links": [
        {"src": "w1", "dst": "w2", "gbps": 42.0, "expected_gbps": 50.0, "latency_us": 3.0,
         "expected_latency_us": 5.0, "healthy": True},
        {"src": "w2", "dst": "w1", "gbps": 0.0, "expected_gbps": 50.0, "latency_us": None,
         "expected_latency_us": 5.0, "healthy": False},
        {"src": "w1", "dst": "gpu-x", "gbps": 1.0, "healthy": True},
    ]}
    lt = LinkTable.from_topology_snapshot(snap, worker_ids={"w1": 1, "w2": 2}, default=LinkInfo(10.0))
    a, b = lt.link(1, 2), lt.link(2, 1)
    assert (a.gb_per_s, a.latency_s, a.healthy) == (42.0, pytest.approx(3e-6), True)
    assert (b.gb_per_s, b.latency_s, b.healthy) == (50.0, pytest.approx(5e-6), False)
    assert len(lt) == 2
    with pytest.raises(ValueError):
        LinkTable.from_topology_snapshot({"version": 2}, default=LinkInfo(1.0))


def test_ewma_first_sample_then_alpha():
    est = LinkEstimator(alpha=0.5, min_sample_bytes=MB)
    est.observe_transfer(1, 2, 10 * 10**9, 1.0, now=0.0)
    assert est.gb_per_s(1, 2) == pytest.approx(10.0)
    est.observe_transfer(1, 2, 20 * 10**9, 1.0, now=1.0)
    assert est.gb_per_s(1, 2) == pytest.approx(15.0)
    est.observe_transfer(1, 2, 100, 1.0, now=2.0)  # latency-dominated: ignored for bandwidth
    assert est.gb_per_s(1, 2) == pytest.approx(15.0)


def test_prior_seeds_the_ewma_and_latency_is_subtracted():
    est = LinkEstimator(alpha=0.25, priors={(1, 2): LinkInfo(100.0, 0.01)})
    est.observe_transfer(1, 2, 10**9, 0.11, now=0.0)  # 1 GB in 0.1 s of wire time: 10 GB/s
    assert est.gb_per_s(1, 2) == pytest.approx(0.25 * 10.0 + 0.75 * 100.0)


def test_failure_backoff_doubles_caps_and_success_resets():
    est = LinkEstimator(base_backoff_s=1.0, max_backoff_s=4.0)
    assert est.observe_failure(1, 2, now=10.0) == 11.0
    assert not est.is_healthy(1, 2) and est.due_for_probe(10.5) == [] and est.due_for_probe(11.0) == [(1, 2)]
    assert est.observe_failure(1, 2, now=11.0) == 13.0
    assert est.observe_failure(1, 2, now=13.0) == 17.0
    assert est.observe_failure(1, 2, now=17.0) == 21.0  # capped at 4 s
    assert est.failures(1, 2) == 4
    est.observe_failure(3, 4, now=0.0)
    assert est.due_for_probe(100.0) == [(1, 2), (3, 4)]
    est.observe_transfer(1, 2, 10**9, 0.1, now=21.0)
    assert est.is_healthy(1, 2) and est.failures(1, 2) == 0 and est.due_for_probe(100.0) == [(3, 4)]


def test_table_reflects_measurements_and_health():
    est = LinkEstimator(priors={(1, 2): LinkInfo(50.0, 1e-5)})
    est.observe_failure(1, 2, now=0.0)
    est.observe_transfer(3, 4, 4 * 10**9, 1.0, now=0.0)
    lt = est.table(default=LinkInfo(10.0, 2e-5), same_node=LinkInfo(100.0), nodes={3: "a", 4: "a"})
    assert lt.link(1, 2) == LinkInfo(50.0, 1e-5, False)
    assert lt.link(3, 4).gb_per_s == pytest.approx(4.0) and lt.link(3, 4).healthy
    assert lt.unhealthy_pairs == ((1, 2),)


def test_estimator_rejects_bad_parameters():
    with pytest.raises(ValueError):
        LinkEstimator(alpha=0.0)
    with pytest.raises(ValueError):
        LinkEstimator(base_backoff_s=5.0, max_backoff_s=1.0)
    with pytest.raises(ValueError):
        LinkEstimator().observe_transfer(1, 2, 10, 0.0, now=0.0)
