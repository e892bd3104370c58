"""Serving benchmark: aggregated vs disaggregated graphs through Dynamo's OpenAI HTTP frontend.

    dynamo-ext bench serve                                   # tiny on CPU (committed results, ~2 min on 2 cores)
    dynamo-ext bench serve --rates 2,4,8,16,32,64 --requests 40 --prompt-len 256 --prompt-len-jitter 0.25 \
        --output-len 32 --graphs agg,disagg
    dynamo-ext bench serve --prompt-lens 64,512,1024 --rates 4 ...    # one cell per (graph, prompt length, load)
    dynamo-ext bench serve --device cuda --preset llama3-8b-shape --layers 8 --dtype bfloat16 \
        --graphs agg,disagg --prompt-lens 512,4096 --prompt-len-jitter 0 --concurrency 1 --requests 8 \
        --out /tmp/out                                       # one GPU: agg (1 worker) vs 1 prefill + 1 decode
    python -m dynamo_ext.bench.serve --summary A.json B.json  # one compact table over result files

Each graph is started as ``dynamo-ext serve`` starts it (``dynamo_ext.launch.launch_graph``: etcd + NATS on
free loopback ports, workers via ``python -m dynamo_ext.workers``, our router, Dynamo's frontend
``python -m dynamo.frontend --router-mode round-robin``), and stopped (records audited) before the next:

  agg     frontend -> router -> --agg-workers aggregated workers (default 2 on CPU, 1 on CUDA)  (graphs/agg.py)
  disagg  frontend -> router -> --prefill-workers prefill, --decode-workers decode;
          KV pulled prefill -> decode by the decode worker over the backend the topology picks  (graphs/disagg.py)

``--device cuda`` sets ``model.device: cuda``: every engine worker gets a GPU (``launch/plan.py``
assign_devices: on one GPU they all share cuda:0). The model directory is generated once (random weights,
``--preset`` / ``--layers`` / ``--dtype``; ``launch/modeldir.py``, cached under ``$DYNAMO_EXT_CACHE``) and
every process of both graphs loads that same directory.

Load, per request class (prompt length of --prompt-lens), after ``--warmup`` requests of that class (first
use of a shape: CUDA kernels load, cuBLAS picks algorithms, the transfer path is opened): for each load,
``--requests`` streaming completions (``stream: true``, ``ignore_eos``, usage included), either
  * ``--rates``: Poisson arrivals at each rate (exponential gaps, seeded), one thread per request, or
  * ``--concurrency``: closed loop with N requests in flight (the next is sent when one ends); concurrency 1
    sends one request at a time: TTFT then has no queueing in it, which is what the "KV transfer share of
    TTFT" target is defined on.
Prompts are random words of the class's length in bytes +- --prompt-len-jitter (uniform, a fraction; the
byte-level tokenizer makes bytes = tokens), each with a unique prefix (no prefix-cache hits), and the SAME
prompts for both graphs (seeded by class and load, not by graph); outputs --output-len tokens
+- --output-len-jitter. ``model.max_model_len`` and ``--kv-blocks`` (16-token blocks per worker) are sized
so the longest prompt + output fits, for every request in flight (``--kv-blocks`` given too small: error).

Per request: TTFT = first SSE chunk with a choice - send; TPOT = (last chunk - first chunk) / (tokens - 1),
tokens = ``usage.completion_tokens``. Per cell (graph, prompt length, load): TTFT / TPOT p50 and p99 (linear
interpolation; with 20 requests p99 is close to the maximum), output tokens/s and requests/s over the window
from the first send to the last completion. Disagg: the decode workers' ``/metrics`` are scraped before and
after each cell (``launch_graph(...).metrics(role="decode")``, parsed with prometheus_client) and
differenced per backend / path / direction (``dynamo_ext/bench/_kv.py``): KV bytes, pulls
(``dynamo_ext_kv_transfer_seconds_count``), mean pull seconds (``_sum / _count``), pull GB/s (bytes /
summed pull seconds), the backends and paths (metric labels, e.g. ``cuda_ipc`` / ``device->device``), failed
transfers (``dynamo_ext_kv_transfer_errors_total``), local prefills (``dynamo_ext_worker_local_prefill_total``)
and the KV transfer share of TTFT = mean pull s / mean TTFT; ``ttft_p50_vs_agg`` = disagg / agg TTFT p50 of
the same class and load.

Writes <out>/<stem>.{json,md,png} (JSON: {"runtime": "dynamo", "machine" (CPU, cores, Python, torch, and
on CUDA the GPUs and memory from torch.cuda), "env", "params", "model", "startup_s", "results": [one row per
cell], "skipped", "errors", "wall_s"}); json and md are rewritten after each graph, so a run stopped by
--deadline-s or a signal keeps what it measured. Default out: ``$DYNAMO_EXT_RESULTS`` or benchmarks/results;
default stem: serve-cpu-<preset> for the committed CPU run (rates, preset layers), else
serve-<machine tag, e.g. 1xH200>-<preset>[-<layers>l]-<c1 | c1-8 | rates>. Prints the table last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import math
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench._kv import counter_total, kv_delta, kv_summary, kv_totals
from dynamo_ext.bench._machine import cpu_model, cuda_info, machine_tag
from dynamo_ext.bench._stats import pct  # noqa: F401 - route.py imports it from here
from dynamo_ext.launch.infra import free_port  # stdlib only: `--summary` runs without pydantic or the runtime

MODEL = "dx/tiny"
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired cats watch from the old red barn "
         "and nobody counts how many small grey birds sing in tall green trees near quiet water").split()
ENV_KEYS = ("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "UCX_NET_DEVICES", "UCX_TLS", "PYTORCH_CUDA_ALLOC_CONF",
            "CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "NCCL_CUMEM_ENABLE")  # fmt: skip


def machine(device: str = "cpu", gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU, cores, Python, ai-dynamo and torch versions; on CUDA (``gpu`` = ``_machine.cuda_info()``) the GPUs,
    GPU 0's memory and the CUDA version from torch.cuda."""
    cpu = cpu_model()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                            "device": device, "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        from importlib.metadata import version

        info["ai-dynamo"] = version("ai-dynamo")
        info["torch"] = version("torch")
    except Exception:  # noqa: BLE001
        pass
    if gpu:
        info.update({k: v for k, v in gpu.items() if k != "cuda_available"})
    return info


