"""``dynamo-ext deploy render``: DynamoGraphDeployments that Dynamo 1.6's operator accepts, running the commands
``dynamo-ext serve`` runs.

Checked against: the v1beta1 ``spec`` / ``spec.components[]`` levels of the DGD CRD (tests/data/
dgd_v1beta1_schema.json, ``jsonschema``), the ai-dynamo 1.6.1 wheel's own DGD example
(dynamo/profiler/templates/dgd/vllm/disagg.yaml: same apiVersion/kind and component conventions) and its
pydantic DGD model (dynamo.profiler.utils.config.Config); the committed renders under deploy/k8s/base must be
what scripts/render_k8s.sh renders now; the overlays must build with kustomize (when kubectl is installed)."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import jsonschema
import pytest
import yaml

from dynamo_ext.cli import main
from dynamo_ext.launch.commands import load_checked
from dynamo_ext.launch.deploy import CONFIG_DIR, MODEL_LINK, DeployError, render
from dynamo_ext.launch.plan import plan_processes

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests/data/dgd_v1beta1_schema.json").read_text())
K8S = ROOT / "deploy/k8s"
CONFIGS = {"agg": ("graphs/agg.py", "agg.yaml"), "disagg": ("graphs/disagg.py", "disagg.yaml"),
           "disagg-planner": ("graphs/disagg.py", "disagg_planner.yaml")}  # fmt: skip
IMAGE = "registry.example.com/dynamo-ext:0.1.0"


def wheel_file(rel: str) -> Path:
    spec = importlib.util.find_spec("dynamo")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / rel


def rendered(key: str, tmp: Path | None = None, **kw) -> dict[str, dict]:
    graph_spec, cfg_name = CONFIGS[key]
    cfg = K8S / "configs" / cfg_name
    graph, config = load_checked(graph_spec, str(cfg))
    docs = render(graph, config, cfg.read_text(), image=kw.pop("image", IMAGE), name=kw.pop("name", f"dx-{key}"), **kw)
    return {d["kind"]: d for _f, d in docs}


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def containers(component: dict, key: str = "containers") -> dict[str, dict]:
    return {c["name"]: c for c in component["podTemplate"]["spec"][key]}


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_render_validates_against_the_v1beta1_crd_schema(key):
    docs = rendered(key)
    dgd = docs["DynamoGraphDeployment"]
    jsonschema.validate(dgd, SCHEMA)
    names = [c["name"] for c in dgd["spec"]["components"]]
    assert len({n.lower() for n in names}) == len(names)  # the CRD's list-map key and its CEL rule
    assert SCHEMA["x-source"]["commit"] and SCHEMA["x-source"]["version"] == "v1beta1"


def test_the_schema_refuses_what_the_crd_refuses():
    dgd = rendered("disagg")["DynamoGraphDeployment"]
    for mutate, what in [
        (lambda d: d["spec"]["components"][0].update(type="router"), "'router' is not one of"),
        (lambda d: d["spec"]["components"][0].update(replicas=-1), "-1 is less than the minimum"),
        (lambda d: d["spec"]["components"][0].update(extraPodSpec={}), "Additional properties"),  # v1alpha1 field
        (lambda d: d["spec"]["components"][0].pop("name"), "'name' is a required property"),
        (lambda d: d["spec"]["components"][0].update(name="bad_name"), "does not match"),
        (lambda d: d["spec"].update(services={}), "Additional properties"),  # v1alpha1's spec.services
        (lambda d: d.update(apiVersion="nvidia.com/v1alpha1"), "'nvidia.com/v1beta1' was expected"),
        (lambda d: d["spec"]["components"][0].update(runtimeVersionOverride="v1.6"), "does not match"),
    ]:
        bad = copy.deepcopy(dgd)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError, match=what.replace("(", r"\(")):
            jsonschema.validate(bad, SCHEMA)


def test_upstream_1_6_1_example_fits_the_same_schema_and_conventions():
    """The wheel's own vllm/disagg.yaml passes the schema, and our components follow its conventions."""
    example = yaml.safe_load(wheel_file("profiler/templates/dgd/vllm/disagg.yaml").read_text())
    jsonschema.validate(example, SCHEMA)
    dgd = rendered("disagg")["DynamoGraphDeployment"]
    assert (dgd["apiVersion"], dgd["kind"]) == (example["apiVersion"], example["kind"])
    assert set(dgd["spec"]) == set(example["spec"]) == {"components"}
    ex_types = {c["type"] for c in example["spec"]["components"]}
    for comp in dgd["spec"]["components"]:
        assert {"name", "type", "replicas", "podTemplate"} <= set(comp)
        assert isinstance(comp["replicas"], int)
        main_c = containers(comp)["main"]  # the operator merges its defaults into the container named main
        assert main_c["command"][0] == "python3" and all(isinstance(a, str) for a in main_c["command"] + main_c["args"])
        assert main_c["image"] == IMAGE
    assert {"frontend", "prefill", "decode"} <= ex_types & {c["type"] for c in dgd["spec"]["components"]}
    ex_gpu = containers(example["spec"]["components"][1])["main"]["resources"]["limits"]["nvidia.com/gpu"]
    assert isinstance(ex_gpu, str)  # quantities as strings, as ours (test_gpus_follow_tensor_parallel)


