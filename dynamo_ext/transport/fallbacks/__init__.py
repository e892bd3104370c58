"""Fallback backends, chosen at run time when NIXL is missing or a pair has no working NIXL path.

``LocalBackend``    same process: memcpy (numpy) / torch copy between two registered pools.
``TcpBackend``      host-staged TCP stream on loopback or across nodes: asyncio sockets, framed msgpack.
``CmaBackend``      host pools of two processes on one node: process_vm_writev/readv with iovec arrays
                    (kernel scatter/gather, no staging); control and other nodes over TcpBackend.
``ShmBackend``      host pools in shared memory (memfd) of two processes on one node: the peer maps them; both
                    extend ``SameNodeBackend`` (samenode.py): TCP for notifications and other nodes.
``CudaIpcBackend``  GPU pools of two processes on one node: CUDA IPC handles + cuMemcpyAsync (GPU only).
"""

from .local import LocalBackend
from .tcp import TcpBackend

__all__ = ["LocalBackend", "TcpBackend"]
