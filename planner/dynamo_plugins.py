"""Adapters: our pure policies as Dynamo 1.6 planner plugins (PROPOSE and CONSTRAIN stages).

Protocol (``dynamo.planner.plugins``; Dynamo calls the method named after the stage, with the
pydantic mirrors of ``plugin.proto`` from ``dynamo.planner.plugins.types``):

    Propose(ProposeStageRequest{context: PipelineContext})     -> ProposeStageResponse
    Constrain(ConstrainStageRequest{context: PipelineContext}) -> ConstrainStageResponse

    PipelineContext.observations.workers : WorkerState  (ready_/expected_ prefill|decode, *_scaling_in_progress)
    PipelineContext.observations.fpm     : FpmData      ("<worker_id>/<dp_rank>" -> msgpack ForwardPassMetrics)
    PipelineContext.proposal             : ScalingProposal, the merged PROPOSE/RECONCILE result (CONSTRAIN reads it)
    response: accept=AcceptResult() | override=OverrideResult(targets=[ComponentTarget(
              sub_component_type="prefill"|"decode", replicas=N, type=SET|AT_LEAST|AT_MOST)]) | reject=...

- `SlaPropose` turns the context (+ a scrape of TTFT/ITL/KV usage/transfer metrics, see
  `planner.metrics_source`) into `planner.signals.Signals`, runs `planner.policy.ScalingPolicy`
  and answers SET prefill and decode (also when holding: with a priority below the builtin load
  plugin's 10 our targets win the SET merge). With no WorkerState it answers Accept (no opinion);
  during the policy's start-up hold it answers Reject, which skips the whole tick.
- `RatioLinkConstrain` runs `planner.constraints.constrain` on the merged proposal and answers
  AT_LEAST / AT_MOST targets (SET is dropped by Dynamo in CONSTRAIN), or Accept when nothing binds.

Both take only JSON-able constructor kwargs, so Dynamo's in-process loader can build them from an
``in_process_plugins`` spec (`configs/planner.yaml`), and `planner.grpc_server` can serve the same
objects over Dynamo's gRPC plugin transport. This module imports Dynamo's planner types at import
time; `planner.policy`, `planner.constraints` and `planner.signals` do not.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import fields
from typing import Any, Callable

from dynamo.common.forward_pass_metrics import decode as decode_fpm
from dynamo.planner.plugins.types import (
    AcceptResult,
    ComponentTarget,
    ConstrainStageRequest,
    ConstrainStageResponse,
    OverrideResult,
    OverrideType,
    PipelineContext,
    ProposeStageRequest,
    ProposeStageResponse,
    RejectResult,
)

from planner.constraints import LinkDomain, RatioConfig, constrain
from planner.metrics_source import MetricNames, MetricsScraper, Window
from planner.policy import PolicyConfig, Proposal, ScalingPolicy
from planner.signals import Signals, summarize_fpm

log = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"


def _split(kwargs: dict[str, Any], cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def _workers(ctx: PipelineContext | None):
    return ctx.observations.workers if ctx is not None and ctx.observations is not None else None


def _current(ctx: PipelineContext | None) -> tuple[int | None, int | None]:
    w = _workers(ctx)
    if w is None:
        return None, None
    p = w.ready_prefill if w.ready_prefill is not None else w.expected_prefill
    d = w.ready_decode if w.ready_decode is not None else w.expected_decode
    return p, d


def signals_from_context(
    ctx: PipelineContext, window: Window, t: float, kv_capacity_tokens: int | None = None
) -> Signals | None:
    """Dynamo context + metrics window -> Signals; None when the worker inventory is missing."""
    w = _workers(ctx)
    if w is None or (w.ready_prefill is None and w.ready_decode is None):
        return None
    fpm = ctx.observations.fpm if ctx.observations is not None else None
    summ = summarize_fpm(
        [decode_fpm(b) for b in fpm.prefill_engines.values()] if fpm else [],
        [decode_fpm(b) for b in fpm.decode_engines.values()] if fpm else [],
        kv_capacity_tokens,
    )
    kv = window.kv_usage if window.kv_usage is not None else summ.kv_usage
    return Signals(
        t=t,
        ready_prefill=w.ready_prefill or 0,
        ready_decode=w.ready_decode or 0,
        prefill_queue=summ.prefill_queue + (window.queue or 0.0),
        decode_queue=summ.decode_queue,
        kv_usage=kv,
        ttft_s=window.ttft_s,
        itl_s=window.itl_s,
        transfer_share=window.transfer_share,
        requests=window.requests,
        scaling_in_progress=bool(w.prefill_scaling_in_progress or w.decode_scaling_in_progress),
        expected_prefill=w.expected_prefill,
        expected_decode=w.expected_decode,
    )


class SlaPropose:
    """PROPOSE plugin. kwargs: any `PolicyConfig` field, plus

    - metrics_urls: `/metrics` URLs to scrape each tick (frontend, workers); [] = FPM and counts only
    - metric_names: overrides of `MetricNames` fields
    - kv_capacity_tokens: per decode worker, to derive KV usage from FPM when no usage gauge exists
    - hold_as: "set" (default: answer SET current targets when holding) or "accept"
    """

    def __init__(
        self,
        *,
        metrics_urls: list[str] | None = None,
        metric_names: dict[str, Any] | None = None,
        kv_capacity_tokens: int | None = None,
        hold_as: str = "set",
        clock: Callable[[], float] = time.monotonic,
        window_source: Callable[[], Window] | None = None,
        **policy_kwargs: Any,
    ) -> None:
        cfg, extra = _split(policy_kwargs, PolicyConfig)
        if extra:
            raise TypeError(f"SlaPropose: unknown kwargs {sorted(extra)}")
        if hold_as not in ("set", "accept"):
            raise ValueError("hold_as must be 'set' or 'accept'")
        self.policy = ScalingPolicy(PolicyConfig(**cfg))
        names = MetricNames(**{k: tuple(v) if isinstance(v, list) else v for k, v in (metric_names or {}).items()})
        self._scraper = MetricsScraper(metrics_urls or [], names) if metrics_urls else None
        self._window_source = window_source
        self.kv_capacity_tokens = kv_capacity_tokens
        self.hold_as = hold_as
        self.clock = clock
        self.last: Proposal | None = None

    async def _window(self) -> Window:
        if self._window_source is not None:
            return self._window_source()
        if self._scraper is not None:
            return await asyncio.to_thread(self._scraper.sample)
        return Window()

    async def Propose(self, request: ProposeStageRequest) -> ProposeStageResponse:
        sig = signals_from_context(request.context, await self._window(), self.clock(), self.kv_capacity_tokens) \
            if request.context is not None else None
        if sig is None:
            return ProposeStageResponse(accept=AcceptResult())
        prop = self.policy.step(sig)
        self.last = prop
        if prop.no_decision:
            return ProposeStageResponse(reject=RejectResult(reason=f"dynamo_ext SlaPropose: {prop.reason}"))
        if prop.changed:
            log.info("dynamo_ext SlaPropose: %s", prop.reason)
        if not prop.changed and self.hold_as == "accept":
            return ProposeStageResponse(accept=AcceptResult())
        return ProposeStageResponse(override=OverrideResult(
            targets=[ComponentTarget(sub_component_type=PREFILL, replicas=prop.prefill, type=OverrideType.SET),
                     ComponentTarget(sub_component_type=DECODE, replicas=prop.decode, type=OverrideType.SET)],
            reason=prop.reason,
        ))


def _load_callable(path: str) -> Callable[[], list[dict[str, Any]]]:
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"domains_provider must be 'module:function', got {path!r}")
    return getattr(importlib.import_module(mod), attr)


class RatioLinkConstrain:
    """CONSTRAIN plugin. kwargs: min_ratio, max_ratio (decode:prefill, default 2..3), min/max_prefill,
    min/max_decode, and link domains either static (`domains: [{name, slots, prefill, decode}]`) or
    from `domains_provider: "module:function"` (called each tick, returns that list)."""

    def __init__(
        self,
        *,
        domains: list[dict[str, Any]] | None = None,
        domains_provider: str | Callable[[], list[dict[str, Any]]] | None = None,
        **ratio_kwargs: Any,
    ) -> None:
        cfg, extra = _split(ratio_kwargs, RatioConfig)
        if extra:
            raise TypeError(f"RatioLinkConstrain: unknown kwargs {sorted(extra)}")
        self.config = RatioConfig(**cfg)
        self._static = [LinkDomain(**d) for d in domains] if domains else None
        self._provider = _load_callable(domains_provider) if isinstance(domains_provider, str) else domains_provider
        self.last_reasons: list[str] = []

    def _domains(self) -> list[LinkDomain] | None:
        if self._provider is not None:
            return [LinkDomain(**d) for d in self._provider()]
        return self._static

    async def Constrain(self, request: ConstrainStageRequest) -> ConstrainStageResponse:
        ctx = request.context
        cur_p, cur_d = _current(ctx)
        proposed: dict[str, int | None] = {PREFILL: None, DECODE: None}
        if ctx is not None and ctx.proposal is not None:
            for t in ctx.proposal.targets:
                if t.sub_component_type in proposed and t.replicas is not None:
                    proposed[t.sub_component_type] = t.replicas
        if proposed[PREFILL] is None and proposed[DECODE] is None and cur_p is None and cur_d is None:
            return ConstrainStageResponse(accept=AcceptResult())
        cp = cur_p if cur_p is not None else (proposed[PREFILL] or 0)
        cd = cur_d if cur_d is not None else (proposed[DECODE] or 0)
        r = constrain(proposed[PREFILL], proposed[DECODE], cp, cd, self.config, self._domains())
        self.last_reasons = r.reasons
        targets = []
        for comp, lo, hi in ((PREFILL, r.prefill_at_least, r.prefill_at_most), (DECODE, r.decode_at_least, r.decode_at_most)):
            if lo is not None:
                targets.append(ComponentTarget(sub_component_type=comp, replicas=lo, type=OverrideType.AT_LEAST))
            if hi is not None:
                targets.append(ComponentTarget(sub_component_type=comp, replicas=hi, type=OverrideType.AT_MOST))
        if not targets:
            return ConstrainStageResponse(accept=AcceptResult())
        log.info("dynamo_ext RatioLinkConstrain: %s", "; ".join(r.reasons))
        return ConstrainStageResponse(override=OverrideResult(targets=targets, reason="; ".join(r.reasons)))
