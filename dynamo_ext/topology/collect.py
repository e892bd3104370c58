"""Collect this process's ``NodeTopology``. Every probe is guarded: a missing tool, file or library
adds one line to ``probe_errors`` and the record is still produced (a CPU-only box is a valid case).

Order of the GPU probes (first that answers wins for the GPU list):
  1. NVML through ``pynvml`` if importable (NVLink peers from ``nvmlDeviceGetP2PStatus``)
  2. ``nvidia-smi --query-gpu=index,uuid,pci.bus_id,name,memory.total --format=csv,noheader``
  3. ``torch.cuda`` — only when an NVIDIA driver is present (/proc/driver/nvidia or /dev/nvidia0),
     so a CPU box never pays for importing torch
  4. none: CPU-only
Then, whichever answered: ``nvidia-smi topo -m`` adds NVLink peers (NV#), GPU<->NIC PCI affinity
and NUMA; /sys/bus/pci/devices/<bus>/numa_node gives NUMA when present; when ``topo -m`` is not
available the GPU<->NIC affinity is derived from /sys PCI paths (``pci_affinity``).
RDMA NICs come from /sys/class/infiniband, GPUDirect RDMA from /proc/modules (nvidia_peermem or
nv_peer_mem), GDS from nvidia_fs + libcufile, NVMe from /sys/class/nvme.

Nothing here imports Dynamo; GPU libraries are imported lazily inside the probes.
"""

from __future__ import annotations

import ctypes.util
import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .model import GpuInfo, HostInfo, NodeTopology, RdmaNic, RdmaPort, StorageInfo
from .parse import (
    GpuRow,
    cuda_visible_map,
    normalize_pci_bus_id,
    parse_default_route_iface,
    parse_gpu_query_csv,
    parse_ib_rate,
    parse_int_or_none,
    parse_loaded_modules,
    parse_port_state,
    parse_topo_matrix,
)

Runner = Callable[[list[str]], "str | None"]

GPU_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,pci.bus_id,name,memory.total", "--format=csv,noheader"]
TOPO_QUERY = ["nvidia-smi", "topo", "-m"]


