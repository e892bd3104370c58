"""Integration (CPU): Dynamo's real planner process (environment: virtual) loads our plugins from
configs/planner.yaml and publishes a decision; our executor (ExecutorThread -> VirtualConnectorClient)
receives it and calls the launcher's scale callback. Real etcd + NATS from tests/conftest.py.

No workers run, so the planner sees 0 prefill / 0 decode: our propose plugin lifts both to their
minimum (1, 1) and our constrain plugin raises decode to 2 (ratio >= 2:1); the executor must see (1, 2).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dynamo.planner.plugins.types", reason="needs dynamo-ext[planner] deps (see planner/README.md)")

from planner_support import ROOT, planner_env  # noqa: E402

from planner.executor import PlannerProcess, planner_missing_dependencies  # noqa: E402

pytestmark = pytest.mark.slow

_EXECUTOR = textwrap.dedent('''
    import sys, threading, time
    from planner.executor import ExecutorThread

    class Scaler:
        def __init__(self):
            self.n = {"prefill": 0, "decode": 0}
            self.calls = []
            self.done = threading.Event()
        def replicas(self, role): return self.n[role]
        def drain(self, role, target): self.calls.append(("drain", role, target))
        def scale(self, role, target):
            self.calls.append(("scale", role, target)); self.n[role] = target
            if self.n == {"prefill": 1, "decode": 2}: self.done.set()

    sc = Scaler()
    ex = ExecutorThread(sc, "dxplan")
    ex.start()
    print("EXECUTOR_READY", flush=True)
    ok = sc.done.wait(float(sys.argv[1]))
    time.sleep(0.5)
    hist = [(a.decision_id, a.after) for a in ex.executor.history]
    ex.stop()
    print("RESULT", ok, sc.calls, hist, flush=True)
''')


def test_real_planner_publishes_our_decision_to_executor(etcd_server, nats_server, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs/planner.yaml").read_text())
    cfg["load_adjustment_interval_seconds"] = 2
    cfg["plugin_registration"]["in_process_plugins"][0]["kwargs"].update(metrics_urls=[], startup_hold_s=0)
    cfg_path = tmp_path / "planner.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = planner_env(ETCD_ENDPOINTS=etcd_server.url, NATS_SERVER=nats_server.url)
    proc = PlannerProcess(cfg_path, namespace="dxplan")
    assert not [m for m in planner_missing_dependencies() if m != "aisimulate_core"]

    log = open(tmp_path / "planner.log", "w")
    planner = subprocess.Popen(proc.argv(), env=proc.env(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    script = tmp_path / "executor.py"
    script.write_text(_EXECUTOR)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(script), "90"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=150)
        elapsed = time.monotonic() - t0
        text = (tmp_path / "planner.log").read_text(errors="replace")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT"))
        assert line.startswith("RESULT True"), line + "\n" + text[-4000:]
        assert "('scale', 'prefill', 1)" in line and "('scale', 'decode', 2)" in line
        assert "registered plugin_id=dynamo-ext-sla-propose" in text and "dynamo-ext-ratio-links" in text
        assert "RatioLinkConstrain: ratio 1/1 < 2" in text
        print(f"planner start -> executor applied decision: {elapsed:.1f}s")
    finally:
        planner.terminate()
        try:
            planner.wait(20)
        except subprocess.TimeoutExpired:
            planner.kill()
            planner.wait(10)
        log.close()
