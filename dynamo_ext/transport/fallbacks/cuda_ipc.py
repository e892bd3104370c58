"""CudaIpcBackend: device pools of two processes on one node, copied through CUDA IPC (GPU only).

Protocol::

    owner:     be.register_pool(device_pool)       -> storage._share_cuda_() of the pool's storage:
                                                      (device, IPC handle, size, offset, ref-counter
                                                      handle/offset, event handle, sync flag) - plain
                                                      bytes/ints, sent msgpack'd in PeerInfo.agent_metadata
    initiator: be.add_peer(info)                   -> torch.UntypedStorage._new_shared_cuda(*args) maps each
                                                      remote pool into this process (same node only)
               be.post(op, local, peer, remote, d) -> copies enqueued on the current streams (rowcopy.py):
                                                      same device: one pass per byte (Triton row kernel,
                                                      else sliced index_select/index_copy_); other
                                                      device: gather -> peer copy -> scatter pipelined
                                                      over 64 MiB slices on three streams
               be.post_blocks(op, ..., src_ids, dst_ids)   same GPU, whole blocks: rowcopy.copy_blocks (no
                                                      plan: the ids uploaded, the kernel computes offsets)
               req.poll()                          -> a CUDA event recorded after the copies: event.query()

No notifications (the owner learns of a write through the caller's own channel). torch is imported
only when this backend is created.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ..backend import Op, TransferBackend, XferRequest
from ..errors import BackendError, PeerUnreachable
from ..peer import PeerInfo
from ..pool import KvPool, MemoryKind, PoolDescriptor


class _EventRequest(XferRequest):
    #: the copy usually ends within this: the handle polls synchronously that long before it yields to the
    #: event loop (a yield in a busy loop costs more than the copy of a 4K-token prompt's KV)
    sync_wait_s = 0.002

    def __init__(self, event: Any, keep: tuple[Any, ...]) -> None:
        self._event, self._keep = event, keep

    def poll(self) -> bool:
        if self._event is None:
            raise BackendError("CUDA IPC copy was cancelled")
        if self._event.query():
            self._keep = ()
            return True
        return False

    def cancel(self) -> None:
        # copies already enqueued cannot be recalled; wait for them so no buffer is freed under them
        if self._event is not None:
            self._event.synchronize()
            self._event, self._keep = None, ()


class CudaIpcBackend(TransferBackend):
    name = "cuda_ipc"
    default_gbps = 50.0

    def __init__(self, agent_name: str) -> None:
        super().__init__(agent_name)
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise BackendError("CUDA IPC needs CUDA")
        self._torch = torch
        self._handles: dict[str, list[Any]] = {}
        self._remote: dict[tuple[str, str], Any] = {}  # (peer, pool name) -> uint8 tensor view
        #: one high-priority stream per device for the copies: never queued behind the engine's kernels on the
        #: legacy default stream (a pull posted during a decode step waited for it: up to a step, ms)
        self._streams: dict[Any, Any] = {}

    def _stream(self, device: Any) -> Any:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = self._torch.cuda.Stream(device=device, priority=-1)  # -1: high
        return s

    def _register(self, pool: KvPool) -> None:
        if pool.kind is not MemoryKind.DEVICE:
            raise BackendError(f"CUDA IPC moves device pools only; {pool.name!r} is {pool.kind.value}")
        t = pool.tensor_u8()
        st = t.untyped_storage()
        args = list(st._share_cuda_())
        # the pool may start inside its storage: remember where
        self._handles[pool.name] = [args, t.data_ptr() - st.data_ptr()]

    def _agent_metadata(self) -> bytes:
        return msgpack.packb({k: v for k, v in self._handles.items()}, use_bin_type=True)

    def _connect(self, info: PeerInfo) -> None:
        torch = self._torch
        try:
            meta = msgpack.unpackb(info.agent_metadata, raw=False)
        except Exception as e:  # noqa: BLE001
            raise PeerUnreachable(f"peer {info.agent_name!r}: unreadable CUDA IPC metadata ({e})") from None
        for p in info.pools:
            if p.name not in meta:
                continue
            args, off = meta[p.name]
            try:
                st = torch.UntypedStorage._new_shared_cuda(*args)
            except Exception as e:  # noqa: BLE001
                raise PeerUnreachable(f"cannot open CUDA IPC handle of {info.agent_name!r}/{p.name} "
                                      f"(another node, or IPC not permitted): {e}") from e
            t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{int(args[0])}")
            t.set_(st, 0, (st.nbytes(),))
            self._remote[(info.agent_name, p.name)] = t[off:off + p.nbytes]

    def _disconnect(self, name: str) -> None:
        for k in [k for k in self._remote if k[0] == name]:
            del self._remote[k]

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        torch = self._torch
        from ..rowcopy import copy_cross_device, copy_rows  # noqa: PLC0415

        rt = self._remote.get((peer, remote.name))
        if rt is None:
            raise PeerUnreachable(f"peer {peer!r} pool {remote.name!r} is not mapped (add_peer first)")
        lt = local.tensor_u8()
        src, dst, d = (lt, rt, descs) if op == "write" else (rt, lt, descs[:, [1, 0, 2]])
        keep: tuple[Any, ...] = ()
        if src.device == dst.device:  # one pass per byte (Triton row kernel, or sliced torch)
            with torch.cuda.device(dst.device):
                copy_rows(src, dst, d)
        else:  # gather (src GPU) -> peer copy -> scatter (dst GPU), pipelined over slices
            with torch.cuda.device(dst.device):
                copy_cross_device(src, dst, d)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(dst.device))
        return _EventRequest(ev, keep)

    def post_blocks(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, src_ids: np.ndarray,
                    dst_ids: np.ndarray) -> XferRequest | None:
        """Same GPU: ``rowcopy.copy_blocks`` (the block ids uploaded, offsets computed by the kernel: no plan,
        no per-chunk indices). Another GPU: None (the planned, pipelined cross-device path)."""
        torch = self._torch
        from ..rowcopy import copy_blocks  # noqa: PLC0415

        rt = self._remote.get((peer, remote.name))
        if rt is None:
            raise PeerUnreachable(f"peer {peer!r} pool {remote.name!r} is not mapped (add_peer first)")
        lt = local.tensor_u8()
        if lt.device != rt.device:
            return None
        (src, sl), (dst, dl) = ((lt, local.layout), (rt, remote.kv_layout())) if op == "write" else \
            ((rt, remote.kv_layout()), (lt, local.layout))
        stream = self._stream(dst.device)
        with torch.cuda.device(dst.device), torch.cuda.stream(stream):
            copy_blocks(src, dst, sl, dl, src_ids, dst_ids)
            ev = torch.cuda.Event()
            ev.record(stream)
        return _EventRequest(ev, ())

    def close_sync(self) -> None:
        self._remote.clear()
