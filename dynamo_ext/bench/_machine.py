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


CUDA_PROBE = """
import json, torch
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if out["cuda_available"]:
    n = torch.cuda.device_count()
    p = torch.cuda.get_device_properties(0)
    out.update(gpus=[torch.cuda.get_device_name(i) for i in range(n)], gpu=p.name,
               gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
print(json.dumps(out))
"""


def cuda_info(python: str | None = None, timeout: float = 120.0) -> dict:
    """GPU facts from torch.cuda (names, memory of GPU 0, CUDA version), asked in a child interpreter so the
    caller holds no CUDA context; ``{"cuda_error": ...}`` when that fails."""
    import json
    import subprocess
    import sys

    try:
        r = subprocess.run([python or sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        if r.returncode != 0:
            return {"cuda_error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"cuda_error": f"{type(e).__name__}: {e}"}


def machine_tag(m: dict) -> str:
    """'1xH200' from the GPU names ('NVIDIA H200' -> H200), 'cpu' without GPUs."""
    gpus = m.get("gpus")
    if not gpus:
        return "cpu"
    words = [w for w in str(gpus[0]).replace("-", " ").split() if w.upper() not in ("NVIDIA", "TESLA", "GEFORCE")]
    name = next((w for w in words if any(ch.isdigit() for ch in w)), words[0] if words else "gpu")
    return f"{len(gpus)}x{''.join(ch for ch in name if ch.isalnum())}"
