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

``PoolDescriptor`` is what peers see: plain msgspec (kind, addr, nbytes, device_id, layout dict),
never pickled. It carries no buffer, only where the bytes are in the owner's address space.
"""

from __future__ import annotations

import os
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


class PoolDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A pool as a peer sees it (sent inside ``PeerInfo``)."""

    name: str
    kind: MemoryKind
    addr: int
    nbytes: int
    device_id: int
    layout: dict[str, Any]

    def kv_layout(self) -> KvLayout:
        return KvLayout.from_dict(self.layout)

    def validate(self) -> None:
        if self.addr < 0 or self.nbytes <= 0:
            raise ValueError(f"pool {self.name!r}: bad region addr={self.addr} nbytes={self.nbytes}")
        lay = self.kv_layout()
        if lay.pool_bytes > self.nbytes:
            raise ValueError(f"pool {self.name!r}: layout needs {lay.pool_bytes} bytes, region has {self.nbytes}")


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
        if layout.pool_bytes > nbytes:
            raise ValueError(f"pool {name!r}: layout needs {layout.pool_bytes} bytes, buffer has {nbytes}")

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def allocate_host(cls, name: str, layout: KvLayout, *, pin: bool | str = "auto", fill: int = 0) -> "KvPool":
        n = layout.pool_bytes
        pinned = False
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
        return PoolDescriptor(self.name, self.kind, self.addr, self.nbytes, self.device_id, self.layout.to_dict())

    def nixl_reg_tuple(self) -> tuple[int, int, int, str]:
        return (self.addr, self.nbytes, self.device_id, self.name if self.kind is MemoryKind.FILE else "")

    def close(self) -> None:
        if self.kind is MemoryKind.FILE and isinstance(self.buffer, int) and self.buffer >= 0:
            os.close(self.buffer)
            self.buffer = -1

    def __repr__(self) -> str:
        return f"KvPool({self.name!r}, {self.kind.value}, {self.nbytes} B @ 0x{self.addr:x})"
