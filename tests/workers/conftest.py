"""Fixtures for worker tests: real etcd + NATS, a tiny model directory, worker and frontend processes.

    graph = Graph(etcd_url, nats_url, tmp_path, namespace)      writes dynamo.yaml from a dict
    w = graph.start("decode", extra_env={...})                   python -m dynamo_ext.workers ... (READY awaited)
    graph.wait_ready([w, ...]); w.instance_id; w.metrics_url; w.health()
    graph.frontend(router_mode="round-robin") -> base URL         python -m dynamo.frontend
    graph.call(endpoint, [requests], instance=None) -> [[chunks]] tests/workers/dyn_client.py
    graph.stop()                                                  SIGTERM all, then SIGKILL
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from fixtures.servers import EtcdServer, NatsServer, free_port, make_workdir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture(scope="module")
def servers():
    e = EtcdServer("etcd", make_workdir("dx-w-etcd-"))
    n = NatsServer("nats", make_workdir("dx-w-nats-"))
    e.start()
    n.start()
    yield e, n
    e.stop()
    n.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run([PY, "-m", "dynamo_ext.cli", "model", "init", "--preset", "tiny", str(d)], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    return d


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    out_path: Path
    err_path: Path
    instance_id: int = 0
    metrics_url: str = ""
    started: float = field(default_factory=time.monotonic)

    def ready_line(self) -> str | None:
        for line in self.out_path.read_text().splitlines():
            if line.startswith("DYNAMO_EXT_READY "):
                return line
        return None

    def health(self) -> dict[str, Any]:
        url = self.metrics_url.rsplit("/", 1)[0] + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        return "\n".join(line for line in self.err_path.read_text().splitlines() if "\x1b[" not in line)


class Graph:
    def __init__(self, etcd: str, nats: str, workdir: Path, model_dir: Path, namespace: str = "dxtest",
                 **cfg_over: Any) -> None:
        self.workdir = workdir
        self.model_dir = model_dir
        self.namespace = namespace
        self.env = {**os.environ, "ETCD_ENDPOINTS": etcd, "NATS_SERVER": nats, "DYN_TCP_RPC_HOST": "127.0.0.1",
                    "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_EVENT_PLANE": "nats", "HF_HUB_OFFLINE": "1",
                    "UCX_NET_DEVICES": "lo", "ETCD_LEASE_TTL": "10"}
        cfg: dict[str, Any] = {
            "model": {"name": "dx/tiny", "preset": "tiny", "block_size": 16, "dtype": "float32"},
            "kv_transfer": {"backend": "nixl", "timeout_ms": 2000},
            "workers": {"agg": {"count": 1, "num_kv_blocks": 1024}, "prefill": {"count": 1, "num_kv_blocks": 1024},
                        "decode": {"count": 2, "num_kv_blocks": 1024}},
            "router": {"policy": "round-robin", "disagg_min_prompt_tokens": 0},
            "discovery": {"namespace": namespace, "etcd": {"endpoints": [etcd], "lease_ttl_s": 10},
                          "nats": {"url": nats}},
        }
        for k, v in cfg_over.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        self.config = workdir / f"{namespace}.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.procs: list[Proc] = []

    def write_config(self, name: str, **over: Any) -> Path:
        """Another dynamo.yaml for this graph (same namespace), with top-level sections updated."""
        cfg = yaml.safe_load(self.config.read_text())
        for k, v in over.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        path = self.workdir / f"{self.namespace}-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(self, role: str, extra_env: dict[str, str] | None = None, wait: bool = True,
              config: Path | None = None, args: list[str] | None = None) -> Proc:
        i = sum(1 for p in self.procs if p.name.startswith(role))
        name = f"{role}{i}"
        out, err = self.workdir / f"{self.namespace}-{name}.out", self.workdir / f"{self.namespace}-{name}.err"
        popen = subprocess.Popen(
            [PY, "-m", "dynamo_ext.workers", "--role", role, "--config", str(config or self.config), "--model-dir",
             str(self.model_dir), "--index", str(i), *(args or [])],
            cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=open(out, "wb"), stderr=open(err, "wb"),
            start_new_session=True)
        p = Proc(name, popen, out, err)
        self.procs.append(p)
        if wait:
            self.wait_ready([p])
        return p

    def wait_ready(self, procs: list[Proc], timeout: float = 60.0) -> None:
        t_end = time.monotonic() + timeout
        for p in procs:
            while True:
                line = p.ready_line()
                if line:
                    kv = dict(part.split("=", 1) for part in line.split()[1:])
                    p.instance_id, p.metrics_url = int(kv["instance_id"]), kv["metrics"]
                    break
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.log()[-3000:]}")
                if time.monotonic() > t_end:
                    raise TimeoutError(f"{p.name} not ready:\n{p.log()[-3000:]}")
                time.sleep(0.1)

    def frontend(self, router_mode: str = "round-robin", model: str = "dx/tiny", timeout: float = 60.0) -> str:
        port = free_port()
        err = self.workdir / f"{self.namespace}-frontend.err"
        popen = subprocess.Popen(
            [PY, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port), "--router-mode",
             router_mode, "--event-plane", "nats", "--namespace", self.namespace],
            cwd=REPO, env=self.env, stdout=open(err, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(Proc("frontend", popen, err, err))
        base = f"http://127.0.0.1:{port}"
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
                    if model in r.read().decode():
                        return base
            except Exception:  # noqa: BLE001
                pass
            if popen.poll() is not None:
                raise RuntimeError(f"frontend exited: {err.read_text()[-3000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"frontend does not list {model}: {err.read_text()[-3000:]}")

    def call(self, endpoint: str, reqs: list[dict[str, Any]], instance: int | None = None,
             timeout: float = 60.0) -> list[list[dict[str, Any]]]:
        cmd = [PY, str(Path(__file__).parent / "dyn_client.py"), endpoint]
        if instance is not None:
            cmd += ["--instance", str(instance)]
        r = subprocess.run(cmd, input=json.dumps(reqs), capture_output=True, text=True, env=self.env,
                           timeout=timeout, cwd=REPO)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
        assert lines, f"client failed rc={r.returncode}: {r.stderr[-2000:]}"
        return json.loads(lines[-1])

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        t_end = time.monotonic() + 10
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, t_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()


HOOKS = Path(__file__).parent / "hooks"


def hooks_env(**values: str) -> dict[str, str]:
    """Environment that loads tests/workers/hooks/sitecustomize.py in a worker process (test-only fault
    injection, e.g. ``hooks_env(DXTEST_PULL_DELAY_S="1")``)."""
    path = os.pathsep.join([str(HOOKS), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"PYTHONPATH": path, **values}


def tokens_of(chunks: list[dict[str, Any]]) -> list[int]:
    return [t for c in chunks for t in c.get("token_ids", [])]
