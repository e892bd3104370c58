"""ShmBackend: host pools of two processes on one host, both mapping the same shared memory.

Each side's pool lives in a memfd (``KvPool.allocate_host(shared=True)`` / ``pool.shared_host_array``; the
engine's CPU KV pool is allocated there); its ``PoolDescriptor.shm`` says how to map it. At ``add_peer``
this side maps every pool the peer advertised, once; a transfer is then a copy between two mappings of this
process: one ``memcpy`` per merged descriptor of the plan, no system call per range (the cost of cma, whose
kernel pins every remote iovec). The copy loop is ``hostcopy``'s: compiled once per process when a C
compiler exists (GIL released, ``threads`` parts in parallel), else one memoryview slice assignment per run
in Python (one thread; ~0.5 us of interpreter per 32 KiB run measured: ~0.7 x memcpy at best).

Protocol::

    start-up:  await be.start()                 # TCP server: notifications; peers on other hosts (data too)
               be.register_pool(shared_pool)    # host pools in shared memory only (BackendError otherwise)
               be.local_peer_info()             # backend "shm", pid, endpoint, agent_metadata = msgpack
                                                # {boot_id, pid_ns, uid}; every pool descriptor has its ShmHandle
    initiator: be.add_peer(info)                # same boot id + pid namespace: map each advertised pool:
                                                #   pidfd_open(pid) (kept: liveness, pid reuse), /proc/<pid>
                                                #   owned by our uid, open /proc/<pid>/fd/<fd> O_RDWR, fstat:
                                                #   regular file, same (dev, inode), our uid, mode 0600, size,
                                                #   seals include SHRINK (the owner cannot truncate the pages
                                                #   under our mapping: no SIGBUS here), owner still alive;
                                                #   mmap MAP_SHARED|MAP_POPULATE, close the fd.
                                                # Any check failing -> PeerUnreachable naming it (callers fall
                                                # back to the next backend: WorkerTransports tries cma next).
                                                # Another host (boot id / pid namespace differ): TCP data path.
               be.post(op, local, peer, remote, descs, notif)
                                                # peer alive? -> copy (inline <= 1 MiB, else a worker thread)
                                                # -> peer still alive? (else PeerUnreachable: the bytes may be
                                                # incomplete or stale) -> notif over TCP after the bytes landed
    shutdown:  remove_peer / close              # mappings and pidfds released (after a copy in flight ends)

Security: the kernel lets only a process allowed to ptrace-read the owner open its /proc fd (same user,
not a non-dumpable process), the memfd is 0600, and the inode/uid checks above reject anything else.
Lifetime: no file system name exists (memfd), so nothing leaks in /dev/shm, SIGKILL of either side
included: the owner's pages are freed once its fd and every peer's mapping are gone.
"""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import select
import stat
import threading
from typing import Any

import msgspec
import numpy as np

from ..backend import DoneRequest, Op, XferRequest
from ..errors import BackendError, PeerUnreachable
from ..peer import PeerInfo
from ..pool import KvPool, MemoryKind, PoolDescriptor, ShmHandle, shared_memory_available
from .hostcopy import copy_runs, copy_runs_native, native_available, native_unavailable_reason, split_parts
from .samenode import SameNodeBackend
from .tcp import _TcpRequest

INLINE_BYTES = 1 << 20  # smaller transfers are copied inside post() (a thread hop costs ~50-100 us)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)


class ShmNodeInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shm backend's ``PeerInfo.agent_metadata``: which kernel and pid namespace, and which user."""

    boot_id: str
    pid_ns: int
    uid: int


