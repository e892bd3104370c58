"""EventBus over a real nats-server: publish/subscribe by callback and iterator, reconnect, bounded connect."""

from __future__ import annotations

import asyncio
import time

import pytest

from dynamo_ext.discovery.nats import EventBus, Message, NatsUnavailable
from fixtures.servers import free_port


async def test_publish_subscribe_callback_and_iterator(shared_nats, ns):
    got: list[Message] = []
    done = asyncio.Event()

    async def cb(m: Message) -> None:
        got.append(m)
        if len(got) == 3:
            done.set()

    async with await EventBus.connect(shared_nats.url) as a, await EventBus.connect(shared_nats.url) as b:
        await b.subscribe(f"{ns}.kv.*", cb)
        it = await b.subscribe(f"{ns}.load")
        await b.flush()  # the server knows b's interest before a publishes (SUB is sent asynchronously)
        for i in range(3):
            await a.publish(f"{ns}.kv.w{i}", b"\x00payload%d" % i)
        await a.publish(f"{ns}.load", b"q=1", headers={"worker": "7"})
        await a.flush()
        await asyncio.wait_for(done.wait(), 5)
        assert [(m.subject, m.data) for m in got] == [(f"{ns}.kv.w{i}", b"\x00payload%d" % i) for i in range(3)]
        m = await it.next(timeout=5)
        assert (m.subject, m.data, m.headers) == (f"{ns}.load", b"q=1", {"worker": "7"})
        await a.publish(f"{ns}.load", b"second")
        async for m in it:  # the iterator form
            assert m.data == b"second"
            break
        await it.unsubscribe()
        with pytest.raises(TypeError):
            await a.publish("x", "str")  # type: ignore[arg-type]


async def test_iterator_receives_after_publish(shared_nats, ns):
    async with await EventBus.connect(shared_nats.url) as bus:
        sub = await bus.subscribe(f"{ns}.it")

        async def consume() -> list[bytes]:
            out = []
            async for m in sub:
                out.append(m.data)
                if len(out) == 5:
                    return out
            return out

        task = asyncio.create_task(consume())
        for i in range(5):
            await bus.publish(f"{ns}.it", b"%d" % i)
        assert await asyncio.wait_for(task, 5) == [b"%d" % i for i in range(5)]


async def test_reconnects_after_nats_restart(nats_server, ns):
    async with await EventBus.connect(nats_server.url) as pub, await EventBus.connect(nats_server.url) as sub_bus:
        sub = await sub_bus.subscribe(f"{ns}.x")
        await asyncio.to_thread(nats_server.restart)
        deadline = time.monotonic() + 10
        while not (pub.connected and sub_bus.connected and sub_bus.reconnects >= 1 and pub.reconnects >= 1):
            assert time.monotonic() < deadline, "no reconnect within 10 s"
            await asyncio.sleep(0.05)
        await sub_bus.flush()  # subscription re-sent before we publish
        await pub.publish(f"{ns}.x", b"after-restart")
        await pub.flush()
        assert (await sub.next(timeout=5)).data == b"after-restart"


async def test_connect_is_bounded():
    t0 = time.monotonic()
    with pytest.raises(NatsUnavailable):
        await EventBus.connect(f"nats://127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert time.monotonic() - t0 < 5
