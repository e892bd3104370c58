"""Measured worker throughput for ``decide``: prefill tokens/s and decode step seconds per worker.

Protocol (who calls what; every time is an argument, nothing here reads a clock)::

    router (workers/router.py)                      WorkerMeter (this module)
    ---------------------------------------------------------------------------------------------
    decide() chose option o for request rid   ->  planned(rid, worker, o.uncached_tokens, local, now)
                                                  the worker's queued uncached tokens grow now
    prefill call on worker p returned         ->  prefill_done(rid, now, ok)
                                                  sample (uncached tokens, service seconds) -> p
    decode stream chunk (n tokens) from d     ->  decode_chunk(rid, d, now, n, batch)
                                                  first chunk of a local plan: local prefill sample;
                                                  later chunks: gap / n = one decode step of d
    decode stream ended                       ->  decode_done(rid, d)
    building WorkerSnapshots                  ->  prefill_tokens_per_s(w, now), local_prefill_tokens_per_s(d, now),
                                                  decode_step_s(d, now), queued_tokens(w), running(d)

Service time of a serial worker (the engine runs one prefill at a time on one executor thread): a
request's service starts when it was planned or when the previous request on that worker finished,
whichever is later, so queueing ahead of it is not counted as prefill time::

    service_s = done - max(planned_at, last_done[worker])

Estimators (``RateEwma``, ``StepEwma``): EWMA with factor ``alpha`` of the samples, starting from a
prior until the first sample. Prefill throughput is the ratio of the EWMA of tokens to the EWMA of
seconds (a large prefill weighs more than a tiny one whose fixed overhead dominates). Staleness: a
worker not measured for ``stale_after_s`` drifts back toward its prior, the measured part halving
every ``half_life_s``, so a worker that stopped being chosen because of one slow sample is tried again.

Priors (``Priors.for_layers``): the router's old constants were measured on the 2-layer tiny model
(20,000 prefill tokens/s, 2 ms per decode step); prefill and decode cost scale with the number of
layers, so a model with L layers starts at 20,000 * 2 / L tokens/s and 2 ms * L / 2 per step.

Local prefill on a decode worker (``local_prefill_tokens_per_s``): the decode worker prefills between
its decode steps, and while it does, each of its ``running`` streams stalls for the whole prefill. The
router charges that slowdown to the local option by dividing the worker's measured local prefill
throughput by ``1 + interference_weight * running`` (weight 0.5: a stalled stream's delay counts half
as much as the new request's own TTFT; a knob, not a measured value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The router's constants before measurement (2-layer tiny model, CPU reference engine).
REF_LAYERS = 2
REF_PREFILL_TOKENS_PER_S = 20_000.0
REF_DECODE_STEP_S = 0.002


def _check(name: str, value: float, *, positive: bool = True) -> float:
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


@dataclass(frozen=True, slots=True)
class Priors:
    """Values used until a worker has samples (and drifted back to when its samples are stale)."""

    prefill_tokens_per_s: float = REF_PREFILL_TOKENS_PER_S
    decode_step_s: float = REF_DECODE_STEP_S
    #: A decode worker's local prefill throughput relative to a prefill worker's, before measuring it.
    local_prefill_factor: float = 0.5

    def __post_init__(self) -> None:
        _check("prefill_tokens_per_s", self.prefill_tokens_per_s)
        _check("decode_step_s", self.decode_step_s)
        if not 0 < self.local_prefill_factor <= 1:
            raise ValueError(f"local_prefill_factor must be in (0, 1], got {self.local_prefill_factor!r}")

    @classmethod
    def for_layers(cls, num_layers: int, *, ref_layers: int = REF_LAYERS,
                   ref_prefill_tokens_per_s: float = REF_PREFILL_TOKENS_PER_S,
                   ref_decode_step_s: float = REF_DECODE_STEP_S, local_prefill_factor: float = 0.5) -> Priors:
        """Priors scaled from a reference model by layer count (cost per token grows with layers)."""
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if ref_layers <= 0:
            raise ValueError(f"ref_layers must be > 0, got {ref_layers!r}")
        scale = num_layers / ref_layers
        return cls(ref_prefill_tokens_per_s / scale, ref_decode_step_s * scale, local_prefill_factor)


class _Decaying:
    """Shared staleness rule: weight of the measured value at ``now`` (1 fresh, -> 0 when stale)."""

    __slots__ = ("alpha", "stale_after_s", "half_life_s", "samples", "last_at")

    def __init__(self, alpha: float, stale_after_s: float, half_life_s: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.stale_after_s = _check("stale_after_s", stale_after_s, positive=False)
        self.half_life_s = _check("half_life_s", half_life_s)
        self.samples = 0
        self.last_at: float | None = None

    def weight(self, now: float) -> float:
        if self.samples == 0 or self.last_at is None:
            return 0.0
        age = now - self.last_at
        if age <= self.stale_after_s:
            return 1.0
        return 0.5 ** ((age - self.stale_after_s) / self.half_life_s)

    def _seen(self, now: float) -> None:
        self.samples += 1
        self.last_at = now if self.last_at is None else max(self.last_at, now)


class RateEwma(_Decaying):
    """Tokens/s as EWMA(tokens) / EWMA(seconds), from ``prior`` tokens/s until the first sample."""

    __slots__ = ("prior", "_tokens", "_seconds")

    def __init__(self, prior: float, *, alpha: float = 0.3, stale_after_s: float = 30.0,
                 half_life_s: float = 30.0) -> None:
        super().__init__(alpha, stale_after_s, half_life_s)
        self.prior = _check("prior tokens/s", prior)
        self._tokens = 0.0
        self._seconds = 0.0

    def observe(self, tokens: float, seconds: float, now: float) -> None:
        tokens = _check("tokens", tokens)
        seconds = _check("seconds", seconds)
        if self.samples == 0:
            self._tokens, self._seconds = tokens, seconds
        else:
            a = self.alpha
            self._tokens += a * (tokens - self._tokens)
            self._seconds += a * (seconds - self._seconds)
        self._seen(now)

    def measured(self) -> float | None:
        return self._tokens / self._seconds if self.samples else None

    def value(self, now: float, prior: float | None = None) -> float:
        """Tokens/s at ``now``: measured, blended toward the prior in seconds per token when stale
        (``prior`` overrides the fixed one, e.g. one derived from other workers' measurements)."""
        prior = self.prior if prior is None or not prior > 0 else prior
        w = self.weight(now)
        if w == 0.0:
            return prior
        spt = w * (self._seconds / self._tokens) + (1.0 - w) / prior
        return 1.0 / spt


class StepEwma(_Decaying):
    """Seconds per decode step: EWMA of samples, from ``prior`` until the first sample."""

    __slots__ = ("prior", "_value")

    def __init__(self, prior: float, *, alpha: float = 0.2, stale_after_s: float = 30.0,
                 half_life_s: float = 30.0) -> None:
        super().__init__(alpha, stale_after_s, half_life_s)
        self.prior = _check("prior step seconds", prior)
        self._value = 0.0

    def observe(self, seconds: float, now: float) -> None:
        seconds = _check("step seconds", seconds)
        self._value = seconds if self.samples == 0 else self._value + self.alpha * (seconds - self._value)
        self._seen(now)

    def measured(self) -> float | None:
        return self._value if self.samples else None

    def value(self, now: float) -> float:
        w = self.weight(now)
        return w * self._value + (1.0 - w) * self.prior if w else self.prior


@dataclass(slots=True)
class _Plan:
    worker: int  # the worker that prefills (the decode worker itself when local)
    uncached: int
    local: bool
    planned_at: float
    decode: int | None = None  # decode worker once its stream started
    last_chunk_at: float | None = None
    prefilled: bool = False


class WorkerMeter:
    """Per-worker estimators and queued work, fed by the router's observations (see module docstring)."""

    def __init__(self, priors: Priors | None = None, *, alpha: float = 0.3, stale_after_s: float = 30.0,
                 half_life_s: float = 30.0, interference_weight: float = 0.5,
                 max_step_sample_s: float = 10.0, max_open: int = 100_000) -> None:
        self.priors = priors or Priors()
        self.alpha, self.stale_after_s, self.half_life_s = alpha, stale_after_s, half_life_s
        self.interference_weight = _check("interference_weight", interference_weight, positive=False)
        self.max_step_sample_s = _check("max_step_sample_s", max_step_sample_s)
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open!r}")
        self.max_open = max_open
        self._prefill: dict[int, RateEwma] = {}
        self._local: dict[int, RateEwma] = {}
        self._step: dict[int, StepEwma] = {}
        self._plans: dict[str, _Plan] = {}
        self._queued: dict[int, int] = {}  # uncached tokens planned on a worker, not yet prefilled
        self._last_done: dict[int, float] = {}  # serial service clock per worker (prefill work)
        self._running: dict[int, int] = {}  # decode streams past their first token, per decode worker
        self.prefill_samples = 0
        self.local_samples = 0
        self.step_samples = 0

    # -- estimators --------------------------------------------------------------------------------
    def _rate(self, table: dict[int, RateEwma], w: int, prior: float) -> RateEwma:
        e = table.get(w)
        if e is None:
            e = table[w] = RateEwma(prior, alpha=self.alpha, stale_after_s=self.stale_after_s,
                                    half_life_s=self.half_life_s)
        return e

    def _stepper(self, d: int) -> StepEwma:
        e = self._step.get(d)
        if e is None:
            e = self._step[d] = StepEwma(self.priors.decode_step_s, alpha=self.alpha,
                                         stale_after_s=self.stale_after_s, half_life_s=self.half_life_s)
        return e

    def prefill_tokens_per_s(self, w: int, now: float) -> float:
        """Measured prefill throughput of a prefill worker (prior until measured)."""
        return self._rate(self._prefill, w, self.priors.prefill_tokens_per_s).value(now)

    def fleet_prefill_tokens_per_s(self, now: float) -> float:
        """Mean measured prefill throughput of the prefill workers with samples (the prior without any)."""
        got = [e.value(now) for e in self._prefill.values() if e.samples]
        return sum(got) / len(got) if got else self.priors.prefill_tokens_per_s

    def fleet_local_prior(self, d: int, now: float) -> float:
        """What decode (or agg) worker ``d`` is assumed to prefill at before its own samples: the measured
        prefill workers' mean x ``local_prefill_factor``; without measured prefill workers (an aggregated
        graph) the fastest measured local throughput of the other workers (the same engine and model, and
        optimistic: a worker never chosen must not look slower than one measured, or it is never chosen, so
        never measured); else the prior."""
        if any(e.samples for e in self._prefill.values()):
            return self.fleet_prefill_tokens_per_s(now) * self.priors.local_prefill_factor
        got = [e.value(now) for w, e in self._local.items() if w != d and e.samples]
        if got:
            return max(got)
        return self.priors.prefill_tokens_per_s * self.priors.local_prefill_factor

    def local_prefill_tokens_per_s(self, d: int, now: float, *, with_interference: bool = True) -> float:
        """Decode worker ``d``'s measured local prefill throughput, divided by
        ``1 + interference_weight * running(d)`` (the slowdown charged for its stalled streams).

        Until ``d`` has its own samples (and as they go stale) its prior is the prefill workers' measured
        throughput x ``local_prefill_factor`` (same engine and model), so a wrong fixed prior cannot keep
        local prefills from ever being chosen, and so from ever being measured."""
        prior = self.fleet_local_prior(d, now)
        thr = self._rate(self._local, d, self.priors.prefill_tokens_per_s * self.priors.local_prefill_factor
                         ).value(now, prior)
        if with_interference:
            thr /= 1.0 + self.interference_weight * self._running.get(d, 0)
        return thr

    def decode_step_s(self, d: int, now: float) -> float:
        return self._stepper(d).value(now)

    def backlog_s(self, d: int, now: float) -> float:
        """Seconds of local prefill work planned on decode worker ``d``: its queued uncached tokens at its
        measured local prefill throughput (without the interference charge)."""
        q = self._queued.get(d, 0)
        return q / self.local_prefill_tokens_per_s(d, now, with_interference=False) if q else 0.0

    def queued_tokens(self, w: int) -> int:
        """Uncached tokens planned on ``w`` whose prefill has not finished (the one in service included)."""
        return self._queued.get(w, 0)

    def running(self, d: int) -> int:
        return self._running.get(d, 0)

    # -- observations ------------------------------------------------------------------------------
    def planned(self, rid: str, worker: int, uncached_tokens: int, local: bool, now: float) -> None:
        """``decide`` chose ``worker`` to prefill ``uncached_tokens`` of request ``rid`` (local: a decode worker)."""
        if uncached_tokens < 0:
            raise ValueError(f"uncached_tokens must be >= 0, got {uncached_tokens!r}")
        self.forget(rid)
        while len(self._plans) >= self.max_open:  # a caller that never reports the end: drop the oldest
            self.forget(next(iter(self._plans)))
        self._plans[rid] = _Plan(worker, uncached_tokens, local, now)
        self._queued[worker] = self._queued.get(worker, 0) + uncached_tokens

    def _unqueue(self, p: _Plan) -> None:
        if not p.prefilled:
            p.prefilled = True
            left = self._queued.get(p.worker, 0) - p.uncached
            if left > 0:
                self._queued[p.worker] = left
            else:
                self._queued.pop(p.worker, None)

    def _service(self, worker: int, planned_at: float, now: float) -> float:
        start = max(planned_at, self._last_done.get(worker, planned_at))
        self._last_done[worker] = max(now, self._last_done.get(worker, now))
        return now - start

    def prefill_done(self, rid: str, now: float, ok: bool = True) -> float | None:
        """The prefill call of a disaggregated plan returned; a sample when ``ok``. Returns its service seconds."""
        p = self._plans.get(rid)
        if p is None or p.local or p.prefilled:
            return None
        self._unqueue(p)
        s = self._service(p.worker, p.planned_at, now)
        if not ok:
            # the decode worker prefills instead: nothing measured here, nothing queued there
            return None
        if s > 0 and p.uncached > 0:
            self._rate(self._prefill, p.worker, self.priors.prefill_tokens_per_s).observe(p.uncached, s, now)
            self.prefill_samples += 1
            return s
        return None

    def decode_chunk(self, rid: str, d: int, now: float, n_tokens: int) -> None:
        """One chunk of ``n_tokens`` tokens from decode worker ``d`` for ``rid``."""
        p = self._plans.get(rid)
        if p is None:
            return
        if p.decode != d:  # first chunk from this worker (a retry starts over on another worker)
            if p.decode is not None:
                self._stop(p)
            p.decode = d
            p.last_chunk_at = now
            self._running[d] = self._running.get(d, 0) + 1
            if p.local and not p.prefilled and p.worker == d:
                self._unqueue(p)
                s = self._service(d, p.planned_at, now)
                if s > 0 and p.uncached > 0:
                    self._rate(self._local, d, self.priors.prefill_tokens_per_s * self.priors.local_prefill_factor
                               ).observe(p.uncached, s, now)
                    self.local_samples += 1
            return
        if n_tokens <= 0 or p.last_chunk_at is None:
            return
        gap = now - p.last_chunk_at
        p.last_chunk_at = now
        if 0 < gap <= self.max_step_sample_s:
            self._stepper(d).observe(gap / n_tokens, now)
            self.step_samples += 1

    def _stop(self, p: _Plan) -> None:
        if p.decode is not None:
            n = self._running.get(p.decode, 0) - 1
            if n > 0:
                self._running[p.decode] = n
            else:
                self._running.pop(p.decode, None)
            p.decode = None

    def forget(self, rid: str) -> None:
        """The request is over (or failed): drop its queued tokens and its running stream."""
        p = self._plans.pop(rid, None)
        if p is not None:
            self._unqueue(p)
            self._stop(p)

    def decode_done(self, rid: str, d: int | None = None) -> None:
        """The decode stream of ``rid`` ended (``d`` for the log only: the plan knows its worker)."""
        self.forget(rid)

    @property
    def open_requests(self) -> int:
        return len(self._plans)

    def summary(self, now: float) -> dict[str, dict[str, float]]:
        """Current estimates per worker seen so far (for health / logs): plain numbers."""
        out: dict[str, dict[str, float]] = {}
        for w in sorted(set(self._prefill) | set(self._local) | set(self._step) | set(self._queued)):
            row: dict[str, float] = {"queued_tokens": float(self.queued_tokens(w))}
            if w in self._prefill:
                row["prefill_tok_s"] = round(self._prefill[w].value(now), 1)
                row["prefill_samples"] = float(self._prefill[w].samples)
            if w in self._local:
                row["local_prefill_tok_s"] = round(self._local[w].value(now), 1)
                row["local_samples"] = float(self._local[w].samples)
            if w in self._step:
                row["decode_step_s"] = round(self._step[w].value(now), 6)
                row["step_samples"] = float(self._step[w].samples)
                row["running"] = float(self.running(w))
            out[str(w)] = row
        return out


__all__ = ["Priors", "RateEwma", "StepEwma", "WorkerMeter", "REF_LAYERS", "REF_PREFILL_TOKENS_PER_S",
           "REF_DECODE_STEP_S"]
