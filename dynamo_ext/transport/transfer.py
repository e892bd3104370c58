"""transfer_kv_cache: validate, plan, post and await one KV transfer through a TransferBackend.

Protocol (who calls what, in what order)::

    caller (a worker)                          transfer.py                         backend
    ------------------------------------------------------------------------------------------------
    h = await transfer_kv_cache(src, dst, blocks, backend=be, ...)
                                               1. which side is local -> op:
                                                  KvPool -> RemotePool   = "write" (push)
                                                  RemotePool -> KvPool   = "read"  (pull)
                                                  KvPool -> KvPool       = "copy"  (same process)
                                               2. plan = planner(layouts, ids)     LayoutMismatch /
                                                                                   InvalidBlocks, nothing moved
                                               3. be.peer(), registration checks   PeerUnreachable /
                                                                                   UnregisteredMemory
                                               4. deadline = max(0.5 s, 4 * bytes / expected GB/s)
                                               5. req = be.post(op, local, peer, remote, wire, notif)
                                               6. a task polls req.poll(), yielding to the loop between
                                                  polls (sleep(0); after 2 ms sleep(be.poll_interval_s):
                                                  0 for NIXL without progress thread, whose polls ARE
                                                  the progress) until done / error / deadline
    stats = await h   (or h.result(), h.add_done_callback(cb), h.cancel())
                                               7. deadline passed -> req.cancel(), TransferTimeout
                                               8. done -> metrics (bytes, seconds, descriptors)

Arguments: ``src``/``dst`` are a local ``KvPool`` (registered with ``backend``) or a
``RemotePool(peer_agent_name, PoolDescriptor)`` taken from the peer's ``PeerInfo``. ``blocks`` is a
list of block ids used on both sides, or a pair ``(src_block_ids, dst_block_ids)`` of equal length.
``stream`` is accepted for device copies (CUDA IPC / same-process torch copies); NIXL ignores it.
``notif`` (write only) reaches the destination's ``backend.get_notifs()`` after the data landed.
A KvPool -> KvPool transfer where one pool is a FILE pool goes through the backend (NIXL POSIX,
the agent being its own remote): host -> file is a "write", file -> host a "read".

The default planner is ``plan_transfer(..., stage=False)``: merged descriptors, pool to pool.

Staged WRITE (``stage=True``, or ``stage=None`` = automatic from device pools), when both sides
registered a staging pool (``register_pool(p, staging=True)``) large enough for the transfer::

    initiator                                         target (its backend.progress() loop)
    gather_into(pool -> staging)       (plan.gather)
    post WRITE staging -> peer staging (plan.wire, 1 descriptor per slice)
       notif = STAGED_REQUEST + msgpack{id, src_layout, src_blocks, dst_pool, dst_blocks, plan kwargs, user}
                                                      recompute the SAME pure plan, scatter_from(staging -> pool)
                                                      queue the user's notif, send_notif(STAGED_ACK + id)
    poll: wire DONE, then the ack -> TransferStats    (error -> STAGED_NACK + id + message -> BackendError)

Staged READ (this side pulls)::

    reader                                            source (its backend.progress() loop)
    send_notif(STAGED_GATHER + msgpack{id, src_pool, src_blocks, dst_layout, dst_blocks, plan kwargs})
                                                      when its staging is free: recompute the plan,
                                                      gather_into(pool -> staging), lease the staging
                                                      to this reader, send_notif(STAGED_ACK + id)
    on the ack: post READ peer staging -> local staging (plan.wire)
    wire DONE: scatter_from(local staging -> pool), send_notif(STAGED_RELEASE + id)
                                                      lease ends (or expires after STAGING_LEASE_S)

One staged transfer per local staging region at a time (an asyncio lock). Concurrent readers of one
source queue behind its staging lease; concurrent WRITErs into one target's staging are NOT
arbitrated (use READ, or one writer per target). Both sides must know each other (add_peer).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

import uuid

import msgpack

from .backend import (
    STAGED_ACK,
    STAGED_GATHER,
    STAGED_NACK,
    STAGED_RELEASE,
    STAGED_REQUEST,
    DoneRequest as _Done,
    TransferBackend,
    XferRequest,
)
from .errors import BackendError, InvalidBlocks, TransferError, TransferTimeout, UnregisteredMemory
from .layout import KvLayout
from .metrics import TransportMetrics, metrics as default_metrics
from .plan import TransferPlan, plan_transfer
from .pool import KvPool, MemoryKind, PoolDescriptor

DEADLINE_FLOOR_S = 0.5
DEADLINE_FACTOR = 4.0
_SPIN_S = 0.002  # yield-only polling for the first 2 ms, then the backend's poll_interval_s

Direction = Literal["read", "write", "copy"]
Planner = Callable[[KvLayout, Sequence[int], KvLayout, Sequence[int]], TransferPlan]


class RemotePool(NamedTuple):
    """A pool of a peer: its agent name and the PoolDescriptor it published."""

    peer: str
    pool: PoolDescriptor


@dataclass(frozen=True)
class TransferStats:
    bytes: int
    descriptors: int
    seconds: float
    gbps: float
    path: str
    backend: str
    direction: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_planner(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout,
                    dst_blocks: Sequence[int]) -> TransferPlan:
    return plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, stage=False)


class _StagedRequest(XferRequest):
    """Wire WRITE into the peer's staging, then wait for the peer's scatter ack."""

    def __init__(self, be: TransferBackend, wire: XferRequest, peer: str, xid: bytes, lock: asyncio.Lock) -> None:
        self._be, self._wire, self._peer, self._xid, self._lock = be, wire, peer, xid, lock
        self._wired = False

    def poll(self) -> bool:
        try:
            if not self._wired:
                if not self._wire.poll():
                    return False
                self._wired = True
            if self._be.pop_notif(self._peer, STAGED_ACK + self._xid):
                self._release()
                return True
            for m in list(self._be._notifs.get(self._peer, [])):
                if m.startswith(STAGED_NACK + self._xid):
                    self._be._notifs[self._peer].remove(m)
                    raise BackendError(f"peer {self._peer!r} failed to scatter: {m[len(STAGED_NACK) + 16:].decode(errors='replace')}")
            return False
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def cancel(self) -> None:
        self._wire.cancel()
        self._release()


_STAGING_LOCKS: dict[tuple[int, str], asyncio.Lock] = {}


async def _post_staged(backend: TransferBackend, local: KvPool, remote: RemotePool, plan: TransferPlan,
                       plan_kwargs: dict[str, Any], notif: bytes) -> XferRequest:
    """Source half of a staged WRITE: gather -> one wire WRITE staging->staging (+ scatter request)."""
    from .staging import gather_into  # noqa: PLC0415  (torch)

    stg = backend.staging_for(local)
    rstg = backend.peer(remote.peer).staging
    assert stg is not None and rstg is not None
    lock = _STAGING_LOCKS.setdefault((id(backend), str(id(stg))), asyncio.Lock())
    await lock.acquire()  # one staged transfer per local staging region at a time
    try:
        gather_into(local.tensor_u8(), stg.tensor_u8(), plan.gather)
        if local.kind is MemoryKind.DEVICE:
            import torch  # noqa: PLC0415

            torch.cuda.synchronize(local.device_id)
        xid = uuid.uuid4().hex[:16].encode()
        msg = STAGED_REQUEST + msgpack.packb({
            "id": xid, "src_layout": plan.src_layout.to_dict(), "src_blocks": list(plan.src_blocks),
            "dst_pool": remote.pool.name, "dst_blocks": list(plan.dst_blocks), "plan": plan_kwargs, "user": notif,
        }, use_bin_type=True)
        wire = np.asarray(getattr(plan.wire, "array", plan.wire), dtype=np.int64).reshape(-1, 3)
        req = backend.post("write", stg, remote.peer, rstg, wire, msg)
    except BaseException:
        lock.release()
        raise
    return _StagedRequest(backend, req, remote.peer, xid, lock)


def _nack_text(m: bytes) -> str:
    return m[len(STAGED_NACK) + 16:].decode(errors="replace")


class _StagedReadRequest(XferRequest):
    """Staged READ: gather request -> peer gathers + acks -> wire READ staging->staging -> local scatter
    -> release the peer's staging."""

    def __init__(self, be: TransferBackend, local: KvPool, stg: KvPool, remote: RemotePool, rstg: PoolDescriptor,
                 plan: TransferPlan, xid: bytes, lock: asyncio.Lock) -> None:
        self._be, self._local, self._stg, self._remote, self._rstg = be, local, stg, remote, rstg
        self._plan, self._xid, self._lock = plan, xid, lock
        self._wire: XferRequest | None = None
        self._done = False

    def poll(self) -> bool:
        if self._done:
            return True
        peer = self._remote.peer
        try:
            if self._wire is None:
                if not self._be.pop_notif(peer, STAGED_ACK + self._xid):
                    for m in list(self._be._notifs.get(peer, [])):
                        if m.startswith(STAGED_NACK + self._xid):
                            self._be._notifs[peer].remove(m)
                            raise BackendError(f"peer {peer!r} failed to gather: {_nack_text(m)}")
                    return False
                w = np.asarray(getattr(self._plan.wire, "array", self._plan.wire), dtype=np.int64).reshape(-1, 3)
                self._wire = self._be.post("read", self._stg, peer, self._rstg, w[:, [1, 0, 2]])
            if not self._wire.poll():
                return False
            from .staging import scatter_from  # noqa: PLC0415

            scatter_from(self._stg.tensor_u8(), self._local.tensor_u8(), self._plan.scatter)
            if self._local.kind is MemoryKind.DEVICE:
                import torch  # noqa: PLC0415

                torch.cuda.synchronize(self._local.device_id)
            self._done = True
            self._finish()
            return True
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        try:
            self._be.send_notif(self._remote.peer, STAGED_RELEASE + self._xid)
        except Exception:  # noqa: BLE001 - the peer's lease expires on its own
            pass
        if self._lock.locked():
            self._lock.release()

    def cancel(self) -> None:
        if self._wire is not None:
            self._wire.cancel()
        if not self._done:
            self._done = True
            self._finish()