# -- load -----------------------------------------------------------------------------------------------------


@dataclass
class Req:
    i: int
    at: float  # planned send (rates) / actual send (closed loop), seconds after the start of the cell
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


def make_requests(a: argparse.Namespace, rate: float, seed: int, tag: str, prompt_len: int | None = None,
                  n: int | None = None) -> list[Req]:
    rng = random.Random(seed)
    t, out = 0.0, []
    plen = a.prompt_len if prompt_len is None else prompt_len
    for i in range(a.requests if n is None else n):
        t += rng.expovariate(rate) if i else 0.0
        pl = max(8, round(plen * (1 + rng.uniform(-a.prompt_len_jitter, a.prompt_len_jitter))))
        ol = max(2, round(a.output_len * (1 + rng.uniform(-a.output_len_jitter, a.output_len_jitter))))
        out.append(Req(i, t, _prompt(rng, pl, f"{tag}-{i}-{rng.getrandbits(32):08x}"), ol))
    return out


def stream_one(base: str, r: Req, timeout: float, model: str = MODEL) -> None:
    u = urlparse(base)
    body = json.dumps({"model": model, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
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


def run_load(base: str, reqs: list[Req], timeout: float, progress: Any = None, model: str = MODEL) -> float:
    """Send reqs at their planned times (one thread each); returns the start time."""
    threads = []
    t0 = time.monotonic()
    for r in reqs:
        delay = t0 + r.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=stream_one, args=(base, r, timeout, model), daemon=True)
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


def run_closed(base: str, reqs: list[Req], concurrency: int, timeout: float, progress: Any = None,
               model: str = MODEL) -> float:
    """Closed loop: ``concurrency`` threads, each sends the next request of ``reqs`` (in order) when its previous
    one has ended, so at most ``concurrency`` are in flight; ``Req.at`` becomes the actual send offset.
    Returns the start time."""
    lock = threading.Lock()
    todo = list(reversed(reqs))
    t0 = time.monotonic()

    def loop() -> None:
        while True:
            with lock:
                if not todo:
                    return
                r = todo.pop()
                r.at = time.monotonic() - t0
            stream_one(base, r, timeout, model)
            if progress is not None:
                with lock:
                    progress.update(1)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(max(1, min(concurrency, len(reqs))))]
    for th in threads:
        th.start()
    bound = (timeout + 5) * math.ceil(len(reqs) / max(1, concurrency)) + 5
    for th in threads:
        th.join(max(0.0, t0 + bound - time.monotonic()))
    for r in reqs:
        if not r.done:
            r.error = r.error or f"no end after {timeout} s"
    return t0


@dataclass(frozen=True)
class Load:
    kind: str  # rate | concurrency
    value: float

    @property
    def label(self) -> str:
        return f"{self.value:g} req/s" if self.kind == "rate" else f"c={self.value:g}"

    @property
    def tag(self) -> str:
        return f"r{self.value:g}" if self.kind == "rate" else f"c{self.value:g}"

    def run(self, base: str, reqs: list[Req], timeout: float, progress: Any = None, model: str = MODEL) -> float:
        if self.kind == "rate":
            return run_load(base, reqs, timeout, progress, model)
        return run_closed(base, reqs, int(self.value), timeout, progress, model)


# -- metrics --------------------------------------------------------------------------------------------------

LOCAL_PREFILL = "dynamo_ext_worker_local_prefill_total"
KV_ERRORS = "dynamo_ext_kv_transfer_errors_total"


def decode_kv(g: Any) -> dict:
    """The decode workers' KV transfer counters now, per backend / path / direction (summed over workers)."""
    return kv_totals(g.metrics(role="decode"))


def decode_counters(g: Any) -> tuple[dict, float, float]:
    """One scrape of the decode workers: (KV transfer totals, local prefills, failed transfers)."""
    texts = g.metrics(role="decode")
    return kv_totals(texts), counter_total(texts, LOCAL_PREFILL), counter_total(texts, KV_ERRORS)