def test_the_wheels_dgd_model_accepts_the_render():
    # dynamo.profiler imports dynamo.planner, which imports NVIDIA's aisimulate_core: the planner tests' stand-in
    # (tests/planner/planner_support.py) when the real package is absent
    sys.path.insert(0, str(ROOT / "tests/planner"))
    import planner_support  # noqa: F401

    from dynamo.profiler.utils.config import Config  # ai-dynamo 1.6.1: the profiler's DGD generator's types

    for key in CONFIGS:
        dgd = rendered(key)["DynamoGraphDeployment"]
        model = Config.model_validate(dgd)
        assert [c.component_type for c in model.spec.components] == [c["type"] for c in dgd["spec"]["components"]]
        assert all(c.runtimeVersionOverride == "1.6.1" for c in model.spec.components)


def test_components_run_the_commands_serve_runs():
    """One product: each pod's command is what plan_processes gives dynamo-ext serve for the same component
    (python3, the mounted config and the model link; the metrics port serve picks is free, 0 in a pod)."""
    for key in ("agg", "disagg"):
        graph_spec, cfg_name = CONFIGS[key]
        graph, config = load_checked(graph_spec, str(K8S / "configs" / cfg_name))
        dgd = rendered(key)["DynamoGraphDeployment"]
        grace = dgd["spec"]["components"][0]["podTemplate"]["spec"]["terminationGracePeriodSeconds"]
        specs = plan_processes(graph, config, config_path=Path(f"{CONFIG_DIR}/dynamo.yaml"), model_dir=Path(MODEL_LINK),
                               port=config.frontend.http_port, env={}, python="python3", stop_timeout=grace)

        def norm(argv: list[str]) -> list[str]:  # serve's free metrics port / replica index (logs only): 0 in a pod
            argv = list(argv)
            for flag in ("--metrics-port", "--index"):
                if flag in argv:
                    argv[argv.index(flag) + 1] = "N"
            return argv

        by_comp = {s.component: norm(s.argv) for s in specs}
        for comp in dgd["spec"]["components"]:
            c = containers(comp)["main"]
            assert norm(c["command"] + c["args"]) == by_comp[comp["name"]], comp["name"]
        assert set(by_comp) == {c["name"] for c in dgd["spec"]["components"]}
        counts = {s.component: 0 for s in specs}
        for s in specs:
            counts[s.component] += 1
        assert counts == {c["name"]: c["replicas"] for c in dgd["spec"]["components"]}


