"""GPU transfers between two processes (skipped without CUDA): NIXL VRAM and CUDA IPC.

The peer (dynamo_ext.transport.probe peer) holds a device pool on GPU ``ddev``; this process holds
a device pool on GPU 0 (NIXL: the session agent of conftest.py; CUDA IPC: a backend per test).
Scattered block ids, READ and WRITE, verified byte for byte by sha256 of the chunks on both sides.
PeerInfo comes from the peer's stdout here (the GPU machine runs without etcd).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dynamo_ext.transport import KvPool, RemotePool, TransferOptions, preset, pull, push
from dynamo_ext.transport.probe import PeerProcess, digest, fill_pool, pool_bytes

pytestmark = pytest.mark.gpu


def _ngpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


CASES = [("nixl", 0), ("cuda_ipc", 0), ("nixl", -1)] + ([("nixl", 1), ("cuda_ipc", 1)] if _ngpus() > 1 else [])


@pytest.mark.parametrize("kind,ddev", CASES)
@pytest.mark.parametrize("direction", ["write", "read"])
async def test_gpu_scattered_blocks_byte_exact(kind, ddev, direction, request):
    layout = preset("llama3-8b", 48)  # 32 KiB chunks, 2 MiB blocks, 96 MiB pool
    peer = PeerProcess.start(backend=kind, name=f"gpu-peer-{kind}-{ddev}-{direction}-{os.getpid()}", layout=layout,
                             seed=3, extra=["--device", str(ddev)], timeout=120)
    try:
        if kind == "nixl":
            be = request.getfixturevalue("nixl_backend")
            pools = be.test_pools
            if "gpu-kv" not in pools:
                pools["gpu-kv"] = KvPool.allocate_device("gpu-kv", layout, 0)
                be.register_pool(pools["gpu-kv"])
            pool = pools["gpu-kv"]
        else:
            from dynamo_ext.transport.fallbacks.cuda_ipc import CudaIpcBackend

            be = CudaIpcBackend(f"ipc-{os.getpid()}-{ddev}-{direction}")
            pool = KvPool.allocate_device("gpu-kv", layout, 0)
            be.register_pool(pool)
        fill_pool(pool, 9)
        be.add_peer(peer.info)
        remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        rng = np.random.default_rng(5)
        src = [int(x) for x in rng.permutation(48)[:20]]
        dst = [int(x) for x in rng.permutation(48)[:20]]
        if direction == "write":
            st = await (await push(be, pool, remote, (src, dst), TransferOptions(deadline_s=30)))
            got = (await peer.acall({"cmd": "digest", "blocks": dst}))["sha256"]
            assert got == digest(pool_bytes(pool), layout, src)
        else:
            st = await (await pull(be, remote, pool, (src, dst), TransferOptions(deadline_s=30)))
            want = (await peer.acall({"cmd": "digest", "blocks": src}))["sha256"]
            assert digest(pool_bytes(pool), layout, dst) == want
        assert st.bytes == 20 * layout.block_bytes and st.backend == kind
        print(f"[{kind} GPU0->{'host' if ddev < 0 else f'GPU{ddev}'} {direction}] {st.gbps:.2f} GB/s, "
              f"{st.descriptors} descriptors")
        be.remove_peer(peer.info.agent_name)
    finally:
        peer.close()


@pytest.mark.parametrize("direction", ["write", "read"])
@pytest.mark.parametrize("ddev", [0] + ([1] if _ngpus() > 1 else []))
async def test_gpu_staged_one_descriptor(ddev, direction, nixl_backend):
    """pull/push (TransferOptions.stage=None) with device pools stage automatically. WRITE: gather on GPU0, one
    NIXL descriptor into the peer's device staging, the peer scatters and acks. READ: the peer gathers
    on request, one NIXL READ, scatter on GPU0, release."""
    import base64

    layout = preset("llama3-8b", 48)
    peer = PeerProcess.start(backend="nixl", name=f"gpu-staged-peer-{ddev}-{direction}-{os.getpid()}", layout=layout,
                             seed=3,
                             extra=["--device", str(ddev), "--staging-bytes", str(layout.pool_bytes)], timeout=120)
    try:
        be = nixl_backend
        pools = be.test_pools
        if "gpu-kv" not in pools:
            pools["gpu-kv"] = KvPool.allocate_device("gpu-kv", layout, 0)
            be.register_pool(pools["gpu-kv"])
        if "gpu-staging" not in pools:
            pools["gpu-staging"] = KvPool.allocate_device("gpu-staging", layout, 0)
            be.register_pool(pools["gpu-staging"], staging=True)
        pool = pools["gpu-kv"]
        fill_pool(pool, 21)
        be.add_peer(peer.info)
        await peer.acall({"cmd": "add_peer", "info": base64.b64encode(be.local_peer_info().encode()).decode()})
        rng = np.random.default_rng(6)
        src = [int(x) for x in rng.permutation(48)[:30]]
        dst = [int(x) for x in rng.permutation(48)[:30]]
        remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        if direction == "write":
            for _ in range(3):
                st = await (await push(be, pool, remote, (src, dst), TransferOptions(deadline_s=30)))
            got = (await peer.acall({"cmd": "digest", "blocks": dst}))["sha256"]
            assert got == digest(pool_bytes(pool), layout, src)
        else:
            for _ in range(3):
                st = await (await pull(be, remote, pool, (dst, src), TransferOptions(deadline_s=30)))
            want = (await peer.acall({"cmd": "digest", "blocks": dst}))["sha256"]
            assert digest(pool_bytes(pool), layout, src) == want
        assert st.descriptors == 1
        print(f"[nixl staged {direction} GPU0<->GPU{ddev}] {st.gbps:.2f} GB/s, {st.bytes} B in one descriptor")
        be.remove_peer(peer.info.agent_name)
    finally:
        peer.close()
