"""collect_local_topology on this machine (no GPU) and on a fake GPU node (fake /sys, /proc and
canned nvidia-smi output), plus the JSON/msgpack round trip and validation on decode."""

from __future__ import annotations

import os

import msgspec
import pytest
from topo_factory import U0, U1, nvlink_node, sample

from dynamo_ext.topology import NodeTopology, collect_local_topology
from dynamo_ext.topology.collect import GPU_QUERY, TOPO_QUERY


def test_this_machine_never_raises_and_has_a_host_id():
    t = collect_local_topology()
    assert t.host.host_id and t.host.hostname
    assert t.pid == os.getpid()
    assert t.worker_gpu is None
    if not t.gpus:  # the CPU box these tests were written on
        assert t.gpu_source == "none" and any("CPU-only" in e for e in t.probe_errors)
    assert NodeTopology.from_json(t.to_json()) == t


def test_no_tools_at_all_is_cpu_only(tmp_path):
    t = collect_local_topology(sys_root=tmp_path / "sys", proc_root=tmp_path / "proc", etc_root=tmp_path / "etc",
                               runner=lambda cmd: None, pid=42, gpu_libs=False)
    assert t.gpus == () and t.rdma_nics == () and not t.gpudirect_rdma and not t.storage.gds_available
    assert t.host.host_id_source == "hostname" and t.host.host_id.startswith("hostname:")
    assert t.pid == 42
    # asking for a GPU on a box without GPUs is recorded, not raised
    t2 = collect_local_topology(0, sys_root=tmp_path, proc_root=tmp_path, etc_root=tmp_path, runner=lambda c: None,
                                gpu_libs=False)
    assert t2.worker_gpu is None and any("cuda:0" in e for e in t2.probe_errors)


def _write(p, text):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _fake_node(tmp_path):
    sysr, procr, etcr = tmp_path / "sys", tmp_path / "proc", tmp_path / "etc"
    _write(procr / "sys/kernel/random/boot_id", "11111111-2222-3333-4444-555555555555\n")
    _write(etcr / "machine-id", "abcdef\n")
    _write(procr / "modules", sample("proc_modules.txt"))
    _write(procr / "net/route", sample("proc_net_route.txt"))
    # PCI tree: GPU0 and mlx5_0 under one root port; GPU1 alone; mlx5_1 (down) on another root.
    devs = {"0000:18:00.0": ("pci0000:17/0000:17:01.0/0000:18:00.0", 0),
            "0000:19:00.0": ("pci0000:17/0000:17:01.0/0000:19:00.0", 0),
            "0000:2a:00.0": ("pci0000:2a/0000:2a:00.0", 1),
            "0000:9a:00.0": ("pci0000:9a/0000:9a:00.0", 1)}
    for bus, (rel, numa) in devs.items():
        _write(sysr / "devices" / rel / "numa_node", f"{numa}\n")
        (sysr / "bus/pci/devices").mkdir(parents=True, exist_ok=True)
        os.symlink(sysr / "devices" / rel, sysr / "bus/pci/devices" / bus)
    for name, bus, rate, state in (("mlx5_0", "0000:19:00.0", "400 Gb/sec (4X NDR)", "4: ACTIVE"),
                                   ("mlx5_1", "0000:9a:00.0", "200 Gb/sec (4X HDR)", "1: DOWN")):
        dev = sysr / "devices" / devs[bus][0]
        (dev / "net" / f"ib{name[-1]}").mkdir(parents=True)
        ib = sysr / "class/infiniband" / name
        _write(ib / "ports/1/state", state + "\n")
        _write(ib / "ports/1/link_layer", "InfiniBand\n")
        _write(ib / "ports/1/rate", rate + "\n")
        os.symlink(dev, ib / "device")
    (sysr / "class/nvme/nvme0").mkdir(parents=True)
    return sysr, procr, etcr


def _runner(cmd):
    if cmd == GPU_QUERY:
        return sample("gpu_query_2xh200.csv")
    if cmd == TOPO_QUERY:
        return sample("topo_2xh200_nvlink_4nic.txt")
    return None


