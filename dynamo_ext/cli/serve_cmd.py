"""``dynamo-ext serve GRAPH -f CONFIG [--port P] [--model-dir DIR] [--log-dir DIR] [--once PROMPT]``.

Starts a graph (``graphs/disagg.py`` or ``graphs.disagg``) as local processes: etcd and NATS when none
answers at the configured addresses, the workers, the router replicas and Dynamo's frontend; waits
until all are ready and the model is listed, prints the URL and a curl line, and serves until Ctrl-C
or SIGTERM (then stops everything in reverse order). ``--once PROMPT`` sends one completion request
instead, prints the answer and stops. ``--print-commands`` prints the same processes as plain shell lines
(``env VAR=... python -m ...``) and exits (``dynamo_ext/launch/commands.py``). The protocol is in
``dynamo_ext/launch/__init__.py``; exit
status: 0 stopped on request / ``--once`` answered, 1 a process failed, 2 bad config/graph/port.

With ``planner.enabled: true`` (or ``--planner``) it also runs Dynamo's planner (environment virtual,
our plugins) as a supervised child and applies its decisions to the prefill/decode processes
(``dynamo_ext/launch/scaling.py``). Planner dependencies missing: a warning and fixed worker counts,
or exit 2 under ``--planner``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a graph (workers, router, frontend; etcd/NATS if absent) locally")
    p.add_argument("graph", metavar="GRAPH", help="graph file (graphs/disagg.py) or module (graphs.disagg)")
    p.add_argument("-f", "--config", required=True, metavar="CONFIG", help="dynamo.yaml")
    p.add_argument("--port", type=int, default=None, help="frontend HTTP port (default: frontend.http_port)")
    p.add_argument("--model-dir", default=None, metavar="DIR",
                   help="model directory (default: model.path, else generated and cached by preset+seed)")
    p.add_argument("--log-dir", default=None, metavar="DIR", help="one <process>.log per child (default: a temp dir)")
    p.add_argument("--once", default=None, metavar="PROMPT",
                   help="after start-up send one completion request, print the answer and stop")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the --once request (default 32)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness (default 300)")
    p.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL per component (default 10; workers get "
                        "DYNAMO_EXT_DRAIN_S = this - 3 to drain in-flight requests)")
    p.add_argument("--tolerate-exits", action="store_true",
                   help="deprecated: a child that exits is restarted (dynamo.yaml supervision, on by default); "
                        "with supervision.restart: false, keep serving when a worker exits while others of its "
                        "component still run")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--planner", dest="planner", action="store_true", default=None,
                   help="run Dynamo's planner + our executor even if planner.enabled is false; exit 2 when its "
                        "dependencies are missing (with planner.enabled alone serve warns and runs without it)")
    g.add_argument("--no-planner", dest="planner", action="store_false", help="ignore planner.enabled")
    p.add_argument("--print-commands", action="store_true",
                   help="print the plain command and environment of every component (etcd/NATS, workers, routers, "
                        "frontend) as shell lines runnable by hand in that order, and exit (starts nothing)")
    p.add_argument("--planner-config", default=None, metavar="FILE",
                   help="Dynamo planner config to run instead of the one generated from dynamo.yaml's planner "
                        "section (that one is written to <log-dir>/planner.yaml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_commands:
        import sys

        from dynamo_ext.launch.commands import print_commands

        ignored = [flag for flag, value in (("--once", args.once), ("--log-dir", args.log_dir),
                                            ("--planner/--no-planner", args.planner),
                                            ("--planner-config", args.planner_config),
                                            ("--tolerate-exits", args.tolerate_exits or None)) if value is not None]
        if ignored:
            print(f"dynamo-ext serve: --print-commands starts nothing, so {', '.join(ignored)} cannot apply; drop "
                  f"{'it' if len(ignored) == 1 else 'them'}", file=sys.stderr)
            return 2

        return print_commands(args.graph, args.config, port=args.port, model_dir=args.model_dir,
                              stop_timeout=args.stop_timeout)
    from dynamo_ext.launch.serve import ServeOptions, serve

    return serve(ServeOptions(
        graph=args.graph, config=args.config, port=args.port, model_dir=args.model_dir, log_dir=args.log_dir,
        once=args.once, max_tokens=args.max_tokens, ready_timeout=args.ready_timeout,
        stop_timeout=args.stop_timeout, tolerate_exits=args.tolerate_exits, planner=args.planner,
        planner_config=args.planner_config,
    ))  # fmt: skip
