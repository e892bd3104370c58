"""What a router does, whatever carries its requests: worker snapshots, ``routing.decide``, measured-link
and throughput feedback, migration plans, and one stream session per request.

Who calls what (the adapters: ``workers/router.py`` over Dynamo endpoints, ``bench/serve_direct.py`` over
JSON lines), in what order::

    adapter                                  RouterCore / StreamSession                 workers (via plane)
    --------------------------------------------------------------------------------------------------------
    core = RouterCore(settings, plane, metrics)
    async for chunk in core.session(request):
                                             1. choose: round-robin | least-loaded | dynamo-ext
                                                (routing.decide over snapshots: WorkerMeter throughput,
                                                plane.overlap() prefix scores, links = LinkFeedback over
                                                select_transport's expectation for the two workers)
                                             2. DISAGG: plane.prefill(req, p) ---------------> {kv_handle,...}
                                                error chunk -> forwarded, done; call failed -> no handle
                                                (the decode worker prefills locally)
                                             3. plane.decode({...req, kv_handle, report_kv_transfer,
                                                router_rid}, d) -----------------------------> stream
                                                first chunk's kv_transfer report -> LinkFeedback (popped)
                                                each chunk -> WorkerMeter (local prefill rate, decode step)
                                             4. the stream ends: done. A "migrate" chunk (drain, rebalance)
                                                -> plan_migrations(drain) or the planned rebalance target:
                                                Move (the target pulls the KV) / Recompute (prompt +
                                                streamed tokens); the same client stream goes on.
                                                The decode call fails before a token -> once more on
                                                another decode worker (no handle); after tokens -> re-run
                                                there from prompt + streamed tokens (greedy: same tokens);
                                                no other decode worker -> one error chunk naming it
    core.rebalance_once() (adapter's timer)  plan_migrations(imbalance) over the running streams, Moves
                                             asked of their sources: plane.export(d, rids)
    core.health()                            decisions, links, feedback, throughput

Pure state plus the plane: no Dynamo, no network client here (import-linter).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from dynamo_ext.routing import LinkEstimator, LinkInfo, LinkTable, OptionKind, RequestShape, RoutingConfig, decide
from dynamo_ext.kv.hashing import block_hashes
from dynamo_ext.routing import Move, PendingPrefixes, Recompute, RunningRequest, WorkerSnapshot, plan_migrations
from dynamo_ext.routing.throughput import Priors, WorkerMeter
from dynamo_ext.topology import NodeTopology
from dynamo_ext.topology.select import Endpoint, select_transport

from .choices import choice_requests, merge_choices
from .protocol import (BadRequest, check_options, drop_first_token, error_chunk, is_invalid, migration_request,
                       rerun_request, rerun_usage)

log = logging.getLogger("dynamo_ext.serving.router")

# Priors of the measured throughput (routing.throughput.WorkerMeter), for the 2-layer tiny model on the CPU
# reference engine; the router scales them by the served model's layer count (Priors.for_layers).
PREFILL_TOKENS_PER_S = 20_000.0
DECODE_STEP_S = 0.002
LINK = LinkInfo(gb_per_s=3.0, latency_s=0.002)
#: a worker whose call failed is left out of choices this long (or until a call to it succeeds): a dead worker
#: requests whose route, estimate and measured times the router keeps (GET /routes of its metrics server)
TRACE_LEN = 2000
#: stays listed until its lease ends (the lease TTL), and every request sent to it would fail to connect first
DOWN_S = 5.0
POLICIES = ("dynamo-ext", "round-robin", "least-loaded")


@dataclass(frozen=True)
class WorkerInfo:
    """What the router knows of a worker from its record (etcd) or its ready line (direct harness)."""

    kv_layout: dict[str, Any]
    topology: dict[str, Any]
    started_at: float = 0.0
    device: int | None = None  # physical GPU index of its KV pool, None = host memory


class RouterPlane(Protocol):
    """What the request plane gives the router core (implemented by each adapter)."""

    def prefill_ids(self) -> list[int]: ...

    def decode_ids(self) -> list[int]: ...

    def info(self, role: str, worker: int) -> WorkerInfo | None:
        """role "prefill" or "decode"."""
        ...

    def overlap(self, tokens: list[int]) -> dict[int, int]:
        """Leading prompt blocks each worker's prefix cache holds (its KV events)."""
        ...

    async def prefill(self, request: dict[str, Any], worker: int, timeout_s: float) -> dict[str, Any] | None:
        """The prefill worker's one chunk; raises when the call fails."""
        ...

    def decode(self, request: dict[str, Any], worker: int) -> AsyncIterator[dict[str, Any]]:
        """The decode worker's stream of chunks; raises when the call fails."""
        ...

    async def export(self, worker: int, router_rids: list[str], timeout_s: float) -> list[str]: ...


