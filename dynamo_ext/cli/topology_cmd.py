"""``dynamo-ext topology [--json] [--probe] [--gpu N]``: this machine's topology and the transport
every pair of local endpoints would get.

Endpoints are each GPU and the host memory; every pair (including a GPU with itself and host with
host) is shown as two separate worker processes on this node, which is how workers are deployed
(one process per GPU) — a pair inside one process is always a local copy and is not listed.

``--probe`` moves real data on each pair (``probe_route`` picks how): host<->host through NIXL between
two processes; with CUDA GPUs also GPUi->GPUj and same GPU across two processes (CUDA IPC,
``transport.probe.GpuProber``, one peer per destination GPU) and GPUi->host (the owner's copy into its
pinned host tier); ``--probe-bytes`` per transfer (default 256 MiB), 1 warm-up + 3 timed, verified.

Exit codes: 0 ok; 2 bad --gpu; 3 --probe while ``dynamo_ext.transport.probe`` is not available.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from dynamo_ext.topology import Endpoint, NodeTopology, TransportChoice, collect_local_topology, select_transport
from dynamo_ext.topology import baselines as B


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topology", help="show this machine's GPUs, NICs and the transport per endpoint pair")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--probe", action="store_true", help="move real data on each path; print measured vs expected")
    p.add_argument("--gpu", type=int, default=None, metavar="N", help="the worker's CUDA device (cuda:N)")
    p.add_argument("--probe-bytes", type=int, default=256 << 20, metavar="B", help="bytes per probe transfer")
    p.set_defaults(func=run)


def local_pairs(topo: NodeTopology) -> list[tuple[str, str, Endpoint, Endpoint, TransportChoice]]:
    """Every unordered pair of local endpoints (GPUs by index, then host), each side its own process."""
    devices: list[int | str] = [g.index for g in topo.gpus] + ["host"]
    other_pid = topo.pid + 1  # a stand-in for "another worker process on this node"
    out = []
    for da, db in itertools.combinations_with_replacement(devices, 2):
        a = Endpoint(topo, topo.pid, da)  # type: ignore[arg-type]
        b = Endpoint(topo, other_pid, db)  # type: ignore[arg-type]
        out.append((_name(da), _name(db), a, b, select_transport(a, b)))
    return out


def _name(d: int | str) -> str:
    return "host" if d == "host" else f"gpu{d}"


def _load_probe() -> Any | None:
    try:
        mod = importlib.import_module("dynamo_ext.transport.probe")
    except ImportError:
        return None
    return getattr(mod, "probe_pair", None)


def probe_route(a: Endpoint, b: Endpoint, choice: TransportChoice, cuda_index: dict[int, int | None]) -> tuple[str, int, int]:
    """How ``--probe`` measures a pair: ("host", -1, -1) = NIXL host probe between two processes;
    ("gpu", src cuda index, dst cuda index or -1 for host) = GpuProber (CUDA IPC between two processes,
    or the owner's GPU -> pinned host copy); ("n/a: why", -1, -1) = not probed.
    ``cuda_index``: topology GPU index -> CUDA device index (None: hidden from CUDA)."""
    if a.device == "host" and b.device == "host":
        return ("host", -1, -1) if _host_backends(choice) else (f"n/a: backends {choice.backends} (no peer-process probe)", -1, -1)
    if a.device == "host":  # the table lists GPUs first; keep GPU as the source
        a, b = b, a
    ca = cuda_index.get(int(a.device))  # type: ignore[arg-type]
    cb = -1 if b.device == "host" else cuda_index.get(int(b.device))  # type: ignore[arg-type]
    if ca is None or cb is None:
        return ("n/a: GPU not visible to CUDA in this process (CUDA_VISIBLE_DEVICES?)", -1, -1)
    return ("gpu", int(ca), int(cb))


_PROBED_HOST_BACKENDS = ("shm", "cma", "nixl", "tcp")  # backends transport.probe's peer process can run


def probe_expectation(a: Endpoint, b: Endpoint, choice: TransportChoice) -> tuple[str, float]:
    """(what ``--probe`` moves on this pair, the GB/s to expect from it): the choice's first backend for host
    pairs and GPU pairs (CUDA IPC between two processes); for GPU -> host the probe measures the GPU owner's
    copy into its own pinned host tier, a different route from the pair's backend (NIXL to another process's
    host memory, ~0.5), so its expectation is that copy's (``baselines.OWNER_COPY_GPU_TO_HOST_GBPS``)."""
    if (a.device == "host") != (b.device == "host"):
        return "owner copy GPU -> its pinned host tier", B.OWNER_COPY_GPU_TO_HOST_GBPS
    if a.device != "host":
        return "cuda_ipc, two processes", choice.expected_gbps
    return f"{choice.backends[0] if choice.backends else choice.backend}, two processes", choice.expected_gbps


def _host_backends(choice: TransportChoice) -> list[str]:
    return [b for b in choice.backends if b in _PROBED_HOST_BACKENDS]


