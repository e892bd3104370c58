"""KV pools: one contiguous, registered region per memory kind, created once at start-up.

Protocol (who calls what, in what order)::

    worker start-up:  pool = KvPool.allocate_host(name, layout)        # or allocate_device / open_file
                      backend.register_pool(pool)                      # ONCE; never per request
                      backend.local_peer_info()  -> PeerInfo(pools=[pool.descriptor(), ...])
                      (PeerInfo published to peers: etcd / discovery)
    per request:      push(backend, pool, RemotePool(peer, desc), blocks)   # or pull; no registration here
    shutdown:         backend.close()  (deregisters everything)

Memory kinds:
  ``host``   numpy ``uint8`` buffer, pre-touched (a lazily faulted target made a 1 GiB NIXL transfer
             27x slower); pinned through torch when CUDA is present (``pin="auto"``).
  ``device`` a torch CUDA ``uint8`` tensor (torch is imported only here, lazily).
  ``file``   a file of ``layout.pool_bytes`` bytes for NIXL's POSIX backend: NIXL registers it as
             ``(offset=0, nbytes, fd, name)``, so ``addr`` is 0 and ``device_id`` is the fd.

``PoolDescriptor`` is what peers see: plain msgspec (kind, addr, nbytes, device_id, layout dict, and
``shm`` for a host pool in shared memory), never pickled. It carries no buffer, only where the bytes are in
the owner's address space and, with ``shm``, how a process of the same host and user maps them.

Shared host pools (``allocate_host(shared=True)``, ``shared_host_array``, ``shared_host_tensor``): the bytes
live in a memfd (``memfd_create``, mode 0600, sealed against shrinking and growing), mapped read-write here;
the fd stays open in this process for as long as the mapping lives. A peer maps the same pages by opening
``/proc/<owner pid>/fd/<fd>`` (the kernel checks it may: same user, ptrace read access) and checking the
inode, owner and seals against ``ShmHandle`` (``fallbacks/shm.py``). Lifetime: nothing is ever created in
/dev/shm or any file system, so nothing can leak: the pages are freed when the last fd and mapping are gone,
including after SIGKILL of the owner (the kernel closes its fd; a peer's mapping keeps the pages until the
peer unmaps them). Chosen over a named ``shm_open`` segment unlinked after the peer opened it, which leaks
when the owner dies before the unlink.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from enum import Enum
from typing import Any

import msgspec
import numpy as np

from .layout import KvLayout


class MemoryKind(str, Enum):
    DEVICE = "device"
    HOST = "host"
    FILE = "file"


#: NIXL memory-type string for each kind.
NIXL_MEM_TYPE = {MemoryKind.HOST: "DRAM", MemoryKind.DEVICE: "VRAM", MemoryKind.FILE: "FILE"}


class ShmHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a process of the same host and user maps a shared host pool: the owner's memfd, opened through
    ``/proc/<pid>/fd/<fd>``; ``dev``/``inode`` identify the file (checked after the open: a reused pid or fd
    number cannot substitute another file), ``size`` is the memfd's size, ``offset`` the pool's start in it."""

    pid: int
    fd: int
    dev: int
    inode: int
    uid: int
    size: int
    offset: int = 0

    def validate(self, nbytes: int) -> None:
        if self.pid <= 0 or self.fd < 0 or self.uid < 0 or self.size <= 0 or self.offset < 0:
            raise ValueError(f"bad shared-memory handle {self}")
        if self.offset + nbytes > self.size:
            raise ValueError(f"shared-memory handle: pool of {nbytes} B at offset {self.offset} exceeds the "
                             f"{self.size} B region")


class PoolDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A pool as a peer sees it (sent inside ``PeerInfo``)."""

    name: str
    kind: MemoryKind
    addr: int
    nbytes: int
    device_id: int
    layout: dict[str, Any]
    shm: ShmHandle | None = None  # host pools in shared memory: how a same-host peer maps them

    def kv_layout(self) -> KvLayout:
        return KvLayout.from_dict(self.layout)

    def validate(self) -> None:
        if self.addr < 0 or self.nbytes <= 0:
            raise ValueError(f"pool {self.name!r}: bad region addr={self.addr} nbytes={self.nbytes}")
        lay = self.kv_layout()
        if lay.pool_bytes > self.nbytes:
            raise ValueError(f"pool {self.name!r}: layout needs {lay.pool_bytes} bytes, region has {self.nbytes}")
        if self.shm is not None:
            if self.kind is not MemoryKind.HOST:
                raise ValueError(f"pool {self.name!r}: a shared-memory handle on a {self.kind.value} pool")
            self.shm.validate(self.nbytes)


# -- shared host memory (memfd) ----------------------------------------------------------------------------
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW = 0x1, 0x2, 0x4
SHM_SEALS = _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_SEAL  # what every shared pool carries (peers check SHRINK)
_shared_lock = threading.Lock()
_shared: dict[int, tuple[int, ShmHandle, "weakref.ref[mmap.mmap]"]] = {}  # base addr -> (size, handle, mapping)


def shared_memory_available() -> bool:
    """True where pools can live in a memfd that a same-user peer opens through /proc (Linux)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _release_shared(fd: int, addr: int) -> None:
    with _shared_lock:
        _shared.pop(addr, None)
    try:
        os.close(fd)
    except OSError:
        pass


