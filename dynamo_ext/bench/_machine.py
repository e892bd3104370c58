"""Machine facts shared by the benchmarks (results must describe the machine they came from)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def load_avg_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
