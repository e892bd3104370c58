"""aiperf against Dynamo's OpenAI frontend, with bench serve's client beside it at the same load.

    dynamo-ext bench aiperf                                   # agg and disagg graphs (tiny), c = 1, 4, 8
    dynamo-ext bench aiperf --graphs agg,disagg --concurrency 1,4,8 --requests 16 --isl 128 --isl-stddev 16 \
        --osl 32 --osl-stddev 0 [--model-path DIR | --preset tiny] [--tag NAME] [--out DIR]
    dynamo-ext bench aiperf --graph graphs/disagg.py -f dynamo.yaml --concurrency 1,4   # your graph and config
    dynamo-ext bench aiperf --url http://127.0.0.1:8000 --tokenizer MODEL_DIR           # a graph already serving
    dynamo-ext bench aiperf ... --trace trace.jsonl           # Mooncake-style JSONL (input_length, output_length)

aiperf (PyPI ``aiperf``, NVIDIA's LLM load generator; what Dynamo's profiler runs) pins many packages of its
own (prometheus-client, rich, pandas, pyzmq, transformers, ...), so it lives in its own virtual environment,
created on first use (:func:`ensure_venv`, with a progress line; ~1-2 min) at ``$DYNAMO_EXT_AIPERF_VENV`` or
``<cache>/aiperf-venv-<AIPERF_VERSION>`` (``<cache>``: ``$DYNAMO_EXT_CACHE`` or ``~/.cache/dynamo_ext``), from
``requirements/aiperf.txt`` (every package pinned; from an installed wheel without the checkout: ``aiperf==``
:data:`AIPERF_VERSION`). The venv is valid only with its marker file (written last: aiperf version and the
requirements' sha256); a directory without it (an install that was interrupted or failed) or with other
requirements is removed and created again, under a file lock (two runs never build it at once). A failed
install removes what it created and raises :class:`AiperfError` with the end of pip's log.

Graphs: like ``bench serve`` (``--graphs agg,disagg``: ``dynamo_ext.launch.launch_graph`` with the same
dynamo.yaml ``bench serve`` builds: round-robin router, 2 agg workers on CPU, 1 prefill + 1 decode), or
``--graph GRAPH -f CONFIG`` (any graph file/module and dynamo.yaml, launched as ``dynamo-ext serve`` launches
it), or ``--url`` (a frontend already serving; the model name from ``/v1/models`` unless ``--model``; the
tokenizer from ``--tokenizer DIR`` or from ``-f CONFIG``'s model).

Per graph: ``--warmup`` requests by our client (first use of the shapes), then for each concurrency point
(closed loop, ``--requests`` requests, bounded):

1. ``aiperf profile --endpoint-type completions --streaming --url URL --model NAME --tokenizer MODEL_DIR
   --concurrency C --request-count N --isl/--isl-stddev --osl/--osl-stddev --num-dataset-entries N
   --dataset-sampling-strategy sequential --extra-inputs ignore_eos:true --extra-inputs temperature:0
   --use-server-token-count --connection-reuse-strategy never --random-seed SEED+k --artifact-dir DIR --ui none
   --no-server-metrics --no-gpu-telemetry`` (``--trace FILE``: ``--input-file FILE --custom-dataset-type mooncake_trace
   --no-fixed-schedule`` instead of --isl/--osl) plus ``--aiperf-args``, in the venv as a subprocess (its own
   process group, killed on timeout or Ctrl-C), with ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` removed from
   its environment: aiperf 0.13 resolves every tokenizer name through the HuggingFace cache when offline, so a
   local model directory fails (``HFValidationError: Repo id must be in the form ...``); online it loads a
   local directory without touching the network (checked with no network interface: no connection attempt).
   Output tokens are the server's ``usage`` (``--use-server-token-count``): aiperf's re-tokenized text differs
   from the tokens a byte-level or random-weight model generated. Connections: a new one per request by
   default (``--aiperf-connections never``), as our client does. aiperf's own default (``pooled``, keep-alive
   connections) meets a stall in Dynamo 1.6.1's frontend: its HTTP server does not set TCP_NODELAY on accepted
   connections (strace: no setsockopt after accept4 on the HTTP port), so on a reused connection the first
   write of a response waits, by Nagle's algorithm, for the client's delayed ACK of the previous response
   (~40 ms on Linux) and the whole stream then arrives in one read: TTFT + ~40 ms, inter-token latency ~0
   (measured with plain aiohttp too: 44-60 ms vs 8-19 ms on new connections, tiny model).
2. bench serve's client (``serve.Load('concurrency', C).run``: one HTTP connection per request, ``stream:
   true``, ``ignore_eos``, temperature 0) sends the same requests: the prompts and ``max_tokens`` aiperf sent
   (its ``inputs.json``, in the order of its profiling records) with the first character changed, so none of
   their KV blocks is in the prefix cache that aiperf's run filled (blocks are named by a hash chain from the
   first block); requests that share a prefix in aiperf's set still share it.

For graphs with decode workers, their KV pull counters (``/metrics``) are scraped before and after each run as
in ``bench serve``. aiperf rows come from aiperf's export (``profile_export_aiperf.json`` for the statistics,
``profile_export.jsonl`` for the per-request records of the profiling phase): TTFT = ``time_to_first_token``,
TPOT = ``inter_token_latency`` ((request latency - TTFT) / (output tokens - 1) per request, the same
definition as bench serve's TPOT), output tok/s = ``output_token_throughput``, req/s = ``request_throughput``,
requests = profiling records, done = records without error, prompt tokens = ``usage_prompt_tokens``. Rows of
our client: ``serve.summarize``. The markdown table, PNG (TTFT, TPOT, output tokens/s, KV share against
concurrency, one line per graph and client) and JSON have bench serve's shape plus ``client`` (``aiperf`` or
``bench-serve``) per row. Written to ``<out>/<stem>.{json,md,png}`` (default out: ``$DYNAMO_EXT_RESULTS`` or
benchmarks/results; default stem ``aiperf-<machine>-<model>-c<points>``); an existing ``<stem>.json`` is never
overwritten without ``--force``. aiperf's artifacts and the graphs' logs go to ``--work-dir`` (default: a
temporary directory, removed after a clean run, kept and printed otherwise).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench import serve
from dynamo_ext.bench._kv import kv_delta, kv_summary
from dynamo_ext.bench._machine import machine_tag

#: the aiperf release ``bench aiperf`` runs; ``requirements/aiperf.txt`` pins the same (a test checks it)
AIPERF_VERSION = "0.13.0"
MARKER = ".dynamo_ext_aiperf.json"
CLIENTS = ("aiperf", "bench-serve")


class AiperfError(Exception):
    pass


# -- the venv -------------------------------------------------------------------------------------------------


def requirements_file() -> Path | None:
    """``requirements/aiperf.txt`` of the source checkout this package runs from (None from a wheel)."""
    for parent in Path(__file__).resolve().parents[1:]:
        cand = parent / "requirements" / "aiperf.txt"
        if cand.is_file():
            return cand
    return None


def pinned_version(requirements: str) -> str | None:
    """The ``aiperf==X`` pin of a requirements text."""
    m = re.search(r"^aiperf==(\S+)\s*$", requirements, re.M)
    return m.group(1) if m else None


def install_spec() -> tuple[list[str], str]:
    """(pip install arguments, sha256 of what they install): the checkout's requirements file, else the pin."""
    req = requirements_file()
    if req is not None:
        text = req.read_text()
        if pinned_version(text) != AIPERF_VERSION:
            raise AiperfError(f"{req}: pins aiperf=={pinned_version(text)}, AIPERF_VERSION is {AIPERF_VERSION}")
        return ["-r", str(req)], hashlib.sha256(text.encode()).hexdigest()
    spec = f"aiperf=={AIPERF_VERSION}"
    return [spec], hashlib.sha256(spec.encode()).hexdigest()


