"""Our plugins speak Dynamo's real pydantic plugin types, and load through Dynamo's in-process loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

types = pytest.importorskip("dynamo.planner.plugins.types", reason="needs dynamo-ext[planner] deps (see planner/README.md)")

from dynamo.common.forward_pass_metrics import ForwardPassMetrics, QueuedRequestMetrics, ScheduledRequestMetrics, encode  # noqa: E402
from dynamo.planner.plugins._proto_bridge import proto_to_pydantic, pydantic_to_proto  # noqa: E402
from dynamo.planner.plugins.types import (  # noqa: E402
    ComponentTarget,
    ConstrainStageRequest,
    ConstrainStageResponse,
    FpmData,
    ObservationData,
    OverrideType,
    PipelineContext,
    ProposeStageRequest,
    ProposeStageResponse,
    ScalingProposal,
    WorkerState,
)

from planner.dynamo_plugins import RatioLinkConstrain, SlaPropose, signals_from_context  # noqa: E402
from planner.metrics_source import Window  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def fpm(queued_prefill=0, queued_decode=0, decode_kv=0) -> bytes:
    return encode(ForwardPassMetrics(
        worker_id="1", queued_requests=QueuedRequestMetrics(num_prefill_requests=queued_prefill, num_decode_requests=queued_decode),
        scheduled_requests=ScheduledRequestMetrics(sum_decode_kv_tokens=decode_kv),
    ))


def ctx(p=1, d=2, *, prefill_q=0, kv_tokens=0, proposal=None, in_progress=False) -> PipelineContext:
    return PipelineContext(
        request_id="r", decision_id="d",
        observations=ObservationData(
            workers=WorkerState(ready_prefill=p, ready_decode=d, expected_prefill=p, expected_decode=d,
                                prefill_scaling_in_progress=in_progress, decode_scaling_in_progress=False),
            fpm=FpmData(prefill_engines={"1/0": fpm(queued_prefill=prefill_q)},
                        decode_engines={f"{i}/0": fpm(decode_kv=kv_tokens) for i in range(2, 2 + d)}),
        ),
        proposal=proposal,
    )


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def roundtrip(msg):
    """Through Dynamo's proto bridge: what the gRPC transport would carry."""
    return proto_to_pydantic(pydantic_to_proto(msg), type(msg))


def targets(resp) -> dict[tuple[str, OverrideType], int]:
    return {(t.sub_component_type, t.type): t.replicas for t in resp.override.targets}


def test_signals_from_context_decodes_fpm():
    s = signals_from_context(ctx(1, 2, prefill_q=5, kv_tokens=900), Window(ttft_s=0.3, requests=10.0), t=7.0, kv_capacity_tokens=1000)
    assert (s.ready_prefill, s.ready_decode, s.prefill_queue, s.kv_usage, s.ttft_s, s.t) == (1, 2, 5.0, 0.9, 0.3, 7.0)
    assert signals_from_context(PipelineContext(), Window(), t=0.0) is None


async def test_propose_roundtrips_dynamo_types_and_scales_on_kv():
    clk = Clock()
    plug = SlaPropose(warmup_s=0, startup_hold_s=0, up_ticks=2, up_cooldown_s=0, kv_capacity_tokens=1000, clock=clk)
    req = roundtrip(ProposeStageRequest(context=ctx(1, 2, kv_tokens=950)))
    r1 = await plug.Propose(req)
    assert isinstance(r1, ProposeStageResponse) and r1.result_kind == "override"
    assert targets(r1) == {("prefill", OverrideType.SET): 1, ("decode", OverrideType.SET): 2}
    clk.t = 10.0
    r2 = roundtrip(await plug.Propose(req))  # response survives the proto bridge too
    assert targets(r2)[("decode", OverrideType.SET)] == 3 and "KV usage" in r2.override.reason


async def test_propose_accepts_without_worker_inventory_and_hold_as_accept():
    plug = SlaPropose(hold_as="accept", startup_hold_s=0)
    assert (await plug.Propose(ProposeStageRequest(context=PipelineContext()))).result_kind == "accept"
    assert (await plug.Propose(ProposeStageRequest(context=ctx(1, 2)))).result_kind == "accept"
    with pytest.raises(TypeError):
        SlaPropose(not_a_field=1)


async def test_constrain_emits_at_least_at_most():
    plug = RatioLinkConstrain(min_ratio=2, max_ratio=3)
    prop = ScalingProposal(targets=[ComponentTarget(sub_component_type="prefill", replicas=1),
                                    ComponentTarget(sub_component_type="decode", replicas=7)])
    r = roundtrip(await plug.Constrain(roundtrip(ConstrainStageRequest(context=ctx(1, 3, proposal=prop)))))
    assert isinstance(r, ConstrainStageResponse)
    assert targets(r) == {("prefill", OverrideType.AT_LEAST): 3}
    ok = ScalingProposal(targets=[ComponentTarget(sub_component_type="prefill", replicas=1),
                                  ComponentTarget(sub_component_type="decode", replicas=2)])
    assert (await plug.Constrain(ConstrainStageRequest(context=ctx(1, 2, proposal=ok)))).result_kind == "accept"


