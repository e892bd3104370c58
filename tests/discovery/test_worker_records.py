"""WorkerRecord encoding, validation on read (never unpickled), and the WorkerRegistry over real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import msgspec
import pytest

from conftest import raw_client
from dynamo_ext.discovery.etcd import EtcdStore
from dynamo_ext.discovery.records import (
    InvalidRecord,
    WorkerChange,
    WorkerRecord,
    WorkerRegistry,
    decode_record,
    encode_record,
    parse_worker_key,
    worker_key,
)


def test_key_scheme(ns):
    k = worker_key(ns, "prefill", 7587899074575751195)
    assert k == f"dynamo_ext/v1/workers/{ns}/prefill/7587899074575751195"
    assert parse_worker_key(k) == (ns, "prefill", 7587899074575751195)
    root = "dynamo_ext/v1/workers/"
    for bad in (root + "a/b", "other/a/b/1", root + "a/b/x", root + "a/b/1/2"):
        with pytest.raises(InvalidRecord, match="field key"):
            parse_worker_key(bad)
    with pytest.raises(ValueError):
        worker_key("a/b", "c", 1)


def test_round_trip(make_record):
    rec = make_record(instance_id=42, role="prefill")
    blob = encode_record(rec)
    assert isinstance(blob, bytes)
    assert decode_record(rec.key, blob) == rec
    assert decode_record(rec.key, blob).transports == b"\x00\x01blob"


class _Boom:
    """Unpickling this would create a marker file: proves a pickle payload is never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _as_dict(rec: WorkerRecord) -> dict:
    return msgspec.msgpack.decode(encode_record(rec))  # plain dict, bytes kept


@pytest.mark.parametrize("case", ["garbage", "json", "wrong_type", "bad_role", "unknown_field", "missing_field",
                                  "bad_pool", "key_mismatch", "pickle", "pickle_proto0"])
def test_malformed_values_raise_invalid_record(case, make_record, tmp_path):
    rec = make_record(instance_id=5)
    key = rec.key
    d = _as_dict(rec)
    marker = str(tmp_path / "unpickled")
    field = None
    if case == "garbage":
        value = b"\xc1\xff\x00garbage"
    elif case == "json":
        value = json.dumps({"namespace": rec.namespace}).encode()
    elif case == "wrong_type":
        d["pid"] = "1234"
        value, field = msgspec.msgpack.encode(d), "pid"
    elif case == "bad_role":
        d["role"] = "encoder"
        value, field = msgspec.msgpack.encode(d), "role"
    elif case == "unknown_field":
        d["extra"] = 1
        value, field = msgspec.msgpack.encode(d), "extra"
    elif case == "missing_field":
        del d["model"]
        value, field = msgspec.msgpack.encode(d), "model"
    elif case == "bad_pool":
        d["pools"][0]["kind"] = "gpu"
        value, field = msgspec.msgpack.encode(d), "pools[0].kind"
    elif case == "key_mismatch":
        value, field = encode_record(make_record(instance_id=6)), "instance_id"
    elif case == "pickle":
        value = pickle.dumps(_Boom(marker))
    else:
        value = pickle.dumps(_Boom(marker), protocol=0)
    with pytest.raises(InvalidRecord) as ei:
        decode_record(key, value)
    e = ei.value
    assert e.key == key and key in str(e)
    if field:
        assert e.field == field and field in str(e)
    if case.startswith("pickle"):
        assert "pickle" in str(e)
    assert not os.path.exists(marker)


async def test_registry_lists_watches_and_skips_malformed(shared_etcd, ns, make_record):
    async with await EtcdStore.connect(shared_etcd.url) as s:
        pre = make_record(instance_id=1, role="prefill", component="prefill")
        await s.put(pre.key, encode_record(pre))
        bad_key = worker_key(ns, "backend", 99)
        await s.put(bad_key, pickle.dumps({"x": 1}))
        changes: list[WorkerChange] = []
        reg = WorkerRegistry(s, ns)
        reg.on_change(changes.append)

        async def async_cb(ch: WorkerChange) -> None:
            await asyncio.sleep(0)

        reg.on_change(async_cb)
        async with reg:
            assert reg.get("prefill", 1) == pre
            assert bad_key in reg.invalid and "pickle" in reg.invalid[bad_key]
            dec = make_record(instance_id=2, role="decode")
            await s.put(dec.key, encode_record(dec))
            await reg.wait_for(lambda r: dec.key in r, timeout=5)
            assert [r.instance_id for r in reg.by_role("decode")] == [2]

            dec2 = make_record(instance_id=2, role="decode", model="tiny-v2")
            await s.put(dec2.key, encode_record(dec2))
            await reg.wait_for(lambda r: r.get(dec.key) == dec2, timeout=5)

            await s.put(dec.key, b"\x00garbage")  # turns malformed -> reported removed, kept out
            await reg.wait_for(lambda r: dec.key not in r, timeout=5)
            assert dec.key in reg.invalid

            await s.delete(pre.key)
            await reg.wait_for(lambda r: not r, timeout=5)
            await s.put(worker_key(ns + "x", "backend", 3), b"")  # other namespace: invisible
            await asyncio.sleep(0.2)
            assert reg.records == {}
        kinds = [(c.kind, c.record.instance_id) for c in changes]
        assert kinds == [("added", 1), ("added", 2), ("updated", 2), ("removed", 2), ("removed", 1)]
        assert changes[-1].record == pre


async def test_registry_record_on_external_lease_disappears(shared_etcd, ns, make_record):
    """A worker record on the runtime's lease (Option A of the integration notes) leaves with the worker."""
    other = await raw_client(shared_etcd.url)
    try:
        runtime_lease = (await other.lease.grant(30)).ID
        async with await EtcdStore.connect(shared_etcd.url) as s, WorkerRegistry(s, ns) as reg:
            rec = make_record(instance_id=runtime_lease)
            await s.put(rec.key, encode_record(rec), lease=runtime_lease)
            await reg.wait_for(lambda r: rec.key in r, timeout=5)
            await other.lease.revoke(runtime_lease)
            await reg.wait_for(lambda r: rec.key not in r, timeout=5)
    finally:
        await other.close()


async def test_registry_converges_after_etcd_loses_its_data(etcd_server, ns, make_record):
    """Worker store and router registry are separate clients; etcd comes back empty. The worker's store
    re-grants and re-puts its record; the registry re-lists and ends with exactly the live records."""
    import shutil

    async with await EtcdStore.connect(etcd_server.url) as worker, await EtcdStore.connect(etcd_server.url) as router:
        lease = await worker.grant_lease(3)
        live = make_record(instance_id=1, role="prefill", component="prefill")
        await worker.put(live.key, encode_record(live), lease=lease)
        stale = make_record(instance_id=2)
        await router.put(stale.key, encode_record(stale))  # unleased: lost with the data, nobody re-puts it
        removed: list[int] = []
        async with WorkerRegistry(router, ns) as reg:
            reg.on_change(lambda ch: removed.append(ch.record.instance_id) if ch.kind == "removed" else None)
            assert set(reg.records) == {live.key, stale.key}
            await asyncio.to_thread(etcd_server.stop)
            shutil.rmtree(etcd_server.workdir / "etcd-data")
            await asyncio.to_thread(etcd_server.start)
            await reg.wait_for(lambda r: set(r) == {live.key}, timeout=15)
            assert reg.records[live.key] == live and 2 in removed
