"""The launcher's side of the planner: a ``WorkerScaler`` over the supervisor's worker processes.

Protocol (``planner.executor.WorkerScaler``; called from the executor's worker threads)
------------------------------------------------------------------------------------
* ``replicas(role)``: live worker processes of the graph component with that role (``prefill`` or
  ``decode``), not counting ones being stopped; starting ones count.
* ``scale(role, target)``: grow by starting copies of the role's first process (same command, a new
  ``--index`` and a free ``--metrics-port``; named ``<component>-<index>``, indexes never reused) and
  waiting (``ready_timeout``) until each prints its ``DYNAMO_EXT_READY`` line (it has registered);
  shrink like ``drain``.
* ``drain(role, target)``: picks the newest workers of the role until ``target`` remain, SIGTERMs them
  (the worker stops taking requests, finishes its in-flight ones for ``DYNAMO_EXT_DRAIN_S``, revokes
  its lease, exits 0) and returns once they exited (SIGKILL only after the child's ``stop_timeout``).
  So the executor's drain-then-scale leaves ``scale`` nothing to do on the way down.
The supervisor's ``check()`` ignores children marked stopping, so a drained worker is no failure and is never
restarted by supervision (``stop_group`` marks it stopping before the SIGTERM).
Every action is reported through ``say`` (one line each).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from .infra import free_port
from .supervisor import Child, ChildSpec, Supervisor, SupervisorError, describe_status


class LauncherScaler:
    def __init__(self, sup: Supervisor, components: dict[str, str], *, ready_timeout: float = 120.0,
                 say: Callable[[str], None] = lambda _s: None) -> None:  # fmt: skip
        """``components``: role -> graph component name (``{"prefill": "prefill", "decode": "decode"}``)."""
        self.sup, self.components, self.ready_timeout, self.say = sup, components, ready_timeout, say
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, str, str]] = []  # (time, action, role, child name)

    def _workers(self, role: str) -> list[Child]:
        comp = self.components.get(role)
        return [c for c in list(self.sup.children) if c.spec.component == comp and not c.stopping and c.alive()]

    def replicas(self, role: str) -> int:
        return len(self._workers(role))

    def _spec_for(self, role: str) -> ChildSpec:
        comp = self.components[role]
        mine = [c for c in self.sup.children if c.spec.component == comp]
        if not mine:
            raise SupervisorError(f"no {role} process to copy")
        template = mine[0].spec
        index = 1 + max(int(c.spec.argv[c.spec.argv.index("--index") + 1]) for c in mine)
        argv = list(template.argv)
        argv[argv.index("--index") + 1] = str(index)
        argv[argv.index("--metrics-port") + 1] = str(free_port())
        return dataclasses.replace(template, name=f"{comp}-{index}", argv=argv)

    def scale(self, role: str, target: int) -> None:
        with self._lock:
            current = self._workers(role)
            if target < len(current):
                self._stop_newest(role, len(current) - target)
                return
            started = []
            for _ in range(target - len(current)):
                child = self.sup.start(self._spec_for(role))
                started.append(child)
                self.events.append((time.time(), "start", role, child.name))
                self.say(f"planner: starting {child.name} ({role} {len(current) + len(started)}/{target})")
            deadline = time.monotonic() + self.ready_timeout
            for child in started:
                while child.ready_at is None:
                    assert child.spec.ready is not None
                    if child.spec.ready(child):
                        child.ready_at = time.monotonic()
                        break
                    if not child.alive():
                        status = describe_status(child.returncode)
                        raise SupervisorError(f"{child.name} exited before it was ready ({status})")
                    if time.monotonic() > deadline:
                        raise SupervisorError(f"{child.name} not ready after {self.ready_timeout:g}s")
                    time.sleep(0.2)
                self.events.append((time.time(), "ready", role, child.name))
                self.say(f"planner: {child.name} ready ({child.ready_at - child.started_at:.1f}s, "
                         f"instance {child.ready_info.get('instance_id', '?')})")  # fmt: skip

    def drain(self, role: str, target: int) -> None:
        with self._lock:
            n = len(self._workers(role)) - target
            if n > 0:
                self._stop_newest(role, n)

    def _stop_newest(self, role: str, n: int) -> None:
        victims = sorted(self._workers(role), key=lambda c: c.started_at)[-n:]
        for c in victims:
            self.events.append((time.time(), "drain", role, c.name))
            self.say(f"planner: draining {c.name} (SIGTERM; in-flight requests finish first)")
        t0 = time.monotonic()
        for name, how in self.sup.stop_group(victims):
            self.events.append((time.time(), "exited", role, name))
            self.say(f"planner: {name} stopped after {time.monotonic() - t0:.1f}s ({how})")