def summarize(graph: str, rate: float | None, reqs: list[Req], t0: float, kv: dict[str, Any] | None,
              prompt_len: int | None = None, concurrency: int | None = None) -> dict:
    """One cell's row; ``kv``: ``_kv.kv_summary`` of the decode workers' metrics over the cell (None: agg)."""
    ok = [r for r in reqs if r.ok]
    ttft = [r.ttft() for r in ok]
    tpot = [x for x in (r.tpot() for r in ok) if x is not None]
    end = max((r.done for r in reqs), default=t0)
    dur = max(end - t0, 1e-9)
    ms = lambda x: None if x is None else round(x * 1e3, 2)  # noqa: E731
    load = Load("rate", rate) if concurrency is None else Load("concurrency", concurrency)
    row: dict[str, Any] = {
        "graph": graph, "prompt_len": prompt_len, "rate": rate, "concurrency": concurrency, "load": load.label,
        "requests": len(reqs), "completed": len(ok),
        "errors": [r.error or f"finish={r.finish} tokens={r.tokens}" for r in reqs if not r.ok][:5],
        "duration_s": round(dur, 3),
        "ttft_p50_ms": ms(pct(ttft, 0.5)), "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "ttft_mean_ms": ms(statistics.fmean(ttft) if ttft else None),
        "tpot_p50_ms": ms(pct(tpot, 0.5)), "tpot_p99_ms": ms(pct(tpot, 0.99)),
        "output_tok_s": round(sum(r.tokens for r in ok) / dur, 1), "req_s": round(len(ok) / dur, 2),
        "prompt_tokens_mean": round(statistics.fmean([r.prompt_tokens for r in ok]), 1) if ok else None,
        "output_tokens_mean": round(statistics.fmean([r.tokens for r in ok]), 1) if ok else None,
        "samples": [{"at_s": round(r.at, 3), "end_s": round(r.done - t0, 3), "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                     "ttft_ms": ms(r.ttft()) if r.ok else None, "tpot_ms": ms(r.tpot()) if r.ok else None,
                     "error": None if r.ok else (r.error or f"finish={r.finish}")} for r in reqs],
    }  # fmt: skip
    if kv is not None:
        n, b, mean_s = kv["kv_transfers"], kv["kv_bytes"], kv["kv_pull_s_mean"]
        row.update(kv)  # kv_bytes, kv_transfers (pulls), kv_pull_s_mean, kv_pull_gbps, kv_backends, kv_paths, ...
        row["kv_bytes_per_request"] = round(b / n) if n else None
        row["kv_transfer_mean_ms"] = ms(mean_s) if n else None
        row["kv_share_of_ttft"] = round(mean_s / statistics.fmean(ttft), 4) if n and ttft else None
    return row


def compare_to_agg(rows: list[dict]) -> None:
    """Disagg rows get ``ttft_p50_vs_agg`` / ``ttft_mean_vs_agg_ms``: against the agg row of the same class and
    load (same prompts) and the same load generator (``client``, when rows have one: ``bench aiperf``)."""
    agg = {(r["prompt_len"], r["load"], r.get("client")): r for r in rows if r["graph"] == "agg"}
    for r in rows:
        a = agg.get((r["prompt_len"], r["load"], r.get("client")))
        if r["graph"] != "disagg" or a is None:
            continue
        if r["ttft_p50_ms"] and a["ttft_p50_ms"]:
            r["ttft_p50_vs_agg"] = round(r["ttft_p50_ms"] / a["ttft_p50_ms"], 3)
        if r["ttft_mean_ms"] is not None and a["ttft_mean_ms"] is not None:
            r["ttft_mean_vs_agg_ms"] = round(r["ttft_mean_ms"] - a["ttft_mean_ms"], 2)


# -- graphs ---------------------------------------------------------------------------------------------------


