"""The shm backend (transport/fallbacks/shm.py) beyond the shared suite of test_transfer.py (which runs every
test there on shm too): shared pools (memfd, 0600, sealed), two threads byte for byte across processes,
mapping refused (wrong inode, another user, not in shared memory) with the product falling back to the next
backend, and nothing left behind: no /dev/shm entry ever, and no mapping of a SIGKILLed owner's pool after
remove_peer."""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dynamo_ext.transport import (
    BackendError,
    KvPool,
    MalformedPeerInfo,
    PeerInfo,
    PeerUnreachable,
    RemotePool,
    TransferOptions,
    preset,
    pull,
    push,
)
from dynamo_ext.transport.fallbacks.hostcopy import (
    copy_runs,
    copy_runs_native,
    native_available,
    native_unavailable_reason,
    split_parts,
)
from dynamo_ext.transport.fallbacks.shm import ShmBackend, map_region, shm_available
from dynamo_ext.transport.pool import SHM_SEALS, ShmHandle, shared_host_array, shm_handle_of
from dynamo_ext.transport.probe import PeerProcess, digest, pattern

pytestmark = pytest.mark.skipif(not shm_available(), reason="memfd_create / pidfd_open not available")


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module", autouse=True)
def no_dev_shm_leak():
    before = _dev_shm()
    yield
    assert _dev_shm() == before  # memfd pools never get a name in /dev/shm


def _mapped_inodes() -> set[int]:
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "memfd:dynamo-ext" in line:
                out.add(int(parts[4]))
    return out


def scattered(n: int, k: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).permutation(n)[:k]]


async def _backend(name: str, layout, threads: int | None = None) -> tuple[ShmBackend, KvPool]:
    be = ShmBackend(f"{name}-{os.getpid()}", threads=threads)
    await be.start()
    pool = KvPool.allocate_host("kv", layout, shared=True)
    be.register_pool(pool)
    return be, pool


def test_shared_pool_is_a_sealed_0600_memfd_and_its_descriptor_validates():
    lay = preset("tiny", 16)
    pool = KvPool.allocate_host("kv", lay, shared=True)
    h = pool.shm
    assert h is not None and h.pid == os.getpid() and h.offset == 0 and h.size == lay.pool_bytes
    st = os.stat(f"/proc/self/fd/{h.fd}")
    assert (st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid) == (h.inode, 0o600, os.getuid())
    assert fcntl.fcntl(h.fd, fcntl.F_GET_SEALS) & SHM_SEALS == SHM_SEALS
    with pytest.raises(PermissionError):
        os.ftruncate(h.fd, 4096)  # sealed: nobody can shrink the pages under a peer's mapping
    assert os.readlink(f"/proc/self/fd/{h.fd}").startswith("/memfd:dynamo-ext-kv")
    # a view of part of it (e.g. a tensor over the engine's buffer) carries the offset
    sub = shm_handle_of(pool.addr + lay.block_bytes, lay.block_bytes)
    assert sub is not None and sub.offset == lay.block_bytes and sub.inode == h.inode
    assert KvPool.allocate_host("plain", lay).shm is None
    info = PeerInfo(agent_name="a", backend="shm", pools=[pool.descriptor()], pid=os.getpid())
    assert PeerInfo.decode(info.encode()).pools[0].shm == h
    for bad in (msgspec.structs.replace(h, offset=h.size), msgspec.structs.replace(h, fd=-1)):
        blob = PeerInfo(agent_name="a", backend="shm", pid=os.getpid(),
                        pools=[msgspec.structs.replace(pool.descriptor(), shm=bad)]).encode()
        with pytest.raises(MalformedPeerInfo, match="shared-memory handle"):
            PeerInfo.decode(blob)


def test_the_fd_closes_with_the_last_view():
    import gc

    arr = shared_host_array(1 << 16, "gc-test")
    addr, n = arr.ctypes.data, arr.nbytes
    h = shm_handle_of(addr, n)
    assert h is not None and os.readlink(f"/proc/self/fd/{h.fd}").startswith("/memfd:dynamo-ext-gc-test")
    del arr
    gc.collect()
    assert shm_handle_of(addr, n) is None
    link = f"/proc/self/fd/{h.fd}"
    assert not os.path.exists(link) or not os.readlink(link).startswith("/memfd:dynamo-ext-gc-test")


