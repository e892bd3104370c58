"""pull / push / copy: validate, plan, post and await one KV transfer through a TransferBackend.

Protocol (who calls what, in what order)::

    caller (a worker)                          transfer.py                         backend
    ------------------------------------------------------------------------------------------------
    h = await pull(be, RemotePool, KvPool, blocks, opts)   # READ  (this side pulls)
      | await push(be, KvPool, RemotePool, blocks, opts)   # WRITE (this side pushes)
      | await copy(KvPool, KvPool, blocks, opts)           # same process (file pools: backend=be)
                                               1. blocks -> (src_ids, dst_ids)      InvalidBlocks
                                               2. staging? staged.staged_plan_kwargs (pull/push, no
                                                  planner, opts.stage is not False)
                                               3. plan = planner(layouts, ids)     LayoutMismatch /
                                                                                   InvalidBlocks, nothing moved
                                               4. be.peer(), registration checks   PeerUnreachable /
                                                                                   UnregisteredMemory
                                               5. deadline = opts.deadline_s, else
                                                  max(0.5 s, 4 * bytes / expected GB/s)
                                               6. req = be.post(op, local, peer, remote, wire, notif)
                                                  (staged plan: staged.post_staged_write / _read)
                                               7. a task waits on req.completion() when the request has
                                                  one (tcp/cma/shm: their task; until the deadline), then
                                                  polls req.poll(), yielding to the loop between polls
                                                  (sleep(0); after 2 ms sleep(be.poll_interval_s): 0 for
                                                  NIXL without progress thread, whose polls ARE the
                                                  progress) until done / error / deadline
    stats = await h   (or h.result(), h.add_done_callback(cb), h.cancel())
                                               8. deadline passed -> req.cancel(), TransferTimeout
                                               9. done -> metrics (bytes, seconds, descriptors)

Arguments: a local ``KvPool`` (registered with ``backend``) and a ``RemotePool(peer_agent_name,
PoolDescriptor)`` taken from the peer's ``PeerInfo``. ``blocks`` is a list of block ids used on both
sides, or a pair ``(src_block_ids, dst_block_ids)`` of equal length. ``TransferOptions``:
``deadline_s`` (else derived from bytes and ``expected_gbps`` or ``backend.default_gbps``,
``deadline_for``); ``notif`` (push only) reaches the destination's ``backend.get_notifs()`` after the
data landed; ``stage`` (None = automatic: device source + staging on both sides; True forces; False
never); ``planner`` (a custom plan function, benchmarks); ``stream`` for device copies (``copy``; NIXL
ignores it); ``metrics`` ("default" = the process registry, None = none); ``on_done(handle)``.
``copy`` of two KvPools where one is a FILE pool goes through ``backend`` (NIXL POSIX, the agent being
its own remote): host -> file is a "write", file -> host a "read".

The default planner is ``plan_transfer(..., stage=False)``: merged descriptors, pool to pool, through the
process's bounded plan LRU (``plan.cached_plan_transfer``: a repeated (layouts, ids) pair is not planned
again, and gets the same plan object, which rowcopy's rows cache keys on). Staged
transfers (gather -> one wire descriptor -> scatter, with acks through notifications) are the protocol
of ``staged.py``; see its map.

Whole-block fast path: when no custom planner or staging applies and the backend has ``post_blocks``
for the pair (CUDA IPC on one GPU), the ids go to the backend as they are (validated like a plan's:
``plan.check_blocks``) and no descriptor list is built; the stats then count blocks as descriptors.
Requests that end in microseconds (``sync_wait_s``) are polled before ``pull``/``push`` return.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

from .backend import DoneRequest as _Done, TransferBackend, XferRequest
from .errors import BackendError, InvalidBlocks, TransferError, TransferTimeout
from .fallbacks.local import copy_ranges
from .layout import KvLayout
from .metrics import TransportMetrics, metrics as default_metrics
from .plan import TransferPlan, cached_plan_transfer, check_blocks as _check_blocks
from .pool import KvPool, MemoryKind, PoolDescriptor
from .staged import post_staged_read, post_staged_write, staged_plan_kwargs

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
    """The direct plan (merged runs, pool -> pool), from the process's bounded plan LRU (``plan.PLAN_CACHE``)."""
    return cached_plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, stage=False)


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