def test_pods_config_ports_probes_and_monitoring():
    docs = rendered("disagg", namespace="llm")
    cm, dgd, pm = docs["ConfigMap"], docs["DynamoGraphDeployment"], docs["PodMonitor"]
    assert cm["data"]["dynamo.yaml"] == (K8S / "configs/disagg.yaml").read_text()
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"llm"}
    types = {c["name"]: c["type"] for c in dgd["spec"]["components"]}
    assert types == {"prefill": "prefill", "decode": "decode", "router": "worker", "frontend": "frontend"}
    for comp in dgd["spec"]["components"]:
        pod = comp["podTemplate"]["spec"]
        main_c = containers(comp)["main"]
        env = {e["name"]: e.get("value") for e in main_c["env"]}
        port = main_c["ports"][0]
        if comp["type"] == "frontend":
            assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
            assert main_c["args"][main_c["args"].index("--http-host") + 1] == "0.0.0.0"
            assert "DYN_SYSTEM_PORT" not in env and env["DYN_HTTP_BODY_LIMIT_MB"] == "8"
        else:
            assert port == {"name": "system", "containerPort": 9090, "protocol": "TCP"}
            assert env["DYN_SYSTEM_PORT"] == "9090" and env["DYN_SYSTEM_HOST"] == "0.0.0.0"
        assert main_c["livenessProbe"]["httpGet"] == {"path": "/live", "port": port["name"]}
        assert main_c["readinessProbe"]["httpGet"] == {"path": "/health", "port": port["name"]}
        # no loopback listener in a pod; discovery from the config; etcd discovery, not Kubernetes'
        assert env["DYN_TCP_RPC_HOST"] == "$(POD_IP)" and "UCX_NET_DEVICES" not in env
        assert main_c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["ETCD_ENDPOINTS"] == "http://dynamo-platform-etcd.dynamo-system.svc.cluster.local:2379"
        assert env["DYN_DISCOVERY_BACKEND"] == "etcd" and env["DYN_NAMESPACE"] == "dynamo-ext-disagg"
        mounts = {m["name"]: m["mountPath"] for m in main_c["volumeMounts"]}
        assert mounts == {"config": CONFIG_DIR, "model": "/var/lib/dynamo-ext"}
        init = containers(comp, "initContainers")["model"]
        assert init["command"] == ["python3", "-m", "dynamo_ext.launch.prepare_model"] and MODEL_LINK in init["args"]
        assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == cm["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "resources" not in main_c  # model.device: cpu
        assert comp["podTemplate"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "dx-disagg"
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "dx-disagg"
    assert {(e["port"], e["path"]) for e in pm["spec"]["podMetricsEndpoints"]} == {("http", "/metrics"),
                                                                                 ("system", "/metrics")}


def test_planner_component_and_its_config():
    docs = rendered("disagg-planner", planner_image="registry.example.com/dynamo-ext-planner:0.1.0")
    dgd, cm = docs["DynamoGraphDeployment"], docs["ConfigMap"]
    planner = next(c for c in dgd["spec"]["components"] if c["type"] == "planner")
    main_c = containers(planner)["main"]
    assert main_c["image"] == "registry.example.com/dynamo-ext-planner:0.1.0"
    assert "initContainers" not in planner["podTemplate"]["spec"]  # no model in the planner pod
    assert [v["name"] for v in planner["podTemplate"]["spec"]["volumes"]] == ["config"]
    assert {containers(c)["main"]["image"] for c in dgd["spec"]["components"] if c is not planner} == {IMAGE}
    assert main_c["command"] + main_c["args"] == ["python3", "-m", "dynamo.planner", "--config",
                                                  f"{CONFIG_DIR}/planner.yaml"]  # fmt: skip
    assert {e["name"]: e.get("value") for e in main_c["env"]}["DYN_NAMESPACE"] == "dynamo-ext-disagg-planner"
    pcfg = yaml.safe_load(cm["data"]["planner.yaml"])
    assert pcfg["environment"] == "kubernetes" and pcfg["mode"] == "disagg"
    plugins = {p["class"]: p["kwargs"] for p in pcfg["plugin_registration"]["in_process_plugins"]}
    assert plugins["SlaPropose"]["metrics_urls"] == ["http://dx-disagg-planner-frontend:8000/metrics"]
    assert (plugins["RatioLinkConstrain"]["max_decode"], plugins["SlaPropose"]["ttft_sla_s"]) == (8, 0.5)
    # Dynamo's planner finds the components it scales by type
    assert {c["type"] for c in dgd["spec"]["components"]} >= {"prefill", "decode"}


def test_gpus_follow_tensor_parallel(tmp_path):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text((K8S / "configs/disagg.yaml").read_text().replace("dtype: float32}", "dtype: bfloat16, device: cuda}"))
    graph, config = load_checked("graphs/disagg.py", str(cfg))
    docs = {d["kind"]: d for _f, d in render(graph, config, cfg.read_text(), image=IMAGE, name="gpu")}
    gpus = {c["name"]: containers(c)["main"].get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            for c in docs["DynamoGraphDeployment"]["spec"]["components"]}
    assert gpus == {"prefill": "1", "decode": "1", "router": None, "frontend": None}
    jsonschema.validate(docs["DynamoGraphDeployment"], SCHEMA)


def test_refusals_name_the_key(tmp_path):
    # the local config: loopback etcd / NATS / frontend cannot be shared by pods
    code, out, err = cli("deploy", "render", "graphs/disagg.py", "-f", "configs/disagg.yaml", "--image", IMAGE)
    assert code == 2 and out == ""
    for key in ("discovery.etcd.endpoints[0]: http://127.0.0.1:2379 is a loopback address",
                "discovery.nats.url: nats://127.0.0.1:4222 is a loopback address", "frontend.http_host: '127.0.0.1'"):
        assert key in err, err
    base = (K8S / "configs/disagg.yaml").read_text()
    cases = {
        "workers.prefill.gpu_ids": base.replace("dtype: float32}", "dtype: float32, device: cuda}").replace(
            "prefill: {count: 1}", "prefill: {count: 1, gpu_ids: [0]}"),
        "supervision: applies to dynamo-ext serve": base + "supervision: {restart: true}\n",
        "kv_transfer.backend: 'fallback'": base.replace("backend: nixl", "backend: fallback"),
        "kv_transfer.transport: 'pcie' forces a same-host path": base.replace("transport: auto", "transport: pcie"),
    }
    for expected, text in cases.items():
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        code, out, err = cli("deploy", "render", "graphs/disagg.py", "-f", str(cfg), "--image", IMAGE)
        assert code == 2 and expected in err, (expected, err)
    planner_agg = tmp_path / "pa.yaml"
    planner_agg.write_text((K8S / "configs/agg.yaml").read_text() + "planner: {enabled: true}\n")
    code, _out, err = cli("deploy", "render", "graphs/agg.py", "-f", str(planner_agg), "--image", IMAGE)
    assert code == 2 and "planner.enabled: graph 'agg' has no decode component" in err
    for image, expected in (("dynamo-ext", "no tag"), ("dynamo-ext:latest", "'latest' is not a pinned tag")):
        with pytest.raises(DeployError, match=expected):
            rendered("agg", image=image)
    rendered("agg", image="registry.example.com:5000/dynamo-ext@sha256:" + "0" * 64)  # a digest is pinned
    with pytest.raises(DeployError, match="--name 'Bad_Name'"):
        rendered("agg", name="Bad_Name")
    with pytest.raises(DeployError, match="--planner-image: planner.enabled is false"):
        rendered("disagg", planner_image="dynamo-ext-planner:0.1.0")
    with pytest.raises(DeployError, match="--planner-image dynamo-ext-planner: no tag"):
        rendered("disagg-planner", planner_image="dynamo-ext-planner")


def test_stdout_and_output_dir(tmp_path):
    code, out, err = cli("deploy", "render", "graphs/agg.py", "-f", str(K8S / "configs/agg.yaml"), "--image", IMAGE,
                         "--namespace", "ns1")
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "DynamoGraphDeployment", "PodMonitor"]
    assert docs[1]["metadata"]["name"] == "dynamo-ext-agg" and docs[1]["metadata"]["namespace"] == "ns1"
    code, _out, err = cli("deploy", "render", "graphs/agg.py", "-f", str(K8S / "configs/agg.yaml"), "--image", IMAGE,
                          "-o", str(tmp_path / "out"))
    assert code == 0, err
    kust = yaml.safe_load((tmp_path / "out/kustomization.yaml").read_text())
    assert kust["resources"] == ["configmap.yaml", "dynamographdeployment.yaml", "podmonitor.yaml"]
    written = yaml.safe_load((tmp_path / "out/dynamographdeployment.yaml").read_text())
    del docs[1]["metadata"]["namespace"]  # the second render had no --namespace
    assert written == docs[1]


def test_committed_renders_are_current(tmp_path):
    """deploy/k8s/base is what scripts/render_k8s.sh renders now (re-run it after changing a config or the renderer)."""
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(ROOT / "scripts/render_k8s.sh"), str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    committed = sorted(p.relative_to(K8S / "base") for p in (K8S / "base").rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == fresh
    stale = [str(p) for p in fresh if (tmp_path / p).read_text() != (K8S / "base" / p).read_text()]
    assert stale == [], f"stale renders (run scripts/render_k8s.sh): {stale}"
    for p in (K8S / "base").rglob("dynamographdeployment.yaml"):
        jsonschema.validate(yaml.safe_load(p.read_text()), SCHEMA)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
def test_kustomize_builds_the_bases_and_the_overlay():
    for d in [*(K8S / "base").iterdir(), K8S / "overlays/example"]:
        out = subprocess.run(["kubectl", "kustomize", str(d)], check=True, capture_output=True, text=True).stdout
        docs = list(yaml.safe_load_all(out))
        assert {x["kind"] for x in docs} == {"ConfigMap", "DynamoGraphDeployment", "PodMonitor"}, d
    overlay = {x["kind"]: x for x in yaml.safe_load_all(out)}
    dgd = overlay["DynamoGraphDeployment"]
    assert {x["metadata"]["namespace"] for x in overlay.values()} == {"dynamo-ext"}
    images = {c["image"] for comp in dgd["spec"]["components"] for key in ("containers", "initContainers")
              for c in comp["podTemplate"]["spec"][key]}  # fmt: skip
    assert images == {"registry.example.com/ml/dynamo-ext:0.1.0"}
    jsonschema.validate(dgd, SCHEMA)


def test_extract_script_reproduces_the_committed_schema(tmp_path):
    """scripts/extract_dgd_schema.py on a CRD whose v1beta1 levels are the committed ones and whose deeper
    subtrees are full objects again gives the committed schema back (x-source apart)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import extract_dgd_schema as ex
    finally:
        sys.path.pop(0)

    def inflate(s: dict) -> dict:
        if s.get("x-kubernetes-preserve-unknown-fields") and s.get("type") == "object":
            out = {"type": "object", "description": "deep", "properties": {"spec": {"type": "object", "properties": {
                "containers": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "string"}}}}}}}}
            if s.get("required"):
                out["required"] = s["required"]
            return out
        if s.get("additionalProperties") is False and "properties" not in s:
            return {"type": "object"}
        out = {k: v for k, v in s.items() if k != "additionalProperties" or v is not False}
        if "properties" in s:
            out["properties"] = {k: inflate(v) for k, v in s["properties"].items()}
        if "items" in s:
            out["items"] = inflate(s["items"])
        return out

    spec = inflate(SCHEMA["properties"]["spec"])
    crd = {"kind": "CustomResourceDefinition", "spec": {"group": "nvidia.com", "names": {"kind": "DynamoGraphDeployment"},
           "versions": [{"name": "v1alpha1", "served": True, "schema": {"openAPIV3Schema": {"type": "object"}}},
                        {"name": "v1beta1", "served": True, "schema": {"openAPIV3Schema": {
                            "type": "object", "properties": {"spec": spec, "status": {"type": "object"}}}}}]}}  # fmt: skip
    f = tmp_path / "crd.yaml"
    f.write_text(yaml.safe_dump(crd))
    ex.main([str(f), "--commit", SCHEMA["x-source"]["commit"], "-o", str(tmp_path / "out.json")])
    got = json.loads((tmp_path / "out.json").read_text())
    got.pop("x-source")
    want = dict(SCHEMA)
    want.pop("x-source")
    assert got == want


def test_prepare_model_links_the_config_model_dir(tmp_path, monkeypatch, capsys):
    """The pods' init container: the same ensure_model_dir as serve, behind one fixed path."""
    from dynamo_ext.launch.prepare_model import main as prepare

    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text("model: {preset: tiny, num_layers: 1}\nworkers: {agg: {count: 1}}\n")
    link = tmp_path / "var/model"
    assert prepare(["--config", str(cfg), "--link", str(link)]) == 0
    target = Path(capsys.readouterr().out.strip())
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.parent == tmp_path / "cache/models" and (link / "config.json").is_file()
    assert prepare(["--config", str(cfg), "--link", str(link)]) == 0  # a restarted pod: reused, linked again
    assert "(cached)" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert prepare(["--config", str(cfg), "--link", str(tmp_path / "plain")]) == 2
    assert "exists and is not a symbolic link" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: nope}\nworkers: {agg: {count: 1}}\n")
    assert prepare(["--config", str(bad), "--link", str(link)]) == 2
    assert "model.preset" in capsys.readouterr().err


def _system_port() -> int:
    """A free port Dynamo 1.6.1 accepts as DYN_SYSTEM_PORT (it reads a 16-bit signed integer: <= 32767)."""
    import socket

    for port in range(29000, 32700, 37):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below 32768")


def test_a_worker_answers_the_rendered_probes_on_its_system_port(tmp_path, etcd_server, nats_server):
    """The pod's probes (paths and port of the render) against a real worker started with the pod's DYN_SYSTEM_*
    variables: Dynamo's system server serves /live, /health and /metrics in our worker process."""
    import os
    import signal
    import time
    import urllib.request

    from dynamo_ext.launch.modeldir import ensure_model_dir
    from dynamo_ext.launch.plan import graph_env, worker_argv

    dgd = rendered("agg")["DynamoGraphDeployment"]
    comp = next(c for c in dgd["spec"]["components"] if c["name"] == "agg")
    main_c = containers(comp)["main"]
    pod_env = {e["name"]: e.get("value") for e in main_c["env"]}
    assert pod_env["DYN_SYSTEM_PORT"] == str(main_c["ports"][0]["containerPort"]) == "9090"
    probes = {k: main_c[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}

    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text("model: {preset: tiny}\nworkers: {agg: {count: 1}}\nrouter: {policy: dynamo-kv}\n"
                   f"discovery: {{etcd: {{endpoints: ['{etcd_server.url}']}}, nats: {{url: '{nats_server.url}'}}}}\n")
    graph, config = load_checked("graphs/agg.py", str(cfg))
    model_dir, _how = ensure_model_dir(config.model)
    port = _system_port()  # 9090 may be taken on a test machine; the paths are the render's
    env = {**os.environ, **graph_env(config, etcd_server.url, nats_server.url),
           "DYN_SYSTEM_PORT": str(port), "DYN_SYSTEM_HOST": "127.0.0.1"}
    argv = worker_argv("agg", python=sys.executable, config_path=cfg, model_dir=model_dir, index=0, metrics_port=0,
                       drain_s=2)
    log = tmp_path / "agg.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 120
        while b"DYNAMO_EXT_READY" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.2)
        for kind, path in probes.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                assert r.status == 200, (kind, path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert json.loads(r.read())["status"] == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # the PodMonitor's path
            assert b'dynamo_component="backend"' in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
