"""Routing benchmark: round-robin vs Dynamo's KV router vs dynamo-ext, on the same disaggregated workers.

    dynamo-ext bench route                                  # tiny on CPU (committed results, ~3 min on 2 cores)
    dynamo-ext bench route --workloads shared-prefix,mixed --policies round-robin,dynamo-kv,dynamo-ext \
        --requests 40 --rate 8 --runs 3 --layers 16 --systems 8 --prefill-kv-blocks 400

For each policy one graph (graphs/disagg.py) is started as ``dynamo-ext serve`` starts it
(``dynamo_ext.launch.launch_graph``: etcd + NATS on free loopback ports, shared by the graphs of one
benchmark run, --prefill-workers prefill and --decode-workers decode workers, NIXL in host memory):

  round-robin  frontend (round-robin) -> our router (policy round-robin) -> next prefill, next decode
  dynamo-ext   frontend (round-robin) -> our router (policy dynamo-ext: routing.decide with KV-event overlap)
  dynamo-kv    frontend --router-mode kv (Dynamo's KV router; workers register as Prefill / Decode)

The worker processes and their configuration are the same in the three graphs; only the policy differs
(the workers must be restarted: in dynamo-kv they register the model themselves).

Workloads (streaming completions, Poisson arrivals at --rate, greedy, ignore_eos, --output-len tokens):

  shared-prefix  --systems long system prompts (--system-len tokens; the tiny tokenizer is byte-level);
                 each request is either a turn of a multi-turn chat (system + the chat's earlier turns
                 and answers + a new user turn) or a RAG-like prompt (system + one of a few shared
                 "documents" + a question); prefix caching decides most of the prefill work
  mixed          unique prompts, long (--long-len) or short (--short-len) with probability 1/2

Per policy: TTFT p50 / p99, output tokens/s (first send -> last completion), prefix hit rate, KV bytes
moved. Pull statistics come from the decode workers' ``/metrics``, scraped before and after each run and
differenced (``dynamo_ext/bench/_kv.py``): bytes (``dynamo_ext_kv_transfer_bytes_total``), pulls
(``dynamo_ext_kv_transfer_seconds_count``), mean pull seconds, GB/s and backend(s), and the decode workers'
local prefills (``dynamo_ext_worker_local_prefill_total``).

Prefix hit rate: the benchmark subscribes to the graph's KV events (NATS, the subject our workers publish
to) and counts the blocks newly stored by each worker. A prefill computes and stores only the full blocks
that its worker's prefix cache does not hold (engine_runner: ``match_tokens`` then ``commit`` of the rest),
so, over the full prompt blocks of all completed requests,

    hit rate = (full blocks prefilled on prefill workers - blocks those workers newly stored) / full blocks

where the first term is the full blocks of the pulled prompts. A pull of an N-token prompt whose first K
full blocks the decode worker's own prefix cache holds reads ceil(N / block size) - K blocks, so when every
completed request was pulled exactly once (pulls == completed requests, no decode-side local prefill: the
round-robin and dynamo-kv graphs here) the metrics give it exactly: sum of N // block size over the
requests, and K summed = sum of ceil(N / block size) - bytes read / block bytes (kv_blocks_reused_by_decode).
When some requests were prefilled locally (dynamo-ext's "local" option) the metrics do not say which, so the
first term is estimated from the bytes (blocks read - one partial block per pull; reused blocks unknown:
kv_blocks_reused_by_decode = null). The hit rate hardly depends on that split: unless a term is clipped at
0 it is (full blocks - blocks stored by prefill workers - blocks stored by decode workers) / full blocks.
Prefills on a decode worker (no pull) are not separable in the decode workers' stored events (they also
store the blocks they pull): they are counted as hits only as far as the decode workers stored fewer
blocks than those prefills covered, max(0, local full blocks - blocks stored by decode workers), which is
a lower bound. Two concurrent misses
of the same block on one worker store it once (an upper-bound effect, small at these loads). The per-run
JSON (route-cpu-<workload>.runs.json) keeps the raw counts; ``--from-runs`` re-renders from it.

Quiet, reproducible runs (the lead's final numbers; the 2-core box is shared otherwise):

    dynamo-ext bench route --quiet-load 1 --one-graph --runs 3 --requests 80   # ~25-40 min, 2 idle cores

``--quiet-load X`` waits before every measured run until the 1-minute load average is below X (polling
every 5 s, at most ``--quiet-timeout`` s; a run that starts without reaching it is marked ``quiet: false``);
each run records ``load_before`` / ``load_after`` / ``quiet_wait_s``. ``--one-graph`` starts only the measured
policy's graph for each run (its own namespace) and stops it afterwards, so the other policies' idle
workers do not load the machine; start-up is then paid per run (``startup_s`` per run). The router's
measured throughput estimates (its health ``throughput``) are kept per policy in ``info``.

Writes benchmarks/results/route-cpu-<workload>.{json,md,png} (JSON: {"workload", "machine", "results":
[{"policy", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "prefix_hit_rate", "kv_bytes_moved"}]}) and
prints the table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench._kv import counter_total, kv_delta, kv_summary, kv_totals
from dynamo_ext.bench.serve import MODEL, WORDS, Req, machine, pct, run_load
from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.infra import free_port

POLICIES = ("round-robin", "dynamo-kv", "dynamo-ext", "dynamo-ext-nolocal")
DEFAULT_POLICIES = ("round-robin", "dynamo-kv", "dynamo-ext")
GRAPHS = ("disagg", "agg")
ENGINE_ROLES = ("prefill", "decode", "agg")


def router_section(policy: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """dynamo.yaml ``router`` of a benchmark policy: ``dynamo-ext-nolocal`` is dynamo-ext with
    ``router.local_prefill: false`` (placement only: every prompt through a prefill worker), which splits
    dynamo-ext's gain into placement and local prefill."""
    extra = dict(extra or {}) if policy.startswith("dynamo-ext") else {}
    if policy == "dynamo-ext-nolocal":
        return {"policy": "dynamo-ext", "disagg_min_prompt_tokens": 0, **extra, "local_prefill": False}
    return {"policy": policy, "disagg_min_prompt_tokens": 0, **extra}