def venv_dir() -> Path:
    env = os.environ.get("DYNAMO_EXT_AIPERF_VENV")
    if env:
        return Path(env).expanduser()
    from dynamo_ext.launch.modeldir import cache_root  # noqa: PLC0415

    return cache_root() / f"aiperf-venv-{AIPERF_VERSION}"


def venv_python(d: Path) -> Path:
    return d / "bin" / "python"


def venv_ok(d: Path, digest: str, version: str = AIPERF_VERSION) -> bool:
    """A complete venv: its marker (written last) names this version and these requirements."""
    try:
        m = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return m.get("aiperf") == version and m.get("requirements_sha256") == digest and venv_python(d).exists()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_venv(d: Path | None = None, install: tuple[list[str], str] | None = None, version: str = AIPERF_VERSION,
                log: Callable[[str], None] = _log, heartbeat_s: float = 20.0) -> tuple[Path, dict[str, Any]]:
    """The venv's python, creating the venv when it is missing or incomplete; returns (python, info) with info
    ``{"dir", "how": "cached" | "created", "seconds"}``. ``install``: (pip arguments, their sha256), default
    :func:`install_spec`. Raises :class:`AiperfError` (nothing left behind) when the install fails."""
    d = Path(d) if d is not None else venv_dir()
    args, digest = install if install is not None else install_spec()
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run creating it: wait, then find it complete
        if venv_ok(d, digest, version):
            return venv_python(d), {"dir": str(d), "how": "cached", "seconds": 0.0}
        if d.exists():
            log(f"bench aiperf: {d} is incomplete or for other requirements (no valid {MARKER}): removing it")
            shutil.rmtree(d)
        log(f"bench aiperf: creating the aiperf {version} virtual environment in {d} (first use only; about "
            f"1-2 min: pip install {' '.join(args)})")
        t0 = time.monotonic()
        pip_log = d.parent / f"{d.name}.install.log"
        try:
            _run_logged([sys.executable, "-m", "venv", str(d)], pip_log, "python -m venv", log, heartbeat_s, t0)
            _run_logged([str(venv_python(d)), "-m", "pip", "install", "--disable-pip-version-check", *args], pip_log,
                        "pip install", log, heartbeat_s, t0)  # fmt: skip
            probe = "import importlib.metadata as m; print(m.version('aiperf'))"
            got = subprocess.run([str(venv_python(d)), "-c", probe], capture_output=True, text=True, timeout=120)
            if got.returncode != 0 or got.stdout.strip() != version:
                raise AiperfError(f"the new venv {d} has aiperf {got.stdout.strip() or '(none)'}, not {version}: "
                                  f"{got.stderr.strip()[-500:]}")
            seconds = round(time.monotonic() - t0, 1)
            tmp = d / f"{MARKER}.tmp"
            tmp.write_text(json.dumps({"aiperf": version, "requirements_sha256": digest, "seconds": seconds,
                                       "python": sys.version.split()[0], "created": time.time()}))
            tmp.rename(d / MARKER)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        log(f"bench aiperf: aiperf {version} venv ready in {seconds} s")
        pip_log.unlink(missing_ok=True)
        return venv_python(d), {"dir": str(d), "how": "created", "seconds": seconds}


