"""The pure planner modules import without Dynamo's planner (and so without aisimulate_core)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_policy_modules_import_without_dynamo_planner():
    code = (
        "import sys; sys.modules['dynamo.planner'] = None; sys.modules['aisimulate_core'] = None\n"
        "import planner, planner.policy, planner.constraints, planner.signals, planner.metrics_source, planner.executor\n"
        "assert not [m for m in sys.modules if m.startswith('dynamo.planner.')]\n"
        "try:\n    import planner.dynamo_plugins\nexcept ImportError:\n    print('ADAPTER_NEEDS_DYNAMO')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ADAPTER_NEEDS_DYNAMO" in r.stdout