def run_tool(cmd: list[str], timeout: float = 15.0) -> str | None:
    """stdout of ``cmd``, or None when the tool is missing, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------
# host


def probe_host(proc_root: Path, etc_root: Path, errors: list[str]) -> HostInfo:
    hostname = socket.gethostname()
    host_id, source = "", ""
    boot = _read(proc_root / "sys/kernel/random/boot_id")
    machine = _read(etc_root / "machine-id") or _read(etc_root.parent / "var/lib/dbus/machine-id")
    if boot and boot.strip():
        host_id, source = "boot:" + boot.strip(), "boot_id"
    elif machine and machine.strip():
        host_id, source = "machine:" + machine.strip(), "machine_id"
    else:
        host_id, source = "hostname:" + hostname, "hostname"
        errors.append("host: no boot_id or machine-id; host id falls back to the hostname")
    try:
        pid_ns: str | None = os.readlink(proc_root / "self/ns/pid")
    except OSError:
        pid_ns = None
    route = _read(proc_root / "net/route")
    iface = parse_default_route_iface(route) if route else None
    ips: tuple[str, ...] = ()
    try:  # the source address of the default route; connect() on UDP sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
            if not ip.startswith("127."):
                ips = (ip,)
    except OSError:
        errors.append("host: no default route; no IP recorded")
    return HostInfo(
        hostname=hostname, host_id=host_id, host_id_source=source, pid_namespace=pid_ns, ips=ips,
        default_iface=iface,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# GPUs


def _gpus_from_nvml(errors: list[str]) -> tuple[list[GpuRow], dict[int, list[int]]] | None:
    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        errors.append(f"gpu: pynvml present but nvmlInit failed: {e}")
        return None
    try:
        rows: list[GpuRow] = []
        handles = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            handles.append(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            name = name.decode() if isinstance(name, bytes) else name
            bus = normalize_pci_bus_id(pynvml.nvmlDeviceGetPciInfo(h).busId)
            mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).total) // (1 << 20)
            rows.append(GpuRow(i, uuid, bus, name, mem))
        peers: dict[int, list[int]] = {i: [] for i in range(len(handles))}
        nvlink_idx = getattr(pynvml, "NVML_P2P_CAPS_INDEX_NVLINK", 3)
        ok = getattr(pynvml, "NVML_P2P_STATUS_OK", 0)
        for i, hi in enumerate(handles):
            for j, hj in enumerate(handles):
                if i == j:
                    continue
                try:
                    if pynvml.nvmlDeviceGetP2PStatus(hi, hj, nvlink_idx) == ok:
                        peers[i].append(j)
                except Exception:  # older drivers: leave it to topo -m
                    pass
        return rows, peers
    except Exception as e:
        errors.append(f"gpu: NVML query failed: {e}")
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _driver_present(proc_root: Path) -> bool:
    return (proc_root / "driver/nvidia").exists() or Path("/dev/nvidia0").exists()


def _gpus_from_torch(errors: list[str]) -> list[GpuRow] | None:
    try:
        torch = importlib.import_module("torch")
        if not torch.cuda.is_available():
            return None
        rows = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            uuid = str(getattr(p, "uuid", f"cuda{i}"))
            uuid = uuid if uuid.startswith("GPU-") else "GPU-" + uuid
            bus = "0000:{:02x}:{:02x}.0".format(getattr(p, "pci_bus_id", 0), getattr(p, "pci_device_id", 0))
            rows.append(GpuRow(i, uuid, bus, p.name, int(p.total_memory) // (1 << 20)))
        return rows
    except Exception as e:
        errors.append(f"gpu: torch.cuda probe failed: {e}")
        return None


def _torch_cuda_map() -> dict[str, int] | None:
    """UUID -> cuda index, exact, but only if the caller already imported torch (never import it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized() and not torch.cuda.is_available():
            return None
        out = {}
        for i in range(torch.cuda.device_count()):
            u = str(torch.cuda.get_device_properties(i).uuid)
            out[u if u.startswith("GPU-") else "GPU-" + u] = i
        return out
    except Exception:
        return None


def pci_affinity(gpu_path: tuple[str, ...], nic_path: tuple[str, ...], gpu_numa: int | None,
                 nic_numa: int | None) -> str:  # fmt: skip
    """nvidia-smi's codes from two PCI ancestor chains (root complex first, device last). A PCIe
    switch shows in sysfs as upstream port -> downstream port; counting the bridges each device sits
    below the lowest common ancestor: PIX at most one each (same switch), PXB more (nested switches),
    PHB only the root complex in common, NODE same NUMA node, SYS across NUMA nodes."""
    common = 0
    for x, y in zip(gpu_path[:-1], nic_path[:-1], strict=False):
        if x != y:
            break
        common += 1
    if common >= 2:  # share at least one bridge below the root complex
        below = max(len(gpu_path) - 1 - common, len(nic_path) - 1 - common)
        return "PIX" if below <= 1 else "PXB"
    if common == 1:
        return "PHB"
    if gpu_numa is not None and gpu_numa == nic_numa:
        return "NODE"
    return "SYS"


_PCI_PART = re.compile(r"pci[0-9a-f]{4}:[0-9a-f]{2}|[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def _pci_parts(real: str | Path) -> tuple[str, ...]:
    """'/sys/devices/pci0000:17/0000:17:01.0/0000:18:00.0' -> ('pci0000:17', '0000:17:01.0', '0000:18:00.0')."""
    return tuple(p for p in Path(real).parts if _PCI_PART.fullmatch(p))


def _pci_path(sys_root: Path, bus: str) -> tuple[str, ...]:
    try:
        return _pci_parts(os.path.realpath(sys_root / "bus/pci/devices" / bus))
    except OSError:
        return ()


def probe_gpus(sys_root: Path, proc_root: Path, runner: Runner, errors: list[str],
               nics: tuple[RdmaNic, ...], gpu_libs: bool = True) -> tuple[list[GpuInfo], str]:  # fmt: skip
    source = "none"
    peers: dict[int, list[int]] = {}
    rows: list[GpuRow] | None = None
    nvml = _gpus_from_nvml(errors) if gpu_libs else None
    if nvml is not None:
        rows, peers = nvml
        source = "nvml"
    if rows is None:
        out = runner(GPU_QUERY)
        if out is not None:
            rows = parse_gpu_query_csv(out)
            source = "nvidia-smi"
    if rows is None and gpu_libs and _driver_present(proc_root):
        rows = _gpus_from_torch(errors)
        if rows is not None:
            source = "torch"
    if rows is None:
        errors.append("gpu: no NVML, no nvidia-smi, no CUDA driver: CPU-only")
        return [], "none"

    topo_txt = runner(TOPO_QUERY)
    topo = parse_topo_matrix(topo_txt) if topo_txt else None
    if topo is None:
        errors.append("gpu: nvidia-smi topo -m unavailable: NVLink peers from NVML only, NIC affinity from /sys")
    topo_peers = topo.nvlink_peers() if topo else {}
    topo_aff = topo.gpu_nic_affinity() if topo else {}
    topo_numa = topo.gpu_numa() if topo else {}

    by_index = {r.index: r for r in rows}
    torch_map = _torch_cuda_map() if gpu_libs else None
    if torch_map is not None:
        cuda_of = {r.index: torch_map[r.uuid] for r in rows if r.uuid in torch_map}
    else:
        cuda_of = cuda_visible_map(os.environ.get("CUDA_VISIBLE_DEVICES"), [(r.index, r.uuid) for r in rows])
        if os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len({r.name for r in rows}) > 1:
            errors.append("gpu: mixed GPU models without CUDA_DEVICE_ORDER=PCI_BUS_ID: cuda_index may differ")
    gpus: list[GpuInfo] = []
    for r in rows:
        numa = parse_int_or_none(_read(sys_root / "bus/pci/devices" / r.pci_bus_id / "numa_node"))
        if numa is None:
            numa = topo_numa.get(r.index)
        peer_idx = sorted(set(peers.get(r.index, [])) | set(topo_peers.get(r.index, [])))
        aff = dict(topo_aff.get(r.index, {}))
        if not aff and nics:
            gp = _pci_path(sys_root, r.pci_bus_id)
            aff = {n.name: pci_affinity(gp, n.pci_path, numa, n.numa_node) for n in nics}
        gpus.append(GpuInfo(
            index=r.index, uuid=r.uuid, pci_bus_id=r.pci_bus_id, name=r.name, memory_mib=r.memory_mib,
            numa_node=numa, nvlink_peers=tuple(by_index[p].uuid for p in peer_idx if p in by_index),
            cuda_index=cuda_of.get(r.index), nic_affinity=aff,
        ))  # fmt: skip
    return gpus, source


# ---------------------------------------------------------------------------------------------------
# RDMA, kernel modules, storage


def probe_rdma(sys_root: Path, errors: list[str]) -> tuple[RdmaNic, ...]:
    base = sys_root / "class/infiniband"
    if not base.is_dir():
        return ()
    nics = []
    for dev in sorted(base.iterdir()):
        try:
            ports = []
            pdir = dev / "ports"
            for p in sorted(pdir.iterdir() if pdir.is_dir() else [], key=lambda x: int(x.name) if x.name.isdigit() else 0):
                if not p.name.isdigit():
                    continue
                ports.append(RdmaPort(
                    port=int(p.name),
                    state=parse_port_state(_read(p / "state") or ""),
                    link_layer=(_read(p / "link_layer") or "").strip(),
                    rate_gbps=parse_ib_rate(_read(p / "rate") or ""),
                ))  # fmt: skip
            devlink = dev / "device"
            pci = None
            path: tuple[str, ...] = ()
            if devlink.exists():
                real = Path(os.path.realpath(devlink))
                pci = real.name
                path = _pci_parts(real)
            netdir = devlink / "net"
            netdevs = tuple(sorted(x.name for x in netdir.iterdir())) if netdir.is_dir() else ()
            nics.append(RdmaNic(
                name=dev.name, ports=tuple(ports), pci_address=pci,
                numa_node=parse_int_or_none(_read(devlink / "numa_node")), netdevs=netdevs, pci_path=path,
            ))  # fmt: skip
        except OSError as e:
            errors.append(f"rdma: {dev.name}: {e}")
    return tuple(nics)


def _find_cufile(errors: list[str]) -> str | None:
    for cand in ("/usr/local/cuda/lib64/libcufile.so", "/usr/local/cuda/targets/x86_64-linux/lib/libcufile.so"):
        for p in (cand, cand + ".0", cand + ".1"):
            if os.path.exists(p):
                return p
    try:
        return ctypes.util.find_library("cufile")
    except Exception as e:  # find_library shells out; never let that fail the probe
        errors.append(f"storage: cufile lookup failed: {e}")
        return None


def probe_storage(sys_root: Path, modules: set[str], errors: list[str]) -> StorageInfo:
    nvme_dir = sys_root / "class/nvme"
    nvme = tuple(sorted(p.name for p in nvme_dir.iterdir())) if nvme_dir.is_dir() else ()
    nvidia_fs = "nvidia_fs" in modules or (sys_root / "module/nvidia_fs").exists()
    cufile = _find_cufile(errors)
    return StorageInfo(nvme=nvme, nvidia_fs=nvidia_fs, cufile_lib=cufile, gds_available=bool(nvidia_fs and cufile))


# ---------------------------------------------------------------------------------------------------


def collect_local_topology(
    gpu_index: int | None = None,
    *,
    sys_root: str | Path = "/sys",
    proc_root: str | Path = "/proc",
    etc_root: str | Path = "/etc",
    runner: Runner = run_tool,
    pid: int | None = None,
    gpu_libs: bool = True,
) -> NodeTopology:
    """This process's topology. ``gpu_index`` is the worker's CUDA device as this process sees it
    (``cuda:N``, i.e. after CUDA_VISIBLE_DEVICES); it is stored as ``worker_gpu`` = that GPU's
    physical index. Never raises for a missing tool; raises ValueError only when GPUs were found
    and ``gpu_index`` names none of them (a configuration error, not a probe failure).
    The keyword arguments exist for tests (a fake /sys tree, canned nvidia-smi output;
    ``gpu_libs=False`` keeps pynvml and torch out so only ``runner`` answers for GPUs)."""
    sysr, procr, etcr = Path(sys_root), Path(proc_root), Path(etc_root)
    errors: list[str] = []
    host = probe_host(procr, etcr, errors)
    nics = probe_rdma(sysr, errors)
    gpus, source = probe_gpus(sysr, procr, runner, errors, nics, gpu_libs)
    mods_txt = _read(procr / "modules")
    modules = parse_loaded_modules(mods_txt) if mods_txt else set()
    if mods_txt is None:
        errors.append("modules: /proc/modules unreadable: GPUDirect RDMA/GDS assumed absent")
    gdr_mod = next((m for m in ("nvidia_peermem", "nv_peer_mem") if m in modules or (sysr / "module" / m).exists()), None)
    storage = probe_storage(sysr, modules, errors)

    worker_gpu = None
    if gpu_index is not None:
        match = [g for g in gpus if g.cuda_index == gpu_index]
        if match:
            worker_gpu = match[0].index
        elif gpus:
            raise ValueError(
                f"gpu_index {gpu_index} (cuda:{gpu_index}) is not a visible GPU; visible: "
                f"{[(g.cuda_index, g.uuid) for g in gpus if g.cuda_index is not None]}"
            )
        else:
            errors.append(f"gpu: worker asked for cuda:{gpu_index} but no GPU was found; treated as a CPU worker")
    return NodeTopology(
        host=host, pid=pid or os.getpid(), gpus=tuple(gpus), gpu_source=source, worker_gpu=worker_gpu,
        rdma_nics=nics, gpudirect_rdma=gdr_mod is not None and bool(gpus), gpudirect_module=gdr_mod,
        storage=storage, probe_errors=tuple(errors), collected_at=time.time(),
    )  # fmt: skip
