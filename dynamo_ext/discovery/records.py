"""Typed worker records in etcd, validated on every read.

Protocol
--------
* Key: ``dynamo_ext/v1/workers/<namespace>/<component>/<instance_id>`` (``instance_id`` in decimal;
  with Dynamo it is the runtime's lease id, so the same number names the Dynamo instance).
  ``namespace`` and ``component`` match ``[A-Za-z0-9_.-]+``.
* Value: one msgpack map (``msgspec.msgpack``), the fields of :class:`WorkerRecord`. Never pickle: the
  decoder only builds plain msgpack types and these Structs; a value that looks like a pickle stream is
  refused before any decoding. Unknown fields, wrong types, a role outside ``prefill|decode|agg|router``
  and a key/record mismatch (namespace, component, instance_id) are errors. ``topology`` and
  ``kv_layout`` are free-form maps here: the topology and transport layers validate them.
* :func:`decode_record` raises :class:`InvalidRecord` naming the key and the offending field.
* :class:`WorkerRegistry` lists a namespace, then watches it from the listing's revision (no gap), keeps
  the valid records, skips and logs malformed ones, and calls change callbacks (added/updated/removed).
  A record that turns malformed is reported as removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from .etcd import EtcdStore, Watch, WatchEvent

log = logging.getLogger(__name__)

KEY_ROOT = "dynamo_ext/v1/workers/"
Role = Literal["prefill", "decode", "agg", "router"]
MemKind = Literal["device", "host", "file", "object"]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class InvalidRecord(ValueError):
    """A stored value is not a valid WorkerRecord. ``key`` and ``field`` name what is wrong."""

    def __init__(self, key: str, field: str, reason: str) -> None:
        super().__init__(f"invalid worker record at {key!r}: field {field}: {reason}")
        self.key, self.field, self.reason = key, field, reason


class PoolDescriptor(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    kind: MemKind
    addr: _NonNeg
    nbytes: _NonNeg
    device_id: int = 0


class WorkerRecord(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    namespace: _Name
    component: _Name
    role: Role
    instance_id: _NonNeg
    model: str
    host: str
    pid: _NonNeg
    started_at: float  # unix seconds
    agent_name: str = ""  # the worker's transport agent name (NIXL agent and every other backend)
    transports: bytes = b""  # serving.PeerTransports (msgpack): per backend its PeerInfo, topology, device
    topology: dict[str, Any] = msgspec.field(default_factory=dict)
    kv_layout: dict[str, Any] = msgspec.field(default_factory=dict)
    pools: list[PoolDescriptor] = msgspec.field(default_factory=list)

    @property
    def key(self) -> str:
        return worker_key(self.namespace, self.component, self.instance_id)


_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def namespace_prefix(namespace: str) -> str:
    if not _NAME_RE.match(namespace):
        raise ValueError(f"namespace {namespace!r} must match [A-Za-z0-9_.-]+")
    return f"{KEY_ROOT}{namespace}/"


def worker_key(namespace: str, component: str, instance_id: int) -> str:
    if not _NAME_RE.match(component):
        raise ValueError(f"component {component!r} must match [A-Za-z0-9_.-]+")
    return f"{namespace_prefix(namespace)}{component}/{int(instance_id)}"


def parse_worker_key(key: str) -> tuple[str, str, int]:
    """``(namespace, component, instance_id)`` of a record key; InvalidRecord if it is not one."""
    parts = key[len(KEY_ROOT):].split("/") if key.startswith(KEY_ROOT) else []
    if len(parts) != 3 or not all(_NAME_RE.match(p) for p in parts[:2]) or not parts[2].isdigit():
        raise InvalidRecord(key, "key", f"expected {KEY_ROOT}<namespace>/<component>/<instance_id>")
    return parts[0], parts[1], int(parts[2])


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(WorkerRecord)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_NAMED_RE = re.compile(r"field `([^`]+)`")  # "unknown field `x`", "missing required field `x`"


def encode_record(record: WorkerRecord) -> bytes:
    return _ENCODER.encode(record)


def _looks_like_pickle(value: bytes) -> bool:
    # Protocol 2+ streams start with PROTO (0x80) + version; protocols 0/1 start with an opcode such as
    # '(' (MARK), ']' (EMPTY_LIST), '}' (EMPTY_DICT), 'c' (GLOBAL) and end with STOP '.'.
    if len(value) >= 2 and value[0] == 0x80 and 2 <= value[1] <= 5:
        return True
    return len(value) >= 2 and value[-1:] == b"." and value[:1] in (b"(", b"]", b"}", b"c")


def decode_record(key: str, value: bytes) -> WorkerRecord:
    """Validate ``value`` read at ``key``. Never unpickles; raises InvalidRecord."""
    ns, comp, iid = parse_worker_key(key)
    if _looks_like_pickle(value):
        raise InvalidRecord(key, "<value>", "looks like a Python pickle stream; refused (records are msgpack)")
    try:
        rec = _DECODER.decode(value)
    except msgspec.ValidationError as e:
        msg = str(e)
        at, named = _FIELD_RE.search(msg), _NAMED_RE.search(msg)
        path = at.group(1) if at else ""
        if named:  # the field is named in the message, relative to the path
            path = f"{path}.{named.group(1)}" if path else named.group(1)
        raise InvalidRecord(key, path or "<value>", msg) from None
    except msgspec.DecodeError as e:
        raise InvalidRecord(key, "<value>", f"not a msgpack record: {e}") from None
    for field, want, got in (("namespace", ns, rec.namespace), ("component", comp, rec.component),
                             ("instance_id", iid, rec.instance_id)):
        if want != got:
            raise InvalidRecord(key, field, f"record says {got!r}, key says {want!r}")
    return rec


# ---- registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerChange:
    kind: Literal["added", "updated", "removed"]
    key: str
    record: WorkerRecord  # the new record, or the last valid one for "removed"
    revision: int


ChangeCallback = Callable[[WorkerChange], Awaitable[None] | None]


class WorkerRegistry:
    """The live set of valid worker records of one namespace.

    ``await reg.start()`` lists and starts watching; ``reg.records`` is ``{key: WorkerRecord}``;
    ``reg.invalid`` is ``{key: error message}`` for malformed values currently stored.
    """

    def __init__(self, store: EtcdStore, namespace: str) -> None:
        self._store, self.namespace = store, namespace
        self.prefix = namespace_prefix(namespace)
        self.records: dict[str, WorkerRecord] = {}
        self.invalid: dict[str, str] = {}
        self._callbacks: list[ChangeCallback] = []
        self._changed = asyncio.Condition()
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None

    def on_change(self, cb: ChangeCallback) -> None:
        self._callbacks.append(cb)

    def by_role(self, role: Role) -> list[WorkerRecord]:
        return sorted((r for r in self.records.values() if r.role == role), key=lambda r: r.instance_id)

    def get(self, component: str, instance_id: int) -> WorkerRecord | None:
        return self.records.get(worker_key(self.namespace, component, instance_id))

    async def start(self) -> None:
        listing = await self._store.get_prefix(self.prefix)
        for kv in listing:
            await self._apply(WatchEvent("put", kv.key, kv.value, kv.mod_revision))
        self._watch = await self._store.watch_prefix(self.prefix, start_revision=listing.revision + 1)
        self._task = asyncio.create_task(self._run(), name=f"worker-registry {self.namespace}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._watch:
            await self._watch.aclose()

    async def __aenter__(self) -> WorkerRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[dict[str, WorkerRecord]], bool], timeout: float) -> None:
        """Wait until ``predicate(self.records)`` holds; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.records))

    async def _run(self) -> None:
        assert self._watch is not None
        try:
            async for ev in self._watch:
                try:
                    await self._apply(ev)
                except Exception:  # noqa: BLE001 - a failing callback must not stop the registry
                    log.exception("worker registry %s: callback failed on %s %s", self.namespace, ev.kind, ev.key)
        except Exception:  # noqa: BLE001 - the watch itself failed: say so loudly, the set is now stale
            log.exception("worker registry %s: watch ended with an error; records are no longer updated",
                          self.namespace)

    async def _apply(self, ev: WatchEvent) -> None:
        old = self.records.get(ev.key)
        change: WorkerChange | None = None
        if ev.kind == "delete":
            self.invalid.pop(ev.key, None)
            if old is not None:
                del self.records[ev.key]
                change = WorkerChange("removed", ev.key, old, ev.revision)
        else:
            try:
                rec = decode_record(ev.key, ev.value)
            except InvalidRecord as e:
                log.warning("skipping %s", e)
                self.invalid[ev.key] = str(e)
                if old is not None:
                    del self.records[ev.key]
                    change = WorkerChange("removed", ev.key, old, ev.revision)
            else:
                self.invalid.pop(ev.key, None)
                self.records[ev.key] = rec
                if old != rec:
                    change = WorkerChange("added" if old is None else "updated", ev.key, rec, ev.revision)
        async with self._changed:
            self._changed.notify_all()
        if change is not None:
            for cb in self._callbacks:
                res = cb(change)
                if inspect.isawaitable(res):
                    await res
