"""Failure paths across two processes: the peer SIGKILLed during transfers never hangs the caller.

A fresh peer process per test (nixl and tcp) with a 256 MiB pool; this side keeps posting 16 MiB
transfers while a timer SIGKILLs the peer. The transfer in flight (or the next one) must fail with
PeerUnreachable or TransferTimeout within its deadline, later transfers to the dead peer fail fast,
and after remove_peer the peer is reported unknown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dynamo_ext.transport import KvPool, PeerUnreachable, RemotePool, TransferOptions, TransferTimeout, pull, push
from dynamo_ext.transport.probe import probe_layout

from conftest import BACKENDS, KINDS, _session_pool, start_peer  # noqa: E402  (tests/transport is on sys.path)

REMOTE_KINDS = [k for k in KINDS if k != "local"]
BIG = 256 << 20
DEADLINE = 2.0


@pytest.mark.parametrize("kind", REMOTE_KINDS)
@pytest.mark.parametrize("direction", ["write", "read"])
async def test_peer_sigkill_mid_transfer_fails_fast(kind, direction, shared_etcd, request):
    layout = probe_layout(BIG)  # 1 MiB chunks, 2 per block
    proc, info = start_peer(kind, f"victim-{kind}-{direction}-{os.getpid()}", layout, shared_etcd.url)
    try:
        if kind == "nixl":
            be = request.getfixturevalue("nixl_backend")
            pool = _session_pool(be, "big", layout)
        else:
            be = BACKENDS[kind](f"{kind}-kill-{os.getpid()}")
            await be.start()
            pool = KvPool.allocate_host("big", layout, shared=kind == "shm")
            be.register_pool(pool)
        be.add_peer(info)
        remote = RemotePool(info.agent_name, info.pool("kv"))
        opts = TransferOptions(deadline_s=DEADLINE)

        def move(ids: list[int], options: TransferOptions | None = opts):  # the direction under test
            return push(be, pool, remote, ids, options) if direction == "write" else pull(be, remote, pool, ids, options)

        per = 8  # blocks per transfer = 16 MiB
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            proc.kill()

        timer = threading.Timer(0.15, kill)
        timer.start()
        err: BaseException | None = None
        done = 0
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end:
            ids = [(done * per + i) % layout.num_blocks for i in range(per)]
            try:
                h = await move(ids)
                await h
                done += 1
            except (PeerUnreachable, TransferTimeout) as e:
                err = e
                break
        timer.cancel()
        failed_at = time.monotonic()
        assert err is not None, f"{done} transfers succeeded and none failed after the kill"
        assert killed_at, f"failed before the kill: {err!r}"
        assert failed_at - killed_at[0] < DEADLINE + 1.0, (failed_at - killed_at[0], err)
        assert done >= 1
        print(f"[{kind}/{direction}] {done} transfers, then {type(err).__name__} "
              f"{failed_at - killed_at[0]:.3f}s after the kill: {err}")
        # the dead peer keeps failing fast, never hangs
        t0 = time.monotonic()
        with pytest.raises((PeerUnreachable, TransferTimeout)):
            await (await move([0]))
        assert time.monotonic() - t0 < DEADLINE + 1.0
        be.remove_peer(info.agent_name)
        with pytest.raises(PeerUnreachable, match="unknown peer"):
            await move([0], None)
        if kind in BACKENDS:
            await be.close()
    finally:
        proc.kill()


@pytest.mark.parametrize("kind", REMOTE_KINDS)
def test_probe_pair_measures_bandwidth(kind):
    # its own process: this test process already holds a NIXL agent (two agents in one process use TCP)
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.transport.probe", "--bytes", str(32 << 20),
                        "--backend", kind], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, UCX_NET_DEVICES="lo"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == kind and out["gbps"] > 0.05
