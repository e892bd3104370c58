"""Local executor: decisions -> scale/drain callbacks (fakes), and a real VirtualConnector round trip."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest

from planner.executor import PlannerExecutor, PlannerProcess, planner_missing_dependencies


@dataclass
class Decision:
    num_prefill_workers: int
    num_decode_workers: int
    decision_id: int = 0


@dataclass
class FakeClient:
    decisions: list
    completed: list = field(default_factory=list)

    async def wait(self):
        while not self.decisions:
            await asyncio.sleep(0.01)

    async def get(self):
        return self.decisions[0]

    async def complete(self, d):
        self.decisions.remove(d)
        self.completed.append(d.decision_id)


class FakeLauncher:
    """Sync callbacks, like dynamo-ext serve's process supervisor; in-flight requests per worker."""

    def __init__(self, prefill=1, decode=2):
        self.workers = {"prefill": [f"p{i}" for i in range(prefill)], "decode": [f"d{i}" for i in range(decode)]}
        self.inflight = {w: 2 for ws in self.workers.values() for w in ws}
        self.draining: set[str] = set()
        self.log: list[str] = []
        self.lost = 0

    def replicas(self, role):
        return len(self.workers[role])

    def drain(self, role, target):
        victims = self.workers[role][target:]
        self.draining.update(victims)
        for v in victims:  # in-flight requests finish; nothing new is routed to a draining worker
            self.inflight[v] = 0
        self.log.append(f"drain {role} {victims}")

    def scale(self, role, target):
        ws = self.workers[role]
        while len(ws) < target:
            w = f"{role[0]}{len(ws)}+"
            ws.append(w)
            self.inflight[w] = 0
        while len(ws) > target:
            w = ws.pop()
            if w not in self.draining:
                raise AssertionError(f"stopped {w} without draining")
            self.lost += self.inflight.pop(w)
        self.log.append(f"scale {role} {target}")


async def test_apply_grows_first_then_drains_before_stopping():
    fl = FakeLauncher(prefill=2, decode=4)
    ex = PlannerExecutor(FakeClient([]), fl)
    rec = await ex.apply(Decision(1, 6, 3))
    assert rec.after == {"prefill": 1, "decode": 6} and rec.error is None and rec.decision_id == 3
    assert fl.log == ["scale decode 6", "drain prefill ['p1']", "scale prefill 1"]
    assert fl.lost == 0


async def test_minus_one_means_no_change_and_errors_are_recorded():
    fl = FakeLauncher()
    ex = PlannerExecutor(FakeClient([]), fl)
    assert (await ex.apply(Decision(-1, 3))).after == {"prefill": 1, "decode": 3}

    class Broken(FakeLauncher):
        def scale(self, role, target):
            raise RuntimeError("no GPU left")

    rec = await PlannerExecutor(FakeClient([]), Broken()).apply(Decision(2, 2))
    assert rec.error == "RuntimeError: no GPU left" and rec.after == {"prefill": 1, "decode": 2}


async def test_async_callbacks_and_drain_timeout():
    class Slow:
        n = {"prefill": 1, "decode": 3}

        def replicas(self, role):
            return self.n[role]

        async def drain(self, role, target):
            await asyncio.sleep(10)

        async def scale(self, role, target):
            self.n[role] = target

    ex = PlannerExecutor(FakeClient([]), Slow(), drain_timeout_s=0.1)
    rec = await ex.apply(Decision(1, 2))
    assert rec.after["decode"] == 2 and any("timed out" in s for s in rec.steps)


async def test_run_loop_completes_every_decision_and_stops():
    fl = FakeLauncher()
    client = FakeClient([Decision(1, 3, 0), Decision(1, 2, 1)])
    ex = PlannerExecutor(client, fl)
    stop = asyncio.Event()
    task = asyncio.create_task(ex.run(stop))
    for _ in range(200):
        if len(client.completed) == 2:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert client.completed == [0, 1] and fl.replicas("decode") == 2 and fl.lost == 0


def test_planner_process_command(tmp_path):
    pp = PlannerProcess(tmp_path / "planner.yaml", namespace="ns1", python="py", extra_pythonpath=("/x",))
    assert pp.argv() == ["py", "-m", "dynamo.planner", "--config", str(tmp_path / "planner.yaml")]
    env = pp.env({"PYTHONPATH": "/y"})
    assert env["DYN_NAMESPACE"] == "ns1" and env["PYTHONPATH"] == f"/x:/y" and env["DYN_EVENT_PLANE"] == "nats"
    assert isinstance(planner_missing_dependencies(), list)


_REAL = textwrap.dedent('''
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from dynamo._core import DistributedRuntime, VirtualConnectorCoordinator
    from planner.executor import PlannerExecutor, make_client

    class Scaler:
        n = {"prefill": 1, "decode": 2}
        log = []
        def replicas(self, role): return self.n[role]
        def drain(self, role, target): self.log.append(("drain", role, target))
        def scale(self, role, target): self.log.append(("scale", role, target)); self.n[role] = target

    async def main():
        rt = DistributedRuntime(asyncio.get_running_loop(), "etcd", "tcp", event_plane="nats")
        try:
            coord = VirtualConnectorCoordinator(rt, "dxplan", 1, 30, 5)
            await coord.async_init()
            sc = Scaler()
            ex = PlannerExecutor(make_client(rt, "dxplan"), sc)
            await coord.update_scaling_decision(2, 5)
            rec = await asyncio.wait_for(ex.run_once(), 10)
            await asyncio.wait_for(coord.wait_for_scaling_completion(), 10)
            assert await coord.is_scaling_ready()
            await coord.update_scaling_decision(1, 2)
            rec2 = await asyncio.wait_for(ex.run_once(), 10)
            print("RESULT", rec.after, rec2.after, sc.log, flush=True)
        finally:
            rt.shutdown()

    asyncio.run(main())
''')


def test_real_virtual_connector_round_trip(etcd_server, nats_server, tmp_path):
    """The coordinator Dynamo's planner uses publishes; our executor (VirtualConnectorClient) applies."""
    pytest.importorskip("dynamo._core")

    script = tmp_path / "real.py"
    script.write_text(_REAL)
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, ETCD_ENDPOINTS=etcd_server.url, NATS_SERVER=nats_server.url)
    r = subprocess.run([sys.executable, str(script), root], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))
    assert "{'prefill': 2, 'decode': 5} {'prefill': 1, 'decode': 2}" in line
    assert "('drain', 'prefill', 1)" in line and "('drain', 'decode', 2)" in line
