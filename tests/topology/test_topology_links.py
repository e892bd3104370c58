"""LinkTable: EWMA, latency samples, failure back-off, probe scheduling, plain snapshot."""

from __future__ import annotations

import json

import pytest
from topo_factory import cpu_node

from dynamo_ext.topology import Endpoint, LinkTable, select_transport
from dynamo_ext.topology import baselines as B

P = ("w0/gpu0", "w1/gpu0")
Q = ("w0/host", "w1/host")


def test_expected_then_measured_ewma():
    t = LinkTable(alpha=0.5)
    t.set_expected(P, 300.0, 7.5, "nvlink")
    assert t.gbps(P) == 300.0
    t.record_transfer(P, 2_000_000_000, 10.0)  # 0.2 GB/s: first sample taken as is
    assert t.get(P).measured_gbps == pytest.approx(0.2)
    t.record_transfer(P, 1_000_000_000, 1.0)  # 1.0 GB/s
    assert t.gbps(P) == pytest.approx(0.6)
    assert t.get(P).samples == 2


def test_small_transfers_update_latency_not_bandwidth():
    t = LinkTable(alpha=0.5, min_bw_bytes=1 << 20)
    t.record_transfer(Q, 4096, 20e-6)
    t.record_transfer(Q, 4096, 40e-6)
    st = t.get(Q)
    assert st.measured_gbps is None and st.latency_us == pytest.approx(30.0)
    with pytest.raises(ValueError):
        t.record_transfer(Q, 10, 0.0)


def test_failure_backoff_doubles_and_caps_and_success_heals():
    t = LinkTable(base_backoff_s=1.0, max_backoff_s=5.0)
    t.set_expected(P, 300.0)
    assert t.record_failure(P, now=100.0, error="NIXL_ERR_REMOTE_DISCONNECT") == 101.0
    assert t.gbps(P) == 0.0 and not t.get(P).healthy
    assert t.record_failure(P, now=101.0) == 103.0
    assert t.record_failure(P, now=103.0) == 107.0
    assert t.record_failure(P, now=107.0) == 112.0  # capped at 5 s
    assert t.get(P).failures == 4
    assert t.due_for_probe(111.9) == [] and t.due_for_probe(112.0) == [P]
    t.record_transfer(P, 1 << 30, 0.01)
    st = t.get(P)
    assert st.healthy and st.failures == 0 and st.next_probe_at is None and st.last_error == ""
    assert t.due_for_probe(1e9) == []  # measured and healthy: nothing to probe


def test_due_for_probe_includes_unmeasured_pairs_sorted():
    t = LinkTable()
    t.set_expected(Q, 10.0)
    t.set_expected(P, 300.0)
    assert t.due_for_probe(0.0) == [P, Q]
    assert t.due_for_probe(0.0, include_unmeasured=False) == []


def test_snapshot_is_plain_builtins():
    t = LinkTable()
    a, b = cpu_node(pid=1), cpu_node(pid=2)
    pair = (Endpoint.of(a).label(), Endpoint.of(b).label())
    t.add_choice(pair, select_transport(Endpoint.of(a), Endpoint.of(b)))
    t.record_failure(P, now=5.0, error="boom")
    snap = t.snapshot()
    assert json.loads(json.dumps(snap)) == snap  # JSON-safe, so plain dicts/lists/str/float/bool/None

    def plain(x):
        if isinstance(x, dict):
            return all(type(k) is str and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float, bool)

    assert plain(snap) and snap["version"] == 1
    links = {(d["src"], d["dst"]): d for d in snap["links"]}
    assert links[pair]["kind"] == "host-shm" and links[pair]["gbps"] == B.HOST_SHM_MAPPED_GBPS and links[pair]["healthy"]
    assert links[P]["gbps"] == 0.0 and links[P]["failures"] == 1 and links[P]["next_probe_at"] == 6.0


def test_alpha_validated():
    with pytest.raises(ValueError):
        LinkTable(alpha=0.0)