async def test_constrain_link_domains_from_provider():
    doms = [{"name": "a", "slots": 4, "prefill": 1, "decode": 2}, {"name": "b", "slots": 8}]
    plug = RatioLinkConstrain(domains_provider=lambda: doms)
    prop = ScalingProposal(targets=[ComponentTarget(sub_component_type="decode", replicas=3)])
    r = await plug.Constrain(ConstrainStageRequest(context=ctx(1, 2, proposal=prop)))
    assert r.result_kind == "accept"  # 1 free slot next to the prefill worker: 3 fits
    prop5 = ScalingProposal(targets=[ComponentTarget(sub_component_type="decode", replicas=5)])
    r = await plug.Constrain(ConstrainStageRequest(context=ctx(1, 2, proposal=prop5)))
    assert targets(r) == {("decode", OverrideType.AT_MOST): 3}
    static = RatioLinkConstrain(domains=doms)
    assert targets(await static.Constrain(ConstrainStageRequest(context=ctx(1, 2, proposal=prop5)))) == {("decode", OverrideType.AT_MOST): 3}


def _orchestrator(allow_insecure_grpc: bool = False):
    from dynamo.planner.plugins.clock import VirtualClock
    from dynamo.planner.plugins.orchestrator.orchestrator import LocalPlannerOrchestrator
    from dynamo.planner.plugins.registry.auth import AllowUnauthenticatedAuth
    from dynamo.planner.plugins.registry.circuit_breaker import CircuitBreaker
    from dynamo.planner.plugins.registry.server import PluginRegistryServer
    from dynamo.planner.plugins.scheduler import PluginScheduler
    from dynamo.planner.plugins.transport.config import TransportConfig, make_transport_for_endpoint

    clk = VirtualClock()
    cb = CircuitBreaker(clk, failure_threshold=3, cooldown_seconds=30.0)
    tc = TransportConfig(request_timeout_seconds=5.0, allow_insecure_grpc=allow_insecure_grpc)

    def factory(plugin_id, endpoint, *, in_process_instance=None):
        return make_transport_for_endpoint(plugin_id, endpoint, tc, in_process_instance=in_process_instance)

    server = PluginRegistryServer(clock=clk, auth=AllowUnauthenticatedAuth(), circuit_breaker=cb, transport_factory=factory)
    sched = PluginScheduler(server, cb, clk)
    return LocalPlannerOrchestrator(registry=server, scheduler=sched, circuit_breaker=cb, clock=clk,
                                    tick_max_duration_seconds=30.0), server


async def test_loaded_by_dynamos_in_process_loader_from_configs_planner_yaml():
    from dynamo.planner.config.planner_config import PlannerConfig
    from dynamo.planner.plugins.merge.types import ComponentKey
    from dynamo.planner.plugins.orchestrator.in_process_loader import load_in_process_plugins

    raw = yaml.safe_load((ROOT / "configs/planner.yaml").read_text())
    specs = PlannerConfig.model_validate(raw).plugin_registration.in_process_plugins
    # no scraping in a unit test, and no warm-up/hysteresis so one tick decides
    specs[0] = specs[0].model_copy(update={"kwargs": {**specs[0].kwargs, "metrics_urls": [], "warmup_s": 0, "startup_hold_s": 0,
                                                        "up_ticks": 1, "kv_capacity_tokens": 1000}})
    orch, server = _orchestrator()
    load_in_process_plugins(orch, specs)
    infos = {i.plugin_id: i for i in orch.list_plugins()}
    assert set(infos) == {"dynamo-ext-sla-propose", "dynamo-ext-ratio-links"}
    assert all(i.transport == "in_process" and not i.is_builtin for i in infos.values())

    baseline = {ComponentKey(sub_component_type="prefill"): 1, ComponentKey(sub_component_type="decode"): 3}
    out = await orch.tick(ctx(1, 3, kv_tokens=950), baseline)
    final = {t.sub_component_type: t.replicas for t in out.final_proposal.targets}
    # propose: decode 3 -> 4 (KV 0.95 > 0.8); constrain: 4/1 > 3:1 -> prefill AT_LEAST 2
    assert out.execute_action == "apply", out
    assert final == {"prefill": 2, "decode": 4}


async def test_propose_rejects_the_tick_during_startup_hold():
    clk = Clock()
    plug = SlaPropose(startup_hold_s=30, clock=clk)
    r = roundtrip(await plug.Propose(ProposeStageRequest(context=ctx(0, 0))))
    assert r.result_kind == "reject" and "start-up hold" in r.reject.reason
    clk.t = 31.0
    assert (await plug.Propose(ProposeStageRequest(context=ctx(1, 2)))).result_kind == "override"