def test_host_copy_executors_agree_and_stop():
    rng = np.random.default_rng(4)
    src = rng.integers(0, 255, 1 << 20, dtype=np.uint8)
    n = 300
    lens = rng.integers(1, 2048, n)
    s_off = rng.integers(0, (1 << 20) - 2048, n)
    d_off = np.cumsum(np.concatenate([[0], lens[:-1]])) + 7  # disjoint destination runs
    want = np.zeros(1 << 20, np.uint8)
    for d, s_, k in zip(d_off, s_off, lens):
        want[d:d + k] = src[s_:s_ + k]
    got = np.zeros(1 << 20, np.uint8)
    assert copy_runs(memoryview(got), memoryview(src), d_off.tolist(), s_off.tolist(), lens.tolist())
    assert np.array_equal(got, want)
    parts = split_parts(lens, 3)
    assert parts[0][0] == 0 and parts[-1][1] == n and all(a < b for a, b in parts)
    if not native_available():
        pytest.skip(f"no compiled host copy here: {native_unavailable_reason()}")
    got2 = np.zeros(1 << 20, np.uint8)
    assert copy_runs_native(got2.ctypes.data, src.ctypes.data, d_off, s_off, lens)
    assert np.array_equal(got2, want)
    stopped = np.zeros(1 << 20, np.uint8)
    assert not copy_runs_native(stopped.ctypes.data, src.ctypes.data, d_off, s_off, lens, np.ones(1, np.int32))
    assert not stopped.any()  # cancelled before the first run


async def test_register_refuses_a_pool_outside_shared_memory():
    be = ShmBackend(f"shm-plain-{os.getpid()}")
    await be.start()
    try:
        with pytest.raises(BackendError, match="shared=True"):
            be.register_pool(KvPool.allocate_host("kv", preset("tiny", 8)))
    finally:
        await be.close()


@pytest.mark.parametrize("threads, native", [(1, False), (1, True), (2, True)])
async def test_two_processes_byte_exact_read_and_write(threads, native):
    if native and not native_available():
        pytest.skip(f"no compiled host copy here: {native_unavailable_reason()}")
    lay = preset("tiny", 256)  # 8 KiB blocks: 200 blocks = 1.6 MiB per transfer (> 1 MiB: a worker thread)
    be = ShmBackend(f"shm-rw{threads}{native}-{os.getpid()}", threads=threads, native=native)
    await be.start()
    pool = KvPool.allocate_host("kv", lay, shared=True)
    be.register_pool(pool)
    assert (be.native, be.threads) == (native, threads)
    peer = PeerProcess.start(backend="shm", name=f"shm-rw-peer{threads}-{os.getpid()}", layout=lay, seed=7)
    try:
        be.add_peer(peer.info)
        assert be.is_mapped(peer.info.agent_name)
        remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        src, dst = scattered(256, 200, 1), scattered(256, 200, 2)
        st = await (await pull(be, remote, pool, (src, dst)))
        assert (st.backend, st.direction, st.bytes) == ("shm", "read", 200 * lay.block_bytes)
        assert digest(pool.host_view(), lay, dst) == peer.call({"cmd": "digest", "blocks": src})["sha256"]
        untouched = [b for b in range(256) if b not in set(dst)]
        assert not any(pool.host_view()[lay.chunk_offset(b, 0, 0):][:lay.chunk_bytes].any() for b in untouched)
        pattern(pool.host_view(), 99)
        rest = [b for b in range(256) if b not in set(src)]
        before_rest = peer.call({"cmd": "digest", "blocks": rest})["sha256"]
        st = await (await push(be, pool, remote, (dst, src), TransferOptions(notif=b"landed")))
        assert st.direction == "write"
        assert peer.call({"cmd": "digest", "blocks": src})["sha256"] == digest(pool.host_view(), lay, dst)
        assert peer.call({"cmd": "digest", "blocks": rest})["sha256"] == before_rest
        for _ in range(100):
            if "6c616e646564" in sum(peer.call({"cmd": "notifs"})["notifs"].values(), []):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the WRITE's notification did not arrive")
    finally:
        peer.close()
        await be.close()


