"""``python -m dynamo_ext.workers --role {agg,prefill,decode,router} --config FILE --model-dir DIR
[--index N] [--metrics-port P] [--system-port S]`` — one worker process (the launcher's interface, see
README.md).

Prints exactly one ``DYNAMO_EXT_READY role=<role> instance_id=<id> metrics=<url> [system=<url>]`` line on
stdout once serving (a JSON line with those fields when ``DYN_LOGGING_JSONL`` is set); logs go to stderr.
SIGTERM/SIGINT: graceful stop, lease revoked, exit 0. Exit 2: bad arguments or configuration; exit 1:
start-up failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from dynamo_ext.config import ConfigError, load_config
from dynamo_ext.helpfmt import HelpFormatter

from .observability import SYSTEM_PORT_RANGE, pick_system_port
from .runtime import WorkerArgs, apply_env_defaults, setup_logging

ROLES = ("agg", "prefill", "decode", "router")


def parse_args(argv: list[str] | None = None) -> WorkerArgs:
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.workers", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--role", required=True, choices=ROLES, help="what this process is")
    p.add_argument("--config", required=True, help="dynamo.yaml")
    p.add_argument("--model-dir", required=True, help="model directory (dynamo-ext model init)")
    p.add_argument("--index", type=int, default=0, help="replica index (logs only)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="our /metrics, /health, /live (and /routes) on 127.0.0.1 (0 = a free port)")
    p.add_argument("--system-port", type=int, default=None,
                   help="Dynamo's system status server (/metrics with our series, /health, /live) on DYN_SYSTEM_HOST: "
                        f"a port below 32768, 0 = pick a free one in {SYSTEM_PORT_RANGE[0]}..{SYSTEM_PORT_RANGE[1]}, "
                        "-1 = off; default: DYN_SYSTEM_PORT when set, else 0")
    p.add_argument("--device", default=None,
                   help="cpu or cuda:N (this process's CUDA index); default: model.device (cuda -> cuda:0)")
    p.add_argument("--drain-s", type=float, default=None,
                   help="seconds a stopping worker waits for in-flight requests (default: workers.drain_s)")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        for line in e.lines:
            print(f"{e.source}: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    if not os.path.isdir(a.model_dir):
        print(f"--model-dir {a.model_dir}: not a directory", file=sys.stderr)
        raise SystemExit(2)
    if a.device is not None and not (a.device == "cpu" or a.device == "cuda" or
                                     (a.device.startswith("cuda:") and a.device[5:].isdigit())):
        print(f"--device {a.device!r}: allowed: cpu, cuda, cuda:N", file=sys.stderr)
        raise SystemExit(2)
    if a.device is not None and a.device.startswith("cuda") and cfg.model.device != "cuda":
        print(f"--device {a.device}: model.device is {cfg.model.device!r} in {a.config} (set model.device: cuda)",
              file=sys.stderr)
        raise SystemExit(2)
    env_port = os.environ.get("DYN_SYSTEM_PORT")
    if a.system_port is None and env_port not in (None, ""):
        try:
            a.system_port = int(env_port)
        except ValueError:
            a.system_port = 1 << 16
        if not -1 <= a.system_port <= 32767:
            print(f"DYN_SYSTEM_PORT={env_port}: allowed: -1 (off), 0..32767 (Dynamo 1.6.1 reads it as a 16-bit "
                  "signed integer)", file=sys.stderr)
            raise SystemExit(2)
    elif a.system_port is not None and not -1 <= a.system_port <= 32767:
        print(f"--system-port {a.system_port}: allowed: -1 (off), 0 (pick a free port), 1..32767 (Dynamo 1.6.1 reads "
              "DYN_SYSTEM_PORT as a 16-bit signed integer)", file=sys.stderr)
        raise SystemExit(2)
    return WorkerArgs(a.role, cfg, os.path.abspath(a.model_dir), a.index, a.metrics_port, a.device, a.drain_s,
                      a.system_port)


def set_system_port(args: WorkerArgs) -> None:
    """DYN_SYSTEM_PORT for the runtime, before it exists (0 and unset: a free port picked here)."""
    port = 0 if args.system_port is None else args.system_port
    if port == 0:
        port = pick_system_port(os.environ.get("DYN_SYSTEM_HOST") or "127.0.0.1")
    os.environ["DYN_SYSTEM_PORT"] = str(port)


def build(args: WorkerArgs):  # type: ignore[no-untyped-def]
    if args.role in ("agg", "decode"):
        from .decode import DecodeWorker  # noqa: PLC0415

        return DecodeWorker(args)
    if args.role == "prefill":
        from .prefill import PrefillWorker  # noqa: PLC0415

        return PrefillWorker(args)
    from .router import RouterWorker  # noqa: PLC0415

    return RouterWorker(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.role, args.index)
    apply_env_defaults(args.config)
    set_system_port(args)
    try:
        rc = asyncio.run(build(args).main())
    except Exception:
        logging.getLogger("dynamo_ext.workers").exception("worker failed")
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # the Dynamo runtime's threads must not keep a stopped worker alive


if __name__ == "__main__":
    main()
