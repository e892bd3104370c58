"""Benchmarks run by ``dynamo-ext bench NAME`` (each module has ``main(argv) -> int``; ``--help`` there):
``transfer`` (KV transfer between two processes: naive / planned / staged / raw / copy), ``engine``
(reference engine vs dense SDPA), ``routing_latency`` (``bench routing``: decision latency at 16-1,024
workers), ``serve`` (agg vs disagg graphs through Dynamo's HTTP frontend, started with
``dynamo_ext.launch.launch_graph``), ``route`` (round-robin vs Dynamo KV router vs dynamo-ext end to end),
``faults`` (the fault campaign: SIGKILL / SIGTERM / SIGSTOP of workers, etcd and NATS restarts under a streaming
load; ``benchmarks/results/reliability.md``), ``serve_direct`` (``bench serve-direct``: agg vs disagg on several GPUs without the Dynamo runtime) with its
worker process ``direct_worker``, ``aiperf`` (NVIDIA's aiperf, in its own venv created on first use, and
``serve``'s client at the same load on the same graph), and the shared helpers ``_machine`` (machine facts), ``_stats``
(percentiles) and ``_kv`` (KV pull statistics from the workers' ``/metrics``). Results go to
:func:`results_dir`. This is a top layer like ``cli``: it may import every layer below (workers, launch,
routing, engine, kv, transport, ...); nothing below imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["results_dir"]


def results_dir() -> Path:
    """Where benchmark results go by default (not created here; the writer creates it).

    ``$DYNAMO_EXT_RESULTS`` when set; else ``<repository root>/benchmarks/results`` when this package runs
    from a source checkout (a parent of the package directory has ``benchmarks/results``); else
    ``./benchmarks/results`` under the current directory (an installed wheel).
    """
    env = os.environ.get("DYNAMO_EXT_RESULTS")
    if env:
        return Path(env).expanduser()
    for parent in Path(__file__).resolve().parents[1:]:
        cand = parent / "benchmarks" / "results"
        if cand.is_dir():
            return cand
    return Path.cwd() / "benchmarks" / "results"
