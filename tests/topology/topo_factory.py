"""Builders of NodeTopology records for tests (a 2x H200 NVLink node with mlx5 NICs, a PCIe node,
a CPU box) — no probing."""

from __future__ import annotations

from pathlib import Path

from dynamo_ext.topology import GpuInfo, HostInfo, NodeTopology, RdmaNic, RdmaPort

SAMPLES = Path(__file__).parent / "samples"
U0 = "GPU-3f2a9c1e-7b4d-4e5f-9a1b-2c3d4e5f6a7b"
U1 = "GPU-8c7d6e5f-4a3b-2c1d-0e9f-8a7b6c5d4e3f"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def host(name: str = "node-a", host_id: str | None = None, ns: str = "pid:[4026531836]") -> HostInfo:
    return HostInfo(hostname=name, host_id=host_id or f"boot:{name}-0000", host_id_source="boot_id",
                    pid_namespace=ns, ips=("10.0.0.1",), default_iface="bond0")


def nic(name: str, numa: int, rate: float = 400.0, state: str = "ACTIVE", layer: str = "InfiniBand") -> RdmaNic:
    return RdmaNic(name=name, ports=(RdmaPort(port=1, state=state, link_layer=layer, rate_gbps=rate),),
                   pci_address=f"0000:{0x19 + numa:02x}:00.0", numa_node=numa, netdevs=(f"ib{name[-1]}",))


def nvlink_node(name: str = "node-a", pid: int = 1000, *, nvlink: bool = True, nics: bool = True,
                gdr: bool = True, ns: str = "pid:[4026531836]", host_id: str | None = None) -> NodeTopology:
    g0 = GpuInfo(index=0, uuid=U0 + name, pci_bus_id="0000:18:00.0", name="NVIDIA H200", memory_mib=143771,
                 numa_node=0, nvlink_peers=(U1 + name,) if nvlink else (), cuda_index=0,
                 nic_affinity={"mlx5_0": "PIX", "mlx5_1": "NODE", "mlx5_2": "SYS", "mlx5_3": "SYS"})
    g1 = GpuInfo(index=1, uuid=U1 + name, pci_bus_id="0000:2a:00.0", name="NVIDIA H200", memory_mib=143771,
                 numa_node=1, nvlink_peers=(U0 + name,) if nvlink else (), cuda_index=1,
                 nic_affinity={"mlx5_0": "SYS", "mlx5_1": "SYS", "mlx5_2": "NODE", "mlx5_3": "PIX"})
    return NodeTopology(
        host=host(name, host_id, ns), pid=pid, gpus=(g0, g1), gpu_source="nvidia-smi", worker_gpu=0,
        rdma_nics=(nic("mlx5_0", 0), nic("mlx5_1", 0), nic("mlx5_2", 1), nic("mlx5_3", 1, rate=200.0)) if nics else (),
        gpudirect_rdma=gdr, gpudirect_module="nvidia_peermem" if gdr else None,
    )


def cpu_node(name: str = "cpu-box", pid: int = 2000, ns: str = "pid:[4026531836]", host_id: str | None = None) -> NodeTopology:
    return NodeTopology(host=host(name, host_id, ns), pid=pid)
