"""dynamo_ext.transport — moves registered KV bytes between pools; see README.md for the contract.

Public API (imports nothing of Dynamo; torch and nixl only lazily, when a backend/pool needs them)::

    KvLayout, preset                      layout.py   where every (block, layer, K|V) chunk lives
    plan_transfer, plan_naive             plan.py     descriptors for a transfer (pure)
    KvPool, PoolDescriptor, MemoryKind    pool.py     registered-once regions
    PeerInfo, MalformedPeerInfo           peer.py     what peers exchange (msgpack)
    TransferBackend                       backend.py  NixlBackend | TcpBackend | LocalBackend
    transfer_kv_cache, RemotePool,        transfer.py validate -> plan -> post -> poll with deadline
    TransferHandle, TransferStats
    probe_pair                            probe.py    measured GB/s between two processes
    errors: TransferError, LayoutMismatch, PeerUnreachable, TransferTimeout, BackendError,
            InvalidBlocks, UnregisteredMemory
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
from .transfer import RemotePool, TransferHandle, TransferStats, deadline_for, transfer_kv_cache


def make_backend(kind: str, agent_name: str, choice: dict | None = None, *, memory: str | None = None) -> TransferBackend:
    """Backend by name ("nixl", "tcp", "cma", "local", "cuda_ipc"). "auto": for host pools
    (``memory="host"``) CMA when the kernel allows it (same-node peers through process_vm_writev,
    other nodes over its TCP data path), else NIXL when importable, else TCP."""
    from .fallbacks.cma import CmaBackend, cma_available  # noqa: PLC0415
    from .nixl_backend import NixlBackend, nixl_available  # noqa: PLC0415

    if kind == "auto":
        kind = "cma" if memory == "host" and cma_available() else "nixl" if nixl_available() else "tcp"
    if kind == "cma":
        return CmaBackend(agent_name)
    if kind == "nixl":
        return NixlBackend(agent_name, choice)
    if kind == "tcp":
        return TcpBackend(agent_name)
    if kind == "local":
        return LocalBackend(agent_name)
    if kind == "cuda_ipc":
        from .fallbacks.cuda_ipc import CudaIpcBackend  # noqa: PLC0415

        return CudaIpcBackend(agent_name)
    raise ValueError(f"unknown transport backend {kind!r} (nixl, tcp, cma, local, cuda_ipc, auto)")


def probe_pair(nbytes: int = 256 << 20, **kw):  # type: ignore[no-untyped-def]
    from .probe import probe_pair as _probe  # noqa: PLC0415

    return _probe(nbytes, **kw)


__all__ = [
    "BackendError", "InvalidBlocks", "KvLayout", "KvPool", "LayoutMismatch", "LocalBackend", "MalformedPeerInfo",
    "MemoryKind", "MemoryOrder", "PeerInfo", "PeerUnreachable", "PoolDescriptor", "RemotePool", "TcpBackend",
    "TransferBackend", "TransferError", "TransferHandle", "TransferPlan", "TransferStats", "TransferTimeout",
    "UnregisteredMemory", "XferRequest", "deadline_for", "make_backend", "plan_naive", "plan_transfer", "preset",
    "probe_pair", "transfer_kv_cache",
]
