"""Router component: component ``router``, endpoint ``generate``, the model's public endpoint in the
policies ``dynamo-ext`` and ``round-robin``.

Protocol of one request (who calls what, in what order)::

    Dynamo frontend                 RouterWorker                                 workers
    ------------------------------------------------------------------------------------------------------------
    generate({token_ids, stop_conditions, sampling_options, ...})   (tokenized by the frontend)
                                    1. choose:
                                       round-robin: next prefill, next decode; prompts shorter than
                                         router.disagg_min_prompt_tokens (or no prefill worker) -> local on decode
                                       dynamo-ext: routing.decide(RequestShape, [WorkerSnapshot], LinkTable)
                                         snapshots from the router's in-flight counters per worker and the
                                         overlap of KvEventIndexer (NATS kv-events of all our workers)
                                    2. DISAGG: prefill_client.direct(req, prefill_id) ---------> prefill worker
                                         one chunk: {kv_handle, token_ids: [first]} <-----------  (holds blocks)
                                         error chunk -> forwarded to the client, done
                                         call failed (worker dead) -> no handle: decode prefills locally
                                    3. decode_client.direct({...req, kv_handle}, decode_id) ---> decode worker
                                         stream of {token_ids} <--------------------------------  (NIXL READ,
                                                                                                    release, decode)
                                       the decode call fails before its first chunk -> once more on another
                                       decode worker (without the handle); after tokens were streamed (worker
                                       died) -> re-run on another decode worker from prompt + streamed tokens,
                                       max_tokens reduced, the same client stream goes on (greedy: the same
                                       tokens); no other decode worker -> one error chunk naming the dead one
    chunks forwarded as they come

Link feedback (policy dynamo-ext): a decode chunk may carry ``kv_transfer``, the decode worker's report of
the pull it made for this request: ``{"bytes": n, "seconds": s}`` after a NIXL READ, ``{"error": reason}``
after a failed pull. The router pops it (the frontend never sees it) and feeds ``LinkFeedback``:
``routing.LinkEstimator.observe_transfer`` / ``observe_failure`` for the pair (prefill, decode) it chose.
``_link`` then prefers the measured GB/s over the topology's expectation, and an unhealthy pair (failed
pull) is excluded by ``decide`` until its back-off (1 s, doubling, at most 60 s) has passed; the next
request on it is the probe (success: healthy again; failure: longer back-off). The router asks for the
report with ``report_kv_transfer: true`` in the decode request; the decode worker attaches it to its first
chunk (requests from Dynamo's own frontend, policy dynamo-kv, never carry it).

Visibility: only the router calls register_model (Tokens, Chat|Completions, RouterMode.RoundRobin among
router replicas). Prefill and decode workers do not register the model in these policies, so the
frontend can neither list nor reach them; they are Dynamo instances under ``prefill`` / ``backend``
(found here with ``client.instance_ids()``) and records under dynamo_ext/v1/workers/<ns>/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, AsyncIterator

from dynamo_ext.discovery import EtcdStore, WorkerRecord, WorkerRegistry
from dynamo_ext.engine.config import ModelConfig
from dynamo_ext.kv.indexer import KvEventIndexer, kv_events_subject
from dynamo_ext.metrics import make_worker_metrics
from dynamo_ext.routing import LinkEstimator, LinkInfo, LinkTable, OptionKind, RequestShape, RoutingConfig, decide
from dynamo_ext.routing import Move, Recompute, RunningRequest, WorkerSnapshot, plan_migrations
from dynamo_ext.routing.throughput import Priors, WorkerMeter
from dynamo_ext.topology import Endpoint, NodeTopology, select_transport

from .protocol import error_chunk
from .runtime import WorkerArgs, WorkerProcess

log = logging.getLogger("dynamo_ext.workers.router")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Priors of the measured throughput (routing.throughput.WorkerMeter), for the 2-layer tiny model on the CPU
# reference engine; the router scales them by the served model's layer count (Priors.for_layers).
PREFILL_TOKENS_PER_S = 20_000.0
DECODE_STEP_S = 0.002
LINK = LinkInfo(gb_per_s=3.0, latency_s=0.002)


class LinkFeedback:
    """Measured transfers and failed pulls per (prefill, decode) pair -> LinkInfo for ``decide`` (no clock read)."""

    def __init__(self, estimator: LinkEstimator | None = None) -> None:
        self.est = estimator or LinkEstimator(min_sample_bytes=64 << 10)
        self.observed = 0
        self.failed = 0

    def observe(self, chunk: dict[str, Any], p: int | None, d: int, now: float) -> dict[str, Any]:
        """Takes ``kv_transfer`` out of a decode chunk (returned without it) and records it for p -> d."""
        if "kv_transfer" not in chunk:
            return chunk
        chunk = dict(chunk)
        rep = chunk.pop("kv_transfer")
        if p is None or not isinstance(rep, dict):
            return chunk
        if rep.get("error"):
            self.est.observe_failure(p, d, now)
            self.failed += 1
            return chunk
        try:
            nbytes, seconds = int(rep["bytes"]), float(rep["seconds"])
        except (KeyError, TypeError, ValueError):
            return chunk
        if seconds > 0 and nbytes >= 0:
            self.est.observe_transfer(p, d, nbytes, seconds, now)
            self.observed += 1
        return chunk

    def link(self, p: int, d: int, expected: LinkInfo, now: float) -> LinkInfo:
        """The measured link where there is one (``expected`` fills the rest); an unhealthy pair whose
        back-off has passed is offered as healthy once more (that request is the probe)."""
        info = self.est.info(p, d, expected)
        if not info.healthy and (p, d) in self.est.due_for_probe(now):
            return LinkInfo(info.gb_per_s, info.latency_s, True)
        return info


class RouterWorker(WorkerProcess):
    def __init__(self, args: WorkerArgs) -> None:
        super().__init__(args)
        self.policy = self.cfg.router.policy
        self.block_size = self.cfg.model.block_size
        mc = ModelConfig.from_hf(json.loads((Path(args.model_dir) / "config.json").read_text()))
        self.kv_bytes_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * _DTYPE_BYTES.get(mc.dtype, 4)
        self.prefill_client: Any = None
        self.decode_client: Any = None
        self.indexer: KvEventIndexer | None = None
        self._rr_p = itertools.count()
        self._rr_d = itertools.count()
        self.inflight: dict[int, int] = defaultdict(int)  # requests per worker
        #: streams decoding now: router request id -> (decode worker, prompt + streamed tokens) (rebalancing)
        self.running: dict[str, tuple[int, int]] = {}
        #: rebalancing moves asked for and not yet handed over: router request id -> target decode worker
        self._planned_moves: dict[str, int] = {}
        self.inflight_tokens: dict[int, int] = defaultdict(int)  # prompt tokens waiting for prefill per worker
        self.decisions: dict[str, int] = defaultdict(int)
        self.registry: WorkerRegistry | None = None
        self._reg_store: EtcdStore | None = None
        self._links: dict[tuple[int, int, float, float], LinkInfo] = {}  # (p, d, started_at p, d) -> expectation
        self.link_kinds: dict[str, str] = {}
        self.feedback = LinkFeedback()
        # measured prefill tok/s, decode step s, queued uncached tokens per worker (routing.throughput)
        self.meter = WorkerMeter(Priors.for_layers(max(int(mc.num_layers), 1),
                                                   ref_prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                                   ref_decode_step_s=DECODE_STEP_S))

    async def setup(self) -> Any:
        from dynamo.llm import ModelInput, ModelType, RouterConfig, RouterMode, WorkerType, register_model  # noqa: PLC0415

        ep = self.endpoint("generate")
        health_ep = self.endpoint("health")
        self.prefill_client = await self.endpoint("prefill", component="prefill").client()
        self.decode_client = await self.endpoint("generate", component="backend").client()
        self.export_client = await self.endpoint("export", component="backend").client()
        if REBALANCE_S > 0:
            self.spawn(self._rebalance_loop(), "rebalance")
        self.metrics = make_worker_metrics("router", int(ep.connection_id()))
        if self.policy == "dynamo-ext":
            try:  # worker records: layouts, nodes and topologies for the link table
                import os  # noqa: PLC0415

                self._reg_store = await EtcdStore.connect(os.environ["ETCD_ENDPOINTS"].split(",")[0])
                self.registry = WorkerRegistry(self._reg_store, self.namespace)
                await self.registry.start()
            except Exception as e:  # noqa: BLE001
                log.warning("worker registry unavailable (%s): default links and layouts", e)
                self.registry = None
            try:
                self.indexer = KvEventIndexer(self.block_size)
                await self.indexer.start(self.cfg.discovery.nats.url, kv_events_subject(self.namespace))
            except Exception as e:  # noqa: BLE001 - routing still works without overlap scores
                log.warning("KV event indexer unavailable (%s): overlap scores are 0", e)
                self.indexer = None
        await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, ep, self.args.model_dir,
                             self.cfg.model.name, worker_type=WorkerType.Aggregated,
                             kv_cache_block_size=self.block_size, router_config=RouterConfig(RouterMode.RoundRobin))
        self.instance_id = int(ep.connection_id())
        self.spawn(ep.serve_endpoint(self.generate), "serve-generate")
        self.spawn(health_ep.serve_endpoint(self.health_handler), "serve-health")
        await self.wait_serving(ep)
        return ep

    async def health_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield self.health()

    def health(self) -> dict[str, Any]:
        h = super().health()
        h.update(policy=self.policy, decisions=dict(self.decisions), links=dict(self.link_kinds),
                 link_feedback={"transfers": self.feedback.observed, "failures": self.feedback.failed},
                 throughput=self.meter.summary(time.monotonic()),
                 prefill_workers=len(self.prefill_client.instance_ids()) if self.prefill_client else 0,
                 decode_workers=len(self.decode_client.instance_ids()) if self.decode_client else 0)
        return h

    async def teardown(self) -> None:
        if self.indexer is not None:
            await self.indexer.close()
        if self.registry is not None:
            await self.registry.stop()

    # -- choice -------------------------------------------------------------------------------------
    def choose(self, tokens: list[int], rid: str) -> tuple[int | None, int]:
        """(prefill worker or None for a local prefill, decode worker)."""
        decodes = sorted(self.decode_client.instance_ids())
        prefills = sorted(self.prefill_client.instance_ids())
        if not decodes:
            raise RuntimeError("no decode worker is serving")
        if self.policy == "dynamo-ext":
            try:
                return self._decide(tokens, rid, prefills, decodes)
            except Exception as e:  # noqa: BLE001 - fall back to round-robin rather than fail the request
                log.warning("routing.decide failed (%s): round-robin", e)
        d = decodes[next(self._rr_d) % len(decodes)]
        if not prefills or len(tokens) < self.cfg.router.disagg_min_prompt_tokens:
            self.decisions["local"] += 1
            return None, d
        self.decisions["disagg"] += 1
        return prefills[next(self._rr_p) % len(prefills)], d

    def _record(self, component: str, iid: int) -> WorkerRecord | None:
        return self.registry.get(component, iid) if self.registry is not None else None

    @staticmethod
    def _layout_key(rec: WorkerRecord | None) -> str:
        if rec is None or not rec.kv_layout:
            return "model"
        k = rec.kv_layout
        return f"{k.get('num_layers')}/{k.get('num_kv_heads')}/{k.get('head_dim')}/{k.get('block_size')}/{k.get('dtype')}"

    @staticmethod
    def _node(rec: WorkerRecord | None) -> str:
        host = (rec.topology or {}).get("host", {}) if rec is not None else {}
        return str(host.get("host_id") or (rec.host if rec is not None else "local"))

    def _link(self, p: int, d: int) -> LinkInfo:
        """Measured link p -> d (LinkFeedback) over the topology's expectation."""
        return self.feedback.link(p, d, self._expected_link(p, d), time.monotonic())

    def _expected_link(self, p: int, d: int) -> LinkInfo:
        """Expected link p -> d from the two workers' topologies (topology.select_transport), cached."""
        rp, rd = self._record("prefill", p), self._record("backend", d)
        if rp is None or rd is None or not rp.topology or not rd.topology:
            return LINK
        key = (p, d, rp.started_at, rd.started_at)
        link = self._links.get(key)
        if link is None:
            try:
                a = Endpoint(NodeTopology.from_dict(rp.topology), rp.pid, "host")
                b = Endpoint(NodeTopology.from_dict(rd.topology), rd.pid, "host")
                c = select_transport(a, b, self.cfg.kv_transfer.transport)
                link = LinkInfo(gb_per_s=max(c.expected_gbps, 1e-3), latency_s=max(c.expected_latency_us, 0) * 1e-6)
                self.link_kinds[f"{p}->{d}"] = f"{c.kind} {c.expected_gbps:g} GB/s"
            except Exception as e:  # noqa: BLE001
                log.warning("no link expectation for %d -> %d (%s): default", p, d, e)
                link = LINK
            self._links[key] = link
        return link

    def _decide(self, tokens: list[int], rid: str, prefills: list[int], decodes: list[int]) -> tuple[int | None, int]:
        scores = self.indexer.scores(tokens) if self.indexer is not None else {}
        shape = RequestShape(prompt_tokens=len(tokens), block_size=self.block_size,
                             kv_bytes_per_token=self.kv_bytes_per_token, request_id=rid)
        nblocks = self.cfg.workers.decode.num_kv_blocks if self.cfg.workers.decode else 1024
        rec = {("p", p): self._record("prefill", p) for p in prefills}
        rec.update({("d", d): self._record("backend", d) for d in decodes})
        now = time.monotonic()
        snaps = self._snapshots(scores, rec, prefills, decodes, nblocks, now)
        cfg = RoutingConfig(local_prefill_max_tokens=self.cfg.router.disagg_min_prompt_tokens)
        links = LinkTable({(p, d): self._link(p, d) for p in prefills for d in decodes}, default=LINK)
        dec = decide(shape, snaps, links, config=cfg)
        self.decisions[dec.reason.value if hasattr(dec.reason, "value") else str(dec.reason)] += 1
        log.debug("decision %s", dec.to_log())
        c = dec.chosen
        # the chosen worker's queue grows by the tokens it computes (measured when its prefill ends)
        self.meter.planned(rid, c.prefill_id, c.uncached_tokens, c.kind is OptionKind.LOCAL, now)
        if c.kind is OptionKind.LOCAL:
            return None, c.decode_id
        return c.prefill_id, c.decode_id

    def _snapshots(self, scores: dict[int, int], rec: dict, prefills: list[int], decodes: list[int],
                   nblocks: int, now: float) -> list[WorkerSnapshot]:
        """WorkerSnapshots from measured throughput (``self.meter``) and the KV-event overlap scores.

        prefill worker p: thr = measured prefill tok/s; queue = uncached tokens planned on p, not yet
          prefilled; queued_requests = the router's in-flight calls on p.
        decode worker d: thr = measured local prefill tok/s / (1 + w * running streams on d) (a local
          prefill stalls them); admission = one measured decode step (the next batch boundary) + the
          local prefills planned on d (their uncached tokens / d's local tok/s): d's engine runs them
          before it takes a new request, pulled or local. Queue 0 (the backlog is in admission, which
          both kinds of option pay; for a hand-off it overestimates, as p prefills meanwhile).
        """
        m = self.meter
        snaps = [WorkerSnapshot(worker_id=p, role="prefill", prefill_tokens_per_s=m.prefill_tokens_per_s(p, now),
                                layout_key=self._layout_key(rec["p", p]), queue_tokens=m.queued_tokens(p),
                                queued_requests=self.inflight[p], free_blocks=nblocks,
                                overlap_blocks=scores.get(p, 0), node=self._node(rec["p", p])) for p in prefills]
        snaps += [WorkerSnapshot(worker_id=d, role="decode", prefill_tokens_per_s=m.local_prefill_tokens_per_s(d, now),
                                 layout_key=self._layout_key(rec["d", d]),
                                 free_blocks=nblocks, admission_delay_s=m.decode_step_s(d, now) + m.backlog_s(d, now),
                                 overlap_blocks=scores.get(d, 0), node=self._node(rec["d", d])) for d in decodes]
        return snaps

    # -- migration (a draining decode worker hands its running requests over) ----------------------
    def _migration_target(self, request: dict[str, Any], prompt: list[int], emitted: list[int], mig: dict[str, Any],
                          source: int, tried: set[int], rid: str = "") -> tuple[int, dict[str, Any] | None, str] | None:
        """(target decode worker, its request (None: nothing left to generate), "move" | "recompute") for a
        request the draining ``source`` exported, by ``routing.plan_migrations(reason=drain)``: Move (the
        target pulls the KV) only when the transfer is faster than recomputing and the target has room;
        else Recompute (the target prefills prompt + streamed tokens). None: no other decode worker."""
        others = sorted(w for w in self.decode_client.instance_ids() if w != source and w not in tried)
        if not others:
            return None
        planned = self._planned_moves.pop(rid, None)
        if planned in others:  # a rebalancing Move: plan_migrations(imbalance) chose the target already
            self.decisions["rebalance_move"] += 1
            return planned, migration_request(request, mig), "rebalance"
        toks = [int(t) for t in mig["tokens"]]
        h = mig["kv_handle"]
        nblocks = self.cfg.workers.decode.num_kv_blocks if self.cfg.workers.decode else 1024
        per = max(len(h["block_ids"]), 1)
        now = time.monotonic()
        key = self._layout_key(self._record("backend", others[0]))
        snaps = [WorkerSnapshot(worker_id=d, role="decode", prefill_tokens_per_s=self.meter.local_prefill_tokens_per_s(d, now),
                                layout_key=key, free_blocks=max(nblocks - self.inflight[d] * per, 0),
                                active_blocks=min(self.inflight[d] * per, nblocks), node="local")
                 for d in others + [source]]
        running = RunningRequest(request_id=str(h["handle_id"]), worker_id=source, tokens=len(toks),
                                 blocks=len(h["block_ids"]), kv_bytes=len(h["block_ids"]) * self.block_size * self.kv_bytes_per_token,
                                 layout_key=key)
        links = LinkTable({(source, d): self._expected_decode_link() for d in others}, default=LINK)
        try:
            plan = plan_migrations(snaps, [running], links, reason="drain", source_ids=[source])
        except Exception as e:  # noqa: BLE001 - a planning problem must not lose the request: recompute
            log.warning("plan_migrations failed (%s): recompute", e)
            plan = []
        act = plan[0] if plan else None
        if isinstance(act, Move):
            self.decisions["migrate_move"] += 1
            return act.target_id, migration_request(request, mig), "move"
        self.decisions["migrate_recompute"] += 1
        target = act.target_id if isinstance(act, Recompute) else others[0]
        return target, rerun_request(request, prompt, emitted), "recompute"

    async def _rebalance_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(REBALANCE_S)
            try:
                await self._rebalance_once()
            except Exception as e:  # noqa: BLE001 - rebalancing is an optimisation: never fatal
                log.warning("rebalance failed: %s", e)

    async def _rebalance_once(self) -> int:
        """``routing.plan_migrations(reason=imbalance)`` over the streams this router sees; each Move is asked
        of its source decode worker (``export`` endpoint); the stream's migrate chunk then goes to the planned
        target (the generate loop), which pulls the KV. Returns the number of requests exported."""
        decodes = sorted(self.decode_client.instance_ids())
        if len(decodes) < 2 or not self.running:
            return 0
        bs = self.block_size
        nblocks = self.cfg.workers.decode.num_kv_blocks if self.cfg.workers.decode else 1024
        reqs = []
        for r, (d, n) in list(self.running.items()):
            if d in decodes and r not in self._planned_moves:
                nb = -(-n // bs)
                reqs.append(RunningRequest(request_id=r, worker_id=d, tokens=n, blocks=nb,
                                           kv_bytes=nb * bs * self.kv_bytes_per_token, layout_key="model"))
        active = {d: sum(x.blocks for x in reqs if x.worker_id == d) for d in decodes}
        now = time.monotonic()
        snaps = [WorkerSnapshot(worker_id=d, role="decode", prefill_tokens_per_s=self.meter.local_prefill_tokens_per_s(d, now),
                                layout_key="model", active_blocks=min(active[d], nblocks),
                                free_blocks=max(nblocks - active[d], 0), node="local") for d in decodes]
        plan = plan_migrations(snaps, reqs, LinkTable({}, default=self._expected_decode_link()), reason="imbalance")
        by_src: dict[int, list[str]] = defaultdict(list)
        for act in plan:
            if isinstance(act, Move):
                self._planned_moves[act.request_id] = act.target_id
                by_src[act.source_id].append(act.request_id)
        n = 0
        for src, rids in by_src.items():
            data: dict[str, Any] = {}
            try:
                async for item in await asyncio.wait_for(self.export_client.direct({"router_rids": rids}, src), 5.0):
                    data = item.data() if hasattr(item, "data") else item
                    break
            except Exception as e:  # noqa: BLE001
                log.warning("rebalance: export on %d failed: %s", src, e)
            got = set(data.get("exported") or ()) if isinstance(data, dict) else set()
            for r in rids:
                if r not in got:
                    self._planned_moves.pop(r, None)
            n += len(got)
            if got:
                log.info("rebalance: %d of %d planned requests exported by %d", len(got), len(rids), src)
        return n

    def _expected_decode_link(self) -> LinkInfo:
        """Decode -> decode on this node: the same expectation as a prefill -> decode pair (host memory here)."""
        return next(iter(self._links.values()), LINK)

    # -- generate -----------------------------------------------------------------------------------
    async def _prefill(self, request: dict[str, Any], pid: int) -> dict[str, Any] | None:
        timeout = self.cfg.kv_transfer.timeout_ms / 1000.0 + 30.0
        stream = await asyncio.wait_for(self.prefill_client.direct(request, pid), timeout)
        async for item in stream:
            return item.data()
        return None

    async def generate(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        assert self.metrics is not None
        t0 = time.monotonic()
        if self.stopping:
            yield error_chunk("router is shutting down")
            return
        tokens = request.get("token_ids") if isinstance(request, dict) else None
        if not isinstance(tokens, list) or not tokens:
            self.metrics.requests.labels("bad_request").inc()
            yield error_chunk("token_ids: empty prompt (at least one token is needed)")
            return
        rid = uuid.uuid4().hex
        try:
            pid, did = self.choose(tokens, rid)
        except Exception as e:  # noqa: BLE001
            self.metrics.requests.labels("no_worker").inc()
            yield error_chunk(f"no worker available: {e}", len(tokens))
            return
        dreq = dict(request)
        dreq["report_kv_transfer"] = True  # the decode worker reports its pull (link feedback)
        dreq["router_rid"] = rid  # the decode worker's export endpoint finds the request by it (rebalancing)
        if pid is not None:
            self.inflight[pid] += 1
            self.inflight_tokens[pid] += len(tokens)
            chunk = None
            try:
                chunk = await self._prefill(request, pid)
            except Exception as e:  # noqa: BLE001 - prefill worker gone: the decode worker prefills
                log.warning("prefill on %d failed (%s): local prefill on %d", pid, e, did)
                chunk = None
            finally:
                self.inflight[pid] -= 1
                self.inflight_tokens[pid] -= len(tokens)
                self.meter.prefill_done(rid, time.monotonic(), ok=isinstance(chunk, dict) and "kv_handle" in chunk)
            if chunk is not None and str(chunk.get("finish_reason") or "").startswith("error"):
                self.metrics.requests.labels("bad_request").inc()
                yield chunk
                return
            if chunk is not None and "kv_handle" in chunk:
                dreq["kv_handle"] = chunk["kv_handle"]
        first = True
        tried: set[int] = set()
        emitted: list[int] = []  # tokens already streamed to the client (over every decode worker)
        n_prompt = len(tokens)
        offset = 0  # completion tokens the current worker's usage does not count (streamed before a switch)
        skip_first = False  # a migration target repeats the last streamed token first: drop it
        migrated = False
        while True:
            tried.add(did)
            cur = did
            self.inflight[cur] += 1
            sent = False
            moved: dict[str, Any] | None = None
            try:
                async for item in await self.decode_client.direct(dreq, did):
                    d = item.data()
                    if isinstance(d, dict) and "migrate" in d:  # the worker is draining: continue elsewhere
                        moved = d["migrate"]
                        break
                    if isinstance(d, dict):  # measured local prefill / decode step (routing.throughput)
                        self.meter.decode_chunk(rid, cur, time.monotonic(), len(d.get("token_ids") or ()))
                    if isinstance(d, dict) and "kv_transfer" in d:
                        d = self.feedback.observe(d, pid if "kv_handle" in dreq and not migrated else None, did,
                                                  time.monotonic())
                    if first:
                        self.metrics.ttft.observe(time.monotonic() - t0)
                        first = False
                    sent = True
                    if isinstance(d, dict):
                        if skip_first and d.get("token_ids"):
                            d = {**d, "token_ids": list(d["token_ids"])[1:]}
                            skip_first = False
                        if offset and isinstance(d.get("completion_usage"), dict):
                            d = rerun_usage(d, n_prompt, offset)
                        emitted.extend(int(t) for t in d.get("token_ids") or ())
                        self.running[rid] = (cur, n_prompt + len(emitted))
                    yield d
                if moved is None:
                    self.metrics.requests.labels("recovered" if len(tried) > 1 and emitted else "ok").inc()
                    return
            except Exception as e:  # noqa: BLE001 - handled below, with the generic recovery
                moved = None
                err: Exception | None = e
            else:
                err = None
            finally:
                self.inflight[cur] -= 1
                self.meter.decode_done(rid)
                self.running.pop(rid, None)
            if moved is not None:
                full = [int(t) for t in moved.get("tokens") or ()]
                seen = list(tokens) + emitted
                if full[: len(seen)] == seen and len(full) > len(seen):  # tokens the worker produced before the
                    missing = full[len(seen):]                           # export but had not streamed yet
                    emitted.extend(missing)
                    yield {"token_ids": missing}
                target = self._migration_target(request, tokens, emitted, moved, cur, tried, rid)
                if target is not None and target[1] is None:  # nothing left to generate
                    self.metrics.requests.labels("migrated").inc()
                    yield {"token_ids": [], "finish_reason": "length",
                           "completion_usage": {"prompt_tokens": n_prompt, "completion_tokens": len(emitted),
                                                "total_tokens": n_prompt + len(emitted)}}
                    return
                if target is not None:
                    did, nreq, how = target
                    assert nreq is not None
                    dreq = {**nreq, "report_kv_transfer": True}
                    migrated = True
                    if how == "move":  # the target pulls the KV and first repeats the last streamed token
                        skip_first, offset = True, len(emitted) - 1
                    else:
                        skip_first, offset = False, len(emitted)
                    log.info("request %s: decode worker %d %s after %d tokens: %s to %d", rid, cur,
                             "rebalances" if how == "rebalance" else "drains", len(emitted), how, did)
                    if how == "rebalance":
                        skip_first, offset = True, len(emitted) - 1
                    continue
                err = RuntimeError(f"decode worker {cur} is draining and no other decode worker can take its requests")
            e = err
            others = [w for w in self.decode_client.instance_ids() if w not in tried]
            if not others:
                self.metrics.requests.labels("failed").inc()
                what = "died mid-stream" if emitted else "failed"
                yield error_chunk(f"decode worker {did} {what} ({e}) and no other decode worker is available",
                                  n_prompt)
                return
            dreq.pop("kv_handle", None)
            if emitted:
                # recovery: re-run on another decode worker from the prompt + the tokens already streamed
                # (a local prefill there); greedy requests go on with exactly the tokens they would have had
                rerun = rerun_request(request, tokens, emitted)
                if rerun is None:  # nothing left to generate: close the stream as the worker would have
                    self.metrics.requests.labels("recovered").inc()
                    yield {"token_ids": [], "finish_reason": "length",
                           "completion_usage": {"prompt_tokens": n_prompt, "completion_tokens": len(emitted),
                                                "total_tokens": n_prompt + len(emitted)}}
                    return
                log.warning("decode worker %d died after %d tokens (%s): re-running on %d from prompt + "
                            "streamed tokens", did, len(emitted), e, others[0])
                dreq = rerun
            else:
                log.warning("decode on %d failed before its first token (%s): retrying on %d", did, e, others[0])
            offset, skip_first = len(emitted), False
            did = others[0]


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


#: seconds between rebalancing rounds (routing.plan_migrations(imbalance)); 0 = off (the default)
REBALANCE_S = _env_float("DYNAMO_EXT_REBALANCE_S", 0.0)


def migration_request(request: dict[str, Any], mig: dict[str, Any]) -> dict[str, Any] | None:
    """The request a target decode worker continues a migrated stream with: the tokens whose KV the handle
    holds (all but the last) as the prompt, the handle (its first_token = the last streamed token), the
    source's peer info (its record is gone while it drains), max_tokens reduced (+1: the repeated token)."""
    toks = [int(t) for t in mig["tokens"]]
    out = {k: v for k, v in request.items() if k not in ("kv_handle", "prefill_result")}
    out["token_ids"] = toks[:-1]
    out["kv_handle"] = dict(mig["kv_handle"])
    out["kv_peer_info"] = mig.get("peer_info")
    stop = dict(out.get("stop_conditions") or {})
    mt = stop.get("max_tokens")
    if isinstance(mt, int):
        left = mt - int(mig["output_len"])
        if left <= 0:
            return None
        stop["max_tokens"] = left + 1
    out["stop_conditions"] = stop
    return out


def rerun_request(request: dict[str, Any], prompt: list[int], emitted: list[int]) -> dict[str, Any] | None:
    """The request that continues a stream on another worker: prompt + emitted tokens, max_tokens reduced by
    what was emitted (None: nothing left). Sampling options are kept (greedy continues exactly)."""
    out = dict(request)
    out.pop("kv_handle", None)
    out["token_ids"] = list(prompt) + list(emitted)
    stop = dict(out.get("stop_conditions") or {})
    mt = stop.get("max_tokens")
    if isinstance(mt, int):
        if mt - len(emitted) <= 0:
            return None
        stop["max_tokens"] = mt - len(emitted)
    out["stop_conditions"] = stop
    return out


def rerun_usage(chunk: dict[str, Any], n_prompt: int, n_before: int) -> dict[str, Any]:
    """The last chunk of a re-run reports usage for the client's request: its prompt, all tokens streamed."""
    u = dict(chunk["completion_usage"])
    comp = int(u.get("completion_tokens") or 0) + n_before
    u.update(prompt_tokens=n_prompt, completion_tokens=comp, total_tokens=n_prompt + comp)
    return {**chunk, "completion_usage": u}
