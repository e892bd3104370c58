"""Asyncio adapter over core NATS (nats-py): publish bytes, subscribe by callback or async iterator.

Protocol
--------
* Core NATS, at-most-once: subjects are dot-separated, payloads are opaque ``bytes`` (the caller encodes,
  msgpack/JSON, never pickle). No JetStream here; a subscriber sees only what is published while it is
  subscribed and connected. Consumers that need completeness detect gaps themselves (sequence numbers
  in the payload, as Dynamo's KV-event envelope does).
* ``EventBus.connect(url)`` retries the first connection for at most ``connect_timeout`` seconds, then
  raises :class:`NatsUnavailable`. TLS and the token come from ``options`` (keyword arguments of
  ``nats.connect``), by default from the ``NATS_TLS_*`` / ``NATS_AUTH_TOKEN`` variables Dynamo's runtime
  reads (``env.nats_options``); a refused token or certificate raises :class:`NatsUnavailable` at its
  first refusal (no retries). Afterwards nats-py reconnects forever (``reconnect_wait`` between
  tries) and re-establishes subscriptions; nats-py buffers what this client publishes while it is
  reconnecting (``pending_size``).
* ``subscribe(subject, callback)`` calls ``await callback(msg)`` (or a plain function) per message;
  ``subscribe(subject)`` without callback returns a :class:`Subscription` that is an async iterator of
  :class:`Message`. ``close()`` drains nothing: pending outbound data is flushed, subscriptions end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSub

from .env import nats_options
from .etcd import DiscoveryError

log = logging.getLogger(__name__)


class NatsUnavailable(DiscoveryError):
    """NATS did not accept a connection within the bounded retry window."""


@dataclass(frozen=True, slots=True)
class Message:
    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None


MessageCallback = Callable[[Message], Awaitable[None] | None]


def _msg(m: Msg) -> Message:
    return Message(m.subject, bytes(m.data), m.reply or "", dict(m.headers) if m.headers else None)


def _refusal(e: BaseException) -> bool:
    """An authorization or certificate failure (not an outage)."""
    text = str(e).lower()
    return isinstance(e, ssl.SSLError) or "authorization" in text or "certificate" in text


class Subscription:
    """One subscription; iterate it (when created without callback) and/or ``await unsubscribe()``."""

    def __init__(self, sub: _NatsSub) -> None:
        self._sub = sub
        self.subject = sub.subject

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        async for m in self._sub.messages:
            yield _msg(m)

    async def next(self, timeout: float) -> Message:
        return _msg(await self._sub.next_msg(timeout=timeout))

    async def unsubscribe(self) -> None:
        await self._sub.unsubscribe()


class EventBus:
    def __init__(self, nc: Client, url: str) -> None:
        self._nc, self.url = nc, url
        self.reconnects = 0

    @classmethod
    async def connect(cls, url: str, *, name: str | None = None, connect_timeout: float = 10.0,
                      reconnect_wait: float = 0.25, options: dict[str, Any] | None = None) -> EventBus:
        bus: EventBus | None = None
        extra = nats_options() if options is None else dict(options)
        refused: list[BaseException] = []
        refusal = asyncio.Event()

        async def reconnected() -> None:
            if bus is not None:
                bus.reconnects += 1
            log.info("nats %s: reconnected", url)

        async def disconnected() -> None:
            log.warning("nats %s: disconnected; reconnecting", url)

        async def error(e: Exception) -> None:
            if bus is None and _refusal(e):  # the first connection: retrying cannot fix credentials
                refused.append(e)
                refusal.set()
            log.debug("nats %s: %s", url, e)

        # nats-py retries the first connection itself: bound it by a number of attempts, then lift the
        # bound so that later outages are retried forever.
        attempts = max(1, math.ceil(connect_timeout / reconnect_wait))
        connecting = asyncio.ensure_future(nats.connect(
            url, name=name, connect_timeout=max(1, int(min(2.0, connect_timeout))),
            allow_reconnect=True, max_reconnect_attempts=attempts,
            reconnect_time_wait=reconnect_wait,  # type: ignore[arg-type]
            reconnected_cb=reconnected, disconnected_cb=disconnected, error_cb=error, **extra,
        ))  # fmt: skip
        refused_wait = asyncio.ensure_future(refusal.wait())
        try:
            await asyncio.wait({connecting, refused_wait}, timeout=connect_timeout + 2.0,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            refused_wait.cancel()
        try:
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                if refused:
                    raise NatsUnavailable(f"nats {url}: refused our credentials ({refused[0]!r})")
                raise NatsUnavailable(f"nats {url}: unreachable for {connect_timeout:.1f}s")
            nc = connecting.result()
        except (OSError, TimeoutError, nats.errors.Error) as e:
            if refused or _refusal(e):
                raise NatsUnavailable(f"nats {url}: refused our credentials ({(refused or [e])[0]!r})") from e
            raise NatsUnavailable(f"nats {url}: unreachable for {connect_timeout:.1f}s ({e!r})") from e
        nc.options["max_reconnect_attempts"] = -1
        bus = cls(nc, url)
        return bus

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def publish(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"payload for {subject!r} must be bytes, got {type(data).__name__}")
        await self._nc.publish(subject, bytes(data), headers=headers)

    async def flush(self, timeout: float = 2.0) -> None:
        await self._nc.flush(timeout=timeout)  # type: ignore[arg-type]

    async def subscribe(self, subject: str, callback: MessageCallback | None = None, *,
                        queue: str = "") -> Subscription:
        cb: Callable[[Msg], Awaitable[None]] | None = None
        if callback is not None:
            user_cb = callback

            async def cb(m: Msg) -> None:
                try:
                    res: Any = user_cb(_msg(m))
                    if inspect.isawaitable(res):
                        await res
                except Exception:  # noqa: BLE001 - keep the subscription alive
                    log.exception("nats subscriber on %r failed", subject)

        sub = await self._nc.subscribe(subject, queue=queue, cb=cb)
        await self._nc.flush()  # the server knows the interest before we return
        return Subscription(sub)

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> EventBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