async def _post_staged_read(backend: TransferBackend, local: KvPool, remote: RemotePool, plan: TransferPlan,
                            plan_kwargs: dict[str, Any]) -> XferRequest:
    """Destination half of a staged READ (this side pulls): ask the peer to gather into its staging."""
    stg = backend.staging_for(local)
    rstg = backend.peer(remote.peer).staging
    assert stg is not None and rstg is not None
    lock = _STAGING_LOCKS.setdefault((id(backend), str(id(stg))), asyncio.Lock())
    await lock.acquire()
    try:
        xid = uuid.uuid4().hex[:16].encode()
        msg = STAGED_GATHER + msgpack.packb({
            "id": xid, "src_pool": remote.pool.name, "src_blocks": list(plan.src_blocks),
            "dst_layout": plan.dst_layout.to_dict(), "dst_blocks": list(plan.dst_blocks), "plan": plan_kwargs,
        }, use_bin_type=True)
        backend.send_notif(remote.peer, msg)
    except BaseException:
        lock.release()
        raise
    return _StagedReadRequest(backend, local, stg, remote, rstg, plan, xid, lock)


STAGING_LEASE_S = 30.0  # a reader that never releases the staging loses it after this long


def _serve_gathers(backend: TransferBackend, peer: str, msgs: list[bytes]) -> int:
    """Source half of staged READs: release finished leases, then gather for the next reader."""
    served = 0
    for m in [m for m in msgs if m.startswith(STAGED_RELEASE)]:
        msgs.remove(m)
        lease = backend._staging_lease
        if lease is not None and lease[0] == peer and lease[1] == m[len(STAGED_RELEASE):]:
            backend._staging_lease = None
        served += 1
    lease = backend._staging_lease
    if lease is not None and time.monotonic() - lease[2] > STAGING_LEASE_S:
        backend._staging_lease = lease = None
    for m in [m for m in msgs if m.startswith(STAGED_GATHER)]:
        if backend._staging_lease is not None:
            break  # staging busy: the request waits in the buffer
        msgs.remove(m)
        served += 1
        xid = b"?" * 16
        try:
            req = msgpack.unpackb(m[len(STAGED_GATHER):], raw=False)
            xid = bytes(req["id"])
            pool = backend._pools.get(req["src_pool"])
            stg = backend.staging_pool
            if pool is None or stg is None:
                raise UnregisteredMemory(f"no pool {req['src_pool']!r} or no staging on {backend.agent_name!r}")
            plan = plan_transfer(pool.layout, req["src_blocks"], KvLayout.from_dict(req["dst_layout"]),
                                 req["dst_blocks"], **req["plan"])
            from .staging import gather_into  # noqa: PLC0415

            gather_into(pool.tensor_u8(), stg.tensor_u8(), plan.gather)
            if pool.kind is MemoryKind.DEVICE:
                import torch  # noqa: PLC0415

                torch.cuda.synchronize(pool.device_id)
            backend._staging_lease = (peer, xid, time.monotonic())
            reply = STAGED_ACK + xid
        except Exception as e:  # noqa: BLE001 - reported to the reader
            reply = STAGED_NACK + xid + f"{type(e).__name__}: {e}".encode()[:400]
        try:
            backend.send_notif(peer, reply)
        except Exception:  # noqa: BLE001
            backend._staging_lease = None
    return served


