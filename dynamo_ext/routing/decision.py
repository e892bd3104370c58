"""What ``decide`` returns: the chosen option, why, what it beat, and what was excluded.

A ``Decision`` is built once per request and handed to the worker layer, which logs ``to_log()``
(one line) and exports ``metrics()`` (plain numbers) and then acts on ``chosen``:

    chosen.kind == DISAGG  -> call prefill worker ``chosen.prefill_id``, then decode ``chosen.decode_id``
    chosen.kind == LOCAL   -> call decode worker ``chosen.decode_id``; it prefills locally

Every option carries the terms of its TTFT estimate (seconds), so a decision can be audited
against the cost model written out in README.md. Ties are broken by ``Option.sort_key``:
lowest estimate, then more overlap blocks, then local before disaggregated, then lower worker ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class OptionKind(str, Enum):
    DISAGG = "disagg"  # prefill on a prefill worker, KV moved to a decode worker
    LOCAL = "local"  # the decode worker prefills itself (no transfer)


class DecisionReason(str, Enum):
    SHORT_PROMPT = "short_prompt"  # below RoutingConfig.local_prefill_max_tokens: local by rule
    LOCAL_CHEAPER = "local_cheaper"  # local estimate beat every healthy pair
    DISAGG_CHEAPER = "disagg_cheaper"  # a pair beat every local option
    NO_HEALTHY_PAIR = "no_healthy_pair"  # prefill workers exist, no pair left after exclusions: local
    NO_PREFILL_WORKERS = "no_prefill_workers"  # no prefill worker at all (aggregated graph): local
    NO_LOCAL_OPTION = "no_local_option"  # local prefill disabled or impossible: best pair


class ExclusionReason(str, Enum):
    WORKER_UNHEALTHY = "worker_unhealthy"
    NO_THROUGHPUT = "no_prefill_throughput"  # prefill_tokens_per_s == 0: cannot estimate, cannot serve
    NO_FREE_BLOCKS = "no_free_blocks"  # decode target lacks free blocks for the KV it would hold
    LAYOUT_MISMATCH = "layout_mismatch"
    LINK_UNHEALTHY = "link_unhealthy"


@dataclass(frozen=True, slots=True)
class Terms:
    """The terms of one TTFT estimate, seconds. ``total_s`` is what options are ranked by.

    disagg: total = (prefill-side cost + (transfer + link latency)) + decode admission
    local:  total = decode admission + prefill-side cost (on the decode worker itself)
    where prefill-side cost = ((queue wait + onload of the cached prefix) + prefill of uncached tokens)
                              + work, work = RoutingConfig.work_weight x prefill (the compute the option
                              adds, which later requests wait behind; 0 by default). ``ttft_s`` is the
                              TTFT estimate itself (total without the work charge).
    """

    queue_wait_s: float
    onload_s: float
    prefill_s: float
    transfer_s: float
    link_latency_s: float
    admission_s: float
    total_s: float
    work_s: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.total_s - self.work_s

    def as_dict(self) -> dict[str, float]:
        return {
            "queue_wait_s": self.queue_wait_s,
            "onload_s": self.onload_s,
            "prefill_s": self.prefill_s,
            "transfer_s": self.transfer_s,
            "link_latency_s": self.link_latency_s,
            "admission_s": self.admission_s,
            "total_s": self.total_s,
            "work_s": self.work_s,
        }


@dataclass(frozen=True, slots=True)
class Option:
    """One way to serve the request, with its estimate."""

    kind: OptionKind
    prefill_id: int  # the worker that prefills (== decode_id for LOCAL)
    decode_id: int
    terms: Terms
    overlap_blocks: int  # cached prompt blocks used on the prefilling worker
    uncached_tokens: int  # tokens it computes
    kv_bytes: int  # bytes moved (0 for LOCAL)
    link_gb_per_s: float  # 0 for LOCAL

    @property
    def estimate_s(self) -> float:
        return self.terms.total_s

    def sort_key(self) -> tuple[float, int, int, int, int]:
        return (self.terms.total_s, -self.overlap_blocks, 0 if self.kind is OptionKind.LOCAL else 1,
                self.prefill_id, self.decode_id)

    def label(self) -> str:
        if self.kind is OptionKind.LOCAL:
            return f"local@{self.decode_id}"
        return f"{self.prefill_id}->{self.decode_id}"


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Options left out before estimating, and why.

    ``any_partner=False``: the excluded pairs are ``prefill_ids x decode_ids``.
    ``any_partner=True`` (a worker-level exclusion): every pair with a prefill worker in
    ``prefill_ids`` or a decode worker in ``decode_ids``, whatever its partner.
    ``local``: the local options of the workers in ``decode_ids`` are excluded too.
    ``pair_count``: pairs this record excludes (each excluded pair is counted by one record only).
    """

    reason: ExclusionReason
    prefill_ids: tuple[int, ...]
    decode_ids: tuple[int, ...]
    local: bool
    detail: str
    pair_count: int
    any_partner: bool = False

    def covers_pair(self, prefill_id: int, decode_id: int) -> bool:
        if self.any_partner:
            return prefill_id in self.prefill_ids or decode_id in self.decode_ids
        return prefill_id in self.prefill_ids and decode_id in self.decode_ids

    def covers_local(self, decode_id: int) -> bool:
        return self.local and decode_id in self.decode_ids


