"""TcpBackend: host-staged TCP stream between processes (any two hosts), asyncio sockets.

Protocol (one framed exchange per transfer, on one connection per peer, one transfer at a time)::

    frame  = u32 big-endian header length | msgpack header | raw payload (header["total"] bytes, or none)
    WRITE  client -> {"op": "write", "from": name, "pool": remote pool name, "ranges": [[off, n], ...],
                      "total": N, "notif": bytes} + payload (local ranges, in order)
           server <- {"ok": true} once every byte is in the pool (then the notif is queued for get_notifs)
    READ   client -> {"op": "read", "from": name, "pool": ..., "ranges": [[off, n], ...], "total": N}
           server <- {"ok": true, "total": N} + payload, which the client scatters into its local ranges
    NOTIF  client -> {"op": "notif", "from": name, "notif": bytes};  server <- {"ok": true}
    errors server <- {"ok": false, "error": "..."} (unknown pool, range outside it)

Start-up: ``await be.start()`` binds ``host:0`` (127.0.0.1 by default) and publishes ``host:port`` as
PeerInfo.endpoint. Host pools only (device pools would be staged through pinned host memory; not here).
A dead peer shows up as a reset/EOF -> PeerUnreachable; a request cancelled mid-stream drops its
connection (the stream position is unknown), the next transfer reconnects.
"""

from __future__ import annotations

import asyncio
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
_PIECE = 4 << 20


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (n,) = _HDR.unpack(await reader.readexactly(_HDR.size))
    if n > _MAX_HEADER:
        raise BackendError(f"TCP frame header of {n} bytes is too large")
    hdr = msgpack.unpackb(await reader.readexactly(n), raw=False)
    if not isinstance(hdr, dict):
        raise BackendError("TCP frame header is not a map")
    return hdr


def _frame(hdr: dict[str, Any]) -> bytes:
    b = msgpack.packb(hdr, use_bin_type=True)
    return _HDR.pack(len(b)) + b


async def _recv_into(reader: asyncio.StreamReader, view: Any, ranges: Sequence[tuple[int, int]]) -> None:
    for off, n in ranges:
        pos = off
        end = off + n
        while pos < end:
            chunk = await reader.readexactly(min(_PIECE, end - pos))
            view[pos:pos + len(chunk)] = memoryview(chunk)
            pos += len(chunk)


async def _send_from(writer: asyncio.StreamWriter, view: Any, ranges: Sequence[tuple[int, int]]) -> None:
    pending = 0
    for off, n in ranges:
        writer.write(view[off:off + n].data)
        pending += n
        if pending >= _PIECE * 4:
            await writer.drain()
            pending = 0
    await writer.drain()


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