def serve_staged_requests(backend: TransferBackend) -> int:
    """Destination half of staged WRITEs (called by ``backend.progress()``): for every scatter request
    in the notification buffer, recompute the pure plan, scatter staging -> pool, queue the user's
    notification, and ack (or nack with the error) to the sender. Returns requests served."""
    served = 0
    for peer, msgs in list(backend._notifs.items()):
        served += _serve_gathers(backend, peer, msgs)
        for m in [m for m in msgs if m.startswith(STAGED_REQUEST)]:
            msgs.remove(m)
            served += 1
            xid = b"?" * 16
            try:
                req = msgpack.unpackb(m[len(STAGED_REQUEST):], raw=False)
                xid = bytes(req["id"])
                pool = backend._pools.get(req["dst_pool"])
                stg = backend.staging_pool
                if pool is None or stg is None:
                    raise UnregisteredMemory(f"no pool {req['dst_pool']!r} or no staging on {backend.agent_name!r}")
                plan = plan_transfer(KvLayout.from_dict(req["src_layout"]), req["src_blocks"], pool.layout,
                                     req["dst_blocks"], **req["plan"])
                from .staging import scatter_from  # noqa: PLC0415

                scatter_from(stg.tensor_u8(), pool.tensor_u8(), plan.scatter)
                if pool.kind is MemoryKind.DEVICE:
                    import torch  # noqa: PLC0415

                    torch.cuda.synchronize(pool.device_id)
                if req.get("user"):
                    msgs.append(bytes(req["user"]))
                reply = STAGED_ACK + xid
            except Exception as e:  # noqa: BLE001 - reported to the sender
                reply = STAGED_NACK + xid + f"{type(e).__name__}: {e}".encode()[:400]
            try:
                backend.send_notif(peer, reply)
            except Exception:  # noqa: BLE001 - sender will time out
                pass
    return served


