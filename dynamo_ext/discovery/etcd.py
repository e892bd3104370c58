"""Asyncio adapter over etcd v3 (etcd3aio): leased keys that survive an etcd restart, gap-free watches.

Protocol
--------
* Keys are ``str`` (UTF-8), values are ``bytes``. Nothing here interprets values (``records.py`` does).
* ``EtcdStore.connect(url, credentials=None)`` opens one gRPC channel to ``http://host:port`` or
  ``https://host:port`` (comma-separated list of IP endpoints allowed; a host name must be the only
  endpoint) and checks it with a read, retrying with capped exponential backoff for at most
  ``connect_timeout`` seconds before raising :class:`EtcdUnavailable`. Every later call retries transient
  errors (UNAVAILABLE, deadline) the same way for at most ``op_timeout`` seconds.
* Credentials (``env.EtcdCredentials``; default: read from the ``ETCD_AUTH_*`` variables Dynamo's runtime
  reads, so a process configured for Dynamo is configured for this store too): ``https://`` needs TLS
  material (CA, client certificate and key, PEM); a username + password authenticates and sends the token
  with every call, and re-authenticates once when etcd answers "unauthenticated" (a token that expired, or
  was lost in an etcd restart). Refused credentials raise :class:`EtcdAuthError` at once (not retried).
* Leases. ``grant_lease(ttl)`` returns a :class:`Lease` kept alive by the store's single supervisor task
  (one keep-alive every ``ttl/3`` s). ``put(key, value, lease=...)`` takes a :class:`Lease`, an *external*
  lease id (``int``: for example the Dynamo runtime's own lease, ``endpoint.connection_id()``, so the
  record dies with the worker), or ``None`` (no lease, key persists).
* Ownership and repair. Every key put under a lease is *owned*: the store remembers (key, value, lease).
  The supervisor notices (a) a failed keep-alive followed by a successful one, or (b) a change of raft
  term (an etcd restart between two ticks). It then re-puts each owned key whose stored value or lease
  differs. If etcd answers a keep-alive with TTL 0 (lease revoked or expired), the store grants a new
  lease with the same TTL, ``Lease.id`` changes, and the lease's keys are re-put under it. An external
  lease is never kept alive nor re-granted: the supervisor polls its TTL each tick, and when it is gone
  (its owner is gone) the store forgets the keys put under it (logged).
* Watches. ``await watch_prefix(prefix)`` lists nothing, fixes the start revision *before returning*
  (current revision + 1, or ``start_revision``), and yields :class:`WatchEvent` in revision order.
  After a broken stream it resumes at ``last seen revision + 1``. When the history it needs is gone
  (compacted, or etcd came back with a smaller revision = data loss) it re-lists the prefix and emits
  the *difference* from what it had delivered as events with ``resync=True``: a consumer's state
  always converges; no change is lost silently.
* ``close()`` stops the supervisor and every watch (their iterators end) and closes the channel. It does
  not revoke leases: the keys live out their TTL unless the caller revokes first (``Lease.revoke()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)

from .env import EtcdCredentials, etcd_credentials

log = logging.getLogger(__name__)

T = TypeVar("T")
_PUT, _DELETE = 0, 1  # mvccpb.Event.EventType


class DiscoveryError(Exception):
    """Base class of this layer's errors."""


class EtcdUnavailable(DiscoveryError):
    """etcd did not answer within the bounded retry window."""


class EtcdAuthError(DiscoveryError):
    """etcd refused our credentials (wrong password, a user without permission): not retried."""


