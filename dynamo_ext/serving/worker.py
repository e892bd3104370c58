"""What a serving worker does, whatever carries its requests: prefill and hold a KV handle, reap it at its
deadline, release it; pull a handle's KV (prefix-aware, stale-handle check, the transport the topology
picks for the pair); stream a decode; detach running requests for migration.

Who calls what (the adapters: ``workers/`` over Dynamo endpoints, ``bench/direct_worker.py`` over JSON
lines), in what order::

    adapter                                   ServingWorker                         elsewhere
    ---------------------------------------------------------------------------------------------------------
    w = ServingWorker(settings, plane, metrics)
    runner = w.start_engine()                 model, BlockPool, engine, EngineRunner (not yet running);
                                              the adapter may set runner.pool.sink (KV events) now
    await w.start(topology)                   the step loop; roles prefill/decode: every transport
                                              backend the topology supports, the KV pool registered once
                                              with each (serving/transports.py); role prefill: the reaper
    w.advertise()                             PeerTransports blob -> the adapter's record
    -- prefill side (role prefill) -----------------------------------------------------------------------
    chunk = await w.prefill(request, clamp=)  parse (BadRequest -> error chunk); prefix match +
                                              prefill_only; blocks held under a handle until now + hold_s;
                                              -> {"kv_handle", "token_ids": [first], ...}
    await w.release(handle_id) -> bool        blocks freed; False: unknown or already reaped
    (reaper, every 50 ms)                     handles past their deadline freed, counted as expired
    -- decode side (roles decode, agg) ---------------------------------------------------------------------
    async for chunk in w.generate(request, rid, is_stopped):
                                              stopping -> error chunk; handing over -> raises Draining
                                              (before any chunk: the router retries elsewhere); parse;
                                              with a kv_handle: pull (below), any failure -> local prefill;
                                              first chunk {"token_ids": [first], "kv_transfer": report}
                                              (report only when the request asks: report_kv_transfer);
                                              then the engine's tokens; last chunk finish_reason + usage;
                                              exported (drain / rebalance) -> last chunk {"migrate": ...}
       pull(req, handle):                     peer = plane.peer(handle) (or the request's kv_peer_info)
                                              k = leading blocks our prefix cache holds (<= all but one)
                                              dst = those k + allocate(rest)
                                              transports.pull(peer, pool, handle.block_ids[k:], dst[k:])
                                              plane.release(handle) (False = reaped: KV not trusted ->
                                              StaleHandle); commit the blocks (KV events); one log line
    await w.export(router_rids) -> [rids]     engine.detach: KV kept, those streams end with "migrate"
    w.wants_hand_over() / await w.hand_over() drain: export every running request when another decode
                                              worker serves (plane.decode_peers()), keep the KV readable
                                              for migration_grace_s
    await w.kv_snapshot() -> chunks           the prefix cache as stored KV events (a router's resync after a gap)
    await w.close()

It never imports Dynamo or a network client (import-linter); the ``WorkerPlane`` given by the adapter is
its only way to other processes (besides the transport backends).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from dynamo_ext.engine.protocol import OutOfBlocks, Request
from dynamo_ext.kv.pool import BlockPool
from dynamo_ext.kv.pool import OutOfBlocks as PoolOutOfBlocks
from dynamo_ext.topology import NodeTopology
from dynamo_ext.topology.select import Endpoint
from dynamo_ext.transport import KvPool, TransferError

from .choices import choice_requests, merge_choices
from .engine_runner import EngineRunner, NoRoom
from .protocol import BadRequest, KvHandle, check_options, error_chunk, handle_of, logprob_fields, parse_request
from .transports import PeerTransports, PullResult, TransportOptions, WorkerTransports

log = logging.getLogger("dynamo_ext.serving.worker")


#: a pull that ends this long before its handle's deadline needs no synchronous release (see ``pull``); it
#: covers clock differences between the holder and this worker (one host: none; across nodes: NTP's ms)
RELEASE_MARGIN_S = 1.0


class KvCorrupt(TransferError):
    """A pulled block's digest differs from the one its holder sent with the handle (kv_transfer.verify)."""