def deadline_for(nbytes: int, gbps: float, *, floor_s: float = DEADLINE_FLOOR_S, factor: float = DEADLINE_FACTOR) -> float:
    """Seconds allowed for ``nbytes`` at ``gbps`` GB/s (1e9 bytes/s): max(floor, factor * expected time)."""
    if gbps <= 0:
        raise ValueError(f"expected bandwidth must be positive, got {gbps}")
    return max(floor_s, factor * nbytes / (gbps * 1e9))


def _split_blocks(blocks: Any) -> tuple[list[int], list[int]]:
    if isinstance(blocks, tuple) and len(blocks) == 2 and all(isinstance(b, (list, tuple, np.ndarray)) for b in blocks):
        return list(blocks[0]), list(blocks[1])
    if isinstance(blocks, (list, tuple, np.ndarray, range)):
        ids = list(blocks)
        return ids, ids
    raise InvalidBlocks(f"blocks must be a list of ids or a (src_ids, dst_ids) pair, got {type(blocks).__name__}")


def _kind(p: KvPool | RemotePool) -> str:
    return p.kind.value if isinstance(p, KvPool) else p.pool.kind.value


def _layout(p: KvPool | RemotePool) -> KvLayout:
    return p.layout if isinstance(p, KvPool) else p.pool.kv_layout()


def _staged_kwargs(backend: TransferBackend, src: Any, dst: Any, stage: bool | None) -> dict[str, Any]:
    """plan_transfer kwargs for a staged WRITE, or {} when staging is not possible/wanted.
    stage=None (auto): stage only from device pools (gather at ~1 TB/s pays off; on the host it does not)."""
    if isinstance(src, KvPool) and isinstance(dst, RemotePool):
        local, remote, src_kind = src, dst, src.kind
    elif isinstance(src, RemotePool) and isinstance(dst, KvPool):
        local, remote, src_kind = dst, src, src.pool.kind
    else:
        return {}
    if not backend.has_peer(remote.peer):
        return {}
    stg, rstg = backend.staging_for(local), backend.peer(remote.peer).staging
    if stg is None or rstg is None:
        if stage:
            raise BackendError("stage=True needs a staging pool registered on both sides "
                               "(register_pool(pool, staging=True))")
        return {}
    if stage is None and src_kind is not MemoryKind.DEVICE:
        return {}
    return {"stage": True if stage else None, "staging_capacity_bytes": min(stg.nbytes, rstg.nbytes)}


