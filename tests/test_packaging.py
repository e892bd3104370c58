"""The wheel is named dynamo-ext, ships the console script and the planner/ and graphs/ packages."""

from __future__ import annotations

import os
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


def test_bench_runs_from_an_installed_wheel(tmp_path):
    """`dynamo-ext bench transfer --help` from the wheel in a fresh venv, with no source checkout on sys.path:
    the benchmarks are package modules, not files next to the package. Dependencies (numpy, torch, ...) come
    from this venv's site-packages, placed after the wheel's site on PYTHONPATH."""
    wheels, venv, cwd = tmp_path / "wheels", tmp_path / "venv", tmp_path / "cwd"
    cwd.mkdir()
    # no PYTHONPATH while installing: a source tree on it (with a dynamo_ext.egg-info) would look installed
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("dynamo_ext-*.whl")
    assert "dynamo_ext/bench/transfer.py" in zipfile.ZipFile(whl).namelist()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=clean)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(whl)],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=clean,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    wheel_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True, timeout=60, cwd=cwd, env=clean).stdout.strip()
    main_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()
                     and str(p).startswith(sys.prefix))
    env = {**clean, "PYTHONPATH": os.pathsep.join([wheel_site, main_site])}
    code = "import dynamo_ext.bench, sys; print(dynamo_ext.bench.__file__)"
    where = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    r = subprocess.run([str(py), "-m", "dynamo_ext.cli", "bench", "transfer", "--help"],
                       capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.startswith("usage: dynamo-ext bench transfer"), r.stdout[:500]
