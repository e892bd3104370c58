"""scripts/gpu_serve_session.sh without running it (the CPU proof, `--cpu` with the py311 bundle, takes ~40 s
and needs the built bundle; see the script's header): it parses, documents the remote command and refuses unknown
arguments."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_serve_session.sh"


def test_script_parses_and_documents_the_remote_command():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "bash scripts/gpu_serve_session.sh" in r.stdout and ".gpu_bundle" in r.stdout
    assert "--concurrency 1" in r.stdout and "--cpu" in r.stdout
    r = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unknown argument --nope" in r.stderr
