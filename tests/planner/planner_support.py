"""Helpers for the planner tests: the aisimulate_core STAND-IN on sys.path, and the Dynamo-typed fixtures.

Dynamo 1.6's planner (even `dynamo.planner.plugins.types`) imports NVIDIA's `aisimulate_core`,
which cannot be installed here. `tests/planner/standin/` holds a minimal stand-in (see its
docstring and planner/README.md); it is test-only and never shipped. With the real package
installed it is not used. Subprocesses get it through `planner_env()`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

STANDIN = Path(__file__).parent / "standin"
ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.find_spec("aisimulate_core")
# the stand-in counts as "not installed" even when another test module already put it on sys.path
USING_STANDIN = _spec is None or str(STANDIN) in (_spec.origin or "")
if USING_STANDIN and str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))


def planner_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess that imports dynamo.planner and our planner/ package."""
    paths = ([str(STANDIN)] if USING_STANDIN else []) + [str(ROOT)]
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])), **extra)