class LeaseNotFound(DiscoveryError):
    """An external lease id given to ``put`` does not exist (its owner is gone)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Listing:
    """A prefix read: the items and the store revision they were read at."""

    items: tuple[KeyValue, ...]
    revision: int

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for deletes
    revision: int
    resync: bool = False  # synthesised from a re-list (history was unavailable)


@dataclass(eq=False)
class Lease:
    """A lease granted by this store and kept alive by it. ``id`` changes if the lease had to be re-granted."""

    id: int
    ttl: int
    _store: EtcdStore = field(repr=False)
    regrants: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def revoke(self) -> None:
        """Stop keeping it alive and revoke it: its keys are deleted by etcd."""
        await self._store._revoke(self)


@dataclass(slots=True)
class _Owned:
    value: bytes
    lease: Lease | None  # ours
    external: int  # external lease id, 0 if ours


def _endpoints(url: str, tls: bool) -> tuple[list[str], str | None]:
    """``(host:port list, gRPC target override)``: IP endpoints round-robin over etcd3aio's ``ipv4:`` target;
    one host name resolves through gRPC's ``dns:///`` target (``ipv4:`` takes addresses only)."""
    out, names = [], []
    scheme = "https" if tls else "http"
    for part in url.split(","):
        part = part.strip()
        if "://" not in part:
            part = f"{scheme}://" + part
        u = urlparse(part)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ValueError(f"etcd url {part!r}: expected http://host:port or https://host:port")
        if (u.scheme == "https") != tls:
            need = ("TLS credentials (ETCD_AUTH_CA, ETCD_AUTH_CLIENT_CERT, ETCD_AUTH_CLIENT_KEY)" if not tls else
                    "an https:// URL (TLS credentials are set)")
            raise ValueError(f"etcd url {part!r} needs {need}")
        try:
            ipaddress.ip_address(u.hostname)
        except ValueError:
            names.append(u.hostname)
        out.append(f"{u.hostname}:{u.port}")
    if names:
        if len(out) > 1:
            raise ValueError(f"etcd url {url!r}: give one host name (resolving to every member) or IP addresses")
        return out, f"dns:///{out[0]}"
    return out, None


_TRANSIENT = (EtcdConnectionError, EtcdTransientError, TimeoutError)


_AUTH_DETAILS = ("user name", "permission denied", "authentication", "auth token", "root user")


def _auth_refusal(e: grpc.aio.AioRpcError) -> bool:
    return e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) and any(
        d in (e.details() or "") for d in _AUTH_DETAILS)


def _unauthenticated(e: BaseException) -> bool:
    if isinstance(e, EtcdUnauthenticatedError | EtcdAuthError):
        return True
    return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAUTHENTICATED


def _brief(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


class EtcdStore:
    def __init__(self, url: str, *, op_timeout: float = 5.0, max_backoff: float = 1.0,
                 credentials: EtcdCredentials | None = None) -> None:
        self.url = url
        self._op_timeout = op_timeout
        self._max_backoff = max_backoff
        self._creds = etcd_credentials() if credentials is None else credentials
        endpoints, target = _endpoints(url, self._creds.tls)
        tls_args: dict[str, bytes | None] = {}
        if self._creds.tls:
            tls_args = {"ca_cert": self._creds.ca, "cert_chain": self._creds.cert, "cert_key": self._creds.key}
        self._client = Etcd3Client(
            endpoints, watch_reconnect_backoff_seconds=0.1, watch_max_reconnect_backoff_seconds=max_backoff,
            **tls_args,
        )
        if target is not None:
            self._client._manager.target = target  # etcd3aio builds "ipv4:<list>", which takes addresses only
        # Bound gRPC's own channel reconnect backoff (default grows to 120 s). etcd3aio has no public knob.
        opts = getattr(getattr(self._client, "_manager", None), "grpc_options", None)
        if isinstance(opts, list):
            opts += [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000))]
        self._leases: dict[int, Lease] = {}  # keyed by object id: Lease.id may change
        self._owned: dict[str, _Owned] = {}
        self._watches: set[Watch] = set()
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False
        self._raft_term = 0
        self.reconnects = 0  # outages survived (keep-alive failed, then succeeded)
        self.repairs = 0  # passes over the owned keys after an outage or an etcd restart

    # ---- lifecycle -------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, *, connect_timeout: float = 10.0, op_timeout: float = 5.0,
                      max_backoff: float = 1.0, credentials: EtcdCredentials | None = None) -> EtcdStore:
        store = cls(url, op_timeout=op_timeout, max_backoff=max_backoff, credentials=credentials)
        await store._client.connect()
        try:
            if store._creds.username is not None:
                await store._retry("authenticate", lambda t: store._authenticate(t), connect_timeout)
            resp = await store._retry("connect", lambda t: store._kv.get(b"\0", timeout=t), connect_timeout)
        except BaseException:
            await store._client.close()
            raise
        store._raft_term = resp.header.raft_term
        store._supervisor = asyncio.create_task(store._supervise(), name=f"etcd-supervisor {url}")
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [w._task for w in self._watches] + ([self._supervisor] if self._supervisor else [])
        for t in tasks:
            t.cancel()
        for w in list(self._watches):
            w._finish()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.close()

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- plumbing --------------------------------------------------------------------------------

    @property
    def _kv(self) -> Any:
        if self._client.kv is None:
            raise DiscoveryError("EtcdStore is closed")
        return self._client.kv

    @property
    def _lease_svc(self) -> Any:
        if self._client.lease is None:
            raise DiscoveryError("EtcdStore is closed")
        return self._client.lease

    async def _authenticate(self, timeout: float) -> None:
        """Exchange username + password for a token sent with every later call (EtcdAuthError if refused)."""
        assert self._creds.username is not None and self._client.auth is not None
        self._client.set_token(None)  # etcd refuses an Authenticate that carries a stale token
        try:
            resp = await self._client.auth.authenticate(self._creds.username, self._creds.password or "",
                                                        timeout=timeout)  # fmt: skip
        except EtcdUnauthenticatedError as e:
            raise EtcdAuthError(f"etcd at {self.url} refused user {self._creds.username!r}: {e}") from None
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.PERMISSION_DENIED):  # fmt: skip
                raise EtcdAuthError(f"etcd at {self.url} refused user {self._creds.username!r}: "
                                    f"{e.details()}") from None  # fmt: skip
            raise
        self._client.set_token(resp.token)

    async def _reauth(self, err: BaseException) -> bool:
        """After an 'unauthenticated' answer: a new token when we have a password (True), else False."""
        if self._creds.username is None:
            return False
        log.info("etcd %s: %s; authenticating again", self.url, _brief(err))
        await self._authenticate(2.0)
        return True

    async def _retry(self, op: str, fn: Callable[[float], Awaitable[T]], budget: float | None = None) -> T:
        """Run ``fn(per_attempt_timeout)`` until it succeeds or ``budget`` seconds of transient errors pass."""
        loop = asyncio.get_running_loop()
        budget = self._op_timeout if budget is None else budget
        deadline = loop.time() + budget
        backoff = 0.05
        reauthed = False
        while True:
            remaining = deadline - loop.time()
            try:
                return await fn(max(0.1, min(2.0, remaining)))
            except EtcdUnauthenticatedError as e:
                if reauthed or not await self._reauth(e):
                    raise EtcdAuthError(f"etcd {op} at {self.url}: {e}") from None
                reauthed = True
            except EtcdPermissionDeniedError as e:
                raise EtcdAuthError(f"etcd {op} at {self.url}: {e} (credentials: {self._creds!r})") from None
            except grpc.aio.AioRpcError as e:
                if _auth_refusal(e):  # e.g. "user name is empty": auth is enabled and we sent no credentials
                    raise EtcdAuthError(f"etcd {op} at {self.url}: {e.details()} (credentials: "
                                        f"{self._creds!r})") from None  # fmt: skip
                raise
            except _TRANSIENT as e:
                if loop.time() + backoff >= deadline:
                    raise EtcdUnavailable(f"etcd {op} at {self.url}: unreachable for {budget:.1f}s ({e})") from e
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    # ---- leases ----------------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> Lease:
        if ttl < 1:
            raise ValueError("lease ttl must be >= 1 s")
        resp = await self._retry("lease grant", lambda t: self._lease_svc.grant(ttl, timeout=t))
        lease = Lease(id=resp.ID, ttl=int(resp.TTL) or ttl, _store=self)
        self._leases[id(lease)] = lease
        self._wake.set()
        return lease

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining TTL of any lease id in seconds; -1 when it does not exist."""
        resp = await self._retry("lease ttl", lambda t: self._lease_svc.time_to_live(lease_id, timeout=t))
        return int(resp.TTL)

    async def _revoke(self, lease: Lease) -> None:
        self._leases.pop(id(lease), None)
        for k in [k for k, o in self._owned.items() if o.lease is lease]:
            del self._owned[k]
        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: already gone
            await self._retry("lease revoke", lambda t: self._lease_svc.revoke(lease.id, timeout=t))

    async def _regrant(self, lease: Lease, lost_id: int) -> None:
        """Replace lost lease ``lost_id`` by a new one and re-put its keys (once, even if called concurrently)."""
        async with lease._lock:
            if lease.id != lost_id or id(lease) not in self._leases:
                return  # already re-granted by a concurrent caller, or revoked by us
            resp = await self._retry("lease grant", lambda t: self._lease_svc.grant(lease.ttl, timeout=t))
            lease.id = resp.ID
            lease.regrants += 1
            log.warning("etcd lease %x was lost; granted %x (ttl %ss), re-putting its keys", lost_id, lease.id,
                        lease.ttl)
            for key, o in list(self._owned.items()):
                if o.lease is lease:
                    await self._put_raw(key, o.value, lease.id)

    # ---- key/value -------------------------------------------------------------------------------

    async def _put_raw(self, key: str, value: bytes, lease_id: int) -> int:
        resp = await self._retry("put", lambda t: self._kv.put(key, value, lease=lease_id, timeout=t))
        return int(resp.header.revision)

    async def put(self, key: str, value: bytes, lease: Lease | int | None = None) -> int:
        """Write ``key``; returns the revision. With a lease the key is owned (re-put after a restart)."""
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value for {key!r} must be bytes, got {type(value).__name__}")
        value = bytes(value)
        if lease is None:
            self._owned.pop(key, None)
            return await self._put_raw(key, value, 0)
        if isinstance(lease, Lease):
            if id(lease) not in self._leases:
                raise DiscoveryError(f"lease {lease.id:x} was revoked or belongs to another store")
            used = lease.id
            try:
                rev = await self._put_raw(key, value, used)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                await self._regrant(lease, used)
                rev = await self._put_raw(key, value, lease.id)
            self._owned[key] = _Owned(value, lease, 0)
        else:
            try:
                rev = await self._put_raw(key, value, int(lease))
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise LeaseNotFound(f"put {key!r}: lease {int(lease)} ({int(lease):x}) does not exist") from e
                raise
            self._owned[key] = _Owned(value, None, int(lease))
        self._wake.set()
        return rev

    async def get(self, key: str) -> bytes | None:
        resp = await self._retry("get", lambda t: self._kv.get(key, timeout=t))
        return bytes(resp.kvs[0].value) if resp.kvs else None

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> Listing:
        end = prefix_range_end(prefix)
        resp = await self._retry("get prefix", lambda t: self._kv.get(prefix, end, revision=revision, timeout=t))
        items = tuple(
            KeyValue(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)
            for kv in resp.kvs
        )
        return Listing(items, int(resp.header.revision))

    async def delete(self, key: str) -> bool:
        self._owned.pop(key, None)
        resp = await self._retry("delete", lambda t: self._kv.delete(key, timeout=t))
        return resp.deleted > 0

    async def delete_prefix(self, prefix: str) -> int:
        for k in [k for k in self._owned if k.startswith(prefix)]:
            del self._owned[k]
        end = prefix_range_end(prefix)
        resp = await self._retry("delete prefix", lambda t: self._kv.delete(prefix, end, timeout=t))
        return int(resp.deleted)

    async def watch_prefix(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        """Events under ``prefix`` from ``start_revision`` (default: after now), in order; see module doc."""
        if start_revision is None:
            listing = await self.get_prefix(prefix)
            w = Watch(self, prefix, listing.revision + 1, _known_of(listing), False)
        else:
            try:
                listing = await self.get_prefix(prefix, revision=max(0, start_revision - 1))
                w = Watch(self, prefix, start_revision, _known_of(listing), False)
            except grpc.aio.AioRpcError as e:  # OUT_OF_RANGE: compacted, or a future revision
                log.warning("watch %r from revision %d: history unavailable (%s); re-listing", prefix,
                            start_revision, e.details())
                w = Watch(self, prefix, start_revision, {}, True)
        self._watches.add(w)
        return w

    # ---- supervisor: keep-alives, outage detection, repair ----------------------------------------

    def _tick(self) -> float:
        ttls = [lease.ttl for lease in self._leases.values()]
        return max(0.2, min(ttls) / 3) if ttls else 1.0

    async def _keepalive_once(self, lease: Lease) -> int:
        call = self._lease_svc.keep_alive(lease.id)
        try:
            async with asyncio.timeout(max(1.0, lease.ttl / 3)):
                resp = await call.read()
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise EtcdConnectionError("keep-alive stream closed")
        if resp.header.raft_term:
            self._note_term(int(resp.header.raft_term))
        return int(resp.TTL)

    def _note_term(self, term: int) -> None:
        if self._raft_term and term != self._raft_term:
            log.info("etcd raft term %d -> %d (restart or new leader): repairing owned keys", self._raft_term, term)
            self._needs_repair = True
        self._raft_term = term

    _needs_repair = False

    async def _repair(self) -> None:
        """Re-put owned keys that are missing or differ; drop keys whose external lease is gone."""
        self.repairs += 1
        for key, o in list(self._owned.items()):
            lease_id = o.lease.id if o.lease else o.external
            resp = await self._retry("get", lambda t: self._kv.get(key, timeout=t))
            cur = resp.kvs[0] if resp.kvs else None
            if cur is not None and bytes(cur.value) == o.value and cur.lease == lease_id:
                continue
            if o.external and await self.lease_ttl(o.external) <= 0:
                log.warning("etcd key %r: external lease %x is gone (owner exited); not re-putting", key, o.external)
                self._owned.pop(key, None)
                continue
            try:
                await self._put_raw(key, o.value, lease_id)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND or o.lease is None:
                    raise
                await self._regrant(o.lease, lease_id)  # re-puts every key of that lease
            log.info("etcd key %r re-put under lease %x after reconnect", key, lease_id)

    async def _check_external(self) -> None:
        """Forget owned keys whose external lease is gone (its owner exited); also notices outages/restarts."""
        for lease_id in {o.external for o in self._owned.values() if o.external}:
            resp = await self._lease_svc.time_to_live(lease_id, timeout=2.0)
            self._note_term(int(resp.header.raft_term))
            if resp.TTL <= 0:
                gone = [k for k, o in self._owned.items() if o.external == lease_id]
                log.info("etcd external lease %x is gone; forgetting %d key(s) put under it", lease_id, len(gone))
                for k in gone:
                    del self._owned[k]

    async def _supervise(self) -> None:
        backoff = 0.1
        outage = False
        while True:
            if not self._leases and not self._owned:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                for lease in list(self._leases.values()):
                    sent = lease.id
                    if await self._keepalive_once(lease) <= 0:
                        await self._regrant(lease, sent)
                await self._check_external()
                if outage or self._needs_repair:
                    self._needs_repair = False
                    await self._repair()
                    if outage:
                        self.reconnects += 1
                        log.info("etcd %s reachable again; owned keys repaired", self.url)
                    outage = False
                backoff = 0.1
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._tick())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure here is retried with backoff
                if _unauthenticated(e):
                    with contextlib.suppress(Exception):
                        await self._reauth(e)
                if not outage:
                    log.warning("etcd %s: keep-alive/repair failed (%s); retrying", self.url, _brief(e))
                outage = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff, self._tick())


class _Resync(Exception):
    pass


_Seen = tuple[int, int]


def _seen(mod_revision: int, value: bytes) -> _Seen:
    return (mod_revision, hash(value))


def _known_of(listing: Listing) -> dict[str, _Seen]:
    return {kv.key: _seen(kv.mod_revision, kv.value) for kv in listing}


class Watch:
    """Async iterator of :class:`WatchEvent`; ``aclose()`` (or ``async with``) stops it."""

    _END = object()

    def __init__(self, store: EtcdStore, prefix: str, start: int, known: dict[str, _Seen], resync: bool) -> None:
        self._store, self.prefix = store, prefix
        self._next = start
        self._known = known  # key -> (mod_revision, hash of value) as delivered so far
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False
        self.resyncs = 0
        self._task = asyncio.create_task(self._pump(resync), name=f"etcd-watch {prefix}")

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        item = await self._queue.get()
        if item is Watch._END:
            self._queue.put_nowait(item)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._queue.put_nowait(Watch._END)
        self._store._watches.discard(self)

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._finish()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _resync(self) -> None:
        listing = await self._store.get_prefix(self.prefix)
        self.resyncs += 1
        now = {kv.key: kv for kv in listing}
        for key in sorted(set(self._known) - set(now)):
            self._queue.put_nowait(WatchEvent("delete", key, b"", listing.revision, True))
        for kv in sorted(now.values(), key=lambda kv: kv.mod_revision):
            if self._known.get(kv.key) != _seen(kv.mod_revision, kv.value):  # revision alone lies after a reset
                self._queue.put_nowait(WatchEvent("put", kv.key, kv.value, kv.mod_revision, True))
        self._known = {k: _seen(kv.mod_revision, kv.value) for k, kv in now.items()}
        self._next = listing.revision + 1

    def _handle(self, resp: Any) -> None:
        """Queue the events of one watch response, or raise _Resync when history is missing."""
        if resp.compact_revision > 0 or resp.canceled:
            log.warning("watch %r: history before %d compacted; re-listing", self.prefix, resp.compact_revision)
            raise _Resync
        if 0 < resp.header.revision < self._next - 1:
            log.warning("watch %r: etcd revision went back to %d (< %d): data reset; re-listing",
                        self.prefix, resp.header.revision, self._next - 1)
            raise _Resync
        for ev in resp.events:
            kv = ev.kv
            key = kv.key.decode()
            if ev.type == _DELETE:
                self._known.pop(key, None)
                self._queue.put_nowait(WatchEvent("delete", key, b"", kv.mod_revision))
            else:
                value = bytes(kv.value)
                self._known[key] = _seen(kv.mod_revision, value)
                self._queue.put_nowait(WatchEvent("put", key, value, kv.mod_revision))
            self._next = kv.mod_revision + 1

    async def _pump(self, resync: bool) -> None:
        client = self._store._client
        end = prefix_range_end(self.prefix)
        backoff = 0.1
        need_resync = resync
        try:
            while True:
                try:
                    if need_resync:
                        await self._resync()
                        need_resync = False
                    if client.watch is None:
                        return
                    stream = client.watch.watch(self.prefix, end, start_revision=self._next)
                    async with contextlib.aclosing(stream):  # cancels the gRPC stream on every exit
                        async for resp in stream:
                            self._handle(resp)
                            backoff = 0.1
                except _Resync:
                    need_resync = True
                except asyncio.CancelledError:
                    raise
                except (EtcdError, grpc.aio.AioRpcError, DiscoveryError) as e:
                    log.warning("watch %r: %s; resuming at revision %d", self.prefix, _brief(e), self._next)
                    if _unauthenticated(e):
                        with contextlib.suppress(Exception):
                            await self._store._reauth(e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self._store._max_backoff)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - surfaced to the consumer
            self._queue.put_nowait(e)
        finally:
            self._finish()
