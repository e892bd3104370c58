"""Prefill worker: component ``prefill``, endpoints ``prefill``, ``generate`` (Dynamo's disagg contract),
``release`` and ``health``.

Protocol (who calls what, in what order)::

    router / Dynamo frontend          PrefillWorker                                 decode worker
    -------------------------------------------------------------------------------------------------------
    prefill({token_ids, ...})         1. parse_request (BadRequest -> one error chunk)
      (policy dynamo-ext|round-robin) 2. prefix match in the pool, prefill_only: KV in pool blocks, first
                                         token sampled; full blocks committed (KV stored events)
                                      3. hold the blocks under a handle id until deadline =
                                         now + hold_s (2 x kv_transfer.timeout_ms, env DYNAMO_EXT_KV_HOLD_S)
                                      4. yield ONE chunk {"kv_handle": KvHandle, "token_ids": [first],
                                         "finish_reason": "length", "disaggregated_params": {"kv_handle": ...}}
    generate({token_ids, ...})        same, max_tokens clamped to 1 (policy dynamo-kv: Dynamo's frontend
                                      forwards disaggregated_params as prefill_result to the decode worker)
                                                                                    pulls the blocks (NIXL READ)
                                      release({"handle_id"}) <---------------------- after the READ completed
                                      5. blocks freed -> {"released": true}; unknown/expired -> false
    reaper (every 50 ms)              6. handles past their deadline: blocks freed, counted as expired

Nothing here moves KV: the decode worker reads our registered pool; our NIXL agent only has to exist
(its metadata and pool descriptors are in our etcd record, see engine_worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from dynamo_ext.engine.protocol import OutOfBlocks
from dynamo_ext.kv.pool import OutOfBlocks as PoolOutOfBlocks

from .engine_runner import NoRoom
from .engine_worker import EngineWorker
from .protocol import BadRequest, KvHandle, error_chunk, parse_request
from .runtime import WorkerArgs

log = logging.getLogger("dynamo_ext.workers.prefill")


@dataclass
class _Held:
    block_ids: list[int]
    deadline: float


class PrefillWorker(EngineWorker):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.hold_s = float(os.environ.get("DYNAMO_EXT_KV_HOLD_S", 2 * self.cfg.kv_transfer.timeout_ms / 1000.0))
        self.held: dict[str, _Held] = {}
        self.expired = 0
        self.released = 0

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model  # noqa: PLC0415

        self.start_engine()
        ep = self.endpoint("prefill")
        self._primary_ep = ep
        gen_ep = self.endpoint("generate")
        rel_ep = self.endpoint("release")
        health_ep = self.endpoint("health")
        await self.start_publishers(ep)
        await self.start_transport()
        if self.cfg.router.policy == "dynamo-kv":
            await register_model(ModelInput.Tokens, ModelType.Prefill, gen_ep, self.args.model_dir, self.cfg.model.name,
                                 worker_type=WorkerType.Prefill, kv_cache_block_size=self.block_size,
                                 needs=[[WorkerType.Decode]])
        self.instance_id = int(ep.connection_id())
        self.spawn(ep.serve_endpoint(self.prefill), "serve-prefill")
        self.spawn(gen_ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(rel_ep.serve_endpoint(self.release), "serve-release")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        self.spawn(self._reaper(), "handle-reaper")
        await self.wait_serving(ep)
        return ep

    async def health_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield self.health()

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(released=self.released, expired=self.expired)
        return h

    # -- handles --------------------------------------------------------------------------------------
    async def _free(self, hid: str) -> bool:
        held = self.held.pop(hid, None)
        self.held_handles = len(self.held)
        if held is None:
            return False
        assert self.runner is not None
        await self.runner.release(held.block_ids)
        return True

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for hid in [h for h, v in self.held.items() if v.deadline <= now]:
                if await self._free(hid):
                    self.expired += 1
                    log.info("kv handle %s expired unpulled: blocks freed", hid)

    async def release(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        hid = request.get("handle_id") if isinstance(request, dict) else None
        ok = isinstance(hid, str) and await self._free(hid)
        if ok:
            self.released += 1
        yield {"released": bool(ok)}

    # -- prefill ----------------------------------------------------------------------------------------
    async def _prefill(self, request: Any, context: Any, clamp: bool) -> dict[str, Any]:
        assert self.runner is not None and self.engine is not None and self.metrics is not None
        t0 = time.monotonic()
        if self.stopping:
            return error_chunk("worker is shutting down")
        if clamp and isinstance(request, dict):  # Dynamo's contract: a prefill worker produces one token
            request = {**request, "stop_conditions": {**(request.get("stop_conditions") or {}), "max_tokens": 1}}
        try:
            rid = uuid.uuid4().hex
            req = parse_request(request, rid, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        except BadRequest as e:
            self.metrics.requests.labels("bad_request").inc()
            return error_chunk(str(e))
        n = len(req.prompt_token_ids)
        try:
            res = await self.runner.prefill(req)
        except (ValueError, OutOfBlocks, PoolOutOfBlocks, NoRoom) as e:
            self.metrics.requests.labels("rejected").inc()
            return error_chunk(f"cannot prefill: {e}", n)
        deadline = time.time() + self.hold_s
        self.held[rid] = _Held(list(res.block_ids), deadline)
        self.held_handles = len(self.held)
        assert self.backend is not None and self.kv_pool is not None
        h = KvHandle(handle_id=rid, worker_id=self.instance_id, component=self.component,
                     agent=self.backend.agent_name, pool=self.kv_pool.name, block_ids=list(res.block_ids),
                     num_tokens=res.num_tokens, first_token=res.first_token,
                     layout=self.engine.kv_layout.to_dict(), deadline=deadline)
        self.metrics.ttft.observe(time.monotonic() - t0)
        self.metrics.requests.labels("ok").inc()
        hd = h.to_dict()
        return {"token_ids": [res.first_token], "finish_reason": "length", "kv_handle": hd,
                "disaggregated_params": {"kv_handle": hd},
                "completion_usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}}

    async def prefill(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield await self._prefill(request, context, clamp=False)

    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield await self._prefill(request, context, clamp=True)
