"""The part CmaBackend and ShmBackend share: a ``TcpBackend`` (notifications, and the data path to peers on
other nodes) whose peers on this node get a faster data path of their own.

    class XBackend(SameNodeBackend):
        _connect(info):   super()._connect(info) (the TCP endpoint), then ``self._set_local(name, handle or
                          None)`` with this node's handle for the peer (the old one is closed)
        _post(...):       ``self._local.get(peer)`` -> the same-node path, None -> ``super()._post`` (TCP)
        copies in threads: ``self._executor(workers, prefix)`` (created once, shut down at close)

A handle is anything with ``close()``. ``remove_peer`` (``_disconnect``) and ``close`` close them all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from .tcp import TcpBackend


class _Handle(Protocol):
    def close(self) -> None: ...


class SameNodeBackend(TcpBackend):
    def __init__(self, agent_name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(agent_name, host, port)
        self._local: dict[str, Any] = {}  # peer name -> its same-node handle (peers elsewhere: TCP)
        self._exec: ThreadPoolExecutor | None = None

    def _set_local(self, name: str, handle: _Handle | None) -> None:
        old = self._local.pop(name, None)
        if old is not None:
            old.close()
        if handle is not None:
            self._local[name] = handle

    def is_local(self, peer: str) -> bool:
        """True when transfers with ``peer`` take this node's path (False: the TCP data path)."""
        return peer in self._local

    def _executor(self, workers: int, prefix: str) -> ThreadPoolExecutor:
        if self._exec is None:
            self._exec = ThreadPoolExecutor(max(1, workers), thread_name_prefix=f"{prefix}-{self.agent_name}")
        return self._exec

    def _disconnect(self, name: str) -> None:
        super()._disconnect(name)
        self._set_local(name, None)

    def close_sync(self) -> None:
        for h in self._local.values():
            h.close()
        self._local.clear()
        if self._exec is not None:
            self._exec.shutdown(wait=True)
            self._exec = None

    async def close(self) -> None:
        await super().close()
        self.close_sync()