WORKLOADS = ("shared-prefix", "mixed")
BLOCK = 16


# -- workloads ------------------------------------------------------------------------------------------------


def _text(rng: random.Random, n: int, tag: str = "") -> str:
    s = f"{tag} " if tag else ""
    while len(s) < n:
        s += rng.choice(WORDS) + " "
    return s[:n]


def make_workload(name: str, a: argparse.Namespace, seed: int) -> list[Req]:
    rng = random.Random(seed)
    out: list[Req] = []
    t = 0.0
    if name == "shared-prefix":
        systems = [_text(rng, a.system_len, f"system-{k}-{rng.getrandbits(32):08x}") for k in range(a.systems)]
        docs = [_text(rng, a.doc_len, f"doc-{k}") for k in range(a.docs)]
        chats: list[str] = []  # running chat histories (system + turns)
        for i in range(a.requests):
            t += rng.expovariate(a.rate) if i else 0.0
            r = rng.random()
            if r < 0.5 and chats and rng.random() < 0.7:  # next turn of an open chat
                k = rng.randrange(len(chats))
                chats[k] += " assistant: " + _text(rng, 48) + " user: " + _text(rng, 48)
                prompt = chats[k]
                if len(prompt) > a.max_prompt:
                    prompt = chats[k] = rng.choice(systems) + " user: " + _text(rng, 48)
            elif r < 0.5:  # a new chat
                chats.append(rng.choice(systems) + " user: " + _text(rng, 48, f"chat{i}"))
                prompt = chats[-1]
            else:  # RAG: system + a shared document + a question
                prompt = rng.choice(systems) + " context: " + rng.choice(docs) + " question: " + _text(rng, 40, f"q{i}")
            out.append(Req(i, t, prompt[: a.max_prompt], a.output_len))
    elif name == "mixed":
        for i in range(a.requests):
            t += rng.expovariate(a.rate) if i else 0.0
            n = a.long_len if rng.random() < 0.5 else a.short_len
            out.append(Req(i, t, _text(rng, n, f"m{i}-{rng.getrandbits(32):08x}"), a.output_len))
    else:
        raise ValueError(name)
    return out


# -- KV events: blocks stored per worker -----------------------------------------------------------------------


class StoredCounter:
    """Counts blocks in ``stored`` KV events per worker on the graph's KV-event subject (own thread + loop)."""

    def __init__(self, nats_url: str, namespace: str) -> None:
        self.nats_url, self.namespace = nats_url, namespace
        self.stored: dict[int, int] = defaultdict(int)
        self.removed: dict[int, int] = defaultdict(int)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._idx: Any = None

    def start(self) -> None:
        from dynamo_ext.kv.indexer import KvEventIndexer, kv_events_subject

        outer = self

        class _Counting(KvEventIndexer):
            def apply_event(self, worker_id: int, event: dict[str, Any]) -> None:
                data = event.get("data", {}) if isinstance(event, dict) else {}
                if "stored" in data:
                    outer.stored[worker_id] += len(data["stored"].get("blocks", []))
                if "removed" in data:
                    outer.removed[worker_id] += len(data["removed"].get("block_hashes", []))

        self._thread.start()
        self._idx = _Counting(BLOCK)
        fut = asyncio.run_coroutine_threadsafe(
            self._idx.start(self.nats_url, kv_events_subject(self.namespace)), self._loop)
        fut.result(15)

    def snapshot(self) -> dict[int, int]:
        return dict(self.stored)

    def __enter__(self) -> StoredCounter:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._idx is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._idx.close(), self._loop).result(5)
            except Exception:  # noqa: BLE001
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- one policy -----------------------------------------------------------------------------------------------


def wait_quiet(max_load: float, timeout_s: float, *, poll_s: float = 5.0, loadavg=os.getloadavg,
               sleep=time.sleep, clock=time.monotonic, log=None) -> dict[str, Any]:
    """Waits until the 1-minute load average is below ``max_load`` (0: no wait), at most ``timeout_s``.

    Returns ``{"load_before": 1-min load when the run starts, "quiet_wait_s": seconds waited,
    "quiet": whether the load was below max_load}`` (``quiet`` is None when not asked)."""
    if max_load < 0 or timeout_s < 0:
        raise ValueError(f"--quiet-load and --quiet-timeout must be >= 0, got {max_load}, {timeout_s}")
    t0 = clock()
    load = loadavg()[0]
    if max_load == 0:
        return {"load_before": round(load, 2), "quiet_wait_s": 0.0, "quiet": None}
    while load >= max_load and clock() - t0 < timeout_s:
        if log is not None:
            log(f"waiting for load < {max_load}: {load:.2f} ({clock() - t0:.0f} s)")
        sleep(min(poll_s, max(timeout_s - (clock() - t0), 0.0)))
        load = loadavg()[0]
    return {"load_before": round(load, 2), "quiet_wait_s": round(clock() - t0, 1), "quiet": load < max_load}


def router_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """``--router key=value`` settings for our router (dynamo-ext policies), as dynamo.yaml ``router`` keys."""
    out: dict[str, Any] = {}
    for kv in getattr(a, "router", None) or []:
        k, _, v = kv.partition("=")
        out[k] = json.loads(v) if v[:1] in "0123456789-tf[{" and v not in ("tf",) else v
    return out


