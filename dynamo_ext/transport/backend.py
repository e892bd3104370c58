"""TransferBackend: the small interface every byte mover implements (NIXL, TCP, same-process, CUDA IPC).

Protocol (who calls what, in what order)::

    start-up (owner of the pools):
        be = NixlBackend(name, choice) | TcpBackend(name) | LocalBackend(name)
        await be.start()                      # servers (TCP); no-op for NIXL/local
        be.register_pool(pool)                # once per pool
        info = be.local_peer_info()           # -> published to peers
    initiator, once per peer:
        be.add_peer(PeerInfo.decode(blob))    # unknown/unsupported peer -> PeerUnreachable
    initiator, per transfer (driven by transfer.pull/push/copy, never by callers directly):
        req = be.post(op, local_pool, peer, remote_pool, descs, notif)   # op "read" pulls, "write" pushes
        while not req.poll(): await a short sleep    # poll raises PeerUnreachable/BackendError
        req.cancel()                           # on deadline/cancel; idempotent; releases the request
    target (passive side), regularly:
        be.progress(); be.get_notifs()        # {peer_name: [notif bytes, ...]} in send order
                                              # progress() runs the notification handlers that protocols
                                              # layered on the backend registered (add_notif_handler:
                                              # staged.py); get_notifs() never returns PROTOCOL_PREFIX messages
    shutdown:
        await be.close()

``descs`` are ``(local_offset, remote_offset, nbytes)`` triples (an (N, 3) int64 array) relative to the start of each pool,
i.e. a plan's wire descriptors with src/dst swapped into local/remote by the caller. The base class
checks that every range lies inside its pool, so a backend never touches bytes outside a pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Literal

import numpy as np

from .errors import InvalidBlocks, PeerUnreachable, UnregisteredMemory
from .peer import PeerInfo
from .pool import KvPool, PoolDescriptor

Op = Literal["read", "write"]
#: notifications that start with this are reserved for protocols layered on the backend (staged.py):
#: progress() hands them to the registered handlers, get_notifs() never returns them
PROTOCOL_PREFIX = b"\x00DX"
Triple = tuple[int, int, int]


NotifHandler = Callable[["TransferBackend"], int]
_NOTIF_HANDLERS: list[tuple[tuple[bytes, ...], NotifHandler]] = []


def add_notif_handler(prefixes: tuple[bytes, ...], handler: NotifHandler) -> None:
    """Have every backend's ``progress()`` call ``handler(backend)`` whenever a buffered notification
    starts with one of ``prefixes`` (each under PROTOCOL_PREFIX). Idempotent; staged.py registers the
    staged-transfer protocol here when it is imported."""
    prefixes = tuple(prefixes)
    if not prefixes or not all(p.startswith(PROTOCOL_PREFIX) and p != PROTOCOL_PREFIX for p in prefixes):
        raise ValueError(f"notification handler prefixes must extend PROTOCOL_PREFIX, got {prefixes!r}")
    if (prefixes, handler) not in _NOTIF_HANDLERS:
        _NOTIF_HANDLERS.append((prefixes, handler))


def as_triples(descs: Any) -> np.ndarray:
    """(N, 3) int64 array from a DescriptorArray, an (N, 3) array, or a sequence of 3-tuples."""
    a = getattr(descs, "array", descs)
    a = np.asarray(a if len(a) else np.zeros((0, 3)), dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"descriptors must be (N, 3), got shape {a.shape}")
    return a


class XferRequest(ABC):
    """One posted transfer. ``poll()`` is non-blocking and cheap."""

    @abstractmethod
    def poll(self) -> bool:
        """True once every byte has landed; raises a TransferError subclass on failure."""

    @abstractmethod
    def cancel(self) -> None:
        """Abort if still running and release backend resources. Idempotent, never raises."""

    def completion(self) -> Any:
        """An asyncio awaitable that finishes when the request does (success or error), or None. A request
        whose work runs in a task or thread (tcp, cma, shm) returns it: the handle then waits on it instead of
        spinning on ``poll()`` (a spinning event loop holds the GIL the copy thread needs to start and finish:
        measured ~2 ms per transfer on 2 cores). ``poll()`` still gives the result."""
        return None


class DoneRequest(XferRequest):
    """A request that completed synchronously inside ``post``."""

    def poll(self) -> bool:
        return True

    def cancel(self) -> None:
        pass


class TransferBackend(ABC):
    name: str = "abstract"
    #: conservative GB/s used for deadlines when the caller gives no measured bandwidth
    default_gbps: float = 1.0
    #: seconds a TransferHandle sleeps between polls after the first 2 ms (0 = keep yielding)
    poll_interval_s: float = 0.0005

    def __init__(self, agent_name: str) -> None:
        self.agent_name = agent_name
        self._pools: dict[str, KvPool] = {}
        self._peers: dict[str, PeerInfo] = {}
        self._staging: KvPool | None = None
        self._stagings: dict[tuple[str, int], KvPool] = {}
        self._notifs: dict[str, list[bytes]] = {}

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:
        self.close_sync()

    def close_sync(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- registration --------------------------------------------------------------------------
    def register_pool(self, pool: KvPool, *, staging: bool = False) -> None:
        if pool.name in self._pools and self._pools[pool.name] is not pool:
            raise ValueError(f"a different pool named {pool.name!r} is already registered")
        if pool.name not in self._pools:
            self._register(pool)
            self._pools[pool.name] = pool
            pool.registered_with.add(self.agent_name)
        if staging:
            self._stagings[(pool.kind.value, pool.device_id if pool.kind.value == "device" else -1)] = pool
            if self._staging is None:
                self._staging = pool  # the one advertised in PeerInfo.staging (peers WRITE into it)

    def _register(self, pool: KvPool) -> None:  # noqa: B027 - backends override when needed
        pass

    def is_registered(self, pool: KvPool) -> bool:
        return self._pools.get(pool.name) is pool

    def require_registered(self, pool: KvPool) -> None:
        if not self.is_registered(pool):
            raise UnregisteredMemory(
                f"pool {pool.name!r} ({pool.nbytes} B @ 0x{pool.addr:x}) is not registered with backend "
                f"{self.name}:{self.agent_name}; register pools once at start-up with register_pool()"
            )

    def local_peer_info(self) -> PeerInfo:
        import os  # noqa: PLC0415

        return PeerInfo(
            agent_name=self.agent_name, backend=self.name, agent_metadata=self._agent_metadata(),
            pools=[p.descriptor() for p in self._pools.values() if p not in self._stagings.values()],
            staging=self._staging.descriptor() if self._staging else None,
            pid=os.getpid(), endpoint=self._endpoint(),
        )

    def _agent_metadata(self) -> bytes:
        return b""

    def _endpoint(self) -> str:
        return ""

    # -- peers ---------------------------------------------------------------------------------------
    def add_peer(self, info: PeerInfo) -> None:
        if info.backend != self.name:
            raise PeerUnreachable(f"peer {info.agent_name!r} speaks backend {info.backend!r}, this side {self.name!r}")
        if info.agent_name == self.agent_name:
            raise PeerUnreachable(f"peer {info.agent_name!r} has this agent's own name")
        self._connect(info)
        self._peers[info.agent_name] = info

    def _connect(self, info: PeerInfo) -> None:  # noqa: B027
        pass

    def remove_peer(self, name: str) -> None:
        if self._peers.pop(name, None) is not None:
            self._disconnect(name)

    def _disconnect(self, name: str) -> None:  # noqa: B027
        pass

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    #: whether transfers between two pools of this backend itself work (NIXL: host <-> file)
    supports_self: bool = False

    def peer(self, name: str) -> PeerInfo:
        if name == self.agent_name and self.supports_self:
            return PeerInfo(agent_name=name, backend=self.name, pools=[p.descriptor() for p in self._pools.values()])
        try:
            return self._peers[name]
        except KeyError:
            raise PeerUnreachable(
                f"unknown peer {name!r} for backend {self.name}:{self.agent_name}: call add_peer(PeerInfo) first "
                f"(known: {sorted(self._peers)[:8]})"
            ) from None

    def require_remote_pool(self, peer: str, remote: PoolDescriptor) -> None:
        info = self.peer(peer)
        regions = list(info.pools) + ([info.staging] if info.staging else [])
        if not any(r.addr == remote.addr and r.nbytes == remote.nbytes and r.kind == remote.kind for r in regions):
            raise UnregisteredMemory(
                f"remote pool {remote.name!r} ({remote.nbytes} B @ 0x{remote.addr:x}) is not among the pools "
                f"peer {peer!r} registered: {[r.name for r in regions]}"
            )

    # -- transfers -----------------------------------------------------------------------------------
    def post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: Any,
             notif: bytes = b"") -> XferRequest:
        if op not in ("read", "write"):
            raise ValueError(f"op must be 'read' or 'write', got {op!r}")
        self.require_registered(local)
        self.require_remote_pool(peer, remote)
        d = as_triples(descs)
        if len(d) == 0:
            raise InvalidBlocks("empty transfer: no descriptors")
        lo, ro, n = d[:, 0], d[:, 1], d[:, 2]
        bad = (n <= 0) | (lo < 0) | (ro < 0) | (lo + n > local.nbytes) | (ro + n > remote.nbytes)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidBlocks(f"descriptor {tuple(int(x) for x in d[i])} falls outside the pools "
                                f"({local.nbytes} B local, {remote.nbytes} B remote)")
        return self._post(op, local, peer, remote, d, notif)

    @abstractmethod
    def _post(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, descs: np.ndarray,
              notif: bytes) -> XferRequest:
        """``descs``: validated (N, 3) int64 array of (local_offset, remote_offset, nbytes)."""

    def post_blocks(self, op: Op, local: KvPool, peer: str, remote: PoolDescriptor, src_ids: np.ndarray,
                    dst_ids: np.ndarray) -> XferRequest | None:
        """Optional fast path for whole blocks between pools of compatible layouts, without a descriptor plan:
        every chunk of ``src_ids[i]`` (the source side of ``op``) to ``dst_ids[i]``. The caller (transfer.py)
        has validated layouts and ids. None: not supported for this pair (the caller plans instead)."""
        return None

    # -- notifications -----------------------------------------------------------------------------
    # Every backend buffers received notifications in self._notifs {peer: [msg, ...]}. Messages that
    # start with PROTOCOL_PREFIX belong to protocols layered on the backend (the staged transfers of
    # staged.py: scatter requests, acks); progress() runs their handlers, get_notifs() never returns them.
    def _pull_notifs(self) -> None:  # noqa: B027
        """Move newly received notifications into self._notifs (NIXL polls its agent here)."""

    def progress(self) -> None:
        """Drive a passive side: pull notifications and run the registered protocol handlers (staged
        transfers). Call it regularly (every ~1 ms) on a side that receives WRITEs, or run ``serve()``
        as a task."""
        self._pull_notifs()
        for prefixes, handler in _NOTIF_HANDLERS:
            if any(m.startswith(prefixes) for v in self._notifs.values() for m in v):
                handler(self)

    async def serve(self, interval_s: float = 0.001) -> None:
        import asyncio  # noqa: PLC0415

        while True:
            self.progress()
            await asyncio.sleep(interval_s)

    def get_notifs(self) -> dict[str, list[bytes]]:
        """Drain user notifications {peer: [msg, ...]} in arrival order (protocol messages excluded)."""
        self.progress()
        out: dict[str, list[bytes]] = {}
        keep: dict[str, list[bytes]] = {}
        for peer, msgs in self._notifs.items():
            for m in msgs:
                (keep if m.startswith(PROTOCOL_PREFIX) else out).setdefault(peer, []).append(m)
        self._notifs = keep
        return out

    def pop_notif(self, peer: str, exact: bytes) -> bool:
        """Remove one notification equal to ``exact`` from ``peer``; True if it was there."""
        self._pull_notifs()
        msgs = self._notifs.get(peer, [])
        if exact in msgs:
            msgs.remove(exact)
            return True
        return False

    @property
    def staging_pool(self) -> KvPool | None:
        """The staging region peers write into (the first registered with staging=True)."""
        return self._staging

    def staging_for(self, pool: KvPool) -> KvPool | None:
        """A staging region on the same memory (kind and device) as ``pool``, for gathers."""
        return self._stagings.get((pool.kind.value, pool.device_id if pool.kind.value == "device" else -1))

    def send_notif(self, peer: str, msg: bytes) -> None:
        raise NotImplementedError(f"{self.name} cannot send bare notifications")
