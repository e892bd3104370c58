"""A small typed graph API in the spirit of ``dynamo serve`` graphs.

Protocol
--------
* A :class:`Component` names one kind of process: its ``role`` (``frontend``, ``router``, ``prefill``,
  ``decode``, ``agg``), the dotted config key its process count comes from (``workers.prefill.count``,
  ``router.replicas``; ``None`` = exactly one), the components it calls (``depends_on``), the
  components it pulls KV blocks from (``kv_from``), and the router policies it runs under
  (``policies``; empty = all). The router component only runs under ``dynamo-ext`` and
  ``round-robin``; under ``dynamo-kv`` the frontend routes to the workers itself.
* A :class:`Graph` is a name plus components. Construction checks the structure (unique names, known
  link targets, no cycle) and raises ``ValueError``. ``validate(config)`` checks a loaded
  :class:`~dynamo_ext.config.DynamoExtConfig` against it and raises :class:`GraphError` whose
  ``lines`` are ``<config.key>: <problem>``; ``errors(config)`` returns the lines without raising.
* ``plan(config)`` gives the active components with their counts in start order (dependencies first);
  ``links(config)`` the resolved call edges (an inactive component is bypassed: under ``dynamo-kv`` the
  edge is frontend -> workers).
* ``load_graph("graphs/disagg.py" | "graphs.disagg")`` imports a graph file or module and returns its
  module-level ``graph``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dynamo_ext.config import DynamoExtConfig

Role = Literal["frontend", "router", "prefill", "decode", "agg"]
WORKER_ROLES: tuple[Role, ...] = ("prefill", "decode", "agg")


class GraphError(Exception):
    """A config does not fit a graph; ``lines`` has one ``<config.key>: <problem>`` per problem."""

    def __init__(self, graph: str, lines: list[str]) -> None:
        self.graph = graph
        self.lines = lines
        super().__init__(f"graph {graph!r}: " + "; ".join(lines))


@dataclass(frozen=True)
class Component:
    name: str
    role: Role
    count_key: str | None = None  # dotted config key of the process count; None: exactly one
    depends_on: tuple[str, ...] = ()  # components this one calls
    kv_from: tuple[str, ...] = ()  # components this one pulls KV blocks from
    policies: tuple[str, ...] = ()  # router.policy values under which it runs; () = all

    def active(self, config: DynamoExtConfig) -> bool:
        return not self.policies or config.router.policy in self.policies

    def count(self, config: DynamoExtConfig) -> int:
        if not self.active(config):
            return 0
        if self.count_key is None:
            return 1
        value = _lookup(config, self.count_key)
        return int(value) if value is not None else 0


def _lookup(config: Any, dotted: str) -> Any:
    obj = config
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Graph:
    name: str
    components: tuple[Component, ...]
    description: str = ""
    _by_name: dict[str, Component] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Component] = {}
        for c in self.components:
            if c.name in by_name:
                raise ValueError(f"graph {self.name!r}: duplicate component {c.name!r}")
            by_name[c.name] = c
        for c in self.components:
            for target in (*c.depends_on, *c.kv_from):
                if target not in by_name:
                    raise ValueError(f"graph {self.name!r}: component {c.name!r} links to unknown {target!r}")
        object.__setattr__(self, "_by_name", by_name)
        self._order()  # raises on a cycle

    def component(self, name: str) -> Component:
        return self._by_name[name]

    def _order(self) -> list[Component]:
        """Dependencies first (callees and KV sources before their users), stable by definition order."""
        done: list[Component] = []
        state: dict[str, int] = {}

        def visit(c: Component, path: tuple[str, ...]) -> None:
            if state.get(c.name) == 2:
                return
            if state.get(c.name) == 1:
                raise ValueError(f"graph {self.name!r}: cycle {' -> '.join((*path, c.name))}")
            state[c.name] = 1
            for dep in (*c.kv_from, *c.depends_on):
                visit(self._by_name[dep], (*path, c.name))
            state[c.name] = 2
            done.append(c)

        # visit sources (KV producers) first so prefill precedes decode even when both are leaves
        for c in sorted(self.components, key=lambda c: 0 if not c.kv_from else 1):
            visit(c, ())
        return done

    # -- checks against a config ------------------------------------------------------------

    def errors(self, config: DynamoExtConfig) -> list[str]:
        lines: list[str] = []
        used = {c.role for c in self.components}
        for c in self.components:
            if c.role not in WORKER_ROLES:
                continue
            section = getattr(config.workers, c.role)
            if section is None:
                lines.append(f"workers.{c.role}: required by graph {self.name!r} (component {c.name!r})")
            elif c.active(config) and c.count(config) < 1:
                lines.append(f"{c.count_key}: is 0; graph {self.name!r} needs at least 1 {c.role} worker")
        for role in WORKER_ROLES:
            if role not in used and getattr(config.workers, role) is not None:
                hint = "graphs/agg.py" if role == "agg" else "graphs/disagg.py"
                lines.append(f"workers.{role}: not used by graph {self.name!r} (use {hint}, or remove the section)")
        for c in self.components:
            if c.role == "router" and c.active(config) and c.count(config) < 1:
                lines.append(f"{c.count_key}: graph {self.name!r} needs at least 1 router replica")
        return lines

    def validate(self, config: DynamoExtConfig) -> None:
        lines = self.errors(config)
        if lines:
            raise GraphError(self.name, lines)

    # -- what runs --------------------------------------------------------------------------

    def plan(self, config: DynamoExtConfig) -> list[tuple[Component, int]]:
        """Active components and their process counts, dependencies first."""
        return [(c, n) for c in self._order() if (n := c.count(config)) > 0]

    def links(self, config: DynamoExtConfig) -> list[tuple[str, str, str]]:
        """Resolved edges ``(from, to, kind)`` with kind ``calls`` or ``kv``; inactive components bypassed."""

        def resolve(name: str) -> list[str]:
            c = self._by_name[name]
            if c.count(config) > 0:
                return [name]
            return [t for d in c.depends_on for t in resolve(d)]

        edges: list[tuple[str, str, str]] = []
        for c in self._order():
            if c.count(config) == 0:
                continue
            for d in c.depends_on:
                edges += [(c.name, t, "calls") for t in resolve(d) if (c.name, t, "calls") not in edges]
            edges += [(c.name, s, "kv") for s in c.kv_from if self._by_name[s].count(config) > 0]
        return edges

    def describe(self, config: DynamoExtConfig) -> str:
        parts = [f"{c.name} x{n}" for c, n in self.plan(config)]
        edges = [f"{a} -> {b}" if k == "calls" else f"{a} <= {b} (KV)" for a, b, k in self.links(config)]
        return f"graph {self.name}: " + ", ".join(parts) + ("; " + ", ".join(edges) if edges else "")


def load_graph(spec: str) -> Graph:
    """``graphs/disagg.py`` (a file path) or ``graphs.disagg`` (a module name) -> its ``graph``."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"graph file {spec!r} not found")
        mod_name = f"_dynamo_ext_graph_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load graph file {spec!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    graph = getattr(module, "graph", None)
    if not isinstance(graph, Graph):
        raise ImportError(f"{spec!r} defines no module-level `graph` (a dynamo_ext.launch.graph.Graph)")
    return graph
