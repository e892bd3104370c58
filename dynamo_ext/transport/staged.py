"""The staged-transfer protocol: gather into a registered staging region, one wire descriptor, scatter.

Protocol map (who calls what, in what order)::

    transfer.push / transfer.pull (initiator)    staged.py                          peer (its backend.progress())
    ------------------------------------------------------------------------------------------------------------
    kw = staged_plan_kwargs(be, local, peer,     {} = direct plan; else the plan_transfer
                            source_kind, stage)  kwargs both sides recompute the plan from
    plan = plan_transfer(..., **kw)
    push, plan.staged:
      req = await post_staged_write(be, local,   lock this side's staging (one staged
              peer, remote, plan, kw, notif)     transfer per staging region at a time)
                                                 gather_into(pool -> staging)
                                                 be.post("write", staging -> peer staging,
                                                   notif = STAGED_REQUEST + msgpack{id,
                                                   src_layout, src_blocks, dst_pool,
                                                   dst_blocks, plan kwargs, user notif})
                                                                                    serve_staged_requests(be):
                                                                                    recompute the SAME pure plan,
                                                                                    scatter_from(staging -> pool),
                                                                                    queue the user notif,
                                                                                    send_notif(STAGED_ACK + id)
      req.poll(): wire DONE, then the ack        unlock                             (error: STAGED_NACK + id + text
                                                                                     -> BackendError here)
    pull, plan.staged:
      req = await post_staged_read(be, local,    lock this side's staging
              peer, remote, plan, kw)            send_notif(STAGED_GATHER + msgpack{id,
                                                   src_pool, src_blocks, dst_layout,
                                                   dst_blocks, plan kwargs})
                                                                                    _serve_gathers: when its staging
                                                                                    is not leased: recompute the plan,
                                                                                    gather_into(pool -> staging),
                                                                                    lease the staging to this reader,
                                                                                    send_notif(STAGED_ACK + id)
      req.poll(): on the ack                     be.post("read", peer staging -> staging)
                  wire DONE                      scatter_from(staging -> pool),
                                                 send_notif(STAGED_RELEASE + id),
                                                 unlock                             lease ends (or expires after
                                                                                    STAGING_LEASE_S)

How the passive side runs: importing this module registers ``serve_staged_requests`` with
``backend.add_notif_handler``; ``TransferBackend.progress()`` calls it whenever a buffered notification
starts with STAGED_REQUEST / STAGED_GATHER / STAGED_RELEASE. Importing any module of
``dynamo_ext.transport`` imports the package, whose ``__init__`` imports ``transfer`` and so this module:
every backend of a process serves the protocol. All messages start with ``backend.PROTOCOL_PREFIX``, so
``get_notifs()`` never returns them.

Protocol state lives here, per backend (weakly keyed, dropped with the backend): one asyncio lock per
local staging region, and the lease of this side's staging to one staged READ at a time. Concurrent
readers of one source queue behind its lease; concurrent WRITErs into one target's staging are NOT
arbitrated (use READ, or one writer per target). Both sides must know each other (add_peer): acks are
notifications.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .backend import PROTOCOL_PREFIX, TransferBackend, XferRequest, add_notif_handler
from .errors import BackendError, UnregisteredMemory
from .layout import KvLayout
from .plan import TransferPlan, cached_plan_transfer
from .pool import KvPool, MemoryKind, PoolDescriptor

STAGED_PREFIX = PROTOCOL_PREFIX  # every protocol notification of staged transfers
STAGED_REQUEST = STAGED_PREFIX + b"S"  # WRITE landed in your staging: scatter it
STAGED_GATHER = STAGED_PREFIX + b"G"  # READ: gather these blocks into your staging
STAGED_RELEASE = STAGED_PREFIX + b"R"  # READ done: your staging is free again
STAGED_ACK = STAGED_PREFIX + b"A"
STAGED_NACK = STAGED_PREFIX + b"E"
_SERVED = (STAGED_REQUEST, STAGED_GATHER, STAGED_RELEASE)
STAGING_LEASE_S = 30.0  # a reader that never releases the staging loses it after this long


# -- protocol state, per backend ---------------------------------------------------------------------
@dataclass
class _State:
    locks: dict[int, asyncio.Lock] = field(default_factory=dict)  # id(local staging pool) -> lock
    lease: tuple[str, bytes, float] | None = None  # (peer, id, since): a staged READ of this side's staging
    #: the last staged WRITEs' phases on the initiator, ms: lock (wait for this side's staging), gather (pool ->
    #: staging, synchronised), post (wire descriptors + request message), wire (until the WRITE completes),
    #: ack (until the peer's scatter ack: its notification pickup + plan + scatter + ack), total
    phases: "collections.deque[dict[str, float]]" = field(default_factory=lambda: collections.deque(maxlen=256))


_STATE: "weakref.WeakKeyDictionary[TransferBackend, _State]" = weakref.WeakKeyDictionary()


def _state(backend: TransferBackend) -> _State:
    st = _STATE.get(backend)
    if st is None:
        st = _STATE[backend] = _State()
    return st


def _staging_lock(backend: TransferBackend, stg: KvPool) -> asyncio.Lock:
    return _state(backend).locks.setdefault(id(stg), asyncio.Lock())


def recent_phases(backend: TransferBackend) -> list[dict[str, float]]:
    """The phases (ms) of this backend's last staged WRITEs, oldest first (see ``_State.phases``)."""
    st = _STATE.get(backend)
    return list(st.phases) if st is not None else []