def _run_logged(argv: list[str], logfile: Path, what: str, log: Callable[[str], None], heartbeat_s: float,
                t0: float) -> None:
    with open(logfile, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    rc = p.wait(timeout=heartbeat_s)
                    break
                except subprocess.TimeoutExpired:
                    log(f"bench aiperf: ... {what} still running ({time.monotonic() - t0:.0f} s)")
        except BaseException:
            _kill_group(p)
            raise
    if rc != 0:
        tail = "\n".join(line for line in logfile.read_text(errors="replace").splitlines()
                         if not line.startswith("WARNING: Location"))[-2500:]  # fmt: skip
        raise AiperfError(f"{what} failed (exit {rc}); the end of its output ({logfile}):\n{tail}")


def _kill_group(p: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group (it was started in its own session), SIGKILL after ``grace``."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- one aiperf run -------------------------------------------------------------------------------------------


def aiperf_argv(python: Path | str, *, url: str, model: str, tokenizer: Path | str, concurrency: int, requests: int,
                artifact_dir: Path | str, seed: int, timeout: float, isl: int = 128, isl_stddev: float = 0.0,
                osl: int = 32, osl_stddev: float = 0.0, trace: str | None = None, connections: str = "never",
                extra: list[str] | None = None) -> list[str]:
    """The ``aiperf profile`` command line of one concurrency point (see the module docstring)."""
    argv = [str(python), "-m", "aiperf", "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
            "--streaming", "--tokenizer", str(tokenizer), "--concurrency", str(concurrency),
            "--request-count", str(requests), "--request-timeout-seconds", f"{timeout:g}",
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0", "--use-server-token-count",
            "--connection-reuse-strategy", connections, "--random-seed", str(seed), "--artifact-dir",
            str(artifact_dir), "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry"]  # fmt: skip
    if trace:
        argv += ["--input-file", str(trace), "--custom-dataset-type", "mooncake_trace", "--no-fixed-schedule"]
    else:
        argv += ["--isl", str(isl), "--isl-stddev", f"{isl_stddev:g}", "--osl", str(osl), "--osl-stddev",
                 f"{osl_stddev:g}", "--num-dataset-entries", str(requests), "--dataset-sampling-strategy", "sequential"]
    return argv + list(extra or [])


def aiperf_env() -> dict[str, str]:
    """aiperf's environment: ours without the HuggingFace offline switches (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", COLUMNS="160")
    return env


def run_aiperf(argv: list[str], artifact_dir: Path, timeout_s: float, bar: Any = None,
               expected: int = 0) -> tuple[float, list[tuple[float, float]]]:
    """Run one aiperf profile (output to ``<artifact_dir>.aiperf.log``); the progress bar advances with the
    profiling records aiperf writes. Returns (seconds, CPU samples: (wall time, CPU seconds used so far by the
    processes of aiperf's process group alive then), every 0.5 s); :class:`AiperfError` on a non-zero exit or
    after ``timeout_s``."""
    artifact_dir.parent.mkdir(parents=True, exist_ok=True)
    logfile = artifact_dir.parent / f"{artifact_dir.name}.aiperf.log"
    records = artifact_dir / "profile_export.jsonl"
    t0 = time.monotonic()
    done = 0
    cpu: list[tuple[float, float]] = []
    with open(logfile, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=aiperf_env(), start_new_session=True)
        try:
            while p.poll() is None:
                if time.monotonic() - t0 > timeout_s:
                    _kill_group(p)
                    raise AiperfError(f"aiperf did not end within {timeout_s:.0f} s (killed); log: {logfile}")
                time.sleep(0.5)
                cpu.append((time.time(), group_cpu_s(p.pid)))
                if bar is not None and records.exists():
                    n = min(expected, _count_profiling(records))
                    if n > done:
                        bar.update(n - done)
                        done = n
        except BaseException:
            _kill_group(p)
            raise
    if bar is not None and expected > done:
        bar.update(expected - done)
    if p.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise AiperfError(f"aiperf exited {p.returncode}; log {logfile}, last lines:\n{tail}")
    return time.monotonic() - t0, cpu


_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (from /proc)."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(f[2]) == pgid:
            total += (int(f[11]) + int(f[12])) / _TCK
    return total


def window_cores(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Mean CPU cores used between the first and the last sample inside [t0, t1] (None: fewer than 2, or less
    than 1 s apart)."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1.0:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 2)


def _count_profiling(path: Path) -> int:
    try:
        return path.read_bytes().count(b'"benchmark_phase":"profiling"')
    except OSError:
        return 0


def read_export(art: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(aiperf's summary ``profile_export_aiperf.json``, the profiling phase's per-request records of
    ``profile_export.jsonl`` in send order)."""
    summary_file, records_file = art / "profile_export_aiperf.json", art / "profile_export.jsonl"
    for f in (summary_file, records_file):
        if not f.is_file():
            raise AiperfError(f"aiperf wrote no {f.name} in {art}")
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in records_file.read_text().splitlines() if line.strip()]
    prof = [r for r in records if (r.get("metadata") or {}).get("benchmark_phase") == "profiling"]
    prof.sort(key=lambda r: r["metadata"].get("request_start_ns") or 0)
    return summary, prof


def _metric(rec: dict, key: str) -> float | None:
    v = (rec.get("metrics") or {}).get(key)
    return None if v is None else v.get("value")


def _stat(summary: dict, key: str, stat: str) -> float | None:
    v = (summary.get(key) or {}).get(stat)
    return None if v is None else float(v)


def aiperf_row(graph: str, concurrency: int, prompt_len: int | None, summary: dict, prof: list[dict],
               kv: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row in bench serve's shape (``serve.summarize``) from aiperf's export, ``client: aiperf``."""
    r2 = lambda x, n=2: None if x is None else round(x, n)  # noqa: E731
    ok = [r for r in prof if not r.get("error")]
    errors = [json.dumps(r.get("error"))[:300] for r in prof if r.get("error")]
    errors += [json.dumps(e)[:300] for e in summary.get("error_summary") or []]
    row: dict[str, Any] = {
        "graph": graph, "client": "aiperf", "prompt_len": prompt_len, "rate": None, "concurrency": concurrency,
        "load": serve.Load("concurrency", concurrency).label, "requests": len(prof), "completed": len(ok),
        "errors": errors[:5], "duration_s": r2(_stat(summary, "benchmark_duration", "avg"), 3),
        "ttft_p50_ms": r2(_stat(summary, "time_to_first_token", "p50")),
        "ttft_p99_ms": r2(_stat(summary, "time_to_first_token", "p99")),
        "ttft_mean_ms": r2(_stat(summary, "time_to_first_token", "avg")),
        "tpot_p50_ms": r2(_stat(summary, "inter_token_latency", "p50")),
        "tpot_p99_ms": r2(_stat(summary, "inter_token_latency", "p99")),
        "output_tok_s": r2(_stat(summary, "output_token_throughput", "avg"), 1),
        "req_s": r2(_stat(summary, "request_throughput", "avg")),
        "prompt_tokens_mean": r2(_stat(summary, "usage_prompt_tokens", "avg"), 1),
        "output_tokens_mean": r2(_stat(summary, "usage_completion_tokens", "avg"), 1),
        "aiperf": {"request_count": _stat(summary, "request_count", "avg"),
                   "completed_request_count": _stat(summary, "completed_request_count", "avg"),
                   "request_latency_p50_ms": r2(_stat(summary, "request_latency", "p50")),
                   "request_latency_p99_ms": r2(_stat(summary, "request_latency", "p99")),
                   "effective_concurrency": r2(_stat(summary, "effective_concurrency", "avg")),
                   "version": summary.get("aiperf_version"), "is_complete": summary.get("is_complete")},
        "samples": [{"ttft_ms": r2(_metric(r, "time_to_first_token")), "tpot_ms": r2(_metric(r, "inter_token_latency")),
                     "latency_ms": r2(_metric(r, "request_latency")),
                     "prompt_tokens": _metric(r, "usage_prompt_tokens"),
                     "tokens": _metric(r, "usage_completion_tokens"),
                     "error": None if not r.get("error") else json.dumps(r["error"])[:300]} for r in prof],
    }  # fmt: skip
    if kv is not None:
        _add_kv(row, kv)
    return row


def _add_kv(row: dict[str, Any], kv: dict[str, Any]) -> None:
    n, b, mean_s = kv["kv_transfers"], kv["kv_bytes"], kv["kv_pull_s_mean"]
    row.update(kv)
    row["kv_bytes_per_request"] = round(b / n) if n else None
    row["kv_transfer_mean_ms"] = round(mean_s * 1e3, 2) if n else None
    ttft = row.get("ttft_mean_ms")
    row["kv_share_of_ttft"] = round(mean_s / (ttft / 1e3), 4) if n and ttft else None


def fresh_prompt(prompt: str) -> str:
    """The prompt with its first character replaced by ASCII of the same UTF-8 length: same length in bytes (a
    byte-level tokenizer gives the same token count), but no KV block shared with the original."""
    if not prompt:
        return "#"
    first = prompt[0]
    sub = "%" if first == "#" else "#"
    return sub * len(first.encode()) + prompt[1:]


def replay_requests(art: Path, prof: list[dict]) -> list[serve.Req]:
    """bench serve's requests for the payloads aiperf sent in its profiling phase (``inputs.json``), in aiperf's
    send order, each prompt through :func:`fresh_prompt`."""
    data = json.loads((art / "inputs.json").read_text()).get("data") or []
    by_session = {d.get("session_id"): (d.get("payloads") or [{}])[0] for d in data}
    order = [r["metadata"].get("conversation_id") for r in prof]
    payloads = [by_session[c] for c in order if c in by_session] or [p for p in by_session.values() if p]
    reqs = []
    for i, p in enumerate(payloads):
        prompt = p.get("prompt")
        if isinstance(prompt, list):
            prompt = "".join(str(x) for x in prompt)
        if not isinstance(prompt, str):
            raise AiperfError(f"{art / 'inputs.json'}: payload {i} has no text prompt ({list(p)})")
        max_tokens = p.get("max_tokens") or p.get("max_completion_tokens")
        if not max_tokens:
            raise AiperfError(f"{art / 'inputs.json'}: payload {i} has no max_tokens ({list(p)})")
        reqs.append(serve.Req(i, 0.0, fresh_prompt(prompt), int(max_tokens)))
    return reqs


# -- the benchmark --------------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


def trace_lengths(path: str) -> tuple[int, int]:
    """(longest input_length, longest output_length) of a Mooncake-style JSONL trace (sizes the KV pools)."""
    isl = osl = 0
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise AiperfError(f"--trace {path}: line {n} is not JSON ({e})") from None
        ilen = d.get("input_length") or (len(d["text_input"].encode()) if isinstance(d.get("text_input"), str) else 0)
        isl, osl = max(isl, int(ilen)), max(osl, int(d.get("output_length") or 0))
    if not isl:
        raise AiperfError(f"--trace {path}: no line with input_length or text_input")
    return isl, osl or 32


def _ns(a: argparse.Namespace, longest_in: int, longest_out: int) -> argparse.Namespace:
    """The namespace bench serve's sizing / graph_config / model_section read."""
    return argparse.Namespace(
        prompt_lens=[longest_in], prompt_len_jitter=0.0, output_len=longest_out, output_len_jitter=0.0,
        concurrency=a.concurrency, requests=a.requests, agg_workers=a.agg_workers, prefill_workers=a.prefill_workers,
        decode_workers=a.decode_workers, kv_blocks=a.kv_blocks, kv_timeout_ms=2000, policy=a.policy,
        model_name=a.model_name, preset=a.preset, dtype=a.dtype, device=a.device, max_model_len=None, layers=a.layers)


def _has_decode(g: Any) -> bool:
    return any(c.role == "decode" for c in g.children)


def bench_target(label: str, base: str, model: str, tokenizer: Path, a: argparse.Namespace, python: Path,
                 workdir: Path, bar: Any, rows: list[dict], errors: list[str], g: Any = None) -> None:
    """Warm-up, then for each concurrency point aiperf and our client; rows appended as they are measured."""
    pulls = g is not None and _has_decode(g)
    if a.warmup:
        import random  # noqa: PLC0415

        rng = random.Random(a.seed + 999)
        warm = [serve.Req(i, 0.0, serve._prompt(rng, a.isl, f"warm-{i}-{rng.getrandbits(32):08x}"), a.osl)
                for i in range(a.warmup)]  # fmt: skip
        tw = time.monotonic()
        serve.Load("concurrency", max(a.concurrency)).run(base, warm, a.timeout, None, model)
        bad = [r.error or f"finish={r.finish}" for r in warm if not r.ok]
        bar.write(f"{label}: warm-up {len(warm) - len(bad)}/{len(warm)} ok in {time.monotonic() - tw:.1f} s"
                  + (f" ({bad[0]})" if bad else ""))
    plen = None if a.trace else a.isl
    for k, c in enumerate(a.concurrency):
        art = workdir / f"aiperf-{label}" / f"c{c}"
        argv = aiperf_argv(python, url=base, model=model, tokenizer=tokenizer, concurrency=c, requests=a.requests,
                           artifact_dir=art, seed=a.seed + k, timeout=a.timeout, isl=a.isl, isl_stddev=a.isl_stddev,
                           osl=a.osl, osl_stddev=a.osl_stddev, trace=a.trace, connections=a.aiperf_connections,
                           extra=a.aiperf_args)  # fmt: skip
        bar.set_postfix_str(f"{label} c={c} aiperf")
        try:
            before = serve.decode_counters(g) if pulls else None
            load_before = _load_avg()
            secs, cpu = run_aiperf(argv, art, a.aiperf_timeout(c), bar, a.requests)
            summary, prof = read_export(art)
            kv = _kv_since(g, before) if pulls else None
            row = aiperf_row(label, c, plen, summary, prof, kv)
            row["load_avg_1m"] = load_before
            row["aiperf"]["wall_s"] = round(secs, 1)
            if prof:  # the mean cores aiperf's own processes took while it measured
                row["client_cpu_cores"] = window_cores(cpu, min(r["metadata"]["request_start_ns"] for r in prof) / 1e9,
                                                       max(r["metadata"]["request_end_ns"] for r in prof) / 1e9)
            row["aiperf"]["argv"] = shlex.join(argv[1:]).replace(str(art), "<artifacts>")
            rows.append(row)
            if g is not None:
                g.check()
            bar.write(_line(row))
        except AiperfError as e:
            errors.append(f"{label} c={c} aiperf: {e}")
            bar.write(f"{label} c={c}: aiperf FAILED: {e}")
            continue
        bar.set_postfix_str(f"{label} c={c} bench-serve")
        reqs = replay_requests(art, prof)
        before = serve.decode_counters(g) if pulls else None
        load_before, cpu0 = _load_avg(), os.times()
        t0 = serve.Load("concurrency", c).run(base, reqs, a.timeout, bar, model)
        cpu1, t1 = os.times(), time.monotonic()
        kv = _kv_since(g, before) if pulls else None
        ours = serve.summarize(label, None, reqs, t0, kv, plen, c)
        ours = {"graph": label, "client": "bench-serve", **{k2: v for k2, v in ours.items() if k2 != "graph"}}
        ours["load_avg_1m"] = load_before  # this process's CPU while our client ran (its threads; nothing else runs)
        ours["client_cpu_cores"] = round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / max(t1 - t0, 1e-9), 2)
        rows.append(ours)
        if g is not None:
            g.check()
        bar.write(_line(ours))


def _load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def _kv_since(g: Any, before: tuple[dict, float, float] | None) -> dict[str, Any]:
    time.sleep(0.3)
    after = serve.decode_counters(g)
    assert before is not None
    kv = kv_summary(kv_delta(after[0], before[0]))
    kv["local_prefills"] = int(after[1] - before[1])
    kv["kv_transfer_errors"] = int(after[2] - before[2])
    return kv


def _line(r: dict) -> str:
    return (f"{r['graph']} {r['load']} {r['client']}: {r['completed']}/{r['requests']} ok, TTFT p50 {r['ttft_p50_ms']} "
            f"ms, TPOT p50 {r['tpot_p50_ms']} ms, {r['output_tok_s']} tok/s, {r['req_s']} req/s")


# -- outputs --------------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    """The markdown: setup first, the table (bench serve's, with a client column) last."""
    m, p = res["machine"], res["params"]
    mod = res.get("model") or {}
    venv = res.get("aiperf") or {}
    if p.get("trace"):
        load = f"the requests of the trace {p['trace']} (Mooncake JSONL, timestamps ignored)"
    else:
        load = (f"synthetic prompts of {p['isl']} +- {p['isl_stddev']:g} tokens (normal; aiperf's generator with the "
                f"model's tokenizer) and {p['osl']} +- {p['osl_stddev']:g} output tokens")
    if p.get("url"):
        graphs = f"a running frontend at {p['url']} (graph label `{p.get('label') or 'running'}`)"
    elif p.get("graph"):
        graphs = f"`{p['graph']}` with `{p['config']}`, launched by `dynamo_ext.launch.launch_graph`"
    else:
        kinds = {"agg": f"agg = frontend -> router ({p['policy']}) -> {p['agg_workers']} aggregated worker(s)",
                 "disagg": f"disagg = frontend -> router ({p['policy']}) -> {p['prefill_workers']} prefill + "
                           f"{p['decode_workers']} decode worker(s), KV pulled by the decode worker"}
        graphs = ("; ".join(kinds[k] for k in p["graphs"]) + "; each started by `dynamo_ext.launch.launch_graph` "
                  "as `dynamo-ext serve` starts it (the dynamo.yaml `bench serve` builds)")
    startup = ", ".join(f"{k} {v:.1f} s" for k, v in (res.get("startup_s") or {}).items())
    lines = [f"# aiperf and bench serve's client: {mod.get('label') or mod.get('name')} through Dynamo's HTTP frontend",
             "",
             f"Machine: {serve._machine_text(m)}.", "",
             f"Model: {mod.get('label') or mod.get('name')} (`{mod.get('name')}`, {mod.get('dir')}). Graphs: {graphs}."
             + (f" Start-up (model load included): {startup}." if startup else ""), "",
             f"Load generators, one after the other on the same graph at each point (aiperf first): **aiperf "
             f"{venv.get('version')}** (`aiperf profile --endpoint-type completions --streaming`, its own venv "
             f"{venv.get('dir')}: {venv.get('how')}" + (f" in {venv.get('seconds')} s" if venv.get("how") == "created"
                                                       else "")
             + f"; `--connection-reuse-strategy {p.get('aiperf_connections', 'never')}`) and **bench serve's client** "
             "(`dynamo_ext.bench.serve`: one HTTP connection per request) sending the same requests (aiperf's "
             "`inputs.json`: same prompts and max_tokens, first character changed so nothing is served from the "
             "prefix cache aiperf's run filled).", "",
             f"Load: closed loop at concurrency {', '.join(str(c) for c in p['concurrency'])}, {p['requests']} "
             f"streaming completions per point and client, {load}; ignore_eos, temperature 0; {p['warmup']} warm-up "
             "requests per graph before its points. aiperf: TTFT = `time_to_first_token`, TPOT = "
             "`inter_token_latency` ((latency - TTFT) / (output tokens - 1), output tokens from the server's usage), "
             "output tok/s = `output_token_throughput`, req/s = `request_throughput` (over aiperf's benchmark "
             "duration). bench serve's client: TTFT = first SSE chunk - send, TPOT = (last - first chunk) / (tokens "
             "- 1), throughput over first send -> last completion. prompt tok = mean of the server's usage "
             f"prompt_tokens. With {p['requests']} requests p99 is about the maximum. "
             f"Total wall {res.get('wall_s')} s."]
    if p.get("aiperf_connections") == "pooled":
        lines += ["", "aiperf reused keep-alive connections (`pooled`): Dynamo 1.6.1's frontend does not set "
                  "TCP_NODELAY, so on a reused connection a response waits ~40 ms for the client's delayed ACK "
                  "(Nagle) and arrives in one read: aiperf's TTFT carries that wait and its TPOT is ~0; our client "
                  "opens a connection per request and does not see it."]
    if any(r.get("kv_transfers") is not None for r in res["results"]):
        lines += ["", "KV pulls (disagg) from the decode workers' `/metrics`, scraped before and after each client's "
                  "run as in `bench serve`; KV share of TTFT = mean pull seconds / mean TTFT."]
    if m.get("device") != "cuda" and not m.get("gpus"):
        lines += ["", f"On CPU: {m['cores']} cores shared by the graph's processes and the load generator (aiperf "
                  "runs about ten processes of its own), so the two clients' numbers are close only where the "
                  "machine is not saturated; read single cells with care."]
    for what, items in (("Skipped", res.get("skipped")), ("Errors", res.get("errors"))):
        if items:
            lines += ["", f"**{what}:** " + "; ".join(json.dumps(x) if not isinstance(x, str) else x for x in items)]
    if res.get("note"):
        lines += ["", res["note"]]
    cost = [r for r in res["results"] if r.get("client_cpu_cores") is not None or r.get("load_avg_1m") is not None]
    if cost:
        lines += ["", "What each load generator cost while it measured (client CPU = mean cores used by aiperf's "
                  "processes between its first send and its last response, from /proc; by this process's threads "
                  "for bench serve's client) and the machine's 1-minute load average before it started:", "",
                  "| graph | client | load | client CPU (cores) | load avg 1m |", "|---|---|---|---:|---:|"]
        lines += [f"| {r['graph']} | {r['client']} | {serve._load(r)} | "
                  f"{serve._f(r.get('client_cpu_cores'), '{:.2f}')} "
                  f"| {serve._f(r.get('load_avg_1m'), '{:.2f}')} |" for r in cost]
    lines += ["", *serve.results_table(res["results"], client=True)]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    rows = res["results"]
    colors = {("agg", "aiperf"): "tab:blue", ("agg", "bench-serve"): "tab:cyan", ("disagg", "aiperf"): "tab:orange",
              ("disagg", "bench-serve"): "tab:red"}  # fmt: skip
    series = []
    labels = list(dict.fromkeys(r["graph"] for r in rows))
    for gi, label in enumerate(labels):
        for client in CLIENTS:
            rs = sorted((r for r in rows if r["graph"] == label and r.get("client") == client),
                        key=lambda r: r["concurrency"])
            if rs:
                color = colors.get((label, client), f"C{2 * gi + CLIENTS.index(client)}")
                series.append((f"{label} {client}", [r["concurrency"] for r in rs], rs,
                               "o-" if client == "aiperf" else "s--", color))
    p, m, mod = res["params"], res["machine"], res.get("model") or {}
    where = f"{m['gpus'][0]}" if m.get("gpus") else f"{m['cpu']} ({m['cores']} cores)"
    shape = f"trace {Path(p['trace']).name}" if p.get("trace") else \
        f"ISL {p['isl']}+-{p['isl_stddev']:g}, OSL {p['osl']}+-{p['osl_stddev']:g}"
    title = (f"{mod.get('label') or mod.get('name')} on {where}: aiperf {(res.get('aiperf') or {}).get('version')} vs "
             f"bench serve's client, {shape}, {p['requests']} requests per point, closed loop")
    serve.plot_panels(series, path, "requests in flight (closed loop)", title, ("output_tok_s", "output tokens/s"))


def write_outputs(res: dict, out: Path, stem: str, png: bool) -> None:
    serve.write_outputs(res, out, stem, png, render=table, draw=plot)


def default_stem(a: argparse.Namespace, m: dict[str, Any]) -> str:
    model = a.model_label.lower().replace("/", "-").replace(" ", "-")
    return f"aiperf-{machine_tag(m)}-{model}-c" + "-".join(str(c) for c in a.concurrency)


# -- CLI ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench aiperf", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    tgt = ap.add_argument_group("target (default: --graphs agg,disagg started here)")
    tgt.add_argument("--graphs", default="agg,disagg", help="built-in graphs started one after the other: agg, disagg")
    tgt.add_argument("--graph", default=None, help="a graph file or module (with -f CONFIG) instead of --graphs")
    tgt.add_argument("-f", "--config", default=None, help="dynamo.yaml for --graph; with --url: where the model is")
    tgt.add_argument("--url", default=None, help="a frontend already serving (http://HOST:PORT): nothing is started")
    tgt.add_argument("--label", default=None, help="the graph column of --url / --graph rows (default: running / "
                                                   "the graph's name)")
    tgt.add_argument("--model", default=None, help="model name for --url (default: the one /v1/models lists)")
    tgt.add_argument("--tokenizer", default=None, help="model directory with tokenizer.json (--url without -f)")
    mdl = ap.add_argument_group("model of --graphs (as bench serve)")
    mdl.add_argument("--preset", default="tiny", help="generated model preset (default tiny)")
    mdl.add_argument("--model-path", default=None, help="a model directory (model.path) instead of a preset")
    mdl.add_argument("--layers", type=int, default=None, help="model.num_layers of the preset")
    mdl.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="model.dtype (default: float32 on cpu, bfloat16 on cuda)")
    mdl.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                     help="cpu or cuda (model.device of the graphs)")
    mdl.add_argument("--agg-workers", type=int, default=None, help="(default: 2 on cpu, 1 on cuda)")
    mdl.add_argument("--prefill-workers", type=int, default=1, help="prefill workers of the disagg graph")
    mdl.add_argument("--decode-workers", type=int, default=1, help="decode workers of the disagg graph")
    mdl.add_argument("--policy", default="round-robin", choices=("round-robin", "dynamo-ext"),
                     help="router.policy of the graphs")
    mdl.add_argument("--kv-blocks", type=int, default=None, help="KV blocks (16 tokens) per worker (default: sized "
                                                                 "for the longest request x concurrency, >= 1024)")
    ld = ap.add_argument_group("load")
    ld.add_argument("--concurrency", default="1,4,8", help="closed-loop points, comma-separated (default 1,4,8)")
    ld.add_argument("--requests", type=int, default=16, help="requests per point and client (1-10000, default 16)")
    ld.add_argument("--isl", type=int, default=128, help="input tokens, mean (default 128)")
    ld.add_argument("--isl-stddev", type=float, default=0.0, help="input tokens, standard deviation (normal)")
    ld.add_argument("--osl", type=int, default=32, help="output tokens, mean (default 32)")
    ld.add_argument("--osl-stddev", type=float, default=0.0, help="output tokens, standard deviation")
    ld.add_argument("--trace", default=None, help="Mooncake-style JSONL trace (input_length / output_length or "
                                                  "text_input per line) instead of --isl/--osl")
    ld.add_argument("--warmup", type=int, default=2, help="warm-up requests per graph (our client; default 2)")
    ld.add_argument("--seed", type=int, default=0, help="random seed of the prompts")
    ld.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    ld.add_argument("--aiperf-connections", default="never", choices=("never", "pooled"),
                    help="aiperf's --connection-reuse-strategy: never (default: a new connection per request, as our "
                         "client) or pooled (aiperf's own default; see the module docstring: ~40 ms stalls)")
    ld.add_argument("--aiperf-args", default="", help="more `aiperf profile` arguments (one shell-quoted string)")
    out = ap.add_argument_group("output")
    out.add_argument("--out", default=str(results_dir()), help="results directory")
    out.add_argument("--tag", default=None, help="file name stem (default aiperf-<machine>-<model>-c<points>)")
    out.add_argument("--force", action="store_true", help="overwrite <out>/<tag>.json when it exists")
    out.add_argument("--work-dir", default=None, help="aiperf artifacts and graph logs (default: a temporary "
                                                      "directory, removed after a clean run)")
    out.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for a graph to start")
    out.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    out.add_argument("--note", default=None, help="a paragraph added to the markdown")
    a = ap.parse_args(argv)
    try:
        a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--concurrency: {a.concurrency!r} is not a comma-separated list of integers")
    if not a.concurrency or min(a.concurrency) < 1:
        ap.error("--concurrency: integers >= 1")
    if not 1 <= a.requests <= 10000:
        ap.error(f"--requests: {a.requests} is not in 1..10000")
    if a.isl < 1 or a.osl < 1 or a.isl_stddev < 0 or a.osl_stddev < 0:
        ap.error("--isl / --osl: >= 1; --isl-stddev / --osl-stddev: >= 0")
    if a.warmup < 0:
        ap.error("--warmup: >= 0")
    if a.trace and not Path(a.trace).is_file():
        ap.error(f"--trace: {a.trace} is not a file")
    try:
        a.aiperf_args = shlex.split(a.aiperf_args)
    except ValueError as e:
        ap.error(f"--aiperf-args: {e}")
    if a.url and a.graph:
        ap.error("--url and --graph: give one of them (--url: a running frontend; --graph: one started here)")
    if a.graph and not a.config:
        ap.error("--graph: needs -f CONFIG (its dynamo.yaml)")
    if a.url and not (a.tokenizer or a.config):
        ap.error("--url: needs --tokenizer MODEL_DIR (the served model's directory, with tokenizer.json) or -f "
                 "CONFIG (its dynamo.yaml)")
    if a.url and not re.match(r"^https?://[^/]+/?$", a.url):
        ap.error(f"--url: {a.url!r} is not http(s)://HOST:PORT")
    a.graph_list = [g.strip() for g in a.graphs.split(",") if g.strip()]
    if not a.url and not a.graph and (not a.graph_list or not set(a.graph_list) <= {"agg", "disagg"}):
        ap.error(f"--graphs: {a.graphs!r}: a comma-separated list of agg, disagg")
    if a.model_path and a.layers is not None:
        ap.error("--layers: a preset's layers; --model-path has its own")
    if a.tokenizer and not a.url:
        ap.error("--tokenizer: only with --url (a graph started here uses its own model's directory)")
    a.agg_workers = a.agg_workers or (1 if a.device == "cuda" else 2)
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    from dynamo_ext.config import IMPORTED_PRESETS  # noqa: PLC0415

    if a.model_path:
        a.model_name = Path(a.model_path).name
    else:  # tiny: bench serve's name; else the served name dynamo.yaml gives the preset
        a.model_name = serve.MODEL if a.preset == "tiny" else IMPORTED_PRESETS.get(a.preset, f"dynamo-ext/{a.preset}")
    a.aiperf_timeout = lambda c: a.timeout * math.ceil(a.requests / c) + 300.0  # + start-up of aiperf's services
    return a


def model_for_graphs(a: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any], Path, str]:
    """For --graphs: bench serve's namespace (sized for the longest request at the largest concurrency), the
    dynamo.yaml ``model`` section (``--preset``, or ``model.path`` for ``--model-path``) and the model directory
    with how it was found (generated, imported or cached once, then reused: ``launch.modeldir``)."""
    from dynamo_ext.config import ModelConfig  # noqa: PLC0415
    from dynamo_ext.launch.modeldir import ensure_model_dir  # noqa: PLC0415

    longest_in, longest_out = trace_lengths(a.trace) if a.trace else \
        (math.ceil(a.isl + 4 * a.isl_stddev), math.ceil(a.osl + 4 * a.osl_stddev))
    ns = _ns(a, longest_in, longest_out)
    ns.max_model_len = 4096
    section = serve.model_section(ns)
    if a.model_path:
        section = {k: v for k, v in section.items() if k not in ("preset", "num_layers")}
        section["path"] = str(Path(a.model_path).expanduser().resolve())
    model_dir, how = ensure_model_dir(ModelConfig(**section))  # the directory does not depend on max_model_len
    try:
        max_pos = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or 4096)
    except (OSError, ValueError) as e:
        raise AiperfError(f"{model_dir / 'config.json'}: {e}") from None
    need, ns.max_model_len, per_req, auto_blocks = serve.sizing(ns, max_pos)
    if need > max_pos:
        raise AiperfError(f"--isl/--osl (+4 stddev) or --trace: the longest request needs {need} tokens, the model "
                          f"has max_position_embeddings {max_pos}")
    if a.kv_blocks is not None and a.kv_blocks < per_req:
        raise AiperfError(f"--kv-blocks {a.kv_blocks}: the longest request needs {per_req} blocks of 16 tokens")
    ns.kv_blocks = a.kv_blocks or auto_blocks
    section["max_model_len"] = ns.max_model_len
    ModelConfig(**section)  # still valid
    return ns, section, model_dir, how


