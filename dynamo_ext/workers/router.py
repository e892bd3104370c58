"""Router component: component ``router``, endpoint ``generate``, the model's public endpoint in the
policies ``dynamo-ext`` and ``round-robin`` — a Dynamo adapter over ``serving.RouterCore``.

Protocol of one request (who calls what, in what order; the session itself is the core's, see
``serving/router.py``)::

    Dynamo frontend                 RouterWorker -> RouterCore.session            workers (DynamoRouterPlane)
    ------------------------------------------------------------------------------------------------------------
    generate({token_ids, stop_conditions, sampling_options, ...})   (tokenized by the frontend)
                                    choose (round-robin | routing.decide) -> prefill p | none, decode d
                                    prefill_client.direct(req, p) ------------------------> prefill worker
                                    decode_client.direct({...req, kv_handle, report_kv_transfer,
                                                          router_rid}, d) -------------> decode worker
                                    chunks forwarded as they come; kv_transfer reports -> link feedback;
                                    migrate chunks / failures -> continued on another decode worker

The plane: worker ids are the Dynamo instances of ``prefill.prefill`` / ``backend.generate``; a worker's
``WorkerInfo`` (layout, topology, device) comes from its etcd record (``discovery.WorkerRegistry``, policy
dynamo-ext); overlap scores from ``kv.KvEventIndexer`` over the workers' KV events on NATS.

Link feedback (policy dynamo-ext): a decode chunk may carry ``kv_transfer``, the decode worker's report of
the pull it made for this request: ``{"bytes", "seconds", "backend", "kind", "path"}`` after a pull,
``{"error": reason}`` after a failed one. The core pops it (the frontend never sees it) and feeds
``LinkEstimator`` for the pair; an unhealthy pair is excluded by ``decide`` until its back-off has passed.

Visibility: only the router calls register_model (Tokens, Chat|Completions, RouterMode.RoundRobin among
router replicas). Prefill and decode workers do not register the model in these policies, so the
frontend can neither list nor reach them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from dynamo_ext.discovery import EtcdStore, WorkerRegistry
from dynamo_ext.engine.config import ModelConfig
from dynamo_ext.kv.indexer import KvEventIndexer, kv_events_subject
from dynamo_ext.metrics import make_worker_metrics
from dynamo_ext.serving import RouterCore, RouterSettings, WorkerInfo, error_chunk

from .card import context_length, runtime_config, to_frontend
from .runtime import WorkerArgs, WorkerProcess

log = logging.getLogger("dynamo_ext.workers.router")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_COMPONENT = {"prefill": "prefill", "decode": "backend"}


class DynamoRouterPlane:
    """``serving.RouterPlane`` over Dynamo clients, etcd records and the KV-event index."""

    def __init__(self, w: "RouterWorker") -> None:
        self.w = w
        self.prefill_client: Any = None
        self.decode_client: Any = None
        self.export_client: Any = None
        self.kv_blocks_clients: dict[str, Any] = {}  # role -> client of the workers' kv_blocks endpoint
        self.registry: WorkerRegistry | None = None
        self.indexer: KvEventIndexer | None = None
        self._infos: dict[tuple[str, int, float], WorkerInfo] = {}

    def prefill_ids(self) -> list[int]:
        return list(self.prefill_client.instance_ids()) if self.prefill_client else []

    def decode_ids(self) -> list[int]:
        return list(self.decode_client.instance_ids()) if self.decode_client else []

    def info(self, role: str, worker: int) -> WorkerInfo | None:
        rec = self.registry.get(_COMPONENT[role], worker) if self.registry is not None else None
        if rec is None:
            return None
        key = (role, worker, rec.started_at)
        out = self._infos.get(key)
        if out is None:
            gpu = (rec.topology or {}).get("worker_gpu")
            out = self._infos[key] = WorkerInfo(kv_layout=dict(rec.kv_layout), topology=dict(rec.topology),
                                                started_at=rec.started_at, device=gpu if isinstance(gpu, int) else None)
        return out

    def overlap(self, tokens: list[int]) -> dict[int, int]:
        return self.indexer.scores(tokens) if self.indexer is not None else {}

    def index_health(self) -> dict[str, Any] | None:
        """The KV event index's counters (None without an index)."""
        return self.indexer.stats.summary() if self.indexer is not None else None

    async def prefill(self, request: dict[str, Any], worker: int, timeout_s: float) -> dict[str, Any] | None:
        stream = await asyncio.wait_for(self.prefill_client.direct(request, worker), timeout_s)
        async for item in stream:
            return item.data()
        return None

    async def decode(self, request: dict[str, Any], worker: int) -> AsyncIterator[dict[str, Any]]:
        async for item in await self.decode_client.direct(request, worker):
            yield item.data()

    def on_kv_gap(self, workers: list[int]) -> None:
        """The index lost events of these workers (``KvEventIndexer.on_gap``): rebuild their part from a
        snapshot each (``kv_blocks``); a worker that is not (or no longer) served is dropped from the index."""
        for w in workers:
            role = "prefill" if w in self.prefill_ids() else "decode" if w in self.decode_ids() else None
            if role is None or role not in self.kv_blocks_clients:
                assert self.indexer is not None
                self.indexer.remove_worker(w)
                continue
            self.w.spawn(self._resync(role, w), f"kv-resync-{w}")

    async def _resync(self, role: str, worker: int, timeout_s: float = 10.0) -> None:
        assert self.indexer is not None
        try:
            async def fetch() -> list[Any]:
                out = []
                async for item in await self.kv_blocks_clients[role].direct({}, worker):
                    out.append(item.data() if hasattr(item, "data") else item)
                return out

            chunks = await asyncio.wait_for(fetch(), timeout_s)
            self.indexer.finish_resync(worker, chunks)
        except Exception as e:  # noqa: BLE001 - the index keeps what it had; the next gap tries again
            self.indexer.abort_resync(worker, f"{type(e).__name__}: {e}")

    async def export(self, worker: int, router_rids: list[str], timeout_s: float) -> list[str]:
        async for item in await asyncio.wait_for(self.export_client.direct({"router_rids": router_rids}, worker),
                                                 timeout_s):
            data = item.data() if hasattr(item, "data") else item
            return [str(r) for r in (data.get("exported") or ())] if isinstance(data, dict) else []
        return []


