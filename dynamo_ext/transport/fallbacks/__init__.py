"""Fallback backends, chosen at run time when NIXL is missing or a pair has no working NIXL path.

``LocalBackend``    same process: memcpy (numpy) / torch copy between two registered pools.
``TcpBackend``      host-staged TCP stream on loopback or across nodes: asyncio sockets, framed msgpack.
``CudaIpcBackend``  GPU pools of two processes on one node: CUDA IPC handles + cuMemcpyAsync (GPU only).
"""

from .local import LocalBackend
from .tcp import TcpBackend

__all__ = ["LocalBackend", "TcpBackend"]
