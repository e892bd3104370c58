"""Prefill worker: component ``prefill``, endpoints ``prefill``, ``generate`` (Dynamo's disagg contract),
``release`` and ``health`` — a Dynamo adapter over ``serving.ServingWorker`` (role prefill).

Protocol (who calls what, in what order)::

    router / Dynamo frontend          PrefillWorker -> ServingWorker                decode worker
    -------------------------------------------------------------------------------------------------------
    prefill({token_ids, ...})         core.prefill: parse (BadRequest -> one error chunk), prefix match,
      (policy dynamo-ext|round-robin) prefill_only, full blocks committed (KV stored events), blocks held
                                      under a handle id until now + kv_transfer.hold_s (default
                                      2 x timeout_ms); ONE chunk {"kv_handle", "token_ids": [first],
                                      "finish_reason": "length", "disaggregated_params": {"kv_handle"}}
    generate({token_ids, ...})        same, max_tokens clamped to 1 (policy dynamo-kv: Dynamo's frontend
                                      forwards disaggregated_params as prefill_result to the decode worker)
                                                                                    pulls the blocks over the
                                                                                    transport its topology picks
                                      release({"handle_id"}) <---------------------- after the pull completed
                                      core.release: blocks freed -> {"released": true}; unknown/expired -> false
    reaper (in the core, every 50 ms) handles past their deadline: blocks freed, counted as expired

Nothing here moves KV: the decode worker reads our registered pool through one of the transport backends
advertised in our etcd record (``transports``, see engine_worker.py).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from .card import runtime_config, to_frontend
from .engine_worker import EngineWorker
from .runtime import WorkerArgs

log = logging.getLogger("dynamo_ext.workers.prefill")


class PrefillWorker(EngineWorker):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model  # noqa: PLC0415

        ep = self.endpoint("prefill")
        gen_ep = self.endpoint("generate")
        rel_ep = self.endpoint("release")
        health_ep = self.endpoint("health")
        # KV events go out on the endpoint the model is registered on under dynamo-kv (Dynamo's frontend router
        # subscribes to the events of the endpoints that serve the model); our router listens on every endpoint
        await self.start_core(ep, events_ep=gen_ep)
        if self.cfg.router.policy == "dynamo-kv":
            await register_model(ModelInput.Tokens, ModelType.Prefill, gen_ep, self.args.model_dir, self.cfg.model.name,
                                 worker_type=WorkerType.Prefill, kv_cache_block_size=self.cfg.model.block_size,
                                 needs=[[WorkerType.Decode]],
                                 runtime_config=runtime_config(self.cfg, self.args.model_dir,
                                                               total_kv_blocks=self.core.s.num_kv_blocks))
        self.spawn(ep.serve_endpoint(self.prefill), "serve-prefill")
        self.spawn(gen_ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(rel_ep.serve_endpoint(self.release), "serve-release")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        self.spawn(self.endpoint("kv_blocks").serve_endpoint(self.kv_blocks_handler), "serve-kv-blocks")
        await self.wait_serving(ep)
        return ep

    def request_stop(self) -> None:
        if self.core is not None:
            self.core.stopping = True
        super().request_stop()

    async def release(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.core is not None
        hid = request.get("handle_id") if isinstance(request, dict) else None
        yield {"released": await self.core.release(hid)}

    async def prefill(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.core is not None
        yield await self.core.prefill(request, clamp=False)

    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        """Dynamo's disaggregated contract (policy dynamo-kv: the frontend calls us first). A request the engine
        refuses becomes HTTP 400 here, as on the decode side (to_frontend); an error chunk would be a 500."""
        assert self.core is not None
        async for chunk in to_frontend(self._one(request)):
            yield chunk

    async def _one(self, request: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.core is not None
        yield await self.core.prefill(request, clamp=True)
