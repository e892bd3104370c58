"""``dynamo-ext bench NAME [ARGS...]``: run a benchmark of ``dynamo_ext.bench``.

    dynamo-ext bench transfer [--size 1GiB] [--layout llama3-70b] [--out FILE] [--paths ...] [--reps N]
    dynamo-ext bench engine   [--device cuda] [--preset llama3-70b-shape] [--layers 4] ...
    dynamo-ext bench routing  [...]          (decision latency at 16 / 256 / 1,024 workers)
    dynamo-ext bench serve    [--graphs agg,disagg] [--rates ...]  (graphs through Dynamo's HTTP frontend)
    dynamo-ext bench serve-direct [--device cuda] [--graphs agg:4,disagg:2p2d] [--prompt-lens 512,2048,4096]
    dynamo-ext bench route    [--workloads shared-prefix,mixed] [--policies ...]  (routing policies end to end)
    dynamo-ext bench faults   [--faults sigkill-prefill,...] [--concurrency 8]  (supervision and recovery under load)
    dynamo-ext bench aiperf   [--graphs agg,disagg | --graph G -f CONFIG | --url URL] [--concurrency 1,4,8]  (aiperf + ours)

Each benchmark is a module ``dynamo_ext.bench.<module>`` with ``main(argv)``; ARGS are passed to it
(``--help`` there). It works from an installed wheel as from a source checkout. Results go to
``dynamo_ext.bench.results_dir()``: ``$DYNAMO_EXT_RESULTS``, else the checkout's ``benchmarks/results/``,
else ``./benchmarks/results/`` (``transfer``: only to ``--out FILE``; without it a new temporary directory).
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "transfer": ("transfer", "KV transfer between two processes: naive / planned / staged / raw / copy"),
    "engine": ("engine", "reference engine: prefill tok/s, decode step vs dense SDPA (or transformers)"),
    "routing": ("routing_latency", "routing decision latency p50/p99 at 16, 256, 1024 workers"),
    "serve": ("serve", "agg vs disagg graphs through the HTTP frontend: TTFT/TPOT p50/p99, throughput, KV share"),
    "serve-direct": ("serve_direct", "agg vs disagg on several GPUs without the Dynamo runtime (engine, kv, transport)"),
    "route": ("route", "round-robin vs Dynamo KV router vs dynamo-ext: TTFT, throughput, prefix hits, KV bytes"),
    "faults": ("faults", "fault campaign of the disagg graph under streaming load: failed requests, recovery time"),
    "aiperf": ("aiperf", "aiperf (own venv) and bench serve's client against the frontend: TTFT/TPOT/throughput vs concurrency"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (" + ", ".join(sorted(BENCHMARKS)) + ")")
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help=", ".join(sorted(BENCHMARKS)))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module_name, _ = BENCHMARKS[args.name]
    module = importlib.import_module(f"dynamo_ext.bench.{module_name}")
    return int(module.main(list(args.args)) or 0)