def probe_one(probe_pair: Any, a: Endpoint, b: Endpoint, choice: TransportChoice, nbytes: int) -> str | dict:
    """Measure one pair with ``dynamo_ext.transport.probe.probe_pair(nbytes, backend=, choice=, direction=)``
    (a fresh peer process, host memory, median of 3 after a warm-up) for EVERY backend of the choice, in its
    order, with the choice's UCX settings for NIXL: ``{backend: {"write": GB/s, "read": GB/s} | "error: ..."}``.
    That probe moves host memory only, so GPU pairs are reported as not probed rather than measured wrongly."""
    if a.device != "host" or b.device != "host":
        return "n/a: the probe moves host memory only"
    backends = _host_backends(choice)
    if not backends:
        return f"n/a: backends {choice.backends} (no peer-process probe)"
    out: dict[str, Any] = {}
    ch = host_probe_choice(choice, bool(a.topology.gpus))
    for be in backends:
        try:
            out[be] = {direction: float(probe_pair(nbytes, backend=be, choice=ch if be == "nixl" else None,
                                                   direction=direction))
                       for direction in ("write", "read")}  # READ and WRITE can differ (nixl#610)
        except Exception as e:  # noqa: BLE001 - one backend failing is a result of the probe
            out[be] = f"error: {type(e).__name__}: {e}"
    return out


def host_probe_choice(choice: TransportChoice, node_has_gpus: bool) -> dict[str, Any]:
    """The NIXL choice the host probe's two processes use. On a node with GPUs NIXL 1.5.1 refuses a
    UCX_TLS without CUDA memory support ("NVIDIA GPU(s) are present ... Add cuda_copy", GPU run 1,
    2026-11-22): cuda_copy is appended there (host memory still moves over the listed transports)."""
    ch = choice.nixl_choice()
    env = dict(ch.get("env", {}))  # type: ignore[arg-type]
    tls = env.get("UCX_TLS")
    if node_has_gpus and tls and "cuda_copy" not in tls.split(",") and tls != "all":
        env["UCX_TLS"] = f"{tls},cuda_copy"
    ch["env"] = env
    return ch


