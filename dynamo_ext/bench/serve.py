"""Serving benchmark: aggregated vs disaggregated graphs through Dynamo's OpenAI HTTP frontend.

    dynamo-ext bench serve                                   # tiny on CPU (committed results, ~2 min on 2 cores)
    dynamo-ext bench serve --rates 2,4,8,16,32,64 --requests 40 --prompt-len 256 --prompt-len-jitter 0.25 \
        --output-len 32 --graphs agg,disagg
    dynamo-ext bench serve --prompt-lens 64,512,1024 --rates 4 ...    # one cell per (graph, prompt length, rate)

Each graph is started as ``dynamo-ext serve`` starts it (``dynamo_ext.launch.launch_graph``: etcd + NATS on
free loopback ports, workers via ``python -m dynamo_ext.workers``, our router, Dynamo's frontend
``python -m dynamo.frontend --router-mode round-robin``), and stopped (records audited) before the next:

  agg     frontend -> router -> --agg-workers aggregated workers                         (graphs/agg.py)
  disagg  frontend -> router -> --prefill-workers prefill, --decode-workers decode;
          KV moved prefill -> decode by NIXL (host memory here)                           (graphs/disagg.py)

the graph is started, warmed up (a few requests), then for every rate in --rates, --requests streaming
completions (``stream: true``, ``ignore_eos``, usage included) are sent with Poisson arrivals (exponential
gaps, seeded), for every request class (prompt length) of --prompt-lens (default: --prompt-len). Prompts
are random words of the class's length in bytes +- --prompt-len-jitter (uniform, a fraction; the tiny
tokenizer is byte-level: bytes = tokens), each with a unique prefix (no prefix-cache hits); outputs
--output-len tokens +- --output-len-jitter.

Per request: TTFT = first SSE chunk with a choice - send; TPOT = (last chunk - first chunk) / (tokens - 1),
tokens = ``usage.completion_tokens``. Per cell (graph, prompt length, rate): TTFT / TPOT p50 and p99 (linear
interpolation; with 20 requests p99 is close to the maximum), output tokens/s and requests/s over the window
from the first send to the last completion. Disagg: the decode workers' ``/metrics`` are scraped before and
after each cell (``launch_graph(...).metrics(role="decode")``, parsed with prometheus_client) and
differenced per backend / path / direction (``dynamo_ext/bench/_kv.py``): KV bytes, pulls
(``dynamo_ext_kv_transfer_seconds_count``), mean pull seconds (``_sum / _count``), pull GB/s (bytes /
summed pull seconds), the backend(s), and the KV transfer share of TTFT = mean pull s / mean TTFT.

Writes benchmarks/results/serve-<device>-<preset>.{json,md,png} (or --out / --tag; JSON: {"runtime":
"dynamo", "machine", "params", "startup_s", "results": [one row per cell], "wall_s"}) and prints the table
last. The committed results are CPU-only; the GPU part (llama3-70b-shape, 4K prompts, NVLink) is not run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dynamo_ext.bench import results_dir
from dynamo_ext.bench._kv import kv_delta, kv_summary, kv_totals
from dynamo_ext.bench._machine import cpu_model
from dynamo_ext.bench._stats import pct  # noqa: F401 - route.py imports it from here
from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.infra import free_port
MODEL = "dx/tiny"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from the old red barn "
         "and nobody counts how many small grey birds sing in tall green trees near quiet water").split()


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                            "device": "cpu", "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        from importlib.metadata import version

        info["ai-dynamo"] = version("ai-dynamo")
        info["torch"] = version("torch")
    except Exception:  # noqa: BLE001
        pass
    return info


# -- load -----------------------------------------------------------------------------------------------------


@dataclass
class Req:
    i: int
    at: float  # planned send, seconds after the start of the rate's run
    prompt: str
    max_tokens: int
    sent: float = 0.0
    first: float = 0.0
    last: float = 0.0
    done: float = 0.0
    chunks: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.error and self.finish in ("length", "stop") and self.tokens > 0 and self.first > 0

    def ttft(self) -> float:
        return self.first - self.sent

    def tpot(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


def _prompt(rng: random.Random, n: int, tag: str) -> str:
    s = f"{tag} "
    while len(s) < n:
        s += rng.choice(WORDS) + " "
    return s[:n]


def make_requests(a: argparse.Namespace, rate: float, seed: int, tag: str, prompt_len: int | None = None) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    plen = a.prompt_len if prompt_len is None else prompt_len
    for i in range(a.requests):
        t += rng.expovariate(rate) if i else 0.0
        pl = max(8, round(plen * (1 + rng.uniform(-a.prompt_len_jitter, a.prompt_len_jitter))))
        ol = max(2, round(a.output_len * (1 + rng.uniform(-a.output_len_jitter, a.output_len_jitter))))
        out.append(Req(i, t, _prompt(rng, pl, f"{tag}-{i}-{rng.getrandbits(32):08x}"), ol))
    return out


def stream_one(base: str, r: Req, timeout: float) -> None:
    u = urlparse(base)
    body = json.dumps({"model": MODEL, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    r.sent = time.monotonic()
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if line.startswith("event:") and "error" in line:
                r.error = r.error or line
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                d = json.loads(data)
            except ValueError:
                r.error = r.error or data[:300]
                continue
            if "error" in d and not d.get("choices"):
                r.error = r.error or json.dumps(d)[:300]
            if d.get("choices"):
                now = time.monotonic()
                r.first = r.first or now
                r.last = now
                r.chunks += 1
                for c in d["choices"]:
                    r.finish = c.get("finish_reason") or r.finish
            if d.get("usage"):
                r.tokens = int(d["usage"].get("completion_tokens") or 0)
                r.prompt_tokens = int(d["usage"].get("prompt_tokens") or 0)
        conn.close()
    except Exception as e:  # noqa: BLE001
        r.error = r.error or f"{type(e).__name__}: {e}"
    finally:
        r.done = time.monotonic()


def run_load(base: str, reqs: list[Req], timeout: float, progress: Any = None) -> float:
    """Send reqs at their planned times (one thread each); returns the start time."""
    threads = []
    t0 = time.monotonic()
    for r in reqs:
        delay = t0 + r.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=stream_one, args=(base, r, timeout), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout + 5)
        if progress is not None:
            progress.update(1)
    for r, th in zip(reqs, threads):
        if th.is_alive():
            r.error = r.error or f"no end after {timeout} s"
    return t0


# -- metrics --------------------------------------------------------------------------------------------------


def decode_kv(g: Any) -> dict:
    """The decode workers' KV transfer counters now, per backend / path / direction (summed over workers)."""
    return kv_totals(g.metrics(role="decode"))