def launch_and_bench(label: str, a: argparse.Namespace, ns: argparse.Namespace | None, section: dict | None,
                     model_dir: Path, python: Path, workdir: Path, bar: Any, res: dict) -> None:
    """Start the graph (``--graph`` with ``-f``, or the built-in ``label`` with bench serve's dynamo.yaml), run
    its points, stop it. A start that fails on a port taken meanwhile (another process on this machine bound it
    between the free-port probe and the bind) is retried once on new ports."""
    from dynamo_ext.launch import LaunchError, launch_graph  # noqa: PLC0415

    for attempt in (1, 2):
        if a.graph:
            spec, config = a.graph, a.config
        else:
            spec, config = f"graphs.{label}", {**serve.graph_config(label, ns), "model": section}
        t0 = time.monotonic()
        started = False
        try:
            with launch_graph(spec, config, model_dir=model_dir, log_dir=workdir / f"logs-{label}-{attempt}",
                              ready_timeout=a.ready_timeout) as g:  # fmt: skip
                started = True
                res["startup_s"][label] = round(time.monotonic() - t0, 1)
                bar.write(f"{label}: ready in {res['startup_s'][label]} s ({g.base_url})")
                bench_target(label, g.base_url, g.model, model_dir, a, python, workdir, bar, res["results"],
                             res["errors"], g)
            return
        except LaunchError as e:
            if started or attempt == 2 or "Address already in use" not in str(e):
                raise
            bar.write(f"{label}: start failed on a port taken meanwhile; retrying once on new ports")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    from tqdm import tqdm  # noqa: PLC0415

    from dynamo_ext.config import ConfigError, load_config  # noqa: PLC0415
    from dynamo_ext.launch.modeldir import ModelDirError, ensure_model_dir  # noqa: PLC0415

    t_start = time.time()
    gpu = None
    if a.device == "cuda":
        from dynamo_ext.bench._machine import cuda_info  # noqa: PLC0415

        gpu = cuda_info()
    res: dict[str, Any] = {"runtime": "dynamo", "load_generators": list(CLIENTS),
                           "machine": serve.machine(a.device, gpu),
                           "env": {k: os.environ.get(k) for k in serve.ENV_KEYS},
                           "params": {}, "model": {}, "aiperf": {"version": AIPERF_VERSION}, "startup_s": {},
                           "results": [], "skipped": [], "errors": []}  # fmt: skip
    hidden = {"out", "tag", "no_progress", "note", "aiperf_timeout", "force", "work_dir", "graph_list", "graphs"}
    res["params"] = {k: v for k, v in vars(a).items() if k not in hidden}
    res["params"]["graphs"] = [] if (a.url or a.graph) else a.graph_list
    ns = section = None
    try:  # the model: name, directory (aiperf's tokenizer) and, for --graphs, the model section of each graph
        if not (a.url or a.graph):
            tm = time.monotonic()
            ns, section, model_dir, how = model_for_graphs(a)
            res["model"] = {**section, "seconds": round(time.monotonic() - tm, 1)}
            res["params"].update(kv_blocks=ns.kv_blocks, max_model_len=ns.max_model_len)
            model, label = a.model_name, Path(a.model_path).name if a.model_path else a.preset
        else:
            cfg = load_config(a.config) if a.config else None
            if a.tokenizer:
                model_dir, how = Path(a.tokenizer).expanduser().resolve(), "given"
                if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
                    raise ModelDirError(f"--tokenizer: {model_dir} has no tokenizer.json / tokenizer_config.json")
            else:
                assert cfg is not None
                model_dir, how = ensure_model_dir(cfg.model)
            model = a.model or (cfg.model.name if cfg is not None else None)
            if model is None:
                from dynamo_ext.launch.client import list_models  # noqa: PLC0415

                names = list_models(a.url.rstrip("/"), timeout=5.0)
                if len(names) != 1:
                    raise AiperfError(f"--url {a.url}: /v1/models lists {names or 'nothing'}; name one with --model")
                model = names[0]
            label = model.split("/")[-1]
    except (ConfigError, ModelDirError, AiperfError, OSError, ValueError) as e:
        print(f"dynamo-ext bench aiperf: {e}", file=sys.stderr)
        return 2
    a.model_label = label
    res["model"].update(name=model, dir=str(model_dir), how=how, label=label)

    out = Path(a.out)
    stem = a.tag or default_stem(a, res["machine"])
    res["stem"] = stem
    if (out / f"{stem}.json").exists() and not a.force:
        print(f"dynamo-ext bench aiperf: {out / stem}.json exists (results are never overwritten): --tag NAME for "
              "another file, or --force to overwrite it", file=sys.stderr)
        return 2
    try:
        python, info = ensure_venv()
    except (AiperfError, OSError) as e:
        print(f"dynamo-ext bench aiperf: the aiperf venv: {e}", file=sys.stderr)
        return 1
    res["aiperf"].update(info)

    workdir = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="dx-bench-aiperf-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if a.url:
        targets = [a.label or "running"]
    elif a.graph:
        targets = [a.label or Path(a.graph).stem.split(".")[-1]]
    else:
        targets = a.graph_list
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    rc = 0
    try:
        total = len(targets) * len(a.concurrency) * a.requests * 2
        with tqdm(total=total, desc="aiperf bench", unit="req", disable=a.no_progress, file=sys.stderr) as bar:
            for label in targets:
                try:
                    if a.url:
                        bench_target(label, a.url.rstrip("/"), model, model_dir, a, python, workdir, bar,
                                     res["results"], res["errors"])
                    else:
                        launch_and_bench(label, a, ns, section, model_dir, python, workdir, bar, res)
                except _Terminated:
                    raise
                except Exception as e:  # noqa: BLE001 - the other graphs still run; the error is in the results
                    res["errors"].append(f"{label}: {type(e).__name__}: {str(e).strip()[:1500]}")
                    bar.write(f"{label}: FAILED: {e}")
                serve.compare_to_agg(res["results"])
                res["wall_s"] = round(time.time() - t_start, 1)
                write_outputs(res, out, stem, png=False)
    except (_Terminated, KeyboardInterrupt) as e:
        res["errors"].append(f"stopped by {e or 'Ctrl-C'} (graphs and aiperf stopped; what was measured is kept)")
        rc = 143
    finally:
        signal.signal(signal.SIGTERM, old_term)
    if res["errors"] or not res["results"] or any(r["completed"] < r["requests"] for r in res["results"]):
        rc = rc or 1
        print(f"dynamo-ext bench aiperf: aiperf artifacts and logs kept in {workdir}", file=sys.stderr)
    elif not a.work_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    res["wall_s"] = round(time.time() - t_start, 1)
    res["note"] = a.note
    serve.compare_to_agg(res["results"])
    write_outputs(res, out, stem, png=True)
    print(f"bench aiperf: wrote {out / stem}.{{json,md,png}}", file=sys.stderr)
    print(table(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
