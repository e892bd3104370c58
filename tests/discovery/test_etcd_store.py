"""EtcdStore against a real etcd: KV, watches in order, external leases, lease loss, restarts, data loss."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import pytest

from dynamo_ext.discovery.etcd import EtcdStore, EtcdUnavailable, LeaseNotFound, WatchEvent
from fixtures.servers import free_port


def _p() -> str:
    return f"test/{uuid.uuid4().hex[:8]}/"


async def _next(w, timeout: float = 5.0) -> WatchEvent:
    return await asyncio.wait_for(w.__anext__(), timeout)


async def _eventually(fn, timeout: float, interval: float = 0.1):
    """Poll ``await fn()`` until truthy (bounded); returns the value."""
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {v!r})")
        await asyncio.sleep(interval)


async def test_put_get_prefix_delete(shared_etcd):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        r1 = await s.put(p + "a", b"1")
        r2 = await s.put(p + "b", b"2")
        assert r2 > r1
        assert await s.get(p + "a") == b"1"
        assert await s.get(p + "missing") is None
        listing = await s.get_prefix(p)
        assert [(kv.key, kv.value) for kv in listing] == [(p + "a", b"1"), (p + "b", b"2")]
        assert listing.revision >= r2
        assert await s.delete(p + "a") is True
        assert await s.delete(p + "a") is False
        assert await s.delete_prefix(p) == 1
        with pytest.raises(TypeError):
            await s.put(p + "c", "not bytes")  # type: ignore[arg-type]


async def test_watch_sees_put_and_delete_in_order(shared_etcd):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        await s.put(p + "before", b"x")  # written before the watch: not delivered
        async with await s.watch_prefix(p) as w:
            expected = []
            for i in range(20):
                k = p + f"k{i % 3}"
                if i % 4 == 3:
                    if await s.delete(k):  # deleting a missing key makes no event
                        expected.append(("delete", k, b""))
                else:
                    await s.put(k, b"v%d" % i)
                    expected.append(("put", k, b"v%d" % i))
            await s.put("test/outside", b"x")  # another prefix: not delivered
            got = []
            for _ in expected:
                ev = await _next(w)
                assert not ev.resync
                got.append((ev.kind, ev.key, ev.value))
            assert got == expected
            with pytest.raises(asyncio.TimeoutError):
                await _next(w, 0.3)  # nothing else


async def test_watch_revisions_increase(shared_etcd):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        w = await s.watch_prefix(p)
        for i in range(5):
            await s.put(p + "k", b"%d" % i)
        revs = [(await _next(w)).revision for _ in range(5)]
        assert revs == sorted(revs) and len(set(revs)) == 5
        await w.aclose()
        assert [e async for e in w] == []


async def test_external_lease_id(shared_etcd, other_client):
    """A key put under someone else's lease (the Dynamo runtime's) dies with that lease."""
    p = _p()
    runtime_lease = (await other_client.lease.grant(30)).ID  # stands in for endpoint.connection_id()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        await s.put(p + "rec", b"meta", lease=runtime_lease)
        assert (await s.get_prefix(p)).items[0].lease == runtime_lease
        ttl = await other_client.lease.time_to_live(runtime_lease, keys=True)
        assert (p + "rec").encode() in list(ttl.keys)
        await other_client.lease.revoke(runtime_lease)  # the worker shut down
        assert await s.get(p + "rec") is None
        with pytest.raises(LeaseNotFound, match="does not exist"):
            await s.put(p + "rec2", b"x", lease=runtime_lease)
        # the store forgets it at the next supervisor tick: it will never resurrect it on a repair pass
        await _eventually(_const(lambda: not s._owned), timeout=3)
        assert await s.get(p + "rec") is None


async def test_own_lease_revoked_elsewhere_is_regranted(shared_etcd, other_client):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        lease = await s.grant_lease(3)
        first = lease.id
        await s.put(p + "a", b"1", lease=lease)
        await s.put(p + "b", b"2", lease=lease)
        await other_client.lease.revoke(first)
        assert await s.get(p + "a") is None
        # next keep-alive (every ttl/3 = 1 s) sees TTL 0: new lease, keys re-put under it
        listing = await _eventually(lambda: _full(s, p, 2), timeout=5)
        assert lease.id != first and lease.regrants == 1
        assert {kv.lease for kv in listing} == {lease.id}
        await lease.revoke()
        assert len(await s.get_prefix(p)) == 0


def _const(pred):
    async def f():
        return pred()

    return f


async def _full(s: EtcdStore, p: str, n: int):
    listing = await s.get_prefix(p)
    return listing if len(listing) == n else None


async def test_put_on_lost_lease_regrants_immediately(shared_etcd, other_client):
    """A put that finds its lease gone (before the next keep-alive noticed) re-grants and re-puts at once."""
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        lease = await s.grant_lease(30)  # keep-alive every 10 s: the supervisor will not notice in time
        first = lease.id
        await s.put(p + "a", b"1", lease=lease)
        await other_client.lease.revoke(first)
        await s.put(p + "b", b"2", lease=lease)
        listing = await s.get_prefix(p)
        assert [(kv.key, kv.lease) for kv in listing] == [(p + "a", lease.id), (p + "b", lease.id)]
        assert lease.id != first and lease.regrants == 1
        await lease.revoke()


async def test_leased_key_outlives_ttl_while_kept_alive(shared_etcd):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        lease = await s.grant_lease(2)
        await s.put(p + "a", b"1", lease=lease)
        await asyncio.sleep(3.0)
        assert await s.get(p + "a") == b"1"
        assert lease.regrants == 0


async def test_reconnect_after_etcd_restart(etcd_server):
    p = _p()
    async with await EtcdStore.connect(etcd_server.url) as s:
        lease = await s.grant_lease(3)
        await s.put(p + "rec", b"v1", lease=lease)
        w = await s.watch_prefix(p)
        await asyncio.to_thread(etcd_server.restart)
        # writes work again (bounded retries inside), the leased record is there under a live lease
        await s.put(p + "after", b"v2")
        assert await s.get(p + "rec") == b"v1"
        ev = await _next(w, 10)
        assert (ev.kind, ev.key, ev.value, ev.resync) == ("put", p + "after", b"v2", False)
        # the restart was noticed (raft term change or a failed keep-alive) and the owned keys checked
        await _eventually(_const(lambda: s.repairs >= 1), timeout=5)
        # the lease is kept alive across the restart: still there after more than one TTL
        await asyncio.sleep(3.5)
        assert await s.get(p + "rec") == b"v1"
        assert await s.lease_ttl(lease.id) > 0
        await w.aclose()


async def test_etcd_data_loss_regrants_and_reputs(etcd_server):
    """etcd comes back empty (data dir lost): the lease is gone, revisions restart; the store re-grants,
    re-puts its records, and the watch re-lists instead of silently waiting for an old revision."""
    p = _p()
    async with await EtcdStore.connect(etcd_server.url) as s:
        lease = await s.grant_lease(3)
        first = lease.id
        for i in range(3):  # push the revision up so the new cluster is "behind"
            await s.put(p + "pad", b"%d" % i)
        await s.put(p + "rec", b"v1", lease=lease)
        w = await s.watch_prefix(p)
        await s.put(p + "seen", b"s")
        assert (await _next(w)).key == p + "seen"

        await asyncio.to_thread(etcd_server.stop)
        shutil.rmtree(etcd_server.workdir / "etcd-data")
        await asyncio.to_thread(etcd_server.start)

        rec = await _eventually(lambda: s.get(p + "rec"), timeout=10)
        assert rec == b"v1"
        assert lease.id != first and lease.regrants >= 1
        assert await s.get(p + "pad") is None  # unleased keys are not ours to restore
        # the watch converges: deletes for what vanished, the re-put record, all marked resync
        state = {p + "pad": b"2", p + "seen": b"s"}  # what the watcher had delivered before
        deadline = time.monotonic() + 10
        while state != {p + "rec": b"v1"}:
            assert time.monotonic() < deadline, state
            ev = await _next(w, 10)
            if ev.kind == "put":
                state[ev.key] = ev.value
            else:
                state.pop(ev.key, None)
        assert w.resyncs >= 1
        await w.aclose()


async def test_watch_from_compacted_revision_relists(shared_etcd):
    p = _p()
    async with await EtcdStore.connect(shared_etcd.url) as s:
        r0 = await s.put(p + "a", b"1")
        await s.put(p + "b", b"2")
        await s.delete(p + "b")
        rev = await s.put(p + "c", b"3")
        await s._kv.compact(rev)
        w = await s.watch_prefix(p, start_revision=r0)
        evs = [await _next(w) for _ in range(2)]
        assert {(e.kind, e.key, e.value) for e in evs} == {("put", p + "a", b"1"), ("put", p + "c", b"3")}
        assert all(e.resync for e in evs)
        await s.put(p + "d", b"4")
        ev = await _next(w)
        assert (ev.key, ev.resync) == (p + "d", False)
        await w.aclose()


async def test_connect_is_bounded():
    t0 = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="unreachable"):
        await EtcdStore.connect(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    assert time.monotonic() - t0 < 5


async def test_close_ends_watches(shared_etcd):
    s = await EtcdStore.connect(shared_etcd.url)
    w = await s.watch_prefix(_p())
    await s.close()
    assert [e async for e in w] == []


def test_bad_url():
    from dynamo_ext.discovery import EtcdCredentials

    with pytest.raises(ValueError, match="http://host:port"):
        EtcdStore("ftp://127.0.0.1:2379", credentials=EtcdCredentials())
    with pytest.raises(ValueError, match="needs TLS credentials"):
        EtcdStore("https://127.0.0.1:2379", credentials=EtcdCredentials())
    with pytest.raises(ValueError, match="one host name"):
        EtcdStore("http://etcd-a:2379,http://etcd-b:2379", credentials=EtcdCredentials())


async def test_host_name_endpoint(shared_etcd):
    """A host name goes through gRPC's dns:/// target (etcd3aio's ipv4: target takes addresses only)."""
    port = shared_etcd.url.rsplit(":", 1)[1]
    async with await EtcdStore.connect(f"http://localhost:{port}", connect_timeout=5) as s:
        key = _p() + "dns"
        await s.put(key, b"ok")
        assert await s.get(key) == b"ok"