def summarize(graph: str, rate: float, reqs: list[Req], t0: float, kv: dict[str, Any] | None,
              prompt_len: int | None = None) -> dict:
    """One cell's row; ``kv``: ``_kv.kv_summary`` of the decode workers' metrics over the cell (None: agg)."""
    ok = [r for r in reqs if r.ok]
    ttft = [r.ttft() for r in ok]
    tpot = [x for x in (r.tpot() for r in ok) if x is not None]
    end = max((r.done for r in reqs), default=t0)
    dur = max(end - t0, 1e-9)
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    row: dict[str, Any] = {
        "graph": graph, "prompt_len": prompt_len, "rate": rate, "requests": len(reqs), "completed": len(ok),
        "errors": [r.error or f"finish={r.finish} tokens={r.tokens}" for r in reqs if not r.ok][:5],
        "duration_s": round(dur, 3),
        "ttft_p50_ms": ms(pct(ttft, 0.5)), "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "ttft_mean_ms": ms(statistics.fmean(ttft) if ttft else None),
        "tpot_p50_ms": ms(pct(tpot, 0.5)), "tpot_p99_ms": ms(pct(tpot, 0.99)),
        "output_tok_s": round(sum(r.tokens for r in ok) / dur, 1), "req_s": round(len(ok) / dur, 2),
        "prompt_tokens_mean": round(statistics.fmean([r.prompt_tokens for r in ok]), 1) if ok else None,
        "output_tokens_mean": round(statistics.fmean([r.tokens for r in ok]), 1) if ok else None,
        "samples": [{"at_s": round(r.at, 3), "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                     "ttft_ms": ms(r.ttft()) if r.ok else None, "tpot_ms": ms(r.tpot()) if r.ok else None,
                     "error": None if r.ok else (r.error or f"finish={r.finish}")} for r in reqs],
    }
    if kv is not None:
        n, b, mean_s = kv["kv_transfers"], kv["kv_bytes"], kv["kv_pull_s_mean"]
        row.update(kv)  # kv_bytes, kv_transfers (pulls), kv_pull_s_mean, kv_pull_gbps, kv_backends, kv_by_path
        row["kv_bytes_per_request"] = round(b / n) if n else None
        row["kv_transfer_mean_ms"] = ms(mean_s) if n else None
        row["kv_share_of_ttft"] = round(mean_s / statistics.fmean(ttft), 4) if n and ttft else None
    return row


# -- graphs ---------------------------------------------------------------------------------------------------