def probe_all(probe_pair: Any, pairs: list[tuple[str, str, Endpoint, Endpoint, TransportChoice]],
              cuda_index: dict[int, int | None], nbytes: int) -> dict[tuple[str, str], Any]:
    """Every pair by its probe_route; GPU pairs share one GpuProber (one peer process per destination
    GPU); errors are reported per pair. Progress on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress only
        def tqdm(it: Any, **_kw: Any) -> Any:  # type: ignore[no-redef]
            return it

    out: dict[tuple[str, str], Any] = {}
    prober = None
    try:
        for na, nb, a, b, c in tqdm(pairs, desc="probe", unit="pair", file=sys.stderr):
            how, src, dst = probe_route(a, b, c, cuda_index)
            try:
                if how == "host":
                    out[(na, nb)] = probe_one(probe_pair, a, b, c, nbytes)
                elif how == "gpu":
                    if prober is None:
                        from dynamo_ext.transport.probe import GpuProber

                        prober = GpuProber(nbytes)
                    r = asyncio.run(prober.probe(src, dst))
                    if not r["verified"]:
                        out[(na, nb)] = f"error: bytes differ after the transfer ({r['write']:.3g} GB/s)"
                    else:
                        out[(na, nb)] = {"write": float(r["write"])}
                else:
                    out[(na, nb)] = how
            except Exception as e:  # report per pair, keep going
                out[(na, nb)] = f"error: {e}"
    finally:
        if prober is not None:
            prober.close()
    return out


@contextlib.contextmanager
def _nixl_log_to_stderr() -> Iterator[None]:
    """Point the handlers of an already configured ``nixl`` logger at stderr for the block."""
    swapped = []
    for h in logging.getLogger("nixl").handlers:
        if type(h) is logging.StreamHandler and h.stream is not sys.stderr:  # its stdout, whichever that was
            swapped.append((h, h.setStream(sys.stderr)))
    try:
        yield
    finally:
        for h, old in swapped:
            h.setStream(old)


def run(args: argparse.Namespace) -> int:
    probe_pair = None
    if getattr(args, "probe", False):
        probe_pair = _load_probe()
        if probe_pair is None:
            print("dynamo-ext topology --probe: probe not available yet (dynamo_ext.transport.probe.probe_pair "
                  "is not installed in this tree); run without --probe for expectations only", file=sys.stderr)  # fmt: skip
            return 3
    try:
        topo = collect_local_topology(getattr(args, "gpu", None))
    except ValueError as e:
        print(f"dynamo-ext topology: {e}", file=sys.stderr)
        return 2
    pairs = local_pairs(topo)
    measured: dict[tuple[str, str], Any] = {}
    if probe_pair is not None:
        nbytes = int(getattr(args, "probe_bytes", 256 << 20))
        cuda_index = {g.index: g.cuda_index for g in topo.gpus}
        # NIXL logs to stdout (its "nixl" logger): keep stdout for our table/JSON only
        with contextlib.redirect_stdout(sys.stderr), _nixl_log_to_stderr():
            measured = probe_all(probe_pair, pairs, cuda_index, nbytes)
    if getattr(args, "json", False):
        doc = {"topology": topo.to_dict(), "pairs": []}
        for na, nb, a, b, c in pairs:
            row = {"a": na, "b": nb, **c.to_dict()}
            if probe_pair is not None:
                route, exp = probe_expectation(a, b, c)
                row.update(measured=measured.get((na, nb)), probe_route=route, probe_expected_gbps=exp)
            doc["pairs"].append(row)
        print(json.dumps(doc, indent=2))
        return 0
    print(format_topology(topo))
    print()
    print(format_pairs(pairs, measured if probe_pair is not None else None))
    return 0


# ---------------------------------------------------------------------------------------------------
# text rendering


def format_topology(t: NodeTopology) -> str:
    h = t.host
    lines = [
        f"host       {h.hostname}  id {h.host_id} ({h.host_id_source})  pid {t.pid}  {h.pid_namespace or ''}",
        f"network    ip {', '.join(h.ips) or '-'}  default iface {h.default_iface or '-'}",
    ]
    if t.gpus:
        lines.append(f"GPUs       (from {t.gpu_source})")
        for g in t.gpus:
            peers = [f"gpu{p.index}" for p in t.gpus if p.uuid in g.nvlink_peers]
            me = "  <- this worker" if t.worker_gpu == g.index else ""
            cuda = f"cuda:{g.cuda_index}" if g.cuda_index is not None else "hidden"
            lines.append(
                f"  gpu{g.index:<3} {g.name}  {g.memory_mib} MiB  {g.pci_bus_id}  numa {g.numa_node}  {cuda}  "
                f"nvlink {','.join(peers) or '-'}  {g.uuid}{me}"
            )
            if g.nic_affinity:
                lines.append("           NICs " + "  ".join(f"{n}:{c}" for n, c in sorted(g.nic_affinity.items())))
    else:
        lines.append("GPUs       none (CPU-only)")
    if t.rdma_nics:
        lines.append("RDMA NICs")
        for n in t.rdma_nics:
            ports = ", ".join(f"port {p.port} {p.state} {p.link_layer} {p.rate_gbps or '?'} Gb/s" for p in n.ports)
            lines.append(f"  {n.name:<8} {n.pci_address or '-'}  numa {n.numa_node}  {','.join(n.netdevs) or '-'}  {ports}")
    else:
        lines.append("RDMA NICs  none")
    s = t.storage
    lines.append(
        f"GPUDirect  RDMA {'yes (' + str(t.gpudirect_module) + ')' if t.gpudirect_rdma else 'no'}  "
        f"GDS {'yes' if s.gds_available else 'no'} (nvidia_fs {'yes' if s.nvidia_fs else 'no'}, "
        f"cufile {s.cufile_lib or 'none'})  NVMe {', '.join(s.nvme) or 'none'}"
    )
    for e in t.probe_errors:
        lines.append(f"  note: {e}")
    return "\n".join(lines)


def format_pairs(pairs: list[tuple[str, str, Endpoint, Endpoint, TransportChoice]],
                 measured: dict[tuple[str, str], Any] | None = None) -> str:  # fmt: skip
    head = ["a", "b", "kind", "backends", "expect GB/s", "lat us"]
    if measured is not None:
        head.append("measured GB/s")
    head.append("env (side a)")
    rows = []
    for na, nb, a, b, c in pairs:
        r = [na, nb, c.kind, ">".join(c.backends) or c.backend, f"{c.expected_gbps:g}", f"{c.expected_latency_us:g}"]
        if measured is not None:
            m = measured.get((na, nb))
            route, exp = probe_expectation(a, b, c)
            r.append(_fmt_measured(m) + (f" (expect {exp:g}: {route})" if isinstance(m, dict) else ""))
        r.append(" ".join(f"{k}={v}" for k, v in c.env.items()) or "-")
        rows.append(r)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = ["pairs (each side its own process on this node)", fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    for r, (_na, _nb, _a, _b, c) in zip(rows, pairs, strict=True):
        out.append(fmt.format(*r))
        for why in c.reasons:
            out.append(f"      why:  {why}")
        for n in c.notes:
            out.append(f"      note: {n}")
    return "\n".join(out)


def _fmt_measured(m: Any) -> str:
    if isinstance(m, dict) and m and all(isinstance(v, (dict, str)) for v in m.values()):  # per backend
        return "; ".join(f"{k}: {_fmt_measured(v)}" for k, v in m.items())
    if isinstance(m, dict):
        return " ".join(f"{k[0].upper()} {v:.3g}" for k, v in m.items())
    return "-" if m is None else str(m)
