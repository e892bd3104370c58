"""``launch_graph``: a graph started as ``dynamo-ext serve`` starts it, as a context manager.

    with launch_graph("graphs/disagg.py", "configs/disagg.yaml", port=None, log_dir=None) as g:
        complete(g.base_url, g.model, "Hello")          # dynamo_ext.launch.client
        texts = g.metrics(role="decode")                # {child name: Prometheus text of its /metrics}
        g.children                                      # [LaunchedChild(name, role, pid, instance_id, metrics_url)]
        g.infra                                         # etcd / NATS this launch started (LaunchedChild each)
        g.serving(); g.events                           # full capacity now?; supervision events (exits, restarts)
        g.scale("decode", 2); g.stop_child("decode-0")  # add / remove workers as the planner does (never restarted)
    # here every child is stopped (reverse start order, SIGTERM then SIGKILL), the etcd records of the stopped
    # instances are gone, and etcd / NATS are stopped if this launch started them

It is :class:`dynamo_ext.launch.serve.Launch` (the code of ``dynamo-ext serve``: ``prepare`` -> ``start`` ->
``stop``) without the CLI around it: no signal handlers (the caller decides what SIGTERM does; a
``SystemExit`` raised in the ``with`` body stops the graph like any exception), no ``--once``, no banner.
Supervision is the same as serve's (``supervision`` in the config): a supervision thread restarts a child
that exits, with back-off; when restarts are exhausted the graph keeps what still runs and ``check()``
raises :class:`LaunchError` with the reason (the caller decides to stop: leaving the ``with`` does).

Arguments:
  graph          a path (``graphs/agg.py``) or module (``graphs.agg``), as for ``serve``
  config         a ``dynamo.yaml`` path, a mapping (validated like a file) or a :class:`DynamoExtConfig`;
                 a mapping or object is written as YAML into the log directory (the workers read a file)
  port           the frontend's HTTP port; ``None``: a free loopback port (not ``frontend.http_port``, so
                 that launches from benchmarks and tests never collide with a running ``serve``)
  model_dir      as ``serve --model-dir`` (else ``model.path`` or the cached generated directory)
  log_dir        one ``<child>.log`` per process (else a new temporary directory, kept after the exit)
  env            added to every child's environment
  ready_timeout  seconds for every child to be ready; a child that exits or is late raises :class:`LaunchError`
                 (with its last log lines) after everything started so far is stopped
  stop_timeout, tolerate_exits, planner, python, quiet   as the ``serve`` options of the same names
                 (``quiet``: no waiting progress line)

Errors: :class:`LaunchError` (``.code``: 2 bad config / graph / port / model directory, 1 a child failed).
"""

from __future__ import annotations

import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from dynamo_ext.config import ConfigError, DynamoExtConfig, parse_config

from .graph import Graph
from .infra import free_port
from .scaling import LauncherScaler
from .serve import Launch, LaunchError, ServeOptions
from .supervisor import Child, SupervisorError

__all__ = ["LaunchError", "LaunchedChild", "LaunchedGraph", "launch_graph"]


@dataclass(frozen=True)
class LaunchedChild:
    """One process of the graph, from its readiness line (``DYNAMO_EXT_READY role=R instance_id=ID metrics=URL``)."""

    name: str  # prefill-0, decode-1, router-0, frontend, planner
    role: str  # prefill | decode | agg | router | frontend | planner
    pid: int
    instance_id: int | None
    metrics_url: str | None
    component: str
    log_path: Path