def graph_config(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    """The dynamo.yaml of one graph (etcd and NATS on free loopback ports: the launch starts them)."""
    workers = ({"agg": {"count": a.agg_workers, "num_kv_blocks": a.kv_blocks}} if kind == "agg" else
               {"prefill": {"count": a.prefill_workers, "num_kv_blocks": a.kv_blocks},
                "decode": {"count": a.decode_workers, "num_kv_blocks": a.kv_blocks}})
    return {"model": {"name": MODEL, "preset": a.preset, "block_size": 16, "dtype": "float32"},
            "kv_transfer": {"backend": "nixl", "timeout_ms": 2000},
            "workers": workers,
            "router": {"policy": a.policy, "disagg_min_prompt_tokens": 0},
            "discovery": {"namespace": f"bench{kind}",
                          "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"], "lease_ttl_s": 10},
                          "nats": {"url": f"nats://127.0.0.1:{free_port()}"}}}  # fmt: skip


def bench_graph(kind: str, a: argparse.Namespace, workdir: Path, model_dir: Path, bar: Any) -> tuple[list[dict], float]:
    t_start = time.monotonic()
    rows = []
    with launch_graph(f"graphs.{kind}", graph_config(kind, a),
                      model_dir=model_dir, log_dir=workdir / f"logs-{kind}",
                      ready_timeout=a.ready_timeout) as g:  # fmt: skip
        startup = time.monotonic() - t_start
        pulls = kind == "disagg"
        warm = make_requests(argparse.Namespace(**{**vars(a), "requests": a.warmup}), 100.0, a.seed + 999, "warm")
        run_load(g.base_url, warm, a.timeout)
        k = 0
        for plen in a.prompt_lens:
            for rate in a.rates:
                before = decode_kv(g) if pulls else None
                reqs = make_requests(a, rate, a.seed + k, f"{kind}{plen}-{rate}", plen)
                k += 1
                bar.set_postfix_str(f"{kind} {plen} tok {rate:g} req/s")
                t0 = run_load(g.base_url, reqs, a.timeout, bar)
                kv = None
                if pulls:
                    time.sleep(0.3)
                    kv = kv_summary(kv_delta(decode_kv(g), before))
                g.check()  # a worker that died under the load fails the run, not a cell later
                row = summarize(kind, rate, reqs, t0, kv, plen)
                rows.append(row)
                bar.write(f"{kind} {plen} tok {rate:g} req/s: {row['completed']}/{row['requests']} ok, "
                          f"TTFT p50 {row['ttft_p50_ms']} ms, TPOT p50 {row['tpot_p50_ms']} ms, "
                          f"{row['output_tok_s']} tok/s"
                          + (f", KV {row['kv_transfers']} pulls {row['kv_pull_gbps']} GB/s {row['kv_backends']}"
                             if kv is not None else ""))  # fmt: skip
    return rows, startup


