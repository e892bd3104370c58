"""Aggregated vs disaggregated serving on several GPUs without the Dynamo runtime (``bench serve-direct``).

    dynamo-ext bench serve-direct                                    # CPU, tiny, 1P+1D vs 2 agg (~1 min)
    # 4x H200, closed loop (~2 min; the committed serve-direct-4xH200-llama3-70b-shape-8l.* ran
    # --graphs agg:4,disagg:2p2d,disagg:3p1d,disagg:1p3d --requests 128 --warmup 2; start-up 4-5 s per graph):
    python3 -m dynamo_ext.bench.serve_direct --device cuda --preset llama3-70b-shape --layers 8 \
        --graphs agg:4,disagg:2p2d --prompt-lens 512,2048,4096 --requests 96 --concurrency 32 --output-len 64
    # low-load KV share of TTFT (issue #5 target, 4K prompts on NVLink): --concurrency 1 --requests 16
    # issue #5 "several request rates" (one ~600 s call; estimate ~200 s: start-up ~5 s per graph, cells
    # from the committed run's req/s; env on the GPU machine: PYTHONPATH=/tmp/site:$PWD):
    python3 -m dynamo_ext.bench.serve_direct --device cuda --preset llama3-70b-shape --layers 8 \
        --graphs agg:4,disagg:2p2d --prompt-lens 512,2048,4096 --requests 96 --concurrency 32 \
        --rates closed,8,16,32 --output-len 64 --request-timeout-s 90 --startup-timeout-s 120 --deadline-s 540 \
        --out benchmarks/results/serve-direct-4xH200-llama3-70b-shape-8l-rates
    # (--deadline-s: no cell starts after 540 s; SIGTERM prints the partial table; JSON written after every cell)
    # smoke (~1 min): same graphs and prompt lengths, --quick (16 requests x 16 tokens per cell, warm-up 1)
    python3 -m dynamo_ext.bench.serve_direct --device cuda --preset llama3-70b-shape --layers 8 \
        --graphs agg:4,disagg:2p2d --prompt-lens 512,2048,4096 --quick --out /tmp/serve-direct-quick

What it is: the serving core of the product (``dynamo_ext.serving``: ``ServingWorker`` in each worker
process, ``RouterCore`` + one ``StreamSession`` per request in this coordinator, ``WorkerTransports`` picking
the transport per pair from the topology) with the Dynamo request plane replaced by JSON lines on the
workers' stdin/stdout (``dynamo_ext/bench/direct_worker.py``, protocol in its docstring; the coordinator's
``DirectRouterPlane`` answers the workers' calls and feeds their KV events into the same ``KvEventIndexer``
the Dynamo router uses). Lines of the product this path does NOT run: the Dynamo adapters in
``dynamo_ext/workers/`` (endpoints, etcd records, NATS KV events and FPM/KV-usage publishers,
``DynamoWorkerPlane`` / ``DynamoRouterPlane``), Dynamo's frontend (HTTP, tokenization, detokenization) and
its request plane. ``bench serve`` runs those (``"runtime": "dynamo"`` in its results; ``"direct"`` here).

Graphs (``--graphs``, comma-separated):
  ``agg:N``      N aggregated workers (device i = GPU i), each request prefilled and decoded on one worker,
                 chosen by the router core's policy.
  ``disagg:XpYd`` X prefill workers (GPUs 0..X-1) + Y decode workers (GPUs X..X+Y-1); per request the router
                 core's session: prefill (the worker holds the blocks), the decode worker pulls the KV over
                 the backend select_transport picks (device pools: ``cuda_ipc``; host pools: ``cma``), asks
                 the holder to release, streams the tokens.

Load per (graph, prompt length): ``--requests`` prompts of random token ids (seeded; the same prompts for
every graph, no prefix-cache hits), ``--output-len`` tokens each (greedy, EOS ignored); closed loop with
``--concurrency`` requests in flight (``--rate R`` instead: Poisson arrivals at R req/s; ``--rates
closed,8,16``: one row per load on the same warm workers, fresh prompts per load so that no load hits the
previous one's prefix cache). Before measuring,
every worker serves ``--warmup`` requests of each prompt length (CUDA/Triton warm-up).

Metrics: TTFT = the session's first chunk (after the pull in disagg) - request issued;
TPOT = (done - first) / (tokens - 1); requests/s and output tokens/s over the window from the first issue to
the last completion; output tokens/s per GPU (all GPUs of the graph); KV transfer: mean pull seconds, its
share of the mean TTFT, GB/s per (prefill, decode) pair next to the backend and path that moved the bytes
(the decode worker's pull report) and the GB/s that ``topology.select_transport`` expected for the pair;
prefix hit rate from the engines' own counters (cached / prefilled prompt tokens over the cell). ``--verify``: greedy tokens of every disagg request
equal the agg graph's for the same prompt (asserted on CPU where numerics are batch-independent; on GPU
the match fraction is reported: bf16 results depend on the batch a request shares).

Writes benchmarks/results/serve-direct-<machine tag (4xH200, cpu)>-<preset>[-<layers>l].{json,md,png} (or --out) incrementally (nothing lost if a later cell
fails or the time limit hits) and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import logging
import os
import platform
import random
import signal
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import msgspec

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench._machine import cpu_model, machine_tag
from dynamo_ext.bench._stats import pct

log = logging.getLogger("dynamo_ext.bench.serve_direct")

POLICIES = ("least-loaded", "round-robin", "dynamo-ext")  # serving.router.POLICIES


class GraphSpecError(ValueError):
    pass


@dataclass(frozen=True)
class GraphSpec:
    kind: str  # agg | disagg
    prefill: int
    decode: int  # agg: the number of aggregated workers

    @property
    def label(self) -> str:
        return f"agg-{self.decode}" if self.kind == "agg" else f"disagg-{self.prefill}p{self.decode}d"

    @property
    def gpus(self) -> int:
        return self.prefill + self.decode

    @classmethod
    def parse(cls, text: str) -> "GraphSpec":
        t = text.strip().lower()
        kind, _, rest = t.partition(":")
        try:
            if kind == "agg":
                n = int(rest or "1")
                if n >= 1:
                    return cls("agg", 0, n)
            elif kind == "disagg":
                p, _, d = (rest or "1p1d").rstrip("d").partition("p")
                if int(p) >= 1 and int(d) >= 1:
                    return cls("disagg", int(p), int(d))
        except ValueError:
            pass
        raise GraphSpecError(f"--graphs: {text!r} is not agg:N or disagg:XpYd (e.g. agg:4, disagg:2p2d)")


# -- worker processes ---------------------------------------------------------------------------------
EVENT_DECODER = msgspec.json.Decoder(dict[str, Any])


class WorkerDied(RuntimeError):
    pass


class WorkerProc:
    """One ``direct_worker`` process: commands in, events routed to per-request queues, its calls answered."""

    def __init__(self, wid: int, name: str, role: str, device: str, args: argparse.Namespace, log_dir: Path,
                 graph: "Graph") -> None:
        self.wid, self.name, self.role, self.device, self.a, self.graph = wid, name, role, device, args, graph
        self.log_path = log_dir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.dead: str | None = None
        self._seq = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self._ready_fut: asyncio.Future[dict[str, Any]] | None = None

    def argv(self, num_blocks: int) -> list[str]:
        a = self.a
        out = [sys.executable, "-m", "dynamo_ext.bench.direct_worker", "--role", self.role, "--worker-id", str(self.wid),
               "--name", self.name, "--device", self.device, "--preset", a.preset, "--num-blocks", str(num_blocks),
               "--block-size", str(a.block_size), "--transport", a.transport,
               "--transfer-timeout-s", str(a.transfer_timeout_s), "--seed", str(a.seed)]
        if a.layers:
            out += ["--layers", str(a.layers)]
        if a.dtype:
            out += ["--dtype", a.dtype]
        if a.no_nixl:
            out += ["--no-nixl"]
        return out

    async def start(self, num_blocks: int) -> None:
        env = dict(os.environ)
        env.setdefault("UCX_NET_DEVICES", "lo")
        pkg_root = str(Path(__file__).resolve().parents[2])  # the checkout or site-packages holding dynamo_ext
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(*self.argv(num_blocks), stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, stderr=self._log,
                                                         env=env, limit=1 << 26)
        self._ready_fut = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        assert self._ready_fut is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready_fut), timeout)
        except asyncio.TimeoutError:
            raise WorkerDied(f"{self.name} not ready after {timeout:.0f} s; last log lines:\n{self.tail()}") from None

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in lines[-n:])

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                ev = EVENT_DECODER.decode(line)
            except msgspec.DecodeError:
                continue
            kind = ev.get("ev")
            if kind == "ready":
                if self._ready_fut and not self._ready_fut.done():
                    self._ready_fut.set_result(ev)
            elif kind == "kv":
                self.graph.plane.apply_kv(self.wid, ev.get("events") or [])
            elif kind == "call":
                asyncio.get_running_loop().create_task(self.graph.plane.answer(self, ev))
            else:
                q = self.queues.get(str(ev.get("rid")))
                if q is not None:
                    q.put_nowait(ev)
        rc = await self.proc.wait()
        self.dead = f"worker {self.name} ({self.role}, {self.device}, pid {self.proc.pid}) exited with code {rc}"
        if self._ready_fut and not self._ready_fut.done():
            self._ready_fut.set_exception(WorkerDied(f"{self.dead} before it was ready; last log lines:\n{self.tail()}"))
        for q in self.queues.values():
            q.put_nowait({"ev": "end", "error": self.dead})

    def send(self, cmd: dict[str, Any]) -> None:
        if self.dead or self.proc is None or self.proc.stdin is None:
            raise WorkerDied(self.dead or f"worker {self.name} is not running")
        self.proc.stdin.write(msgspec.json.encode(cmd) + b"\n")

    async def stream(self, op: str, timeout: float, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """Send one command; yield its chunks until its end (raise on an error end or a timeout)."""
        rid = f"{op}-{next(self._seq)}"
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues[rid] = q
        try:
            if self.dead:
                raise WorkerDied(self.dead)
            self.send({"op": op, "rid": rid, **fields})
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"{op} on {self.name}: nothing for {timeout:.0f} s") from None
                if ev.get("ev") == "chunk":
                    yield ev["chunk"]
                elif ev.get("ev") == "result":
                    yield ev.get("value")
                    return
                elif ev.get("ev") == "end":
                    if ev.get("error"):
                        raise RuntimeError(f"{op} on {self.name}: {ev['error']}")
                    return
        finally:
            self.queues.pop(rid, None)

    async def call(self, op: str, timeout: float, **fields: Any) -> Any:
        async for v in self.stream(op, timeout, **fields):
            return v
        return None

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.send({"op": "shutdown"})
                await asyncio.wait_for(self.proc.wait(), timeout)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except Exception:  # noqa: BLE001
                self._reader.cancel()
        self._log.close()


class DirectRouterPlane:
    """``serving.RouterPlane`` over the worker processes' JSON lines; the workers' calls (release, decode
    peers) answered here; their KV events into one ``kv.KvEventIndexer``. Raw decode chunks pass through
    ``observe`` first (the bench's per-request view of the pull reports the core pops)."""

    def __init__(self, g: "Graph") -> None:
        self.g = g
        self.indexer: Any = None
        try:
            from dynamo_ext.kv.indexer import KvEventIndexer  # noqa: PLC0415

            self.indexer = KvEventIndexer(g.a.block_size)
        except Exception as e:  # noqa: BLE001 - Dynamo's RadixTree absent: no prefix scores (policy dynamo-ext)
            log.warning("no prefix index (%s): overlap scores are 0", e)
        self.pulls: dict[str, dict[str, Any]] = {}  # router rid -> the decode worker's pull report
        self.prefill_s: dict[str, float] = {}
        self.handle_blocks: dict[str, int] = {}  # router rid -> blocks of the KV handle the prefill returned

    def _live(self, ws: list[WorkerProc]) -> list[int]:
        return [w.wid for w in ws if not w.dead]

    def prefill_ids(self) -> list[int]:
        return self._live(self.g.prefill)

    def decode_ids(self) -> list[int]:
        return self._live(self.g.decode)

    def info(self, role: str, worker: int) -> Any:
        from dynamo_ext.serving import WorkerInfo  # noqa: PLC0415

        r = self.g.by_id[worker].ready
        topo = r.get("topology") or {}
        gpu = topo.get("worker_gpu")
        return WorkerInfo(kv_layout=r.get("layout") or {}, topology=topo, started_at=float(r.get("pid", 0)),
                          device=gpu if isinstance(gpu, int) else None)

    def overlap(self, tokens: list[int]) -> dict[int, int]:
        return self.indexer.scores(tokens) if self.indexer is not None else {}

    def apply_kv(self, wid: int, events: list[dict[str, Any]]) -> None:
        if self.indexer is not None:
            for ev in events:
                try:
                    self.indexer.apply_event(wid, ev)
                except Exception as e:  # noqa: BLE001 - as the Dynamo router: a bad event is logged, not fatal
                    log.debug("KV event of %d not applied: %s", wid, e)

    async def prefill(self, request: dict[str, Any], worker: int, timeout_s: float) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        out = await self.g.by_id[worker].call("prefill", timeout_s, request=request)
        rr = str(request.get("router_rid", ""))
        self.prefill_s[rr] = time.perf_counter() - t0
        if isinstance(out, dict) and isinstance(out.get("kv_handle"), dict):
            self.handle_blocks[rr] = len(out["kv_handle"].get("block_ids") or ())
        return out

    async def decode(self, request: dict[str, Any], worker: int) -> AsyncIterator[dict[str, Any]]:
        rr = str(request.get("router_rid", ""))
        async for chunk in self.g.by_id[worker].stream("generate", self.g.timeout, request=request):
            if isinstance(chunk, dict) and "kv_transfer" in chunk and "error" not in chunk["kv_transfer"]:
                self.pulls[rr] = {**chunk["kv_transfer"], "decode": worker}
            yield chunk

    async def export(self, worker: int, router_rids: list[str], timeout_s: float) -> list[str]:
        return list(await self.g.by_id[worker].call("export", timeout_s, router_rids=router_rids) or [])

    async def answer(self, w: WorkerProc, ev: dict[str, Any]) -> None:
        """A worker's plane call: release a handle on its holder, or count the other decode workers."""
        cid = ev.get("cid")
        try:
            if ev.get("op") == "release":
                value: Any = bool(await self.g.by_id[int(ev["worker_id"])].call("release", 10.0,
                                                                                 handle_id=str(ev["handle_id"])))
            elif ev.get("op") == "decode_peers":
                value = len([d for d in self.decode_ids() if d != w.wid])
            else:
                raise ValueError(f"unknown call {ev.get('op')!r}")
            w.send({"op": "reply", "cid": cid, "value": value})
        except Exception as e:  # noqa: BLE001 - the worker sees the error
            try:
                w.send({"op": "reply", "cid": cid, "error": f"{type(e).__name__}: {e}"})
            except WorkerDied:
                pass


# -- one graph ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    i: int
    issued: float
    first: float = 0.0
    done: float = 0.0
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    pull: dict[str, Any] | None = None
    pair: tuple[str, str] | None = None
    pulled_blocks: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    predicted_overlap: int = 0  # what the router's prefix index predicted (tokens)
    reason: str = ""


class Graph:
    """The worker processes of one graph and a ``serving.RouterCore`` over them (the same router core as the
    Dynamo router component); each request is one ``StreamSession``."""

    def __init__(self, spec: GraphSpec, args: argparse.Namespace, log_dir: Path) -> None:
        self.spec, self.a = spec, args
        dev = (lambda i: f"cuda:{i}") if args.device == "cuda" else (lambda i: "cpu")
        wid = itertools.count(1)
        if spec.kind == "agg":
            self.prefill: list[WorkerProc] = []
            self.decode = [WorkerProc(next(wid), f"agg-{i}", "agg", dev(i), args, log_dir, self)
                           for i in range(spec.decode)]
        else:
            self.prefill = [WorkerProc(next(wid), f"prefill-{i}", "prefill", dev(i), args, log_dir, self)
                            for i in range(spec.prefill)]
            self.decode = [WorkerProc(next(wid), f"decode-{j}", "decode", dev(spec.prefill + j), args, log_dir, self)
                           for j in range(spec.decode)]
        self.workers = self.prefill + self.decode
        self.by_id = {w.wid: w for w in self.workers}
        self.plane = DirectRouterPlane(self)
        self.core: Any = None
        self.pairs: dict[str, dict[str, Any]] = {}
        self.startup_s = 0.0
        self.policy = "least-loaded"  # amain sets it per run (--policies)
        self.label = spec.label
        self.timeout = args.request_timeout_s
        self.num_blocks: dict[str, int] = {}

    async def start(self, num_blocks: int, timeout: float, cache_blocks: int | None = None) -> None:
        """``cache_blocks``: KV blocks of the workers that prefill from their cache (prefill, agg), when the
        prefix cache should be smaller than the working set (shared-prefix runs); decode: ``num_blocks``."""
        from dynamo_ext.metrics import NullMetrics  # noqa: PLC0415
        from dynamo_ext.serving import RouterCore, RouterSettings  # noqa: PLC0415
        from dynamo_ext.transport import KvLayout  # noqa: PLC0415

        t0 = time.perf_counter()
        for w in self.workers:
            self.num_blocks[w.name] = cache_blocks if cache_blocks and w.role in ("prefill", "agg") else num_blocks
            await w.start(self.num_blocks[w.name])
        for w in self.workers:
            w.ready = await w.wait_ready(timeout)
        for d in self.decode if self.prefill else []:  # the decode workers' plane.peer(handle) table
            for p in self.prefill:
                d.send({"op": "peer", "worker_id": p.wid, "transports": p.ready["transports"]})
        self.startup_s = time.perf_counter() - t0
        lay = KvLayout.from_dict(self.workers[0].ready["layout"])
        self.core = RouterCore(RouterSettings(
            policy=self.policy, block_size=self.a.block_size, num_layers=lay.num_layers,
            kv_bytes_per_token=lay.block_bytes // lay.block_size, decode_num_blocks=num_blocks,
            disagg_min_prompt_tokens=0, transfer_timeout_s=self.a.transfer_timeout_s, force=self.a.transport,
            decode_role="agg" if self.spec.kind == "agg" else "decode",
            prefill_call_extra_s=self.a.request_timeout_s), self.plane, NullMetrics())  # measured per request here
        self.pairs = describe_pairs(self)

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    async def serve(self, i: int, prompt: list[int], out_len: int, issued: float, timeout: float) -> Outcome:
        from dynamo_ext.serving import StreamSession  # noqa: PLC0415

        o = Outcome(i, issued, prompt_tokens=len(prompt))
        req = {"token_ids": prompt, "stop_conditions": {"max_tokens": out_len, "ignore_eos": True},
               "sampling_options": {"temperature": 0.0}}
        s = StreamSession(self.core, req)
        self.timeout = timeout
        try:
            async for chunk in s.run():
                if o.first == 0.0:
                    o.first = time.perf_counter()
                o.tokens.extend(int(t) for t in chunk.get("token_ids") or ())
                fr = str(chunk.get("finish_reason") or "")
                if fr.startswith("error"):
                    o.error = chunk.get("error") or fr
            o.done = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - one request's failure is a result, not a crash
            o.error = f"{type(e).__name__}: {e}"
        r = s.route
        if r is not None:
            o.reason = r.reason
            o.predicted_overlap = r.overlap_blocks * self.a.block_size
            pull = self.plane.pulls.pop(s.rid, None)
            o.prefill_s = self.plane.prefill_s.pop(s.rid, 0.0)
            handed = self.plane.handle_blocks.pop(s.rid, 0)
            if pull is not None and r.prefill is not None:
                o.pull = pull
                o.pair = (self.by_id[r.prefill].name, self.by_id[pull["decode"]].name)
                o.pulled_blocks = handed  # the pull reads them all unless the decode worker's cache holds some
        return o

    async def counters(self) -> dict[str, dict[str, Any]]:
        """Each worker's engine counters (prefills, prompt and cached tokens) and pool state."""
        out: dict[str, dict[str, Any]] = {}
        for w in self.workers:
            try:
                out[w.name] = dict(await w.call("stats", 10.0) or {})
            except Exception as e:  # noqa: BLE001
                out[w.name] = {"error": str(e)}
        return out


def describe_pairs(g: Graph) -> dict[str, dict[str, Any]]:
    """What topology.select_transport chooses for every (prefill, decode) pair of the graph (the side that
    pulls first), with the backends the two workers run."""
    out: dict[str, dict[str, Any]] = {}
    if not g.prefill:
        return out
    from dynamo_ext.serving import PeerTransports  # noqa: PLC0415
    from dynamo_ext.topology.select import select_transport  # noqa: PLC0415

    for p in g.prefill:
        for d in g.decode:
            key = f"{p.name}->{d.name}"
            try:
                tp = PeerTransports.decode(base64.b64decode(p.ready["transports"]))
                td = PeerTransports.decode(base64.b64decode(d.ready["transports"]))
                c = select_transport(td.endpoint(), tp.endpoint(), g.a.transport)
                out[key] = {"kind": c.kind, "backends": [b for b in c.backends if b in tp.backends and b in td.backends],
                            "expected_gbps": c.expected_gbps, "devices": f"{p.device}->{d.device}"}
            except Exception as e:  # noqa: BLE001
                out[key] = {"kind": "?", "error": f"{type(e).__name__}: {e}", "devices": f"{p.device}->{d.device}"}
    return out


# -- load -------------------------------------------------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int, *, prefixes: int = 0, prefix_frac: float = 0.75,
                 block_size: int = 16) -> list[list[int]]:
    """``n`` prompts of ``length`` random tokens (seeded). ``prefixes`` > 0: each prompt is one of that many
    shared prefixes (``prefix_frac`` of the length, whole blocks; picked uniformly) + a unique suffix."""
    rng = random.Random(seed * 1_000_003 + length)
    lo = 3 if vocab > 16 else 0
    if prefixes <= 0:
        return [[rng.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]
    plen = max(block_size, int(length * prefix_frac) // block_size * block_size)
    shared = [[rng.randrange(lo, vocab) for _ in range(plen)] for _ in range(prefixes)]
    return [shared[rng.randrange(prefixes)] + [rng.randrange(lo, vocab) for _ in range(length - plen)] for _ in range(n)]


async def run_load(g: Graph, prompts: list[list[int]], out_len: int, concurrency: int, rate: float | None,
                   timeout: float, progress: Any = None) -> tuple[list[Outcome], float, float]:
    t_start = time.perf_counter()
    outs: list[Outcome] = []
    if rate:
        rng = random.Random(7)
        tasks = []
        at = 0.0
        for i, pr in enumerate(prompts):
            await asyncio.sleep(max(0.0, t_start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(g.serve(i, pr, out_len, time.perf_counter(), timeout)))
            at += rng.expovariate(rate)
        for t in asyncio.as_completed(tasks):
            outs.append(await t)
            if progress:
                progress.update(1)
    else:
        todo = deque(enumerate(prompts))

        async def lane() -> None:
            while todo:
                i, pr = todo.popleft()
                outs.append(await g.serve(i, pr, out_len, time.perf_counter(), timeout))
                if progress:
                    progress.update(1)

        await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))
    return outs, t_start, time.perf_counter()


def block_bytes_of(g: Graph) -> int | None:
    """Bytes of one KV block from the layout the decode worker reported (all layers, K and V)."""
    try:
        from dynamo_ext.transport.layout import KvLayout  # noqa: PLC0415

        return int(KvLayout.from_dict(g.decode[0].ready["layout"]).block_bytes)
    except Exception:  # noqa: BLE001 - reported as missing, never fatal
        return None


def _hit_rate(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> float | None:
    """Prompt tokens served from the prefix cache / prompt tokens prefilled, over every worker's engine
    counters (the engines' own numbers, differences over the cell)."""
    def tot(d: dict[str, dict[str, Any]], k: str) -> float:
        return sum(float(v.get(k) or 0) for v in d.values())

    prompt = tot(after, "prefill_prompt_tokens") - tot(before, "prefill_prompt_tokens")
    return (tot(after, "prefill_cached_tokens") - tot(before, "prefill_cached_tokens")) / prompt if prompt > 0 else None


def summarize(g: Graph, plen: int, outs: list[Outcome], t0: float, t1: float, a: argparse.Namespace,
              rate: float | None = None, before: dict[str, dict[str, Any]] | None = None,
              after: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    ok = [o for o in outs if o.error is None]
    ttft = [o.first - o.issued for o in ok]
    tpot = [(o.done - o.first) / (len(o.tokens) - 1) for o in ok if len(o.tokens) > 1]
    last = max((o.done for o in ok), default=t1)
    win = max(last - t0, 1e-9)
    ntok = sum(len(o.tokens) for o in ok)
    r: dict[str, Any] = {
        "graph": g.label, "topology": g.spec.label, "policy": g.policy, "workload": a.workload,
        "kind": g.spec.kind, "gpus": g.spec.gpus if a.device == "cuda" else 0,
        "workers": len(g.workers), "prefill_workers": len(g.prefill), "decode_workers": len(g.decode),
        "prompt_len": plen, "output_len": a.output_len, "requests": len(outs), "completed": len(ok),
        "errors": sorted({o.error for o in outs if o.error})[:5],
        "concurrency": None if rate else a.concurrency, "rate": rate, "window_s": round(win, 4),
        "requests_per_s": len(ok) / win, "output_tok_s": ntok / win,
        "output_tok_s_per_gpu": ntok / win / max(1, len(g.workers)),
        "decode_tok_s_per_decode_worker": ntok / win / max(1, len(g.decode)),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99),
    }
    ptoks = sum(o.prompt_tokens for o in ok)
    r["prefix_hit_rate"] = _hit_rate(before or {}, after or {})
    r["predicted_hit_rate"] = sum(min(o.predicted_overlap, o.prompt_tokens) for o in ok) / ptoks if ptoks else None
    r["kv_bytes_moved"] = sum(int(o.pull["bytes"]) for o in ok if o.pull)
    r["decisions"] = dict(sorted(Counter(o.reason for o in ok).items()))
    r["local_prefills"] = sum(1 for o in ok if o.pair is None) if g.prefill else None
    pulls = [o for o in ok if o.pull]
    if pulls:
        secs = [o.pull["seconds"] for o in pulls]
        r["kv_pulls"] = len(pulls)
        r["kv_bytes_per_request"] = statistics.fmean(o.pull["bytes"] for o in pulls)
        # what the layout says the pulled blocks hold: the transfer must have moved exactly that
        bb = block_bytes_of(g)
        r["kv_block_bytes"] = bb
        r["kv_bytes_total"] = sum(int(o.pull["bytes"]) for o in pulls)
        r["kv_bytes_expected_total"] = None if bb is None else bb * sum(o.pulled_blocks for o in pulls)
        r["kv_descriptors_per_request"] = statistics.fmean(o.pull["descriptors"] for o in pulls)
        r["kv_transfer_mean_s"] = statistics.fmean(secs)
        r["kv_transfer_p50_s"] = pct(secs, 0.5)
        r["kv_share_of_ttft"] = r["kv_transfer_mean_s"] / r["ttft_mean_s"] if r["ttft_mean_s"] else None
        r["prefill_mean_s"] = statistics.fmean(o.prefill_s for o in pulls)
        pair_stats: dict[str, dict[str, Any]] = {}
        for o in pulls:
            assert o.pair is not None and o.pull is not None
            k = f"{o.pair[0]}->{o.pair[1]}"
            ps = pair_stats.setdefault(k, {"gbps": [], "path": o.pull.get("path"), "backend": o.pull.get("backend")})
            ps["gbps"].append(o.pull["bytes"] / max(o.pull["seconds"], 1e-12) / 1e9)
        r["pairs"] = {k: {**g.pairs.get(k, {}), "measured_gbps_p50": pct(v["gbps"], 0.5), "transfers": len(v["gbps"]),
                          "path": v["path"], "transfer_backend": v["backend"]} for k, v in sorted(pair_stats.items())}
    return r


def verify(results_tokens: dict[str, dict[tuple[int, int, int], list[int]]]) -> dict[str, Any]:
    """Greedy outputs of every graph against the first agg graph's, per (prompt length, prompt index)."""
    ref_label = next((k for k in results_tokens if k.startswith("agg")), None)
    out: dict[str, Any] = {"reference": ref_label, "graphs": {}}
    if ref_label is None:
        return out
    ref = results_tokens[ref_label]
    for label, toks in results_tokens.items():
        if label == ref_label:
            continue
        keys = [k for k in toks if k in ref]
        same = sum(1 for k in keys if toks[k] == ref[k])
        first_diff = next(({"prompt_len": k[0], "load": k[1], "index": k[2], "graph": toks[k][:12], "reference": ref[k][:12]}
                           for k in keys if toks[k] != ref[k]), None)
        out["graphs"][label] = {"compared": len(keys), "equal": same, "first_difference": first_diff}
    return out


# -- reporting --------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                            "device": device, "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        import torch  # noqa: PLC0415

        info["torch"] = torch.__version__
        if device == "cuda" and torch.cuda.is_available():
            n = torch.cuda.device_count()
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    try:
        from dynamo_ext.topology import collect_local_topology  # noqa: PLC0415

        t = collect_local_topology(None)
        info["nvlink"] = {str(g.index): sorted(g.nvlink_peers) for g in t.gpus} if t.gpus else {}
    except Exception as e:  # noqa: BLE001
        info["topology_error"] = str(e)
    return info


def result_stem(a: argparse.Namespace, m: dict[str, Any]) -> Path:
    """--out, else benchmarks/results/serve-direct-<machine tag>-<preset>[-<layers>l]."""
    if a.out:
        return Path(a.out)
    return results_dir() / (f"serve-direct-{machine_tag(m)}-{a.preset}" + (f"-{a.layers}l" if a.layers else ""))


def machine_line(m: dict[str, Any]) -> str:
    gpus = m.get("gpus")
    g = f"{len(gpus)}x {gpus[0]} ({m.get('gpu_memory_gib')} GiB)" if gpus else "no GPU"
    return f"{g}; CPU {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m.get('torch')}; load avg {m['load_avg_1m']}"


def _f(x: Any, scale: float = 1.0, nd: int = 1) -> str:
    return "-" if x is None else f"{x * scale:,.{nd}f}"


def load_label(r: dict[str, Any]) -> str:
    return f"Poisson {r['rate']:g} req/s" if r.get("rate") else f"closed, {r.get('concurrency')} in flight"


def markdown(res: dict[str, Any]) -> str:
    p, m = res["params"], res["machine"]
    lines = [f"# Serving without the Dynamo runtime: agg vs disagg ({p['preset']}, {p['layers'] or 'all'} layers, {m['device']})", "",
             f"Machine: {machine_line(m)}.", "",
             f"Load per cell: {p['requests']} requests, output {p['output_len']} tokens (greedy, EOS ignored), "
             + "load per row (Poisson arrivals at the req/s given, or closed loop with the number in flight)"
             + f"; warm-up {p['warmup']} per worker and prompt length. Command: `{p['command']}`.", "",
             "| graph | prompt | done | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | out tok/s | out tok/s per GPU | KV pull ms (mean) | KV share of TTFT | KV MiB/req | descs/req | TPOT p99 ms | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["results"]:
        lines.append(f"| {r['graph']} | {r['prompt_len']} | {r['completed']}/{r['requests']} | {_f(r['requests_per_s'], nd=2)} | "
                     f"{_f(r['ttft_p50_s'], 1e3)} | {_f(r['ttft_p99_s'], 1e3)} | {_f(r['tpot_p50_s'], 1e3, 2)} | "
                     f"{_f(r['output_tok_s'], nd=0)} | {_f(r['output_tok_s_per_gpu'], nd=0)} | "
                     f"{_f(r.get('kv_transfer_mean_s'), 1e3, 2)} | {_f(r.get('kv_share_of_ttft'), 100, 2)}{'%' if r.get('kv_share_of_ttft') is not None else ''} | "
                     f"{_f(r.get('kv_bytes_per_request'), 1 / 2**20, 1)} | {_f(r.get('kv_descriptors_per_request'), nd=0)} | "
                     f"{_f(r.get('tpot_p99_s'), 1e3, 2)} | {load_label(r)} |")
    if len({r.get("policy") for r in res["results"]}) > 1 or p.get("workload") == "shared-prefix":
        lines += ["", f"Routing ({p.get('workload')} workload): prefix hit = cached prompt tokens on the worker that "
                  "prefilled / prompt tokens (measured there); predicted = what the coordinator's KV-event index "
                  "expected; KV moved = bytes pulled by decode workers.", "",
                  "| graph / policy | prompt | TTFT p50 ms | TTFT p99 ms | req/s | prefix hit | predicted | KV MiB moved | local prefills | decisions |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["results"]:
            dec = ", ".join(f"{k} {v}" for k, v in (r.get("decisions") or {}).items())
            lines.append(f"| {r['graph']} | {r['prompt_len']} | {_f(r['ttft_p50_s'], 1e3)} | {_f(r['ttft_p99_s'], 1e3)} | "
                         f"{_f(r['requests_per_s'], nd=2)} | {_f(r.get('prefix_hit_rate'), 100, 1)}% | "
                         f"{_f(r.get('predicted_hit_rate'), 100, 1)}% | {_f(r.get('kv_bytes_moved'), 1 / 2**20, 1)} | "
                         f"{r.get('local_prefills') if r.get('local_prefills') is not None else '-'} | {dec} |")
    pairs = {}
    several_loads = len({load_label(r) for r in res["results"]}) > 1
    for r in res["results"]:
        for k, v in (r.get("pairs") or {}).items():
            cell = f"{r['prompt_len']} @ {r['rate']:g}/s" if several_loads and r.get("rate") else r["prompt_len"]
            pairs.setdefault((r["graph"], k), []).append((cell, v))
    if pairs:
        lines += ["", "Transfer path per (prefill, decode) pair (topology.select_transport; measured = median GB/s of the pulls):", "",
                  "| graph | pair | devices | topology kind | expected GB/s | transfer backend / path | measured GB/s by prompt length |",
                  "|---|---|---|---|---:|---|---|"]
        for (gl, k), vs in sorted(pairs.items()):
            v0 = vs[0][1]
            meas = ", ".join(f"{pl}: {_f(v.get('measured_gbps_p50'), nd=1)}" for pl, v in vs)
            lines.append(f"| {gl} | {k} | {v0.get('devices', '')} | {v0.get('kind', '?')} "
                         f"({'>'.join(v0.get('backends') or [])}) | {_f(v0.get('expected_gbps'), nd=0)} | "
                         f"{v0.get('transfer_backend')} / {v0.get('path')} | {meas} |")
    if res.get("verify"):
        v = res["verify"]
        for gl, s in v.get("graphs", {}).items():
            lines.append("")
            lines.append(f"Greedy outputs {gl} vs {v['reference']}: {s['equal']}/{s['compared']} equal token for token"
                         + (f" (first difference: {s['first_difference']})" if s.get("first_difference") else "") + ".")
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in res.get("startup_s", {}).items())
    lines += ["", f"Start-up (processes, model init, pool registration): {starts}."]
    for f in res.get("failures", []):
        lines += ["", f"FAILED {f['graph']}: {f['error'].splitlines()[0] if f['error'] else ''}"]
    if res.get("skipped"):
        lines += ["", "Skipped (deadline): " + ", ".join(f"{x['graph']} {x['cell']}" for x in res["skipped"]) + "."]
    if res.get("interrupted"):
        lines += ["", "INTERRUPTED (signal): the rows above are the cells that completed."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - the JSON and markdown are the record; the PNG is a view of them
        return
    several = len({load_label(r) for r in res["results"]}) > 1

    def series(r: dict[str, Any]) -> str:
        return f"{r['graph']} {load_label(r)}" if several else r["graph"]

    graphs = list(dict.fromkeys(series(r) for r in res["results"]))
    lens = sorted({r["prompt_len"] for r in res["results"]})
    fig, axs = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(1, len(graphs))
    for gi, gl in enumerate(graphs):
        rs = {r["prompt_len"]: r for r in res["results"] if series(r) == gl}
        xs = [li + gi * width for li in range(len(lens))]
        for ax, key, scale in ((axs[0], "requests_per_s", 1), (axs[1], "ttft_p50_s", 1e3), (axs[2], "output_tok_s_per_gpu", 1)):
            ax.bar(xs, [(rs[pl].get(key) or 0) * scale if pl in rs else 0 for pl in lens], width, label=gl)
    for ax, t in zip(axs, ("requests/s", "TTFT p50 (ms)", "output tokens/s per GPU")):
        ax.set_title(t)
        ax.set_xticks([li + width * (len(graphs) - 1) / 2 for li in range(len(lens))])
        ax.set_xticklabels([str(pl) for pl in lens])
        ax.set_xlabel("prompt tokens")
        ax.legend(fontsize=8)
    p = res["params"]
    fig.suptitle(f"{p['preset']} ({p['layers'] or 'all'} layers) on {machine_line(res['machine'])[:110]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))


# -- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench serve-direct", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="tiny", help="model preset (random weights of that shape)")
    ap.add_argument("--layers", type=int, default=None, help="model layers (default: the preset's)")
    ap.add_argument("--dtype", default=None, help="weights and KV dtype (default: the preset's)")
    ap.add_argument("--graphs", default="agg:2,disagg:1p1d",
                    help="graphs to compare, comma-separated: agg:N (N aggregated workers), disagg:PpDd (P prefill, "
                         "D decode)")
    ap.add_argument("--prompt-lens", default="64,256", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--requests", type=int, default=16, help="requests per (graph, prompt length, load) point")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (closed loop)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals (req/s) instead of a closed loop")
    ap.add_argument("--rates", default=None,
                    help="several loads per cell, comma-separated: req/s for Poisson arrivals, 'closed' for the "
                         "closed loop at --concurrency (e.g. closed,4,16)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="total time budget: no cell starts after it, request bounds never run past it "
                         "(e.g. 540 under a 600 s limit); skipped cells are listed in the JSON")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: at most 16 requests and 16 output tokens per cell, warm-up 1")
    ap.add_argument("--output-len", type=int, default=16, help="output tokens per request")
    ap.add_argument("--warmup", type=int, default=1, help="requests per worker and prompt length before measuring")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: sized for the load)")
    ap.add_argument("--transport", default="auto", choices=("auto", "nvlink", "pcie", "rdma", "tcp"),
                    help="kv_transfer.transport: auto = the backend topology.select_transport picks per pair")
    ap.add_argument("--no-nixl", action="store_true", help="kv_transfer.backend: fallback (the workers start no NIXL)")
    ap.add_argument("--transfer-timeout-s", type=float, default=10.0, help="KV transfer timeout of the workers")
    ap.add_argument("--request-timeout-s", type=float, default=120.0,
                    help="give up on a request after this many seconds")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0, help="seconds for the worker processes to start")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the prompts and arrivals")
    ap.add_argument("--verify", choices=("auto", "assert", "report", "off"), default="auto",
                    help="compare greedy outputs with the agg graph: assert (CPU default) or report (GPU default)")
    ap.add_argument("--out", default=None,
                    help="result stem (default benchmarks/results/serve-direct-<device>-<preset>)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--policies", default="least-loaded",
                    help="routing policies, each run on a fresh graph: least-loaded, round-robin, dynamo-ext "
                         "(routing.decide over the workers' KV-event prefix index, measured prefill rates and links)")
    ap.add_argument("--workload", choices=("random", "shared-prefix"), default="random",
                    help="shared-prefix: every prompt = one of --prefixes shared system prompts + a unique suffix")
    ap.add_argument("--prefixes", type=int, default=8, help="shared-prefix: number of distinct shared prefixes")
    ap.add_argument("--prefix-frac", type=float, default=0.75, help="shared-prefix: prefix share of each prompt")
    ap.add_argument("--cache-blocks", type=int, default=None,
                    help="KV blocks of prefill/agg workers (a prefix cache smaller than the prefixes' working set)")
    a = ap.parse_args(argv)
    try:
        a.graph_specs = [GraphSpec.parse(x) for x in a.graphs.split(",") if x.strip()]
        a.lens = [int(x) for x in a.prompt_lens.split(",") if x.strip()]
    except (GraphSpecError, ValueError) as e:
        ap.error(str(e))
    if not a.graph_specs or not a.lens or min(a.lens) < 1:
        ap.error("--graphs and --prompt-lens need at least one entry (prompt lengths >= 1)")
    if a.quick:
        a.requests, a.output_len, a.warmup = min(a.requests, 16), min(a.output_len, 16), min(a.warmup, 1)
    a.rate_list: list[float | None] = [a.rate]
    if a.rates:
        a.rate_list = []
        for x in a.rates.split(","):
            x = x.strip().lower()
            if not x:
                continue
            if x in ("closed", "c"):
                a.rate_list.append(None)
                continue
            try:
                v = float(x)
            except ValueError:
                v = -1.0
            if v <= 0:
                ap.error(f"--rates: {x!r} is neither a positive req/s nor 'closed'")
            a.rate_list.append(v)
        if not a.rate_list:
            ap.error("--rates needs at least one entry (req/s or 'closed')")
    if a.requests < 1 or a.output_len < 1 or a.concurrency < 1:
        ap.error("--requests, --output-len and --concurrency must be >= 1")
    if a.device == "cuda":
        try:
            import torch  # noqa: PLC0415

            n = torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            n = 0
        need = max(s.gpus for s in a.graph_specs)
        if n < need:
            ap.error(f"--graphs needs {need} GPUs, this machine has {n}")
    a.policy_list = [x.strip() for x in a.policies.split(",") if x.strip()]
    bad = [x for x in a.policy_list if x not in POLICIES]
    if bad or not a.policy_list:
        ap.error(f"--policies: {', '.join(bad) or 'empty'} not allowed (allowed: {', '.join(POLICIES)})")
    if not 0.0 < a.prefix_frac < 1.0 or a.prefixes < 1:
        ap.error("--prefix-frac must be in (0, 1) and --prefixes >= 1")
    if a.verify == "auto":
        a.verify = "assert" if a.device == "cpu" else "report"
    return a


def blocks_needed(a: argparse.Namespace) -> int:
    per_req = -(-(max(a.lens) + a.output_len + 1) // a.block_size)
    inflight = a.requests if any(a.rate_list) else a.concurrency
    return per_req * (inflight + a.warmup + 2) + 16


async def amain(a: argparse.Namespace, argv_text: str) -> dict[str, Any]:
    import tempfile  # noqa: PLC0415

    machine = machine_info(a.device)
    stem = result_stem(a, machine)
    res: dict[str, Any] = {"runtime": "direct", "machine": machine,
                           "params": {"preset": a.preset, "layers": a.layers, "graphs": a.graphs, "prompt_lens": a.lens,
                                      "requests": a.requests, "concurrency": a.concurrency, "rate": a.rate,
                                      "rates": [r for r in a.rate_list if r], "quick": a.quick,
                                      "output_len": a.output_len, "warmup": a.warmup, "block_size": a.block_size,
                                      "policies": a.policy_list, "workload": a.workload, "prefixes": a.prefixes,
                                      "prefix_frac": a.prefix_frac, "cache_blocks": a.cache_blocks,
                                      "command": argv_text},
                           "startup_s": {}, "results": []}
    global PARTIAL
    PARTIAL = res
    t_begin = time.monotonic()

    def left() -> float:
        """Seconds left of --deadline-s (inf without one)."""
        return float("inf") if not a.deadline_s else a.deadline_s - (time.monotonic() - t_begin)

    longest = {"cell": 0.0, "start": 0.0}  # the longest cell and graph start-up so far (s)

    def skip(label: str, what: str, need: float = 0.0) -> bool:
        """True (and recorded) when less than ``need`` seconds of --deadline-s are left: a cell that cannot
        finish is not started (its requests would time out and read as errors)."""
        if left() > need:
            return False
        res.setdefault("skipped", []).append({"graph": label, "cell": what,
                                              "reason": f"--deadline-s {a.deadline_s:g}: {max(left(), 0):.1f} s left, {need:.1f} s needed"})
        return True

    tokens: dict[str, dict[tuple[int, int, int], list[int]]] = {}
    nblocks = a.num_blocks or blocks_needed(a)
    log_dir = Path(tempfile.mkdtemp(prefix="serve-direct-"))
    progress = None
    if not a.no_progress:
        try:
            from tqdm import tqdm  # noqa: PLC0415

            progress = tqdm(total=len(a.graph_specs) * len(a.lens) * len(a.rate_list) * a.requests, desc="requests", file=sys.stderr,
                            unit="req", dynamic_ncols=True)
        except Exception:  # noqa: BLE001
            progress = None
    try:
        for spec, policy in [(sp, po) for sp in a.graph_specs for po in a.policy_list]:
            label = spec.label if len(a.policy_list) == 1 else f"{spec.label}/{policy}"
            if skip(label, "all", longest["start"] + longest["cell"]):
                continue
            g = Graph(spec, a, log_dir)
            g.policy, g.label = policy, label
            try:
                await g.start(nblocks, min(a.startup_timeout_s, max(left(), 30.0)), a.cache_blocks)
                res["startup_s"][label] = g.startup_s
                longest["start"] = max(longest["start"], g.startup_s)
                vocab = int(g.workers[0].ready.get("vocab") or 256)
                for plen in a.lens:
                    if skip(label, f"prompt {plen}"):
                        continue
                    warm = make_prompts(a.warmup * len(g.workers), plen, vocab, a.seed + 10_000)
                    if warm:
                        await run_load(g, warm, min(a.output_len, 4), len(g.workers), None,
                                       min(a.request_timeout_s, max(left(), 1.0)))
                    for ri, rate in enumerate(a.rate_list):
                        if skip(label, f"prompt {plen} rate {rate or 'closed'}", longest["cell"]):
                            continue
                        # fresh prompts per load (seeded; the same for every graph): the previous load's
                        # prompts are still in the prefix cache and would turn its prefills into cache hits
                        prompts = make_prompts(a.requests, plen, vocab, a.seed + 7919 * ri,
                                               prefixes=a.prefixes if a.workload == "shared-prefix" else 0,
                                               prefix_frac=a.prefix_frac, block_size=a.block_size)
                        # a request's bound never runs past the deadline: the cell ends, is summarized, written
                        before = await g.counters()
                        outs, t0, t1 = await run_load(g, prompts, a.output_len, a.concurrency, rate,
                                                      min(a.request_timeout_s, max(left(), 1.0)), progress)
                        after = await g.counters()
                        r = summarize(g, plen, outs, t0, t1, a, rate, before, after)
                        longest["cell"] = max(longest["cell"], time.perf_counter() - t0)
                        # no stranded blocks: every prefill handle released once its pull was done
                        r["held_handles_after"] = sum(int(x.get("held", 0)) for x in after.values())
                        res["results"].append(r)
                        tokens.setdefault(label, {}).update({(plen, ri, o.i): o.tokens for o in outs if o.error is None})
                        write(res, stem)
            except Exception as e:  # noqa: BLE001 - a graph that fails (dead worker, CUDA error) is a result
                msg = str(e) if isinstance(e, WorkerDied) else f"{type(e).__name__}: {e}"
                res.setdefault("failures", []).append({"graph": label, "error": msg})
                print(f"serve-direct: {label}: {msg}", file=sys.stderr)
                write(res, stem)
            finally:
                await g.stop()
    finally:
        if progress is not None:
            progress.close()
    if a.verify != "off":
        res["verify"] = verify(tokens)
    write(res, stem)
    res["_stem"] = str(stem)
    return res


#: the result being built, for the partial table printed when the run is interrupted
PARTIAL: dict[str, Any] | None = None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    argv_text = "dynamo-ext bench serve-direct " + " ".join(argv if argv is not None else sys.argv[1:])
    # SIGTERM (a time limit) ends like Ctrl-C: the workers are shut down, the partial table is printed
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        res = asyncio.run(amain(a, argv_text))
    except KeyboardInterrupt:
        if PARTIAL is None:
            return 130
        PARTIAL["interrupted"] = True
        stem = result_stem(a, PARTIAL["machine"])
        write(PARTIAL, stem)
        print(markdown(PARTIAL))
        print(f"serve-direct: interrupted; partial results written: {stem}.{{json,md,png}}", file=sys.stderr)
        return 130
    print(markdown(res))
    print(f"written: {res['_stem']}.{{json,md,png}}", file=sys.stderr)
    bad = [r for r in res["results"] if r["completed"] < r["requests"]]
    if res.get("failures") or bad:
        return 1
    if a.verify == "assert":
        for gl, s in res.get("verify", {}).get("graphs", {}).items():
            if s["equal"] != s["compared"]:
                print(f"serve-direct: {gl}: {s['compared'] - s['equal']} outputs differ from the agg graph", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
