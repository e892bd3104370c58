"""The wheel is named dynamo-ext, ships the console script and the planner/ and graphs/ packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (whl,) = tmp_path.glob("dynamo_ext-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for pkg in ("planner/__init__.py", "graphs/__init__.py", "dynamo_ext/cli/__init__.py", "dynamo_ext/config.py"):
        assert pkg in names, pkg
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(whl).read(meta).decode()
    assert "Name: dynamo-ext" in text and "Requires-Python: >=3.11" in text and "Apache-2.0" in text
    eps = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "dynamo-ext = dynamo_ext.cli:main" in eps
    assert not any(n.startswith("tests/") for n in names)
