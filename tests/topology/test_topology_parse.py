"""Pure parsers on captured sample text (tests/topology/samples)."""

from __future__ import annotations

from topo_factory import U0, U1, sample

from dynamo_ext.topology.collect import pci_affinity
from dynamo_ext.topology.parse import (
    cuda_visible_map,
    normalize_pci_bus_id,
    parse_default_route_iface,
    parse_gpu_query_csv,
    parse_ib_rate,
    parse_int_or_none,
    parse_loaded_modules,
    parse_memory_mib,
    parse_port_state,
    parse_topo_matrix,
)


def test_gpu_query_with_index():
    rows = parse_gpu_query_csv(sample("gpu_query_2xh200.csv"))
    assert [(r.index, r.uuid, r.pci_bus_id, r.name, r.memory_mib) for r in rows] == [
        (0, U0, "0000:18:00.0", "NVIDIA H200", 143771),
        (1, U1, "0000:2a:00.0", "NVIDIA H200", 143771),
    ]


def test_gpu_query_without_index_and_na_memory():
    rows = parse_gpu_query_csv(sample("gpu_query_noindex.csv") + "\ngarbage line\n")
    assert [r.index for r in rows] == [0, 1]
    assert rows[0].name == "NVIDIA H100 80GB HBM3" and rows[0].memory_mib == 81559
    assert rows[1].memory_mib == 0


def test_topo_matrix_nvlink_and_nics():
    m = parse_topo_matrix(sample("topo_2xh200_nvlink_4nic.txt"))
    assert m.columns == ["GPU0", "GPU1", "NIC0", "NIC1", "NIC2", "NIC3"]
    assert m.nvlink_peers() == {0: [1], 1: [0]}
    assert m.gpu_numa() == {0: 0, 1: 1}
    assert m.nic_legend["NIC3"] == "mlx5_3"
    aff = m.gpu_nic_affinity()
    assert aff[0] == {"mlx5_0": "PIX", "mlx5_1": "NODE", "mlx5_2": "SYS", "mlx5_3": "SYS"}
    assert aff[1]["mlx5_3"] == "PIX" and aff[1]["mlx5_0"] == "SYS"


def test_topo_matrix_old_space_separated_pcie_only():
    m = parse_topo_matrix(sample("topo_2xl40s_pcie_old.txt"))
    assert m.columns == ["GPU0", "GPU1", "mlx5_0"]
    assert m.nvlink_peers() == {0: [], 1: []}
    assert m.gpu_nic_affinity() == {0: {"mlx5_0": "NODE"}, 1: {"mlx5_0": "SYS"}}
    assert m.gpu_numa() == {0: 0, 1: 1}


def test_topo_matrix_single_gpu_and_garbage():
    one = "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-15\t0\t\tN/A\n"
    m = parse_topo_matrix(one)
    assert m.columns == ["GPU0"] and m.nvlink_peers() == {0: []} and m.gpu_numa() == {0: 0}
    assert parse_topo_matrix("").columns == []
    assert parse_topo_matrix("No devices were found\n").nvlink_peers() == {}


def test_small_parsers():
    assert normalize_pci_bus_id("00000000:2A:00.0") == "0000:2a:00.0"
    assert normalize_pci_bus_id(b"0000:18:00.0") == "0000:18:00.0"
    assert normalize_pci_bus_id("18:00.0") == "0000:18:00.0"
    assert parse_ib_rate("400 Gb/sec (4X NDR)\n") == 400.0
    assert parse_ib_rate("2.5 Gb/sec (1X SDR)") == 2.5
    assert parse_ib_rate("") is None
    assert parse_port_state("4: ACTIVE\n") == "ACTIVE" and parse_port_state("1: DOWN") == "DOWN"
    assert parse_int_or_none("-1\n") is None and parse_int_or_none("1\n") == 1 and parse_int_or_none("N/A") is None
    assert parse_memory_mib("80 GiB") == 80 * 1024 and parse_memory_mib("[N/A]") == 0
    mods = parse_loaded_modules(sample("proc_modules.txt"))
    assert {"nvidia_peermem", "nvidia_fs", "mlx5_ib"} <= mods and "nv_peer_mem" not in mods
    assert parse_default_route_iface(sample("proc_net_route.txt")) == "bond0"  # lowest metric
    assert parse_default_route_iface("Iface\tDestination\n") is None


def test_cuda_visible_map():
    gpus = [(0, U0), (1, U1)]
    assert cuda_visible_map(None, gpus) == {0: 0, 1: 1}
    assert cuda_visible_map("", gpus) == {}
    assert cuda_visible_map("1", gpus) == {1: 0}
    assert cuda_visible_map("1,0", gpus) == {1: 0, 0: 1}
    assert cuda_visible_map("GPU-8c7d", gpus) == {1: 0}
    assert cuda_visible_map("0,7,1", gpus) == {0: 0}  # CUDA stops at the first invalid entry
    assert cuda_visible_map("GPU-", gpus) == {}  # ambiguous prefix
    assert cuda_visible_map("MIG-abc", gpus) == {}
    assert cuda_visible_map("0,0", gpus) == {0: 0}


def test_pci_affinity_codes():
    root = ("pci0000:17",)
    sw = (*root, "0000:17:01.0", "0000:18:00.0")  # switch upstream -> downstream port
    gpu = (*sw, "0000:19:00.0", "0000:1a:00.0")
    nic_same_port = (*sw, "0000:19:00.0", "0000:1b:00.0")
    nic_other_port = (*sw, "0000:19:04.0", "0000:1c:00.0")
    assert pci_affinity(gpu, nic_same_port, 0, 0) == "PIX"
    assert pci_affinity(gpu, nic_other_port, 0, 0) == "PIX"  # same switch, other downstream port
    nested_gpu = (*sw, "0000:19:00.0", "0000:1a:00.0", "0000:1b:08.0", "0000:1c:00.0")  # a switch below
    assert pci_affinity(nested_gpu, nic_other_port, 0, 0) == "PXB"
    assert pci_affinity(gpu, (*root, "0000:17:02.0", "0000:30:00.0"), 0, 0) == "PHB"
    assert pci_affinity(gpu, ("pci0000:40", "0000:40:01.0", "0000:41:00.0"), 0, 0) == "NODE"
    assert pci_affinity(gpu, ("pci0000:80", "0000:80:01.0", "0000:81:00.0"), 0, 1) == "SYS"


def test_real_capture_from_an_h200_x2_vm():
    """Captured 2026-11-22 on the lent 2x H200 machine (ANSI underline after the leading tab)."""
    m = parse_topo_matrix(sample("topo_2xh200_real_vm.txt"))
    assert m.columns == ["GPU0", "GPU1"] and m.nvlink_peers() == {0: [1], 1: [0]}
    assert m.gpu_numa() == {0: 0, 1: 0} and m.gpu_nic_affinity() == {0: {}, 1: {}}
    rows = parse_gpu_query_csv(sample("gpu_query_2xh200_real_vm.csv"))
    assert [(r.index, r.pci_bus_id, r.memory_mib) for r in rows] == [(0, "0000:00:06.0", 143771), (1, "0000:00:07.0", 143771)]
