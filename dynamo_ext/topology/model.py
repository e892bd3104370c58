"""The facts about one worker process's machine, as a serialisable record.

A ``NodeTopology`` is collected once at worker start-up (``collect.collect_local_topology``),
published with the worker's record (etcd) as JSON or msgpack, and decoded by peers to choose a
transport (``select.select_transport``). Decoding validates types (msgspec) and the invariants in
``NodeTopology.__post_init__`` (unique GPU indices/UUIDs, a non-empty host id, pid > 0), so a peer
never reasons about a malformed record.

Identity rules (why the fields are what they are):
- ``host.host_id`` answers "same node?" for shared-memory transports (cma, CUDA IPC). It is the
  kernel's boot id when readable: two containers on one kernel share it (and can share memory),
  while an image that bakes in ``/etc/machine-id`` cannot make two hosts look like one. Fallbacks:
  machine-id, then hostname. ``host.host_id_source`` says which.
- "same process?" needs host id + pid namespace + pid: two containers on one kernel both have pid 1.
- ``GpuInfo.index`` is the NVML / nvidia-smi index (PCI order, independent of
  ``CUDA_VISIBLE_DEVICES``); ``GpuInfo.cuda_index`` is what this process's CUDA calls it (``cuda:N``)
  or None when hidden. Peers compare GPUs by UUID only.
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1

# nvidia-smi topo -m relationship codes, nearest first (used to pick the NIC nearest a GPU).
PCI_AFFINITY_ORDER = ("PIX", "PXB", "PHB", "NODE", "SYS")


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    uuid: str
    pci_bus_id: str  # normalised: 4-digit domain, lower case, e.g. "0000:18:00.0"
    name: str = ""
    memory_mib: int = 0
    numa_node: int | None = None
    nvlink_peers: tuple[str, ...] = ()  # UUIDs of GPUs reachable over NVLink
    cuda_index: int | None = None  # cuda:N in this process, None when not visible
    nic_affinity: dict[str, str] = {}  # RDMA device name -> PIX|PXB|PHB|NODE|SYS


class RdmaPort(msgspec.Struct, frozen=True, kw_only=True):
    port: int
    state: str = ""  # ACTIVE, DOWN, INIT, ...
    link_layer: str = ""  # InfiniBand | Ethernet (RoCE)
    rate_gbps: float | None = None  # link rate in Gbit/s


class RdmaNic(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # e.g. mlx5_0
    ports: tuple[RdmaPort, ...] = ()
    pci_address: str | None = None
    numa_node: int | None = None
    netdevs: tuple[str, ...] = ()
    pci_path: tuple[str, ...] = ()  # PCI ancestors (root first), for "same switch" tests

    def active_port(self) -> RdmaPort | None:
        for p in self.ports:
            if p.state.upper() == "ACTIVE":
                return p
        return None


class HostInfo(msgspec.Struct, frozen=True, kw_only=True):
    hostname: str
    host_id: str
    host_id_source: str = ""  # boot_id | machine_id | hostname
    pid_namespace: str | None = None  # e.g. "pid:[4026531836]"
    ips: tuple[str, ...] = ()  # the address of the default route, nothing more
    default_iface: str | None = None  # interface of the default route (UCX_NET_DEVICES for TCP)


class StorageInfo(msgspec.Struct, frozen=True, kw_only=True):
    nvme: tuple[str, ...] = ()  # controllers, e.g. ("nvme0", "nvme1")
    nvidia_fs: bool = False  # nvidia-fs kernel module loaded (GPUDirect Storage)
    cufile_lib: str | None = None  # libcufile found by the loader
    gds_available: bool = False  # nvidia_fs and cufile both present


class NodeTopology(msgspec.Struct, frozen=True, kw_only=True):
    host: HostInfo
    pid: int
    schema_version: int = SCHEMA_VERSION
    gpus: tuple[GpuInfo, ...] = ()
    gpu_source: str = "none"  # nvml | nvidia-smi | torch | none
    worker_gpu: int | None = None  # GpuInfo.index of the GPU this worker uses, None = CPU worker
    rdma_nics: tuple[RdmaNic, ...] = ()
    gpudirect_rdma: bool = False
    gpudirect_module: str | None = None  # nvidia_peermem | nv_peer_mem
    storage: StorageInfo = StorageInfo()
    probe_errors: tuple[str, ...] = ()  # probes that failed or were skipped, one line each
    collected_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.host.host_id:
            raise ValueError("host.host_id must not be empty")
        if self.pid <= 0:
            raise ValueError(f"pid must be > 0, got {self.pid}")
        idx = [g.index for g in self.gpus]
        if len(set(idx)) != len(idx):
            raise ValueError(f"duplicate GPU indices {idx}")
        uuids = [g.uuid for g in self.gpus]
        if len(set(uuids)) != len(uuids):
            raise ValueError("duplicate GPU UUIDs")
        if self.worker_gpu is not None and self.worker_gpu not in idx:
            raise ValueError(f"worker_gpu {self.worker_gpu} is not one of the GPUs {idx}")

    # -- lookups ---------------------------------------------------------------------------------
    def gpu(self, index: int) -> GpuInfo:
        for g in self.gpus:
            if g.index == index:
                return g
        raise ValueError(
            f"no GPU with index {index} on host {self.host.hostname} "
            f"(GPUs: {[g.index for g in self.gpus] or 'none'})"
        )

    def active_nics(self) -> list[RdmaNic]:
        return [n for n in self.rdma_nics if n.active_port() is not None]

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    def to_msgpack(self) -> bytes:
        return msgspec.msgpack.encode(self)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.json.decode(msgspec.json.encode(self))  # lists, not tuples: JSON-shaped

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeTopology:
        """Decode and validate; raises ``msgspec.ValidationError`` on a malformed record."""
        return msgspec.json.decode(data, type=cls)

    @classmethod
    def from_msgpack(cls, data: bytes) -> NodeTopology:
        return msgspec.msgpack.decode(data, type=cls)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeTopology:
        return msgspec.convert(data, type=cls)