class TcpBackend(TransferBackend):
    name = "tcp"
    default_gbps = 0.5

    def __init__(self, agent_name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(agent_name)
        self._host, self._port = host, port
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- server side -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
            self._port = self._server.sockets[0].getsockname()[1]

    def _endpoint(self) -> str:
        if self._server is None:
            raise BackendError("TcpBackend.start() must be awaited before local_peer_info()")
        return f"{self._host}:{self._port}"

    def _register(self, pool: KvPool) -> None:
        if pool.kind is not MemoryKind.HOST:
            raise BackendError(f"TcpBackend moves host pools only; {pool.name!r} is {pool.kind.value}")

    def _local_ranges(self, hdr: dict[str, Any]) -> tuple[Any, list[tuple[int, int]]]:
        pool = self._pools.get(hdr.get("pool"))
        if pool is None:
            raise UnregisteredMemory(f"no registered pool {hdr.get('pool')!r} on {self.agent_name!r}")
        ranges = [(int(o), int(n)) for o, n in hdr.get("ranges", [])]
        for o, n in ranges:
            if o < 0 or n <= 0 or o + n > pool.nbytes:
                raise UnregisteredMemory(f"range ({o}, {n}) outside pool {pool.name!r}")
        return pool.host_view(), ranges

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    hdr = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                op = hdr.get("op")
                try:
                    if op == "notif":
                        self._notifs.setdefault(str(hdr.get("from")), []).append(bytes(hdr.get("notif", b"")))
                        writer.write(_frame({"ok": True}))
                    elif op == "write":
                        view, ranges = self._local_ranges(hdr)
                        await _recv_into(reader, view, ranges)
                        if hdr.get("notif"):
                            self._notifs.setdefault(str(hdr.get("from")), []).append(bytes(hdr["notif"]))
                        writer.write(_frame({"ok": True}))
                    elif op == "read":
                        view, ranges = self._local_ranges(hdr)
                        writer.write(_frame({"ok": True, "total": sum(n for _, n in ranges)}))
                        await _send_from(writer, view, ranges)
                    else:
                        writer.write(_frame({"ok": False, "error": f"unknown op {op!r}"}))
                except TransferError as e:
                    # a bad write request still has its payload in flight: drop the connection
                    writer.write(_frame({"ok": False, "error": str(e)}))
                    await writer.drain()
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # peer gone, or this server is closing
        finally:
            writer.close()

    # -- client side -----------------------------------------------------------------------------
    def _connect(self, info: PeerInfo) -> None:
        if not info.endpoint or ":" not in info.endpoint:
            raise PeerUnreachable(f"peer {info.agent_name!r} has no TCP endpoint")

    def _disconnect(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn:
            conn[1].close()

    async def _conn(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        conn = self._conns.get(peer)
        if conn is None or conn[1].is_closing():
            host, port = self.peer(peer).endpoint.rsplit(":", 1)
            try:
                conn = await asyncio.open_connection(host, int(port))
            except OSError as e:
                raise PeerUnreachable(f"cannot connect to peer {peer!r} at {host}:{port}: {e}") from e
            self._conns[peer] = conn
        return conn

    async def _exchange(self, peer: str, op: Op, local: KvPool, remote: PoolDescriptor, descs: Sequence[Triple],
                        notif: bytes) -> None:
        lock = self._locks.setdefault(peer, asyncio.Lock())
        async with lock:
            try:
                reader, writer = await self._conn(peer)
                view = local.host_view()
                total = sum(n for _, _, n in descs)
                hdr = {"op": op, "from": self.agent_name, "pool": remote.name,
                       "ranges": [[ro, n] for _, ro, n in descs], "total": total, "notif": notif or b""}
                writer.write(_frame(hdr))
                if op == "write":
                    await _send_from(writer, view, [(lo, n) for lo, _, n in descs])
                reply = await _read_frame(reader)
                if not reply.get("ok"):
                    self._disconnect_conn(peer)
                    raise UnregisteredMemory(f"peer {peer!r} refused the {op}: {reply.get('error')}")
                if op == "read":
                    await _recv_into(reader, view, [(lo, n) for lo, _, n in descs])
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
                self._disconnect_conn(peer)
                raise PeerUnreachable(f"TCP connection to peer {peer!r} lost during {op}: {e!r}") from e

    def _disconnect_conn(self, peer: str) -> None:
        conn = self._conns.pop(peer, None)
        if conn:
            conn[1].close()

    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        if remote.kind is not MemoryKind.HOST:
            raise BackendError(f"TcpBackend moves host pools only; remote {remote.name!r} is {remote.kind.value}")
        task = asyncio.get_running_loop().create_task(self._exchange(peer, op, local, remote, descs.tolist(), notif))
        return _TcpRequest(task, lambda: self._disconnect_conn(peer))

    def send_notif(self, peer: str, msg: bytes) -> None:
        """Queue a bare notification to ``peer`` (sent by a task of the running loop)."""
        self.peer(peer)
        task = asyncio.get_running_loop().create_task(self.send_notif_async(peer, msg))
        self._bg = getattr(self, "_bg", set())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def send_notif_async(self, peer: str, msg: bytes) -> None:
        async with self._locks.setdefault(peer, asyncio.Lock()):
            reader, writer = await self._conn(peer)
            writer.write(_frame({"op": "notif", "from": self.agent_name, "notif": msg}))
            await _read_frame(reader)

    async def close(self) -> None:
        for name in list(self._conns):
            self._disconnect_conn(name)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