class NoCandidateError(RuntimeError):
    """No option is left: every worker or pair was excluded. ``exclusions`` says why."""

    def __init__(self, exclusions: tuple[Exclusion, ...], detail: str = "") -> None:
        self.exclusions = exclusions
        why = "; ".join(f"{e.reason.value}: {e.detail}" for e in exclusions) or "no workers given"
        super().__init__(f"no routing candidate{(' (' + detail + ')') if detail else ''}: {why}")


@dataclass(frozen=True, slots=True)
class Decision:
    """The routing decision for one request."""

    chosen: Option
    reason: DecisionReason
    runner_up: Option | None
    exclusions: tuple[Exclusion, ...]
    best_local_s: float | None  # best local estimate, when local options were evaluated
    best_disagg_s: float | None  # best pair estimate, when pairs were evaluated
    evaluated: int  # options whose estimate was computed in full
    pruned: int  # pairs skipped because their lower bound could not beat the top two
    prompt_tokens: int
    request_id: str = ""

    @property
    def disaggregated(self) -> bool:
        return self.chosen.kind is OptionKind.DISAGG

    @property
    def margin_s(self) -> float | None:
        """How much later the runner-up's estimate is (>= 0), or None without a runner-up."""
        if self.runner_up is None:
            return None
        return self.runner_up.terms.total_s - self.chosen.terms.total_s

    def excluded_pair(self, prefill_id: int, decode_id: int) -> ExclusionReason | None:
        for e in self.exclusions:
            if e.covers_pair(prefill_id, decode_id):
                return e.reason
        return None

    def excluded_local(self, decode_id: int) -> ExclusionReason | None:
        for e in self.exclusions:
            if e.covers_local(decode_id):
                return e.reason
        return None

    def to_log(self) -> str:
        c, t = self.chosen, self.chosen.terms
        parts = [
            f"route{(' req=' + self.request_id) if self.request_id else ''}",
            f"{c.kind.value} prefill={c.prefill_id} decode={c.decode_id}",
            f"reason={self.reason.value} est={t.total_s:.6f}s",
            f"terms[q={t.queue_wait_s:.6f} onload={t.onload_s:.6f} prefill={t.prefill_s:.6f}"
            f" xfer={t.transfer_s:.6f} lat={t.link_latency_s:.6f} adm={t.admission_s:.6f}]",
            f"prompt={self.prompt_tokens} overlap_blk={c.overlap_blocks} uncached={c.uncached_tokens}"
            f" kv_bytes={c.kv_bytes}",
        ]
        if self.runner_up is not None:
            parts.append(f"runner_up={self.runner_up.label()} +{self.margin_s:.6f}s")
        else:
            parts.append("runner_up=none")
        counts = self._exclusion_counts()
        if counts:
            parts.append("excluded=" + ",".join(f"{k}:{v}" for k, v in counts.items()))
        parts.append(f"evaluated={self.evaluated} pruned={self.pruned}")
        return " ".join(parts)

    def _exclusion_counts(self) -> dict[str, int]:
        """Excluded options per reason (pairs plus local options), in reason order."""
        counts: dict[str, int] = {}
        for e in self.exclusions:
            n = e.pair_count + (len(e.decode_ids) if e.local else 0)
            counts[e.reason.value] = counts.get(e.reason.value, 0) + n
        return counts

    def metrics(self) -> dict[str, float]:
        """Plain numbers for Prometheus/NATS export. Keys absent when not known (no runner-up...)."""
        c, t = self.chosen, self.chosen.terms
        m: dict[str, float] = {
            "disaggregated": 1.0 if self.disaggregated else 0.0,
            "prefill_worker": float(c.prefill_id),
            "decode_worker": float(c.decode_id),
            "estimate_s": t.total_s,
            "queue_wait_s": t.queue_wait_s,
            "onload_s": t.onload_s,
            "prefill_s": t.prefill_s,
            "transfer_s": t.transfer_s,
            "link_latency_s": t.link_latency_s,
            "admission_s": t.admission_s,
            "overlap_blocks": float(c.overlap_blocks),
            "uncached_tokens": float(c.uncached_tokens),
            "kv_bytes": float(c.kv_bytes),
            "prompt_tokens": float(self.prompt_tokens),
            "evaluated": float(self.evaluated),
            "pruned": float(self.pruned),
        }
        if self.margin_s is not None:
            m["runner_up_margin_s"] = self.margin_s
        if self.best_local_s is not None:
            m["best_local_s"] = self.best_local_s
        if self.best_disagg_s is not None:
            m["best_disagg_s"] = self.best_disagg_s
        for reason in ExclusionReason:
            m[f"excluded_{reason.value}"] = 0.0
        for k, v in self._exclusion_counts().items():
            m[f"excluded_{k}"] = float(v)
        return m


__all__ = [
    "OptionKind",
    "DecisionReason",
    "ExclusionReason",
    "Terms",
    "Option",
    "Exclusion",
    "NoCandidateError",
    "Decision",
]