def staging_lease(backend: TransferBackend) -> tuple[str, bytes, float] | None:
    """(reader peer, transfer id, since) while a staged READ holds this backend's staging, else None."""
    st = _STATE.get(backend)
    return st.lease if st is not None else None


# -- initiator ---------------------------------------------------------------------------------------
def staged_plan_kwargs(backend: TransferBackend, local: KvPool, peer: str, source_kind: MemoryKind,
                       stage: bool | None) -> dict[str, Any]:
    """plan_transfer kwargs for a staged transfer between ``local`` and ``peer``, or {} when staging is
    not possible/wanted. stage=None (auto): stage only from device pools (gather at ~1 TB/s pays off; on
    the host it does not); True: raise BackendError when a side has no staging; False: never."""
    if not backend.has_peer(peer):
        return {}
    stg, rstg = backend.staging_for(local), backend.peer(peer).staging
    if stg is None or rstg is None:
        if stage:
            raise BackendError("stage=True needs a staging pool registered on both sides "
                               "(register_pool(pool, staging=True))")
        return {}
    if stage is None and source_kind is not MemoryKind.DEVICE:
        return {}
    return {"stage": True if stage else None, "staging_capacity_bytes": min(stg.nbytes, rstg.nbytes)}


def _nack_text(m: bytes) -> str:
    return m[len(STAGED_NACK) + 16:].decode(errors="replace")


def _sync(pool: KvPool) -> None:
    """Wait for this pool's device copies (a notification must not go out before its bytes are there)."""
    if pool.kind is MemoryKind.DEVICE:
        import torch  # noqa: PLC0415

        torch.cuda.synchronize(pool.device_id)


def _gather(pool: KvPool, stg: KvPool, descs: Any) -> None:
    from .staging import gather_into  # noqa: PLC0415  (torch)

    gather_into(pool.tensor_u8(), stg.tensor_u8(), descs)
    _sync(pool)


def _scatter(stg: KvPool, pool: KvPool, descs: Any) -> None:
    from .staging import scatter_from  # noqa: PLC0415  (torch)

    scatter_from(stg.tensor_u8(), pool.tensor_u8(), descs)
    _sync(pool)


