"""A worker record disappears when its owner process is SIGKILLed and its lease lapses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dynamo_ext.discovery.etcd import EtcdStore
from dynamo_ext.discovery.records import WorkerRegistry, decode_record

REPO = Path(__file__).resolve().parents[2]
TTL = 2

OWNER = """
import asyncio, os, sys, time
from dynamo_ext.discovery.etcd import EtcdStore
from dynamo_ext.discovery.records import WorkerRecord, encode_record

async def main(url, ns):
    store = await EtcdStore.connect(url)
    lease = await store.grant_lease(%d)
    rec = WorkerRecord(namespace=ns, component="backend", role="decode", instance_id=lease.id, model="tiny",
                       host="127.0.0.1", pid=os.getpid(), started_at=time.time())
    await store.put(rec.key, encode_record(rec), lease=lease)
    print("ready", rec.key, flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
""" % TTL


async def test_record_vanishes_after_owner_sigkill(shared_etcd, ns):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, shared_etcd.url, ns], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.startswith("ready "), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        key = line.split()[1]
        async with await EtcdStore.connect(shared_etcd.url) as s, WorkerRegistry(s, ns) as reg:
            rec = decode_record(key, await s.get(key))
            assert rec.pid == proc.pid and key in reg.records
            # kept alive beyond one TTL while the owner lives
            await asyncio.sleep(TTL + 0.5)
            assert await s.get(key) is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
            t0 = time.monotonic()
            await reg.wait_for(lambda r: key not in r, timeout=TTL + 3)
            gone_after = time.monotonic() - t0
            assert await s.get(key) is None
            assert gone_after <= TTL + 3
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
