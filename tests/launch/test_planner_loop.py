"""Closed loop on CPU: ``dynamo-ext serve graphs/disagg.py`` with ``planner.enabled: true`` runs Dynamo's
real planner (environment virtual, our plugins) and the launcher's executor. A load step (concurrent
streaming completions through the frontend, long outputs) makes the planner add a decode worker (a
new process that prints its ready line = registered); when the load stops it removes it again by
draining the newest one (SIGTERM, exit 0), and every request completed.

Short knobs: interval 2 s, start-up hold 4 s, no warm-up, 1 up tick, 2 idle ticks, ITL SLA 1 ms (any
load on CPU is "over SLA" for decode), TTFT SLA 60 s (prefill never scales; max_prefill 1), decode
1..2 with ratio bounds 1..2. Dynamo's planner needs ``aisimulate_core``: the test-only stand-in from
``tests/planner/standin`` goes on PYTHONPATH when the real one is absent (planner/README.md).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "tests" / "planner" / "standin"
_spec = importlib.util.find_spec("aisimulate_core")
# the stand-in counts as "not installed" even when another test module already put it on sys.path
USING_STANDIN = _spec is None or str(STANDIN) in (_spec.origin or "")
if USING_STANDIN and str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

pytest.importorskip("dynamo.planner.plugins.types", reason="needs dynamo-ext[planner] deps (see planner/README.md)")

from dynamo_ext.config import load_config  # noqa: E402
from dynamo_ext.launch import infra  # noqa: E402
from planner.local_config import planner_config  # noqa: E402



def _cfg(tmp_path: Path, planner: dict) -> Path:
    cfg_path = tmp_path / "dynamo.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"name": "dynamo-ext/tiny", "preset": "tiny", "block_size": 16},
        "workers": {"prefill": {"count": 1}, "decode": {"count": 1}},
        "router": {"policy": "round-robin", "disagg_min_prompt_tokens": 16},
        "planner": planner,
        "discovery": {"namespace": "dxloop", "etcd": {"endpoints": [f"http://127.0.0.1:{infra.free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{infra.free_port()}"}},
    }))  # fmt: skip
    return cfg_path


def _no_standin_env(tmp_path: Path) -> dict[str, str]:
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "standin" not in p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *old]), DYNAMO_EXT_CACHE=str(tmp_path / "cache"))


@pytest.mark.skipif(not USING_STANDIN, reason="aisimulate_core is installed: the planner can run")
def test_planner_flag_without_dependencies_exits_2_before_starting_anything(tmp_path):
    cfg = _cfg(tmp_path, {"enabled": False})
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "serve", "graphs/disagg.py", "-f", str(cfg),
                        "--planner", "--log-dir", str(tmp_path / "logs")],
                       cwd=ROOT, env=_no_standin_env(tmp_path), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "--planner but Dynamo's planner cannot run here: missing aisimulate_core" in r.stderr, r.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


@pytest.mark.skipif(not USING_STANDIN, reason="aisimulate_core is installed: the planner can run")
def test_planner_enabled_without_dependencies_warns_and_serves(tmp_path):
    cfg = _cfg(tmp_path, {"enabled": True})
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "serve", "graphs/disagg.py", "-f", str(cfg),
                        "--port", str(infra.free_port()), "--log-dir", str(tmp_path / "logs"),
                        "--once", "Hello there", "--max-tokens", "4"],
                       cwd=ROOT, env=_no_standin_env(tmp_path), capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: planner.enabled is true but Dynamo's planner cannot run here: missing aisimulate_core" in r.stderr
    assert "serving without the planner" in r.stderr and "answer: " in r.stdout
    assert not (tmp_path / "logs" / "planner.log").exists()


def _env(tmp_path: Path) -> dict[str, str]:
    paths = ([str(STANDIN)] if USING_STANDIN else []) + [str(ROOT)]
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])),
                DYNAMO_EXT_CACHE=str(tmp_path / "cache"), DYNAMO_EXT_DRAIN_S="40")  # fmt: skip


def _decode_pids(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != "Z" and b"dynamo_ext.workers" in cmd and b"decode" in cmd:
            found.append(int(pid))
    return found


class Load:
    """`n` clients, each streaming completions (SSE) back to back until stopped."""

    def __init__(self, port: int, model: str, n: int, max_tokens: int, once: bool = False) -> None:
        self.port, self.model, self.n, self.max_tokens, self.once = port, model, n, max_tokens, once
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(n)]

    def _one(self, i: int) -> None:
        prompt = f"client {i}: the quick brown fox jumps over the lazy dog " * 4
        body = json.dumps({"model": self.model, "prompt": prompt,
                           "max_tokens": self.max_tokens, "stream": True, "ignore_eos": True})  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
            done, chunks = False, 0
            for raw in resp:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    if line.startswith("event: error") or '"error"' in line:
                        raise RuntimeError(line[:300])
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(data[:300])
                chunks += 1
            if not done or chunks == 0:
                raise RuntimeError(f"stream ended without [DONE] after {chunks} chunks")
        finally:
            conn.close()

    def _client(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                self._one(i)
                with self.lock:
                    self.ok += 1
                if self.once:
                    return
            except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                with self.lock:
                    self.failed.append(f"client {i}: {type(e).__name__}: {e}")

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout: float = 60.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a client is still waiting for its stream"


def _wait(pred, timeout: float, what: str, dump) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{dump()}")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_load_step_adds_decode_worker_then_removes_it_without_losing_requests(tmp_path):
    port = infra.free_port()
    cfg_path = _cfg(tmp_path, {
        "enabled": True, "interval_s": 2, "min_prefill": 1, "max_prefill": 1, "min_decode": 1, "max_decode": 2,
        "decode_prefill_ratio_min": 1.0, "decode_prefill_ratio_max": 2.0, "cooldown_s": 2,
        "sla": {"ttft_ms": 60000, "itl_ms": 1}})  # fmt: skip
    # the generated planner config, with the policy's start-up knobs shortened for a test
    pcfg = planner_config(load_config(cfg_path), [f"http://127.0.0.1:{port}/metrics"])
    pcfg["plugin_registration"]["in_process_plugins"][0]["kwargs"].update(
        startup_hold_s=4, warmup_s=0, up_ticks=1, idle_ticks=2, min_requests=1, landing_timeout_s=60)
    (tmp_path / "planner.yaml").write_text(yaml.safe_dump(pcfg, sort_keys=False))
    logs = tmp_path / "logs"
    marker = str(tmp_path / "cache")
    err_path = tmp_path / "serve.err"
    t_start = time.monotonic()
    serve = subprocess.Popen(
        [sys.executable, "-m", "dynamo_ext.cli", "serve", "graphs/disagg.py", "-f", str(cfg_path), "--port", str(port),
         "--log-dir", str(logs), "--planner", "--planner-config", str(tmp_path / "planner.yaml"),
         "--stop-timeout", "45"],
        cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=open(err_path, "w"), text=True,
    )  # fmt: skip

    def err() -> str:
        return err_path.read_text(errors="replace")

    def dump() -> str:
        parts = [f"== serve stderr\n{err()[-4000:]}"]
        for p in sorted(logs.glob("*.log")) if logs.exists() else []:
            if p.name.startswith(("planner", "decode")):
                parts.append(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)

    load = None
    try:
        _wait(lambda: "executor running" in err() or serve.poll() is not None, 60, "serve + executor ready", dump)
        assert serve.poll() is None, dump()
        t_ready = time.monotonic() - t_start
        assert len(_decode_pids(marker)) == 1, dump()
        # Dynamo's planner imports for ~20-40 s on 2 cores; its first tick summary = plugins loaded, ticking
        planner_log = logs / "planner.log"
        _wait(lambda: "[summary]" in planner_log.read_text(errors="replace"), 60, "the planner's first tick", dump)
        t_planner = time.monotonic() - t_start

        load = Load(port, "dynamo-ext/tiny", n=6, max_tokens=400)
        load.start()
        t_up = _wait(lambda: re.search(r"planner: decode-1 ready", err()) is not None, 45,
                     "the planner to add decode-1", dump)  # fmt: skip
        assert len(_decode_pids(marker)) == 2, dump()
        # the executor logs the decision once scale() returned, just after the ready line
        applied = r"planner decision \d+: \{'prefill': 1, 'decode': 1\} -> \{'prefill': 1, 'decode': 2\}"
        _wait(lambda: re.search(applied, err()) is not None, 10, "the executor to report the decision", dump)
        time.sleep(2)  # the new worker takes part in the load (round-robin)
        load.finish()
        assert load.failed == [], "\n".join(load.failed[:10]) + "\n" + dump()
        assert load.ok > 0
        # ten long streams (the whole context), five per decode worker (round-robin), still running when the
        # planner sees no new requests and drains decode-1: its streams must finish before the process exits
        tail = Load(port, "dynamo-ext/tiny", n=10, max_tokens=2000, once=True)
        tail.start()

        t_down = _wait(lambda: "planner: decode-1 stopped" in err(), 40, "the planner to remove decode-1", dump)
        assert re.search(r"planner: decode-1 stopped after [0-9.]+s \(exit 0\)", err()), dump()
        tail.finish()
        assert tail.failed == [] and tail.ok == 10, "\n".join(tail.failed) + "\n" + dump()
        # Dynamo's ingress logs how many requests the SIGTERMed worker still had (timing: usually 3, may be 0)
        d1 = re.sub(r"\x1b\[[0-9;]*m", "", (logs / "decode-1.log").read_text(errors="replace"))
        m = re.search(r"Waiting for inflight requests to complete.*inflight_count=(\d+)", d1)
        in_flight_at_drain = int(m.group(1)) if m else 0
        if in_flight_at_drain:
            assert "All inflight requests completed" in d1, dump()
        assert len(_decode_pids(marker)) == 1, dump()
        time.sleep(1.0)  # several supervision rounds: the planner's scale-down is not undone by a restart
        assert "decode-1 exited" not in err() and "decode-1: restart" not in err() and len(_decode_pids(marker)) == 1, dump()
        assert "ERROR" not in "".join(ln for ln in err().splitlines() if "planner decision" in ln), dump()
        print(f"serve ready {t_ready:.1f}s, planner ticking {t_planner:.1f}s, load -> decode-1 ready {t_up:.1f}s, "
              f"load stop -> decode-1 drained {t_down:.1f}s ({in_flight_at_drain} long streams still in flight then); "
              f"{load.ok} + {tail.ok} requests completed, 0 failed")  # fmt: skip
    finally:
        if load is not None:
            load.stop.set()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(10)
    assert serve.returncode == 0, dump()
    assert _decode_pids(marker) == []
