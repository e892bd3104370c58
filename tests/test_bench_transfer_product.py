"""`bench transfer`'s product-pull row: the product's WorkerTransports.pull against a peer PROCESS running
WorkerTransports (dynamo_ext.bench._pull_peer), through the bench's main(), tiny sizes, verified, and the
backend the product path chose named in the JSON and the table."""

from __future__ import annotations

import json
import os

import pytest

from dynamo_ext.serving.transports import ALL_BACKENDS
from dynamo_ext.transport.fallbacks.cma import cma_available
from dynamo_ext.transport.fallbacks.shm import shm_available


@pytest.fixture()
def bench(monkeypatch):
    # the bench module sets UCX_NET_DEVICES=lo when imported: keep it out of the rest of the session
    monkeypatch.setenv("UCX_NET_DEVICES", os.environ.get("UCX_NET_DEVICES", "lo"))
    from dynamo_ext.bench import transfer

    saved = dict(os.environ)
    yield transfer
    # the bench's NIXL agent sets its choice's UCX variables in os.environ (as a worker does): not for later tests
    for k in [k for k in os.environ if k not in saved]:
        del os.environ[k]
    os.environ.update(saved)


def test_product_pull_row_alone(bench, tmp_path):
    from dynamo_ext.transport import nixl_backend

    env_before = dict(os.environ)
    agents_before = list(nixl_backend._AGENTS_IN_PROCESS)  # other tests of this process may have left theirs
    out = tmp_path / "pp.json"
    rc = bench.main(["--size", "4MiB", "--paths", "host->host", "--reps", "2", "--methods", "product-pull",
                     "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["product-pull"], rows
    r = rows[0]
    assert r["verified"] is True and r["gbps"] > 0 and not r.get("error"), r
    assert r["chosen"] in ALL_BACKENDS and r["backends_used"] == [r["chosen"]] and not r["fell_back"], r
    assert r["backend"] == r["chosen"] and r["direction"] == "read" and "WorkerTransports.pull" in r["detail"], r
    if shm_available():  # select_transport's first backend for two host processes of one host (pools shared,
        assert (r["chosen"], r["kind"]) == ("shm", "host-shm"), r  # as the engine's CPU pool)
    elif cma_available():
        assert (r["chosen"], r["kind"]) == ("cma", "host-shm"), r
    assert r["descriptors"] > 0 and r["puller"] == "host" and r["peer"] == "host"
    md = out.with_suffix(".md").read_text()
    assert f"| host->host | {r['chosen']} READ product-pull |" in md, md
    assert out.with_suffix(".png").stat().st_size > 1000
    # selected alone: no NIXL agent of the bench's own, and the transports' UCX variables were put back
    assert nixl_backend._AGENTS_IN_PROCESS == agents_before
    assert dict(os.environ) == env_before


@pytest.mark.skipif(not cma_available(), reason="process_vm_readv not allowed here")
def test_product_pull_listed_after_the_path_rows(bench, tmp_path):
    out = tmp_path / "pp2.json"
    assert bench.main(["--size", "2MiB", "--paths", "host->host", "--reps", "1", "--methods",
                       "product-pull,cma-pull,planned", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["planned", "cma-pull", "product-pull"], rows
    assert all(r["verified"] for r in rows), rows
    assert (rows[1]["backend"], rows[1]["direction"], rows[1]["threads"]) == ("cma", "read", 1)


def test_peer_readline_keeps_lines_read_in_one_chunk():
    """A log line and the ready line in ONE pipe read (NIXL logs to stdout before the peer's ready line, and a
    loaded box delays the parent): the ready line must come back at once, not after the timeout."""
    import subprocess
    import sys
    import time

    from dynamo_ext.transport.probe import PeerProcess

    script = ("import sys, time; sys.stdout.write('NIXL INFO log\\n{\"event\": \"ready\"}\\n{\"ok\": true}\\n'); "
              "sys.stdout.flush(); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # _kill signals the process group
    try:
        time.sleep(0.5)  # all three lines wait in the pipe
        t0 = time.monotonic()
        assert PeerProcess._readline(proc, 5) == {"event": "ready"}
        assert PeerProcess._readline(proc, 5) == {"ok": True}
        assert time.monotonic() - t0 < 2
    finally:
        PeerProcess._kill(proc)


@pytest.mark.skipif(not shm_available(), reason="needs memfd_create / pidfd_open")
def test_default_output_never_overwrites_results_and_names_rows_and_the_best(bench, tmp_path, capsys):
    """Without --out the run writes into a NEW temporary directory and says where (committed results in
    benchmarks/results are never touched); rows are named backend + direction + method; the table ends with
    the best row per path and what set it; --out writes exactly there."""
    from pathlib import Path

    res = Path(bench.__file__).resolve().parents[2] / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in res.glob("transfer-*")} if res.is_dir() else {}
    assert bench.main(["--size", "2MiB", "--paths", "host->host", "--reps", "1", "--methods",
                       "copy,shm-pull,shm-pull-2t"]) == 0
    out = capsys.readouterr().out
    where = Path(out.strip().splitlines()[-1].split("results: ", 1)[1].split(" (+")[0])
    assert where.exists() and where.with_suffix(".md").exists() and not where.is_relative_to(res)
    assert before == ({p.name: p.stat().st_mtime_ns for p in res.glob("transfer-*")} if res.is_dir() else {})
    rows = json.loads(where.read_text())["results"]
    assert [bench.row_name(r) for r in rows] == ["local COPY memcpy", "shm READ shm-pull", "shm READ shm-pull-2t"]
    assert all(r["verified"] for r in rows), rows
    md = where.with_suffix(".md").read_text()
    best = max(rows[1:], key=lambda r: r["gbps"])
    assert "Best per path" in md and f"{bench.row_name(best)}" in md.split("Best per path")[1]
    assert f"{best['threads']} thread(s)" in md.split("Best per path")[1]
    again = tmp_path / "named.json"
    assert bench.main(["--size", "2MiB", "--paths", "host->host", "--reps", "1", "--methods", "copy",
                       "--out", str(again)]) == 0
    assert again.exists() and f"results: {again}" in capsys.readouterr().out


def test_nixl_rows_run_with_the_workers_ucx_choice(bench, monkeypatch):
    """Issue 17.0: the bench's NIXL agent and its peers take the UCX environment a worker on that device gets
    from select_transport (process_choice): on a node without active NVLink, cuda_ipc GET zero-copy on."""
    import dynamo_ext.topology as topology
    from tests.topology.topo_factory import cpu_node, nvlink_node

    node = nvlink_node(nvlink=False, nics=False)
    monkeypatch.setattr(topology, "collect_local_topology", lambda dev=None: node if dev is not None else cpu_node())
    for k in ("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "UCX_TLS"):
        monkeypatch.delenv(k, raising=False)
    b = bench._Bench(1 << 20, "tiny", 1, progress=None)
    gpu = b.nixl_choice(0)
    assert gpu["env"]["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "on", gpu
    assert "cuda_ipc" in gpu["env"]["UCX_TLS"], gpu
    assert "UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in b.nixl_choice(-1)["env"]  # a host peer has no CUDA memory
    monkeypatch.setenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "auto")  # what the user set wins, as in the workers
    assert bench._Bench(1 << 20, "tiny", 1, progress=None).nixl_choice(0)["env"]["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "auto"


def test_staged_row_reports_its_phases_and_ucx_env(bench, tmp_path):
    out = tmp_path / "st.json"
    rc = bench.main(["--size", "4MiB", "--paths", "host->host", "--reps", "3", "--methods", "planned-staged",
                     "--json", str(out)])
    assert rc == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["method"] == "planned-staged" and r["verified"] is True, r
    ph = r["phases_ms"]
    assert set(ph) == {"lock_ms", "gather_ms", "post_ms", "wire_ms", "ack_ms", "total_ms"}, ph
    assert all(v >= 0 for v in ph.values()) and ph["gather_ms"] > 0 and ph["ack_ms"] > 0, ph
    # medians of per-transfer phases: their sum is near the median total (the phases partition each transfer)
    assert abs(sum(v for k, v in ph.items() if k != "total_ms") - ph["total_ms"]) <= 0.5 * ph["total_ms"], ph
    assert r["ucx_env"].get("UCX_NET_DEVICES") == "lo" and "UCX_TLS" in r["ucx_env"], r
    md = out.with_suffix(".md").read_text()
    assert "peer scatter + ack" in md and "UCX environment from the workers' `select_transport` choice" in md


def test_gpu_nixl_choice_script_dry_run(tmp_path):
    """benchmarks/gpu_nixl_choice.sh --dry-run: the GPU script's two bench runs on host->host, both JSONs written,
    every row verified, the NIXL rows carrying their UCX environment, the tables printed last."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "benchmarks" / "gpu_nixl_choice.sh"), "--dry-run", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "same GPU: exit 0" in r.stdout and "GPU -> host: exit 0" in r.stdout, r.stdout[-2000:]
    for name in ("transfer-gpu-nixl-choice.json", "transfer-gpu-host-nixl-choice.json"):
        rows = json.loads((tmp_path / name).read_text())["results"]
        assert rows and all(x["verified"] is True for x in rows), rows
        assert all(x.get("ucx_env") for x in rows if x["backend"] == "nixl"), rows
    assert r.stdout.rstrip().splitlines()[-1].startswith("results: "), r.stdout[-500:]
