"""CmaBackend: host pools of two processes on one node, moved by the kernel (cross-memory attach).

Data: ``process_vm_writev`` (WRITE) / ``process_vm_readv`` (READ) through ctypes, straight between
the two pools: the local and the remote iovec arrays are built with NumPy from the merged plan
(``(local_off, remote_off, nbytes)`` -> ``(addr, len)`` pairs), at most IOV_MAX (1024) iovecs per
call, so 32,640 scattered 32 KiB chunks take 32 system calls and no staging copy. The kernel pins
the remote pages and copies once (what UCX's ``cma`` transport does, but UCX issues one call per
descriptor, ~7.5 us each).

Control (notifications, the staged-transfer protocol, acks) and peers on another node: the TCP
fallback this class extends (``TcpBackend``): same frames, same server. Protocol::

    start-up:  await be.start()                   # TCP server for notifications (and remote-node data)
               be.register_pool(host_pool)        # host pools only; prctl(PR_SET_PTRACER, ANY) once so
                                                  # a peer may attach under Yama ptrace_scope=1
               be.local_peer_info()               # backend "cma", pid, endpoint, agent_metadata =
                                                  # msgpack {boot_id, pid_ns}: "same node" proof
    initiator: be.add_peer(info)                  # same boot id and pid namespace -> CMA (pidfd kept
                                                  # to detect the peer's death and pid reuse);
                                                  # otherwise the TCP data path of TcpBackend
               be.post(op, local, peer, remote, descs, notif)
                                                  # <= 1 MiB: copied inline; larger: worker thread(s),
                                                  # batches of IOV_MAX iovecs; then notif over TCP
                                                  # (delivered after every byte landed)
               req.poll()                         # done / PeerUnreachable (ESRCH, EFAULT, peer exited) /
                                                  # BackendError (EPERM: ptrace policy forbids it)

Requirements: Linux >= 3.2, same user (or CAP_SYS_PTRACE), ptrace allowed between the two
processes (no seccomp filter blocking process_vm_*; Yama scope <= 1 with the prctl above).
``cma_available()`` checks that once per process with a self-read.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import select
import threading
from typing import Any

import msgpack
import numpy as np

from ..backend import DoneRequest, Op, XferRequest
from ..errors import BackendError, PeerUnreachable
from ..peer import PeerInfo
from ..pool import KvPool, MemoryKind, PoolDescriptor
from .samenode import SameNodeBackend
from .tcp import _TcpRequest

IOV_MAX = 1024
INLINE_BYTES = 1 << 20  # smaller transfers are copied inside post() (a thread hop costs ~50-100 us)
_MAX_CALL_BYTES = 1 << 30  # the kernel caps one call at MAX_RW_COUNT (~2 GiB); stay well below
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value

_libc: Any = None
_available: bool | None = None
_ptracer_set = False


def _lib() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        for fn in (lib.process_vm_readv, lib.process_vm_writev):
            fn.restype = ctypes.c_ssize_t
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                           ctypes.c_ulong]
        _libc = lib
    return _libc


def cma_available() -> bool:
    """True when process_vm_readv works in this process (Linux, not blocked by seccomp/LSM)."""
    global _available
    if _available is None:
        try:
            src = np.arange(64, dtype=np.uint8)
            dst = np.zeros(64, dtype=np.uint8)
            liov = np.array([[dst.ctypes.data, 64]], dtype=np.uint64)
            riov = np.array([[src.ctypes.data, 64]], dtype=np.uint64)
            n = _lib().process_vm_readv(os.getpid(), liov.ctypes.data, 1, riov.ctypes.data, 1, 0)
            _available = n == 64 and bool((dst == src).all())
        except Exception:  # noqa: BLE001 - not Linux, no libc symbol, ...
            _available = False
    return _available


def _node_identity() -> dict[str, Any]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return {"boot_id": boot, "pid_ns": int(pidns)}


def _allow_attach() -> None:
    """Let any same-user process attach (Yama ptrace_scope=1 otherwise allows only ancestors)."""
    global _ptracer_set
    if _ptracer_set:
        return
    _ptracer_set = True
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, ctypes.c_ulong(_PR_SET_PTRACER_ANY), 0, 0, 0)
    except Exception:  # noqa: BLE001 - no Yama: EINVAL, nothing to do
        pass


class _Peer:
    """A same-node CMA peer: its pid, and a pidfd (readable once it exited) against pid reuse."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = -1
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise PeerUnreachable(f"peer pid {pid} does not exist") from None
            except OSError:
                self.pidfd = -1
        elif not os.path.exists(f"/proc/{pid}"):
            raise PeerUnreachable(f"peer pid {pid} does not exist")

    def alive(self) -> bool:
        if self.pidfd >= 0:
            r, _, _ = select.select([self.pidfd], [], [], 0)
            return not r
        return os.path.exists(f"/proc/{self.pid}")

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _merge_runs(iov: np.ndarray) -> np.ndarray:
    """Adjacent (addr, len) entries that continue each other -> one entry (one side only)."""
    if iov.shape[0] < 2:
        return iov
    a, n = iov[:, 0], iov[:, 1]
    new = np.ones(iov.shape[0], dtype=bool)
    new[1:] = a[1:] != a[:-1] + n[:-1]
    idx = np.flatnonzero(new)
    if idx.shape[0] == iov.shape[0]:
        return iov
    out = np.empty((idx.shape[0], 2), dtype=np.uint64)
    out[:, 0] = a[idx]
    out[:, 1] = np.add.reduceat(n, idx)
    return out


