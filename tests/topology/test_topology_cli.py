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
        calls.append((nbytes, backend, choice["env"]["UCX_TLS"] if choice else None, direction))
        if backend == "tcp":
            raise RuntimeError("no route")
        return 9.5 if direction == "write" else 8.5

    monkeypatch.setattr(topology_cmd, "_load_probe", lambda: fake_probe_pair)
    assert topology_cmd.run(ns(probe=True, json=True)) == 0
    doc = json.loads(capsys.readouterr().out)
    hh = next(p for p in doc["pairs"] if p["a"] == "host" and p["b"] == "host")
    # every backend of the choice, in its order; NIXL with the choice's UCX settings; a failure is a result
    assert hh["backends"] == ["shm", "cma", "nixl", "tcp"]
    assert hh["measured"] == {"shm": {"write": 9.5, "read": 8.5}, "cma": {"write": 9.5, "read": 8.5},
                              "nixl": {"write": 9.5, "read": 8.5}, "tcp": "error: RuntimeError: no route"}
    assert (hh["probe_route"], hh["probe_expected_gbps"]) == ("shm, two processes", hh["expected_gbps"])
    assert calls == [(1 << 20, "shm", None, "write"), (1 << 20, "shm", None, "read"),
                     (1 << 20, "cma", None, "write"), (1 << 20, "cma", None, "read"),
                     (1 << 20, "nixl", "cma,self,tcp", "write"), (1 << 20, "nixl", "cma,self,tcp", "read"),
                     (1 << 20, "tcp", None, "write")]


def test_pairs_and_rendering_on_a_gpu_node():
    t = nvlink_node()
    pairs = topology_cmd.local_pairs(t)
    kinds = {(a, b): c.kind for a, b, _, _, c in pairs}
    assert kinds == {("gpu0", "gpu0"): "same-gpu", ("gpu0", "gpu1"): "nvlink", ("gpu0", "host"): "pcie",
                     ("gpu1", "gpu1"): "same-gpu", ("gpu1", "host"): "pcie", ("host", "host"): "host-shm"}
    text = topology_cmd.format_topology(t) + "\n" + topology_cmd.format_pairs(pairs, {("gpu0", "gpu1"): "n/a"})
    assert "nvlink gpu1" in text and "mlx5_0:PIX" in text and "cuda_ipc>nixl" in text and "UCX_TLS=cuda_ipc" in text
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on" in text


@pytest.mark.slow
def test_real_probe_host_pair(capsys):
    """The real transport probe on the host<->host pair: every backend of the choice (cma, NIXL with the
    choice's UCX cma settings, our TCP), each between two processes, READ and WRITE."""
    pytest.importorskip("nixl")
    if topology_cmd._load_probe() is None:
        pytest.skip("dynamo_ext.transport.probe not available")
    assert topology_cmd.run(ns(probe=True, json=True, probe_bytes=16 << 20)) == 0
    doc = json.loads(capsys.readouterr().out)
    hh = next(p for p in doc["pairs"] if p["a"] == "host" and p["b"] == "host")
    assert set(hh["measured"]) == {"shm", "cma", "nixl", "tcp"}, hh
    for be, m in hh["measured"].items():
        assert m["write"] > 0.1 and m["read"] > 0.1, (be, hh)


def test_probe_route_picks_the_gpu_branch_per_pair():
    t = nvlink_node()
    routes = {(a, b): topology_cmd.probe_route(ea, eb, c, {0: 0, 1: 1}) for a, b, ea, eb, c in topology_cmd.local_pairs(t)}
    assert routes == {("gpu0", "gpu0"): ("gpu", 0, 0), ("gpu0", "gpu1"): ("gpu", 0, 1), ("gpu0", "host"): ("gpu", 0, -1),
                      ("gpu1", "gpu1"): ("gpu", 1, 1), ("gpu1", "host"): ("gpu", 1, -1), ("host", "host"): ("host", -1, -1)}
    hidden = {(a, b): topology_cmd.probe_route(ea, eb, c, {0: 0, 1: None})[0]
              for a, b, ea, eb, c in topology_cmd.local_pairs(t)}
    assert hidden[("gpu0", "gpu0")] == "gpu" and hidden[("gpu0", "gpu1")].startswith("n/a: GPU not visible")


def test_probe_all_sends_gpu_pairs_to_one_gpu_prober(monkeypatch):
    """GPUs cannot run here: GpuProber is replaced; the routing, reporting and cleanup are real."""
    from dynamo_ext.transport import probe as tprobe

    made = []

    class FakeProber:
        def __init__(self, nbytes):
            self.nbytes, self.calls, self.closed = nbytes, [], False
            made.append(self)

        async def probe(self, src, dst):
            self.calls.append((src, dst))
            return {"write": 100.0 + 10 * src + dst, "verified": (src, dst) != (1, -1)}

        def close(self):
            self.closed = True

    monkeypatch.setattr(tprobe, "GpuProber", FakeProber)
    pairs = topology_cmd.local_pairs(nvlink_node())
    host_calls = []
    m = topology_cmd.probe_all(lambda n, **kw: host_calls.append(kw["direction"]) or 7.0, pairs, {0: 0, 1: 1}, 4 << 20)
    assert len(made) == 1 and made[0].closed and made[0].nbytes == 4 << 20
    assert made[0].calls == [(0, 0), (0, 1), (0, -1), (1, 1), (1, -1)]
    assert m[("gpu0", "gpu1")] == {"write": 101.0}
    # the host pair: every host backend of the choice (cma, nixl, tcp), READ and WRITE each
    assert m[("host", "host")] == {b: {"write": 7.0, "read": 7.0} for b in ("shm", "cma", "nixl", "tcp")}
    assert m[("gpu1", "host")].startswith("error: bytes differ")
    text = topology_cmd.format_pairs(pairs, m)
    assert "W 101" in text
    # GPU -> host measures the owner's copy into its pinned tier: compared with that route's 48, not the
    # pair's NIXL expectation (0.5) nor the old 10
    m[("gpu0", "host")] = {"write": 45.0}
    row = next(ln for ln in topology_cmd.format_pairs(pairs, m).splitlines() if ln.startswith("gpu0  host"))
    assert "W 45 (expect 48: owner copy GPU -> its pinned host tier)" in row, row


def test_host_probe_adds_cuda_copy_on_a_gpu_node_only():
    pairs = topology_cmd.local_pairs(nvlink_node())
    hh = next(c for a, b, _, _, c in pairs if a == b == "host")
    assert topology_cmd.host_probe_choice(hh, True)["env"]["UCX_TLS"].split(",")[-1] == "cuda_copy"
    assert topology_cmd.host_probe_choice(hh, False)["env"] == hh.nixl_choice()["env"]