def test_fake_gpu_node(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    sysr, procr, etcr = _fake_node(tmp_path)
    t = collect_local_topology(0, sys_root=sysr, proc_root=procr, etc_root=etcr, runner=_runner, gpu_libs=False)
    assert t.host.host_id == "boot:11111111-2222-3333-4444-555555555555" and t.host.default_iface == "bond0"
    assert t.gpu_source == "nvidia-smi"
    g0, g1 = t.gpus
    assert (g0.uuid, g1.uuid) == (U0, U1)
    assert g0.nvlink_peers == (U1,) and g1.nvlink_peers == (U0,)
    assert (g0.numa_node, g1.numa_node) == (0, 1)
    assert (g0.cuda_index, g1.cuda_index) == (None, 0)
    assert t.worker_gpu == 1  # cuda:0 under CUDA_VISIBLE_DEVICES=1 is physical GPU 1
    assert g1.nic_affinity["mlx5_3"] == "PIX"
    n0, n1 = t.rdma_nics
    assert n0.name == "mlx5_0" and n0.pci_address == "0000:19:00.0" and n0.numa_node == 0 and n0.netdevs == ("ib0",)
    assert n0.ports[0].rate_gbps == 400.0 and n0.active_port() is not None and n1.active_port() is None
    assert [n.name for n in t.active_nics()] == ["mlx5_0"]
    assert t.gpudirect_rdma and t.gpudirect_module == "nvidia_peermem"
    assert t.storage.nvidia_fs and t.storage.nvme == ("nvme0",)
    with pytest.raises(ValueError, match="cuda:1"):
        collect_local_topology(1, sys_root=sysr, proc_root=procr, etc_root=etcr, runner=_runner, gpu_libs=False)


def test_round_trip_json_msgpack_dict():
    t = nvlink_node()
    assert NodeTopology.from_json(t.to_json()) == t
    assert NodeTopology.from_json(t.to_json().decode()) == t
    assert NodeTopology.from_msgpack(t.to_msgpack()) == t
    d = t.to_dict()
    assert isinstance(d["gpus"][0]["nvlink_peers"], list)
    assert NodeTopology.from_dict(d) == t


def test_unknown_fields_ignored_for_forward_compatibility():
    d = nvlink_node().to_dict()
    d["future_field"] = {"x": 1}
    d["gpus"][0]["nvswitch"] = True
    assert NodeTopology.from_dict(d) == nvlink_node()


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(pid=0), "pid"),
    (lambda d: d["host"].update(host_id=""), "host_id"),
    (lambda d: d["gpus"][1].update(index=0), "duplicate GPU indices"),
    (lambda d: d["gpus"][1].update(uuid=d["gpus"][0]["uuid"]), "duplicate GPU UUIDs"),
    (lambda d: d.update(worker_gpu=7), "worker_gpu 7"),
    (lambda d: d["gpus"][0].update(memory_mib="lots"), "memory_mib"),
    (lambda d: d.pop("host"), "host"),
])  # fmt: skip
def test_decode_validates(mutate, match):
    d = nvlink_node().to_dict()
    mutate(d)
    with pytest.raises(msgspec.ValidationError, match=match):
        NodeTopology.from_json(msgspec.json.encode(d))


def test_nic_affinity_from_sys_when_topo_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sysr, procr, etcr = _fake_node(tmp_path)
    t = collect_local_topology(sys_root=sysr, proc_root=procr, etc_root=etcr, gpu_libs=False,
                               runner=lambda c: sample("gpu_query_2xh200.csv") if c == GPU_QUERY else None)
    g0, g1 = t.gpus
    assert g0.nvlink_peers == () and any("topo -m unavailable" in e for e in t.probe_errors)
    assert t.rdma_nics[0].pci_path == ("pci0000:17", "0000:17:01.0", "0000:19:00.0")
    assert g0.nic_affinity == {"mlx5_0": "PIX", "mlx5_1": "SYS"}
    assert g1.nic_affinity == {"mlx5_0": "SYS", "mlx5_1": "NODE"}
    assert (g0.cuda_index, g1.cuda_index) == (0, 1)