class TransferHandle:
    """An in-flight transfer. ``await handle`` -> TransferStats, or raises a TransferError."""

    def __init__(self, *, plan: TransferPlan, direction: str, path: str, backend: str, deadline_s: float,
                 req: XferRequest, started: float, metrics: TransportMetrics | None, poll_s: float = 0.0) -> None:
        self.plan, self.direction, self.path, self.backend = plan, direction, path, backend
        self.deadline_s = deadline_s
        self._req, self._t0, self._metrics, self._poll_s = req, started, metrics, poll_s
        loop = asyncio.get_running_loop()
        self._fut: asyncio.Future[TransferStats] = loop.create_future()
        self._task = loop.create_task(self._drive())

    async def _drive(self) -> None:
        deadline_at = self._t0 + self.deadline_s
        spin_until = time.monotonic() + _SPIN_S
        try:
            while not self._req.poll():
                now = time.monotonic()
                if now >= deadline_at:
                    self._req.cancel()
                    raise TransferTimeout(
                        f"{self.direction} of {self.plan.total_bytes} B over {self.backend} ({self.path}) not done "
                        f"after {now - self._t0:.3f} s (deadline {self.deadline_s:.3f} s); request cancelled")
                await asyncio.sleep(0 if now < spin_until else self._poll_s)
        except asyncio.CancelledError:
            self._req.cancel()
            if not self._fut.done():
                self._fut.cancel()
            raise
        except TransferError as e:
            self._finish_error(e)
            return
        except Exception as e:  # noqa: BLE001 - anything else from a backend is a BackendError
            err = BackendError(f"{self.backend}: {type(e).__name__}: {e}")
            err.__cause__ = e
            self._finish_error(err)
            return
        secs = max(time.monotonic() - self._t0, 1e-9)
        nbytes = self.plan.total_bytes
        stats = TransferStats(nbytes, self.plan.num_descriptors, secs, nbytes / secs / 1e9, self.path,
                              self.backend, self.direction)
        if self._metrics is not None:
            self._metrics.observe(path=self.path, direction=self.direction, backend=self.backend, nbytes=nbytes,
                                  seconds=secs, descriptors=stats.descriptors)
        if not self._fut.done():
            self._fut.set_result(stats)

    def _finish_error(self, e: TransferError) -> None:
        if self._metrics is not None:
            self._metrics.error(path=self.path, direction=self.direction, backend=self.backend, kind=type(e).__name__)
        if not self._fut.done():
            self._fut.set_exception(e)

    # -- public --------------------------------------------------------------------------------
    def __await__(self):  # type: ignore[no-untyped-def]
        return self._fut.__await__()

    def done(self) -> bool:
        return self._fut.done()

    def result(self) -> TransferStats:
        """The stats; raises the transfer's error, or InvalidStateError while it is running."""
        return self._fut.result()

    def cancel(self) -> bool:
        """Abort the transfer (the backend request is released). ``await handle`` then raises CancelledError."""
        if self._fut.done():
            return False
        self._req.cancel()
        self._task.cancel()
        self._fut.cancel()
        return True

    def add_done_callback(self, cb: Callable[["TransferHandle"], Any]) -> None:
        """``cb(handle)`` once the transfer finished (success, error or cancel), in the event loop."""
        self._fut.add_done_callback(lambda _f: cb(self))