class TransferHandle:
    """An in-flight transfer. ``await handle`` -> TransferStats, or raises a TransferError."""

    def __init__(self, *, plan: TransferPlan, direction: str, path: str, backend: str, deadline_s: float,
                 req: XferRequest, started: float, metrics: TransportMetrics | None, poll_s: float = 0.0) -> None:
        self.plan, self.direction, self.path, self.backend = plan, direction, path, backend
        self.deadline_s = deadline_s
        self._req, self._t0, self._metrics, self._poll_s = req, started, metrics, poll_s
        loop = asyncio.get_running_loop()
        self._fut: asyncio.Future[TransferStats] = loop.create_future()
        sync_s = float(getattr(req, "sync_wait_s", 0.0))
        if sync_s > 0 and self._spin(sync_s):  # done without a trip through the event loop
            self._task = None
            return
        self._task = loop.create_task(self._drive())

    def _spin(self, seconds: float) -> bool:
        """Poll without yielding for up to ``seconds`` (requests that declare ``sync_wait_s``: copies that
        end in microseconds); True when it finished here (result or error set)."""
        t_end = time.monotonic() + seconds
        try:
            while not self._req.poll():
                if time.monotonic() >= t_end:
                    return False
        except TransferError as e:
            self._finish_error(e)
            return True
        except Exception as e:  # noqa: BLE001 - as in _drive
            err = BackendError(f"{self.backend}: {type(e).__name__}: {e}")
            err.__cause__ = e
            self._finish_error(err)
            return True
        self._finish_ok()
        return True

    async def _drive(self) -> None:
        deadline_at = self._t0 + self.deadline_s
        try:
            done = self._req.completion()  # a task/thread-backed request: wait for it, no spinning
            if done is not None and not self._req.poll():
                await asyncio.wait({asyncio.ensure_future(done)}, timeout=max(0.0, deadline_at - time.monotonic()))
            spin_until = time.monotonic() + _SPIN_S
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
        self._finish_ok()

    def _finish_ok(self) -> None:
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




@dataclass(frozen=True)
class TransferOptions:
    """How one transfer runs; every field has the default of the plain call."""

    deadline_s: float | None = None  # else derived from bytes / expected_gbps (deadline_for)
    expected_gbps: float | None = None  # else backend.default_gbps
    notif: bytes = b""  # push only: delivered to the peer after the bytes landed
    stage: bool | None = None  # None = automatic (device source + staging on both sides)
    planner: Planner | None = None  # custom plan function (benchmarks)
    stream: Any = None  # device copies
    metrics: TransportMetrics | None | Literal["default"] = "default"
    on_done: Callable[[TransferHandle], Any] | None = None


_DEFAULT_OPTIONS = TransferOptions()


def _plan(src: KvPool | RemotePool, src_ids: list[int], dst: KvPool | RemotePool, dst_ids: list[int],
          planner: Planner | None, plan_kwargs: dict[str, Any]) -> tuple[TransferPlan, dict[str, Any]]:
    """The plan (custom planner, staged, or the default direct one) and the staged kwargs it used ({}: none)."""
    if planner is not None:
        plan = planner(_layout(src), src_ids, _layout(dst), dst_ids)
    elif plan_kwargs:
        plan = cached_plan_transfer(_layout(src), src_ids, _layout(dst), dst_ids, **plan_kwargs)
        if plan.staged and plan.staging_slots:
            plan_kwargs = {}
            plan = default_planner(_layout(src), src_ids, _layout(dst), dst_ids)
    else:
        plan = default_planner(_layout(src), src_ids, _layout(dst), dst_ids)
    if plan.staged and not plan_kwargs:
        raise BackendError("staged plans run only through pull/push(stage=True|None) with registered staging "
                           "on both sides")
    return plan, plan_kwargs


