"""dynamo_ext.transport — moves registered KV bytes between pools; see README.md for the contract.

Public API (imports nothing of Dynamo; torch and nixl only lazily, when a backend/pool needs them)::

    KvLayout, preset                      layout.py   where every (block, layer, K|V) chunk lives
    plan_transfer, plan_naive             plan.py     descriptors for a transfer (pure)
    KvPool, PoolDescriptor, MemoryKind    pool.py     registered-once regions
    PeerInfo, MalformedPeerInfo           peer.py     what peers exchange (msgpack)
    TransferBackend, XferRequest          backend.py  the swappable interface: registration, peers, post,
                                                      poll, notifications (NixlBackend | TcpBackend |
                                                      CmaBackend | LocalBackend | CudaIpcBackend)
    pull, push, copy, TransferOptions,    transfer.py validate -> plan -> post -> poll with deadline
    RemotePool, TransferHandle,                       (READ, WRITE, same-process copy)
    TransferStats, deadline_for
                                          staged.py   the staged-transfer protocol (gather -> 1 descriptor ->
                                                      scatter, acks as notifications), served by be.progress()
    probe_pair                            probe.py    measured GB/s between two processes
    errors: TransferError, LayoutMismatch, PeerUnreachable, TransferTimeout, BackendError,
            InvalidBlocks, UnregisteredMemory

Modules import downward only, lazy imports included (import-linter contract ``transport-acyclic``)::

    probe                  -> transfer, the backends, verify
    transfer               -> staged, fallbacks.local (copy_ranges), metrics, plan, backend
    staged                 -> backend (registers its handler there), plan, staging
    nixl_backend, file_tier, fallbacks/{tcp, cma, local, cuda_ipc} -> backend (+ rowcopy for local/cuda_ipc)
    fallbacks/nccl         -> verify, rowcopy, staging, plan
    backend                -> peer, pool, errors          (never transfer or staged)
    rowcopy -> staging -> plan -> layout -> errors;  verify -> pool, layout;  peer -> pool -> layout
"""

from __future__ import annotations

from .backend import TransferBackend, XferRequest
from .errors import (
    BackendError,
    InvalidBlocks,
    LayoutMismatch,
    PeerUnreachable,
    TransferError,
    TransferTimeout,
    UnregisteredMemory,
)
from .fallbacks import LocalBackend, TcpBackend
from .layout import KvLayout, MemoryOrder, preset
from .peer import MalformedPeerInfo, PeerInfo
from .plan import TransferPlan, plan_naive, plan_transfer
from .pool import KvPool, MemoryKind, PoolDescriptor
from .transfer import (
    RemotePool,
    TransferHandle,
    TransferOptions,
    TransferStats,
    copy,
    deadline_for,
    pull,
    push,
)


def make_backend(kind: str, agent_name: str, choice: dict | None = None, *, memory: str | None = None) -> TransferBackend:
    """Backend by name ("nixl", "tcp", "cma", "shm", "local", "cuda_ipc"). "auto": for host pools
    (``memory="host"``) CMA when the kernel allows it (same-node peers through process_vm_writev,
    other nodes over its TCP data path), else NIXL when importable, else TCP. "shm" (pools in shared
    memory, mapped by the peer) is never picked by "auto": it needs pools allocated with ``shared=True``;
    ``topology.select_transport`` orders it per pair for the workers."""
    from .fallbacks.cma import CmaBackend, cma_available  # noqa: PLC0415
    from .nixl_backend import NixlBackend, nixl_available  # noqa: PLC0415

    if kind == "auto":
        kind = "cma" if memory == "host" and cma_available() else "nixl" if nixl_available() else "tcp"
    if kind == "cma":
        return CmaBackend(agent_name)
    if kind == "shm":
        from .fallbacks.shm import ShmBackend  # noqa: PLC0415

        return ShmBackend(agent_name)
    if kind == "nixl":
        return NixlBackend(agent_name, choice)
    if kind == "tcp":
        return TcpBackend(agent_name)
    if kind == "local":
        return LocalBackend(agent_name)
    if kind == "cuda_ipc":
        from .fallbacks.cuda_ipc import CudaIpcBackend  # noqa: PLC0415

        return CudaIpcBackend(agent_name)
    raise ValueError(f"unknown transport backend {kind!r} (nixl, tcp, cma, shm, local, cuda_ipc, auto)")


def probe_pair(nbytes: int = 256 << 20, **kw):  # type: ignore[no-untyped-def]
    from .probe import probe_pair as _probe  # noqa: PLC0415

    return _probe(nbytes, **kw)


__all__ = [
    "BackendError", "InvalidBlocks", "KvLayout", "KvPool", "LayoutMismatch", "LocalBackend", "MalformedPeerInfo",
    "MemoryKind", "MemoryOrder", "PeerInfo", "PeerUnreachable", "PoolDescriptor", "RemotePool", "TcpBackend",
    "TransferBackend", "TransferError", "TransferHandle", "TransferOptions", "TransferPlan", "TransferStats",
    "TransferTimeout", "UnregisteredMemory", "XferRequest", "copy", "deadline_for", "make_backend", "plan_naive",
    "plan_transfer", "preset", "probe_pair", "pull", "push",
]
