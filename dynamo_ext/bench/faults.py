"""``dynamo-ext bench faults``: the fault campaign of a disaggregated graph under a steady streaming load.

One graph (``graphs/disagg.py``: 1 prefill + 2 decode workers, router, Dynamo's frontend; tiny CPU model; etcd
and NATS started by the launch on free loopback ports) is started with ``launch_graph`` and its supervision
(``supervision`` in dynamo.yaml, on by default). For each fault, in turn:

1. wait until the graph is at full capacity (:func:`capacity`: every process alive and ready, every
   worker's and router's ``/health`` 200, the router sees every prefill and decode worker, the frontend
   lists the model, etcd and NATS answer);
2. a closed-loop load (:class:`Load`): ``concurrency`` client threads, each sending streaming
   ``/v1/completions`` requests (a distinct prompt each, so prefixes are not shared) one after the other;
   router policy round-robin by default, so that every request goes through the prefill worker;
3. after ``warm_s`` the fault (:data:`FAULTS`) is injected (a worker fault once the victim holds a request:
   its ``/health`` polled up to 5 s, what it held is reported); capacity is sampled every 0.25 s; the row ends
   once capacity has been full for ``settle_s`` (and the fault itself is over: SIGCONT sent), at most
   ``max_s`` after the fault; the load stops and the requests in flight finish.

A row: requests sent / completed / failed (a request fails on an HTTP error, an error event or chunk, a
stream that ends without ``[DONE]`` or without a finish reason), requests in flight when the fault hit,
seconds from the fault until full capacity was back for good (``recovery_s``), the slowest request of the row,
the supervision events (exits, restarts), and the first distinct errors. Results: ``reliability.md`` and
``.json`` under :func:`dynamo_ext.bench.results_dir` (``--out`` for another stem, ``--no-write`` for none).

    dynamo-ext bench faults [--faults sigkill-prefill,sigkill-decode,...] [--concurrency 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from dynamo_ext.helpfmt import HelpFormatter

FAULTS: dict[str, str] = {
    "sigkill-prefill": "SIGKILL the prefill worker (the only one)",
    "sigkill-decode": "SIGKILL one of the two decode workers",
    "sigterm-decode": "SIGTERM one of the two decode workers (it drains: streams handed over, exit 0)",
    "sigstop-prefill": "SIGSTOP the prefill worker for 10 s, then SIGCONT",
    "etcd-restart": "etcd (started by the launch) stopped with SIGTERM; supervision starts it again on the same "
                    "port and data directory",
    "nats-restart": "NATS (started by the launch) stopped with SIGTERM; supervision starts it again on the same "
                    "port and JetStream directory",
}
EXTRA_FAULTS: dict[str, str] = {  # not in the list: run with --faults
    "sigkill-router": "SIGKILL router-0 (the only router unless --routers 2)",
    "sigkill-frontend": "SIGKILL Dynamo's HTTP frontend",
}
# Why requests of a row fail, where the mechanism is known (shown under the table for a row with failures)
WHY_FAILED: dict[str, str] = {
    "sigkill-router": "the requests in flight went through the killed router: Dynamo's frontend only moves a stream to "
                      "another instance when started with a migration limit (DYN_MIGRATION_LIMIT / --migration-limit, "
                      "0 by default) and there is another router replica to move it to (router.replicas); "
                      "requests sent before the frontend saw the router's lease go got 503/404 for ~1 s. With "
                      "router.replicas: 2 and DYN_MIGRATION_LIMIT=3 in the frontend's environment the same fault lost "
                      "0 requests in 2 of 2 runs (`reliability-2routers.md`)",
    "sigkill-frontend": "the HTTP connections in flight were to the killed process: nothing can carry a client's TCP "
                        "stream over; the restarted frontend answers 404 until it has discovered the model again",
}
RR_NOTE = (": every request of more than 64 tokens is prefilled by the prefill worker and its KV pulled by a decode "
           "worker; dynamo-ext's cost model would prefill most of these tiny-model requests on the decode worker, "
           "leaving the prefill faults little to hit")
STOP_S = 10.0  # how long sigstop-prefill keeps the worker stopped
FAILED_PAUSE_S = 0.2  # a load thread waits this long after a failed request before its next one
PROMPT = ("The quick brown fox jumps over the lazy dog while the tiny model keeps generating tokens for "
          "a reliability test of the disaggregated graph")


@dataclass
class RequestResult:
    start: float  # monotonic
    end: float
    ok: bool
    error: str = ""
    chunks: int = 0
    finish_reason: str = ""


def stream_completion(base: str, model: str, prompt: str, max_tokens: int, timeout: float = 120.0) -> RequestResult:
    """One streaming ``/v1/completions`` request, read to its end."""
    t0 = time.monotonic()
    u = urlparse(base)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True}).encode()  # fmt: skip
    chunks, finish, done = 0, "", False
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")[:300]
            return RequestResult(t0, time.monotonic(), False, f"HTTP {resp.status}: {text}")
        event = ""
        while True:
            raw = resp.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").strip()
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if event == "error":
                return RequestResult(t0, time.monotonic(), False, f"error event: {data[:300]}", chunks)
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                return RequestResult(t0, time.monotonic(), False, f"bad chunk: {data[:200]}", chunks)
            if obj.get("error"):
                return RequestResult(t0, time.monotonic(), False, f"error chunk: {json.dumps(obj)[:300]}", chunks)
            for ch in obj.get("choices") or []:
                chunks += 1
                finish = ch.get("finish_reason") or finish
    except (OSError, http.client.HTTPException) as e:
        return RequestResult(t0, time.monotonic(), False, f"{type(e).__name__}: {e}", chunks)
    finally:
        conn.close()
    if not done:
        return RequestResult(t0, time.monotonic(), False, "stream ended without [DONE]", chunks, finish)
    if finish not in ("length", "stop"):
        return RequestResult(t0, time.monotonic(), False, f"finish_reason {finish!r}", chunks, finish)
    return RequestResult(t0, time.monotonic(), True, "", chunks, finish)


def make_prompt(chars: int) -> str:
    """``chars`` characters of English text (PROMPT repeated); the byte-level tokenizer makes ~1 token each."""
    return (PROMPT + " ") * (chars // (len(PROMPT) + 1)) + PROMPT[: chars % (len(PROMPT) + 1)]


class Load:
    """``concurrency`` threads, each sending one streaming request after the other until ``stop()``."""

    def __init__(self, base: str, model: str, concurrency: int = 8, max_tokens: int = 32,
                 timeout: float = 120.0, prompt_chars: int = len(PROMPT)) -> None:  # fmt: skip
        self.base, self.model, self.concurrency, self.max_tokens, self.timeout = base, model, concurrency, max_tokens, timeout
        self.text = make_prompt(prompt_chars)
        self.results: list[RequestResult] = []
        self.inflight: dict[int, float] = {}  # thread index -> start of its request in flight
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._n = 0

    def _prompt(self) -> str:
        with self._lock:
            self._n += 1
            return f"Request {self._n}: {self.text}"

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            self.inflight[i] = time.monotonic()
            r = stream_completion(self.base, self.model, self._prompt(), self.max_tokens, self.timeout)
            self.inflight.pop(i, None)
            with self._lock:
                self.results.append(r)
            if not r.ok:
                self._stop.wait(FAILED_PAUSE_S)  # a client that fails does not spin: counts stay meaningful

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"load-{i}")
                         for i in range(self.concurrency)]  # fmt: skip
        for t in self._threads:
            t.start()

    def in_flight_at(self, t: float) -> int:
        return len([s for s in list(self.inflight.values()) if s <= t])

    def stop(self, timeout: float = 120.0) -> None:
        """No new requests; the ones in flight finish (each is bounded by its own timeout)."""
        self._stop.set()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, end - time.monotonic()))


def _health(url: str, timeout: float = 1.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}
    except (OSError, ValueError) as e:
        return 0, {"error": f"{type(e).__name__}"}


def capacity(g: Any, prefill: int, decode: int) -> list[str]:
    """What keeps the graph from full capacity now (empty: full capacity)."""
    from dynamo_ext.launch.client import list_models  # noqa: PLC0415
    from dynamo_ext.launch.infra import etcd_healthy, nats_answers  # noqa: PLC0415

    missing = []
    if not g.serving():
        missing.append("supervisor: a process is down, restarting or not ready")
    for c in g.children:
        if not c.metrics_url:
            continue
        code, h = _health(c.metrics_url.rsplit("/", 1)[0] + "/health")
        if code != 200:
            missing.append(f"{c.name} /health {code or 'no answer'} {h.get('status', h.get('error', ''))}")
        elif c.role == "router" and (h.get("prefill_workers") != prefill or h.get("decode_workers") != decode):
            missing.append(f"{c.name} sees {h.get('prefill_workers')} prefill / {h.get('decode_workers')} decode")
    if g.model not in list_models(g.base_url, timeout=1.0):
        missing.append("frontend does not list the model")
    cfg = g.config.discovery
    if not etcd_healthy(cfg.etcd.endpoints[0], timeout=1.0):
        missing.append("etcd does not answer")
    if not nats_answers(cfg.nats.url, timeout=1.0):
        missing.append("nats does not answer")
    return missing


def _pid(g: Any, name: str) -> int:
    for c in list(g.children) + list(g.infra):
        if c.name == name:
            return int(c.pid)
    raise KeyError(f"no process {name!r} in the graph ({[c.name for c in g.children + g.infra]})")


VICTIMS = {"sigkill-prefill": "prefill-0", "sigkill-decode": "decode-1", "sigterm-decode": "decode-1",
           "sigstop-prefill": "prefill-0", "etcd-restart": "etcd", "nats-restart": "nats",
           "sigkill-router": "router-0", "sigkill-frontend": "frontend"}


BUSY_KEYS = ("running", "waiting", "held_handles")


def victim_state(g: Any, fault: str, wait_busy_s: float = 0.0) -> str:
    """The faulted process, and for a worker the requests it holds (``/health``: running, waiting, prefill KV
    handles held) just before the fault; waits up to ``wait_busy_s`` for it to hold one (a fault that hits a
    busy worker is the one that tests recovery)."""
    name = VICTIMS[fault]
    for c in g.children:
        if c.name == name and c.metrics_url:
            url = c.metrics_url.rsplit("/", 1)[0] + "/health"
            end = time.monotonic() + wait_busy_s
            while True:
                code, h = _health(url)
                busy = code == 200 and any(h.get(k) for k in BUSY_KEYS)
                if busy or time.monotonic() >= end:
                    break
                time.sleep(0.005)
            if code != 200:
                return f"{name}: /health {code}"
            keys = [k for k in BUSY_KEYS if k in h]
            return f"{name}: " + ", ".join(f"{k} {h[k]}" for k in keys) if keys else name
    return name


def inject(g: Any, fault: str) -> tuple[float, Callable[[], bool]]:
    """Inject ``fault``; returns (its duration in seconds, a callable that is true once the fault is over)."""
    if fault == "sigkill-prefill":
        os.kill(_pid(g, "prefill-0"), signal.SIGKILL)
    elif fault == "sigkill-decode":
        os.kill(_pid(g, "decode-1"), signal.SIGKILL)
    elif fault == "sigterm-decode":
        os.kill(_pid(g, "decode-1"), signal.SIGTERM)
    elif fault == "sigstop-prefill":
        pid = _pid(g, "prefill-0")
        os.kill(pid, signal.SIGSTOP)
        over = threading.Event()

        deadline = time.monotonic() + STOP_S

        def cont() -> None:
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(left)
            try:
                os.kill(pid, signal.SIGCONT)
            finally:
                over.set()

        threading.Thread(target=cont, daemon=True).start()
        return STOP_S, over.is_set
    elif fault == "sigkill-router":
        os.kill(_pid(g, "router-0"), signal.SIGKILL)
    elif fault == "sigkill-frontend":
        os.kill(_pid(g, "frontend"), signal.SIGKILL)
    elif fault in ("etcd-restart", "nats-restart"):
        os.kill(_pid(g, fault.split("-")[0]), signal.SIGTERM)
    else:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join([*FAULTS, *EXTRA_FAULTS])})")
    return 0.0, lambda: True


def wait_capacity(g: Any, prefill: int, decode: int, timeout: float) -> list[str]:
    end = time.monotonic() + timeout
    missing = capacity(g, prefill, decode)
    while missing and time.monotonic() < end:
        time.sleep(0.25)
        missing = capacity(g, prefill, decode)
    return missing


@dataclass
class Row:
    fault: str
    what: str
    sent: int = 0
    completed: int = 0
    failed: int = 0
    failed_in_flight: int = 0  # failed requests that were in flight when the fault hit (the rest started after)
    in_flight_at_fault: int = 0  # client side: requests sent and not finished
    victim: str = ""  # the faulted process and what it was serving just before (its /health)
    chunks_per_request: float = 0.0  # mean streamed chunks of a completed request
    recovery_s: float | None = None  # None: capacity not back within max_s
    slowest_request_s: float = 0.0
    restarts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    not_back: list[str] = field(default_factory=list)  # what was still missing at the end (recovery_s None)
    missing_during_fault: list[str] = field(default_factory=list)  # the first capacity gap seen after the fault


def run_fault(g: Any, fault: str, *, prefill: int, decode: int, concurrency: int, max_tokens: int,
              prompt_chars: int = len(PROMPT), warm_s: float = 4.0, settle_s: float = 3.0, max_s: float = 90.0,
              say: Callable[[str], None] = lambda _s: None) -> Row:  # fmt: skip
    row = Row(fault, {**FAULTS, **EXTRA_FAULTS}[fault])
    before = wait_capacity(g, prefill, decode, 120.0)
    if before:
        raise RuntimeError(f"{fault}: the graph is not at full capacity before the fault: {before}")
    n_events = len(g.events)
    load = Load(g.base_url, g.model, concurrency, max_tokens, prompt_chars=prompt_chars)
    load.start()
    time.sleep(warm_s)
    row.victim = victim_state(g, fault, wait_busy_s=5.0)
    t0 = time.monotonic()
    duration, over = inject(g, fault)
    row.in_flight_at_fault = load.in_flight_at(t0)
    say(f"{fault}: injected with {row.in_flight_at_fault} requests in flight")
    ok_since: float | None = None
    missing: list[str] = []
    while time.monotonic() - t0 < max_s:
        time.sleep(0.25)
        # a check counts only if the fault was over when it STARTED: a /health call to a stopped worker waits
        # and is answered once it continues, so a check begun during the stop can come back clean after it
        now = time.monotonic()
        was_over = over()
        missing = capacity(g, prefill, decode)
        if missing and not row.missing_during_fault:
            row.missing_during_fault = missing
        if missing or not was_over:
            ok_since = None
            continue
        ok_since = ok_since or now
        if now - ok_since >= settle_s and now - t0 >= duration + 1.0:
            break
    load.stop()
    if ok_since is not None and not missing:
        row.recovery_s = round(ok_since - t0, 2)
    else:
        row.not_back = missing
    res = load.results
    row.sent, row.completed = len(res), sum(r.ok for r in res)
    row.failed = row.sent - row.completed
    row.failed_in_flight = sum(1 for r in res if not r.ok and r.start <= t0)
    row.chunks_per_request = round(sum(r.chunks for r in res if r.ok) / max(1, row.completed), 1)
    row.slowest_request_s = round(max((r.end - r.start for r in res), default=0.0), 2)
    seen: list[str] = []
    for r in res:
        if not r.ok and r.error[:80] not in [e[:80] for e in seen]:
            seen.append(r.error)
    row.errors = seen[:3]
    row.restarts = [re.sub(r" \(exit \d+ of at most .*", "", text.splitlines()[0].split("; last lines of")[0])
                    for _t, kind, _n, text in g.events[n_events:] if kind in ("exited", "ready")]  # fmt: skip
    say(f"{fault}: sent {row.sent}, completed {row.completed}, failed {row.failed}, capacity back after "
        f"{row.recovery_s}s" + (f" (missing: {row.not_back})" if row.not_back else ""))
    return row


def campaign_config(args: argparse.Namespace) -> dict[str, Any]:
    from dynamo_ext.launch.infra import free_port  # noqa: PLC0415

    return {
        "model": {"name": "dynamo-ext/tiny", "preset": "tiny", "block_size": 16, "dtype": "float32"},
        "kv_transfer": {"backend": "nixl", "transport": "auto", "timeout_ms": 2000},
        "workers": {"prefill": {"count": 1, "num_kv_blocks": 1024}, "decode": {"count": 2, "num_kv_blocks": 1024}},
        "router": {"policy": args.policy, "disagg_min_prompt_tokens": 64, "replicas": args.routers},
        "discovery": {"namespace": "faults", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}},
    }  # supervision and discovery.etcd.lease_ttl_s: the defaults


def machine() -> dict[str, Any]:
    from ._machine import cpu_model, load_avg_1m  # noqa: PLC0415

    try:
        from importlib.metadata import version  # noqa: PLC0415

        dyn = version("ai-dynamo-runtime")
    except Exception:  # noqa: BLE001
        dyn = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "ai-dynamo-runtime": dyn, "load_avg_1m": load_avg_1m(), "host": platform.node()}


def run_campaign(faults: list[str], *, concurrency: int = 8, max_tokens: int = 256, prompt_chars: int = 1000,
                 policy: str = "round-robin",
                 routers: int = 1,
                 warm_s: float = 4.0, settle_s: float = 3.0, max_s: float = 90.0, log_dir: str | Path | None = None,
                 env: dict[str, str] | None = None, say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:  # fmt: skip
    from dynamo_ext.launch import launch_graph  # noqa: PLC0415

    args = argparse.Namespace(policy=policy, routers=routers)
    cfg = campaign_config(args)
    m = machine()
    rows: list[Row] = []
    t_start = time.time()
    with launch_graph("graphs.disagg", cfg, log_dir=log_dir, env=env, ready_timeout=240) as g:
        say(f"graph ready in {g.ready_s:.1f}s (logs {g.log_dir})")
        for fault in faults:
            rows.append(run_fault(g, fault, prefill=1, decode=2, concurrency=concurrency, max_tokens=max_tokens,
                                  prompt_chars=prompt_chars, warm_s=warm_s, settle_s=settle_s, max_s=max_s, say=say))  # fmt: skip
        g.check()
        log_dir_used = str(g.log_dir)
        supervision = g.config.supervision.model_dump()
        ttl = g.config.discovery.etcd.lease_ttl_s
    return {"machine": m, "env": dict(env or {}), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
            "seconds": round(time.time() - t_start, 1),
            "params": {"graph": "graphs/disagg.py", "prefill_workers": 1, "decode_workers": 2, "router": policy, "router_replicas": routers,
                       "model": "tiny (random weights, CPU, float32)", "concurrency": concurrency,
                       "max_tokens": max_tokens, "prompt": f"'Request N: ' + {prompt_chars} characters of text (~"
                       f"{prompt_chars + 12} tokens, byte-level tokenizer: disaggregated, distinct per request)",
                       "warm_s": warm_s, "settle_s": settle_s, "max_s": max_s, "supervision": supervision,
                       "lease_ttl_s": ttl, "stop_s": STOP_S},
            "log_dir": log_dir_used, "rows": [asdict(r) for r in rows]}


def table(res: dict[str, Any]) -> str:
    m, p = res["machine"], res["params"]
    lines = [
        "# Reliability: fault campaign under a steady streaming load", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, ai-dynamo-runtime "
        f"{m.get('ai-dynamo-runtime')}; load average at start {m['load_avg_1m']}. Run {res['started']}, "
        f"{res['seconds']:.0f} s in all (`dynamo-ext bench faults`, `dynamo_ext/bench/faults.py`).", "",
        f"Graph: `{p['graph']}` started by `launch_graph` as `dynamo-ext serve` starts it: {p['prefill_workers']} "
        f"prefill + {p['decode_workers']} decode workers, {p.get('router_replicas', 1)} router(s) (policy "
        f"{p['router']}{RR_NOTE if p['router'] == 'round-robin' else ''}), Dynamo's frontend, etcd and NATS "
        f"started by the launch on loopback; model {p['model']}; supervision {p['supervision']}; "
        f"lease TTL {p['lease_ttl_s']} s.", "",
        f"Load: closed loop of {p['concurrency']} concurrent streaming `/v1/completions` requests (HTTP, "
        f"127.0.0.1), max_tokens {p['max_tokens']}, temperature 0, prompt {p['prompt']}. Each row: "
        f"{p['warm_s']:g} s of load, the fault, then load until the graph has been at full capacity for "
        f"{p['settle_s']:g} s (at most {p['max_s']:g} s); the requests in flight then finish. A worker fault is "
        "injected once the victim's `/health` shows it holds a request (polled up to 5 s).", "",
        "Full capacity: every process alive and ready (supervisor), every worker's and the router's `/health` 200, "
        "the router sees 1 prefill and 2 decode workers, the frontend lists the model, etcd and NATS answer. "
        "`capacity back` = seconds from the fault until then, for good. A request fails on an HTTP error, an "
        "error event or chunk, or a stream without `[DONE]` and a finish reason; a client thread waits "
        f"{FAILED_PAUSE_S:g} s after a failure. `victim just before`: the faulted process and its `/health` load "
        "(requests running / waiting, prefill KV handles held) just before the fault."
        + (f" Environment added to every process: {res['env']}." if res.get("env") else ""), "",
        "| fault | sent | completed | failed (in flight at the fault) | victim just before | capacity back (s) | slowest request (s) | "
        "chunks / request | supervision | errors |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in res["rows"]:
        back = f"{r['recovery_s']:.1f}" if r["recovery_s"] is not None else f"not back ({'; '.join(r['not_back'])})"
        sup = "<br>".join(x.replace("|", "/") for x in r["restarts"]) or "-"
        errs = "<br>".join(e.replace("|", "/")[:160] for e in r["errors"]) or "-"
        lines.append(f"| {r['fault']} | {r['sent']} | {r['completed']} | {r['failed']} ({r['failed_in_flight']}) "
                     f"| {r['victim']} "
                     f"| {back} | {r['slowest_request_s']:.1f} | {r['chunks_per_request']:g} | {sup} | {errs} |")
    lines += ["", "Faults: " + "; ".join(f"`{r['fault']}`: {r['what']}" for r in res["rows"]) + "."]
    met = [r["fault"] for r in res["rows"] if r["failed"] == 0 and r["recovery_s"] is not None
           and r["recovery_s"] <= 15.0]  # fmt: skip
    lines += ["", f"Targets (issue 13: 0 failed requests, full capacity back within 15 s): met by {len(met)} of "
              f"{len(res['rows'])} rows" + (f" ({', '.join(met)})" if met else "") + "."]
    for r in res["rows"]:
        if r["fault"] == "sigstop-prefill" and r["slowest_request_s"] >= 0.8 * p.get("stop_s", STOP_S):
            lines.append(f"- `{r['fault']}`: nothing failed, but requests that had reached the stopped prefill worker "
                         f"waited for its SIGCONT (slowest {r['slowest_request_s']:.1f} s): a stopped process still "
                         "accepts connections, and the router's prefill call times out only after kv_transfer.timeout_ms + 30 s "
                         "(`serving/router.py` prefill_call_extra_s).")
        if r["failed"] or r["recovery_s"] is None:
            why = WHY_FAILED.get(r["fault"], "see the errors column and the logs")
            lines.append(f"- `{r['fault']}`: {r['failed']} failed ({r['failed_in_flight']} in flight at the fault): {why}.")
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table(res))


def main(argv: list[str] | None = None) -> int:
    from . import results_dir  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="dynamo-ext bench faults", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, in order (default: the issue's "
                   f"{', '.join(FAULTS)}; also {', '.join(EXTRA_FAULTS)})")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streaming requests (the load)")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--prompt-chars", type=int, default=1000, help="prompt length in characters (~tokens)")
    p.add_argument("--policy", default="round-robin", choices=["dynamo-ext", "round-robin"],
                   help="router.policy (default round-robin: every request above 64 tokens goes through the prefill "
                        "worker; dynamo-ext's cost model prefills most tiny-model requests on the decode worker)")
    p.add_argument("--routers", type=int, default=1, help="router replicas (router.replicas)")
    p.add_argument("--warm-s", type=float, default=4.0, help="seconds of load before the fault")
    p.add_argument("--settle-s", type=float, default=3.0, help="capacity must be full this long to count as recovered")
    p.add_argument("--max-s", type=float, default=90.0,
                   help="give up waiting for recovery after this many seconds from the fault")
    p.add_argument("--log-dir", default=None, help="keep the graph's logs here (default: a temporary directory)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="added to every child's environment")
    p.add_argument("--out", default=None, help="result stem (default: <results>/reliability)")
    p.add_argument("--no-write", action="store_true", help="print the results, write no result files")
    a = p.parse_args(argv)
    faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in faults if f not in FAULTS and f not in EXTRA_FAULTS]
    if bad:
        p.error(f"unknown fault(s) {bad}; known: {', '.join([*FAULTS, *EXTRA_FAULTS])}")
    res = run_campaign(faults, concurrency=a.concurrency, max_tokens=a.max_tokens, prompt_chars=a.prompt_chars, policy=a.policy, routers=a.routers,
                       warm_s=a.warm_s,
                       settle_s=a.settle_s, max_s=a.max_s, log_dir=a.log_dir,
                       env=dict(kv.split("=", 1) for kv in a.env))
    print(table(res))
    if not a.no_write:
        stem = Path(a.out) if a.out else results_dir() / "reliability"
        write(res, stem)
        print(f"written: {stem.with_suffix('.md')}, {stem.with_suffix('.json')}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 and r["recovery_s"] is not None for r in res["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