class LaunchedGraph:
    """What ``launch_graph`` yields: the running graph."""

    def __init__(self, launch: Launch) -> None:
        self._launch = launch
        assert launch.config is not None and launch.graph is not None and launch.log_dir is not None
        self.config: DynamoExtConfig = launch.config
        self.graph: Graph = launch.graph
        self.base_url: str = launch.base
        self.model: str = launch.config.model.name
        self.namespace: str = launch.config.discovery.namespace
        self.log_dir: Path = launch.log_dir
        self.ready_s: float = launch.ready_s
        self._roles = {c.name: c.role for c, _n in self.graph.plan(self.config)}

    @property
    def children(self) -> list[LaunchedChild]:
        """The graph's processes now (the planner may add or remove workers); etcd / NATS are not listed."""
        sup = self._launch.sup
        return [self._child(c) for c in (sup.children if sup is not None else [])]

    def _child(self, c: Child) -> LaunchedChild:
        info = c.ready_info
        iid = info.get("instance_id")
        try:
            instance_id = int(iid, 0) if iid else None
        except ValueError:
            instance_id = None
        role = info.get("role") or self._roles.get(c.spec.component) or c.spec.component
        return LaunchedChild(name=c.name, role=role, pid=c.pid, instance_id=instance_id,
                             metrics_url=info.get("metrics") or None, component=c.spec.component,
                             log_path=c.log_path)  # fmt: skip

    @property
    def infra(self) -> list[LaunchedChild]:
        """etcd and NATS when this launch started them (restarted by supervision like the graph's children)."""
        sup = self._launch.infra_sup
        return [LaunchedChild(name=c.name, role=c.name, pid=c.pid, instance_id=None, metrics_url=None,
                              component=c.spec.component, log_path=c.log_path)
                for c in (sup.children if sup is not None else [])]  # fmt: skip

    @property
    def events(self) -> list[tuple[float, str, str, str]]:
        """Supervision events so far: ``(time.time(), kind, child name, text)``, kind ``exited`` | ``restarted``
        | ``ready`` (ready again after a restart)."""
        return list(self._launch.events)

    def serving(self) -> bool:
        """Every child and etcd/NATS we started alive and ready, no restart pending (the supervisor's view; a
        SIGSTOPped process still counts: ask its /health for more)."""
        return self._launch.serving()

    def alive(self) -> list[LaunchedChild]:
        sup = self._launch.sup
        return [self._child(c) for c in (sup.children if sup is not None else []) if c.alive()]

    def metrics(self, role: str | None = None, timeout: float = 5.0) -> dict[str, str]:
        """``{child name: text of its /metrics}`` for every live child with a metrics URL (of ``role`` when
        given). A child that does not answer raises (a benchmark must not difference half a scrape)."""
        out: dict[str, str] = {}
        for c in self.children:
            if not c.metrics_url or not c.metrics_url.startswith("http") or (role is not None and c.role != role):
                continue
            with urllib.request.urlopen(c.metrics_url, timeout=timeout) as r:
                out[c.name] = r.read().decode(errors="replace")
        return out

    def scale(self, role: str, target: int, ready_timeout: float | None = None) -> None:
        """Run ``target`` worker processes of ``role`` (prefill | decode | agg), as the planner's executor does
        (:class:`~dynamo_ext.launch.scaling.LauncherScaler`): new ones are copies of the role's first process
        (a new ``--index`` and metrics port), their ready lines awaited; on the way down the newest are
        SIGTERMed (they drain) and never restarted. :class:`LaunchError` when the graph has no such role or a
        new worker fails to start."""
        comps = {c.role: c.name for c, _n in self.graph.plan(self.config) if c.role in ("prefill", "decode", "agg")}
        if role not in comps:
            have = ", ".join(comps) or "none"
            raise LaunchError(f"graph {self.graph.name!r} has no {role!r} workers (it has: {have})", 2)
        sup = self._launch.sup
        assert sup is not None
        timeout = self._launch.opts.ready_timeout if ready_timeout is None else ready_timeout
        try:
            LauncherScaler(sup, comps, ready_timeout=timeout, say=self._launch.say).scale(role, target)
        except SupervisorError as e:
            raise LaunchError(str(e), 1) from None

    def stop_child(self, name: str) -> str:
        """Stop one child on purpose, as a scale-down does: SIGTERM (a worker stops taking requests and drains:
        its streams finish, or move to another decode worker with ``workers.migrate_on_drain``), SIGKILL after
        the stop timeout; it is never restarted. Returns how it ended (``exit 0``, ...)."""
        sup = self._launch.sup
        victims = [c for c in (sup.children if sup is not None else []) if c.name == name and not c.stopping]
        if not victims:
            raise LaunchError(f"no running child named {name!r} (children: "
                              f"{', '.join(c.name for c in self.children)})", 2)
        return dict(sup.stop_group(victims))[name]  # type: ignore[union-attr]

    def check(self) -> None:
        """Raise :class:`LaunchError` when a child (or etcd / NATS this launch started) exited unexpectedly."""
        try:
            self._launch.check()
        except SupervisorError as e:
            raise LaunchError(str(e), 1) from None

    def stop(self) -> int:
        """Stop the graph now (also done on leaving the ``with``); returns serve's exit status (0: clean)."""
        return self._launch.stop(0)

    @property
    def stopped(self) -> bool:
        return self._launch.stopped is not None


def _config_file(config: str | Path | Mapping[str, Any] | DynamoExtConfig, where: Path) -> str:
    if isinstance(config, (str, Path)):
        return str(config)
    if isinstance(config, DynamoExtConfig):
        data = config.model_dump(mode="json", exclude_none=True)
    else:
        data = dict(config)
        try:
            parse_config(data, "<launch_graph config>")
        except ConfigError as e:
            raise LaunchError(f"{e.source}: invalid config:\n" + "\n".join(f"  {x}" for x in e.lines), 2) from None
    where.mkdir(parents=True, exist_ok=True)
    path = where / "dynamo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@contextmanager
def launch_graph(
    graph: str,
    config: str | Path | Mapping[str, Any] | DynamoExtConfig,
    *,
    port: int | None = None,
    model_dir: str | Path | None = None,
    log_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 300.0,
    stop_timeout: float = 10.0,
    tolerate_exits: bool = False,
    planner: bool | None = None,
    python: str = sys.executable,
    quiet: bool = True,
    err: TextIO | None = None,
) -> Iterator[LaunchedGraph]:
    """Start ``graph`` with ``config`` as ``dynamo-ext serve`` does, yield a :class:`LaunchedGraph`, stop it
    all on exit (see the module docstring)."""
    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="dynamo-ext-launch-"))
    opts = ServeOptions(graph=str(graph), config=_config_file(config, logs), port=port or free_port(),
                        model_dir=None if model_dir is None else str(model_dir), log_dir=str(logs),
                        ready_timeout=ready_timeout, stop_timeout=stop_timeout, tolerate_exits=tolerate_exits,
                        python=python, planner=planner, env=dict(env or {}), quiet_progress=quiet)  # fmt: skip
    stream = err or sys.stderr
    launch = Launch(opts, out=stream, err=stream)
    launch.prepare()  # nothing started yet: errors need no cleanup
    body_ok = False
    try:
        launch.start()
        yield LaunchedGraph(launch)
        body_ok = True
    finally:
        code = launch.stop(0)
    if body_ok and code:
        raise LaunchError(f"the graph did not stop cleanly (exit {code}: processes or etcd records left; "
                          f"logs in {logs})", code)  # fmt: skip
