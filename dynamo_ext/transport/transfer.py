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

Staged transfers (``stage=True``, or ``stage=None`` = automatic from device pools, when both sides
registered a staging pool large enough: gather -> one wire descriptor -> scatter, acks through
notifications) are the protocol of ``staged.py``; see its map.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

from .backend import DoneRequest as _Done, TransferBackend, XferRequest
from .errors import BackendError, InvalidBlocks, TransferError, TransferTimeout
from .layout import KvLayout
from .metrics import TransportMetrics, metrics as default_metrics
from .plan import TransferPlan, plan_transfer
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
    return plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, stage=False)


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
        local, remote = (src, dst) if op == "write" else (dst, src)
        assert isinstance(local, KvPool) and isinstance(remote, RemotePool)
        source_kind = local.kind if op == "write" else remote.pool.kind
        plan_kwargs = staged_plan_kwargs(backend, local, remote.peer, source_kind, stage)
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
            req = await post_staged_write(backend, local, remote.peer, remote.pool, plan, plan_kwargs, notif)
        elif plan.staged:
            req = await post_staged_read(backend, local, remote.peer, remote.pool, plan, plan_kwargs)
        else:
            req = backend.post(op, local, remote.peer, remote.pool, descs, notif if op == "write" else b"")
        handle = TransferHandle(plan=plan, direction=op, path=path, backend=backend.name, deadline_s=deadline_s,
                                req=req, started=t0, metrics=met if isinstance(met, TransportMetrics) else None,
                                poll_s=backend.poll_interval_s)
    if on_done is not None:
        handle.add_done_callback(on_done)
    return handle


__all__ = ["RemotePool", "TransferHandle", "TransferStats", "deadline_for", "default_planner", "transfer_kv_cache"]
