"""Routing benchmark: round-robin vs Dynamo's KV router vs dynamo-ext, on the same disaggregated workers.

    dynamo-ext bench route                                  # tiny on CPU (committed results, ~4 min on 2 cores)
    python benchmarks/route.py --workloads shared-prefix,mixed --policies round-robin,dynamo-kv,dynamo-ext \
        --requests 24 --rate 3 --runs 1

For each policy one graph is started (the helpers of tests/workers, as benchmarks/serve.py: etcd + NATS
on loopback, --prefill-workers prefill and --decode-workers decode workers, NIXL in host memory):

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
moved (decode workers' ``dynamo_ext_kv_transfer_bytes_total``).

Prefix hit rate: the benchmark subscribes to the graph's KV events (NATS, the subject our workers publish
to) and counts the blocks newly stored by each worker. A prefill computes and stores only the full blocks
that its worker's prefix cache does not hold (engine_runner: ``match_tokens`` then ``commit`` of the rest),
so hit rate = 1 - (blocks stored by the workers that prefilled) / (full prompt blocks sent). Prefills run on
the prefill workers, except dynamo-ext's local prefills on a decode worker; decode workers also store the
blocks they pull, so for dynamo-ext the local prefills' blocks are counted from the decode workers'
stored events minus pulled blocks is not separable: the rate is computed over prefill workers only and
the router's decision counts are reported (local prefills are few or none when every option costs a
pull). Two concurrent misses of the same block on one worker store it once: the rate is an upper bound.

Writes benchmarks/results/route-cpu-<workload>.{json,md,png} (JSON: {"workload", "machine", "results":
[{"policy", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "prefix_hit_rate", "kv_bytes_moved"}]}) and
prints the table last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.serve import (  # noqa: E402
    MODEL, RESULTS, WORDS, Req, _helpers, machine, pct, run_load, scrape_kv)

POLICIES = ("round-robin", "dynamo-kv", "dynamo-ext")
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

    def stop(self) -> None:
        if self._idx is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._idx.close(), self._loop).result(5)
            except Exception:  # noqa: BLE001
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- one policy -----------------------------------------------------------------------------------------------


def start_graph(h: Any, policy: str, a: argparse.Namespace, etcd: str, nats: str, workdir: Path, model_dir: Path):
    ns = "rt" + policy.replace("-", "")
    cfg = {"router": {"policy": policy, "disagg_min_prompt_tokens": 0},
           "workers": {"agg": {"count": 0, "num_kv_blocks": a.kv_blocks},
                       "prefill": {"count": a.prefill_workers, "num_kv_blocks": a.kv_blocks},
                       "decode": {"count": a.decode_workers, "num_kv_blocks": a.kv_blocks}}}
    g = h.Graph(etcd, nats, workdir, model_dir, namespace=ns, **cfg)
    counter = StoredCounter(nats, ns)
    counter.start()
    prefills = [g.start("prefill", wait=False) for _ in range(a.prefill_workers)]
    decodes = [g.start("decode", wait=False) for _ in range(a.decode_workers)]
    procs = prefills + decodes
    router = None
    if policy != "dynamo-kv":
        router = g.start("router", wait=False)
        procs.append(router)
    g.wait_ready(procs, timeout=a.ready_timeout)
    base = g.frontend("kv" if policy == "dynamo-kv" else "round-robin", model=MODEL, timeout=a.ready_timeout)
    return g, base, prefills, decodes, router, counter


def full_blocks(r: Req) -> int:
    return (r.prompt_tokens or len(r.prompt)) // BLOCK


def run_policy(h: Any, policy: str, a: argparse.Namespace, etcd: str, nats: str, work: Path, model_dir: Path,
               log: Any) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    t_start = time.monotonic()
    g, base, prefills, decodes, router, counter = start_graph(h, policy, a, etcd, nats, work, model_dir)
    info: dict[str, Any] = {"startup_s": round(time.monotonic() - t_start, 1)}
    out: dict[str, list[dict]] = defaultdict(list)
    try:
        warm = [Req(i, 0.05 * i, _text(random.Random(900 + i), 200, f"warm{i}"), 4) for i in range(a.warmup)]
        run_load(base, warm, a.timeout)
        kv_urls = [d.metrics_url for d in decodes]
        pids = {p.instance_id for p in prefills}
        for wl in a.workloads:
            for run in range(a.runs):
                time.sleep(0.3)
                kv0, st0 = scrape_kv(kv_urls), counter.snapshot()
                reqs = make_workload(wl, a, a.seed + 1000 * run)
                t0 = run_load(base, reqs, a.timeout)
                time.sleep(0.5)
                kv1, st1 = scrape_kv(kv_urls), counter.snapshot()
                ok = [r for r in reqs if r.ok]
                ttft = [r.ttft() for r in ok]
                end = max((r.done for r in reqs), default=t0)
                dur = max(end - t0, 1e-9)
                stored = {w: st1.get(w, 0) - st0.get(w, 0) for w in set(st1) | set(st0)}
                stored_p = sum(v for w, v in stored.items() if w in pids)
                blocks = sum(full_blocks(r) for r in ok)
                row = {"policy": policy, "run": run, "requests": len(reqs), "completed": len(ok),
                       "errors": [r.error or f"finish={r.finish}" for r in reqs if not r.ok][:3],
                       "ttft_p50_s": round(pct(ttft, 0.5) or float("nan"), 4),
                       "ttft_p99_s": round(pct(ttft, 0.99) or float("nan"), 4),
                       "ttft_mean_s": round(statistics.fmean(ttft), 4) if ttft else None,
                       "throughput_tok_s": round(sum(r.tokens for r in ok) / dur, 1),
                       "prefix_hit_rate": round(max(0.0, 1 - stored_p / blocks), 4) if blocks else 0.0,
                       "kv_bytes_moved": int(kv1[2] - kv0[2]), "kv_transfers": int(kv1[1] - kv0[1]),
                       "prompt_blocks": blocks, "stored_blocks_prefill": stored_p,
                       "stored_blocks_decode": sum(v for w, v in stored.items() if w not in pids),
                       "prompt_tokens_mean": round(statistics.fmean([r.prompt_tokens for r in ok]), 1) if ok else None}
                out[wl].append(row)
                log(f"{policy} {wl} run {run}: {len(ok)}/{len(reqs)} ok, TTFT p50 {row['ttft_p50_s']} s "
                    f"p99 {row['ttft_p99_s']} s, {row['throughput_tok_s']} tok/s, hit {row['prefix_hit_rate']}, "
                    f"KV {row['kv_bytes_moved']} B")
        if router is not None:
            info["router_decisions"] = router.health().get("decisions")
    finally:
        counter.stop()
        g.stop()
    return out, info


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


def markdown(res: dict, extra: dict, a: argparse.Namespace) -> str:
    m = res["machine"]
    rr = {r["policy"]: r for r in res["results"]}
    lines = [f"# Routing benchmark: {res['workload']} on CPU (tiny model)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with another job), Python {m['python']}, "
             f"ai-dynamo {m.get('ai-dynamo')}, torch {m.get('torch')}; load average at start {m['load_avg_1m']}.",
             "",
             f"Graph per policy: {a.prefill_workers} prefill + {a.decode_workers} decode workers "
             f"({a.kv_blocks} KV blocks of {BLOCK} tokens each), NIXL in host memory, Dynamo frontend; "
             "round-robin and dynamo-ext through our router, dynamo-kv = frontend `--router-mode kv`. "
             f"Load: {a.requests} streaming completions, Poisson {a.rate} req/s, {a.output_len} output tokens, "
             f"greedy. {a.runs} run(s) per policy" + (" (median of the runs)" if a.runs > 1 else
                                                      " (one run: no time for 3 on 2 cores; run-to-run noise "
                                                      "is not measured)") + ".", "",
             "Prefix hit rate = 1 - blocks newly stored by the prefill workers (KV events) / full prompt blocks "
             "of the completed requests (see benchmarks/route.py's docstring for its limits; an upper bound). "
             "KV bytes moved = decode workers' `dynamo_ext_kv_transfer_bytes_total` over the run (the decode "
             "worker pulls the whole prompt's KV even when it holds the prefix: workers/README \"Not done\").", ""]
    lines += ["Per run:", "", "| policy | run | done | prompt tok (mean) | TTFT p50 | TTFT p99 | tok/s | hit | "
              "stored blocks (prefill / decode) | prompt blocks | KV bytes |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in extra["runs"]:
        lines.append(f"| {r['policy']} | {r['run']} | {r['completed']}/{r['requests']} | {r['prompt_tokens_mean']} | "
                     f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['throughput_tok_s']:.1f} | "
                     f"{r['prefix_hit_rate']:.1%} | {r['stored_blocks_prefill']} / {r['stored_blocks_decode']} | "
                     f"{r['prompt_blocks']} | {r['kv_bytes_moved']:,} |")
    lines += ["", "Router decisions (our router; dynamo-kv has none): "
              + "; ".join(f"{p}: {i.get('router_decisions')}" for p, i in extra["info"].items()) + ".", "",
              "Start-up per graph: " + ", ".join(f"{p} {i['startup_s']} s" for p, i in extra["info"].items()) + "."]
    if res["workload"].startswith("shared-prefix") and {"round-robin", "dynamo-ext"} <= set(rr):
        ext, base = rr["dynamo-ext"], rr["round-robin"]
        kv = rr.get("dynamo-kv")
        lines += ["", "Target (issue 6, not a test): dynamo-ext TTFT p99 <= 0.5 x round-robin: "
                  f"{ext['ttft_p99_s']:.3f} vs {0.5 * base['ttft_p99_s']:.3f} s -> "
                  f"{'met' if ext['ttft_p99_s'] <= 0.5 * base['ttft_p99_s'] else 'NOT met'}"
                  + (f"; p50/p99 <= Dynamo KV router ({kv['ttft_p50_s']:.3f} / {kv['ttft_p99_s']:.3f} s): "
                     f"{'met' if ext['ttft_p50_s'] <= kv['ttft_p50_s'] and ext['ttft_p99_s'] <= kv['ttft_p99_s'] else 'NOT met'}"
                     if kv else "") + "."]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=3.0, help="req/s (Poisson)")
    ap.add_argument("--runs", type=int, default=1, help="runs per policy and workload (median reported)")
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--systems", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--max-prompt", type=int, default=1900)
    ap.add_argument("--long-len", type=int, default=1536)
    ap.add_argument("--short-len", type=int, default=64)
    ap.add_argument("--prefill-workers", type=int, default=2)
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="route-cpu", help="file stem prefix: <tag>-<workload>.{json,md,png}")
    ap.add_argument("--note", default=None)
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    a.workloads = [w for w in a.workloads.split(",") if w]
    policies = [p for p in a.policies.split(",") if p]
    if not set(a.workloads) <= set(WORKLOADS) or not a.workloads:
        ap.error(f"--workloads: {', '.join(WORKLOADS)}")
    if not set(policies) <= set(POLICIES) or not policies:
        ap.error(f"--policies: {', '.join(POLICIES)}")

    t0 = time.time()
    h = _helpers()
    mach = machine()
    work = Path(tempfile.mkdtemp(prefix="dx-bench-route-"))
    etcd = h.EtcdServer("etcd", h.make_workdir("dx-br-etcd-"))
    nats = h.NatsServer("nats", h.make_workdir("dx-br-nats-"))
    rows: dict[str, list[dict]] = defaultdict(list)
    info: dict[str, Any] = {}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        model_dir = work / "model" / "tiny"
        subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "model", "init", "--preset", "tiny", str(model_dir)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        etcd.start()
        nats.start()
        for policy in policies:
            out, inf = run_policy(h, policy, a, etcd.url, nats.url, work, model_dir, log)
            info[policy] = inf
            for wl, rs in out.items():
                rows[wl] += rs
    finally:
        etcd.stop()
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)
    mach["wall_s"] = round(time.time() - t0, 1)
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    tables = []
    for wl in a.workloads:
        res = {"workload": wl, "machine": f"{mach['cpu']}, {mach['cores']} cores, CPU only (no GPU), "
                                          f"load avg {mach['load_avg_1m']} at start; tiny model",
               "results": [median_row([r for r in rows[wl] if r["policy"] == p]) for p in policies
                           if any(r["policy"] == p for r in rows[wl])]}
        stem = f"{a.tag}-{wl}"
        (outdir / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        md = markdown({**res, "machine": mach}, {"runs": rows[wl], "info": info}, a)
        (outdir / f"{stem}.md").write_text(md)
        (outdir / f"{stem}.runs.json").write_text(json.dumps({"machine": mach, "params": {
            k: v for k, v in vars(a).items() if k not in ("out", "tag", "note")}, "runs": rows[wl],
            "info": info}, indent=2) + "\n")
        if not a.no_plot:
            try:
                plot({**res, "machine": mach}, outdir / f"{stem}.png")
            except ImportError as e:
                log(f"no plot: {e}")
        tables.append(f"## {wl}\n\n{table(res)}\n")
    print(f"wall {mach['wall_s']} s")
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
