"""``dynamo-ext config check FILE...`` and ``dynamo-ext config show FILE``.

check: exit 0 when every file is valid, 2 when any is invalid (one line per error: the key path,
what is wrong and the allowed values or range; unknown keys get a 'did you mean'). Never a traceback.
A YAML mapping none of whose top-level keys is a dynamo.yaml key (e.g. ``configs/planner.yaml``, a Dynamo
planner config) is reported in one line as not a dynamo.yaml, naming what it looks like, not key by key.
check --no-host-checks: fields and values only (TLS files and password/token environment variables belong to the
host that will run the config).
check --connect: also connect to the configured etcd and NATS with the configured TLS and credentials
(``discovery.probe.check_discovery``): one line per refusal, naming the setting to fix; exit 2 if any.
show: print the file with every default filled in (YAML).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from dynamo_ext.config import ConfigError, DynamoExtConfig, load_config, without_host_checks

#: top-level keys of Dynamo's planner config (``python -m dynamo.planner --config FILE``)
PLANNER_KEYS = {"environment", "backend", "mode", "optimization_target", "plugin_registration", "model_name",
                "enable_load_scaling", "enable_throughput_scaling"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate or show dynamo.yaml files")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = csub.add_parser("check", help="validate files; exit 0 if all valid, 2 otherwise")
    c.add_argument("files", nargs="+", metavar="FILE", help="dynamo.yaml files (e.g. configs/*.yaml)")
    c.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    c.add_argument("--connect", action="store_true",
                   help="also connect to discovery.etcd / discovery.nats with the configured TLS and credentials")
    c.add_argument("--no-host-checks", action="store_true",
                   help="fields and values only: do not check that TLS files exist and parse or that the environment "
                        "variables named by password_env / token_env are set (a config for another host)")
    c.set_defaults(func=run_check)
    s = csub.add_parser("show", help="print a file with all defaults filled in")
    s.add_argument("file", metavar="FILE", help="a dynamo.yaml file")
    s.set_defaults(func=run_show)


def not_dynamo_yaml(path: str) -> str | None:
    """One line when ``path`` is a YAML mapping none of whose top-level keys is a dynamo.yaml key (another
    tool's config), else None (valid or not, it is meant as a dynamo.yaml: load_config reports key by key)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not data:
        return None
    keys = [str(k) for k in data]
    ours = list(DynamoExtConfig.model_fields)
    if any(k in ours for k in keys):
        return None
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    what = (" (it looks like a Dynamo planner config: python -m dynamo.planner --config FILE)"
            if len(PLANNER_KEYS & set(keys)) >= 2 else "")
    return f"not a dynamo.yaml: none of its top-level keys ({shown}) is one of {', '.join(ours)}{what}"


def run_check(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        other = not_dynamo_yaml(f)
        if other is not None:
            bad += 1
            print(f"{f}: {other}", file=sys.stderr)
            continue
        try:
            if getattr(args, "no_host_checks", False):
                if getattr(args, "connect", False):
                    print("config check: --connect needs the host checks (drop --no-host-checks)", file=sys.stderr)
                    return 2
                with without_host_checks():
                    cfg = load_config(f)
            else:
                cfg = load_config(f)
        except ConfigError as e:
            bad += 1
            for line in e.lines:
                print(f"{f}: {line}", file=sys.stderr)
            continue
        if getattr(args, "connect", False):
            from dynamo_ext.discovery.probe import check_discovery  # noqa: PLC0415 - network clients only here

            problems = check_discovery(cfg)
            if problems:
                bad += 1
                for line in problems:
                    print(f"{f}: {line}", file=sys.stderr)
                continue
        if not args.quiet:
            w = cfg.workers
            roles = ", ".join(f"{r} x{getattr(w, r).count}" for r in ("prefill", "decode", "agg") if getattr(w, r))
            mode = "disaggregated" if cfg.disaggregated else "aggregated"
            reached = "; etcd and NATS accept us" if getattr(args, "connect", False) else ""
            print(f"{f}: OK ({mode}: {roles}; router {cfg.router.policy}; kv_transfer {cfg.kv_transfer.backend}/{cfg.kv_transfer.transport}{reached})")
    return 2 if bad else 0


def run_show(args: argparse.Namespace) -> int:
    other = not_dynamo_yaml(args.file)
    if other is not None:
        print(f"{args.file}: {other}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        for line in e.lines:
            print(f"{args.file}: {line}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


run = run_check
