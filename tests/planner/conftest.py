"""Planner tests: put the aisimulate_core stand-in on sys.path when the real package is absent (planner_support)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import planner_support  # noqa: E402,F401  (side effect: stand-in on sys.path)