# -- outputs --------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> str:
    """The markdown: setup and notes first, the results table last."""
    m, p = res["machine"], res["params"]
    plens = ", ".join(str(x) for x in (p.get("prompt_lens") or [p["prompt_len"]]))
    lines = [f"# Serving benchmark: agg vs disagg, {p['preset']} on {m['device']} through Dynamo's HTTP frontend", "",
             f"Runtime: {res.get('runtime', 'dynamo')} (Dynamo's frontend and our workers, each graph started by "
             "`dynamo_ext.launch.launch_graph` as `dynamo-ext serve` starts it). "
             f"Machine: {m['cpu']}, {m['cores']} cores (shared), Python {m['python']}, "
             f"ai-dynamo {m.get('ai-dynamo')}, torch {m.get('torch')}; load average at start {m['load_avg_1m']}.", "",
             f"Graphs: agg = frontend -> router ({p['policy']}) -> {p['agg_workers']} aggregated worker(s); "
             f"disagg = frontend -> router ({p['policy']}) -> {p['prefill_workers']} prefill + {p['decode_workers']} "
             f"decode worker(s), KV by NIXL in host memory. Start-up: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in res["startup_s"].items()) + ".", "",
             f"Load: {p['requests']} streaming completions per cell (graph, prompt length, rate), Poisson "
             f"arrivals, prompts of {plens} tokens +-{p['prompt_len_jitter']:.0%} (uniform), outputs {p['output_len']} tokens "
             f"+-{p['output_len_jitter']:.0%} (ignore_eos), greedy; {p['warmup']} warm-up requests per graph. "
             "TTFT = first SSE chunk - send; TPOT = (last - first chunk) / (tokens - 1); throughput over first "
             f"send -> last completion. With {p['requests']} requests p99 is about the maximum. "
             f"Total wall {res['wall_s']} s.", "",
             "KV pulls from the decode workers' `/metrics`, scraped before and after each cell and differenced "
             "per backend / path: pulls = `dynamo_ext_kv_transfer_seconds_count`, bytes = "
             "`dynamo_ext_kv_transfer_bytes_total`, pull GB/s = bytes / summed pull seconds. "
             "KV share of TTFT = mean pull seconds (`dynamo_ext_kv_transfer_seconds` sum/count over the cell) "
             "/ mean TTFT; it times the READ only (add_peer, the prefill -> router -> decode "
             "hand-off and the release call are not in it: they are part of the disagg - agg TTFT difference, with "
             f"the extra hop). The tiny model's KV per request is small ({_kv_bytes(res)}), moved by NIXL/UCX in "
             f"host memory; TTFT here is mostly HTTP + frontend + router + queueing on {m['cores']} cores shared by "
             "every process (the load generator included), so these numbers say little about GPU serving. TPOT is "
             "measured at the client: when the frontend or the client falls behind, chunks arrive in bursts, so "
             "TPOT p50 can drop while TTFT and TPOT p99 rise at the highest rates.", "",
             "**Not run here (no GPU in this session):** the GPU part of issue 5 (llama3-70b-shape layers "
             "in-process, 4K-token prompts, KV over NVLink; target: KV transfer <= 3% of TTFT). Run on a GPU box "
             "with `dynamo-ext bench serve` once the engine runs on CUDA in the workers (the workers' pools are "
             "host memory today, workers/README \"Not done\")."]
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", "| graph | rate (req/s) | done | prompt tok (mean) | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
              "| TPOT p99 (ms) | output tok/s | req/s | KV transfer mean (ms) | KV share of TTFT | KV pulls | "
              "KV KiB/req | pull GB/s | backend |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["results"]:
        share = r.get("kv_share_of_ttft")
        lines.append(f"| {r['graph']} | {r['rate']:g} | {r['completed']}/{r['requests']} | "
                     f"{_f(r['prompt_tokens_mean'], '{:.0f}')} | {_f(r['ttft_p50_ms'])} | {_f(r['ttft_p99_ms'])} | "
                     f"{_f(r['tpot_p50_ms'], '{:.2f}')} | {_f(r['tpot_p99_ms'], '{:.2f}')} | "
                     f"{_f(r['output_tok_s'])} | {_f(r['req_s'], '{:.2f}')} | "
                     f"{_f(r.get('kv_transfer_mean_ms'), '{:.2f}')} | "
                     f"{_f(None if share is None else share * 100, '{:.1f}%')} | "
                     f"{_f(r.get('kv_transfers'), '{:d}')} | "
                     f"{_f(None if r.get('kv_bytes_per_request') is None else r['kv_bytes_per_request'] / 1024)} | "
                     f"{_f(r.get('kv_pull_gbps'), '{:.3f}')} | {', '.join(r.get('kv_backends') or []) or '-'} |")
    return "\n".join(lines) + "\n"


