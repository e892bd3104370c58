"""Decode and aggregated workers: component ``backend``, endpoints ``generate`` (tokens) and ``health``.

Protocol of one ``generate`` request (who calls what, in what order)::

    caller (router / Dynamo frontend)   DecodeWorker                                   elsewhere
    ---------------------------------------------------------------------------------------------------------
    generate({token_ids, stop_conditions, sampling_options,
              kv_handle | prefill_result?})
                                        1. parse_request -> BadRequest: one error chunk, done
                                        2. handle present (role decode):
                                           a. peer = record of handle.worker_id in etcd     (cached per agent)
                                              -> PeerInfo -> be.add_peer
                                           b. k = leading blocks our prefix cache holds (at most all but
                                              the last); dst = those k + allocate(len(handle.block_ids) - k)
                                           c. transfer_kv_cache(RemotePool(prefill), local pool,
                                              (handle.block_ids[k:], dst[k:]))   one planned NIXL READ ==> prefill's pool
                                           d. release(handle_id) on the prefill worker ---> {"released": true}
                                              (false = handle already reaped: KV not trusted)
                                           e. commit full blocks (KV stored events), log one line per transfer
                                           any failure in a-d: free dst, local prefill (reason counted)
                                        3. no handle / fallback: prefix match + prefill_only here
                                        4. yield {"token_ids": [first]}; add_prefilled_request; stream the
                                           engine's outputs; last chunk: finish_reason + completion_usage
    client gone (context stopped)       abort in the engine, blocks freed
    SIGTERM with requests running       drain hand-over (README "Migration and recovery"): export each
                                        (engine.detach), last chunk {"token_ids": [], "migrate": {kv_handle,
                                        peer_info, tokens, output_len}}, pool readable for the grace, then
                                        the runtime shutdown; a handle with component "backend" (another
                                        decode worker's) is pulled like a prefill's, with kv_peer_info, and
                                        not released (its owner frees it at the deadline)

Registration: role ``agg`` registers the public model (Tokens, Chat|Completions, WorkerType.Aggregated).
Role ``decode`` registers the public model as WorkerType.Decode only when ``router.policy == dynamo-kv``
(Dynamo's frontend then runs the disaggregated flow itself and hands us ``prefill_result``). With the
policies ``dynamo-ext`` and ``round-robin`` the decode workers do NOT call register_model: the router
component is the only public endpoint of the model, and the workers are known through their
Dynamo instances (planner) and our etcd records (router).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from dynamo_ext.engine.protocol import OutOfBlocks, Request
from dynamo_ext.discovery import decode_record
from dynamo_ext.kv.pool import OutOfBlocks as PoolOutOfBlocks
from dynamo_ext.transport import PeerInfo, RemotePool, TransferError, transfer_kv_cache

#: a draining decode worker hands its running requests to other decode workers (DYNAMO_EXT_MIGRATE_ON_DRAIN=0: off)
MIGRATE_ON_DRAIN = os.environ.get("DYNAMO_EXT_MIGRATE_ON_DRAIN", "1") != "0"
#: seconds a draining decode worker keeps serving its handed-over KV before the runtime shutdown
MIGRATION_GRACE_S = float(os.environ.get("DYNAMO_EXT_MIGRATION_GRACE_S", "1.0"))

from .engine_runner import NoRoom
from .engine_worker import EngineWorker
from .protocol import BadRequest, KvHandle, error_chunk, handle_of, parse_request
from .runtime import WorkerArgs, worker_key

log = logging.getLogger("dynamo_ext.workers.decode")

# Tests only (tests/workers/test_failures.py): seconds to wait between receiving a handle and reading it.
_TEST_PULL_DELAY_S = float(os.environ.get("DYNAMO_EXT_TEST_PULL_DELAY_S", "0") or 0)


class StaleHandle(RuntimeError):
    """The prefill worker no longer held the blocks when we released them: the pulled KV is not trusted."""


def _rid(context: Any) -> str:
    try:
        return str(context.id())
    except Exception:  # noqa: BLE001
        return uuid.uuid4().hex


class DecodeWorker(EngineWorker):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.disaggregated = args.role == "decode"
        self.release_client: Any = None
        self.transfers = 0
        #: requests streaming here (engine request id -> request), for migration on drain
        self._active: dict[str, Request] = {}
        #: requests exported by the drain (engine request id -> DetachedRequest), until their stream ends
        self._exported: dict[str, Any] = {}
        self._draining = False  # handing running requests over (before the runtime shutdown)
        self._by_router: dict[str, str] = {}  # the router's request id -> engine request id (export endpoint)

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, WorkerType, register_model  # noqa: PLC0415

        self.start_engine()
        ep = self.endpoint("generate")
        self._primary_ep = ep
        health_ep = self.endpoint("health")
        await self.start_publishers(ep)
        if self.disaggregated:
            await self.start_transport()
            self.release_client = await self.endpoint("release", component="prefill").client()
        policy = self.cfg.router.policy
        if not self.disaggregated or policy == "dynamo-kv":
            kw: dict[str, Any] = {"worker_type": WorkerType.Aggregated}
            if self.disaggregated:  # Dynamo requires the peer role a disaggregated worker depends on
                kw = {"worker_type": WorkerType.Decode, "needs": [[WorkerType.Prefill]]}
            await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep, self.args.model_dir,
                                 self.cfg.model.name, kv_cache_block_size=self.block_size, **kw)
        self.instance_id = int(ep.connection_id())
        self.spawn(ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        if self.disaggregated:  # the router's rebalancing asks for running requests by its own request id
            self.spawn(self.endpoint("export").serve_endpoint(self.export_handler), "serve-export")
        await self.wait_serving(ep)
        return ep

    async def export_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        """``export`` endpoint: {"router_rids": [...]} -> those running requests are detached (KV kept); each
        stream then ends with a ``migrate`` chunk, as on drain. Replies {"exported": [router rids]}."""
        assert self.runner is not None
        done: list[str] = []
        for rr in (request.get("router_rids") or []) if isinstance(request, dict) else []:
            rid = self._by_router.get(str(rr))
            if rid is None or self._draining or self.stopping:
                continue
            st = await self.runner.export(rid)
            if st is not None:
                self._exported[rid] = st
                done.append(str(rr))
        yield {"exported": done}

    async def health_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield self.health()

    # -- drain: hand running requests over (migration) --------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM: with requests running and migration on, hand them over first, then stop as before. The
        runtime shutdown comes after the hand-over grace: it closes this process's UCX listener (seen:
        'connect ... refused' on the target's READ), so the targets must have pulled by then."""
        if self.stopping or self._draining or not (self.disaggregated and MIGRATE_ON_DRAIN and self._active):
            super().request_stop()  # a second signal during the hand-over stops at once
            return
        self._draining = True
        self.spawn(self._drain_then_stop(), "migrate-out")

    async def _drain_then_stop(self) -> None:
        try:
            if await self._migrate_out():
                t_end = time.monotonic() + MIGRATION_GRACE_S
                while self._exported and time.monotonic() < t_end:  # the migrate chunks go out
                    await asyncio.sleep(0.01)
                # the targets' READs are one-sided (not observable here): a bounded grace for them; a later
                # READ fails and that target recomputes instead (same tokens, greedy)
                await asyncio.sleep(max(0.0, t_end - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            log.warning("drain hand-over failed (%s): stopping", e)
        finally:
            super().request_stop()

    async def _migrate_out(self) -> int:
        """Export every running request (engine.detach: the KV stays in our pool) when another decode worker
        is serving; each stream then ends with a ``migrate`` chunk and the router continues it elsewhere
        (plan_migrations: pull the KV, or recompute). Alone: the requests finish here, as before."""
        assert self.runner is not None and self.store is not None
        try:
            prefix = worker_key(self.namespace, "backend", 0)[: -len("0")]
            listing = await self.store.get_prefix(prefix)
            others = [kv.key for kv in listing if not kv.key.endswith(f"/{self.instance_id}")]
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
        log.info("drain: %d running requests exported for migration (%d other decode workers)", n, len(others))
        return n

    async def _hand_over(self, rid: str) -> dict[str, Any]:
        """The ``migrate`` chunk of an exported request: a KvHandle over its blocks (the KV of all tokens but
        the last; first_token = the last), our PeerInfo (our record is gone while we drain), the tokens."""
        import base64  # noqa: PLC0415

        assert self.backend is not None and self.kv_pool is not None and self.engine is not None
        st = self._exported.pop(rid)
        deadline = time.time() + 2 * self.cfg.kv_transfer.timeout_ms / 1000.0
        h = KvHandle(handle_id=rid, worker_id=self.instance_id, component="backend", agent=self.backend.agent_name,
                     pool=self.kv_pool.name, block_ids=list(st.blocks), num_tokens=len(st.tokens) - 1,
                     first_token=int(st.tokens[-1]), layout=self.engine.kv_layout.to_dict(), deadline=deadline)
        self.spawn(self._free_after(st.blocks, deadline), f"free-{rid}")
        return {"kv_handle": h.to_dict(), "tokens": [int(t) for t in st.tokens], "output_len": len(st.output),
                "peer_info": base64.b64encode(self.backend.local_peer_info().encode()).decode()}

    async def _free_after(self, blocks: list[int], deadline: float) -> None:
        """A migrated request's blocks stay readable until the handle's deadline (the target's READ is
        one-sided: we are not told when it finished), then are freed."""
        assert self.runner is not None
        await asyncio.sleep(max(0.0, deadline - time.time()))
        await self.runner.release(blocks)

    # -- the KV pull --------------------------------------------------------------------------------
    async def _remote(self, h: KvHandle) -> RemotePool:
        be = self.backend
        assert be is not None and self.store is not None
        if not be.has_peer(h.agent):
            key = worker_key(self.namespace, h.component, h.worker_id)
            blob = await self.store.get(key)
            if blob is None:
                raise TransferError(f"no record for prefill worker {h.worker_id} at {key} (gone?)")
            rec = decode_record(key, blob)
            info = PeerInfo.decode(rec.nixl_agent_metadata)
            if info.agent_name != h.agent:
                raise TransferError(f"record of {h.worker_id} names agent {info.agent_name!r}, handle {h.agent!r}")
            be.add_peer(info)
        return RemotePool(h.agent, be.peer(h.agent).pool(h.pool))

    async def _release(self, h: KvHandle, timeout: float = 2.0) -> bool:
        if h.component == "backend":  # a draining decode worker's handle: it frees the blocks at the deadline
            return time.time() <= h.deadline
        async def _call() -> bool:
            stream = await self.release_client.direct({"handle_id": h.handle_id}, h.worker_id)
            async for item in stream:
                d = item.data() if hasattr(item, "data") else item
                return bool(d.get("released"))
            return False

        return await asyncio.wait_for(_call(), timeout)

    async def pull(self, req: Request, h: KvHandle) -> tuple[list[int], Any]:
        """One planned READ of the handle's blocks into fresh local blocks; returns (block ids, TransferStats)."""
        assert self.runner is not None and self.backend is not None and self.kv_pool is not None
        n = len(req.prompt_token_ids)
        if h.num_tokens != n:
            raise BadRequest(f"kv_handle holds {h.num_tokens} tokens, the prompt has {n}")
        if time.time() > h.deadline:
            raise StaleHandle(f"handle {h.handle_id} expired {time.time() - h.deadline:.3f} s ago")
        t0 = time.monotonic()
        if _TEST_PULL_DELAY_S > 0:  # test hook: widen the window between the hand-off and the READ
            await asyncio.sleep(_TEST_PULL_DELAY_S)
        remote = await self._remote(h)
        # leading blocks our own prefix cache holds are reused, only the rest is read (the router counts the same)
        cached = await self.runner.match_for_pull(req, len(h.block_ids))
        k = len(cached)
        try:
            dst = cached + await self.runner.allocate(len(h.block_ids) - k)
        except BaseException:
            await self.runner.free(cached)
            raise
        released = False
        try:
            th = await transfer_kv_cache(remote, self.kv_pool, (list(h.block_ids[k:]), dst[k:]), backend=self.backend,
                                         deadline_s=self.cfg.kv_transfer.timeout_ms / 1000.0)
            stats = await th
            released = True  # whatever happens next, do not release twice
            if not await self._release(h):
                raise StaleHandle(f"handle {h.handle_id} was no longer held by {h.worker_id}")
        except BaseException:
            await self.runner.free(dst)
            if not released:
                try:
                    await self._release(h, timeout=0.5)
                except BaseException:  # noqa: BLE001 - the peer may be dead; its blocks die with it
                    pass
            if isinstance(getattr(self.backend, "_peers", None), dict) and h.agent in self.backend._peers:
                try:
                    self.backend.remove_peer(h.agent)  # re-read its record next time
                except Exception:  # noqa: BLE001
                    pass
            raise
        await self.runner.commit_pulled(req, dst, k)
        self.transfers += 1
        log.info("kv transfer received: peer=%s agent=%s tokens=%d bytes=%d descriptors=%d path=%s backend=%s "
                 "latency_ms=%.3f transfer_ms=%.3f cached_blocks=%d", h.worker_id, h.agent, n, stats.bytes,
                 stats.descriptors, stats.path, stats.backend, (time.monotonic() - t0) * 1e3, stats.seconds * 1e3, k)
        return dst, stats

    # -- generate -----------------------------------------------------------------------------------
    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.runner is not None and self.metrics is not None
        t0 = time.monotonic()
        m = self.metrics
        if self.stopping:
            m.requests.labels("refused").inc()
            yield error_chunk("worker is shutting down")
            return
        if self._draining:  # fail before the first chunk: the router sends the request to another decode worker
            m.requests.labels("refused").inc()
            raise RuntimeError("decode worker is draining (handing its requests over)")
        try:
            req = parse_request(request, _rid(context), vocab_size=self.vocab_size, max_model_len=self.max_model_len)
            handle = handle_of(request) if self.disaggregated else None
        except BadRequest as e:
            m.requests.labels("bad_request").inc()
            log.info("bad request: %s", e)
            yield error_chunk(str(e), len(request.get("token_ids") or []) if isinstance(request, dict) else 0)
            return
        n_prompt = len(req.prompt_token_ids)
        blocks: list[int] | None = None
        first = 0
        peer = request.get("kv_peer_info") if handle is not None and isinstance(request, dict) else None
        if peer and self.backend is not None and not self.backend.has_peer(handle.agent):
            try:  # a migration handle: the draining source's record is gone, its PeerInfo comes with it
                import base64  # noqa: PLC0415

                info = PeerInfo.decode(base64.b64decode(peer))
                if info.agent_name == handle.agent:
                    self.backend.add_peer(info)
            except Exception as e:  # noqa: BLE001 - the pull then fails and we prefill locally
                log.warning("kv_peer_info of %s unusable: %s", handle.agent, e)
        # our router asks for a report of the pull (link feedback, see router.py); Dynamo's frontend never does
        report: dict[str, Any] | None = None
        if handle is not None:
            try:
                blocks, stats = await self.pull(req, handle)
                first = handle.first_token
                report = {"bytes": stats.bytes, "seconds": stats.seconds}
            except Exception as e:  # noqa: BLE001 - any failure: prefill here instead
                reason = type(e).__name__
                m.local_prefill_fallbacks.labels(reason).inc()
                log.warning("KV pull from %s failed (%s: %s): prefilling locally", handle.worker_id, reason, e)
                report = {"error": reason}
        elif self.disaggregated:
            m.local_prefill_fallbacks.labels("no_handle").inc()
        if blocks is None:
            try:
                res = await self.runner.prefill(req)
            except (ValueError, OutOfBlocks, PoolOutOfBlocks, NoRoom) as e:
                m.requests.labels("rejected").inc()
                yield error_chunk(f"cannot prefill: {e}", n_prompt)
                return
            blocks, first = res.block_ids, res.first_token
        t_first = time.monotonic()
        m.ttft.observe(t_first - t0)
        first_chunk: dict[str, Any] = {"token_ids": [first]}
        if report is not None and isinstance(request, dict) and request.get("report_kv_transfer"):
            first_chunk["kv_transfer"] = report
        yield first_chunk
        self._active[req.request_id] = req
        router_rid = request.get("router_rid") if isinstance(request, dict) else None
        if router_rid:
            self._by_router[str(router_rid)] = req.request_id
        try:
            async for chunk in self._stream(req, blocks, first, context, n_prompt, t_first):
                yield chunk
        finally:
            self._active.pop(req.request_id, None)
            if router_rid:
                self._by_router.pop(str(router_rid), None)

    async def _stream(self, req: Request, blocks: list[int], first: int, context: Any, n_prompt: int,
                      t_first: float) -> AsyncIterator[dict[str, Any]]:
        assert self.runner is not None and self.metrics is not None
        m = self.metrics
        n_out = 1
        t_last = t_first
        async for o in self.runner.decode(req, blocks, first):
            if context is not None and hasattr(context, "is_stopped") and context.is_stopped():
                m.requests.labels("cancelled").inc()
                return
            if o.finish_reason == "migrated":  # exported by the drain: hand it over, the router continues it
                if o.new_token_ids:
                    yield {"token_ids": list(o.new_token_ids)}
                m.requests.labels("migrated").inc()
                yield {"token_ids": [], "migrate": await self._hand_over(req.request_id)}
                return
            n_out += len(o.new_token_ids)
            out: dict[str, Any] = {"token_ids": list(o.new_token_ids)}
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