def graph_config(policy: str, a: argparse.Namespace, etcd: str, nats: str, namespace: str) -> dict[str, Any]:
    if getattr(a, "graph", "disagg") == "agg":
        workers = {"agg": {"count": a.agg_workers, "num_kv_blocks": a.agg_kv_blocks}}
    else:
        workers = {"prefill": {"count": a.prefill_workers, "num_kv_blocks": a.prefill_kv_blocks or a.kv_blocks},
                   "decode": {"count": a.decode_workers, "num_kv_blocks": a.kv_blocks}}
    return {"model": {"name": MODEL, "preset": "tiny", "block_size": BLOCK, "dtype": "float32"},
            "kv_transfer": {"backend": "nixl", "timeout_ms": 2000},
            "workers": workers,
            "router": router_section(policy, router_overrides(a)),
            "discovery": {"namespace": namespace, "etcd": {"endpoints": [etcd]},
                          "nats": {"url": nats}}}  # fmt: skip


def decode_scrape(g: Any, role: str = "decode") -> tuple[dict, float]:
    """The decode (or agg) workers' KV transfer counters and their local prefills (sum over workers)."""
    texts = g.metrics(role=role)
    return kv_totals(texts), counter_total(texts, "dynamo_ext_worker_local_prefill_total")


def full_blocks(r: Req) -> int:
    return (r.prompt_tokens or len(r.prompt)) // BLOCK


def with_hit_rate(row: dict) -> dict:
    """prefix_hit_rate of a run: the engines' own counters when the row has them (cached / prefilled prompt
    tokens), else the estimate from the KV events' raw counts (a lower bound; see the module docstring),
    which is kept as prefix_hit_rate_events."""
    blocks, pulled = row["prompt_blocks"], row["blocks_prefilled_remotely"]
    remote_hits = max(0, pulled - row["stored_blocks_prefill"])
    local_hits = max(0, blocks - pulled - row["stored_blocks_decode"])
    row["prefix_hit_rate_events"] = round((remote_hits + local_hits) / blocks, 4) if blocks else 0.0
    eng = row.get("engine") or {}
    row["prefix_hit_rate"] = (round(eng["cached_tokens"] / eng["prompt_tokens"], 4) if eng.get("prompt_tokens")
                              else row["prefix_hit_rate_events"])
    return row


