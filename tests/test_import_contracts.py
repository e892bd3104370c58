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