@dataclass(frozen=True)
class Route:
    """A routing choice: ``prefill`` None = the decode worker prefills locally; ``overlap_blocks`` = the prompt
    blocks the prefix index says the prefilling worker holds (policy dynamo-ext; 0 otherwise)."""

    prefill: int | None
    decode: int
    reason: str
    overlap_blocks: int = 0
    #: routing.decide's estimate of the chosen option (est_s, its terms, uncached tokens); None otherwise
    estimate: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RouterSettings:
    policy: str = "dynamo-ext"
    block_size: int = 16
    num_layers: int = 2
    kv_bytes_per_token: int = 0
    decode_num_blocks: int = 1024
    disagg_min_prompt_tokens: int = 64
    local_prefill: bool = True  # decode workers may prefill a request themselves when cheaper (dynamo-ext)
    work_weight: float = 0.0  # routing.RoutingConfig.work_weight: the prefill compute an option adds, charged
    pending_ttl_s: float = 0.0  # routed prefixes count as cached on their prefilling worker this long (0: off)
    shared_compute: bool = False  # queue waits count the queued prefill tokens of workers on the same GPU / host CPUs
    transfer_timeout_s: float = 2.0
    force: str = "auto"  # kv_transfer.transport
    rdma_device: str | None = None
    decode_role: str = "decode"  # "agg" when the decode side is aggregated workers (direct harness agg graphs)
    context_length: int = 0  # prompts of this many tokens or more are refused at once (0: the workers check)
    prefill_call_extra_s: float = 30.0  # the prefill call's timeout = transfer timeout + this

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"router policy {self.policy!r} (allowed: {', '.join(POLICIES)})")


class LinkFeedback:
    """Measured transfers and failed pulls per (prefill, decode) pair -> LinkInfo for ``decide`` (no clock read)."""

    def __init__(self, estimator: LinkEstimator | None = None) -> None:
        self.est = estimator or LinkEstimator(min_sample_bytes=64 << 10)
        self.observed = 0
        self.failed = 0
        self.backends: dict[str, str] = {}  # "p->d" -> backend of the last pull

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
            if rep.get("backend"):
                self.backends[f"{p}->{d}"] = str(rep["backend"])
        return chunk

    def link(self, p: int, d: int, expected: LinkInfo, now: float) -> LinkInfo:
        """The measured link where there is one (``expected`` fills the rest); an unhealthy pair whose
        back-off has passed is offered as healthy once more (that request is the probe)."""
        info = self.est.info(p, d, expected)
        if not info.healthy and (p, d) in self.est.due_for_probe(now):
            return LinkInfo(info.gb_per_s, info.latency_s, True)
        return info


def layout_key(info: WorkerInfo | None) -> str:
    if info is None or not info.kv_layout:
        return "model"
    k = info.kv_layout
    return f"{k.get('num_layers')}/{k.get('num_kv_heads')}/{k.get('head_dim')}/{k.get('block_size')}/{k.get('dtype')}"


def node_of(info: WorkerInfo | None) -> str:
    host = (info.topology or {}).get("host", {}) if info is not None else {}
    return str(host.get("host_id") or "local")


def compute_domain(info: WorkerInfo | None) -> str | None:
    """What a worker computes on, from its topology record: ``gpu:<uuid>`` of its GPU, else ``cpu:<host id>``
    (CPU workers of one host share its cores); None when unknown (no record: assumed to compute alone)."""
    topo = (info.topology or {}) if info is not None else {}
    if not topo:
        return None
    gi = topo.get("worker_gpu")
    if gi is not None:
        for g in topo.get("gpus") or ():
            if g.get("index") == gi and g.get("uuid"):
                return f"gpu:{g['uuid']}"
        return f"gpu:{(topo.get('host') or {}).get('host_id', '?')}:{gi}"
    host = (topo.get("host") or {}).get("host_id")
    return f"cpu:{host}" if host else None


