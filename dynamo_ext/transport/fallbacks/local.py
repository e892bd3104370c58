"""LocalBackend: both pools live in this process; a transfer is a copy (numpy for host, torch for device).

Protocol: every LocalBackend registers itself in a process-wide table by agent name, so
``add_peer(other.local_peer_info())`` works only for a backend of the same process (pid checked).
``post`` copies synchronously and returns a completed request; there is nothing to poll or cancel.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np

from ..backend import PROTOCOL_PREFIX, DoneRequest, Op, TransferBackend, XferRequest, as_triples
from ..errors import PeerUnreachable, UnregisteredMemory
from ..peer import PeerInfo
from ..pool import KvPool, MemoryKind, PoolDescriptor

class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


_LOCAL: "weakref.WeakValueDictionary[str, LocalBackend]" = weakref.WeakValueDictionary()


def copy_ranges(src: KvPool, dst: KvPool, triples: Any, stream: Any = None) -> None:
    """Copy (src_off, dst_off, n) ranges between two local pools of any kind except file."""
    arr = as_triples(triples)
    triples = arr.tolist() if not (src.kind is MemoryKind.DEVICE and arr.shape[0] > 1) else []
    if src.kind is MemoryKind.HOST and dst.kind is MemoryKind.HOST:
        s, d = src.host_view(), dst.host_view()
        for so, do, n in triples:
            d[do:do + n] = s[so:so + n]
        return
    import torch  # noqa: PLC0415

    st, dt = src.tensor_u8(), dst.tensor_u8()
    if src.kind is MemoryKind.DEVICE and arr.shape[0] > 1:  # owner-process copies: vectorised executors
        from ..rowcopy import copy_cross_device, copy_device_to_host, copy_rows  # noqa: PLC0415

        ctx2 = torch.cuda.stream(stream) if stream is not None else _nullctx()
        with torch.cuda.device(st.device), ctx2:
            if dst.kind is MemoryKind.HOST:
                copy_device_to_host(st, dt, arr)  # returns when the bytes are on the host
                return
            if st.device == dt.device:
                copy_rows(st, dt, arr)
            else:
                copy_cross_device(st, dt, arr)
            torch.cuda.current_stream(dt.device).synchronize()
        return
    on_gpu = src.kind is MemoryKind.DEVICE or dst.kind is MemoryKind.DEVICE
    ctx = torch.cuda.stream(stream) if (on_gpu and stream is not None) else _nullctx()
    with ctx:
        for so, do, n in triples:
            dt[do:do + n].copy_(st[so:so + n], non_blocking=on_gpu)
    if on_gpu:
        (stream or torch.cuda.current_stream(dt.device if dst.kind is MemoryKind.DEVICE else st.device)).synchronize()


class LocalBackend(TransferBackend):
    name = "local"
    default_gbps = 2.0

    def __init__(self, agent_name: str) -> None:
        super().__init__(agent_name)
        if agent_name in _LOCAL:
            raise ValueError(f"a LocalBackend named {agent_name!r} already exists in this process")
        _LOCAL[agent_name] = self

    def _connect(self, info: PeerInfo) -> None:
        if info.pid != os.getpid() or info.agent_name not in _LOCAL:
            raise PeerUnreachable(f"peer {info.agent_name!r} (pid {info.pid}) is not a LocalBackend of this process")

    def _pool_of(self, peer: str, remote: PoolDescriptor) -> KvPool:
        other = _LOCAL.get(peer)
        if other is None:
            raise PeerUnreachable(f"peer {peer!r} was closed")
        pool = other._pools.get(remote.name)
        if pool is None or pool.addr != remote.addr:
            raise UnregisteredMemory(f"peer {peer!r} has no registered pool {remote.name!r}")
        return pool

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        rpool = self._pool_of(peer, remote)
        if op == "write":
            copy_ranges(local, rpool, descs)
            if notif:
                _LOCAL[peer]._notifs.setdefault(self.agent_name, []).append(notif)
                if notif.startswith(PROTOCOL_PREFIX):
                    _LOCAL[peer].progress()  # same process: serve the (staged) scatter request right away
        else:
            copy_ranges(rpool, local, descs[:, [1, 0, 2]])
        return DoneRequest()

    def send_notif(self, peer: str, msg: bytes) -> None:
        self.peer(peer)
        _LOCAL[peer]._notifs.setdefault(self.agent_name, []).append(msg)
        if msg.startswith(PROTOCOL_PREFIX):
            _LOCAL[peer].progress()  # same process: serve protocol messages right away

    def close_sync(self) -> None:
        if _LOCAL.get(self.agent_name) is self:
            del _LOCAL[self.agent_name]
