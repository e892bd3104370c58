"""Which transport a pair of endpoints should use, with the parameters and environment that make it
work and the bandwidth to expect (``baselines.py``). Pure: facts in, ``TransportChoice`` out.

Decision (auto), first match wins; ``a`` is the side that will run with ``env`` (``peer_env`` is b's).
``backends`` is what the worker that pulls tries, in order (``transport.make_backend`` names), among the
backends both sides run for their memory (``BACKEND_MEMORY``):

  kind         when                                       backends             UCX (for nixl)
  same-process same host id + pid namespace + pid         local                (NIXL never: two agents in
                                                                               one process fall to tcp/lo)
  same-gpu     same host, both GPUs, same UUID            cuda_ipc, nixl       cuda_ipc, GET zero-copy on
  nvlink       same host, both GPUs, NVLink peers         cuda_ipc, nixl       cuda_ipc, error mode none
  pcie         same host, both GPUs, no NVLink            cuda_ipc, nixl       cuda_ipc over PCIe P2P
  pcie         same host, one GPU, one host buffer        nixl                 (NIXL's default GPU -> foreign
                                                                               host path falls to TCP, 0.68
                                                                               GB/s: offload through the
                                                                               GPU's owner instead)
  host-shm     same host, both host memory                shm, cma, nixl, tcp  cma (posix,sysv and no shm /
                                                                               cma backend when the pid
                                                                               namespaces differ)
  rdma         other hosts, active RDMA port on both      nixl                 rc, NIC nearest each GPU
  tcp          otherwise                                  nixl, tcp            UCX_TLS=tcp (forced: tcp first)

``tcp`` is kept in every UCX_TLS list: UCX needs a connection-capable transport for its control
messages (cuda_ipc,cuda_copy,self,sm failed at backend creation; cma alone failed; NI§7).

Forcing (``kv_transfer.transport`` in dynamo.yaml): ``nvlink`` needs NVLink peers in two processes;
``pcie`` needs one host, two processes and a GPU on at least one side; ``rdma`` needs an active RDMA
port on both hosts and two processes; ``shm`` needs host memory on both sides, two processes of one host
and one pid namespace (backends: shm only, no fallback); ``tcp`` always works. Anything else raises ValueError naming
the pair and the kinds allowed for it (``allowed_transports``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import msgspec

from . import baselines as B
from .model import PCI_AFFINITY_ORDER, GpuInfo, NodeTopology, RdmaNic, RdmaPort

Kind = Literal["same-process", "same-gpu", "nvlink", "pcie", "host-shm", "rdma", "tcp"]
KINDS: tuple[str, ...] = ("same-process", "same-gpu", "nvlink", "pcie", "host-shm", "rdma", "tcp")
Backend = Literal["local", "cuda_ipc", "shm", "cma", "nixl", "tcp"]  # transport.make_backend names
#: which memory each backend moves between two processes (nixl: both; local: one process)
BACKEND_MEMORY: dict[str, frozenset[str]] = {
    "local": frozenset({"host", "device"}), "cuda_ipc": frozenset({"device"}), "shm": frozenset({"host"}),
    "cma": frozenset({"host"}),
    "nixl": frozenset({"host", "device"}), "tcp": frozenset({"host"}),
}
Force = Literal["auto", "nvlink", "pcie", "rdma", "shm", "tcp"]
FORCES: tuple[str, ...] = ("auto", "nvlink", "pcie", "rdma", "shm", "tcp")
_FORCE_ALIASES = {"ib": "rdma", "infiniband": "rdma", "roce": "rdma"}

TLS_CONTROL = "tcp"  # see module docstring


class Endpoint(NamedTuple):
    """One side of a transfer: a node's topology, the process, and the memory (GPU index = the
    physical ``GpuInfo.index``, or ``"host"``)."""

    topology: NodeTopology
    pid: int
    device: int | Literal["host"] = "host"

    @classmethod
    def of(cls, topology: NodeTopology, device: int | Literal["host"] | None = None) -> Endpoint:
        """The endpoint of the process that collected ``topology``; device defaults to its worker GPU."""
        if device is None:
            device = topology.worker_gpu if topology.worker_gpu is not None else "host"
        return cls(topology, topology.pid, device)

    @property
    def gpu(self) -> GpuInfo | None:
        return None if self.device == "host" else self.topology.gpu(int(self.device))

    def label(self) -> str:
        """Stable id for link tables: '<hostname>/<host id prefix>/pid<pid>/gpu<idx>|host'."""
        t = self.topology
        hid = t.host.host_id.split(":", 1)[-1][:8]
        dev = "host" if self.device == "host" else f"gpu{self.device}"
        return f"{t.host.hostname}/{hid}/pid{self.pid}/{dev}"


class TransportChoice(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # one of KINDS
    backend: str  # the first of ``backends``
    expected_gbps: float
    expected_latency_us: float
    nixl_params: dict[str, str] = {}  # UCX backend parameters (create_backend("UCX", params))
    agent_config: dict[str, object] = {}  # nixl_agent_config keyword arguments
    env: dict[str, str] = {}  # environment for side a's process (set before the NIXL agent starts)
    peer_env: dict[str, str] = {}  # the same for side b
    nic_a: str | None = None  # RDMA device:port used by each side (rdma only)
    nic_b: str | None = None
    gpudirect: bool = False
    reasons: tuple[str, ...] = ()  # why this kind
    notes: tuple[str, ...] = ()  # caveats and advice for the caller
    forced: bool = False
    #: transport backends (``transport.make_backend`` names) for a pull between the two processes, best
    #: first; the worker that pulls tries them in this order among those both sides run for their memory
    backends: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return msgspec.json.decode(msgspec.json.encode(self))  # lists, not tuples: JSON-shaped

    def nixl_choice(self, side: Literal["a", "b"] = "a") -> dict[str, object]:
        """What ``transport``'s NixlBackend / probe take: {"env", "params", "agent_config"}."""
        return {"env": dict(self.env if side == "a" else self.peer_env), "params": dict(self.nixl_params),
                "agent_config": dict(self.agent_config)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# facts about a pair


def _same_host(a: Endpoint, b: Endpoint) -> bool:
    return a.topology.host.host_id == b.topology.host.host_id


def _same_process(a: Endpoint, b: Endpoint) -> bool:
    return _same_host(a, b) and a.topology.host.pid_namespace == b.topology.host.pid_namespace and a.pid == b.pid


def _nvlink_peers(ga: GpuInfo, gb: GpuInfo) -> bool:
    return gb.uuid in ga.nvlink_peers or ga.uuid in gb.nvlink_peers


def _active_port(nic: RdmaNic) -> RdmaPort | None:
    return nic.active_port()


def nearest_nic(topo: NodeTopology, gpu: GpuInfo | None, prefer: str | None = None) -> tuple[RdmaNic, RdmaPort] | None:
    """The active RDMA NIC nearest ``gpu`` (PIX < PXB < PHB < NODE < SYS, then same NUMA node, then
    faster, then name). ``prefer`` (``kv_transfer.rdma_device``, 'mlx5_0' or 'mlx5_0:1') wins when active."""
    cands = [(n, p) for n in topo.rdma_nics if (p := _active_port(n)) is not None]
    if not cands:
        return None
    if prefer:
        pname, _, pport = prefer.partition(":")
        for n, p in cands:
            if n.name == pname and (not pport or str(p.port) == pport):
                return n, p

    def rank(c: tuple[RdmaNic, RdmaPort]) -> tuple:
        n, p = c
        code = gpu.nic_affinity.get(n.name, "SYS") if gpu else "SYS"
        aff = PCI_AFFINITY_ORDER.index(code) if code in PCI_AFFINITY_ORDER else len(PCI_AFFINITY_ORDER)
        numa = 0 if (gpu and gpu.numa_node is not None and gpu.numa_node == n.numa_node) else 1
        return (aff, numa, -(p.rate_gbps or 0.0), n.name)

    return min(cands, key=rank)


def allowed_transports(a: Endpoint, b: Endpoint) -> list[str]:
    """The ``force`` values that can work for this pair (always starts with 'auto')."""
    out = ["auto"]
    same_host, same_proc = _same_host(a, b), _same_process(a, b)
    ga, gb = a.gpu, b.gpu
    if same_host and not same_proc and ga and gb and ga.uuid != gb.uuid and _nvlink_peers(ga, gb):
        out.append("nvlink")
    if same_host and not same_proc and (ga or gb):
        out.append("pcie")
    if not same_proc and a.topology.active_nics() and b.topology.active_nics():
        out.append("rdma")
    if same_host and not same_proc and not (ga or gb) \
            and a.topology.host.pid_namespace == b.topology.host.pid_namespace:
        out.append("shm")
    out.append("tcp")
    return out


# ---------------------------------------------------------------------------------------------------
# the choice


def _ucx_env(tls: str, net_devices: str | None = None, **extra: str) -> dict[str, str]:
    env = {"UCX_TLS": tls}
    if net_devices:
        env["UCX_NET_DEVICES"] = net_devices
    env.update(extra)
    return env


def _pair(a: Endpoint, b: Endpoint) -> str:
    return f"{a.label()} <-> {b.label()}"


def select_transport(
    a: Endpoint, b: Endpoint, force: str = "auto", *, rdma_device: str | None = None
) -> TransportChoice:
    """Choose the transport for moving bytes between ``a`` and ``b`` (see the module docstring).

    ``force``: auto | nvlink | pcie | rdma | shm | tcp ('ib' is accepted for rdma). Raises ValueError for
    an unknown value, an unknown GPU index, or a forced kind this pair cannot use.
    ``rdma_device``: ``kv_transfer.rdma_device``, used for side a when it is an active NIC."""
    force = _FORCE_ALIASES.get(force, force)
    if force not in FORCES:
        raise ValueError(f"unknown transport {force!r} (allowed: {', '.join(FORCES)})")
    a.gpu, b.gpu  # noqa: B018 - validates the GPU indices, raising ValueError if unknown
    if force != "auto":
        allowed = allowed_transports(a, b)
        if force not in allowed:
            raise ValueError(
                f"transport {force!r} cannot work for {_pair(a, b)}: {_why_not(force, a, b)} "
                f"(allowed for this pair: {', '.join(allowed)})"
            )
        return _forced(force, a, b, rdma_device)
    return _auto(a, b, rdma_device)


def _why_not(force: str, a: Endpoint, b: Endpoint) -> str:
    if force in ("nvlink", "pcie") and not _same_host(a, b):
        return "the endpoints are on different hosts"
    if _same_process(a, b):
        return "both endpoints are in one process (NIXL cannot use CUDA IPC or RDMA within a process)"
    if force == "nvlink":
        ga, gb = a.gpu, b.gpu
        if not (ga and gb):
            return "NVLink joins two GPUs; one side is host memory"
        if ga.uuid == gb.uuid:
            return "both endpoints are the same GPU"
        return f"GPU {ga.index} and GPU {gb.index} are not NVLink peers"
    if force == "pcie":
        return "both endpoints are host memory"
    if force == "rdma":
        missing = [e.topology.host.hostname for e in (a, b) if not e.topology.active_nics()]
        return f"no active RDMA port on {', '.join(missing)}"
    if force == "shm":
        if not _same_host(a, b):
            return "shared memory needs both endpoints on one host"
        if a.gpu or b.gpu:
            return "shared memory moves host memory; one side is GPU memory"
        return "the endpoints are in different pid namespaces (a peer's memfd is opened through /proc/<pid>)"
    return "not possible"


def _auto(a: Endpoint, b: Endpoint, rdma_device: str | None) -> TransportChoice:
    ga, gb = a.gpu, b.gpu
    if _same_process(a, b):
        return _same_process_choice(a, b)
    if _same_host(a, b):
        if ga and gb and ga.uuid == gb.uuid:
            return _ipc_choice("same-gpu", B.SAME_GPU_IPC_GBPS, a, b,
                               [f"same GPU {ga.uuid} in two processes: CUDA IPC within the GPU"])  # fmt: skip
        if ga and gb and _nvlink_peers(ga, gb):
            return _ipc_choice("nvlink", B.NVLINK_IPC_GBPS, a, b,
                               [f"GPU {ga.index} and GPU {gb.index} are NVLink peers, two processes"])  # fmt: skip
        if ga and gb:
            return _ipc_choice("pcie", B.PCIE_P2P_GBPS, a, b,
                               [f"GPU {ga.index} and GPU {gb.index} share a host without NVLink: CUDA IPC over PCIe"])  # fmt: skip
        if ga or gb:
            return _gpu_host_choice(a, b)
        return _host_shm_choice(a, b)
    if a.topology.active_nics() and b.topology.active_nics():
        return _rdma_choice(a, b, rdma_device, forced=False)
    return _tcp_choice(a, b, ["different hosts without an active RDMA port on both: TCP"], forced=False)


def _forced(force: str, a: Endpoint, b: Endpoint, rdma_device: str | None) -> TransportChoice:
    why = f"forced by configuration (transport: {force})"
    if force == "tcp":
        return _tcp_choice(a, b, [why], forced=True)
    if force == "rdma":
        return _rdma_choice(a, b, rdma_device, forced=True)
    if force == "shm":
        c = _host_shm_choice(a, b)
        return msgspec.structs.replace(c, backend="shm", backends=("shm",), forced=True,
                                       reasons=(why, *c.reasons), expected_gbps=B.HOST_SHM_MAPPED_GBPS)
    if force == "nvlink":
        c = _ipc_choice("nvlink", B.NVLINK_IPC_GBPS, a, b, [why])
        return msgspec.structs.replace(c, forced=True)
    # pcie
    ga, gb = a.gpu, b.gpu
    if ga and gb and (ga.uuid == gb.uuid or _nvlink_peers(ga, gb)):
        # keep the data off NVLink / the IPC path: no cuda_ipc, UCX stages through host memory
        tls = f"cuda_copy,cma,self,{TLS_CONTROL}"
        return TransportChoice(
            kind="pcie", backend="nixl", backends=("nixl",), expected_gbps=B.HOST_SHM_CMA_GBPS,
            expected_latency_us=B.LATENCY_US["pcie"], nixl_params={"ucx_error_handling_mode": "none"},
            agent_config={"enable_prog_thread": False}, env=_ucx_env(tls, "lo"), peer_env=_ucx_env(tls, "lo"),
            reasons=(why, "cuda_ipc left out of UCX_TLS so the bytes cross PCIe through host memory"),
            notes=("ESTIMATE: staged GPU->host->GPU over PCIe and cma was not measured; probe it",),
            forced=True,
        )  # fmt: skip
    if ga and gb:
        c = _ipc_choice("pcie", B.PCIE_P2P_GBPS, a, b, [why])
    else:
        c = _gpu_host_choice(a, b)
        c = msgspec.structs.replace(c, reasons=(why, *c.reasons))
    return msgspec.structs.replace(c, forced=True)


def _same_process_choice(a: Endpoint, b: Endpoint) -> TransportChoice:
    ga, gb = a.gpu, b.gpu
    if ga and gb and ga.uuid == gb.uuid:
        gbps, what = B.SAME_PROCESS_SAME_GPU_GBPS, "device-to-device copy on one GPU"
    elif ga and gb and _nvlink_peers(ga, gb):
        gbps, what = B.SAME_PROCESS_NVLINK_GBPS, "peer copy over NVLink"
    elif ga and gb:
        gbps, what = B.PCIE_P2P_GBPS, "peer copy over PCIe"
    elif ga or gb:
        gbps, what = B.PCIE_HOST_DEVICE_GBPS, "host<->device copy over PCIe"
    else:
        gbps, what = B.SAME_PROCESS_HOST_GBPS, "memcpy"
    return TransportChoice(
        kind="same-process", backend="local", backends=("local",), expected_gbps=gbps,
        expected_latency_us=B.LATENCY_US["same-process"],
        reasons=(f"same host, pid namespace and pid {a.pid}: {what}",),
        notes=(f"never NIXL here: two agents in one process fall to tcp/lo at {B.NIXL_ONE_PROCESS_GBPS} GB/s "
               "(CUDA IPC cannot open a handle in the exporting process)",),
    )  # fmt: skip


def _ipc_choice(kind: str, gbps: float, a: Endpoint, b: Endpoint, reasons: list[str]) -> TransportChoice:
    # UCX_NET_DEVICES=lo: TCP (control only) stays on loopback and the agent advertises no other NIC.
    tls = f"cuda_ipc,cuda_copy,self,{TLS_CONTROL}"
    notes = [
        "backend cuda_ipc (ours: CUDA IPC handles + row copy kernels) first, NIXL second: NIXL moves scattered "
        "KV at 5-148 GB/s on one H200 against 330-480 for cuda_ipc (benchmarks/results/transfer-perf.md)",
        "UCX_TLS keeps tcp for UCX control messages; data goes over cuda_ipc",
        "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on: UCX 1.23's 'auto' turns cuda_ipc GET zero-copy off where it sees no "
        "active NVLink (one GPU, PCIe-only GPUs), so a NIXL READ ran over TCP loopback at 0.45-0.49 GB/s; "
        "887 GB/s with it on (one H200, 128 MiB, two processes)",
        "expected bandwidth assumes few large descriptors (32 KiB x 32,768 measured 4.4 GB/s): "
        "merge runs or stage through one buffer",
    ]
    if kind == "nvlink":
        notes.append("error mode none vs peer measured 237 vs 303 GB/s, one run each, within noise")
    if kind == "pcie":
        notes.append("ESTIMATE: CUDA IPC over PCIe P2P was not measured; probe it")
    return TransportChoice(
        kind=kind, backend="cuda_ipc", backends=("cuda_ipc", "nixl"), expected_gbps=gbps,
        expected_latency_us=B.LATENCY_US[kind],
        nixl_params={"ucx_error_handling_mode": "none"}, agent_config={"enable_prog_thread": False},
        env=_ucx_env(tls, "lo", UCX_CUDA_IPC_ENABLE_GET_ZCOPY="on"),
        peer_env=_ucx_env(tls, "lo", UCX_CUDA_IPC_ENABLE_GET_ZCOPY="on"), reasons=tuple(reasons), notes=tuple(notes),
    )  # fmt: skip


def _gpu_host_choice(a: Endpoint, b: Endpoint) -> TransportChoice:
    gpu_side, host_side = (a, b) if a.gpu else (b, a)
    g = gpu_side.gpu
    assert g is not None
    base = _host_shm_choice(a, b)
    return TransportChoice(
        kind="pcie", backend="nixl", backends=("nixl",),
        expected_gbps=B.NIXL_GPU_TO_FOREIGN_HOST_GBPS,  # what its only backend delivers (was min(PCIe, host-shm))
        expected_latency_us=B.LATENCY_US["pcie"], nixl_params=base.nixl_params, agent_config=base.agent_config,
        env=base.env, peer_env=base.peer_env,
        reasons=(f"GPU {g.index} of pid {gpu_side.pid} <-> host memory of pid {host_side.pid} on one host",
                 "the GPU's owner copies to its own pinned host buffer (PCIe, 55 GB/s measured), "
                 "then host->host over host-shm (env given for that hop)"),
        notes=("NIXL's default GPU -> foreign host memory path falls to TCP (0.35-0.72 GB/s measured, expected "
               f"{B.NIXL_GPU_TO_FOREIGN_HOST_GBPS}): do not hand device memory to another process's host pool; the "
               f"owner's own copy into its pinned host tier runs at ~{B.OWNER_COPY_GPU_TO_HOST_GBPS:g} "
               "(what topology --probe measures for GPU -> host)",),
    )  # fmt: skip


def _host_shm_choice(a: Endpoint, b: Endpoint) -> TransportChoice:
    same_ns = a.topology.host.pid_namespace == b.topology.host.pid_namespace
    if same_ns:
        tls, gbps = f"cma,self,{TLS_CONTROL}", B.HOST_SHM_MAPPED_GBPS
        why = ("host memory of two processes on one host: backend shm (both pools in shared memory, the peer's "
               "mapped once, one memcpy per run), then cma (process_vm_readv); for NIXL, UCX cma")
    else:
        tls, gbps = f"posix,sysv,self,{TLS_CONTROL}", B.HOST_SHM_POSIX_GBPS
        why = "host memory, one kernel, different pid namespaces (cma needs one): UCX posix/sysv shared memory"
    if a.topology.gpus or b.topology.gpus:  # NIXL 1.5.1 refuses a UCX_TLS without cuda_copy on a GPU node
        tls = f"{tls},cuda_copy"
    return TransportChoice(
        kind="host-shm", backend="shm" if same_ns else "nixl",
        backends=("shm", "cma", "nixl", "tcp") if same_ns else ("nixl", "tcp"),
        expected_gbps=gbps, expected_latency_us=B.LATENCY_US["host-shm"],
        agent_config={"enable_prog_thread": False}, env=_ucx_env(tls, "lo"), peer_env=_ucx_env(tls, "lo"),
        reasons=(why,),
        notes=(("shm measured 1.22x cma with one copy thread, 1.16x with two, 0.88 x memcpy (1 GiB of scattered "
                "KV, 2-core box, benchmarks/results/transfer-cpu-shm.md); it needs both pools in shared memory "
                "(the engine's CPU pool is) and falls back to cma when a peer's pool cannot be mapped",) if same_ns
               else ()) + (
               "NIXL: enable_prog_thread=False on both sides (11.0 vs 7.6 GB/s, and ms -> us notification latency "
               "on a 2-core box): the caller must poll check_xfer_state/get_new_notifs",),
    )  # fmt: skip


def _rdma_choice(a: Endpoint, b: Endpoint, rdma_device: str | None, forced: bool) -> TransportChoice:
    na = nearest_nic(a.topology, a.gpu, rdma_device)
    nb = nearest_nic(b.topology, b.gpu)
    assert na is not None and nb is not None  # allowed_transports / _auto checked both
    reasons = ["forced by configuration (transport: rdma)"] if forced else ["different hosts, active RDMA ports on both"]
    notes: list[str] = []
    gd = []
    for ep, (nic, port) in ((a, na), (b, nb)):
        g = ep.gpu
        side_gdr = g is None or ep.topology.gpudirect_rdma
        gd.append(side_gdr)
        aff = g.nic_affinity.get(nic.name, "?") if g else "-"
        where = f"GPU {g.index} ({aff})" if g else "host memory"
        reasons.append(f"{ep.topology.host.hostname}: {nic.name}:{port.port} {port.link_layer or '?'} "
                       f"{port.rate_gbps or '?'} Gb/s for {where}")  # fmt: skip
        if g and aff in ("NODE", "SYS", "?"):
            notes.append(f"{ep.topology.host.hostname}: no NIC shares a PCIe switch with GPU {g.index} ({aff})")
        if g and not ep.topology.gpudirect_rdma:
            notes.append(f"{ep.topology.host.hostname}: no nvidia_peermem/nv_peer_mem: GPU memory is staged through host")
    gpudirect = all(gd) and (a.gpu is not None or b.gpu is not None)
    rates = [p.rate_gbps for _, p in (na, nb) if p.rate_gbps]
    link = min(rates) / 8.0 if rates else None
    eff = B.RDMA_GPUDIRECT_EFFICIENCY if all(gd) else B.RDMA_STAGED_EFFICIENCY
    if link is None:
        gbps = 10.0
        notes.append("ESTIMATE: link rate unknown; 10 GB/s assumed")
    else:
        gbps = round(link * eff, 2)
        reasons.append(f"expected = {link:g} GB/s link x {eff} ({'GPUDirect/host' if all(gd) else 'staged'})")

    def env(ep: Endpoint, nic: tuple[RdmaNic, RdmaPort], side_gdr: bool) -> dict[str, str]:
        tls = f"rc,ud,{'cuda_copy,' if ep.gpu else ''}self,{TLS_CONTROL}"
        extra = {"UCX_IB_GPU_DIRECT_RDMA": "yes" if side_gdr else "no"} if ep.gpu else {}
        return _ucx_env(tls, f"{nic[0].name}:{nic[1].port}", **extra)

    notes.append("UCX_NET_DEVICES is per process: an agent that talks over several NICs needs them all listed")
    return TransportChoice(
        kind="rdma", backend="nixl", backends=("nixl",), expected_gbps=gbps, expected_latency_us=B.LATENCY_US["rdma"],
        nixl_params={"ucx_error_handling_mode": "peer"}, agent_config={},
        env=env(a, na, gd[0]), peer_env=env(b, nb, gd[1]),
        nic_a=f"{na[0].name}:{na[1].port}", nic_b=f"{nb[0].name}:{nb[1].port}", gpudirect=gpudirect,
        reasons=tuple(reasons), notes=tuple(notes), forced=forced,
    )  # fmt: skip


def _tcp_choice(a: Endpoint, b: Endpoint, reasons: list[str], forced: bool) -> TransportChoice:
    if _same_host(a, b):
        gbps = B.NIXL_ONE_PROCESS_GBPS if _same_process(a, b) else B.TCP_LOOPBACK_GBPS
        dev_a = dev_b = "lo"
    else:
        gbps = B.TCP_CROSS_NODE_GBPS
        dev_a, dev_b = a.topology.host.default_iface, b.topology.host.default_iface
    return TransportChoice(
        kind="tcp", backend="tcp" if forced else "nixl", backends=("tcp", "nixl") if forced else ("nixl", "tcp"),
        expected_gbps=gbps, expected_latency_us=B.LATENCY_US["tcp"],
        nixl_params={"ucx_error_handling_mode": "peer"}, agent_config={"enable_prog_thread": False},
        env=_ucx_env("tcp", dev_a), peer_env=_ucx_env("tcp", dev_b), reasons=tuple(reasons),
        notes=("UCX over TCP: 0.55 GB/s on 100G (published), 3.9 GB/s on loopback (measured); "
               "READ is software-emulated over tcp",),
        forced=forced,
    )  # fmt: skip


def merge_env(choices: list[TransportChoice], side: Literal["a", "b"] = "a") -> tuple[dict[str, str], list[str]]:
    """One process has one NIXL agent and one environment: merge the env of every pair it is side
    ``side`` of. UCX_TLS and UCX_NET_DEVICES become unions (order kept); any other key that differs
    is reported. Returns (env, conflicts)."""
    env: dict[str, str] = {}
    conflicts: list[str] = []
    for c in choices:
        for k, v in (c.env if side == "a" else c.peer_env).items():
            if k in ("UCX_TLS", "UCX_NET_DEVICES") and k in env:
                have = env[k].split(",")
                env[k] = ",".join(have + [x for x in v.split(",") if x not in have])
            elif k in env and env[k] != v:
                conflicts.append(f"{k}: {env[k]!r} vs {v!r} ({c.kind})")
            else:
                env[k] = v
    return env, conflicts
