"""``dynamo-ext`` command line: one sub-command module per verb, imported lazily.

    dynamo-ext config check FILE...      validate dynamo.yaml files (exit 0 valid, 2 invalid)
    dynamo-ext topology [--json] [--probe]
    dynamo-ext bench transfer|engine|routing [...]
    dynamo-ext model init|show, dynamo-ext generate   (reference engine)
    dynamo-ext serve GRAPH -f CONFIG [--once PROMPT | --print-commands]   (local graph: etcd, NATS, frontend,
                                                       router, workers; or their commands, printed)
    dynamo-ext deploy render GRAPH -f CONFIG --image IMAGE [-o DIR]   (Kubernetes: DynamoGraphDeployment)

Each module in this package exposes ``add_parser(subparsers)`` (registers its verb and sets
``func``) and ``run(args) -> int``. Only this package and ``workers/`` wire layers together.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

from dynamo_ext import __version__
from dynamo_ext.helpfmt import HelpFormatter

# verb -> module under dynamo_ext.cli; a module that fails to import (a layer not installed on
# this machine) is reported when its verb is used, not when another verb runs.
COMMANDS = {
    "config": "config_cmd",
    "topology": "topology_cmd",
    "bench": "bench_cmd",
    "model": "model_cmd",
    "generate": "generate_cmd",
    "serve": "serve_cmd",
    "deploy": "deploy_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-ext", description="Disaggregated-serving extensions for NVIDIA Dynamo",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print dynamo-ext's version and the Dynamo it runs on, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for verb, mod in COMMANDS.items():
        try:
            module = importlib.import_module(f"dynamo_ext.cli.{mod}")
        except ImportError as e:  # a verb whose layer is missing still shows up, with the reason
            p = sub.add_parser(verb, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e, verb=verb: _unavailable(verb, e))
            continue
        module.add_parser(sub)
    _format_all(parser)
    return parser


def version_text() -> str:
    """``dynamo-ext X (Dynamo Y, Python Z)``; Dynamo's version from its package metadata (not imported)."""
    try:
        dyn = metadata.version("ai-dynamo")
    except metadata.PackageNotFoundError:
        dyn = "not installed"
    return f"dynamo-ext {__version__} (Dynamo {dyn}, Python {sys.version.split()[0]})"


def _format_all(parser: argparse.ArgumentParser) -> None:
    """Every verb's parser (and theirs) shows each option's default (helpfmt.HelpFormatter)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _format_all(sp)


def _unavailable(verb: str, err: Exception) -> int:
    print(f"dynamo-ext {verb}: unavailable on this installation: {err}", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dynamo-ext topology | head`: the reader went away, not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