class Policy:
    """One policy's running graph (``launch_graph``, held open until ``stop``) and its counters."""

    def __init__(self, policy: str, a: argparse.Namespace, etcd: str, nats: str, work: Path,
                 model_dir: Path, ns_suffix: str = "") -> None:
        from dynamo_ext.engine.config import ModelConfig

        self.name, self.a = policy, a
        t_start = time.monotonic()
        ns = "rt" + policy.replace("-", "") + ns_suffix
        self._stack = ExitStack()
        try:
            self.graph = getattr(a, "graph", "disagg")
            self.g = self._stack.enter_context(launch_graph(
                f"graphs.{self.graph}", graph_config(policy, a, etcd, nats, ns), model_dir=model_dir,
                log_dir=work / f"logs-{ns}", ready_timeout=a.ready_timeout))
            self.base = self.g.base_url
            self.prefill_ids = {c.instance_id for c in self.g.children if c.role == "prefill"}
            # the engines' own counters (their /health "engine"): prompt tokens prefilled and found cached
            self.engine_health = [(c.role, c.metrics_url.rsplit("/", 1)[0] + "/health") for c in self.g.children
                                  if c.role in ENGINE_ROLES and c.metrics_url]
            routers = [c for c in self.g.children if c.role == "router"]
            self.router_health = (routers[0].metrics_url.rsplit("/", 1)[0] + "/health"
                                  if routers and routers[0].metrics_url else None)  # fmt: skip
            self.counter = self._stack.enter_context(StoredCounter(nats, ns))
        except BaseException:
            self._stack.close()
            raise
        self.info: dict[str, Any] = {"startup_s": round(time.monotonic() - t_start, 1)}
        mc = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
        self.block_bytes = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * {"float32": 4}.get(mc.dtype, 2) * BLOCK
        warm = [Req(i, 0.05 * i, _text(random.Random(900 + i), 200, f"warm{i}"), 4) for i in range(a.warmup)]
        run_load(self.base, warm, a.timeout)

    def measure(self, wl: str, run: int) -> dict:
        a = self.a
        pids = self.prefill_ids
        time.sleep(0.3)
        quiet = wait_quiet(a.quiet_load, a.quiet_timeout, log=lambda s: print(s, file=sys.stderr, flush=True))
        drole = "agg" if self.graph == "agg" else "decode"
        (kv0, local0), st0 = decode_scrape(self.g, drole), self.counter.snapshot()
        dec0 = self.decisions()
        idx0 = self.index_counters()
        eng0 = self.engine_counters()
        t_start = time.monotonic()
        reqs = make_workload(wl, a, a.seed + 1000 * run)
        t0 = run_load(self.base, reqs, a.timeout)
        time.sleep(0.5)
        (kv1, local1), st1 = decode_scrape(self.g, drole), self.counter.snapshot()
        dec1 = self.decisions()
        idx1 = self.index_counters()
        eng = {k: eng1 - eng0.get(k, 0) for k, eng1 in self.engine_counters().items()}
        self.g.check()  # a worker that died under the load fails the run
        ok = [r for r in reqs if r.ok]
        ttft = [r.ttft() for r in ok]
        end = max((r.done for r in reqs), default=t0)
        dur = max(end - t0, 1e-9)
        stored = {w: st1.get(w, 0) - st0.get(w, 0) for w in set(st1) | set(st0)}
        stored_p = sum(v for w, v in stored.items() if w in pids)
        blocks = sum(full_blocks(r) for r in ok)
        kv = kv_summary(kv_delta(kv1, kv0))
        transfers, moved = kv["kv_transfers"], kv["kv_bytes"]
        local = int(round(local1 - local0))
        read_blocks = moved // self.block_bytes
        # full blocks of the prompts prefilled on prefill workers (the module docstring): exact when every
        # completed request was pulled once, else estimated from the bytes (reused blocks unknown)
        reused: int | None
        if transfers == len(ok) == len(reqs) and local == 0:
            pulled = blocks
            reused = max(0, sum(-(-(r.prompt_tokens or len(r.prompt)) // BLOCK) for r in ok) - read_blocks)
        else:
            pulled = max(0, min(blocks, read_blocks - transfers))
            reused = None
        row = ({"policy": self.name, "run": run, "requests": len(reqs), "completed": len(ok),
                "errors": [r.error or f"finish={r.finish}" for r in reqs if not r.ok][:3],
                "ttft_p50_s": round(pct(ttft, 0.5) or float("nan"), 4),
                "ttft_p99_s": round(pct(ttft, 0.99) or float("nan"), 4),
                "ttft_mean_s": round(statistics.fmean(ttft), 4) if ttft else None,
                "throughput_tok_s": round(sum(r.tokens for r in ok) / dur, 1),
                "prefix_hit_rate": 0.0,
                "kv_bytes_moved": moved, "kv_transfers": transfers, "kv_pull_s_mean": kv["kv_pull_s_mean"],
                "kv_pull_gbps": kv["kv_pull_gbps"], "kv_backends": kv["kv_backends"], "kv_by_path": kv["kv_by_path"],
                "decode_local_prefills": local,
                "blocks_prefilled_remotely": pulled, "kv_blocks_reused_by_decode": reused, "prompt_blocks": blocks,
                "stored_blocks_prefill": stored_p,
                "stored_blocks_decode": sum(v for w, v in stored.items() if w not in pids),
                "router_decisions": {k: dec1.get(k, 0) - dec0.get(k, 0) for k in dec1 if dec1.get(k, 0) != dec0.get(k, 0)}
                if self.router_health is not None else None,
                # KV events our router's prefix index refused in this run (issue 14.3: must be 0)
                "kv_index_refused": {k: v - idx0.get(k, 0) for k, v in idx1.items() if v != idx0.get(k, 0)}
                if self.router_health is not None else None,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "load_before": quiet["load_before"], "load_after": round(os.getloadavg()[0], 2),
                "quiet_wait_s": quiet["quiet_wait_s"], "quiet": quiet["quiet"],
                "prompt_tokens_mean": round(statistics.fmean([r.prompt_tokens for r in ok]), 1) if ok else None})
        # the headline hit rate comes from the engines' own counters (issue 14.4); the KV-event estimate stays
        routes = [r for r in self.routes() if r.get("t", 0) >= t_start]
        row["routes"] = routes  # our router's trace of this run: route, estimate, measured times
        row["tail"] = tail_summary(routes)
        row["engine"] = eng
        return with_hit_rate(row)

    def routes(self) -> list[dict[str, Any]]:
        """Our router's recent routes (GET /routes); [] without a router."""
        if self.router_health is None:
            return []
        try:
            with urllib.request.urlopen(self.router_health.rsplit("/", 1)[0] + "/routes", timeout=5) as r:
                return list(json.loads(r.read()))
        except (OSError, ValueError):
            return []

    def engine_counters(self) -> dict[str, float]:
        """Sums over the engine workers of their engines' counters: prompt tokens prefilled, of them found in
        the prefix cache, prefills per role. Each request is prefilled once (a prefill worker, a decode
        worker locally, or an agg worker; a pulled request is not prefilled again), so cached / prompt
        tokens is the prefix hit rate of the run."""
        out: dict[str, float] = defaultdict(float)
        for role, url in self.engine_health:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    e = json.loads(r.read()).get("engine") or {}
            except urllib.error.HTTPError as err:
                e = (json.loads(err.read() or b"{}") or {}).get("engine") or {}
            except (OSError, ValueError):
                continue
            out["prompt_tokens"] += float(e.get("prefill_prompt_tokens", 0))
            out["cached_tokens"] += float(e.get("prefill_cached_tokens", 0))
            out[f"prefills_{role}"] += float(e.get("prefills", 0))
        return dict(out)

    def health(self) -> dict[str, Any]:
        """Our router's /health (an error answer still carries the JSON); {} without a router or an answer."""
        if self.router_health is None:
            return {}
        try:
            with urllib.request.urlopen(self.router_health, timeout=5) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            try:
                return dict(json.loads(e.read()))
            except ValueError:
                return {}
        except (OSError, ValueError):
            return {}

    def index_counters(self) -> dict[str, int]:
        """Our router's KV index counters: refused events by reason, sequence gaps."""
        idx = self.health().get("kv_index") or {}
        return {**{f"refused_{k}": int(v) for k, v in (idx.get("refused") or {}).items()},
                "sequence_gaps": int(idx.get("sequence_gaps") or 0),
                "resync_failures": int(idx.get("resync_failures") or 0)}

    def decisions(self) -> dict[str, int]:  # noqa: D102
        return dict(self.health().get("decisions") or {})

    def throughput(self) -> dict | None:
        """The router's measured throughput estimates per worker (health ``throughput``), if any."""
        return self.health().get("throughput") or None

    def stop(self) -> None:
        """Stop the counter and the graph (children in reverse order, etcd records audited)."""
        if self.router_health is not None:
            self.info["router_decisions"] = self.decisions() or None
            self.info["router_throughput"] = self.throughput()
        else:
            self.info.setdefault("router_decisions", None)
            self.info.setdefault("router_throughput", None)
        self._stack.close()


def tail_summary(routes: list[dict[str, Any]], share: float = 0.1) -> dict[str, Any] | None:
    """What the slowest ``share`` of a run's requests (router-side first-token time, at least 2) have in
    common, against the rest: their routes (reason), prompt and uncached tokens, the estimate, how long the
    prefill call took, the pull, and the decode worker's streams in flight when chosen."""
    done = sorted((r for r in routes if r.get("ttft_s") is not None), key=lambda r: r["ttft_s"])
    if len(done) < 4:
        return None
    k = max(2, int(round(len(done) * share)))
    slow, rest = done[-k:], done[:-k]

    def mean(rs: list[dict], f: Any) -> float | None:
        xs = [v for v in (f(r) for r in rs) if v is not None]
        return round(statistics.fmean(xs), 4) if xs else None

    def side(rs: list[dict]) -> dict[str, Any]:
        reasons: dict[str, int] = defaultdict(int)
        for r in rs:
            reasons[r.get("reason", "?")] += 1
        return {"n": len(rs), "ttft_s": mean(rs, lambda r: r["ttft_s"]), "reasons": dict(reasons),
                "prompt_tokens": mean(rs, lambda r: r.get("prompt_tokens")),
                "uncached_tokens": mean(rs, lambda r: (r.get("estimate") or {}).get("uncached_tokens")),
                "est_s": mean(rs, lambda r: (r.get("estimate") or {}).get("est_s")),
                "est_queue_s": mean(rs, lambda r: ((r.get("estimate") or {}).get("terms") or {}).get("queue_wait_s")),
                "est_admission_s": mean(rs, lambda r: ((r.get("estimate") or {}).get("terms") or {}).get("admission_s")),
                "prefill_call_s": mean(rs, lambda r: r.get("prefill_s")),
                "pull_s": mean(rs, lambda r: (r.get("pull") or {}).get("seconds")),
                "inflight_decode": mean(rs, lambda r: r.get("inflight_decode")),
                "inflight_prefill": mean(rs, lambda r: r.get("inflight_prefill"))}

    return {"slowest": side(slow), "rest": side(rest)}


def median_row(rows: list[dict]) -> dict:
    keys = ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "prefix_hit_rate")
    r = {"policy": rows[0]["policy"]}
    for k in keys:
        r[k] = float(statistics.median(x[k] for x in rows))
    r["kv_bytes_moved"] = int(statistics.median(x["kv_bytes_moved"] for x in rows))
    return r


# -- outputs --------------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    lines = ["| policy | TTFT p50 (s) | TTFT p99 (s) | output tok/s | prefix hit rate | KV bytes moved |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        lines.append(f"| {r['policy']} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['throughput_tok_s']:.1f} "
                     f"| {r['prefix_hit_rate']:.1%} | {r['kv_bytes_moved']:,} |")
    return "\n".join(lines)


def _refusals(x: Any) -> str:
    """KV events our router's prefix index refused in a run ('-': no router; 0: none)."""
    if x is None:
        return "-"
    n = sum(v for k, v in x.items() if k.startswith("refused_"))
    gaps, fails = x.get("sequence_gaps", 0), x.get("resync_failures", 0)
    return f"{n}" + (f" (+{gaps} gaps)" if gaps else "") + (f" ({fails} resyncs failed)" if fails else "")


def gain_split(rr: dict, placement: dict, ext: dict) -> str:
    """dynamo-ext's TTFT gain over round-robin, split into placement (dynamo-ext-nolocal: prefix- and
    load-aware choice of prefill and decode workers, every prompt through a prefill worker) and local
    prefill (dynamo-ext over dynamo-ext-nolocal)."""
    parts = []
    for k, name in (("ttft_p50_s", "p50"), ("ttft_p99_s", "p99")):
        total = rr[k] - ext[k]
        place = rr[k] - placement[k]
        if total > 0:
            share = min(max(place / total, 0.0), 1.0)
            parts.append(f"TTFT {name}: {rr[k]:.3f} s (round-robin) -> {placement[k]:.3f} s (placement only) -> "
                         f"{ext[k]:.3f} s (dynamo-ext): {share:.0%} of the gain from placement, "
                         f"{1 - share:.0%} from local prefill")
        else:
            parts.append(f"TTFT {name}: no gain over round-robin ({rr[k]:.3f} -> {ext[k]:.3f} s; placement only "
                         f"{placement[k]:.3f} s)")
    return "Share of the gain (medians): " + "; ".join(parts) + "."


def _or(x: Any, default: str) -> Any:
    return default if x is None else x


def markdown(res: dict, extra: dict, a: argparse.Namespace) -> str:
    m = res["machine"]
    rr = {r["policy"]: r for r in res["results"]}
    lines = [f"# Routing benchmark: {res['workload']} on CPU (tiny model)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
             f"ai-dynamo {m.get('ai-dynamo')}, torch {m.get('torch')}; load average at start {m['load_avg_1m']}; "
             + (f"quiet mode: each run waited for a 1-min load average < {a.quiet_load} "
                f"({sum(1 for r in extra['runs'] if r.get('quiet'))} of {len(extra['runs'])} runs reached it; "
                "load before -> after each run in the per-run table)." if getattr(a, "quiet_load", 0)
                else "no quiet mode (the machine may have been shared; per-run load in the table)."),
             "",
             (f"Graph per policy: {a.agg_workers} aggregated workers (graphs/agg.py; {a.agg_kv_blocks} KV blocks of "
              f"{BLOCK} tokens each, fewer than the shared prefixes need together), tiny model with {a.layers or 2} "
              "layers, Dynamo frontend; round-robin and dynamo-ext through our router, dynamo-kv = frontend "
              "`--router-mode kv` straight to the workers. " if getattr(a, "graph", "disagg") == "agg" else
              f"Graph per policy: {a.prefill_workers} prefill + {a.decode_workers} decode workers "
              f"(KV blocks of {BLOCK} tokens: {a.prefill_kv_blocks or a.kv_blocks} per prefill worker, fewer than the "
              f"shared prefixes need together; {a.kv_blocks} per decode worker), tiny model with {a.layers or 2} "
              "layers, NIXL in host memory, Dynamo frontend; "
              "round-robin and dynamo-ext through our router, dynamo-kv = frontend `--router-mode kv`; "
              "dynamo-ext-nolocal = dynamo-ext with `router.local_prefill: false` (placement only). ")
             + f"Load: {a.requests} streaming completions, Poisson {a.rate} req/s, {a.output_len} output tokens, "
             + ("greedy. One graph at a time (--one-graph: only the measured policy's workers run, a fresh graph "
                "per run); policies interleave " if getattr(a, "one_graph", False) else
                "greedy. The graphs run side by side (idle while another is measured); runs interleave ")
             + f"(policy order reversed on odd runs). {a.runs} run(s) per policy"
             + (" (median of the runs)" if a.runs > 1 else
                                                      " (one run: no time for 3 on 2 cores; run-to-run noise "
                                                      "is not measured)") + ".", "",
             "Prefix hit rate = prompt tokens the engines found in their prefix cache / prompt tokens they prefilled, "
             "summed over every engine worker (their own counters, `/health` `engine`; each request is prefilled "
             "once: on a prefill worker, locally on a decode worker, or on an agg worker). 'hit (events)' in the "
             "per-run table is the older estimate from the KV events (the docstring gives its formula). "
             "KV bytes moved = decode workers' `dynamo_ext_kv_transfer_bytes_total` over the run (a decode worker "
             "reads only the prompt blocks its own prefix cache lacks; blocks it reused instead: "
             + ", ".join(f"{r['policy']} run {r['run']}: {_or(r.get('kv_blocks_reused_by_decode'), 'unknown')}"
                         for r in extra["runs"]) + "; unknown when some requests were prefilled on a decode "
             "worker, see the docstring). Pulls, pull GB/s and backend: the decode workers' "
             "`dynamo_ext_kv_transfer_*` metrics over the run.", ""]
    lines += ["Per run:", "", "| policy | run | done | prompt tok (mean) | TTFT p50 | TTFT p99 | tok/s | hit | "
              "hit (events) | stored blocks (prefill / decode) | blocks prefilled remotely / all | KV bytes | pulls | "
              "pull GB/s | backend | index refusals | load before -> after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---|---|"]
    for r in extra["runs"]:
        lines.append(f"| {r['policy']} | {r['run']} | {r['completed']}/{r['requests']} | {r['prompt_tokens_mean']} | "
                     f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['throughput_tok_s']:.1f} | "
                     f"{r['prefix_hit_rate']:.1%} | {r.get('prefix_hit_rate_events', r['prefix_hit_rate']):.1%} | "
                     f"{r['stored_blocks_prefill']} / {r['stored_blocks_decode']} | "
                     f"{r['blocks_prefilled_remotely']} / {r['prompt_blocks']} | {r['kv_bytes_moved']:,} | "
                     f"{_or(r.get('kv_transfers'), '-')} | {_or(r.get('kv_pull_gbps'), '-')} | "
                     f"{', '.join(r.get('kv_backends') or []) or '-'} | "
                     f"{_refusals(r.get('kv_index_refused'))} | "
                     f"{r.get('load_before', '?')} -> {r.get('load_after', r.get('load_avg_1m', '?'))} |")
    lines += ["", "Router decisions (our router; dynamo-kv has none): "
              + "; ".join(f"{p}: {i.get('router_decisions')}" for p, i in extra["info"].items()) + ".", "",
              "Start-up per graph: " + ", ".join(f"{p} {i['startup_s']} s" for p, i in extra["info"].items()) + "."]
    if res["workload"].startswith("shared-prefix") and {"round-robin", "dynamo-ext"} <= set(rr):
        ext, base = rr["dynamo-ext"], rr["round-robin"]
        kv = rr.get("dynamo-kv")
        lines += ["", "Targets (issue 14, not a test): prefix hit rate dynamo-ext >= Dynamo KV router > round-robin: "
                  + (f"{ext['prefix_hit_rate']:.1%} / {kv['prefix_hit_rate']:.1%} / {base['prefix_hit_rate']:.1%} -> "
                     f"{'met' if ext['prefix_hit_rate'] >= kv['prefix_hit_rate'] > base['prefix_hit_rate'] else 'NOT met'}; "
                     if kv else "")
                  + "dynamo-ext TTFT p99 <= 0.5 x round-robin: "
                  f"{ext['ttft_p99_s']:.3f} vs 0.5 x {base['ttft_p99_s']:.3f} s -> "
                  f"{'met' if ext['ttft_p99_s'] <= 0.5 * base['ttft_p99_s'] else 'NOT met'}"
                  + (f"; p50 <= Dynamo KV router: {ext['ttft_p50_s']:.3f} vs {kv['ttft_p50_s']:.3f} s -> "
                     f"{'met' if ext['ttft_p50_s'] <= kv['ttft_p50_s'] else 'NOT met'}"
                     f"; p99 <= Dynamo KV router: {ext['ttft_p99_s']:.3f} vs {kv['ttft_p99_s']:.3f} s -> "
                     f"{'met' if ext['ttft_p99_s'] <= kv['ttft_p99_s'] else 'NOT met'}"
                     if kv else "") + "."]
    if res["workload"] == "mixed" and {"round-robin", "dynamo-ext"} <= set(rr):
        ext, base = rr["dynamo-ext"], rr["round-robin"]
        ok = ext["ttft_p50_s"] <= base["ttft_p50_s"] and ext["ttft_p99_s"] <= base["ttft_p99_s"]
        lines += ["", "Target (issue 14, not a test): dynamo-ext no worse than round-robin on TTFT p50 and p99: "
                  f"{ext['ttft_p50_s']:.3f} / {ext['ttft_p99_s']:.3f} vs {base['ttft_p50_s']:.3f} / "
                  f"{base['ttft_p99_s']:.3f} s -> {'met' if ok else 'NOT met'}."]
    if {"round-robin", "dynamo-ext", "dynamo-ext-nolocal"} <= set(rr):
        lines += ["", gain_split(rr["round-robin"], rr["dynamo-ext-nolocal"], rr["dynamo-ext"])]
    if a.note:
        lines += ["", a.note]
    lines += ["", table(res)]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = res["results"]
    names = [r["policy"] for r in rs]
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.6))
    x = range(len(rs))
    axs[0].bar([i - 0.2 for i in x], [r["ttft_p50_s"] for r in rs], 0.4, label="p50")
    axs[0].bar([i + 0.2 for i in x], [r["ttft_p99_s"] for r in rs], 0.4, label="p99")
    axs[0].set_title("TTFT (s)")
    axs[0].legend(fontsize=8)
    axs[1].bar(x, [r["throughput_tok_s"] for r in rs], color="tab:green")
    axs[1].set_title("output tokens/s")
    axs[2].bar(x, [r["prefix_hit_rate"] for r in rs], color="tab:purple")
    axs[2].set_title("prefix hit rate")
    for ax in axs:
        ax.set_xticks(list(x), names, fontsize=8)
    fig.suptitle(f"{res['workload']}: {res['machine']['cpu']} ({res['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(a: argparse.Namespace, wl: str, rows: list[dict], info: dict, mach: dict, policies: list[str]) -> str:
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    res = {"workload": wl, "machine": f"{mach['cpu']}, {mach['cores']} cores, CPU only (no GPU), "
                                      f"load avg {mach['load_avg_1m']} at start; tiny model, {a.layers or 2} layers",
           "results": [median_row([r for r in rows if r["policy"] == p]) for p in policies
                       if any(r["policy"] == p for r in rows)]}
    stem = f"{a.tag}-{wl}"
    (outdir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown({**res, "machine": mach}, {"runs": rows, "info": info}, a)
    (outdir / f"{stem}.md").write_text(md)
    (outdir / f"{stem}.runs.json").write_text(json.dumps({"machine": mach, "params": {
        k: v for k, v in vars(a).items() if k not in ("out", "tag", "note", "from_runs")}, "runs": rows,
        "info": info}, indent=2) + "\n")
    if not a.no_plot:
        try:
            plot({**res, "machine": mach}, outdir / f"{stem}.png")
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)
    return f"## {wl}\n\n{table(res)}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench route", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="workloads, comma-separated: shared-prefix, mixed")
    ap.add_argument("--policies", default=None,
                    help=f"of {', '.join(POLICIES)} (default: all on disagg; all but dynamo-ext-nolocal on agg)")
    ap.add_argument("--graph", default="disagg", choices=GRAPHS,
                    help="disagg: --prefill-workers + --decode-workers; agg: --agg-workers aggregated workers")
    ap.add_argument("--agg-workers", type=int, default=3, help="aggregated workers (--graph agg)")
    ap.add_argument("--router", action="append", metavar="KEY=VALUE",
                    help="a dynamo.yaml router setting for the dynamo-ext policies, e.g. work_weight=0 (repeatable)")
    ap.add_argument("--agg-kv-blocks", type=int, default=320,
                    help="KV blocks per agg worker; fewer than the shared prefixes need together")
    ap.add_argument("--requests", type=int, default=40, help="requests per run")
    ap.add_argument("--rate", type=float, default=8.0, help="req/s (Poisson)")
    ap.add_argument("--runs", type=int, default=3, help="runs per policy and workload (median reported)")
    ap.add_argument("--output-len", type=int, default=8, help="output tokens per request (ignore_eos)")
    ap.add_argument("--systems", type=int, default=8, help="shared-prefix: number of long system prompts")
    ap.add_argument("--system-len", type=int, default=1024, help="shared-prefix: tokens per system prompt")
    ap.add_argument("--docs", type=int, default=4, help="shared-prefix: number of shared documents (RAG-like prompts)")
    ap.add_argument("--doc-len", type=int, default=512, help="shared-prefix: tokens per document")
    ap.add_argument("--max-prompt", type=int, default=1900, help="prompts are cut to this many tokens")
    ap.add_argument("--long-len", type=int, default=1536, help="mixed: tokens of a long prompt")
    ap.add_argument("--short-len", type=int, default=64, help="mixed: tokens of a short prompt")
    ap.add_argument("--prefill-workers", type=int, default=2, help="prefill workers (--graph disagg)")
    ap.add_argument("--decode-workers", type=int, default=2, help="decode workers (--graph disagg)")
    ap.add_argument("--kv-blocks", type=int, default=1024, help="KV blocks per decode worker")
    ap.add_argument("--prefill-kv-blocks", type=int, default=400,
                    help="KV blocks per prefill worker; smaller than the shared prefixes "
                         "together, so a worker's cache holds only some of them and placement matters")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests before each run (not measured)")
    ap.add_argument("--layers", type=int, default=16,
                    help="layers of the tiny model (its preset has 2): more layers make prefill a larger share of TTFT")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the workload")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for a graph to start")
    ap.add_argument("--out", default=str(results_dir()), help="results directory")
    ap.add_argument("--tag", default="route-cpu", help="file stem prefix: <tag>-<workload>.{json,md,png}")
    ap.add_argument("--note", default=None, help="a line added to the results page")
    ap.add_argument("--no-plot", action="store_true", help="write no .png")
    ap.add_argument("--keep-logs", action="store_true", help="keep the graphs' logs (printed path) after a good run")
    ap.add_argument("--quiet-load", type=float, default=0.0,
                    help="wait before each run until the 1-min load average is below this (0: do not wait)")
    ap.add_argument("--quiet-timeout", type=float, default=600.0, help="longest wait for --quiet-load, s")
    ap.add_argument("--one-graph", action="store_true",
                    help="only the measured policy's graph runs (started and stopped per run)")
    ap.add_argument("--from-runs", action="store_true",
                    help="no run: re-render <tag>-<workload>.{json,md,png} from <tag>-<workload>.runs.json in --out")
    ap.add_argument("--resume", action="store_true",
                    help="with --one-graph: keep the runs already in <tag>-<workload>.runs.json in --out (measured with "
                         "the same parameters but --runs) and measure only the missing (policy, run) pairs up to --runs")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    if a.policies is None:
        a.policies = ",".join(POLICIES if a.graph == "disagg" else DEFAULT_POLICIES)
    policies = [p for p in a.policies.split(",") if p]
    if not set(a.workloads) <= set(WORKLOADS) or not a.workloads:
        ap.error(f"--workloads: {', '.join(WORKLOADS)}")
    if not set(policies) <= set(POLICIES) or not policies:
        ap.error(f"--policies: {', '.join(POLICIES)}")
    if a.graph == "agg" and "dynamo-ext-nolocal" in policies:
        ap.error("--policies: dynamo-ext-nolocal needs --graph disagg (agg workers always prefill locally)")

    if a.resume and not a.one_graph:
        ap.error("--resume needs --one-graph")
    if a.from_runs:
        outdir = Path(a.out)
        tables = []
        for wl in a.workloads:
            saved = json.loads((outdir / f"{a.tag}-{wl}.runs.json").read_text())
            for k, v in saved["params"].items():
                if k not in ("workloads", "from_runs", "no_plot"):
                    setattr(a, k, v)
            rows = [with_hit_rate(r) for r in saved["runs"]]
            tables.append(write_outputs(a, wl, rows, saved["info"], saved["machine"],
                                        [p for p in POLICIES if any(r["policy"] == p for r in rows)]))
        print("\n".join(tables))
        return 0

    t0 = time.time()
    mach = machine()
    work = Path(tempfile.mkdtemp(prefix="dx-bench-route-"))
    # one etcd and one NATS per benchmark run: the first graph's launch starts them, the graphs running
    # beside it reuse them (stopped in reverse order, so their owner goes last); --one-graph: one per run
    etcd, nats = f"http://127.0.0.1:{free_port()}", f"nats://127.0.0.1:{free_port()}"
    ok = False
    rows: dict[str, list[dict]] = defaultdict(list)
    info: dict[str, Any] = {}
    done: set[tuple[str, str, int]] = set()  # (workload, policy, run) kept from --resume
    if a.resume:
        for wl in a.workloads:
            path = Path(a.out) / f"{a.tag}-{wl}.runs.json"
            if not path.exists():
                continue
            saved = json.loads(path.read_text())
            mine = {k: v for k, v in vars(a).items() if k not in ("out", "tag", "note", "from_runs", "resume", "runs")}
            diff = {k: (v, mine.get(k)) for k, v in saved["params"].items()
                    if k not in ("runs", "resume", "workloads", "no_plot", "keep_logs", "ready_timeout")
                    and k in mine and mine[k] != v}
            if diff:
                ap.error(f"--resume: {path} was measured with other parameters (saved, now): {diff}")
            rows[wl] = list(saved["runs"])
            done |= {(wl, r["policy"], int(r["run"])) for r in saved["runs"]}
            for name, pinfo in (saved.get("info") or {}).items():
                info.setdefault(name, pinfo)
            log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
            log(f"--resume: {len(saved['runs'])} run(s) kept from {path}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    running: list[Policy] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the graphs (finally) on SIGTERM too
    try:
        model_dir = work / "model" / "tiny"
        subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "model", "init", "--preset", "tiny", str(model_dir)]
                       + (["--layers", str(a.layers)] if a.layers else []),
                       check=True, stdout=subprocess.DEVNULL)

        def report(pol: Policy, wl: str, run: int, row: dict) -> None:
            rows[wl].append(row)
            log(f"{pol.name} {wl} run {run}: {row['completed']}/{row['requests']} ok, TTFT p50 "
                f"{row['ttft_p50_s']} s p99 {row['ttft_p99_s']} s, {row['throughput_tok_s']} tok/s, "
                f"hit {row['prefix_hit_rate']}, KV {row['kv_bytes_moved']} B, load {row['load_before']} -> "
                f"{row['load_after']}")

        if a.one_graph:  # one graph at a time: nothing else of ours runs while a policy is measured
            for wl in a.workloads:
                for run in range(a.runs):
                    for name in (policies if run % 2 == 0 else policies[::-1]):
                        if (wl, name, run) in done:
                            continue
                        pol = Policy(name, a, etcd, nats, work, model_dir, f"{wl[:1]}{run}")
                        running.append(pol)
                        try:
                            row = pol.measure(wl, run)
                            row["startup_s"] = pol.info["startup_s"]
                            report(pol, wl, run, row)
                        finally:
                            running.remove(pol)
                            pol.stop()
                            prev = info.setdefault(name, {"startup_s": pol.info["startup_s"], "runs": []})
                            prev.setdefault("runs", []).append({"workload": wl, "run": run, **pol.info})
                            prev["router_decisions"] = pol.info.get("router_decisions")  # the last run's
                            prev["router_throughput"] = pol.info.get("router_throughput")
        else:
            for policy in policies:  # all graphs up at once: runs interleave, so background load hits all alike
                running.append(Policy(policy, a, etcd, nats, work, model_dir))
            for wl in a.workloads:
                for run in range(a.runs):
                    for pol in (running if run % 2 == 0 else running[::-1]):
                        report(pol, wl, run, pol.measure(wl, run))
        ok = True
    finally:
        for pol in reversed(running):  # the graph that started etcd / NATS stops last
            pol.stop()
            info[pol.name] = pol.info
        if ok and not a.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        elif ok:
            log(f"dynamo-ext bench route: logs in {work}")
        else:
            log(f"dynamo-ext bench route: logs kept in {work}")
    mach["wall_s"] = round(time.time() - t0, 1)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    tables = [write_outputs(a, wl, rows[wl], info, mach, policies) for wl in a.workloads]
    print(f"wall {mach['wall_s']} s")
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