def verify_indices(n: int, mode: str) -> list[int]:
    """The block indices ``kv_transfer.verify`` checks: all of them, or a sample (up to 4 spread over the
    handle, always the last: the block with the prompt's tail), or none."""
    if mode == "all":
        return list(range(n))
    if mode == "sample" and n:
        return sorted({*(i * n // 4 for i in range(4)), n - 1})
    return []


class StaleHandle(RuntimeError):
    """The holder no longer held the blocks when we released them: the pulled KV is not trusted."""


class Draining(RuntimeError):
    """This decode worker is handing its requests over: a new request must go to another one."""


class WorkerPlane(Protocol):
    """What the request plane gives the worker core (implemented by each adapter)."""

    async def peer(self, handle: KvHandle) -> PeerTransports:
        """The transports of the worker that holds ``handle`` (raise TransferError when it is gone)."""
        ...

    async def release(self, handle: KvHandle, timeout_s: float) -> bool:
        """Ask the holder to free ``handle``; True when it still held the blocks."""
        ...

    async def decode_peers(self) -> int:
        """How many OTHER decode workers serve now (a draining worker hands over only when > 0)."""
        ...

    def forget(self, handle: KvHandle) -> None:
        """A pull from ``handle``'s holder failed: drop what is cached about it (its record is read again)."""
        ...


@dataclass(frozen=True)
class WorkerSettings:
    role: str  # agg | prefill | decode
    name: str  # transport agent name, unique in the graph
    model: str  # a model directory or a preset name
    device: str = "cpu"  # cpu | cuda:N (this process's CUDA index)
    block_size: int = 16
    num_kv_blocks: int = 1024
    max_model_len: int = 4096
    seed: int = 0
    num_layers: int | None = None  # presets only: fewer layers (GPU benchmarks)
    dtype: str | None = None  # presets only
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    hold_s: float = 4.0  # a prefilled handle is held this long (kv_transfer.hold_s, default 2 x timeout)
    transfer_timeout_s: float = 2.0  # kv_transfer.timeout_ms
    migrate_on_drain: bool = True
    migration_grace_s: float = 1.0
    verify: str = "off"  # kv_transfer.verify: off | sample | all
    transport: TransportOptions = field(default_factory=TransportOptions)

    @property
    def disaggregated(self) -> bool:
        return self.role in ("prefill", "decode")

    @classmethod
    def from_config(cls, cfg: Any, role: str, name: str, model: str, device: str | None = None) -> "WorkerSettings":
        """From a validated ``DynamoExtConfig`` (dynamo_ext.config)."""
        pc = getattr(cfg.workers, role, None) or cfg.workers.decode or cfg.workers.agg
        kt = cfg.kv_transfer
        timeout = kt.timeout_ms / 1000.0
        return cls(role=role, name=name, model=model, device=device or "cpu", block_size=cfg.model.block_size,
                   num_kv_blocks=pc.num_kv_blocks, max_model_len=cfg.model.max_model_len, seed=cfg.model.seed,
                   hold_s=kt.hold_s if kt.hold_s is not None else 2 * timeout, transfer_timeout_s=timeout,
                   migrate_on_drain=cfg.workers.migrate_on_drain, migration_grace_s=cfg.workers.migration_grace_s,
                   verify=kt.verify,
                   transport=TransportOptions(nixl=kt.backend == "nixl", force=kt.transport,
                                              rdma_device=kt.rdma_device, threads=kt.transport_threads))


@dataclass
class _Held:
    block_ids: list[int]
    deadline: float  # unix seconds


def decode_peer_blob(text: str) -> PeerTransports:
    """A migrate chunk's ``peer_info`` (base64 of ``PeerTransports.encode()``)."""
    return PeerTransports.decode(base64.b64decode(text))


class ServingWorker:
    def __init__(self, settings: WorkerSettings, plane: WorkerPlane, metrics: Any) -> None:
        self.s = settings
        self.plane = plane
        self.metrics = metrics
        self.engine: Any = None
        self.runner: EngineRunner | None = None
        self.pool: BlockPool | None = None
        self.kv_pool: KvPool | None = None
        self.transports: WorkerTransports | None = None
        self.vocab_size = 0
        self.max_model_len = settings.max_model_len
        self.instance_id = 0  # the adapter sets it (Dynamo instance id / a graph-local id)
        self.component = "prefill" if settings.role == "prefill" else "backend"
        self.stopping = False
        # prefill side
        self.held: dict[str, _Held] = {}
        self.expired = 0
        self.released = 0
        # decode side
        self.transfers = 0
        self._active: dict[str, Request] = {}  # requests streaming here (engine request id -> request)
        self._exported: dict[str, Any] = {}  # exported (engine rid -> DetachedRequest) until their stream ends
        self._by_router: dict[str, str] = {}  # the router's request id -> engine request id
        self.draining = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._token_texts: dict[int, str | None] = {}  # token id -> its text (log probability entries)

    # -- start / stop -------------------------------------------------------------------------------
    def start_engine(self, model: Any = None) -> EngineRunner:
        """Build the engine on ``settings.device`` over a BlockPool; the step loop starts in ``start``."""
        import torch  # noqa: PLC0415

        from dynamo_ext.engine.core import EngineConfig, LlmEngine  # noqa: PLC0415
        from dynamo_ext.engine.weights import load_model  # noqa: PLC0415

        s = self.s
        if s.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(s.device))
        else:
            torch.set_num_threads(1)
        if model is None:
            model = load_model(s.model, device=s.device, seed=s.seed, num_layers=s.num_layers, dtype=s.dtype)
        self.pool = BlockPool(s.num_kv_blocks, s.block_size)
        ec = EngineConfig(block_size=s.block_size, num_blocks=s.num_kv_blocks, device=s.device, seed=s.seed,
                          max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens)
        self.engine = LlmEngine(model, ec, allocator=self.pool)
        if hasattr(model, "weights"):
            model.weights.clear()  # the engine's model holds its own (fused) copies
        self.vocab_size = model.config.vocab_size
        self.max_model_len = min(s.max_model_len, model.config.max_position_embeddings)
        self.runner = EngineRunner(self.engine, self.pool)
        return self.runner

    def cuda_index(self) -> int | None:
        if not self.s.device.startswith("cuda"):
            return None
        return int(self.s.device.split(":", 1)[1]) if ":" in self.s.device else 0

    async def start(self, topology: NodeTopology | None = None) -> None:
        assert self.runner is not None, "start_engine() first"
        self.spawn(self.runner.run(), "engine-loop")
        if self.s.disaggregated:
            if topology is None:
                from dynamo_ext.topology import collect_local_topology  # noqa: PLC0415

                topology = collect_local_topology(self.cuda_index())
            self.kv_pool = KvPool.from_tensor(f"kv-{self.s.role}", self.engine.kv_layout, self.engine.kv_buffer())
            dev = "host" if topology.worker_gpu is None else topology.worker_gpu
            self.transports = WorkerTransports(self.s.name, self.kv_pool, Endpoint(topology, topology.pid, dev),
                                               self.s.transport)
            await self.transports.start()
        if self.s.role == "prefill":
            self.spawn(self._reaper(), "handle-reaper")

    def advertise(self) -> bytes:
        assert self.transports is not None
        return self.transports.advertise().encode()

    def spawn(self, aw: Any, name: str) -> asyncio.Future[Any]:
        fut = asyncio.ensure_future(aw)
        self._tasks.add(fut)

        def _done(f: asyncio.Future[Any]) -> None:
            self._tasks.discard(f)
            if not f.cancelled() and f.exception() is not None and not self.stopping:
                log.error("task %s failed: %r", name, f.exception())

        fut.add_done_callback(_done)
        return fut

    async def close(self) -> None:
        self.stopping = True
        if self.runner is not None:
            self.runner.stop()
        for t in list(self._tasks):
            t.cancel()
        if self.transports is not None:
            await self.transports.close()

    # -- state --------------------------------------------------------------------------------------
    def load(self) -> Any:
        assert self.runner is not None
        return self.runner.load()

    def health(self) -> dict[str, Any]:
        h: dict[str, Any] = {}
        if self.runner is not None:
            ld = self.runner.load()
            h.update(waiting=ld.waiting, running=ld.running, kv_cache_usage_perc=self.runner.pool.kv_cache_usage_perc,
                     held_handles=len(self.held), engine=self.runner.counters())
        if self.s.role == "prefill":
            h.update(released=self.released, expired=self.expired)
        if self.transports is not None:
            h["transports"] = self.transports.describe()
        return h

    async def kv_snapshot(self, chunk_events: int = 512) -> list[dict[str, Any]]:
        """This worker's prefix cache as stored router events (``kv.events.snapshot_events`` of
        ``BlockPool.cached_runs``, taken on the engine thread, so in order with the KV events it publishes), in
        chunks ``{"events": [...], "total": n}`` (at least one): what a router that lost some of this worker's
        KV events rebuilds its part of the index from (``kv.KvEventIndexer.finish_resync``)."""
        from dynamo_ext.kv.events import snapshot_events  # noqa: PLC0415

        assert self.runner is not None
        pool = self.runner.pool
        events = snapshot_events(await self.runner.call(pool.cached_runs))
        return [{"events": events[i:i + chunk_events], "total": len(events)}
                for i in range(0, len(events), chunk_events)] or [{"events": [], "total": 0}]

    # -- prefill side -------------------------------------------------------------------------------
    def _free(self, hid: str) -> bool:
        """Forget the handle now (the answer to a release never waits for the engine); its blocks go back to
        the pool on the engine thread in the background, after the step that runs now."""
        held = self.held.pop(hid, None)
        if held is None:
            return False
        assert self.runner is not None
        self.spawn(self.runner.release(held.block_ids), f"free-{hid}")
        return True

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for hid in [h for h, v in self.held.items() if v.deadline <= now]:
                if self._free(hid):
                    self.expired += 1
                    log.info("kv handle %s expired unpulled: blocks freed", hid)

    async def release(self, handle_id: Any) -> bool:
        """True when the handle was still held (so its blocks were intact while the caller read them). Answered
        at once: control messages never queue behind engine steps (the freeing itself does)."""
        ok = isinstance(handle_id, str) and self._free(handle_id)
        if ok:
            self.released += 1
        return bool(ok)

    async def prefill(self, request: Any, *, clamp: bool = False) -> dict[str, Any]:
        """One chunk: the KV handle of the prompt and the first token, or an error chunk."""
        assert self.runner is not None and self.engine is not None and self.transports is not None
        m = self.metrics
        t0 = time.monotonic()
        if self.stopping:  # raise, not an error chunk: the router prefills elsewhere (or locally), no client error
            m.requests.labels("refused").inc()
            raise Draining("prefill worker is shutting down")
        if clamp and isinstance(request, dict):  # Dynamo's contract: a prefill worker produces one token
            request = {**request, "stop_conditions": {**(request.get("stop_conditions") or {}), "max_tokens": 1}}
        rid = uuid.uuid4().hex
        try:
            req = parse_request(request, rid, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        except BadRequest as e:
            m.requests.labels("bad_request").inc()
            return error_chunk(str(e), invalid=True)
        n = len(req.prompt_token_ids)
        try:
            res = await self.runner.prefill(req)
        except (ValueError, OutOfBlocks, PoolOutOfBlocks, NoRoom) as e:
            m.requests.labels("rejected").inc()
            return error_chunk(f"cannot prefill: {e}", n)
        deadline = time.time() + self.s.hold_s
        self.held[rid] = _Held(list(res.block_ids), deadline)
        digests: list[tuple[int, int]] = []
        dkind = ""
        idx = verify_indices(len(res.block_ids), self.s.verify)
        if idx and self.kv_pool is not None:
            from dynamo_ext.transport.verify import block_digests, digest_kind_for  # noqa: PLC0415

            dkind = digest_kind_for(self.kv_pool)
            ds = block_digests(self.kv_pool, self.kv_pool.layout, [res.block_ids[i] for i in idx], dkind)
            digests = list(zip(idx, ds))
        h = KvHandle(handle_id=rid, worker_id=self.instance_id, component=self.component, agent=self.s.name,
                     pool=self.kv_pool.name if self.kv_pool else "", block_ids=list(res.block_ids),
                     num_tokens=res.num_tokens, first_token=res.first_token,
                     layout=self.engine.kv_layout.to_dict(), deadline=deadline, digests=digests, digest_kind=dkind,
                     first_logprobs=res.first_logprobs)
        m.ttft.observe(time.monotonic() - t0)
        m.requests.labels("ok").inc()
        hd = h.to_dict()
        return {"token_ids": [res.first_token], "finish_reason": "length", "kv_handle": hd,
                "disaggregated_params": {"kv_handle": hd},
                "completion_usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}}

    # -- the KV pull --------------------------------------------------------------------------------
    async def _release_remote(self, h: KvHandle, timeout: float = 2.0) -> bool:
        if h.component == "backend":  # a draining decode worker's handle: it frees the blocks at the deadline
            return time.time() <= h.deadline
        return await self.plane.release(h, timeout)

    def _verify(self, h: KvHandle, dst: list[int], k: int) -> None:
        """The handle's digests against the blocks pulled (indices >= k: the first k came from our own cache)."""
        want = [(i, d) for i, d in h.digests if k <= i < len(dst)]
        if not want or self.kv_pool is None:
            return
        from dynamo_ext.transport.verify import block_digests  # noqa: PLC0415

        got = block_digests(self.kv_pool, self.kv_pool.layout, [dst[i] for i, _ in want], h.digest_kind or None)
        bad = [i for (i, d), g in zip(want, got) if d != g]
        if bad:
            raise KvCorrupt(f"{len(bad)} of {len(want)} checked blocks of handle {h.handle_id} from {h.worker_id} "
                            f"differ from their digests (block indices {bad[:8]}): the KV is not used")

    async def _release_later(self, h: KvHandle) -> None:
        try:
            if not await self._release_remote(h):
                log.warning("handle %s of %s was already reaped when released (pulled before its deadline)",
                            h.handle_id, h.worker_id)
        except Exception as e:  # noqa: BLE001 - the holder frees it at its deadline anyway
            log.info("release of handle %s on %s failed (%s): freed at its deadline", h.handle_id, h.worker_id, e)

    async def pull(self, req: Request, h: KvHandle, peer: PeerTransports | None = None) -> tuple[list[int], PullResult]:
        """The handle's blocks (those our prefix cache lacks) into local blocks; (block ids, result).

        The stale-handle check: a holder frees a handle's blocks only at its deadline (its reaper), so a pull
        that completed more than RELEASE_MARGIN_S before the deadline read blocks that were still held: the
        release then goes out in the background, off the request's path. A pull that ended closer to the
        deadline waits for the holder's answer (False = reaped: the KV is not trusted)."""
        assert self.runner is not None and self.transports is not None
        n = len(req.prompt_token_ids)
        if h.num_tokens != n:
            raise BadRequest(f"kv_handle holds {h.num_tokens} tokens, the prompt has {n}")
        if time.time() > h.deadline:
            raise StaleHandle(f"handle {h.handle_id} expired {time.time() - h.deadline:.3f} s ago")
        t0 = time.monotonic()
        if peer is None:
            peer = await self.plane.peer(h)
        if peer.name != h.agent:
            raise TransferError(f"the transports of worker {h.worker_id} name agent {peer.name!r}, the handle {h.agent!r}")
        # leading blocks our own prefix cache holds are reused, only the rest is read (the router counts the same)
        dst, k = await self.runner.blocks_for_pull(req, len(h.block_ids))
        released = False
        try:
            res = await self.transports.pull(peer, h.pool, list(h.block_ids[k:]), dst[k:],
                                             deadline_s=self.s.transfer_timeout_s)
            self._verify(h, dst, k)
            released = True  # whatever happens next, do not release twice
            if time.time() + RELEASE_MARGIN_S < h.deadline:
                self.spawn(self._release_later(h), f"release-{h.handle_id}")
            elif not await self._release_remote(h):
                raise StaleHandle(f"handle {h.handle_id} was no longer held by {h.worker_id}")
        except BaseException as e:
            await self.runner.free(dst)
            if isinstance(e, TransferError):
                self.plane.forget(h)
                self.transports.forget(peer.name)
            if not released:
                try:
                    await self._release_remote(h, timeout=0.5)
                except BaseException:  # noqa: BLE001 - the peer may be dead; its blocks die with it
                    pass
            raise
        await self.runner.commit_pulled(req, dst, k)
        self.transfers += 1
        st = res.stats
        # the fields again as the record's own (JSON log lines: logfmt), text keeps them as words
        fields = {"request_id": req.request_id, "worker": self.s.name, "peer": h.worker_id, "path": st.path,
                  "bytes": st.bytes, "seconds": round(st.seconds, 6), "backend": res.backend, "kind": res.kind,
                  "descriptors": st.descriptors, "cached_blocks": k}
        log.info("kv transfer received: peer=%s agent=%s tokens=%d bytes=%d descriptors=%d kind=%s backend=%s "
                 "path=%s latency_ms=%.3f transfer_ms=%.3f cached_blocks=%d request_id=%s worker=%s%s", h.worker_id,
                 h.agent, n, st.bytes, st.descriptors, res.kind, res.backend, st.path, (time.monotonic() - t0) * 1e3,
                 st.seconds * 1e3, k, req.request_id, self.s.name,
                 f" failed_before={[b for b, _ in res.failed]}" if res.failed else "", extra=fields)
        return dst, res

    # -- decode side --------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str | None:
        """The text of one token (log probability entries), from the engine's tokenizer; cached."""
        if token_id not in self._token_texts:
            tok = getattr(self.engine, "tokenizer", None)
            try:
                text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else None
            except Exception:  # noqa: BLE001 - an id the tokenizer does not know: no text
                text = None
            if len(self._token_texts) < 1 << 16:
                self._token_texts[token_id] = text
            return text
        return self._token_texts[token_id]

    async def generate(self, request: Any, rid: str | None = None,
                       is_stopped: Callable[[], bool] | None = None) -> AsyncIterator[dict[str, Any]]:
        """The chunks of one request; ``n`` > 1 (no router in front: policy dynamo-kv): one request per choice
        (``serving.choices``), choice 0 with the request's KV handle, the others prefilled here (prefix cache)."""
        subs = choice_requests(request)
        if subs is None:
            async for chunk in self._generate_one(request, rid, is_stopped):
                yield chunk
            return
        try:
            check_options(request)
        except BadRequest as e:
            self.metrics.requests.labels("bad_request").inc()
            yield error_chunk(str(e), len(request.get("token_ids") or ()), invalid=True)
            return
        base = rid or uuid.uuid4().hex
        own = ("kv_handle", "prefill_result", "kv_peer_info", "router_rid")
        streams = [self._generate_one(sub if i == 0 else {k: v for k, v in sub.items() if k not in own},
                                      f"{base}-{i}", is_stopped) for i, sub in enumerate(subs)]
        async for chunk in merge_choices(streams):
            yield chunk

    async def _generate_one(self, request: Any, rid: str | None = None,
                            is_stopped: Callable[[], bool] | None = None) -> AsyncIterator[dict[str, Any]]:
        assert self.runner is not None
        m = self.metrics
        t0 = time.monotonic()
        if self.stopping:  # fail before the first chunk: the router sends the request to another decode worker
            m.requests.labels("refused").inc()
            raise Draining("decode worker is shutting down")
        if self.draining:  # fail before the first chunk: the router sends the request to another decode worker
            m.requests.labels("refused").inc()
            raise Draining("decode worker is draining (handing its requests over)")
        try:
            req = parse_request(request, rid or uuid.uuid4().hex, vocab_size=self.vocab_size,
                                max_model_len=self.max_model_len)
            handle = handle_of(request) if self.s.role == "decode" else None
        except BadRequest as e:
            m.requests.labels("bad_request").inc()
            log.info("bad request: %s", e)
            yield error_chunk(str(e), len(request.get("token_ids") or []) if isinstance(request, dict) else 0,
                              invalid=True)
            return
        n_prompt = len(req.prompt_token_ids)
        blocks: list[int] | None = None
        first = 0
        first_lps: Any = None
        report: dict[str, Any] | None = None
        if handle is not None:
            try:
                peer = None
                blob = request.get("kv_peer_info")
                if blob:  # a migration handle: the draining source's record is gone, its transports come with it
                    peer = decode_peer_blob(blob)
                blocks, res = await self.pull(req, handle, peer)
                m.kv_pulls.labels("ok").inc()
                m.kv_pulled_bytes.inc(res.stats.bytes)
                first, first_lps = handle.first_token, handle.first_logprobs
                report = {"bytes": res.stats.bytes, "seconds": res.stats.seconds, "backend": res.backend,
                          "kind": res.kind, "path": res.stats.path, "descriptors": res.stats.descriptors}
                if res.failed:
                    report["failed"] = [b for b, _ in res.failed]
            except Exception as e:  # noqa: BLE001 - any failure: prefill here instead
                reason = type(e).__name__
                m.kv_pulls.labels(reason).inc()
                m.local_prefill_fallbacks.labels(reason).inc()
                log.warning("KV pull from %s failed (%s: %s): prefilling locally", handle.worker_id, reason, e)
                report = {"error": reason}
        elif self.s.role == "decode":
            m.local_prefill_fallbacks.labels("no_handle").inc()
        if blocks is None:
            try:
                res_p = await self.runner.prefill(req)
            except (ValueError, OutOfBlocks, PoolOutOfBlocks, NoRoom) as e:
                m.requests.labels("rejected").inc()
                yield error_chunk(f"cannot prefill: {e}", n_prompt)
                return
            blocks, first, first_lps = res_p.block_ids, res_p.first_token, res_p.first_logprobs
        t_first = time.monotonic()
        m.ttft.observe(t_first - t0)
        first_chunk: dict[str, Any] = {"token_ids": [first]}
        if first_lps is not None and req.sampling.logprobs is not None:
            first_chunk.update(logprob_fields([(first_lps[0], list(first_lps[1]))], self.token_text))
        if report is not None and isinstance(request, dict) and request.get("report_kv_transfer"):
            first_chunk["kv_transfer"] = report
        yield first_chunk
        self._active[req.request_id] = req
        router_rid = request.get("router_rid") if isinstance(request, dict) else None
        if router_rid:
            self._by_router[str(router_rid)] = req.request_id
        try:
            async for chunk in self._stream(req, blocks, first, is_stopped, n_prompt, t_first):
                yield chunk
        finally:
            self._active.pop(req.request_id, None)
            if router_rid:
                self._by_router.pop(str(router_rid), None)

    async def _stream(self, req: Request, blocks: list[int], first: int, is_stopped: Callable[[], bool] | None,
                      n_prompt: int, t_first: float) -> AsyncIterator[dict[str, Any]]:
        assert self.runner is not None
        m = self.metrics
        n_out = 1
        t_last = t_first
        async for o in self.runner.decode(req, blocks, first):
            if is_stopped is not None and is_stopped():
                m.requests.labels("cancelled").inc()
                return
            if o.finish_reason == "migrated":  # exported: hand it over, the router continues it
                if o.new_token_ids:
                    yield {"token_ids": list(o.new_token_ids),
                           **(logprob_fields(o.logprobs, self.token_text) if o.logprobs else {})}
                m.requests.labels("migrated").inc()
                yield {"token_ids": [], "migrate": self._hand_over_chunk(req.request_id)}
                return
            n_out += len(o.new_token_ids)
            out: dict[str, Any] = {"token_ids": list(o.new_token_ids)}
            if o.logprobs:
                out.update(logprob_fields(o.logprobs, self.token_text))
            if o.new_token_ids:
                t_last = time.monotonic()
            if o.finished:
                out["finish_reason"] = "cancelled" if o.finish_reason == "abort" else o.finish_reason
                out["completion_usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                           "total_tokens": n_prompt + n_out}
                if n_out > 1:
                    m.tpot.observe((t_last - t_first) / (n_out - 1))
                m.requests.labels("ok").inc()
            yield out

    # -- migration ----------------------------------------------------------------------------------
    async def export(self, router_rids: list[Any]) -> list[str]:
        """Detach these running requests (KV kept); each stream then ends with a ``migrate`` chunk."""
        assert self.runner is not None
        done: list[str] = []
        for rr in router_rids:
            rid = self._by_router.get(str(rr))
            if rid is None or self.draining or self.stopping:
                continue
            st = await self.runner.export(rid)
            if st is not None:
                self._exported[rid] = st
                done.append(str(rr))
        return done

    def wants_hand_over(self) -> bool:
        """A stop request should first hand the running requests over (decode role, migration on, running)."""
        return (not self.stopping and not self.draining and self.s.role == "decode" and self.s.migrate_on_drain
                and bool(self._active) and self.transports is not None)

    async def hand_over(self) -> None:
        """Export every running request when another decode worker serves, then keep the KV readable for the
        grace (the targets' READs are one-sided: a later READ fails and that target recomputes)."""
        self.draining = True
        if await self._migrate_out():
            t_end = time.monotonic() + self.s.migration_grace_s
            while self._exported and time.monotonic() < t_end:  # the migrate chunks go out
                await asyncio.sleep(0.01)
            await asyncio.sleep(max(0.0, t_end - time.monotonic()))

    async def _migrate_out(self) -> int:
        assert self.runner is not None
        try:
            others = await self.plane.decode_peers()
        except Exception as e:  # noqa: BLE001
            log.warning("drain: cannot list decode workers (%s): requests finish here", e)
            return 0
        if not others:
            log.info("drain: no other decode worker: %d running requests finish here", len(self._active))
            return 0
        n = 0
        for rid in list(self._active):
            st = await self.runner.export(rid)
            if st is not None:
                self._exported[rid] = st
                n += 1
        log.info("drain: %d running requests exported for migration (%d other decode workers)", n, others)
        return n

    def _hand_over_chunk(self, rid: str) -> dict[str, Any]:
        """The ``migrate`` chunk of an exported request: a KvHandle over its blocks (the KV of all tokens but
        the last; first_token = the last), our transports (our record may be gone while we drain), the tokens."""
        assert self.transports is not None and self.kv_pool is not None and self.engine is not None
        st = self._exported.pop(rid)
        deadline = time.time() + 2 * self.s.transfer_timeout_s
        h = KvHandle(handle_id=rid, worker_id=self.instance_id, component="backend", agent=self.s.name,
                     pool=self.kv_pool.name, block_ids=list(st.blocks), num_tokens=len(st.tokens) - 1,
                     first_token=int(st.tokens[-1]), layout=self.engine.kv_layout.to_dict(), deadline=deadline)
        self.spawn(self._free_after(st.blocks, deadline), f"free-{rid}")
        return {"kv_handle": h.to_dict(), "tokens": [int(t) for t in st.tokens], "output_len": len(st.output),
                "peer_info": base64.b64encode(self.advertise()).decode()}

    async def _free_after(self, blocks: list[int], deadline: float) -> None:
        """A migrated request's blocks stay readable until the handle's deadline, then are freed."""
        assert self.runner is not None
        await asyncio.sleep(max(0.0, deadline - time.time()))
        await self.runner.release(blocks)


__all__ = ["Draining", "KvCorrupt", "ServingWorker", "StaleHandle", "verify_indices", "WorkerPlane", "WorkerSettings", "decode_peer_blob"]