def _metrics(options: TransferOptions) -> TransportMetrics | None:
    met = default_metrics() if options.metrics == "default" else options.metrics
    return met if isinstance(met, TransportMetrics) else None


def _finish(handle: TransferHandle, options: TransferOptions) -> TransferHandle:
    if options.on_done is not None:
        handle.add_done_callback(options.on_done)
    return handle


async def _remote(op: Literal["read", "write"], backend: TransferBackend | None, local: KvPool, remote: RemotePool,
                  blocks: Any, options: TransferOptions) -> TransferHandle:
    """A READ (remote -> local) or WRITE (local -> remote) through ``backend``."""
    src_ids, dst_ids = _split_blocks(blocks)
    src, dst = (local, remote) if op == "write" else (remote, local)
    plan_kwargs: dict[str, Any] = {}
    if options.planner is None and options.stage is not False and backend is not None:
        source_kind = local.kind if op == "write" else remote.pool.kind
        plan_kwargs = staged_plan_kwargs(backend, local, remote.peer, source_kind, options.stage)
    if options.planner is None and not plan_kwargs and options.stage is not True and backend is not None:
        fast = _post_blocks(op, backend, local, remote, src, src_ids, dst, dst_ids, options)
        if fast is not None:
            return fast
    plan, plan_kwargs = _plan(src, src_ids, dst, dst_ids, options.planner, plan_kwargs)
    wire = np.asarray(getattr(plan.wire, "array", plan.wire), dtype=np.int64).reshape(-1, 3)
    path = f"{_kind(src)}->{_kind(dst)}"
    met = _metrics(options)
    if backend is None:
        raise ValueError("a transfer with a remote pool needs backend=")
    backend.peer(remote.peer)  # PeerUnreachable for an unknown peer
    backend.require_registered(local)
    backend.require_remote_pool(remote.peer, remote.pool)
    descs = wire if op == "write" else wire[:, [1, 0, 2]]
    deadline_s = options.deadline_s
    if deadline_s is None:
        deadline_s = deadline_for(plan.total_bytes, options.expected_gbps or backend.default_gbps)
    t0 = time.monotonic()
    if plan.staged and op == "write":
        req = await post_staged_write(backend, local, remote.peer, remote.pool, plan, plan_kwargs, options.notif)
    elif plan.staged:
        req = await post_staged_read(backend, local, remote.peer, remote.pool, plan, plan_kwargs)
    else:
        req = backend.post(op, local, remote.peer, remote.pool, descs, options.notif if op == "write" else b"")
    handle = TransferHandle(plan=plan, direction=op, path=path, backend=backend.name, deadline_s=deadline_s,
                            req=req, started=t0, metrics=met, poll_s=backend.poll_interval_s)
    return _finish(handle, options)


class BlockPlan(NamedTuple):
    """What a handle of the block fast path reports in place of a TransferPlan (no descriptors were planned)."""

    total_bytes: int
    num_descriptors: int  # the blocks moved (each block = every (layer, K|V) chunk of it)
    staged: bool = False


def _post_blocks(op: Literal["read", "write"], backend: TransferBackend, local: KvPool, remote: RemotePool,
                 src: KvPool | RemotePool, src_ids: list[int], dst: KvPool | RemotePool, dst_ids: list[int],
                 options: TransferOptions) -> TransferHandle | None:
    """The backend's whole-block path (``post_blocks``) when it has one for this pair, else None (plan)."""
    if type(backend).post_blocks is TransferBackend.post_blocks:
        return None
    s, d = _check_blocks(_layout(src), src_ids, _layout(dst), dst_ids)  # LayoutMismatch / InvalidBlocks
    backend.peer(remote.peer)  # PeerUnreachable for an unknown peer
    backend.require_registered(local)
    backend.require_remote_pool(remote.peer, remote.pool)
    nbytes = int(s.shape[0]) * _layout(src).block_bytes
    deadline_s = options.deadline_s
    if deadline_s is None:
        deadline_s = deadline_for(nbytes, options.expected_gbps or backend.default_gbps)
    t0 = time.monotonic()
    req = backend.post_blocks(op, local, remote.peer, remote.pool, s, d)
    if req is None:
        return None
    handle = TransferHandle(plan=BlockPlan(nbytes, int(s.shape[0])), direction=op,  # type: ignore[arg-type]
                            path=f"{_kind(src)}->{_kind(dst)}", backend=backend.name, deadline_s=deadline_s,
                            req=req, started=t0, metrics=_metrics(options), poll_s=backend.poll_interval_s)
    return _finish(handle, options)


