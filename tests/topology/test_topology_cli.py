"""``dynamo-ext topology``: run() called directly with an argparse Namespace."""

from __future__ import annotations

import argparse
import json

import pytest

from topo_factory import nvlink_node

from dynamo_ext.cli import topology_cmd


def ns(**kw):
    base = {"json": False, "probe": False, "gpu": None, "probe_bytes": 1 << 20}
    base.update(kw)
    return argparse.Namespace(**base)


def test_table_output(capsys):
    assert topology_cmd.run(ns()) == 0
    out = capsys.readouterr().out
    assert "host " in out and "pairs (each side its own process" in out
    assert "host  host" in out and "expect GB/s" in out


def test_json_output(capsys):
    assert topology_cmd.run(ns(json=True)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["topology"]["host"]["host_id"]
    assert any(p["a"] == "host" and p["b"] == "host" for p in doc["pairs"])
    for p in doc["pairs"]:
        assert {"kind", "backend", "expected_gbps", "env"} <= p.keys()


def test_bad_gpu_is_exit_2_or_cpu_note(capsys):
    rc = topology_cmd.run(ns(gpu=99))
    assert rc in (0, 2)  # 2 on a GPU box (no cuda:99); 0 on a CPU box (recorded as a probe note)
    if rc == 2:
        assert "gpu_index 99" in capsys.readouterr().err


def test_probe_unavailable_is_exit_3(monkeypatch, capsys):
    monkeypatch.setattr(topology_cmd, "_load_probe", lambda: None)
    assert topology_cmd.run(ns(probe=True)) == 3
    assert "probe not available yet" in capsys.readouterr().err


def test_probe_calls_probe_pair_for_host_pairs_only(monkeypatch, capsys):
    calls = []

    def fake_probe_pair(nbytes, *, backend, choice, direction):
        calls.append((nbytes, backend, choice["env"]["UCX_TLS"], direction))
        return 9.5 if direction == "write" else 8.5

    monkeypatch.setattr(topology_cmd, "_load_probe", lambda: fake_probe_pair)
    assert topology_cmd.run(ns(probe=True, json=True)) == 0
    doc = json.loads(capsys.readouterr().out)
    hh = next(p for p in doc["pairs"] if p["a"] == "host" and p["b"] == "host")
    assert hh["measured"] == {"write": 9.5, "read": 8.5}
    assert calls == [(1 << 20, "nixl", "cma,self,tcp", "write"), (1 << 20, "nixl", "cma,self,tcp", "read")]


def test_pairs_and_rendering_on_a_gpu_node():
    t = nvlink_node()
    pairs = topology_cmd.local_pairs(t)
    kinds = {(a, b): c.kind for a, b, _, _, c in pairs}
    assert kinds == {("gpu0", "gpu0"): "same-gpu", ("gpu0", "gpu1"): "nvlink", ("gpu0", "host"): "pcie",
                     ("gpu1", "gpu1"): "same-gpu", ("gpu1", "host"): "pcie", ("host", "host"): "host-shm"}
    text = topology_cmd.format_topology(t) + "\n" + topology_cmd.format_pairs(pairs, {("gpu0", "gpu1"): "n/a"})
    assert "nvlink gpu1" in text and "mlx5_0:PIX" in text and "local-copy" in text and "UCX_TLS=cuda_ipc" in text


@pytest.mark.slow
def test_real_probe_host_pair(capsys):
    """The real transport probe on the host<->host pair (two processes, NIXL UCX over cma)."""
    pytest.importorskip("nixl")
    if topology_cmd._load_probe() is None:
        pytest.skip("dynamo_ext.transport.probe not available")
    assert topology_cmd.run(ns(probe=True, json=True, probe_bytes=16 << 20)) == 0
    doc = json.loads(capsys.readouterr().out)
    hh = next(p for p in doc["pairs"] if p["a"] == "host" and p["b"] == "host")
    assert hh["measured"]["write"] > 0.1 and hh["measured"]["read"] > 0.1, hh