def sizing(a: argparse.Namespace, max_pos: int = 8192) -> tuple[int, int, int, int]:
    """(tokens the longest request needs, max_model_len, KV blocks it needs, KV blocks per worker) for the longest
    prompt + output (bytes = tokens, + BOS) with every request in flight; ``max_pos``: the model's
    max_position_embeddings."""
    longest = max(round(p * (1 + a.prompt_len_jitter)) for p in a.prompt_lens) + 1
    out = round(a.output_len * (1 + a.output_len_jitter))
    need = longest + out + 1
    max_len = min(max(min(4096, max_pos), -(-need // 256) * 256), max_pos)
    per_req = -(-need // 16) + 1
    inflight = int(max(a.concurrency)) if a.concurrency else min(a.requests, 16)
    return need, max_len, per_req, max(1024, per_req * (inflight + 1))


def graph_config(kind: str, a: argparse.Namespace) -> dict[str, Any]:
    """The dynamo.yaml of one graph (etcd and NATS on free loopback ports: the launch starts them)."""
    workers = ({"agg": {"count": a.agg_workers, "num_kv_blocks": a.kv_blocks}} if kind == "agg" else
               {"prefill": {"count": a.prefill_workers, "num_kv_blocks": a.kv_blocks},
                "decode": {"count": a.decode_workers, "num_kv_blocks": a.kv_blocks}})
    return {"model": model_section(a),
            "kv_transfer": {"backend": "nixl", "timeout_ms": a.kv_timeout_ms},
            "workers": workers,
            "router": {"policy": a.policy, "disagg_min_prompt_tokens": 0},
            "discovery": {"namespace": f"bench{kind}",
                          "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                          "nats": {"url": f"nats://127.0.0.1:{free_port()}"}}}  # fmt: skip


def model_section(a: argparse.Namespace) -> dict[str, Any]:
    m = {"name": a.model_name, "preset": a.preset, "block_size": 16, "dtype": a.dtype, "device": a.device,
         "max_model_len": a.max_model_len}
    if a.layers is not None:
        m["num_layers"] = a.layers
    return m


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)


def bench_graph(kind: str, a: argparse.Namespace, workdir: Path, model_dir: Path, bar: Any,
                deadline: Deadline | None = None, skipped: list | None = None,
                rows: list | None = None) -> tuple[list[dict], float]:
    """Start the graph, run every cell, stop it; returns (rows, start-up seconds). Rows are appended to ``rows``
    as cells end, so a caller keeps them when a later cell fails; a signal (``_Terminated``) or Ctrl-C during a
    cell keeps that cell too, from the requests that had ended (``"partial": true``)."""
    deadline = deadline or Deadline(None)
    skipped = skipped if skipped is not None else []
    from dynamo_ext.launch import launch_graph  # noqa: PLC0415

    t_start = time.monotonic()
    rows = rows if rows is not None else []
    with launch_graph(f"graphs.{kind}", graph_config(kind, a),
                      model_dir=model_dir, log_dir=workdir / f"logs-{kind}",
                      ready_timeout=a.ready_timeout) as g:  # fmt: skip
        startup = time.monotonic() - t_start
        bar.write(f"{kind}: ready in {startup:.1f} s")
        pulls = kind == "disagg"
        k = 0
        for plen in a.prompt_lens:
            if deadline.left() <= 0:
                skipped += [{"graph": kind, "prompt_len": plen, "load": ld.label, "why": "deadline"} for ld in a.loads]
                k += len(a.loads)
                continue
            # warm-up of this class: first use of its shapes (kernels, cuBLAS plans, the transfer path)
            wl = a.loads[-1] if a.loads[-1].kind == "concurrency" else Load("concurrency", 1)
            warm = make_requests(a, 100.0, a.seed + 999 + plen, f"warm{plen}", plen, n=a.warmup)
            tw = time.monotonic()
            if warm:
                wl.run(g.base_url, warm, a.timeout, None, a.model_name)
                bad = [r.error or f"finish={r.finish}" for r in warm if not r.ok]
                bar.write(f"{kind} {plen} tok: warm-up {len(warm) - len(bad)}/{len(warm)} ok in "
                          f"{time.monotonic() - tw:.1f} s" + (f" ({bad[0]})" if bad else ""))
            for load in a.loads:
                if deadline.left() <= 0:
                    skipped.append({"graph": kind, "prompt_len": plen, "load": load.label, "why": "deadline"})
                    k += 1
                    continue
                before = decode_counters(g) if pulls else None
                reqs = make_requests(a, load.value if load.kind == "rate" else 1.0, a.seed + k,
                                     f"p{plen}-{load.tag}", plen)  # the same prompts for every graph
                k += 1
                bar.set_postfix_str(f"{kind} {plen} tok {load.label}")
                t_cell = time.monotonic()
                try:
                    t0 = load.run(g.base_url, reqs, a.timeout, bar, a.model_name)
                except (_Terminated, KeyboardInterrupt):
                    ended = [r for r in reqs if r.done]
                    if ended:
                        kv_part = None
                        if pulls and before is not None:
                            try:
                                kv_part = kv_summary(kv_delta(decode_counters(g)[0], before[0]))
                            except Exception:  # noqa: BLE001 - stopping anyway
                                kv_part = None
                        part = summarize(kind, load.value if load.kind == "rate" else None, ended, t_cell, kv_part,
                                         plen, int(load.value) if load.kind == "concurrency" else None)
                        part["partial"], part["requests_planned"] = True, len(reqs)
                        rows.append(part)
                    raise
                kv = None
                if pulls:
                    time.sleep(0.3)
                    assert before is not None
                    after = decode_counters(g)
                    kv = kv_summary(kv_delta(after[0], before[0]))
                    kv["local_prefills"] = int(after[1] - before[1])
                    kv["kv_transfer_errors"] = int(after[2] - before[2])
                g.check()  # a worker that died under the load fails the run, not a cell later
                row = summarize(kind, load.value if load.kind == "rate" else None, reqs, t0, kv, plen,
                                int(load.value) if load.kind == "concurrency" else None)
                rows.append(row)
                bar.write(f"{kind} {plen} tok {load.label}: {row['completed']}/{row['requests']} ok, "
                          f"TTFT p50 {row['ttft_p50_ms']} ms, TPOT p50 {row['tpot_p50_ms']} ms, "
                          f"{row['req_s']} req/s"
                          + (f", KV {row['kv_transfers']} pulls {row['kv_pull_gbps']} GB/s "
                             f"{'/'.join(row['kv_backends'])} {'/'.join(row['kv_paths'])}, share "
                             f"{row['kv_share_of_ttft']}" if kv is not None else ""))  # fmt: skip
    return rows, startup


# -- outputs --------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: Any) -> str:
    return _f(None if x is None else x * 100, "{:.1f}%")


def _machine_text(m: dict[str, Any]) -> str:
    gpu = ""
    if m.get("gpus"):
        gpu = (f"{len(m['gpus'])} x {m['gpus'][0]} ({m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')}), ")
    elif m.get("cuda_error"):
        gpu = f"no GPU facts ({m['cuda_error']}), "
    return (f"{gpu}{m['cpu']}, {m['cores']} cores, Python {m['python']}, ai-dynamo {m.get('ai-dynamo')}, "
            f"torch {m.get('torch')}; load average at start {m['load_avg_1m']}")


def table(res: dict) -> str:
    """The markdown: setup and notes first, the results table last."""
    m, p = res["machine"], res["params"]
    plens = ", ".join(str(x) for x in (p.get("prompt_lens") or [p["prompt_len"]]))
    cuda = m.get("device") == "cuda"
    mod = res.get("model") or {}
    layers = f", {mod.get('num_layers')} layers" if mod.get("num_layers") else ""
    where = "GPU memory (one GPU: both workers on cuda:0)" if cuda else "host memory"
    conc = p.get("concurrency")
    if conc:
        load = (f"closed loop, {', '.join(str(c) for c in conc)} request(s) in flight (concurrency 1 = one at a "
                "time: no queueing in TTFT)")
    else:
        load = "Poisson arrivals at each rate"
    lines = [f"# Serving benchmark: agg vs disagg, {p['preset']}{layers} ({p.get('dtype', 'float32')}) on "
             f"{'CUDA' if cuda else 'CPU'} through Dynamo's HTTP frontend", "",
             f"Runtime: {res.get('runtime', 'dynamo')} (Dynamo's frontend and our workers, each graph started by "
             "`dynamo_ext.launch.launch_graph` as `dynamo-ext serve` starts it). "
             f"Machine: {_machine_text(m)}.", "",
             f"Graphs: agg = frontend -> router ({p['policy']}) -> {p['agg_workers']} aggregated worker(s); "
             f"disagg = frontend -> router ({p['policy']}) -> {p['prefill_workers']} prefill + {p['decode_workers']} "
             f"decode worker(s), KV in {where}, pulled by the decode worker. Start-up (model load included): "
             + (", ".join(f"{k} {v:.1f} s" for k, v in res["startup_s"].items()) or "-")
             + f". KV blocks per worker: {p['kv_blocks']} x 16 tokens; max_model_len {p.get('max_model_len')}.", "",
             f"Load: {p['requests']} streaming completions per cell (graph, prompt length, load), {load}; "
             f"prompts of {plens} tokens +-{p['prompt_len_jitter']:.0%} (uniform; the same prompts for both "
             f"graphs), outputs {p['output_len']} tokens +-{p['output_len_jitter']:.0%} (ignore_eos), greedy; "
             f"{p['warmup']} warm-up requests per prompt length and graph before its cells. "
             "TTFT = first SSE chunk - send; TPOT = (last - first chunk) / (tokens - 1); throughput over first "
             f"send -> last completion. With {p['requests']} requests p99 is about the maximum. "
             f"Total wall {res.get('wall_s')} s.", "",
             "KV pulls from the decode workers' `/metrics`, scraped before and after each cell and differenced "
             "per backend / path: pulls = `dynamo_ext_kv_transfer_seconds_count`, bytes = "
             "`dynamo_ext_kv_transfer_bytes_total`, pull GB/s = bytes / summed pull seconds, backend / path = the "
             "metrics' labels. KV share of TTFT = mean pull seconds (`dynamo_ext_kv_transfer_seconds` sum/count "
             "over the cell) / mean TTFT; it times the READ only (add_peer, the prefill -> router -> decode "
             "hand-off and the release call are not in it: they are part of the disagg - agg TTFT difference, with "
             f"the extra hop; `vs agg` = disagg TTFT p50 / agg TTFT p50 of the same class and load). KV per "
             f"request: {_kv_bytes(res)}."]
    if not cuda:
        lines += ["", f"On CPU the KV moves in host memory; TTFT here is mostly HTTP + frontend + router + queueing "
                  f"on {m['cores']} cores shared by every process (the load generator included), so these numbers "
                  "say little about GPU serving. TPOT is measured at the client: when the frontend or the client "
                  "falls behind, chunks arrive in bursts, so TPOT p50 can drop while TTFT and TPOT p99 rise at the "
                  "highest rates.", "",
                  "**Not run here (no GPU in this session):** the GPU part (a llama3-shape model on CUDA, 4K-token "
                  "prompts, KV between GPU processes; target: KV transfer <= 3% of TTFT at concurrency 1). Run "
                  "`scripts/gpu_serve_session.sh` on a GPU machine (`dynamo-ext bench serve --device cuda ...`)."]
    env = {k: v for k, v in (res.get("env") or {}).items() if v is not None}
    if env:
        lines += ["", "Environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items()) + "."]
    for what, items in (("Skipped", res.get("skipped")), ("Errors", res.get("errors"))):
        if items:
            lines += ["", f"**{what}:** " + "; ".join(json.dumps(x) if not isinstance(x, str) else x for x in items)]
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", *results_table(res["results"])]
    return "\n".join(lines) + "\n"


def results_table(rows: list[dict], client: bool = False) -> list[str]:
    """The markdown results table, one line per row (``client``: a column naming the load generator of each row,
    ``row["client"]``; used by ``bench aiperf``)."""
    c_head, c_sep = ("client | ", "---|") if client else ("", "")
    lines = [f"| graph | {c_head}prompt tok | load | done | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | "
             "TPOT p99 (ms) | output tok/s | req/s | KV pull mean (ms) | KV share of TTFT | vs agg | KV pulls | "
             "KV MiB/req | pull GB/s | backend | path |",
             f"|---|{c_sep}---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | " + (f"{r.get('client') or '-'} | " if client else "")
                     + f"{_f(r['prompt_tokens_mean'], '{:.0f}')} | {_load(r)} | "
                     f"{r['completed']}/{r['requests']} | {_f(r['ttft_p50_ms'])} | {_f(r['ttft_p99_ms'])} | "
                     f"{_f(r['tpot_p50_ms'], '{:.2f}')} | {_f(r['tpot_p99_ms'], '{:.2f}')} | "
                     f"{_f(r['output_tok_s'])} | {_f(r['req_s'], '{:.2f}')} | "
                     f"{_f(r.get('kv_transfer_mean_ms'), '{:.2f}')} | {_pct(r.get('kv_share_of_ttft'))} | "
                     f"{_f(r.get('ttft_p50_vs_agg'), '{:.2f}x')} | {_f(r.get('kv_transfers'), '{:d}')} | "
                     f"{_f(None if r.get('kv_bytes_per_request') is None else r['kv_bytes_per_request'] / 2**20, '{:.2f}')} | "
                     f"{_f(r.get('kv_pull_gbps'), '{:.3f}')} | {', '.join(r.get('kv_backends') or []) or '-'} | "
                     f"{', '.join(r.get('kv_paths') or []) or '-'} |")
    return lines


def _load(r: dict) -> str:
    return (r.get("load") or f"{r['rate']:g} req/s") + (" (partial)" if r.get("partial") else "")


def _kv_bytes(res: dict) -> str:
    b = [r["kv_bytes_per_request"] for r in res["results"] if r.get("kv_bytes_per_request")]
    return f"{statistics.fmean(b) / 2**20:.2f} MiB measured (mean over the cells)" if b else "not measured"


def summary_table(runs: list[dict]) -> str:
    """One compact text table over several result files (what a remote session prints last)."""
    head = (f"{'run':<34} {'graph':<6} {'prompt':>6} {'load':>8} {'ok':>5} {'TTFT p50':>9} {'p99':>8} "
            f"{'TPOT p50':>9} {'p99':>7} {'req/s':>6} {'KV%TTFT':>7} {'vs agg':>6} {'pull GB/s':>9}  backend path")
    lines = [head, "-" * len(head)]
    for res in runs:
        name = res.get("stem") or "?"
        for r in res.get("results", []):
            lines.append(
                f"{name[:34]:<34} {r['graph']:<6} {r['prompt_len']!s:>6} {_load(r):>8} "
                f"{str(r['completed']) + '/' + str(r['requests']):>5} {_f(r['ttft_p50_ms']):>9} "
                f"{_f(r['ttft_p99_ms']):>8} {_f(r['tpot_p50_ms'], '{:.2f}'):>9} {_f(r['tpot_p99_ms'], '{:.2f}'):>7} "
                f"{_f(r['req_s'], '{:.2f}'):>6} {_pct(r.get('kv_share_of_ttft')):>7} "
                f"{_f(r.get('ttft_p50_vs_agg'), '{:.2f}x'):>6} {_f(r.get('kv_pull_gbps'), '{:.2f}'):>9}  "
                f"{'/'.join(r.get('kv_backends') or []) or '-'} {'/'.join(r.get('kv_paths') or []) or '-'}")
        for x in res.get("errors") or []:
            lines.append(f"{name[:34]:<34} ERROR {x}")
        for x in res.get("skipped") or []:
            lines.append(f"{name[:34]:<34} skipped {x.get('graph')} {x.get('prompt_len')} {x.get('load')} "
                         f"({x.get('why')})")
    m = next((r["machine"] for r in runs if r.get("machine")), {})
    if m:
        lines.append(f"machine: {_machine_text(m)}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["results"]
    loads = sorted({(r.get("concurrency") or 0, r.get("rate") or 0) for r in rows})
    by_load = len(loads) > 1  # x = load; else x = prompt length (one point per class)
    closed = any(r.get("concurrency") for r in rows)
    plens = sorted({r.get("prompt_len") for r in rows}, key=lambda x: x or 0)
    colors = {"agg": plt.cm.Blues, "disagg": plt.cm.Oranges}
    series = []
    for kind, plen in [(kind, plen) for kind in ("agg", "disagg") for plen in (plens if by_load else [None])]:
        rs = [r for r in rows if r["graph"] == kind and (plen is None or r.get("prompt_len") == plen)]
        if not rs:
            continue
        style = "o-" if kind == "agg" else "s--"
        j = plens.index(plen) if plen in plens else 0
        color = colors[kind](0.75 - 0.4 * j / max(1, len(plens) - 1)) if by_load and len(plens) > 1 else \
            {"agg": "tab:blue", "disagg": "tab:orange"}[kind]
        name = kind if plen is None or len(plens) == 1 else f"{kind} {plen} tok"
        x = [(r.get("concurrency") or r.get("rate")) if by_load else r["prompt_len"] for r in rs]
        series.append((name, x, rs, style, color))
    xlabel = ("requests in flight (closed loop)" if closed else "request rate (req/s, Poisson)") if by_load else \
        "prompt tokens"
    p, m = res["params"], res["machine"]
    where = f"{m['gpus'][0]}" if m.get("gpus") else f"{m['cpu']} ({m['cores']} cores)"
    title = (f"{p['preset']} on {where}: prompts "
             f"{', '.join(str(x) for x in (p.get('prompt_lens') or [p['prompt_len']]))}, "
             f"outputs {p['output_len']}, {p['requests']} requests per cell, "
             f"{'closed loop ' + ', '.join(f'c={c}' for c in p['concurrency']) if p.get('concurrency') else 'Poisson'}")
    plot_panels(series, path, xlabel, title)


def plot_panels(series: list[tuple[str, list, list[dict], str, Any]], path: Path, xlabel: str, title: str,
                throughput: tuple[str, str] = ("req_s", "requests/s")) -> None:
    """Four panels against x (log2): TTFT p50/p99, TPOT p50/p99, throughput (``throughput`` = (row key, unit))
    and KV pull share of TTFT, one line per series ``(name, x values, rows, matplotlib style, color)``; the KV
    panel only for the series whose rows have KV pulls (disagg). Also used by ``bench aiperf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 4, figsize=(17, 4))
    for name, x, rs, style, color in series:
        for ax, key in ((axs[0], "ttft"), (axs[1], "tpot")):
            ax.plot(x, [r[f"{key}_p50_ms"] for r in rs], style, color=color, label=f"{name} p50")
            ax.plot(x, [r[f"{key}_p99_ms"] for r in rs], style, color=color, alpha=0.4, label=f"{name} p99")
        axs[2].plot(x, [r[throughput[0]] for r in rs], style, color=color, label=name)
        if any("kv_transfers" in r for r in rs):
            axs[3].plot(x, [100 * (r.get("kv_share_of_ttft") or 0) for r in rs], style, color=color, label=name)
    for ax, t, y in zip(axs, ("TTFT", "TPOT", "throughput", "KV pull share of TTFT"), ("ms", "ms", throughput[1], "%")):
        ax.set_title(t)
        ax.set_xlabel(xlabel)
        ax.set_xscale("log", base=2)
        ax.set_ylabel(y)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_stem(a: argparse.Namespace, m: dict[str, Any]) -> str:
    """serve-cpu-<preset> for the committed CPU run (rates, the preset's layers); otherwise a stem that names
    the machine, the model size and the load, so a GPU run never lands on committed results."""
    tag = machine_tag(m)
    if tag == "cpu" and not a.concurrency and a.layers is None:
        return f"serve-cpu-{a.preset}"
    load = "rates" if not a.concurrency else "c" + "-".join(f"{c:g}" for c in a.concurrency)
    return f"serve-{tag}-{a.preset}" + (f"-{a.layers}l" if a.layers else "") + f"-{load}"


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


def _csv(text: str | None, kind: type, what: str, ap: argparse.ArgumentParser) -> list:
    try:
        return [kind(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        ap.error(f"{what}: {text!r} is not a comma-separated list of {kind.__name__}")
        raise


def write_outputs(res: dict, out: Path, stem: str, png: bool, *, render=None, draw=None) -> None:
    """<stem>.json, .md (``render``, default this module's table) and, with ``png``, .png (``draw``, default
    this module's plot); bench aiperf passes its own."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text((render or table)(res))
    if png and res["results"]:
        try:
            (draw or plot)(res, out / f"{stem}.png")
        except ImportError as e:
            print(f"no plot: {e}", file=sys.stderr)


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
    if rest and rest[0] == "--summary":  # python -m dynamo_ext.bench.serve --summary A.json B.json
        runs = []
        for f in rest[1:]:
            try:
                runs.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                print(f"{f}: {e}")
        print(summary_table(runs))
        return 0 if runs else 1
    ap = argparse.ArgumentParser(prog="dynamo-ext bench serve", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--graphs", default="agg,disagg", help="graphs to compare, comma-separated: agg, disagg")
    ap.add_argument("--rates", default=None, help="request rates (req/s), comma-separated (default 2,4,8,16,32,64)")
    ap.add_argument("--concurrency", default=None,
                    help="closed loop instead of --rates: requests in flight, comma-separated (1 = one at a time)")
    ap.add_argument("--requests", type=int, default=40, help="requests per cell")
    ap.add_argument("--prompt-len", type=int, default=256,
                    help="prompt tokens (bytes: the tokenizer is byte-level)")
    ap.add_argument("--prompt-lens", default=None,
                    help="request classes: prompt lengths, comma-separated (default: --prompt-len); one cell per "
                         "(graph, prompt length, load)")
    ap.add_argument("--prompt-len-jitter", type=float, default=0.25, help="uniform +- fraction of the prompt length")
    ap.add_argument("--output-len", type=int, default=32, help="output tokens per request (ignore_eos)")
    ap.add_argument("--output-len-jitter", type=float, default=0.0,
                    help="relative spread of the output length (0.2: +-20%% per request)")
    ap.add_argument("--warmup", type=int, default=4, help="requests sent per prompt length and graph before measuring")
    ap.add_argument("--agg-workers", type=int, default=None, help="aggregated workers (default: 2 on cpu, 1 on cuda)")
    ap.add_argument("--prefill-workers", type=int, default=1, help="prefill workers of the disagg graph")
    ap.add_argument("--decode-workers", type=int, default=1, help="decode workers of the disagg graph")
    ap.add_argument("--policy", default="round-robin", choices=("round-robin", "dynamo-ext"),
                    help="router.policy of the graphs")
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="KV blocks (16 tokens) per worker (default: the longest request x requests in flight, "
                         ">= 1024)")
    ap.add_argument("--kv-timeout-ms", type=int, default=2000, help="kv_transfer.timeout_ms")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="model.device of every engine worker")
    ap.add_argument("--preset", default="tiny", help="model preset (random weights of that shape)")
    ap.add_argument("--layers", type=int, default=None, help="model.num_layers (default: the preset's)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="model.dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the prompts and arrivals")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request (s)")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for a graph to start")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no graph or cell after this many seconds (what was measured is written)")
    ap.add_argument("--out", default=str(results_dir()), help="results directory")
    ap.add_argument("--tag", default=None, help="file name stem (default: see the module docstring)")
    ap.add_argument("--log-dir", default=None, help="keep the graphs' process logs here (default: a temporary "
                                                   "directory, removed after a clean run)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--note", default=None, help="a paragraph added to the markdown (e.g. run-to-run noise seen)")
    a = ap.parse_args(rest)
    if a.rates is not None and a.concurrency is not None:
        ap.error("--rates and --concurrency: give one of them")
    a.concurrency = _csv(a.concurrency, int, "--concurrency", ap) if a.concurrency is not None else []
    a.rates = [] if a.concurrency else _csv(a.rates or "2,4,8,16,32,64", float, "--rates", ap)
    if (a.concurrency and min(a.concurrency) < 1) or (not a.concurrency and (not a.rates or min(a.rates) <= 0)):
        ap.error("--concurrency: integers >= 1; --rates: numbers > 0")
    a.loads = [Load("concurrency", c) for c in a.concurrency] or [Load("rate", r) for r in a.rates]
    a.prompt_lens = _csv(a.prompt_lens or str(a.prompt_len), int, "--prompt-lens", ap)
    if not a.prompt_lens or min(a.prompt_lens) < 8:
        ap.error("--prompt-lens: at least one length, each >= 8")
    graphs = [g.strip() for g in a.graphs.split(",") if g.strip()]
    if not set(graphs) <= {"agg", "disagg"} or not graphs:
        ap.error("--graphs: agg, disagg")
    if a.device == "cpu" and a.preset != "tiny":
        ap.error("--preset: only tiny runs on CPU here (--device cuda for the others)")
    if a.layers is not None and a.layers < 1:
        ap.error("--layers: >= 1")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    a.agg_workers = a.agg_workers or (1 if a.device == "cuda" else 2)
    a.model_name = MODEL if a.preset == "tiny" else f"dx/{a.preset}"
    from dynamo_ext.engine.config import _SHAPES  # noqa: PLC0415 - torch-free

    if a.preset not in _SHAPES:
        ap.error(f"--preset: one of {', '.join(_SHAPES)}")
    max_pos = int(_SHAPES[a.preset]["max_position_embeddings"])
    need, a.max_model_len, per_req, auto_blocks = sizing(a, max_pos)
    if need > max_pos:
        ap.error(f"--prompt-lens / --output-len: the longest request needs {need} tokens, {a.preset} has "
                 f"max_position_embeddings {max_pos}")
    if a.kv_blocks is None:
        a.kv_blocks = auto_blocks
    elif a.kv_blocks < per_req:
        ap.error(f"--kv-blocks {a.kv_blocks}: the longest request needs {per_req} blocks of 16 tokens")

    from tqdm import tqdm

    t0 = time.time()
    deadline = Deadline(a.deadline_s)
    if a.device == "cuda":
        # CUDA memory from the expandable_segments allocator cannot be exported for cuda_ipc (pulls would fall
        # back to TCP): the workers inherit this environment
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if "expandable_segments" in conf:
            kept = ",".join(x for x in conf.split(",") if x.strip() and "expandable_segments" not in x)
            print(f"bench serve: PYTORCH_CUDA_ALLOC_CONF={conf!r} -> {kept!r} (no expandable_segments)", file=sys.stderr)
            if kept:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = kept
            else:
                os.environ.pop("PYTORCH_CUDA_ALLOC_CONF")
    gpu = cuda_info() if a.device == "cuda" else None
    if gpu is not None and not gpu.get("cuda_available"):
        print(f"dynamo-ext bench serve: --device cuda but torch.cuda is not available here ({gpu})", file=sys.stderr)
        return 2
    hidden = {"out", "tag", "no_progress", "note", "loads", "log_dir", "model_name"}
    res: dict[str, Any] = {"runtime": "dynamo", "machine": machine(a.device, gpu),
                           "env": {k: os.environ.get(k) for k in ENV_KEYS},
                           "params": {k: v for k, v in vars(a).items() if k not in hidden},
                           "model": {}, "startup_s": {}, "results": [], "skipped": [], "errors": []}  # fmt: skip
    res["params"]["graphs"] = graphs
    stem = a.tag or default_stem(a, res["machine"])
    res["stem"] = stem
    out = Path(a.out)
    logs = Path(a.log_dir) if a.log_dir else Path(tempfile.mkdtemp(prefix="dx-bench-serve-"))
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    rc = 0
    try:
        from dynamo_ext.config import ModelConfig  # noqa: PLC0415
        from dynamo_ext.launch.modeldir import ensure_model_dir  # noqa: PLC0415

        tm = time.monotonic()
        model_dir, how = ensure_model_dir(ModelConfig(**model_section(a)))
        res["model"] = {**model_section(a), "dir": str(model_dir), "how": how,
                        "seconds": round(time.monotonic() - tm, 1)}  # fmt: skip
        print(f"bench serve: model {a.preset} ({a.layers or 'all'} layers, {a.dtype}) {how} in "
              f"{res['model']['seconds']} s: {model_dir}", file=sys.stderr)
        total = len(graphs) * len(a.prompt_lens) * len(a.loads) * a.requests
        with tqdm(total=total, desc="serve bench", unit="req", disable=a.no_progress, file=sys.stderr) as bar:
            for kind in graphs:
                if deadline.left() <= 0:
                    res["skipped"].append({"graph": kind, "why": "deadline before its start"})
                    continue
                try:
                    _, startup = bench_graph(kind, a, logs, model_dir, bar, deadline, res["skipped"], res["results"])
                except _Terminated:
                    raise
                except Exception as e:  # noqa: BLE001 - the other graph still runs; the error is in the results
                    res["errors"].append(f"{kind}: {type(e).__name__}: {str(e).strip()[:1500]}")
                    bar.write(f"{kind}: FAILED: {e}")
                    continue
                res["startup_s"][kind] = round(startup, 1)
                compare_to_agg(res["results"])
                res["wall_s"] = round(time.time() - t0, 1)
                write_outputs(res, out, stem, png=False)
    except (_Terminated, KeyboardInterrupt) as e:
        res["errors"].append(f"stopped by {e or 'Ctrl-C'} (graphs stopped; what was measured is kept)")
        rc = 143
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if res["errors"] or any(r["completed"] < r["requests"] for r in res["results"]):
        rc = rc or 1
        print(f"dynamo-ext bench serve: logs kept in {logs}", file=sys.stderr)
    elif not a.log_dir:
        shutil.rmtree(logs, ignore_errors=True)
    res["wall_s"] = round(time.time() - t0, 1)
    res["note"] = a.note
    compare_to_agg(res["results"])
    write_outputs(res, out, stem, png=True)
    print(f"bench serve: wrote {out / stem}.{{json,md,png}}", file=sys.stderr)
    print(table(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