def router_settings(cfg: Any, model_dir: str) -> RouterSettings:
    mc = ModelConfig.from_hf(json.loads((Path(model_dir) / "config.json").read_text()))
    return RouterSettings(
        policy=cfg.router.policy, block_size=cfg.model.block_size, num_layers=max(int(mc.num_layers), 1),
        kv_bytes_per_token=mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * _DTYPE_BYTES.get(mc.dtype, 4),
        decode_num_blocks=(cfg.workers.decode or cfg.workers.agg).num_kv_blocks
        if (cfg.workers.decode or cfg.workers.agg) else 1024,
        disagg_min_prompt_tokens=cfg.router.disagg_min_prompt_tokens, local_prefill=cfg.router.local_prefill,
        work_weight=cfg.router.work_weight, pending_ttl_s=cfg.router.pending_ttl_s,
        shared_compute=cfg.router.shared_compute,
        transfer_timeout_s=cfg.kv_transfer.timeout_ms / 1000.0, force=cfg.kv_transfer.transport,
        rdma_device=cfg.kv_transfer.rdma_device, context_length=context_length(cfg, model_dir))


class RouterWorker(WorkerProcess):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.plane = DynamoRouterPlane(self)
        self.core: RouterCore | None = None
        self._reg_store: EtcdStore | None = None

    def health(self) -> dict[str, Any]:
        h = super().health()
        h["kv_index"] = self.plane.index_health()
        return h

    def json_paths(self) -> dict[str, Any]:
        return {"/routes": lambda: self.core.recent_routes() if self.core is not None else []}

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, RouterConfig, RouterMode, WorkerType, register_model  # noqa: PLC0415

        ep = self.endpoint("generate")
        health_ep = self.endpoint("health")
        pl = self.plane
        pl.prefill_client = await self.endpoint("prefill", component="prefill").client()
        pl.decode_client = await self.endpoint("generate", component="backend").client()
        pl.export_client = await self.endpoint("export", component="backend").client()
        self.metrics = make_worker_metrics("router", int(ep.connection_id()))
        self.core = RouterCore(router_settings(self.cfg, self.args.model_dir), pl, self.metrics)
        if self.cfg.router.rebalance_s > 0:
            self.spawn(self._rebalance_loop(), "rebalance")
        if self.cfg.router.policy == "dynamo-ext":
            try:  # worker records: layouts, nodes and topologies for the link table
                self._reg_store = await EtcdStore.connect(os.environ["ETCD_ENDPOINTS"].split(",")[0])
                pl.registry = WorkerRegistry(self._reg_store, self.namespace)
                await pl.registry.start()
            except Exception as e:  # noqa: BLE001
                log.warning("worker registry unavailable (%s): default links and layouts", e)
                pl.registry = None
            try:
                # a router that starts after its workers (restarted by serve) asks each for its cache at its first event
                pl.indexer = KvEventIndexer(self.cfg.model.block_size, resync_new_publishers=True)
                pl.kv_blocks_clients = {
                    role: await self.endpoint("kv_blocks", component=comp).client() for role, comp in _COMPONENT.items()}
                pl.indexer.on_gap = pl.on_kv_gap
                await pl.indexer.start(self.cfg.discovery.nats.url, kv_events_subject(self.namespace))
            except Exception as e:  # noqa: BLE001 - routing still works without overlap scores
                log.warning("KV event indexer unavailable (%s): overlap scores are 0", e)
                pl.indexer = None
        # listed only once the graph can serve: a decode worker must be up (the launcher starts them first)
        await pl.decode_client.wait_for_instances()
        await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep, self.args.model_dir,
                             self.cfg.model.name, worker_type=WorkerType.Aggregated,
                             kv_cache_block_size=self.cfg.model.block_size,
                             router_config=RouterConfig(RouterMode.RoundRobin),
                             runtime_config=runtime_config(self.cfg, self.args.model_dir))
        self.instance_id = int(ep.connection_id())
        self.spawn(ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        await self.wait_serving(ep)
        return ep

    async def teardown(self) -> None:
        if self.plane.indexer is not None:
            await self.plane.indexer.close()
        if self.plane.registry is not None:
            await self.plane.registry.stop()

    async def _rebalance_loop(self) -> None:
        assert self.core is not None
        while not self.stopping:
            await asyncio.sleep(self.cfg.router.rebalance_s)
            try:
                await self.core.rebalance_once()
            except Exception as e:  # noqa: BLE001 - rebalancing is an optimisation: never fatal
                log.warning("rebalance failed: %s", e)

    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.core is not None
        if self.stopping:
            yield error_chunk("router is shutting down")
            return
        async for chunk in to_frontend(self.core.session(request)):
            yield chunk
