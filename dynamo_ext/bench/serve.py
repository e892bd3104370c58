"""Serving benchmark: aggregated vs disaggregated graphs through Dynamo's OpenAI HTTP frontend.

    dynamo-ext bench serve                                   # tiny on CPU (committed results, ~2 min on 2 cores)
    dynamo-ext bench serve --rates 2,4,8,16,32,64 --requests 40 --prompt-len 256 --prompt-len-jitter 0.25 \
        --output-len 32 --graphs agg,disagg

For each graph (real processes, the same helpers as tests/workers: etcd + NATS on loopback, workers via
``python -m dynamo_ext.workers``, our router, ``python -m dynamo.frontend --router-mode round-robin``):

  agg     frontend -> router -> --agg-workers aggregated workers                         (graphs/agg.py)
  disagg  frontend -> router -> --prefill-workers prefill, --decode-workers decode;
          KV moved prefill -> decode by NIXL (host memory here)                           (graphs/disagg.py)

the graph is started, warmed up (a few requests), then for every rate in --rates, --requests streaming
completions (``stream: true``, ``ignore_eos``, usage included) are sent with Poisson arrivals (exponential
gaps, seeded). Prompts are random words of --prompt-len bytes +- --prompt-len-jitter (uniform, a
fraction; the tiny tokenizer is byte-level: bytes = tokens), each with a unique prefix (no prefix-cache
hits); outputs --output-len tokens +- --output-len-jitter.

Per request: TTFT = first SSE chunk with a choice - send; TPOT = (last chunk - first chunk) / (tokens - 1),
tokens = ``usage.completion_tokens``. Per (graph, rate): TTFT / TPOT p50 and p99 (linear interpolation;
with 20 requests p99 is close to the maximum), output tokens/s and requests/s over the window from the
first send to the last completion. Disagg: the decode workers' ``dynamo_ext_kv_transfer_seconds``
(sum / count, scraped before and after each rate) gives the mean KV transfer per request and its share of
the mean TTFT.

Writes benchmarks/results/serve-<device>-<preset>.{json,md,png} (machine described) and prints the table
last. The committed results are CPU-only; the GPU part (llama3-70b-shape, 4K prompts, NVLink) is not run.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import random
import re
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
from dynamo_ext.bench._machine import cpu_model
from dynamo_ext.bench._stats import pct  # noqa: F401 - route.py imports it from here

ROOT = Path(__file__).resolve().parents[2]  # source checkout: tests/workers/conftest.py (until step 3)
MODEL = "dx/tiny"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from the old red barn "
         "and nobody counts how many small grey birds sing in tall green trees near quiet water").split()


def _helpers() -> Any:
    """tests/workers/conftest.py (Graph: workers, frontend) and tests/fixtures/servers.py (etcd, NATS)."""
    path = ROOT / "tests" / "workers" / "conftest.py"
    if not path.is_file():
        raise SystemExit("dynamo-ext bench serve: tests/workers/ not found; run from a source checkout")
    spec = importlib.util.spec_from_file_location("dynamo_ext_bench_worker_helpers", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


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


def make_requests(a: argparse.Namespace, rate: float, seed: int, tag: str) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(a.requests):
        t += rng.expovariate(rate) if i else 0.0
        pl = max(8, round(a.prompt_len * (1 + rng.uniform(-a.prompt_len_jitter, a.prompt_len_jitter))))
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


def scrape_kv(urls: list[str]) -> tuple[float, float, float]:
    """Sum over workers of dynamo_ext_kv_transfer_seconds_sum / _count and dynamo_ext_kv_transfer_bytes_total."""
    import urllib.request

    tot = [0.0, 0.0, 0.0]
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for i, name in enumerate(("dynamo_ext_kv_transfer_seconds_sum", "dynamo_ext_kv_transfer_seconds_count",
                                  "dynamo_ext_kv_transfer_bytes_total")):
            tot[i] += sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return tot[0], tot[1], tot[2]


def summarize(graph: str, rate: float, reqs: list[Req], t0: float, kv: tuple[float, float, float] | None) -> dict:
    ok = [r for r in reqs if r.ok]
    ttft = [r.ttft() for r in ok]
    tpot = [x for x in (r.tpot() for r in ok) if x is not None]
    end = max((r.done for r in reqs), default=t0)
    dur = max(end - t0, 1e-9)
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    row: dict[str, Any] = {
        "graph": graph, "rate": rate, "requests": len(reqs), "completed": len(ok),
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
        s, n, b = kv
        row["kv_transfers"] = int(n)
        row["kv_bytes_per_request"] = round(b / n) if n else None
        row["kv_transfer_mean_ms"] = ms(s / n) if n else None
        row["kv_share_of_ttft"] = round((s / n) / statistics.fmean(ttft), 4) if n and ttft else None
    return row


# -- graphs ---------------------------------------------------------------------------------------------------


def start_graph(h: Any, kind: str, a: argparse.Namespace, etcd: str, nats: str, workdir: Path, model_dir: Path):
    cfg = {"router": {"policy": a.policy, "disagg_min_prompt_tokens": 0},
           "workers": {"agg": {"count": a.agg_workers, "num_kv_blocks": a.kv_blocks},
                       "prefill": {"count": a.prefill_workers, "num_kv_blocks": a.kv_blocks},
                       "decode": {"count": a.decode_workers, "num_kv_blocks": a.kv_blocks}}}
    g = h.Graph(etcd, nats, workdir, model_dir, namespace=f"bench{kind}", **cfg)
    procs = []
    if kind == "agg":
        procs += [g.start("agg", wait=False) for _ in range(a.agg_workers)]
        decodes = []
    else:
        procs += [g.start("prefill", wait=False) for _ in range(a.prefill_workers)]
        decodes = [g.start("decode", wait=False) for _ in range(a.decode_workers)]
        procs += decodes
    procs.append(g.start("router", wait=False))
    g.wait_ready(procs, timeout=a.ready_timeout)
    base = g.frontend("round-robin", model=MODEL, timeout=a.ready_timeout)
    return g, base, [d.metrics_url for d in decodes]


def bench_graph(h: Any, kind: str, a: argparse.Namespace, etcd: str, nats: str, workdir: Path, model_dir: Path,
                bar: Any) -> tuple[list[dict], float]:
    t_start = time.monotonic()
    g, base, kv_urls = start_graph(h, kind, a, etcd, nats, workdir, model_dir)
    startup = time.monotonic() - t_start
    rows = []
    try:
        warm = make_requests(argparse.Namespace(**{**vars(a), "requests": a.warmup}), 100.0, a.seed + 999, "warm")
        run_load(base, warm, a.timeout)
        for k, rate in enumerate(a.rates):
            before = scrape_kv(kv_urls) if kv_urls else None
            reqs = make_requests(a, rate, a.seed + k, f"{kind}{rate}")
            bar.set_postfix_str(f"{kind} {rate:g} req/s")
            t0 = run_load(base, reqs, a.timeout, bar)
            kv = None
            if kv_urls:
                time.sleep(0.3)
                after = scrape_kv(kv_urls)
                kv = tuple(x - y for x, y in zip(after, before))  # type: ignore[arg-type]
            row = summarize(kind, rate, reqs, t0, kv)
            rows.append(row)
            bar.write(f"{kind} {rate:g} req/s: {row['completed']}/{row['requests']} ok, "
                      f"TTFT p50 {row['ttft_p50_ms']} ms, "
                      f"TPOT p50 {row['tpot_p50_ms']} ms, {row['output_tok_s']} tok/s")
    finally:
        g.stop()
    return rows, startup


# -- outputs --------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> str:
    """The markdown: setup and notes first, the results table last."""
    m, p = res["machine"], res["params"]
    lines = [f"# Serving benchmark: agg vs disagg, {p['preset']} on {m['device']} through Dynamo's HTTP frontend", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared), Python {m['python']}, "
             f"ai-dynamo {m.get('ai-dynamo')}, torch {m.get('torch')}; load average at start {m['load_avg_1m']}.", "",
             f"Graphs: agg = frontend -> router ({p['policy']}) -> {p['agg_workers']} aggregated worker(s); "
             f"disagg = frontend -> router ({p['policy']}) -> {p['prefill_workers']} prefill + {p['decode_workers']} "
             f"decode worker(s), KV by NIXL in host memory. Start-up: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in res["startup_s"].items()) + ".", "",
             f"Load: {p['requests']} streaming completions per rate, Poisson arrivals, prompts {p['prompt_len']} "
             f"tokens +-{p['prompt_len_jitter']:.0%} (uniform), outputs {p['output_len']} tokens "
             f"+-{p['output_len_jitter']:.0%} (ignore_eos), greedy; {p['warmup']} warm-up requests per graph. "
             "TTFT = first SSE chunk - send; TPOT = (last - first chunk) / (tokens - 1); throughput over first "
             f"send -> last completion. With {p['requests']} requests p99 is about the maximum. "
             f"Total wall {res['wall_s']} s.", "",
             "KV share of TTFT = mean `dynamo_ext_kv_transfer_seconds` (decode workers, sum/count over the rate's "
             "requests) / mean TTFT; it times the NIXL READ only (add_peer, the prefill -> router -> decode "
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
              "| TPOT p99 (ms) | output tok/s | req/s | KV transfer mean (ms) | KV share of TTFT |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        share = r.get("kv_share_of_ttft")
        lines.append(f"| {r['graph']} | {r['rate']:g} | {r['completed']}/{r['requests']} | "
                     f"{_f(r['prompt_tokens_mean'], '{:.0f}')} | {_f(r['ttft_p50_ms'])} | {_f(r['ttft_p99_ms'])} | "
                     f"{_f(r['tpot_p50_ms'], '{:.2f}')} | {_f(r['tpot_p99_ms'], '{:.2f}')} | "
                     f"{_f(r['output_tok_s'])} | {_f(r['req_s'], '{:.2f}')} | "
                     f"{_f(r.get('kv_transfer_mean_ms'), '{:.2f}')} | "
                     f"{_f(None if share is None else share * 100, '{:.1f}%')} |")
    return "\n".join(lines) + "\n"


def _kv_bytes(res: dict) -> str:
    b = [r["kv_bytes_per_request"] for r in res["results"] if r.get("kv_bytes_per_request")]
    return f"{statistics.fmean(b) / 1024:.0f} KiB measured" if b else "not measured"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(13, 4))
    for kind, style, color in (("agg", "o-", "tab:blue"), ("disagg", "s--", "tab:orange")):
        rs = [r for r in res["results"] if r["graph"] == kind]
        if not rs:
            continue
        x = [r["rate"] for r in rs]
        for ax, key in ((axs[0], "ttft"), (axs[1], "tpot")):
            ax.plot(x, [r[f"{key}_p50_ms"] for r in rs], style, color=color, label=f"{kind} p50")
            ax.plot(x, [r[f"{key}_p99_ms"] for r in rs], style, color=color, alpha=0.4, label=f"{kind} p99")
        axs[2].plot(x, [r["output_tok_s"] for r in rs], style, color=color, label=kind)
    for ax, t, y in zip(axs, ("TTFT", "TPOT", "throughput"), ("ms", "ms", "output tokens/s")):
        ax.set_title(t)
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_xscale("log", base=2)
        ax.set_ylabel(y)
        ax.legend(fontsize=8)
    p, m = res["params"], res["machine"]
    fig.suptitle(f"{p['preset']} on {m['cpu']} ({m['cores']} cores): prompts {p['prompt_len']}, "
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
    ap.add_argument("--prompt-len-jitter", type=float, default=0.25, help="uniform +- fraction of --prompt-len")
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
    graphs = [g.strip() for g in a.graphs.split(",") if g.strip()]
    if not set(graphs) <= {"agg", "disagg"} or not graphs:
        ap.error("--graphs: agg, disagg")
    if a.preset != "tiny":
        ap.error("--preset: only tiny runs on CPU here")

    from tqdm import tqdm

    t0 = time.time()
    h = _helpers()
    res: dict[str, Any] = {"machine": machine(), "params": {k: v for k, v in vars(a).items()
                                                             if k not in ("out", "tag", "no_progress", "note")},
                           "startup_s": {}, "results": []}
    res["params"]["graphs"] = graphs
    work = Path(tempfile.mkdtemp(prefix="dx-bench-serve-"))
    etcd = h.EtcdServer("etcd", h.make_workdir("dx-bs-etcd-"))
    nats = h.NatsServer("nats", h.make_workdir("dx-bs-nats-"))
    try:
        model_dir = work / "model" / a.preset
        subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "model", "init", "--preset", a.preset, str(model_dir)],
                       check=True, stdout=subprocess.DEVNULL)
        etcd.start()
        nats.start()
        total = len(graphs) * len(a.rates) * a.requests
        with tqdm(total=total, desc="serve bench", unit="req", disable=a.no_progress, file=sys.stderr) as bar:
            for kind in graphs:
                rows, startup = bench_graph(h, kind, a, etcd.url, nats.url, work, model_dir, bar)
                res["results"] += rows
                res["startup_s"][kind] = round(startup, 1)
    finally:
        etcd.stop()
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)
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
