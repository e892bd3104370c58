"""Shared Dynamo adapter of the workers that own an engine (prefill, decode, agg) over ``serving.ServingWorker``.

Start-up order (``EngineWorker.start_core``), called from a role's setup() once its primary endpoint exists::

    ep = rt.endpoint(...)  (by the role); iid = ep.connection_id()
    core = ServingWorker(WorkerSettings.from_config(cfg, role, "<role>-<iid>", --model-dir, --device),
                         DynamoWorkerPlane(self), metrics)
    core.start_engine()                                              engine/ + kv/ BlockPool + EngineRunner
    pool.sink = DynamoKvEventSink(KvEventPublisher(ep, block_size, enable_local_indexer=True))
    await core.start(topology)    step loop; prefill/decode: every transport backend the topology supports
    FpmDirectPublisher(ep, id, 1) + WorkerMetricsPublisher().create_endpoint(ep); spawn(load tick, 0.5 s)
    record: agent_name, transports = PeerTransports blob (serving/transports.py: per backend its PeerInfo,
            plus the topology and device a peer needs for select_transport), kv_layout, pools, topology

The load tick publishes what Dynamo's planner and KV router read (forward-pass metrics, KV blocks in
use) and sets this process's Prometheus gauges. ``DynamoWorkerPlane`` is the core's way to other workers:
records in etcd (a peer's transports), the prefill component's ``release`` endpoint, the decode records
(drain hand-over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from dynamo_ext.discovery import decode_record
from dynamo_ext.kv.events import DynamoKvEventSink
from dynamo_ext.metrics import make_worker_metrics
from dynamo_ext.serving import KvHandle, PeerTransports, ServingWorker, WorkerSettings
from dynamo_ext.topology import collect_local_topology
from dynamo_ext.transport import TransferError

from .runtime import WorkerArgs, WorkerProcess, record_pools, stdout_logs_to_stderr, worker_key

log = logging.getLogger("dynamo_ext.workers")


class DynamoWorkerPlane:
    """``serving.WorkerPlane`` over etcd records and Dynamo endpoints."""

    def __init__(self, w: "EngineWorker") -> None:
        self.w = w
        self.release_client: Any = None
        #: a holder's transports by (component, instance id), read from etcd once: an instance id is a lease id,
        #: never reused, and a worker's transports do not change while it lives (a failed pull forgets it)
        self._peers: dict[tuple[str, int], PeerTransports] = {}

    async def peer(self, handle: KvHandle) -> PeerTransports:
        w = self.w
        assert w.store is not None
        cached = self._peers.get((handle.component, handle.worker_id))
        if cached is not None:
            return cached
        key = worker_key(w.namespace, handle.component, handle.worker_id)
        blob = await w.store.get(key)
        if blob is None:
            raise TransferError(f"no record for worker {handle.worker_id} at {key} (gone?)")
        rec = decode_record(key, blob)
        if not rec.transports:
            raise TransferError(f"the record of worker {handle.worker_id} advertises no transports")
        pt = self._peers[(handle.component, handle.worker_id)] = PeerTransports.decode(rec.transports)
        return pt

    def forget(self, handle: KvHandle) -> None:
        self._peers.pop((handle.component, handle.worker_id), None)

    async def start(self) -> None:
        """The prefill component's ``release`` client, created once at start-up (a client made at the first
        release would not have discovered the instances yet)."""
        self.release_client = await self.w.endpoint("release", component="prefill").client()

    async def release(self, handle: KvHandle, timeout_s: float) -> bool:
        assert self.release_client is not None, "DynamoWorkerPlane.start() first"

        async def _call() -> bool:
            stream = await self.release_client.direct({"handle_id": handle.handle_id}, handle.worker_id)
            async for item in stream:
                d = item.data() if hasattr(item, "data") else item
                return bool(d.get("released"))
            return False

        return await asyncio.wait_for(_call(), timeout_s)

    async def decode_peers(self) -> int:
        w = self.w
        assert w.store is not None
        prefix = worker_key(w.namespace, "backend", 0)[: -len("0")]
        listing = await w.store.get_prefix(prefix)
        return sum(1 for kv in listing if not kv.key.endswith(f"/{w.instance_id}"))


class EngineWorker(WorkerProcess):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.core: ServingWorker | None = None
        self.plane = DynamoWorkerPlane(self)
        self._fpm: Any = None
        self._wm: Any = None
        self.topology: Any = None

    @property
    def device(self) -> str:
        return self.args.device or ("cuda:0" if self.cfg.model.device == "cuda" else "cpu")

    async def start_core(self, ep: Any, events_ep: Any = None) -> ServingWorker:
        """Engine, KV events on ``events_ep`` (default ``ep``), transports: the serving core of this process."""
        iid = int(ep.connection_id())
        self.instance_id = iid
        self.metrics = make_worker_metrics(self.args.role, iid)
        settings = WorkerSettings.from_config(self.cfg, self.args.role, f"{self.args.role}-{iid}", self.args.model_dir,
                                              self.device)
        core = ServingWorker(settings, self.plane, self.metrics)
        core.instance_id = iid
        self.core = core
        core.start_engine()
        assert core.runner is not None
        from dynamo.llm import KvEventPublisher  # noqa: PLC0415

        core.runner.pool.sink = DynamoKvEventSink(
            KvEventPublisher(events_ep or ep, kv_block_size=settings.block_size, enable_local_indexer=True),
            settings.block_size)
        try:
            self.topology = collect_local_topology(core.cuda_index())
        except Exception as e:  # noqa: BLE001 - a worker without a topology still serves (host memory assumed)
            log.warning("topology probe failed: %s", e)
            self.topology = None
        try:
            import nixl._api  # noqa: F401, PLC0415 - configures NIXL's logging (to stdout) before we move it
        except Exception:  # noqa: BLE001
            pass
        stdout_logs_to_stderr()
        await core.start(self.topology)
        stdout_logs_to_stderr()
        await self._start_publishers(ep)
        return core

    async def _start_publishers(self, ep: Any) -> None:
        from dynamo.llm import FpmDirectPublisher, WorkerMetricsPublisher  # noqa: PLC0415

        try:
            self._fpm = FpmDirectPublisher(ep, str(ep.connection_id()), 1)
        except Exception as e:  # noqa: BLE001 - load telemetry must not stop serving
            log.warning("FpmDirectPublisher unavailable: %s", e)
        try:
            self._wm = WorkerMetricsPublisher()
            await self._wm.create_endpoint(ep)
        except Exception as e:  # noqa: BLE001
            log.warning("WorkerMetricsPublisher unavailable: %s", e)
            self._wm = None
        self.spawn(self._load_tick(), "load-tick")

    async def _load_tick(self) -> None:
        assert self.core is not None and self.core.runner is not None
        runner = self.core.runner
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            ld = runner.load()
            pool = runner.pool
            if self.metrics is not None:
                self.metrics.set_load(queued=ld.waiting, running=ld.running, kv_usage=pool.kv_cache_usage_perc,
                                      held_handles=len(self.core.held))
            try:
                if self._fpm is not None:
                    self._fpm.publish(dp_rank=0, scheduled_num_prefill_requests=0, scheduled_sum_prefill_tokens=0,
                                      scheduled_sum_prefill_kv_tokens=0, scheduled_num_decode_requests=ld.running,
                                      scheduled_sum_decode_kv_tokens=ld.running_kv_tokens,
                                      queued_num_prefill_requests=ld.waiting,
                                      queued_sum_prefill_tokens=ld.waiting_tokens, queued_num_decode_requests=0,
                                      queued_sum_decode_kv_tokens=0, wall_time_secs=now - last)
                if self._wm is not None:
                    self._wm.publish(0, active_decode_blocks=pool.num_active, kv_used_blocks=pool.num_active)
            except Exception as e:  # noqa: BLE001
                log.debug("load publish failed: %s", e)
            last = now

    async def kv_blocks_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        """The ``kv_blocks`` endpoint: this worker's prefix cache as stored KV events, in chunks
        (``ServingWorker.kv_snapshot``); the router asks for it when it finds a gap in this worker's events."""
        assert self.core is not None
        for chunk in await self.core.kv_snapshot():
            yield chunk

    def record_fields(self) -> dict[str, Any]:
        core = self.core
        assert core is not None and core.engine is not None
        out: dict[str, Any] = {"kv_layout": core.engine.kv_layout.to_dict(), "agent_name": core.s.name}
        if self.topology is not None:
            out["topology"] = self.topology.to_dict()
        if core.transports is not None and core.kv_pool is not None:
            out["transports"] = core.advertise()
            out["pools"] = record_pools([core.kv_pool])
        return out

    async def teardown(self) -> None:
        if self._fpm is not None:
            try:
                self._fpm.shutdown()
            except Exception:  # noqa: BLE001
                pass
        if self.core is not None:
            await self.core.close()
