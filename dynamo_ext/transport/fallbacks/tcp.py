"""TcpBackend: host-staged TCP stream between processes (any two hosts), asyncio + raw sockets.

Protocol (one framed exchange per transfer, on one connection per peer, one transfer at a time)::

    frame  = u32 big-endian header length | msgpack header | raw payload (header["total"] bytes, or none)
    WRITE  client -> {"op": "write", "from": name, "pool": remote pool name, "ranges": [[off, n], ...],
                      "total": N, "notif": bytes} + payload (local ranges, in order)
           server <- {"ok": true} once every byte is in the pool (then the notif is queued for get_notifs)
    READ   client -> {"op": "read", "from": name, "pool": ..., "ranges": [[off, n], ...], "total": N}
           server <- {"ok": true, "total": N} + payload, which the client receives into its local ranges
    NOTIF  client -> {"op": "notif", "from": name, "notif": bytes};  server <- {"ok": true}
    errors server <- {"ok": false, "error": "..."} (unknown pool, range outside it), then it closes

Payload bytes go straight between the socket and the pools (``loop.sock_recv_into`` into the pool's
memory, ``sock_sendall`` from it): no intermediate copies. Start-up: ``await be.start()`` binds
``host:0`` (127.0.0.1 by default) and publishes ``host:port`` as PeerInfo.endpoint. Host pools only.
A dead peer shows up as a reset/EOF -> PeerUnreachable; a request cancelled mid-stream closes its
connection (the stream position is unknown); the next transfer reconnects.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Sequence

import msgpack
import numpy as np

from ..backend import Op, TransferBackend, Triple, XferRequest
from ..errors import BackendError, PeerUnreachable, TransferError, UnregisteredMemory
from ..peer import PeerInfo
from ..pool import KvPool, MemoryKind, PoolDescriptor

_HDR = struct.Struct(">I")
_MAX_HEADER = 64 << 20
_SOCKBUF = 8 << 20


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        except OSError:
            pass


async def _recv_into(sock: socket.socket, mv: memoryview) -> None:
    loop = asyncio.get_running_loop()
    while len(mv):
        n = await loop.sock_recv_into(sock, mv)
        if n == 0:
            raise ConnectionResetError("connection closed by peer")
        mv = mv[n:]


async def _read_frame(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_HDR.size)
    await _recv_into(sock, memoryview(head))
    (n,) = _HDR.unpack(head)
    if n > _MAX_HEADER:
        raise BackendError(f"TCP frame header of {n} bytes is too large")
    body = bytearray(n)
    await _recv_into(sock, memoryview(body))
    hdr = msgpack.unpackb(bytes(body), raw=False)
    if not isinstance(hdr, dict):
        raise BackendError("TCP frame header is not a map")
    return hdr


def _frame(hdr: dict[str, Any]) -> bytes:
    b = msgpack.packb(hdr, use_bin_type=True)
    return _HDR.pack(len(b)) + b


async def _send(sock: socket.socket, data: Any) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def _recv_ranges(sock: socket.socket, view: np.ndarray, ranges: Sequence[tuple[int, int]]) -> None:
    for off, n in ranges:
        await _recv_into(sock, memoryview(view[off:off + n]))


async def _send_ranges(sock: socket.socket, view: np.ndarray, ranges: Sequence[tuple[int, int]]) -> None:
    for off, n in ranges:
        await _send(sock, memoryview(view[off:off + n]))


class _TcpRequest(XferRequest):
    def __init__(self, task: asyncio.Task, on_cancel: Any) -> None:
        self._task, self._on_cancel = task, on_cancel

    def poll(self) -> bool:
        if not self._task.done():
            return False
        if self._task.cancelled():
            raise BackendError("TCP transfer was cancelled")
        exc = self._task.exception()
        if exc is not None:
            raise exc
        return True

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()
            self._on_cancel()

    def completion(self) -> asyncio.Task:
        return self._task


class TcpBackend(TransferBackend):
    name = "tcp"
    default_gbps = 0.5

    def __init__(self, agent_name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(agent_name)
        self._host, self._port = host, port
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._handlers: set[asyncio.Task] = set()
        self._conns: dict[str, socket.socket] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._bg: set[asyncio.Task] = set()

    # -- server side -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._listener is not None:
            return
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((self._host, self._port))
        ls.listen(64)
        ls.setblocking(False)
        self._listener, self._port = ls, ls.getsockname()[1]
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(ls))

    async def _accept_loop(self, ls: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(ls)
            except (asyncio.CancelledError, OSError):
                return
            _tune(conn)
            t = loop.create_task(self._serve(conn))
            self._handlers.add(t)
            t.add_done_callback(self._handlers.discard)

    def _endpoint(self) -> str:
        if self._listener is None:
            raise BackendError("TcpBackend.start() must be awaited before local_peer_info()")
        return f"{self._host}:{self._port}"

    def _register(self, pool: KvPool) -> None:
        if pool.kind is not MemoryKind.HOST:
            raise BackendError(f"TcpBackend moves host pools only; {pool.name!r} is {pool.kind.value}")

    def _local_ranges(self, hdr: dict[str, Any]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        pool = self._pools.get(hdr.get("pool"))
        if pool is None:
            raise UnregisteredMemory(f"no registered pool {hdr.get('pool')!r} on {self.agent_name!r}")
        ranges = [(int(o), int(n)) for o, n in hdr.get("ranges", [])]
        for o, n in ranges:
            if o < 0 or n <= 0 or o + n > pool.nbytes:
                raise UnregisteredMemory(f"range ({o}, {n}) outside pool {pool.name!r}")
        return pool.host_view(), ranges

    async def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                hdr = await _read_frame(sock)
                op = hdr.get("op")
                try:
                    if op == "notif":
                        self._notifs.setdefault(str(hdr.get("from")), []).append(bytes(hdr.get("notif", b"")))
                        await _send(sock, _frame({"ok": True}))
                    elif op == "write":
                        view, ranges = self._local_ranges(hdr)
                        await _recv_ranges(sock, view, ranges)
                        if hdr.get("notif"):
                            self._notifs.setdefault(str(hdr.get("from")), []).append(bytes(hdr["notif"]))
                        await _send(sock, _frame({"ok": True}))
                    elif op == "read":
                        view, ranges = self._local_ranges(hdr)
                        await _send(sock, _frame({"ok": True, "total": sum(n for _, n in ranges)}))
                        await _send_ranges(sock, view, ranges)
                    else:
                        raise BackendError(f"unknown op {op!r}")
                except TransferError as e:
                    # a refused write still has its payload in flight: answer, then drop the connection
                    await _send(sock, _frame({"ok": False, "error": str(e)}))
                    return
        except (ConnectionError, OSError, asyncio.CancelledError, BackendError):
            return  # peer gone, bad frame, or this server is closing
        finally:
            sock.close()

    # -- client side -----------------------------------------------------------------------------
    def _connect(self, info: PeerInfo) -> None:
        if not info.endpoint or ":" not in info.endpoint:
            raise PeerUnreachable(f"peer {info.agent_name!r} has no TCP endpoint")

    def _disconnect(self, name: str) -> None:
        self._drop(name)

    def _drop(self, peer: str) -> None:
        sock = self._conns.pop(peer, None)
        if sock is not None:
            sock.close()

    async def _conn(self, peer: str) -> socket.socket:
        sock = self._conns.get(peer)
        if sock is None:
            host, port = self.peer(peer).endpoint.rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            _tune(sock)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            except OSError as e:
                sock.close()
                raise PeerUnreachable(f"cannot connect to peer {peer!r} at {host}:{port}: {e}") from e
            self._conns[peer] = sock
        return sock

    async def _exchange(self, peer: str, op: Op, local: KvPool, remote: PoolDescriptor, descs: Sequence[Triple],
                        notif: bytes) -> None:
        async with self._locks.setdefault(peer, asyncio.Lock()):
            try:
                sock = await self._conn(peer)
                view = local.host_view()
                total = sum(n for _, _, n in descs)
                hdr = {"op": op, "from": self.agent_name, "pool": remote.name,
                       "ranges": [[ro, n] for _, ro, n in descs], "total": total, "notif": notif or b""}
                await _send(sock, _frame(hdr))
                if op == "write":
                    await _send_ranges(sock, view, [(lo, n) for lo, _, n in descs])
                reply = await _read_frame(sock)
                if not reply.get("ok"):
                    self._drop(peer)
                    raise UnregisteredMemory(f"peer {peer!r} refused the {op}: {reply.get('error')}")
                if op == "read":
                    await _recv_ranges(sock, view, [(lo, n) for lo, _, n in descs])
            except (ConnectionError, OSError) as e:
                self._drop(peer)
                raise PeerUnreachable(f"TCP connection to peer {peer!r} lost during {op}: {e!r}") from e

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        if remote.kind is not MemoryKind.HOST:
            raise BackendError(f"TcpBackend moves host pools only; remote {remote.name!r} is {remote.kind.value}")
        task = asyncio.get_running_loop().create_task(self._exchange(peer, op, local, remote, descs.tolist(), notif))
        return _TcpRequest(task, lambda: self._drop(peer))

    def send_notif(self, peer: str, msg: bytes) -> None:
        """Queue a bare notification to ``peer`` (sent by a task of the running loop)."""
        self.peer(peer)
        task = asyncio.get_running_loop().create_task(self.send_notif_async(peer, msg))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def send_notif_async(self, peer: str, msg: bytes) -> None:
        async with self._locks.setdefault(peer, asyncio.Lock()):
            try:
                sock = await self._conn(peer)
                await _send(sock, _frame({"op": "notif", "from": self.agent_name, "notif": msg}))
                await _read_frame(sock)
            except (ConnectionError, OSError) as e:
                self._drop(peer)
                raise PeerUnreachable(f"TCP notification to peer {peer!r} failed: {e!r}") from e

    async def close(self) -> None:
        for name in list(self._conns):
            self._drop(name)
        tasks = list(self._handlers) + list(self._bg) + ([self._accept_task] if self._accept_task else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
