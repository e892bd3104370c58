"""Decision latency of ``dynamo_ext.routing.decide`` at 16, 256 and 1,024 simulated workers.

Workers are 1:3 prefill:decode, 8 per node. Per scenario: random queues, throughputs, free blocks,
admission delays, per-request prefix overlaps (device/host/disk), 5% of workers on a second layout,
a few unhealthy workers; links: same-node default (NVLink-class) and cross-node default (RDMA-class)
plus measured entries for 10% of prefill->decode pairs (0.3..60 GB/s, 1% unhealthy). Prompts are
512..32k tokens (all above the short-prompt rule, so every decision evaluates pairs: the slow path).
Only the ``decide`` call is timed (time.perf_counter_ns), inputs are built beforehand; GC stays on.

    .venv/bin/dynamo-ext bench routing [--decisions 2000] [--sizes 16 256 1024] [--label NAME]
    .venv/bin/dynamo-ext bench routing --no-measure --merge other/routing_latency.json

Writes benchmarks/results/routing_latency.{json,md,png}: one run per ``--label`` (a run with the same
label is replaced), so numbers from several machines sit side by side. Each decision is timed by wall
clock and by the thread's CPU time. Target: p99 <= 1 ms at 256 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench._machine import cpu_model
from dynamo_ext.routing import (
    LinkInfo,
    LinkTable,
    RequestShape,
    Role,
    Tier,
    WorkerSnapshot,
    decide,
    estimate_all,
)

KV_BYTES_PER_TOKEN = 131_072  # Llama-3-8B-shaped: 32 layers x 8 KV heads x 128 x K,V x bf16
BLOCK = 16


def make_request(rng: random.Random, i: int) -> RequestShape:
    prompt = int(min(32768, max(512, rng.lognormvariate(8.0, 1.0))))
    return RequestShape(prompt_tokens=prompt, block_size=BLOCK, kv_bytes_per_token=KV_BYTES_PER_TOKEN,
                        expected_output_tokens=rng.randint(16, 1024), request_id=f"r{i}")


def make_scenario(rng: random.Random, n: int, req: RequestShape) -> tuple[list[WorkerSnapshot], LinkTable]:
    n_prefill = max(1, n // 4)
    pblocks = req.prompt_blocks
    workers = []
    for wid in range(n):
        role = Role.PREFILL if wid < n_prefill else Role.DECODE
        has_overlap = rng.random() < 0.3
        workers.append(WorkerSnapshot(
            worker_id=wid,
            role=role,
            prefill_tokens_per_s=rng.uniform(8_000, 40_000),
            layout_key="llama8b-bf16-b16" if rng.random() > 0.05 else "llama8b-fp8-b16",
            queue_tokens=rng.randint(0, 64_000),
            queued_requests=rng.randint(0, 16),
            active_blocks=rng.randint(0, 40_000),
            free_blocks=rng.randint(0, 40_000),
            admission_delay_s=rng.uniform(0.0, 0.2) if role is not Role.PREFILL else 0.0,
            overlap_blocks=rng.randint(0, pblocks) if has_overlap else 0,
            overlap_tier=rng.choice((Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.DISK)),
            healthy=rng.random() > 0.02,
            node=f"node{wid // 8}",
        ))
    links = {}
    for p in range(n_prefill):
        for d in range(n_prefill, n):
            if rng.random() < 0.10:
                links[(p, d)] = LinkInfo(gb_per_s=rng.uniform(0.3, 60.0), latency_s=rng.uniform(2e-6, 1e-4),
                                         healthy=rng.random() > 0.01)
    table = LinkTable(links, default=LinkInfo(25.0, 20e-6), same_node=LinkInfo(150.0, 5e-6))
    return workers, table


def percentile(sorted_vals: list[float], q: float) -> float:
    k = (len(sorted_vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def machine() -> dict:
    cpu = cpu_model()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def bench_size(n: int, decisions: int, seed: int, scenarios: int, brute: int) -> dict:
    rng = random.Random(seed * 1_000_003 + n)
    cases = []
    for i in range(scenarios):
        req = make_request(rng, i)
        ws, lt = make_scenario(rng, n, req)
        cases.append((req, ws, lt))
    for req, ws, lt in cases[:5]:  # warm-up
        decide(req, ws, lt)
    lat_us, cpu_us, evaluated, pruned, disagg = [], [], 0, 0, 0
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for i in range(decisions):
        req, ws, lt = cases[i % scenarios]
        c0 = cpu()
        t0 = wall()
        d = decide(req, ws, lt)
        t1 = wall()
        c1 = cpu()
        lat_us.append((t1 - t0) / 1000.0)
        cpu_us.append((c1 - c0) / 1000.0)
        evaluated += d.evaluated
        pruned += d.pruned
        disagg += d.disaggregated
    s = sorted(lat_us)
    c = sorted(cpu_us)
    out = {
        "workers": n,
        "prefill": max(1, n // 4),
        "decode": n - max(1, n // 4),
        "decisions": decisions,
        "scenarios": scenarios,
        "p50_us": percentile(s, 0.50),
        "p90_us": percentile(s, 0.90),
        "p99_us": percentile(s, 0.99),
        "max_us": s[-1],
        "mean_us": statistics.fmean(s),
        "cpu_p50_us": percentile(c, 0.50),
        "cpu_p99_us": percentile(c, 0.99),
        "mean_options_evaluated": evaluated / decisions,
        "mean_pairs_pruned": pruned / decisions,
        "disaggregated_share": disagg / decisions,
    }
    if brute:
        b = []
        for i in range(brute):
            req, ws, lt = cases[i % scenarios]
            t0 = time.perf_counter_ns()
            estimate_all(req, ws, lt)
            b.append((time.perf_counter_ns() - t0) / 1000.0)
        b.sort()
        out["unpruned_reference_p50_us"] = percentile(b, 0.5)
        out["unpruned_reference_runs"] = brute
    return out


def run_record(rows: list[dict], info: dict, args: argparse.Namespace) -> dict:
    return {"label": args.label, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": info,
            "decisions_per_size": args.decisions, "scenarios": args.scenarios, "seed": args.seed, "results": rows}


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return list(data.get("runs", []))


def merge_runs(runs: list[dict], new: list[dict]) -> list[dict]:
    """Replace runs with the same label, keep the others; order by label."""
    labels = {r["label"] for r in new}
    return sorted([r for r in runs if r["label"] not in labels] + new, key=lambda r: r["label"])


def write_json(results_dir: Path, runs: list[dict]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "routing_latency", "target": "p99 <= 1000 us at 256 workers",
               "script": "dynamo_ext/bench/routing_latency.py", "runs": runs}
    (results_dir / "routing_latency.json").write_text(json.dumps(payload, indent=2) + "\n")


def render(results_dir: Path, runs: list[dict]) -> None:
    lines = [
        "# routing decision latency (`dynamo_ext.routing.decide`)",
        "",
        "Produced by `dynamo-ext bench routing` (raw numbers in `routing_latency.json`). Only the",
        "`decide()` call is timed; inputs are built beforehand; garbage collection stays on; single thread.",
        "",
        "Workload: workers 1:3 prefill:decode, 8 per node; random queues, throughputs, free blocks, admission",
        "delays, per-request overlaps (device/host/disk), 5% of workers on a second layout, ~2% unhealthy",
        "workers; same-node and cross-node default links plus measured entries for 10% of prefill->decode",
        "pairs (1% unhealthy). Prompts 512..32k tokens, so every decision evaluates pairs (the slow path:",
        "short prompts return after the local options).",
        "",
        "`wall` = time.perf_counter_ns around the call; `cpu` = time.thread_time_ns (this thread's CPU time,",
        "which leaves out time the thread waited for a core). On a shared, oversubscribed machine the wall",
        "tail is scheduler preemption, not the algorithm: on the 2-core dev box at a 1-min load average of",
        "3.2 (other jobs), a run of slightly older code measured wall p99 2.6 ms at 256 workers, cpu p99 0.67 ms.",
        "Compare cpu p99, or wall p99 from a quiet or dedicated machine, with the target.",
        "`unpruned` = `estimate_all` (every pair, no pruning) p50, for scale.",
        "",
    ]
    for run in runs:
        m = run["machine"]
        load = m.get("loadavg_1m_at_start")
        lines += [
            f"## {run['label']}",
            "",
            f"{m['cpu_model']}; {m['cpus_usable']} usable of {m['cpu_count']} logical CPUs; 1-min load average "
            f"{load:.2f} at start; {m['implementation']} {m['python']}; {m['platform']}. Run {run['date_utc']}, "
            f"{run['decisions_per_size']} decisions per size over {run['scenarios']} scenarios, seed {run['seed']}.",
            "",
            "| workers (P x D) | wall p50 µs | wall p90 µs | wall p99 µs | wall max µs | cpu p50 µs | cpu p99 µs "
            "| options evaluated | pairs pruned | disagg share | unpruned p50 µs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["results"]:
            ref = f"{r['unpruned_reference_p50_us']:.0f}" if "unpruned_reference_p50_us" in r else "-"
            lines.append(
                f"| {r['workers']} ({r['prefill']} x {r['decode']}) | {r['p50_us']:.0f} | {r['p90_us']:.0f} "
                f"| {r['p99_us']:.0f} | {r['max_us']:.0f} | {r['cpu_p50_us']:.0f} | {r['cpu_p99_us']:.0f} "
                f"| {r['mean_options_evaluated']:.1f} | {r['mean_pairs_pruned']:.0f} "
                f"| {r['disaggregated_share']:.2f} | {ref} |"
            )
        at256 = [r for r in run["results"] if r["workers"] == 256]
        if at256:
            r = at256[0]
            lines += ["", f"p99 <= 1 ms at 256 workers: wall **{'met' if r['p99_us'] <= 1000 else 'not met'}** "
                          f"({r['p99_us']:.0f} µs), cpu **{'met' if r['cpu_p99_us'] <= 1000 else 'not met'}** "
                          f"({r['cpu_p99_us']:.0f} µs)."]
        lines.append("")
    lines += ["![latency](routing_latency.png)", ""]
    (results_dir / "routing_latency.md").write_text("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.0), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs):
        rows = run["results"]
        xs = [r["workers"] for r in rows]
        for key, label, mark in (("p50_us", "wall p50", "o-"), ("p99_us", "wall p99", "s-"),
                                 ("cpu_p99_us", "cpu p99", "d--")):
            ax.plot(xs, [r[key] for r in rows], mark, label=label)
        ref = [(r["workers"], r["unpruned_reference_p50_us"]) for r in rows if "unpruned_reference_p50_us" in r]
        if ref:
            ax.plot([a for a, _ in ref], [b for _, b in ref], "x:", color="grey", label="unpruned p50")
        ax.axhline(1000.0, color="red", lw=0.8, ls="--", label="1 ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("workers (1:3 prefill:decode)")
        ax.set_title(f"{run['label']}\n{run['machine']['cpu_model'][:40]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decide() latency, µs")
    fig.tight_layout()
    fig.savefig(results_dir / "routing_latency.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench routing", description=__doc__.splitlines()[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--decisions", type=int, default=2000, help="timed decisions per cluster size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024], help="cluster sizes (workers)")
    ap.add_argument("--scenarios", type=int, default=40, help="distinct (request, workers, links) inputs per size")
    ap.add_argument("--brute", type=int, default=50, help="unpruned estimate_all runs per size (<=256 workers)")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the generated inputs")
    ap.add_argument("--label", default="dev box", help="name of this run in the results (same label: replaced)")
    ap.add_argument("--results-dir", type=Path, default=results_dir(),
                    help="where routing_latency.json / .md / .png go")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="routing_latency.json files whose runs are merged in (e.g. from another machine)")
    ap.add_argument("--no-measure", action="store_true", help="only merge and render")
    ap.add_argument("--no-write", action="store_true", help="measure and print, write no result files")
    args = ap.parse_args(argv)
    new = []
    if not args.no_measure:
        info = machine()
        rows = []
        for n in args.sizes:
            r = bench_size(n, args.decisions, args.seed, args.scenarios, args.brute if n <= 256 else 0)
            rows.append(r)
            print(json.dumps(r), flush=True)
        new.append(run_record(rows, info, args))
    for path in args.merge:
        new.extend(load_runs(path))
    if args.no_write:
        return 0
    runs = merge_runs(load_runs(args.results_dir / "routing_latency.json"), new)
    write_json(args.results_dir, runs)
    render(args.results_dir, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
