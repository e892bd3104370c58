"""Shared part of the workers that own an engine (prefill, decode, agg): engine, pool, events, load, NIXL.

Start-up order (``EngineWorker.start_engine`` then ``start_transport``), called from a role's setup()::

    model = load_model(--model-dir)                                 engine/
    pool = BlockPool(num_kv_blocks, block_size)                     kv/ (the engine's allocator)
    engine = LlmEngine(model, EngineConfig(...), allocator=pool)
    runner = EngineRunner(engine, pool); spawn(runner.run())
    ep = rt.endpoint(...)  (by the role)
    pool.sink = DynamoKvEventSink(KvEventPublisher(ep, block_size, enable_local_indexer=True))
    FpmDirectPublisher(ep, id, 1) + WorkerMetricsPublisher().create_endpoint(ep); spawn(load tick, 0.5 s)
    be = make_backend(nixl|tcp, agent "<role>-<instance id>"); be.register_pool(KvPool over engine.kv_buffer())
    record: nixl_agent_name, nixl_agent_metadata = PeerInfo.encode() (agent metadata + pool descriptors:
            all a peer needs for add_peer / RemotePool), kv_layout, pools, topology

The load tick publishes what Dynamo's planner and KV router read (forward-pass metrics, KV blocks in
use) and sets this process's Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.weights import load_model
from dynamo_ext.kv.events import DynamoKvEventSink
from dynamo_ext.kv.pool import BlockPool
from dynamo_ext.metrics import make_worker_metrics
from dynamo_ext.topology import collect_local_topology
from dynamo_ext.transport import KvPool, TransferBackend, make_backend

from .engine_runner import EngineRunner
from .runtime import WorkerArgs, WorkerProcess, record_pools, stdout_logs_to_stderr

log = logging.getLogger("dynamo_ext.workers")


class EngineWorker(WorkerProcess):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        pc = getattr(self.cfg.workers, args.role, None) or self.cfg.workers.decode or self.cfg.workers.agg
        self.pool_cfg = pc
        self.block_size = self.cfg.model.block_size
        self.runner: EngineRunner | None = None
        self.engine: LlmEngine | None = None
        self.max_model_len = self.cfg.model.max_model_len
        self.vocab_size = 0
        self.backend: TransferBackend | None = None
        self.kv_pool: KvPool | None = None
        self._fpm: Any = None
        self._wm: Any = None
        self.held_handles = 0

    def start_engine(self) -> EngineRunner:
        torch.set_num_threads(1)
        model = load_model(self.args.model_dir)
        n = self.pool_cfg.num_kv_blocks
        pool = BlockPool(n, self.block_size)
        ec = EngineConfig(block_size=self.block_size, num_blocks=n, seed=self.cfg.model.seed)
        self.engine = LlmEngine(model, ec, allocator=pool)
        self.vocab_size = model.config.vocab_size
        self.max_model_len = min(self.cfg.model.max_model_len, model.config.max_position_embeddings)
        self.runner = EngineRunner(self.engine, pool)
        self.spawn(self.runner.run(), "engine-loop")
        return self.runner

    async def start_publishers(self, ep: Any) -> None:
        from dynamo.llm import FpmDirectPublisher, WorkerMetricsPublisher  # noqa: PLC0415

        assert self.runner is not None
        self.runner.pool.sink = DynamoKvEventSink.from_endpoint(ep, self.block_size, enable_local_indexer=True)
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
        self.metrics = make_worker_metrics(self.args.role, int(ep.connection_id()))
        self.spawn(self._load_tick(), "load-tick")

    async def _load_tick(self) -> None:
        assert self.runner is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            ld = self.runner.load()
            pool = self.runner.pool
            if self.metrics is not None:
                self.metrics.set_load(queued=ld.waiting, running=ld.running, kv_usage=pool.kv_cache_usage_perc,
                                      held_handles=self.held_handles)
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

    async def start_transport(self) -> None:
        assert self.engine is not None
        kind = "nixl" if self.cfg.kv_transfer.backend == "nixl" else "tcp"
        try:
            import nixl._api  # noqa: F401, PLC0415 - configures NIXL's logging (to stdout) before we move it
        except Exception:  # noqa: BLE001
            pass
        stdout_logs_to_stderr()
        self.backend = make_backend(kind, f"{self.args.role}-{self.instance_id_hint()}")
        await self.backend.start()
        stdout_logs_to_stderr()
        self.kv_pool = KvPool.from_tensor(f"kv-{self.args.role}", self.engine.kv_layout, self.engine.kv_buffer())
        self.backend.register_pool(self.kv_pool)
        self.spawn(self.backend.serve(0.01), "transport-progress")  # staged-transfer protocol messages

    def instance_id_hint(self) -> int:
        return int(self._primary_ep.connection_id())

    _primary_ep: Any = None

    def record_fields(self) -> dict[str, Any]:
        assert self.engine is not None
        out: dict[str, Any] = {"kv_layout": self.engine.kv_layout.to_dict()}
        try:
            out["topology"] = collect_local_topology(None).to_dict()
        except Exception as e:  # noqa: BLE001
            log.warning("topology probe failed: %s", e)
        if self.backend is not None and self.kv_pool is not None:
            out["nixl_agent_name"] = self.backend.agent_name
            out["nixl_agent_metadata"] = self.backend.local_peer_info().encode()
            out["pools"] = record_pools([self.kv_pool])
        return out

    def health(self) -> dict[str, Any]:
        h = super().health()
        if self.runner is not None:
            ld = self.runner.load()
            h.update(waiting=ld.waiting, running=ld.running, kv_cache_usage_perc=self.runner.pool.kv_cache_usage_perc,
                     held_handles=self.held_handles)
        return h

    async def teardown(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        if self._fpm is not None:
            try:
                self._fpm.shutdown()
            except Exception:  # noqa: BLE001
                pass
        if self.backend is not None:
            try:
                await self.backend.close()
            except Exception as e:  # noqa: BLE001
                log.debug("backend close: %s", e)