async def pull(backend: TransferBackend, remote: RemotePool, local: KvPool, blocks: Any,
               options: TransferOptions | None = None) -> TransferHandle:
    """READ the KV chunks of ``blocks`` from the peer's ``remote`` pool into ``local``; see the module
    docstring. ``options.notif`` is not used (a READ notifies nobody)."""
    if not (isinstance(remote, RemotePool) and isinstance(local, KvPool)):
        raise TypeError(f"pull(backend, remote: RemotePool, local: KvPool, ...), got "
                        f"{type(remote).__name__}, {type(local).__name__}")
    return await _remote("read", backend, local, remote, blocks, options or _DEFAULT_OPTIONS)


async def push(backend: TransferBackend, local: KvPool, remote: RemotePool, blocks: Any,
               options: TransferOptions | None = None) -> TransferHandle:
    """WRITE the KV chunks of ``blocks`` from ``local`` into the peer's ``remote`` pool; see the module
    docstring. ``options.notif`` reaches the peer's ``get_notifs()`` after the bytes landed."""
    if not (isinstance(local, KvPool) and isinstance(remote, RemotePool)):
        raise TypeError(f"push(backend, local: KvPool, remote: RemotePool, ...), got "
                        f"{type(local).__name__}, {type(remote).__name__}")
    return await _remote("write", backend, local, remote, blocks, options or _DEFAULT_OPTIONS)


async def copy(src: KvPool, dst: KvPool, blocks: Any, options: TransferOptions | None = None, *,
               backend: TransferBackend | None = None) -> TransferHandle:
    """Copy the KV chunks of ``blocks`` between two pools of this process (host/device: numpy, torch or
    the rowcopy kernels, synchronously; the handle is done when it is returned). A FILE pool on either
    side goes through ``backend`` (one that ``supports_self``: NIXL POSIX): host -> file is a push to
    this agent itself, file -> host a pull."""
    if not (isinstance(src, KvPool) and isinstance(dst, KvPool)):
        raise TypeError(f"copy(src: KvPool, dst: KvPool, ...), got {type(src).__name__}, {type(dst).__name__}")
    options = options or _DEFAULT_OPTIONS
    if MemoryKind.FILE in (src.kind, dst.kind):  # host <-> file through the backend (NIXL POSIX)
        if backend is None or not backend.supports_self:
            raise ValueError("a transfer to/from a file pool needs a backend that supports it (nixl)")
        if dst.kind is MemoryKind.FILE:
            return await _remote("write", backend, src, RemotePool(backend.agent_name, dst.descriptor()), blocks,
                                 options)
        return await _remote("read", backend, dst, RemotePool(backend.agent_name, src.descriptor()), blocks, options)
    src_ids, dst_ids = _split_blocks(blocks)
    plan, _ = _plan(src, src_ids, dst, dst_ids, options.planner, {})
    wire = np.asarray(getattr(plan.wire, "array", plan.wire), dtype=np.int64).reshape(-1, 3)
    path = f"{_kind(src)}->{_kind(dst)}"
    met = _metrics(options)
    t0 = time.monotonic()
    copy_ranges(src, dst, wire, stream=options.stream)
    handle = TransferHandle(plan=plan, direction="copy", path=path, backend="local", deadline_s=float("inf"),
                            req=_Done(), started=t0, metrics=met)
    return _finish(handle, options)


__all__ = ["RemotePool", "TransferHandle", "TransferOptions", "TransferStats", "copy", "deadline_for",
           "default_planner", "pull", "push"]
