"""Our plugins served over gRPC and called through Dynamo's own GrpcTransport and orchestrator."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("dynamo.planner.plugins.types", reason="needs dynamo-ext[planner] deps (see planner/README.md)")

from dynamo.planner.plugins.transport.grpc_remote import GrpcTransport  # noqa: E402
from dynamo.planner.plugins.types import (  # noqa: E402
    ComponentTarget,
    ConstrainStageRequest,
    OverrideType,
    ProposeStageRequest,
    ScalingProposal,
)

from planner.dynamo_plugins import RatioLinkConstrain, SlaPropose  # noqa: E402
from planner.grpc_server import start_server  # noqa: E402
from test_dynamo_plugins import _orchestrator, ctx  # noqa: E402

from planner_support import planner_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


async def test_grpc_transport_round_trip():
    server, port = await start_server({
        "propose": SlaPropose(warmup_s=0, startup_hold_s=0, up_ticks=1, kv_capacity_tokens=1000),
        "constrain": RatioLinkConstrain(),
    })
    try:
        tp = GrpcTransport("p", f"grpc://127.0.0.1:{port}", 5.0, allow_insecure=True)
        r = await tp.call("Propose", ProposeStageRequest(context=ctx(1, 2, kv_tokens=950)))
        got = {t.sub_component_type: t.replicas for t in r.override.targets}
        assert got == {"prefill": 1, "decode": 3}
        prop = ScalingProposal(targets=[ComponentTarget(sub_component_type="decode", replicas=1)])
        r = await tp.call("Constrain", ConstrainStageRequest(context=ctx(1, 2, proposal=prop)))
        assert [(t.sub_component_type, t.type, t.replicas) for t in r.override.targets] == [("decode", OverrideType.AT_LEAST, 2)]
        await tp.close()
    finally:
        await server.stop(0)


async def test_registered_as_external_plugins_in_dynamos_orchestrator():
    from dynamo.planner.config.planner_config import ExternalPluginEntry
    from dynamo.planner.plugins.merge.types import ComponentKey

    server, port = await start_server({"propose": SlaPropose(warmup_s=0, startup_hold_s=0, up_ticks=1, kv_capacity_tokens=1000),
                                       "constrain": RatioLinkConstrain()})
    try:
        orch, _ = _orchestrator(allow_insecure_grpc=True)
        ep = f"grpc://127.0.0.1:{port}"
        entries = [
            ExternalPluginEntry(plugin_id="dx-propose", plugin_type="propose", priority=5, endpoint=ep,
                                needs=["observations.fpm", "observations.workers"]),
            ExternalPluginEntry(plugin_id="dx-constrain", plugin_type="constrain", priority=5, endpoint=ep,
                                needs=["observations.workers"]),
        ]
        accepted, failed = await orch.register_external_from_config(entries)
        assert accepted == 2, failed
        base = {ComponentKey(sub_component_type="prefill"): 1, ComponentKey(sub_component_type="decode"): 3}
        out = await orch.tick(ctx(1, 3, kv_tokens=950), base)
        assert out.execute_action == "apply"
        assert {t.sub_component_type: t.replicas for t in out.final_proposal.targets} == {"prefill": 2, "decode": 4}
        await orch.shutdown()
    finally:
        await server.stop(0)


def test_module_entry_point_serves_configs_planner_yaml(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "planner.grpc_server", "--listen", "127.0.0.1:0", "--config",
                          str(ROOT / "configs/planner.yaml")], cwd=ROOT, env=planner_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if line.startswith("DYNAMO_EXT_PLANNER_PLUGINS_READY") or (not line and p.poll() is not None):
                break
        assert line.startswith("DYNAMO_EXT_PLANNER_PLUGINS_READY port="), line + (p.stdout.read() if p.poll() is not None else "")
    finally:
        p.terminate()
        p.wait(10)