def _iov_batches(local_addr: int, remote_addr: int, descs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(local iovecs, remote iovecs, bytes) per system call: <= IOV_MAX iovecs and <= 1 GiB each.

    The kernel pins the REMOTE ranges one iovec at a time (~1.5-2 us each measured on the 2-core box,
    vs ~0.35 us per local iovec), and a call's two iovec lists are two independent byte streams: so
    the chunks go in remote-address order and each side's list is merged on its own (a destination
    run of consecutive blocks is one remote iovec even when its sources are scattered)."""
    d = descs
    if d.shape[0] > 1:
        d = d[np.argsort(d[:, 1], kind="stable")]
    if int(d[:, 2].max()) > _MAX_CALL_BYTES:  # split huge descriptors (rare: merged whole planes)
        pieces = -(-d[:, 2] // _MAX_CALL_BYTES)
        rep = np.repeat(np.arange(d.shape[0]), pieces)
        within = np.arange(rep.shape[0]) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        start = within * _MAX_CALL_BYTES
        d = np.stack([d[rep, 0] + start, d[rep, 1] + start,
                      np.minimum(d[rep, 2] - start, _MAX_CALL_BYTES)], axis=1)
    n = d.shape[0]
    liov = np.empty((n, 2), dtype=np.uint64)
    riov = np.empty((n, 2), dtype=np.uint64)
    liov[:, 0] = d[:, 0] + local_addr
    liov[:, 1] = d[:, 2]
    riov[:, 0] = d[:, 1] + remote_addr
    riov[:, 1] = d[:, 2]
    # cut points: every IOV_MAX iovecs, and before the running total passes 1 GiB
    cum = np.cumsum(d[:, 2])
    cuts = [0]
    while cuts[-1] < n:
        lo = cuts[-1]
        base = int(cum[lo - 1]) if lo else 0
        hi = min(n, lo + IOV_MAX, int(np.searchsorted(cum, base + _MAX_CALL_BYTES, side="right")))
        cuts.append(max(hi, lo + 1))
    return [(_merge_runs(liov[a:b]), _merge_runs(riov[a:b]), int(cum[b - 1] - (cum[a - 1] if a else 0)))
            for a, b in zip(cuts[:-1], cuts[1:])]


def _advance(iov: np.ndarray, done: int) -> np.ndarray:
    """The iovecs still to move after ``done`` bytes of ``iov`` (a partial system call)."""
    cum = np.cumsum(iov[:, 1].astype(np.int64))
    i = int(np.searchsorted(cum, done, side="right"))
    rest = iov[i:].copy()
    skip = done - (int(cum[i - 1]) if i else 0)
    rest[0, 0] += np.uint64(skip)
    rest[0, 1] -= np.uint64(skip)
    return rest


class CmaBackend(SameNodeBackend):
    name = "cma"
    default_gbps = 2.0

    def __init__(self, agent_name: str, host: str = "127.0.0.1", port: int = 0, threads: int | None = None) -> None:
        super().__init__(agent_name, host, port)
        if not cma_available():
            raise BackendError("process_vm_readv/writev is not available here (not Linux, or blocked by "
                               "seccomp/ptrace policy); use the tcp or nixl backend")
        # copy threads: 1 on the 2-core box (2 threads were slower there), 4 on a 32-core host (1 GiB of
        # scattered 32 KiB chunks: 13.1 GB/s with 4 vs 3.7 with 1, single-thread memcpy 8.3)
        self.threads = max(1, int(threads if threads is not None else min(4, (os.cpu_count() or 1) // 4)))

    # -- registration / peers -----------------------------------------------------------------------
    def _register(self, pool: KvPool) -> None:
        super()._register(pool)  # host pools only
        _allow_attach()

    def _agent_metadata(self) -> bytes:
        return msgpack.packb(_node_identity(), use_bin_type=True)

    def _connect(self, info: PeerInfo) -> None:
        super()._connect(info)  # a TCP endpoint is needed for notifications either way
        try:
            meta = msgpack.unpackb(info.agent_metadata, raw=False) if info.agent_metadata else {}
        except Exception as e:  # noqa: BLE001
            raise PeerUnreachable(f"peer {info.agent_name!r}: unreadable CMA metadata ({e})") from None
        me = _node_identity()
        if isinstance(meta, dict) and meta.get("boot_id") == me["boot_id"] and meta.get("pid_ns") == me["pid_ns"] \
                and me["boot_id"] and info.pid > 0:
            self._set_local(info.agent_name, _Peer(info.pid))

    def is_same_node(self, peer: str) -> bool:
        """True when transfers with ``peer`` go through the kernel (False: TCP data path)."""
        return self.is_local(peer)

    # -- transfers -------------------------------------------------------------------------------------
    def _copy(self, op: Op, peer: _Peer, batches: list[tuple[np.ndarray, np.ndarray, int]],
              stop: threading.Event, name: str) -> None:
        fn = _lib().process_vm_writev if op == "write" else _lib().process_vm_readv
        for liov, riov, want in batches:
            if stop.is_set():
                raise BackendError(f"CMA {op} with peer {name!r} was cancelled")
            if not peer.alive():
                raise PeerUnreachable(f"peer {name!r} (pid {peer.pid}) exited")
            done = 0
            while done < want:
                lv, rv = (liov, riov) if not done else (_advance(liov, done), _advance(riov, done))
                got = fn(peer.pid, lv.ctypes.data, lv.shape[0], rv.ctypes.data, rv.shape[0], 0)
                if got < 0:
                    e = ctypes.get_errno()
                    if e == errno.EINTR:
                        continue
                    if e in (errno.ESRCH, errno.EFAULT) or not peer.alive():
                        raise PeerUnreachable(
                            f"peer {name!r} (pid {peer.pid}) gone or its memory unmapped during {op}: "
                            f"{errno.errorcode.get(e, e)}")
                    if e == errno.EPERM:
                        raise BackendError(f"process_vm_{op}v to pid {peer.pid} not permitted (ptrace policy, "
                                           "another user); use the tcp or nixl backend")
                    raise BackendError(f"process_vm_{op}v to pid {peer.pid}: {os.strerror(e)}")
                if got == 0:
                    raise PeerUnreachable(f"peer {name!r} (pid {peer.pid}): no progress during {op}")
                done += got

    async def _run(self, op: Op, peer: str, cp: _Peer, parts: list[list[Any]], stop: threading.Event,
                   notif: bytes) -> None:
        loop = asyncio.get_running_loop()
        ex = self._executor(self.threads, "cma")
        futs = [loop.run_in_executor(ex, self._copy, op, cp, part, stop, peer) for part in parts if part]
        try:
            await asyncio.gather(*futs)
        except BaseException:
            stop.set()
            await asyncio.gather(*futs, return_exceptions=True)  # never free a pool under a running copy
            raise
        if notif:
            await self.send_notif_async(peer, notif)

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        cp = self._local.get(peer)
        if cp is None:  # another node: TCP data path
            return super()._post(op, local, peer, remote, descs, notif)
        if remote.kind is not MemoryKind.HOST or local.kind is not MemoryKind.HOST:
            raise BackendError(f"CmaBackend moves host pools only; remote {remote.name!r} is {remote.kind.value}")
        batches = _iov_batches(local.addr, remote.addr, descs)
        total = sum(b[2] for b in batches)
        stop = threading.Event()
        if total <= INLINE_BYTES and not notif:
            self._copy(op, cp, batches, stop, peer)
            return DoneRequest()
        k = min(self.threads, len(batches))
        parts: list[list[Any]] = [batches[i::k] for i in range(k)] if k > 1 else [batches]
        task = asyncio.get_running_loop().create_task(self._run(op, peer, cp, parts, stop, notif))
        return _TcpRequest(task, stop.set)
