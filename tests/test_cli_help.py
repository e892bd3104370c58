"""The command line documents itself (issue 16.7): every verb's and every benchmark's options have a help text
(walked from the real parsers: ``dynamo-ext``'s sub-commands and each ``dynamo-ext bench NAME`` module's own
parser), defaults are shown, ``bench NAME --help`` is titled ``usage: dynamo-ext bench NAME``, ``--version``
names dynamo-ext and Dynamo, and ``config check`` says in one line that a file is not a dynamo.yaml."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from importlib import metadata
from pathlib import Path

import pytest

from dynamo_ext import __version__
from dynamo_ext.cli import build_parser, main
from dynamo_ext.cli.bench_cmd import BENCHMARKS

REPO = Path(__file__).resolve().parents[1]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _bench_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a benchmark's main() builds, caught when it parses (nothing runs)."""

    def catch(self, *a, **k):
        raise _Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch)
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Captured) as got:
            importlib.import_module(f"dynamo_ext.bench.{module}").main([])
    return got.value.parser


def _undocumented(parser: argparse.ArgumentParser, path: str, out: list[str]) -> int:
    n = 0
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                n += _undocumented(sp, f"{path} {name}", out)
        elif isinstance(a, (argparse._HelpAction, argparse._VersionAction)) or a.help == argparse.SUPPRESS:
            continue
        else:
            n += 1
            if not (a.help or "").strip():
                out.append(f"{path} {'/'.join(a.option_strings) or a.dest}")
    return n


def test_every_option_of_every_verb_and_benchmark_has_help(monkeypatch):
    missing: list[str] = []
    n = _undocumented(build_parser(), "dynamo-ext", missing)
    for name, (module, _) in BENCHMARKS.items():
        p = _bench_parser(module, monkeypatch)
        assert p.prog == f"dynamo-ext bench {name}", p.prog
        n += _undocumented(p, p.prog, missing)
    assert n > 150  # the walk saw the options (verbs, sub-verbs, every benchmark)
    assert not missing, "options without help:\n" + "\n".join(missing)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def test_bench_help_is_titled_with_the_full_command_and_shows_defaults():
    rc, out, _ = _run(["bench", "route", "--help"])
    assert rc == 0 and out.startswith("usage: dynamo-ext bench route "), out[:200]
    assert "(default: 40)" in out  # --requests
    rc, out, _ = _run(["generate", "--help"])
    assert rc == 0 and "KV block size in tokens (default: 16)" in " ".join(out.split())


def test_version():
    rc, out, _ = _run(["--version"])
    assert rc == 0
    assert out.strip() == f"dynamo-ext {__version__} (Dynamo {metadata.version('ai-dynamo')}, Python " \
                          f"{sys.version.split()[0]})"


def test_config_check_says_in_one_line_that_a_file_is_not_a_dynamo_yaml(tmp_path):
    rc, out, err = _run(["config", "check", str(REPO / "configs/planner.yaml")])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "configs/planner.yaml: not a dynamo.yaml" in lines[0] and "Dynamo planner config" in lines[0]
    other = tmp_path / "other.yaml"
    other.write_text("foo: 1\nbar: [2]\n")
    rc, _, err = _run(["config", "show", str(other)])
    assert rc == 2 and err.count("\n") == 1 and "none of its top-level keys (foo, bar)" in err
    assert "planner config" not in err
    # a dynamo.yaml with a mistake is still reported key by key
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: {agg: {}}\nrouter: {policy: fastest}\n")
    rc, _, err = _run(["config", "check", str(bad)])
    assert rc == 2 and "router.policy" in err and "not a dynamo.yaml" not in err
    rc, out, _ = _run(["config", "check", str(REPO / "configs/disagg.yaml")])
    assert rc == 0 and "OK" in out