class RouterCore:
    def __init__(self, settings: RouterSettings, plane: RouterPlane, metrics: Any) -> None:
        self.s = settings
        self.plane = plane
        self.metrics = metrics
        self._rr_p = itertools.count()
        self._rr_d = itertools.count()
        self.inflight: dict[int, int] = defaultdict(int)  # calls in flight per worker
        #: streams decoding now: router request id -> (decode worker, prompt + streamed tokens) (rebalancing)
        self.running: dict[str, tuple[int, int]] = {}
        #: rebalancing moves asked for and not yet handed over: router request id -> target decode worker
        self.planned_moves: dict[str, int] = {}
        self.decisions: dict[str, int] = defaultdict(int)
        self.prefill_refusals = 0  # prefills a prefill worker refused (not the client's fault): prefilled locally
        #: prefixes routed to workers whose KV events have not arrived yet (counted as cached there)
        self.pending = PendingPrefixes(ttl_s=settings.pending_ttl_s) if settings.pending_ttl_s > 0 else None
        #: the last requests' routes with the estimate and the measured first-token time (``recent_routes``)
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_LEN)
        #: workers whose last call failed -> monotonic time until which choices leave them out
        self.down: dict[int, float] = {}
        self._links: dict[tuple[int, int, float, float], LinkInfo] = {}  # (p, d, started_at p, d) -> expectation
        self.link_kinds: dict[str, str] = {}
        self.feedback = LinkFeedback()
        # measured prefill tok/s, decode step s, queued uncached tokens per worker (routing.throughput)
        self.meter = WorkerMeter(Priors.for_layers(max(int(settings.num_layers), 1),
                                                   ref_prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                                   ref_decode_step_s=DECODE_STEP_S))

    # -- health -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"policy": self.s.policy, "decisions": dict(self.decisions),
                "prefill_refusals": self.prefill_refusals, "links": dict(self.link_kinds),
                "link_feedback": {"transfers": self.feedback.observed, "failures": self.feedback.failed,
                                  "backends": dict(self.feedback.backends)},
                "throughput": self.meter.summary(time.monotonic()),
                "prefill_workers": len(self.plane.prefill_ids()), "decode_workers": len(self.plane.decode_ids()),
                "down": sorted(w for w, t in self.down.items() if t > time.monotonic())}

    def recent_routes(self) -> list[dict[str, Any]]:
        """The last ``TRACE_LEN`` requests: arrival (monotonic s), prompt tokens, route (reason, prefill,
        decode, overlap blocks), routing.decide's estimate (est_s, terms, uncached tokens) and what happened:
        prefill_s (the prefill call, disaggregated routes), ttft_s (arrival -> first token at the router),
        tried (decode workers). The tail of TTFT is read from here (bench route ``tail``)."""
        return list(self.trace)

    # -- worker health seen from here ----------------------------------------------------------------
    def mark_down(self, worker: int, now: float | None = None) -> None:
        self.down[worker] = (time.monotonic() if now is None else now) + DOWN_S

    def mark_up(self, worker: int) -> None:
        self.down.pop(worker, None)

    def live(self, ids: list[int], now: float | None = None) -> list[int]:
        """``ids`` without the workers marked down (all of them when every one is down: one may be back)."""
        now = time.monotonic() if now is None else now
        up = [w for w in ids if self.down.get(w, 0.0) <= now]
        return up or list(ids)

    # -- choice -------------------------------------------------------------------------------------
    def choose(self, tokens: list[int], rid: str) -> Route:
        """Where the request goes: a prefill worker (None: local prefill on the decode worker) and a decode worker."""
        decodes = self.live(sorted(self.plane.decode_ids()))
        prefills = self.live(sorted(self.plane.prefill_ids())) if self.plane.prefill_ids() else []
        if not decodes:
            raise RuntimeError("no decode worker is serving")
        if self.s.policy == "dynamo-ext":
            try:
                return self._decide(tokens, rid, prefills, decodes)
            except Exception as e:  # noqa: BLE001 - fall back to round-robin rather than fail the request
                log.warning("routing.decide failed (%s): round-robin", e)
        local = not prefills or len(tokens) < self.s.disagg_min_prompt_tokens
        if self.s.policy == "least-loaded":
            d = min(decodes, key=lambda w: (self.inflight[w], w))
            p = None if local else min(prefills, key=lambda w: (self.inflight[w], w))
        else:
            d = decodes[next(self._rr_d) % len(decodes)]
            p = None if local else prefills[next(self._rr_p) % len(prefills)]
        reason = "local" if p is None else "disagg"
        self.decisions[reason] += 1
        return Route(p, d, reason)

    def _info(self, role: str, w: int) -> WorkerInfo | None:
        return self.plane.info(role, w)

    def _link(self, p: int, d: int, now: float) -> LinkInfo:
        """Measured link p -> d (LinkFeedback) over the topology's expectation."""
        return self.feedback.link(p, d, self._expected_link(p, d), now)

    def _expected_link(self, p: int, d: int) -> LinkInfo:
        """Expected link p -> d from the two workers' topologies (topology.select_transport), cached."""
        rp, rd = self._info("prefill", p), self._info("decode", d)
        if rp is None or rd is None or not rp.topology or not rd.topology:
            return LINK
        key = (p, d, rp.started_at, rd.started_at)
        link = self._links.get(key)
        if link is None:
            try:
                tp, td = NodeTopology.from_dict(rp.topology), NodeTopology.from_dict(rd.topology)
                a = Endpoint(td, td.pid, "host" if rd.device is None else rd.device)  # the side that pulls
                b = Endpoint(tp, tp.pid, "host" if rp.device is None else rp.device)
                c = select_transport(a, b, self.s.force, rdma_device=self.s.rdma_device)
                link = LinkInfo(gb_per_s=max(c.expected_gbps, 1e-3), latency_s=max(c.expected_latency_us, 0) * 1e-6)
                self.link_kinds[f"{p}->{d}"] = f"{c.kind} {'>'.join(c.backends)} {c.expected_gbps:g} GB/s"
            except Exception as e:  # noqa: BLE001
                log.warning("no link expectation for %d -> %d (%s): default", p, d, e)
                link = LINK
            self._links[key] = link
        return link

    def _decide(self, tokens: list[int], rid: str, prefills: list[int], decodes: list[int]) -> Route:
        indexed = self.plane.overlap(tokens)
        now = time.monotonic()
        hashes = block_hashes(tokens, self.s.block_size)
        pending = self.pending.match(hashes, now) if self.pending is not None else {}  # routed, no KV events yet
        scores = {w: max(indexed.get(w, 0), pending.get(w, 0)) for w in set(indexed) | set(pending)}
        shape = RequestShape(prompt_tokens=len(tokens), block_size=self.s.block_size,
                             kv_bytes_per_token=self.s.kv_bytes_per_token, request_id=rid)
        snaps = self.snapshots(scores, prefills, decodes, now)
        cfg = RoutingConfig(local_prefill_max_tokens=self.s.disagg_min_prompt_tokens,
                            allow_local_prefill=self.s.local_prefill or not prefills,
                            work_weight=self.s.work_weight)
        links = LinkTable({(p, d): self._link(p, d, now) for p in prefills for d in decodes}, default=LINK)
        dec = decide(shape, snaps, links, config=cfg)
        reason = dec.reason.value if hasattr(dec.reason, "value") else str(dec.reason)
        self.decisions[reason] += 1
        log.debug("decision %s", dec.to_log())
        c = dec.chosen
        # the chosen worker's queue grows by the tokens it computes (measured when its prefill ends)
        self.meter.planned(rid, c.prefill_id, c.uncached_tokens, c.kind is OptionKind.LOCAL, now)
        p = None if c.kind is OptionKind.LOCAL else c.prefill_id
        if self.pending is not None:  # the worker that computes the prompt: its engine serializes prefills, so
            # the next request's prefill there finds these blocks. Not the decode worker of a hand-off: its
            # blocks arrive with the pull, and a local prefill there meanwhile would not find them.
            self.pending.add(c.prefill_id, hashes, now)
        est = {"est_s": round(c.terms.ttft_s, 4), "rank_s": round(c.estimate_s, 4),
               "uncached_tokens": c.uncached_tokens,
               "terms": {k: round(v, 4) for k, v in c.terms.as_dict().items() if k != "total_s"},
               "overlaps": {str(w): int(n) for w, n in scores.items() if n},
               "pending": {str(w): int(n) for w, n in pending.items() if n > indexed.get(w, 0)}}
        return Route(p, c.decode_id, reason, scores.get(c.decode_id if p is None else p, 0), est)

    def snapshots(self, scores: dict[int, int], prefills: list[int], decodes: list[int], now: float) -> list[WorkerSnapshot]:
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
        nblocks = self.s.decode_num_blocks
        info = {("p", p): self._info("prefill", p) for p in prefills}
        info.update({("d", d): self._info("decode", d) for d in decodes})
        shared: dict[tuple[str, int], int] = {}  # (kind, worker) -> queued tokens of the others on its compute
        if self.s.shared_compute:
            dom = {k: compute_domain(v) for k, v in info.items()}
            total: dict[str, int] = defaultdict(int)
            for k, d in dom.items():
                if d is not None:
                    total[d] += m.queued_tokens(k[1])
            shared = {k: total[d] - m.queued_tokens(k[1]) for k, d in dom.items() if d is not None}
        snaps = [WorkerSnapshot(worker_id=p, role="prefill", prefill_tokens_per_s=m.prefill_tokens_per_s(p, now),
                                layout_key=layout_key(info["p", p]), queue_tokens=m.queued_tokens(p),
                                shared_queue_tokens=shared.get(("p", p), 0),
                                queued_requests=self.inflight[p], free_blocks=nblocks,
                                overlap_blocks=scores.get(p, 0), node=node_of(info["p", p])) for p in prefills]
        snaps += [WorkerSnapshot(worker_id=d, role=self.s.decode_role,
                                 prefill_tokens_per_s=m.local_prefill_tokens_per_s(d, now),
                                 layout_key=layout_key(info["d", d]), shared_queue_tokens=shared.get(("d", d), 0),
                                 free_blocks=nblocks, admission_delay_s=m.decode_step_s(d, now) + m.backlog_s(d, now),
                                 overlap_blocks=scores.get(d, 0), node=node_of(info["d", d])) for d in decodes]
        return snaps

    # -- migration ----------------------------------------------------------------------------------
    def _expected_decode_link(self) -> LinkInfo:
        """Decode -> decode on this node: the same expectation as a prefill -> decode pair."""
        return next(iter(self._links.values()), LINK)

    def migration_target(self, request: dict[str, Any], prompt: list[int], emitted: list[int], mig: dict[str, Any],
                         source: int, tried: set[int], rid: str = "") -> tuple[int, dict[str, Any] | None, str] | None:
        """(target decode worker, its request (None: nothing left to generate), "move" | "recompute" |
        "rebalance") for a request the ``source`` exported, by ``routing.plan_migrations(reason=drain)``: Move
        (the target pulls the KV) only when the transfer is faster than recomputing and the target has room;
        else Recompute (the target prefills prompt + streamed tokens). None: no other decode worker."""
        others = self.live(sorted(w for w in self.plane.decode_ids() if w != source and w not in tried))
        if not others:
            return None
        planned = self.planned_moves.pop(rid, None)
        if planned in others:  # a rebalancing Move: plan_migrations(imbalance) chose the target already
            self.decisions["rebalance_move"] += 1
            return planned, migration_request(request, mig), "rebalance"
        toks = [int(t) for t in mig["tokens"]]
        h = mig["kv_handle"]
        nblocks = self.s.decode_num_blocks
        per = max(len(h["block_ids"]), 1)
        now = time.monotonic()
        key = layout_key(self._info("decode", others[0]))
        snaps = [WorkerSnapshot(worker_id=d, role="decode", prefill_tokens_per_s=self.meter.local_prefill_tokens_per_s(d, now),
                                layout_key=key, free_blocks=max(nblocks - self.inflight[d] * per, 0),
                                active_blocks=min(self.inflight[d] * per, nblocks), node="local")
                 for d in others + [source]]
        running = RunningRequest(request_id=str(h["handle_id"]), worker_id=source, tokens=len(toks),
                                 blocks=len(h["block_ids"]),
                                 kv_bytes=len(h["block_ids"]) * self.s.block_size * self.s.kv_bytes_per_token,
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

    async def rebalance_once(self) -> int:
        """``routing.plan_migrations(reason=imbalance)`` over the streams this router sees; each Move is asked
        of its source decode worker (``plane.export``); the stream's migrate chunk then goes to the planned
        target (the session), which pulls the KV. Returns the number of requests exported."""
        decodes = sorted(self.plane.decode_ids())
        if len(decodes) < 2 or not self.running:
            return 0
        bs = self.s.block_size
        nblocks = self.s.decode_num_blocks
        reqs = []
        for r, (d, n) in list(self.running.items()):
            if d in decodes and r not in self.planned_moves:
                nb = -(-n // bs)
                reqs.append(RunningRequest(request_id=r, worker_id=d, tokens=n, blocks=nb,
                                           kv_bytes=nb * bs * self.s.kv_bytes_per_token, layout_key="model"))
        active = {d: sum(x.blocks for x in reqs if x.worker_id == d) for d in decodes}
        now = time.monotonic()
        snaps = [WorkerSnapshot(worker_id=d, role="decode", prefill_tokens_per_s=self.meter.local_prefill_tokens_per_s(d, now),
                                layout_key="model", active_blocks=min(active[d], nblocks),
                                free_blocks=max(nblocks - active[d], 0), node="local") for d in decodes]
        plan = plan_migrations(snaps, reqs, LinkTable({}, default=self._expected_decode_link()), reason="imbalance")
        log.debug("rebalance round: active blocks %s of %d, plan %s", active, nblocks, plan)
        by_src: dict[int, list[str]] = defaultdict(list)
        for act in plan:
            if isinstance(act, Move):
                self.planned_moves[act.request_id] = act.target_id
                by_src[act.source_id].append(act.request_id)
        n = 0
        for src, rids in by_src.items():
            try:
                got = set(await self.plane.export(src, rids, 5.0))
            except Exception as e:  # noqa: BLE001
                log.warning("rebalance: export on %d failed: %s", src, e)
                got = set()
            for r in rids:
                if r not in got:
                    self.planned_moves.pop(r, None)
            n += len(got)
            if got:
                log.info("rebalance: %d of %d planned requests exported by %d", len(got), len(rids), src)
        return n

    # -- sessions -----------------------------------------------------------------------------------
    def session(self, request: Any) -> AsyncIterator[dict[str, Any]]:
        """The chunks the client gets for ``request`` (see the module docstring); ``n`` > 1: one session per
        choice (``serving.choices``: seeds seed + i, chunks tagged with their ``index``)."""
        subs = choice_requests(request)
        if subs is None:
            return StreamSession(self, request).run()
        return self._choices(request, subs)

    async def _choices(self, request: dict[str, Any], subs: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        try:  # refused once, before any choice is routed
            check_options(request)
        except BadRequest as e:
            self.metrics.requests.labels("bad_request").inc()
            yield error_chunk(str(e), len(request.get("token_ids") or ()), invalid=True)
            return
        async for chunk in merge_choices([StreamSession(self, r).run() for r in subs]):
            yield chunk


@dataclass
class _Attempt:
    """One decode call of a session."""

    worker: int
    request: dict[str, Any]
    pulls_from: int | None = None  # the prefill worker whose handle it pulls (link feedback), else None
    skip_first: bool = False  # a migration target repeats the last streamed token first: drop it
    offset: int = 0  # completion tokens streamed before this attempt (its usage does not count them)


class StreamSession:
    """One client request through the router: choose, prefill, then decode attempts until the stream ends."""

    def __init__(self, core: RouterCore, request: Any) -> None:
        self.core = core
        self.request = request
        self.rid = uuid.uuid4().hex
        self.t0 = time.monotonic()
        self.tokens: list[int] = []
        self.emitted: list[int] = []  # tokens streamed to the client (over every decode worker)
        self.tried: set[int] = set()
        self.first_sent = False
        self.route: Route | None = None  # set once chosen
        self.rec: dict[str, Any] = {}  # this request's entry of core.trace
        self._next: _Attempt | None = None

    def _outcome(self, what: str) -> None:
        self.core.metrics.requests.labels(what).inc()

    def _usage_end(self, finish: str = "length") -> dict[str, Any]:
        n, k = len(self.tokens), len(self.emitted)
        return {"token_ids": [], "finish_reason": finish,
                "completion_usage": {"prompt_tokens": n, "completion_tokens": k, "total_tokens": n + k}}

    async def run(self) -> AsyncIterator[dict[str, Any]]:
        core, request = self.core, self.request
        tokens = request.get("token_ids") if isinstance(request, dict) else None
        if not isinstance(tokens, list) or not tokens:
            self._outcome("bad_request")
            yield error_chunk("token_ids: empty prompt (at least one token is needed)", invalid=True)
            return
        self.tokens = tokens
        try:  # OpenAI parameters the engine cannot honour: refused before routing (workers/README.md)
            check_options(request)
        except BadRequest as e:
            self._outcome("bad_request")
            yield error_chunk(str(e), len(tokens), invalid=True)
            return
        limit = core.s.context_length
        if limit and len(tokens) >= limit:  # refused here, before the prompt travels to any worker
            self._outcome("bad_request")
            yield error_chunk(f"the prompt has {len(tokens)} tokens; the context of this model is {limit} tokens "
                              f"(model.max_model_len): at most {limit - 1} prompt tokens", len(tokens), invalid=True)
            return
        try:
            self.route = core.choose(tokens, self.rid)
        except Exception as e:  # noqa: BLE001
            self._outcome("no_worker")
            yield error_chunk(f"no worker available: {e}", len(tokens))
            return
        pid, did = self.route.prefill, self.route.decode
        self.rec = {"t": round(self.t0, 4), "prompt_tokens": len(tokens), "reason": self.route.reason,
                    "prefill": pid, "decode": did, "overlap_blocks": self.route.overlap_blocks,
                    "estimate": self.route.estimate, "inflight_decode": core.inflight[did]}
        core.trace.append(self.rec)
        dreq = {**request, "report_kv_transfer": True, "router_rid": self.rid}
        pulls_from = None
        if pid is not None:
            self.rec["inflight_prefill"] = core.inflight[pid]
            chunk = await self._prefill(pid, did)
            self.rec["prefill_s"] = round(time.monotonic() - self.t0, 4)
            if is_invalid(chunk):  # the request is wrong: no other worker would take it
                self._outcome("bad_request")
                yield chunk
                return
            if chunk is not None and str(chunk.get("finish_reason") or "").startswith("error"):
                # the prefill worker could not take it (a prompt larger than its pool, out of blocks): the
                # decode worker prefills locally, and its own refusal, if any, reaches the client
                log.warning("prefill on %d refused (%s): local prefill on %d", pid, chunk.get("error"), did)
                self.core.prefill_refusals += 1
                self.rec["prefill_refused"] = True
                chunk = None
            if chunk is not None and "kv_handle" in chunk:
                dreq["kv_handle"] = chunk["kv_handle"]
                pulls_from = pid
        attempt: _Attempt | None = _Attempt(did, dreq, pulls_from)
        while attempt is not None:
            end: dict[str, Any] = {}
            async for c in self._decode(attempt, end):
                yield c
            if end.get("done"):
                return
            self._next = None
            async for c in self._after(attempt, end):
                yield c
            attempt = self._next

    async def _prefill(self, pid: int, did: int) -> dict[str, Any] | None:
        core = self.core
        core.inflight[pid] += 1
        chunk = None
        try:
            chunk = await core.plane.prefill({**self.request, "router_rid": self.rid}, pid,
                                             core.s.transfer_timeout_s + core.s.prefill_call_extra_s)
        except Exception as e:  # noqa: BLE001 - prefill worker gone: the decode worker prefills
            log.warning("prefill on %d failed (%s): local prefill on %d", pid, e, did)
            core.mark_down(pid)
            chunk = None
        finally:
            core.inflight[pid] -= 1
            core.meter.prefill_done(self.rid, time.monotonic(), ok=isinstance(chunk, dict) and "kv_handle" in chunk)
        return chunk

    async def _decode(self, a: _Attempt, end: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One decode call; ``end`` gets done=True, or migrate=<chunk>, or error=<exception>."""
        core = self.core
        self.tried.add(a.worker)
        core.inflight[a.worker] += 1
        n_prompt = len(self.tokens)
        try:
            async for d in core.plane.decode(a.request, a.worker):
                if not isinstance(d, dict):
                    continue
                if "migrate" in d:  # the worker hands the request over (drain, rebalance)
                    end["migrate"] = d["migrate"]
                    return
                now = time.monotonic()
                core.meter.decode_chunk(self.rid, a.worker, now, len(d.get("token_ids") or ()))
                if "kv_transfer" in d:
                    rep = d["kv_transfer"] if isinstance(d["kv_transfer"], dict) else {}
                    self.rec["pull"] = {k: rep.get(k) for k in ("seconds", "bytes", "error") if k in rep}
                    d = core.feedback.observe(d, a.pulls_from, a.worker, now)
                if not self.first_sent:
                    core.metrics.ttft.observe(now - self.t0)
                    self.first_sent = True
                    self.rec["ttft_s"] = round(now - self.t0, 4)
                    self.rec["first_from"] = a.worker
                if a.worker in core.down:
                    core.mark_up(a.worker)
                if a.skip_first and d.get("token_ids"):
                    d = drop_first_token(d)
                    a.skip_first = False
                if a.offset and isinstance(d.get("completion_usage"), dict):
                    d = rerun_usage(d, n_prompt, a.offset)
                self.emitted.extend(int(t) for t in d.get("token_ids") or ())
                core.running[self.rid] = (a.worker, n_prompt + len(self.emitted))
                yield d
            self._outcome("recovered" if len(self.tried) > 1 and self.emitted else "ok")
            end["done"] = True
        except Exception as e:  # noqa: BLE001 - handled by _after, with the generic recovery
            end["error"] = e
            core.mark_down(a.worker)  # dead, draining or stopping: leave it out of the next choices
        finally:
            core.inflight[a.worker] -= 1
            core.meter.decode_done(self.rid)
            core.running.pop(self.rid, None)

    async def _after(self, a: _Attempt, end: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """What follows an attempt that did not finish: sets ``self._next`` (or not, when the stream ends)."""
        core, cur = self.core, a.worker
        err: Any = end.get("error")
        moved = end.get("migrate")
        if moved is not None:
            full = [int(t) for t in moved.get("tokens") or ()]
            seen = list(self.tokens) + self.emitted
            if full[: len(seen)] == seen and len(full) > len(seen):  # produced before the export, not yet streamed
                missing = full[len(seen):]
                self.emitted.extend(missing)
                yield {"token_ids": missing}
            target = core.migration_target(self.request, self.tokens, self.emitted, moved, cur, self.tried, self.rid)
            if target is not None and target[1] is None:  # nothing left to generate
                self._outcome("migrated")
                yield self._usage_end()
                return
            if target is not None:
                did, nreq, how = target
                assert nreq is not None
                moved_kv = how in ("move", "rebalance")  # the target pulls the KV, then repeats the last token
                log.info("request %s: decode worker %d %s after %d tokens: %s to %d", self.rid, cur,
                         "rebalances" if how == "rebalance" else "drains", len(self.emitted), how, did)
                self._next = _Attempt(did, {**nreq, "report_kv_transfer": True, "router_rid": self.rid}, None,
                                      skip_first=moved_kv,
                                      offset=len(self.emitted) - 1 if moved_kv else len(self.emitted))
                return
            err = RuntimeError(f"decode worker {cur} is draining and no other decode worker can take its requests")
        others = core.live([w for w in core.plane.decode_ids() if w not in self.tried])
        if not others:
            self._outcome("failed")
            what = "died mid-stream" if self.emitted else "failed"
            yield error_chunk(f"decode worker {cur} {what} ({err}) and no other decode worker is available",
                              len(self.tokens))
            return
        req = {k: v for k, v in a.request.items() if k not in ("kv_handle", "kv_peer_info")}
        if self.emitted:
            # recovery: re-run on another decode worker from the prompt + the tokens already streamed (a local
            # prefill there); greedy requests go on with exactly the tokens they would have had
            rerun = rerun_request(self.request, self.tokens, self.emitted)
            if rerun is None:  # nothing left to generate: close the stream as the worker would have
                self._outcome("recovered")
                yield self._usage_end()
                return
            log.warning("decode worker %d died after %d tokens (%s): re-running on %d from prompt + streamed tokens",
                        cur, len(self.emitted), err, others[0])
            req = {**rerun, "report_kv_transfer": True, "router_rid": self.rid}
        else:
            log.warning("decode on %d failed before its first token (%s): retrying on %d", cur, err, others[0])
        self._next = _Attempt(others[0], req, None, offset=len(self.emitted))


__all__ = ["DECODE_STEP_S", "LINK", "LinkFeedback", "PREFILL_TOKENS_PER_S", "Route", "RouterCore", "RouterPlane",
           "RouterSettings", "StreamSession", "WorkerInfo", "layout_key", "node_of"]