async def transfer_kv_cache(
    src: KvPool | RemotePool,
    dst: KvPool | RemotePool,
    blocks: Any,
    stream: Any = None,
    *,
    backend: TransferBackend | None = None,
    direction: Direction | None = None,
    deadline_s: float | None = None,
    expected_gbps: float | None = None,
    notif: bytes = b"",
    on_done: Callable[[TransferHandle], Any] | None = None,
    planner: Planner | None = None,
    stage: bool | None = None,
    metrics: TransportMetrics | None | Literal["default"] = "default",
) -> TransferHandle:
    """Start moving the KV chunks of ``blocks`` from ``src`` to ``dst``; see the module docstring."""
    src_ids, dst_ids = _split_blocks(blocks)
    if isinstance(src, KvPool) and isinstance(dst, RemotePool):
        op: Direction = "write"
    elif isinstance(src, RemotePool) and isinstance(dst, KvPool):
        op = "read"
    elif isinstance(src, KvPool) and isinstance(dst, KvPool):
        op = "copy"
        if MemoryKind.FILE in (src.kind, dst.kind):  # host <-> file through the backend (NIXL POSIX)
            if backend is None or not backend.supports_self:
                raise ValueError("a transfer to/from a file pool needs a backend that supports it (nixl)")
            if dst.kind is MemoryKind.FILE:
                dst, op = RemotePool(backend.agent_name, dst.descriptor()), "write"
            else:
                src, op = RemotePool(backend.agent_name, src.descriptor()), "read"
    else:
        raise TypeError("src and dst must be a KvPool and/or a RemotePool, and not both remote")
    if direction is not None and direction != op:
        raise ValueError(f"direction={direction!r} but {type(src).__name__} -> {type(dst).__name__} is a {op}")

    plan_kwargs: dict[str, Any] = {}
    if planner is None and stage is not False and op in ("write", "read") and backend is not None:
        plan_kwargs = _staged_kwargs(backend, src, dst, stage)
    if planner is not None:
        plan = planner(_layout(src), src_ids, _layout(dst), dst_ids)
    elif plan_kwargs:
        plan = plan_transfer(_layout(src), src_ids, _layout(dst), dst_ids, **plan_kwargs)
        if plan.staged and plan.staging_slots:
            plan_kwargs = {}
            plan = default_planner(_layout(src), src_ids, _layout(dst), dst_ids)
    else:
        plan = default_planner(_layout(src), src_ids, _layout(dst), dst_ids)
    if plan.staged and not plan_kwargs:
        raise BackendError("staged plans run only through transfer_kv_cache(stage=True|None) on a WRITE "
                           "with registered staging on both sides")
    wire = np.asarray(getattr(plan.wire, "array", plan.wire), dtype=np.int64).reshape(-1, 3)
    path = f"{_kind(src)}->{_kind(dst)}"
    met = default_metrics() if metrics == "default" else metrics

    if op == "copy":
        from .fallbacks.local import copy_ranges  # noqa: PLC0415

        t0 = time.monotonic()
        assert isinstance(src, KvPool) and isinstance(dst, KvPool)
        copy_ranges(src, dst, wire, stream=stream)
        handle = TransferHandle(plan=plan, direction="copy", path=path, backend="local", deadline_s=float("inf"),
                                req=_Done(), started=t0, metrics=met if isinstance(met, TransportMetrics) else None)
    else:
        if backend is None:
            raise ValueError("a transfer with a remote pool needs backend=")
        local, remote = (src, dst) if op == "write" else (dst, src)
        assert isinstance(local, KvPool) and isinstance(remote, RemotePool)
        backend.peer(remote.peer)  # PeerUnreachable for an unknown peer
        backend.require_registered(local)
        backend.require_remote_pool(remote.peer, remote.pool)
        descs = wire if op == "write" else wire[:, [1, 0, 2]]
        if deadline_s is None:
            deadline_s = deadline_for(plan.total_bytes, expected_gbps or backend.default_gbps)
        t0 = time.monotonic()
        if plan.staged and op == "write":
            req = await _post_staged(backend, local, remote, plan, plan_kwargs, notif)
        elif plan.staged:
            req = await _post_staged_read(backend, local, remote, plan, plan_kwargs)
        else:
            req = backend.post(op, local, remote.peer, remote.pool, descs, notif if op == "write" else b"")
        handle = TransferHandle(plan=plan, direction=op, path=path, backend=backend.name, deadline_s=deadline_s,
                                req=req, started=t0, metrics=met if isinstance(met, TransportMetrics) else None,
                                poll_s=backend.poll_interval_s)
    if on_done is not None:
        handle.add_done_callback(on_done)
    return handle


__all__ = ["RemotePool", "TransferHandle", "TransferStats", "deadline_for", "default_planner", "transfer_kv_cache"]
