"""``dynamo-ext bench NAME [ARGS...]``: run a benchmark from the repository's ``benchmarks/`` folder.

    dynamo-ext bench transfer [--size 1GiB] [--layout llama3-70b] [--json FILE] [--paths ...] [--reps N]
    dynamo-ext bench engine   [--device cuda] [--preset llama3-70b-shape] [--layers 4] ...
    dynamo-ext bench routing  [...]          (decision latency at 16 / 256 / 1,024 workers)
    dynamo-ext bench serve-direct [--device cuda] [--graphs agg:4,disagg:2p2d] [--prompt-lens 512,2048,4096]
    dynamo-ext bench route    [--workloads shared-prefix,mixed] [--policies ...]  (routing policies end to end)

The benchmarks live in ``benchmarks/<module>.py`` (results go to ``benchmarks/results/``), next to the
package in a source checkout; ARGS are passed to the benchmark's own ``main(argv)`` (``--help`` there).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = {
    "transfer": ("transfer", "KV transfer between two processes: naive / planned / staged / raw / copy"),
    "engine": ("engine", "reference engine: prefill tokens/s and decode step vs dense SDPA"),
    "routing": ("routing_latency", "routing decision latency p50/p99 at 16, 256, 1024 workers"),
    "serve": ("serve", "agg vs disagg graphs through the HTTP frontend: TTFT/TPOT p50/p99, throughput, KV share"),
    "serve-direct": ("serve_direct", "agg vs disagg on several GPUs without the Dynamo runtime (engine, kv, transport)"),
    "route": ("route", "round-robin vs Dynamo KV router vs dynamo-ext: TTFT, throughput, prefix hits, KV bytes"),
}


def benchmarks_dir() -> Path | None:
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "benchmarks"
        if (cand / "transfer.py").is_file():
            return cand
    return None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (transfer, engine, routing)")
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME", help=", ".join(sorted(BENCHMARKS)))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = benchmarks_dir()
    if root is None:
        print("dynamo-ext bench: benchmarks/ not found; run from a source checkout of dynamo_ext", file=sys.stderr)
        return 3
    module_name, _ = BENCHMARKS[args.name]
    path = root / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"dynamo_ext_bench_{module_name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)
