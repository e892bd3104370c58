"""Serve our plugins out of process over Dynamo's gRPC plugin transport.

Protocol: ``dynamo/planner/plugins/proto/v1/plugin.proto`` services ``ProposePlugin.Propose``,
``ConstrainPlugin.Constrain`` (also ``PredictPlugin`` / ``ReconcilePlugin`` if an instance has
those methods). Dynamo's planner calls them through its ``GrpcTransport`` (`grpc://host:port`,
plaintext only in 1.6, needs ``plugin_registration.transport.allow_insecure_grpc: true``). Each
servicer converts the proto request to Dynamo's pydantic mirror (``_proto_bridge``), calls the same
adapter object that the in-process loader would build, and converts the answer back. One server may
host one plugin per stage; the planner addresses each as its own ``scheduling.external_plugins``
entry with the same endpoint.

    python -m planner.grpc_server --listen 0.0.0.0:50061 --config configs/planner.yaml

reads the ``in_process_plugins`` list of a planner config (module, class, kwargs) and serves those
plugins instead of loading them in process (their plugin_id / priority then go into
``scheduling.external_plugins``; see deploy/planner-kubernetes.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from pathlib import Path
from typing import Any

import grpc
import yaml
from dynamo.planner.plugins import types as T
from dynamo.planner.plugins._proto_bridge import proto_to_pydantic, pydantic_to_proto
from dynamo.planner.plugins.proto.v1 import plugin_pb2_grpc as pbg

log = logging.getLogger(__name__)

# stage -> (method, pydantic request type, servicer base, add_to_server)
_STAGES: dict[str, tuple[str, type, type, Any]] = {
    "predict": ("Predict", T.PredictStageRequest, pbg.PredictPluginServicer, pbg.add_PredictPluginServicer_to_server),
    "propose": ("Propose", T.ProposeStageRequest, pbg.ProposePluginServicer, pbg.add_ProposePluginServicer_to_server),
    "reconcile": ("Reconcile", T.ReconcileStageRequest, pbg.ReconcilePluginServicer, pbg.add_ReconcilePluginServicer_to_server),
    "constrain": ("Constrain", T.ConstrainStageRequest, pbg.ConstrainPluginServicer, pbg.add_ConstrainPluginServicer_to_server),
}


def _servicer(stage: str, instance: Any) -> Any:
    method, req_cls, base, _ = _STAGES[stage]
    impl = getattr(instance, method)

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            resp = impl(proto_to_pydantic(request, req_cls))
            if asyncio.iscoroutine(resp):
                resp = await resp
            return pydantic_to_proto(resp)
        except Exception as e:  # noqa: BLE001 - reported to the planner as a plugin failure
            log.exception("dynamo_ext plugin %s.%s failed", type(instance).__name__, method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return type(f"{type(instance).__name__}{method}Servicer", (base,), {method: handler})()


async def start_server(plugins: dict[str, Any], listen: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server hosting `plugins` ({stage: instance}); returns (server, bound port)."""
    server = grpc.aio.server()
    for stage, inst in plugins.items():
        if stage not in _STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGES)}")
        _STAGES[stage][3](_servicer(stage, inst), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot bind {listen}")
    await server.start()
    return server, port


def plugins_from_config(path: Path) -> dict[str, Any]:
    """Build {stage: instance} from the in_process_plugins list of a planner config file."""
    raw = yaml.safe_load(Path(path).read_text())
    specs = raw.get("plugin_registration", {}).get("in_process_plugins", [])
    out: dict[str, Any] = {}
    for s in specs:
        if s["plugin_type"] in out:
            raise ValueError(f"two {s['plugin_type']} plugins in {path}; one server hosts one per stage")
        cls = getattr(importlib.import_module(s["module"]), s["class"])
        out[s["plugin_type"]] = cls(**s.get("kwargs", {}))
    return out


async def _serve(listen: str, config: Path) -> None:
    server, port = await start_server(plugins_from_config(config), listen)
    log.info("dynamo_ext planner plugins serving on %s (port %d)", listen, port)
    print(f"DYNAMO_EXT_PLANNER_PLUGINS_READY port={port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m planner.grpc_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:50061", help="host:port (default %(default)s)")
    ap.add_argument("--config", type=Path, required=True, help="planner config with plugin_registration.in_process_plugins")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_serve(a.listen, a.config))


if __name__ == "__main__":
    main()
