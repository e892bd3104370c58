"""NCCL send/recv comparison rows: the same two-process code path, gloo backend on host memory."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")


@pytest.mark.parametrize("slice_bytes", [0, 96 << 10])
def test_nccl_pair_gloo_two_processes_verified(slice_bytes):
    from dynamo_ext.transport.fallbacks import nccl

    rows = nccl.run_pair("gloo", layout_name="tiny", size_bytes=1 << 20, reps=1, slice_bytes=slice_bytes, timeout=120)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"nccl-single", "nccl-planned"}
    assert all(r["verified"] and r["gbps"] > 0 for r in rows)
    layout, src, dst, nbytes = nccl.bench_case("tiny", 1 << 20)
    assert by["nccl-single"]["slice_bytes"] == nbytes
    assert by["nccl-planned"]["descriptors"] > 1  # scattered ids: many merged runs
    assert by["nccl-planned"]["slices"] == (1 if slice_bytes == 0 else -(-nbytes // by["nccl-planned"]["slice_bytes"]))


def test_nccl_pair_rejects_unknown_backend_and_method():
    from dynamo_ext.transport.fallbacks import nccl

    with pytest.raises(ValueError, match="backend='mpi'"):
        nccl.run_pair("mpi")
    with pytest.raises(ValueError, match="nccl-bogus"):
        nccl.run_pair("gloo", methods=["nccl-bogus"])


def test_bench_case_same_in_both_ranks_and_sized():
    from dynamo_ext.transport.fallbacks import nccl

    a = nccl.bench_case("llama3-70b", 1 << 30)
    b = nccl.bench_case("llama3-70b", 1 << 30)
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    assert len(a[1]) == 204 and a[3] <= 1 << 30 and len(set(a[2])) == len(a[2])


def test_peer_clear_command_sets_every_byte():
    """The sweep/probe verification resets the peer with ``clear`` (one fill): a real peer process."""
    import hashlib
    import os

    from dynamo_ext.transport.probe import PeerProcess, probe_layout

    lay = probe_layout(4 << 20)
    with PeerProcess.start(backend="tcp", name=f"clear-peer-{os.getpid()}", layout=lay, seed=3, timeout=60) as peer:
        before = peer.call({"cmd": "digest"})["sha256"]
        assert peer.call({"cmd": "clear", "value": 7})["ok"]
        after = peer.call({"cmd": "digest"})["sha256"]
    assert after != before and after == hashlib.sha256(bytes([7]) * lay.pool_bytes).hexdigest()


def test_fingerprint_detects_a_misplaced_chunk_and_matches_equal_chunks():
    import numpy as np

    from dynamo_ext.transport import KvPool, preset
    from dynamo_ext.transport.probe import fingerprint, pattern

    lay = preset("tiny", 16)
    a, b = KvPool.allocate_host("a", lay), KvPool.allocate_host("b", lay)
    pattern(a.host_view(), 3)
    b.host_view().fill(0)
    src, dst = [1, 5, 9], [0, 2, 4]
    for s, d in zip(src, dst):  # copy the chunks by hand: same bytes, other places
        for layer in range(lay.num_layers):
            for kv in (0, 1):
                so, do = lay.chunk_offset(s, layer, kv), lay.chunk_offset(d, layer, kv)
                b.host_view()[do:do + lay.chunk_bytes] = a.host_view()[so:so + lay.chunk_bytes]
    assert fingerprint(a, lay, src) == fingerprint(b, lay, dst)
    assert fingerprint(b, lay, [2, 0, 4]) != fingerprint(a, lay, src)  # blocks swapped
    o = lay.chunk_offset(4, 0, 1)
    b.host_view()[o + 8:o + 16] = np.frombuffer(b.host_view()[o:o + 8].tobytes(), dtype=np.uint8)  # one word moved
    assert fingerprint(b, lay, dst) != fingerprint(a, lay, src)
