"""Statistics shared by the benchmarks."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs by linear interpolation between closest ranks (None for no samples)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