def _kv_bytes(res: dict) -> str:
    b = [r["kv_bytes_per_request"] for r in res["results"] if r.get("kv_bytes_per_request")]
    return f"{statistics.fmean(b) / 1024:.0f} KiB measured" if b else "not measured"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(13, 4))
    plens = sorted({r.get("prompt_len") for r in res["results"]}, key=lambda x: x or 0)
    colors = {"agg": plt.cm.Blues, "disagg": plt.cm.Oranges}
    for kind, style in (("agg", "o-"), ("disagg", "s--")):
        for j, plen in enumerate(plens):
            rs = [r for r in res["results"] if r["graph"] == kind and r.get("prompt_len") == plen]
            if not rs:
                continue
            color = colors[kind](0.75 - 0.4 * j / max(1, len(plens) - 1)) if len(plens) > 1 else \
                {"agg": "tab:blue", "disagg": "tab:orange"}[kind]
            name = kind if len(plens) == 1 else f"{kind} {plen} tok"
            x = [r["rate"] for r in rs]
            for ax, key in ((axs[0], "ttft"), (axs[1], "tpot")):
                ax.plot(x, [r[f"{key}_p50_ms"] for r in rs], style, color=color, label=f"{name} p50")
                ax.plot(x, [r[f"{key}_p99_ms"] for r in rs], style, color=color, alpha=0.4, label=f"{name} p99")
            axs[2].plot(x, [r["output_tok_s"] for r in rs], style, color=color, label=name)
    for ax, t, y in zip(axs, ("TTFT", "TPOT", "throughput"), ("ms", "ms", "output tokens/s")):
        ax.set_title(t)
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_xscale("log", base=2)
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
    p, m = res["params"], res["machine"]
    fig.suptitle(f"{p['preset']} on {m['cpu']} ({m['cores']} cores): prompts "
                 f"{', '.join(str(x) for x in (p.get('prompt_lens') or [p['prompt_len']]))}, "
                 f"outputs {p['output_len']}, "
                 f"{p['requests']} requests per rate", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    # `--runtime direct`: the same agg vs disagg comparison without the Dynamo runtime (dynamo_ext/bench/serve_direct.py)
    rest = list(sys.argv[1:] if argv is None else argv)
    for i, x in enumerate(rest):
        if x == "--runtime" or x.startswith("--runtime="):
            val = x.partition("=")[2] if "=" in x else (rest[i + 1] if i + 1 < len(rest) else "")
            if val not in ("dynamo", "direct"):
                raise SystemExit(f"--runtime: {val!r} is not one of dynamo, direct")
            rest = rest[:i] + rest[i + (1 if "=" in x else 2):]
            if val == "direct":
                from dynamo_ext.bench import serve_direct  # noqa: PLC0415

                return serve_direct.main(rest)
            return main(rest)
    ap = argparse.ArgumentParser(prog="dynamo-ext bench serve", description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", default="agg,disagg")
    ap.add_argument("--rates", default="2,4,8,16,32,64", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=40, help="requests per rate")
    ap.add_argument("--prompt-len", type=int, default=256,
                    help="prompt tokens (bytes: the tiny tokenizer is byte-level)")
    ap.add_argument("--prompt-lens", default=None,
                    help="request classes: prompt lengths, comma-separated (default: --prompt-len); one cell per "
                         "(graph, prompt length, rate)")
    ap.add_argument("--prompt-len-jitter", type=float, default=0.25, help="uniform +- fraction of the prompt length")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--output-len-jitter", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=4, help="requests sent to each graph before measuring")
    ap.add_argument("--agg-workers", type=int, default=2)
    ap.add_argument("--prefill-workers", type=int, default=1)
    ap.add_argument("--decode-workers", type=int, default=1)
    ap.add_argument("--policy", default="round-robin", choices=("round-robin", "dynamo-ext"))
    ap.add_argument("--kv-blocks", type=int, default=1024, help="KV blocks (16 tokens) per worker")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="per request (s)")
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--out", default=str(results_dir()))
    ap.add_argument("--tag", default=None, help="file name stem (default serve-cpu-<preset>)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--note", default=None, help="a paragraph added to the markdown (e.g. run-to-run noise seen)")
    a = ap.parse_args(argv)
    a.rates = [float(x) for x in a.rates.split(",")]
    try:
        a.prompt_lens = [int(x) for x in (a.prompt_lens or str(a.prompt_len)).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--prompt-lens: {a.prompt_lens!r} is not a list of integers")
    if not a.prompt_lens or min(a.prompt_lens) < 8:
        ap.error("--prompt-lens: at least one length, each >= 8")
    graphs = [g.strip() for g in a.graphs.split(",") if g.strip()]
    if not set(graphs) <= {"agg", "disagg"} or not graphs:
        ap.error("--graphs: agg, disagg")
    if a.preset != "tiny":
        ap.error("--preset: only tiny runs on CPU here")

    from tqdm import tqdm

    t0 = time.time()
    res: dict[str, Any] = {"runtime": "dynamo", "machine": machine(),
                           "params": {k: v for k, v in vars(a).items() if k not in ("out", "tag", "no_progress", "note")},
                           "startup_s": {}, "results": []}  # fmt: skip
    res["params"]["graphs"] = graphs
    work = Path(tempfile.mkdtemp(prefix="dx-bench-serve-"))
    ok = False
    try:
        model_dir = work / "model" / a.preset
        subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "model", "init", "--preset", a.preset, str(model_dir)],
                       check=True, stdout=subprocess.DEVNULL)
        total = len(graphs) * len(a.prompt_lens) * len(a.rates) * a.requests
        with tqdm(total=total, desc="serve bench", unit="req", disable=a.no_progress, file=sys.stderr) as bar:
            for kind in graphs:
                rows, startup = bench_graph(kind, a, work, model_dir, bar)
                res["results"] += rows
                res["startup_s"][kind] = round(startup, 1)
        ok = True
    finally:
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"dynamo-ext bench serve: logs kept in {work}", file=sys.stderr)
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.tag or f"serve-cpu-{a.preset}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    res["note"] = a.note
    md = table(res)
    (out / f"{stem}.md").write_text(md)
    try:
        plot(res, out / f"{stem}.png")
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
