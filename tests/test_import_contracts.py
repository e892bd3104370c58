"""The layer rules of DESIGN.md hold (import-linter), and the checker really catches a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_kept():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" in r.stdout and "0 broken" in r.stdout


def _copy_tree(tmp_path: Path) -> Path:
    for name in ("dynamo_ext", "planner", "graphs"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_routing_importing_torch_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "dynamo_ext/routing/bad_policy.py").write_text("import torch\n")
    r = _lint(tree)
    assert r.returncode != 0
    assert "routing is pure" in r.stdout and "BROKEN" in r.stdout


def test_planner_importing_transport_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "planner/bad_plugin.py").write_text("from dynamo_ext.transport import layout\n")
    r = _lint(tree)
    assert r.returncode != 0 and "planner never touches KV bytes" in r.stdout


def test_upward_import_is_caught(tmp_path):
    tree = _copy_tree(tmp_path)
    (tree / "dynamo_ext/transport/bad_up.py").write_text("import dynamo_ext.workers\n")
    r = _lint(tree)
    assert r.returncode != 0 and "layers import downward only" in r.stdout


def test_transport_import_cycle_is_caught(tmp_path):
    """A lazy import inside a function closes a cycle too (backend -> staged -> backend), and so does one
    between two fallbacks."""
    tree = _copy_tree(tmp_path)
    backend = tree / "dynamo_ext/transport/backend.py"
    backend.write_text(backend.read_text() + "\n\ndef _late():\n    from .staged import serve_staged_requests  # noqa: PLC0415\n")
    r = _lint(tree)
    assert r.returncode != 0 and "transport modules import each other without cycles" in r.stdout
    assert "No cycles are allowed in dynamo_ext.transport." in r.stdout
    assert ".backend -> .staged" in r.stdout or ".staged -> .backend" in r.stdout  # the import it would remove

    tree2 = _copy_tree(tmp_path / "fallbacks")
    (tree2 / "dynamo_ext/transport/fallbacks/bad_a.py").write_text("from . import bad_b\n")
    (tree2 / "dynamo_ext/transport/fallbacks/bad_b.py").write_text("def f():\n    from .bad_a import x  # noqa: PLC0415\n")
    r = _lint(tree2)
    assert r.returncode != 0 and "No cycles are allowed in dynamo_ext.transport.fallbacks." in r.stdout