async def test_mapping_refused_when_the_handle_does_not_match_the_file():
    lay = preset("tiny", 16)
    be, _ = await _backend("shm-forge", lay)
    peer = PeerProcess.start(backend="shm", name=f"shm-forge-peer-{os.getpid()}", layout=lay, seed=3)
    try:
        d = peer.info.pool("kv")
        forged = msgspec.structs.replace(peer.info, pools=[
            msgspec.structs.replace(d, shm=msgspec.structs.replace(d.shm, inode=d.shm.inode + 1))])
        with pytest.raises(PeerUnreachable, match="not the advertised"):
            be.add_peer(PeerInfo.decode(forged.encode()))
        wrong_fd = msgspec.structs.replace(peer.info, pools=[
            msgspec.structs.replace(d, shm=msgspec.structs.replace(d.shm, fd=0))])  # its stdin: a pipe
        with pytest.raises(PeerUnreachable, match="refused"):
            be.add_peer(PeerInfo.decode(wrong_fd.encode()))
        plain = msgspec.structs.replace(peer.info, pools=[msgspec.structs.replace(d, shm=None)])
        with pytest.raises(PeerUnreachable, match="not in shared memory"):
            be.add_peer(PeerInfo.decode(plain.encode()))
        assert not be.has_peer(peer.info.agent_name) and not _mapped_inodes() & {d.shm.inode}
        be.add_peer(peer.info)  # the genuine one maps
        assert d.shm.inode in _mapped_inodes()
    finally:
        peer.close()
        await be.close()
    assert d.shm.inode not in _mapped_inodes()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process as another user")
def test_a_pool_of_another_user_is_refused():
    # stdlib only (the system python: this venv may not be readable by another user): a sealed 0600 memfd
    code = ("import fcntl, json, os, sys\n"
            "fd = os.memfd_create('dynamo-ext-other-user', os.MFD_ALLOW_SEALING)\n"
            "os.fchmod(fd, 0o600); os.ftruncate(fd, 1 << 16); fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 7)\n"
            "st = os.fstat(fd)\n"
            "print(json.dumps([os.getpid(), fd, st.st_dev, st.st_ino, st.st_uid, st.st_size]), flush=True)\n"
            "sys.stdin.read()\n")
    exe = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    try:
        p = subprocess.Popen([exe, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             user=65534, group=65534, cwd="/")
    except OSError as e:
        pytest.skip(f"could not start a process as uid 65534 here: {e}")
    try:
        line = p.stdout.readline()
        if not line:
            pytest.skip("could not start a process as uid 65534 here")
        pid, fd, dev, ino, uid, size = __import__("json").loads(line)
        assert uid == 65534
        pidfd = os.pidfd_open(pid)
        try:
            for claimed in (uid, os.getuid()):  # whatever the handle claims, the process and file owner decide
                with pytest.raises(PeerUnreachable, match="uid"):
                    map_region(ShmHandle(pid=pid, fd=fd, dev=dev, inode=ino, uid=claimed, size=size), pidfd)
        finally:
            os.close(pidfd)
    finally:
        p.kill()
        p.wait(10)


async def test_sigkill_of_the_owner_fails_fast_and_leaves_no_mapping():
    lay = preset("tiny", 64)
    be, pool = await _backend("shm-kill", lay)
    peer = PeerProcess.start(backend="shm", name=f"shm-kill-peer-{os.getpid()}", layout=lay, seed=5)
    inode = peer.info.pool("kv").shm.inode
    try:
        be.add_peer(peer.info)
        remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        await (await pull(be, remote, pool, [1, 2, 3]))
        assert inode in _mapped_inodes()
        peer.kill()  # SIGKILL: the owner never cleans up
        with pytest.raises(PeerUnreachable, match="exited"):
            await (await pull(be, remote, pool, [1, 2, 3]))
        be.remove_peer(peer.info.agent_name)
        assert inode not in _mapped_inodes()  # nobody maps the dead owner's pages: the kernel freed them
    finally:
        peer.close()
        await be.close()


def test_engine_cpu_pool_is_shared_memory():
    from dynamo_ext.engine.kv_pool import PagedKvPool

    lay = preset("tiny", 8)
    buf = PagedKvPool(lay, "cpu").buffer
    kv = KvPool.from_tensor("kv", lay, buf)
    assert kv.shm is not None and kv.shm.size == lay.pool_bytes and not buf.any()
