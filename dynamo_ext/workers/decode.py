"""Decode and aggregated workers: component ``backend``, endpoints ``generate`` (tokens), ``health`` and
(decode) ``export`` — a Dynamo adapter over ``serving.ServingWorker`` (roles decode, agg).

Protocol of one ``generate`` request (who calls what, in what order; the flow itself is the core's, see
``serving/worker.py``)::

    caller (router / Dynamo frontend)   DecodeWorker -> ServingWorker.generate          elsewhere
    ---------------------------------------------------------------------------------------------------------
    generate({token_ids, stop_conditions, sampling_options,
              kv_handle | prefill_result?, report_kv_transfer?, router_rid?, kv_peer_info?})
                                        bad request -> one error chunk; handing over -> raises (the
                                        router retries on another decode worker)
                                        handle (role decode): the holder's transports from its etcd
                                        record (or kv_peer_info), the blocks our prefix cache lacks
                                        pulled over the backend select_transport picks  ==> holder's pool
                                        (fallback to the next backend on failure), release ---> holder
                                        any failure: local prefill (reason counted)
                                        {"token_ids": [first], "kv_transfer"?: report}, then the engine's
                                        tokens; last chunk finish_reason + completion_usage
    client gone (context stopped)       abort in the engine, blocks freed
    export({"router_rids": [...]})      core.export: detached (KV kept), those streams end with "migrate"
    SIGTERM with requests running       core.hand_over (migration on drain), then the runtime shutdown

Registration: only under ``router.policy == dynamo-kv`` (Dynamo's frontend routes with its KV router): role
``agg`` as WorkerType.Aggregated, role ``decode`` as WorkerType.Decode (the frontend then runs the disaggregated
flow itself and hands us ``prefill_result``). With the policies ``dynamo-ext`` and ``round-robin`` no worker
calls register_model, in the aggregated graph too: the router component is the only public endpoint of the
model (every request passes it), and the workers are known through their Dynamo instances (planner) and our
etcd records (router).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, AsyncIterator

from .card import runtime_config, to_frontend
from .engine_worker import EngineWorker
from .runtime import WorkerArgs

log = logging.getLogger("dynamo_ext.workers.decode")


def _rid(context: Any) -> str:
    try:
        return str(context.id())
    except Exception:  # noqa: BLE001
        return uuid.uuid4().hex


class DecodeWorker(EngineWorker):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.disaggregated = args.role == "decode"

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model  # noqa: PLC0415

        ep = self.endpoint("generate")
        health_ep = self.endpoint("health")
        await self.start_core(ep)
        if self.disaggregated:
            await self.plane.start()
        policy = self.cfg.router.policy
        # the model is registered by the router (the graph's only entry) unless Dynamo's own KV router routes
        if policy == "dynamo-kv":
            kw: dict[str, Any] = {"worker_type": WorkerType.Aggregated}
            if self.disaggregated:  # Dynamo requires the peer role a disaggregated worker depends on
                kw = {"worker_type": WorkerType.Decode, "needs": [[WorkerType.Prefill]]}
            await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep, self.args.model_dir,
                                 self.cfg.model.name, kv_cache_block_size=self.cfg.model.block_size,
                                 runtime_config=runtime_config(self.cfg, self.args.model_dir,
                                                               total_kv_blocks=self.core.s.num_kv_blocks), **kw)
        self.spawn(ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        self.spawn(self.endpoint("kv_blocks").serve_endpoint(self.kv_blocks_handler), "serve-kv-blocks")
        if self.disaggregated:  # the router's rebalancing asks for running requests by its own request id
            self.spawn(self.endpoint("export").serve_endpoint(self.export_handler), "serve-export")
        await self.wait_serving(ep)
        return ep

    async def export_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        """``export`` endpoint: {"router_rids": [...]} -> {"exported": [router rids]}."""
        assert self.core is not None
        rids = (request.get("router_rids") or []) if isinstance(request, dict) else []
        yield {"exported": await self.core.export(list(rids)) if not self.stopping else []}

    # -- drain: hand running requests over (migration) --------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM: with requests running and migration on, hand them over first, then stop as before. The
        runtime shutdown comes after the hand-over grace: it closes this process's listeners (seen:
        'connect ... refused' on the target's READ), so the targets must have pulled by then."""
        core = self.core
        if core is None or self.stopping or core.draining or not core.wants_hand_over():
            if core is not None:
                core.stopping = True
            super().request_stop()  # a second signal during the hand-over stops at once
            return
        self.spawn(self._drain_then_stop(), "migrate-out")

    async def _drain_then_stop(self) -> None:
        assert self.core is not None
        try:
            await self.core.hand_over()
        except Exception as e:  # noqa: BLE001
            log.warning("drain hand-over failed (%s): stopping", e)
        finally:
            self.core.stopping = True
            super().request_stop()

    # -- generate -----------------------------------------------------------------------------------
    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.core is not None
        stopped = getattr(context, "is_stopped", None) if context is not None else None
        async for chunk in to_frontend(self.core.generate(request, _rid(context), stopped)):
            yield chunk