def _node() -> ShmNodeInfo:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        pidns = int(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = 0
    return ShmNodeInfo(boot_id=boot, pid_ns=pidns, uid=os.getuid())


def shm_available() -> bool:
    """True when this process can allocate shared pools and open a peer's through /proc."""
    return shared_memory_available() and hasattr(os, "pidfd_open")


def map_region(handle: ShmHandle, pidfd: int) -> mmap.mmap:
    """Map the owner's memfd after checking it is the advertised file of a live process of our user
    (see the module docstring). Raises PeerUnreachable naming the check that failed."""
    me = os.getuid()
    who = f"pid {handle.pid} fd {handle.fd}"
    if handle.uid != me:
        raise PeerUnreachable(f"shared pool of {who} belongs to uid {handle.uid}, this process runs as {me}")
    try:
        owner = os.stat(f"/proc/{handle.pid}").st_uid
    except FileNotFoundError:
        raise PeerUnreachable(f"shared pool owner {who}: no such process") from None
    if owner != me:
        raise PeerUnreachable(f"shared pool owner {who} runs as uid {owner}, this process as {me}")
    try:
        fd = os.open(f"/proc/{handle.pid}/fd/{handle.fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise PeerUnreachable(f"cannot open the shared pool of {who} through /proc: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        bad = []
        if not stat.S_ISREG(st.st_mode):
            bad.append("not a regular file")
        if (st.st_dev, st.st_ino) != (handle.dev, handle.inode):
            bad.append(f"inode {st.st_dev}:{st.st_ino} is not the advertised {handle.dev}:{handle.inode}")
        if st.st_uid != me:
            bad.append(f"owned by uid {st.st_uid}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            bad.append(f"mode {stat.S_IMODE(st.st_mode):o} (must be 0600)")
        if st.st_size != handle.size:
            bad.append(f"size {st.st_size} != advertised {handle.size}")
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & _F_SEAL_SHRINK:
            bad.append("not sealed against shrinking (a truncate by the owner would crash this process)")
        if bad:
            raise PeerUnreachable(f"shared pool of {who} refused: {'; '.join(bad)}")
        if select.select([pidfd], [], [], 0)[0]:  # the process we checked is the one that still holds the fd
            raise PeerUnreachable(f"shared pool owner {who} exited")
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            return mmap.mmap(fd, handle.size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise PeerUnreachable(f"cannot map the shared pool of {who}: {e.strerror}") from None
    finally:
        os.close(fd)


class _ShmPeer:
    """A same-host peer: pidfd (liveness; the pid cannot be reused while it is open) and its pools mapped
    here, keyed by (pool name, owner address). Released once closed and no copy is in flight."""

    def __init__(self, info: PeerInfo) -> None:
        self.pid = info.pid
        try:
            self.pidfd = os.pidfd_open(info.pid)
        except ProcessLookupError:
            raise PeerUnreachable(f"peer {info.agent_name!r} (pid {info.pid}) does not exist") from None
        except OSError as e:
            raise PeerUnreachable(f"peer {info.agent_name!r}: pidfd_open({info.pid}): {e.strerror}") from None
        self.maps: dict[tuple[str, int], tuple[mmap.mmap, int, int]] = {}  # -> (mapping, offset, nbytes)
        self.inflight = 0
        self.closed = False
        self._lock = threading.Lock()
        try:
            for d in list(info.pools) + ([info.staging] if info.staging else []):
                if d.kind is not MemoryKind.HOST:
                    continue
                if d.shm is None:
                    raise PeerUnreachable(f"peer {info.agent_name!r}: pool {d.name!r} is not in shared memory")
                if d.shm.pid != info.pid:
                    raise PeerUnreachable(f"peer {info.agent_name!r}: pool {d.name!r} is advertised by pid "
                                          f"{d.shm.pid}, the peer is pid {info.pid}")
                self.maps[(d.name, d.addr)] = (map_region(d.shm, self.pidfd), d.shm.offset, d.nbytes)
        except BaseException:
            self.closed = True
            self._release()
            raise

    def alive(self) -> bool:
        return self.pidfd >= 0 and not select.select([self.pidfd], [], [], 0)[0]

    def acquire(self) -> None:
        with self._lock:
            self.inflight += 1

    def done(self) -> None:
        with self._lock:
            self.inflight -= 1
            release = self.closed and not self.inflight
        if release:
            self._release()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            release = not self.inflight
        if release:
            self._release()

    def _release(self) -> None:
        for mm, _, _ in self.maps.values():
            try:
                mm.close()
            except BufferError:  # a view still exported: unmapped when it is collected
                pass
        self.maps.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class _Stop:
    """Cancellation seen by both executors: an Event (python loop) and an int32 flag (compiled loop)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.flag = np.zeros(1, dtype=np.int32)

    def set(self) -> None:
        self.event.set()
        self.flag[0] = 1


def _address(mm: mmap.mmap) -> int:
    """Start address of a mapping (a temporary buffer export, released at once)."""
    view = np.frombuffer(mm, dtype=np.uint8, count=1)
    try:
        return int(view.ctypes.data)
    finally:
        del view


class ShmBackend(SameNodeBackend):
    name = "shm"
    default_gbps = 4.0

    def __init__(self, agent_name: str, host: str = "127.0.0.1", port: int = 0, threads: int | None = None,
                 native: bool | None = None) -> None:
        """``threads``: copy threads of one transfer (compiled executor only; default 1); ``native``: None =
        the compiled loop when it builds here, True = required (BackendError otherwise), False = python."""
        super().__init__(agent_name, host, port)
        if not shm_available():
            raise BackendError("shared-memory pools need Linux memfd_create and pidfd_open; use the cma or tcp backend")
        if native is None:
            native = native_available()  # compiled once per process (~0.1-0.3 s), here at start-up
        elif native and not native_available():
            raise BackendError(f"ShmBackend(native=True): {native_unavailable_reason()}")
        self.native = bool(native)
        self.threads = max(1, int(threads if threads is not None else 1)) if self.native else 1

    # -- registration / peers -----------------------------------------------------------------------
    def _register(self, pool: KvPool) -> None:
        super()._register(pool)  # host pools only
        if pool.shm is None:
            raise BackendError(f"ShmBackend: pool {pool.name!r} is not in shared memory; allocate it with "
                               "KvPool.allocate_host(..., shared=True) or transport.pool.shared_host_array")

    def _agent_metadata(self) -> bytes:
        return msgspec.msgpack.encode(_node())

    def _connect(self, info: PeerInfo) -> None:
        super()._connect(info)  # a TCP endpoint: notifications, and the data path to other hosts
        try:
            meta = msgspec.msgpack.decode(info.agent_metadata, type=ShmNodeInfo)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise PeerUnreachable(f"peer {info.agent_name!r}: unreadable shm metadata ({e})") from None
        me = _node()
        new: _ShmPeer | None = None
        if me.boot_id and meta.boot_id == me.boot_id and meta.pid_ns == me.pid_ns and info.pid > 0:
            if meta.uid != me.uid:
                raise PeerUnreachable(f"peer {info.agent_name!r} runs as uid {meta.uid}, this process as "
                                      f"{me.uid}: its shared pools cannot be mapped here")
            new = _ShmPeer(info)  # raises before anything changes: a refused re-add keeps the old mapping
        # else: another host (or pid namespace): the TCP data path of TcpBackend
        self._set_local(info.agent_name, new)

    def is_mapped(self, peer: str) -> bool:
        """True when transfers with ``peer`` copy between mappings (False: TCP data path)."""
        return self.is_local(peer)

    # -- transfers -------------------------------------------------------------------------------------
    def _copy(self, op: Op, local: KvPool, sp: _ShmPeer, key: tuple[str, int], descs: np.ndarray,
              stop: _Stop, peer: str, threads: int = 1) -> None:
        if not sp.alive():
            raise PeerUnreachable(f"peer {peer!r} (pid {sp.pid}) exited")
        mm, base, _ = sp.maps[key]
        lo, ro, n = descs[:, 0], descs[:, 1] + base, descs[:, 2]
        if self.native:
            raddr = _address(mm)
            dst, src, d, s = (local.addr, raddr, lo, ro) if op == "read" else (raddr, local.addr, ro, lo)
            parts = split_parts(n, threads)
            futs = []
            if len(parts) > 1:
                ex = self._executor(self.threads - 1, "shm")
                futs = [ex.submit(copy_runs_native, dst, src, d[a:b], s[a:b], n[a:b], stop.flag)
                        for a, b in parts[1:]]
            a, b = parts[0]
            done = copy_runs_native(dst, src, d[a:b], s[a:b], n[a:b], stop.flag)
            done = all([f.result() for f in futs]) and done
        else:
            rview, lview = memoryview(mm), memoryview(local.host_view())
            try:
                if op == "read":
                    done = copy_runs(lview, rview, lo.tolist(), ro.tolist(), n.tolist(), stop.event)
                else:
                    done = copy_runs(rview, lview, ro.tolist(), lo.tolist(), n.tolist(), stop.event)
            finally:
                rview.release()
                lview.release()
        if not done:
            raise BackendError(f"shm {op} with peer {peer!r} was cancelled")
        if not sp.alive():  # the owner died during the copy: what we read may be incomplete
            raise PeerUnreachable(f"peer {peer!r} (pid {sp.pid}) exited during the {op}")

    async def _run(self, op: Op, local: KvPool, sp: _ShmPeer, key: tuple[str, int], descs: np.ndarray,
                   stop: _Stop, peer: str, notif: bytes) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, self._copy, op, local, sp, key, descs, stop, peer, self.threads)
        except BaseException:
            stop.set()
            raise
        finally:
            sp.done()
        if notif:
            await self.send_notif_async(peer, notif)

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        sp = self._local.get(peer)
        if sp is None:  # another host: TCP data path
            return super()._post(op, local, peer, remote, descs, notif)
        if remote.kind is not MemoryKind.HOST or local.kind is not MemoryKind.HOST:
            raise BackendError(f"ShmBackend moves host pools only; remote {remote.name!r} is {remote.kind.value}")
        key = (remote.name, remote.addr)
        if key not in sp.maps:
            raise PeerUnreachable(f"peer {peer!r}: pool {remote.name!r} was not mapped at add_peer "
                                  "(re-add the peer after it registered new pools)")
        if remote.nbytes > sp.maps[key][2]:  # post() bounded the ranges by remote.nbytes: the mapping must hold it
            raise BackendError(f"peer {peer!r}: pool {remote.name!r} is larger than the region mapped at add_peer")
        stop = _Stop()
        sp.acquire()
        if int(descs[:, 2].sum()) <= INLINE_BYTES and not notif:
            try:
                self._copy(op, local, sp, key, descs, stop, peer)
            finally:
                sp.done()
            return DoneRequest()
        task = asyncio.get_running_loop().create_task(self._run(op, local, sp, key, descs, stop, peer, notif))
        return _TcpRequest(task, stop.set)


__all__ = ["ShmBackend", "ShmNodeInfo", "map_region", "shm_available"]