def _served_pools(backend: TransferBackend, name: str) -> tuple[KvPool, KvPool]:
    """(the registered pool ``name``, this backend's staging) for a peer's request, or UnregisteredMemory."""
    pool, stg = backend._pools.get(name), backend.staging_pool
    if pool is None or stg is None:
        raise UnregisteredMemory(f"no pool {name!r} or no staging on {backend.agent_name!r}")
    return pool, stg


class _StagedRequest(XferRequest):
    """Wire WRITE into the peer's staging, then wait for the peer's scatter ack."""

    def __init__(self, be: TransferBackend, wire: XferRequest, peer: str, xid: bytes, lock: asyncio.Lock,
                 times: list[float]) -> None:
        self._be, self._wire, self._peer, self._xid, self._lock = be, wire, peer, xid, lock
        self._wired = False
        self._times = times  # perf_counter at: start, locked, gathered, posted (then wired, acked)

    def poll(self) -> bool:
        try:
            if not self._wired:
                if not self._wire.poll():
                    return False
                self._wired = True
                self._times.append(time.perf_counter())
            if self._be.pop_notif(self._peer, STAGED_ACK + self._xid):
                self._release()
                t = [*self._times, time.perf_counter()]
                _state(self._be).phases.append({k: round((t[i + 1] - t[i]) * 1e3, 4) for i, k in enumerate(
                    ("lock_ms", "gather_ms", "post_ms", "wire_ms", "ack_ms"))} | {"total_ms": round((t[-1] - t[0]) * 1e3, 4)})
                return True
            for m in list(self._be._notifs.get(self._peer, [])):
                if m.startswith(STAGED_NACK + self._xid):
                    self._be._notifs[self._peer].remove(m)
                    raise BackendError(f"peer {self._peer!r} failed to scatter: {_nack_text(m)}")
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


async def post_staged_write(backend: TransferBackend, local: KvPool, peer: str, remote: PoolDescriptor,
                            plan: TransferPlan, plan_kwargs: dict[str, Any], notif: bytes) -> XferRequest:
    """Source half of a staged WRITE: gather -> one wire WRITE staging->staging (+ scatter request)."""
    stg = backend.staging_for(local)
    rstg = backend.peer(peer).staging
    assert stg is not None and rstg is not None
    lock = _staging_lock(backend, stg)
    times = [time.perf_counter()]
    await lock.acquire()  # one staged transfer per local staging region at a time
    try:
        times.append(time.perf_counter())
        _gather(local, stg, plan.gather)
        times.append(time.perf_counter())
        xid = uuid.uuid4().hex[:16].encode()
        msg = STAGED_REQUEST + msgpack.packb({
            "id": xid, "src_layout": plan.src_layout.to_dict(), "src_blocks": list(plan.src_blocks),
            "dst_pool": remote.name, "dst_blocks": list(plan.dst_blocks), "plan": plan_kwargs, "user": notif,
        }, use_bin_type=True)
        wire = np.asarray(getattr(plan.wire, "array", plan.wire), dtype=np.int64).reshape(-1, 3)
        req = backend.post("write", stg, peer, rstg, wire, msg)
        times.append(time.perf_counter())
    except BaseException:
        lock.release()
        raise
    return _StagedRequest(backend, req, peer, xid, lock, times)


class _StagedReadRequest(XferRequest):
    """Staged READ: gather request -> peer gathers + acks -> wire READ staging->staging -> local scatter
    -> release the peer's staging."""

    def __init__(self, be: TransferBackend, local: KvPool, stg: KvPool, peer: str, rstg: PoolDescriptor,
                 plan: TransferPlan, xid: bytes, lock: asyncio.Lock) -> None:
        self._be, self._local, self._stg, self._peer, self._rstg = be, local, stg, peer, rstg
        self._plan, self._xid, self._lock = plan, xid, lock
        self._wire: XferRequest | None = None
        self._done = False

    def poll(self) -> bool:
        if self._done:
            return True
        peer = self._peer
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
            _scatter(self._stg, self._local, self._plan.scatter)
            self._done = True
            self._finish()
            return True
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        try:
            self._be.send_notif(self._peer, STAGED_RELEASE + self._xid)
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