def shared_host_array(nbytes: int, name: str = "kv", fill: int | None = 0) -> np.ndarray:
    """A uint8 array of ``nbytes`` in a new memfd (mode 0600, sealed against shrink/grow, close-on-exec),
    mapped shared read-write and pre-touched with ``fill`` (None: left to first touch). The fd stays open
    until the mapping is garbage-collected (the array, or anything viewing it, keeps it alive); then both
    go. ``shm_handle_of(addr, n)`` finds the handle for any range of it. Raises OSError where memfd_create
    is not available."""
    import fcntl  # noqa: PLC0415

    if nbytes <= 0:
        raise ValueError(f"shared pool size must be positive, got {nbytes}")
    fd = os.memfd_create(f"dynamo-ext-{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SHM_SEALS)
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    try:  # huge pages where the kernel allows them for shmem (transparent_hugepage/shmem_enabled)
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    arr = np.frombuffer(mm, dtype=np.uint8)
    addr = arr.ctypes.data
    handle = ShmHandle(pid=os.getpid(), fd=fd, dev=st.st_dev, inode=st.st_ino, uid=st.st_uid, size=nbytes)
    with _shared_lock:
        _shared[addr] = (nbytes, handle, weakref.ref(mm))
    weakref.finalize(mm, _release_shared, fd, addr)
    if fill is not None:
        arr.fill(fill)  # pre-touch every page
    return arr


def shared_host_tensor(nbytes: int, name: str = "kv") -> Any:
    """``shared_host_array`` as a torch uint8 CPU tensor (zero-filled): the engine's KV pool on the CPU."""
    import torch  # noqa: PLC0415

    return torch.from_numpy(shared_host_array(nbytes, name, fill=0))


def shm_handle_of(addr: int, nbytes: int) -> ShmHandle | None:
    """The handle of the live shared region holding ``[addr, addr + nbytes)`` (offset set), else None."""
    with _shared_lock:
        items = list(_shared.items())
    for base, (size, handle, ref) in items:
        if base <= addr and addr + nbytes <= base + size and ref() is not None and handle.pid == os.getpid():
            return msgspec.structs.replace(handle, offset=addr - base)
    return None


def _cuda_host_register(arr: np.ndarray) -> bool:
    """Pin an existing host mapping for CUDA (cudaHostRegister); False when that fails."""
    try:
        import torch  # noqa: PLC0415

        rc = torch.cuda.cudart().cudaHostRegister(arr.ctypes.data, arr.nbytes, 0)
        return int(getattr(rc, "value", rc)) == 0
    except Exception:  # noqa: BLE001 - unpinned host memory still works, slower for device copies
        return False


def _cuda_present() -> bool:
    """Cheap check (no torch import on machines without an NVIDIA driver)."""
    if not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import torch  # noqa: PLC0415

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class KvPool:
    """A local KV pool: layout + one contiguous buffer. Create with the ``allocate_*``/``open_file`` helpers."""

    def __init__(self, name: str, layout: KvLayout, kind: MemoryKind | str, buffer: Any, *,
                 addr: int, nbytes: int, device_id: int = 0, path: str | None = None) -> None:
        self.name = name
        self.layout = layout
        self.kind = MemoryKind(kind)
        self.buffer = buffer  # keeps the memory alive
        self.addr = addr
        self.nbytes = nbytes
        self.device_id = device_id
        self.path = path
        self.pinned = False
        self.registered_with: set[str] = set()  # backend names that registered this pool
        #: how a same-host peer maps this pool (host pools in shared memory, found by address), else None
        self.shm: ShmHandle | None = shm_handle_of(addr, nbytes) if self.kind is MemoryKind.HOST else None
        if layout.pool_bytes > nbytes:
            raise ValueError(f"pool {name!r}: layout needs {layout.pool_bytes} bytes, buffer has {nbytes}")

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def allocate_host(cls, name: str, layout: KvLayout, *, pin: bool | str = "auto", fill: int = 0,
                      shared: bool = False) -> "KvPool":
        """A host pool, pre-touched with ``fill``; pinned through torch when CUDA is present (``pin="auto"``).
        ``shared=True``: in a memfd a same-host peer can map (``shared_host_array``; the shm backend needs it);
        pinned with cudaHostRegister when CUDA is present (not measured yet: to run on the GPU machine)."""
        n = layout.pool_bytes
        pinned = False
        if shared:
            arr = shared_host_array(n, name, fill=fill)
            if pin is True or (pin == "auto" and _cuda_present()):
                pinned = _cuda_host_register(arr)
            pool = cls(name, layout, MemoryKind.HOST, arr, addr=arr.ctypes.data, nbytes=n)
            pool.pinned = pinned
            return pool
        if pin is True or (pin == "auto" and _cuda_present()):
            import torch  # noqa: PLC0415

            t = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            arr = t.numpy()
            buf: Any = (t, arr)
            pinned = True
        else:
            arr = np.empty(n, dtype=np.uint8)
            buf = arr
        arr.fill(fill)  # pre-touch every page
        pool = cls(name, layout, MemoryKind.HOST, buf, addr=arr.ctypes.data, nbytes=n)
        pool.pinned = pinned
        return pool

    @classmethod
    def from_host_array(cls, name: str, layout: KvLayout, arr: np.ndarray) -> "KvPool":
        """Wrap an existing contiguous host array (the caller keeps it alive and pre-touched)."""
        if not arr.flags.c_contiguous:
            raise ValueError("host pool buffer must be C-contiguous")
        return cls(name, layout, MemoryKind.HOST, arr, addr=arr.ctypes.data, nbytes=arr.nbytes)

    @classmethod
    def allocate_device(cls, name: str, layout: KvLayout, device: int = 0) -> "KvPool":
        import torch  # noqa: PLC0415

        t = torch.zeros(layout.pool_bytes, dtype=torch.uint8, device=f"cuda:{device}")
        return cls(name, layout, MemoryKind.DEVICE, t, addr=t.data_ptr(), nbytes=t.numel(), device_id=device)

    @classmethod
    def from_tensor(cls, name: str, layout: KvLayout, tensor: Any) -> "KvPool":
        """Wrap an existing contiguous torch tensor (CPU -> host pool, CUDA -> device pool)."""
        if not tensor.is_contiguous():
            raise ValueError("pool tensor must be contiguous")
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_cuda:
            return cls(name, layout, MemoryKind.DEVICE, tensor, addr=tensor.data_ptr(), nbytes=nbytes,
                       device_id=tensor.device.index or 0)
        return cls(name, layout, MemoryKind.HOST, tensor, addr=tensor.data_ptr(), nbytes=nbytes)

    @classmethod
    def open_file(cls, name: str, layout: KvLayout, path: str) -> "KvPool":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, layout.pool_bytes)
        return cls(name, layout, MemoryKind.FILE, fd, addr=0, nbytes=layout.pool_bytes, device_id=fd, path=path)

    # -- views -----------------------------------------------------------------------------------
    def host_view(self) -> np.ndarray:
        """The pool's bytes as a numpy uint8 array (host pools only)."""
        if self.kind is not MemoryKind.HOST:
            raise TypeError(f"pool {self.name!r} is {self.kind.value}, not host memory")
        buf = self.buffer[1] if isinstance(self.buffer, tuple) else self.buffer
        if isinstance(buf, np.ndarray):
            return buf.reshape(-1).view(np.uint8)
        import ctypes  # noqa: PLC0415  (torch CPU tensor: view its memory without importing torch)

        return np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.addr))

    def tensor_u8(self) -> Any:
        """The pool's bytes as a flat torch uint8 tensor (host or device)."""
        import torch  # noqa: PLC0415

        if self.kind is MemoryKind.DEVICE:
            return self.buffer.view(-1).view(torch.uint8)
        if isinstance(self.buffer, tuple):
            return self.buffer[0]
        return torch.from_numpy(self.host_view())

    def descriptor(self) -> PoolDescriptor:
        return PoolDescriptor(self.name, self.kind, self.addr, self.nbytes, self.device_id, self.layout.to_dict(),
                              self.shm)

    def nixl_reg_tuple(self) -> tuple[int, int, int, str]:
        return (self.addr, self.nbytes, self.device_id, self.name if self.kind is MemoryKind.FILE else "")

    def close(self) -> None:
        if self.kind is MemoryKind.FILE and isinstance(self.buffer, int) and self.buffer >= 0:
            os.close(self.buffer)
            self.buffer = -1

    def __repr__(self) -> str:
        return f"KvPool({self.name!r}, {self.kind.value}, {self.nbytes} B @ 0x{self.addr:x})"
