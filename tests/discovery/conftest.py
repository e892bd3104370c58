"""Fixtures for the discovery tests: a sample WorkerRecord factory and a raw etcd3aio client
(playing "another process", e.g. the Dynamo runtime that owns an external lease)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlparse

import pytest
from etcd3aio import Etcd3Client

from dynamo_ext.discovery.records import PoolDescriptor, WorkerRecord


@pytest.fixture
def ns() -> str:
    """A namespace unique to the test, so tests can share one etcd."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_record(ns: str) -> Callable[..., WorkerRecord]:
    def make(instance_id: int = 1, role: str = "decode", component: str = "backend", **kw) -> WorkerRecord:
        fields = dict(
            namespace=ns, component=component, role=role, instance_id=instance_id, model="tiny",
            host="127.0.0.1", pid=1234, started_at=time.time(), agent_name=f"agent-{instance_id}",
            transports=b"\x00\x01blob", topology={"host_id": "h1", "gpus": []},
            kv_layout={"layers": 2, "block_size": 16},
            pools=[PoolDescriptor(kind="host", addr=4096, nbytes=1 << 20, device_id=0)],
        )
        fields.update(kw)
        return WorkerRecord(**fields)

    return make


async def raw_client(url: str) -> Etcd3Client:
    u = urlparse(url)
    c = Etcd3Client([f"{u.hostname}:{u.port}"])
    await c.connect()
    return c


@pytest.fixture
async def other_client(shared_etcd) -> AsyncIterator[Etcd3Client]:
    c = await raw_client(shared_etcd.url)
    yield c
    await c.close()