async def post_staged_read(backend: TransferBackend, local: KvPool, peer: str, remote: PoolDescriptor,
                           plan: TransferPlan, plan_kwargs: dict[str, Any]) -> XferRequest:
    """Destination half of a staged READ (this side pulls): ask the peer to gather into its staging."""
    stg = backend.staging_for(local)
    rstg = backend.peer(peer).staging
    assert stg is not None and rstg is not None
    lock = _staging_lock(backend, stg)
    await lock.acquire()
    try:
        xid = uuid.uuid4().hex[:16].encode()
        msg = STAGED_GATHER + msgpack.packb({
            "id": xid, "src_pool": remote.name, "src_blocks": list(plan.src_blocks),
            "dst_layout": plan.dst_layout.to_dict(), "dst_blocks": list(plan.dst_blocks), "plan": plan_kwargs,
        }, use_bin_type=True)
        backend.send_notif(peer, msg)
    except BaseException:
        lock.release()
        raise
    return _StagedReadRequest(backend, local, stg, peer, rstg, plan, xid, lock)


# -- passive side (run by backend.progress()) -----------------------------------------------------------
def _serve_gathers(backend: TransferBackend, peer: str, msgs: list[bytes]) -> int:
    """Source half of staged READs: release finished leases, then gather for the next reader."""
    st = _state(backend)
    served = 0
    for m in [m for m in msgs if m.startswith(STAGED_RELEASE)]:
        msgs.remove(m)
        lease = st.lease
        if lease is not None and lease[0] == peer and lease[1] == m[len(STAGED_RELEASE):]:
            st.lease = None
        served += 1
    lease = st.lease
    if lease is not None and time.monotonic() - lease[2] > STAGING_LEASE_S:
        st.lease = lease = None
    for m in [m for m in msgs if m.startswith(STAGED_GATHER)]:
        if st.lease is not None:
            break  # staging busy: the request waits in the buffer
        msgs.remove(m)
        served += 1
        xid = b"?" * 16
        try:
            req = msgpack.unpackb(m[len(STAGED_GATHER):], raw=False)
            xid = bytes(req["id"])
            pool, stg = _served_pools(backend, req["src_pool"])
            plan = cached_plan_transfer(pool.layout, req["src_blocks"], KvLayout.from_dict(req["dst_layout"]),
                                        req["dst_blocks"], **req["plan"])
            _gather(pool, stg, plan.gather)
            st.lease = (peer, xid, time.monotonic())
            reply = STAGED_ACK + xid
        except Exception as e:  # noqa: BLE001 - reported to the reader
            reply = STAGED_NACK + xid + f"{type(e).__name__}: {e}".encode()[:400]
        try:
            backend.send_notif(peer, reply)
        except Exception:  # noqa: BLE001
            st.lease = None
    return served


def serve_staged_requests(backend: TransferBackend) -> int:
    """The passive side (called by ``backend.progress()``): staged READs (``_serve_gathers``), then,
    for every scatter request of a staged WRITE in the notification buffer, recompute the pure plan,
    scatter staging -> pool, queue the user's notification, and ack (or nack with the error) to the
    sender. Returns requests served."""
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
                pool, stg = _served_pools(backend, req["dst_pool"])
                plan = cached_plan_transfer(KvLayout.from_dict(req["src_layout"]), req["src_blocks"], pool.layout,
                                            req["dst_blocks"], **req["plan"])
                _scatter(stg, pool, plan.scatter)
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


add_notif_handler(_SERVED, serve_staged_requests)

__all__ = [
    "STAGED_ACK", "STAGED_GATHER", "STAGED_NACK", "STAGED_PREFIX", "STAGED_RELEASE", "STAGED_REQUEST",
    "STAGING_LEASE_S", "post_staged_read", "post_staged_write", "recent_phases", "serve_staged_requests",
    "staged_plan_kwargs",
    "staging_lease",
]
