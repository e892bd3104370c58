"""The fault campaign of issue 13 (``dynamo_ext/bench/faults.py``, ``dynamo-ext bench faults``) as tests: the
disaggregated graph (1 prefill + 2 decode, router, frontend; tiny CPU model; etcd and NATS started by the launch
on loopback) under 8 concurrent streaming requests, one fault at a time, with the launcher's supervision on.
Each row must lose no request and be back at full capacity (every process ready, every /health 200, the router
seeing every worker). The issue's 15 s target is a benchmark figure (benchmarks/results/reliability.md: 1.4-10.4 s
on the 2-core box); here the bound is a generous RECOVERY_BOUND_S, so a busy CI machine does not fail a correct
recovery (a CI run on a loaded box measured 28 s for sigkill-prefill).

The SIGKILL of a decode worker runs by default (~25 s); the whole campaign (6 faults, ~90 s) is ``slow``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_ext.bench.faults import FAULTS, run_campaign

RECOVERY_BOUND_S = 45.0  # the campaign gives up on a row at 60 s


def _procs_with_env(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != "Z" and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def _campaign(tmp_path: Path, faults: list[str]) -> dict:
    res = run_campaign(faults, concurrency=8, log_dir=tmp_path / "logs",
                       env={"DX_FAULT_TEST": str(tmp_path)}, max_s=60.0)  # fmt: skip
    assert _procs_with_env(str(tmp_path)) == []  # every process of the launch stopped, etcd/NATS included
    return res


def _check(row: dict) -> None:
    assert row["sent"] > 0 and row["completed"] == row["sent"] and row["failed"] == 0, row
    assert row["recovery_s"] is not None and row["recovery_s"] <= RECOVERY_BOUND_S, row


def test_sigkill_decode_under_load_restarted_no_request_lost(tmp_path):
    res = _campaign(tmp_path, ["sigkill-decode"])
    (row,) = res["rows"]
    _check(row)
    assert row["chunks_per_request"] >= 100, row  # the streams carried tokens
    assert row["victim"].startswith("decode-1: running ") and "running 0," not in row["victim"], row  # it hit streams
    assert any("decode-1 exited (killed by SIGKILL" in x for x in row["restarts"]), row
    assert any("decode-1 ready again" in x for x in row["restarts"]), row
    log = (tmp_path / "logs" / "decode-1.log").read_text(errors="replace")
    assert log.count("DYNAMO_EXT_READY") == 2 and "[supervisor] restart 1 of decode-1 (killed by SIGKILL before)" in log


@pytest.mark.slow
def test_fault_campaign_every_row_loses_nothing_and_recovers(tmp_path):
    res = _campaign(tmp_path, list(FAULTS))
    assert [r["fault"] for r in res["rows"]] == list(FAULTS)
    for row in res["rows"]:
        _check(row)
    by = {r["fault"]: r for r in res["rows"]}
    stop = by["sigstop-prefill"]
    assert stop["recovery_s"] >= 10.0, stop  # capacity is not claimed while the worker is stopped ...
    assert any(m.startswith("prefill-0 /health") for m in stop["missing_during_fault"]), stop  # ... and it was seen
    assert any("etcd ready again" in x for x in by["etcd-restart"]["restarts"])
    assert any("nats ready again" in x for x in by["nats-restart"]["restarts"])


def test_a_capacity_check_begun_during_a_stop_does_not_count(monkeypatch):
    """run_fault's recovery clock (no graph: the fault, the load and the checks are stand-ins with the timing of
    the real ones): a /health call to a SIGSTOPped worker waits and is answered once it continues, so a check
    begun 0.5 s before the end of the stop comes back clean after it. Counting it from when it began gave
    'capacity back after 9.08 s' for a 10 s stop in CI; only checks begun after the stop count."""
    import threading
    from types import SimpleNamespace

    from dynamo_ext.bench import faults

    stop_s = 1.0

    over = threading.Event()

    def inject(g, fault):
        threading.Timer(stop_s, over.set).start()
        return stop_s, over.is_set

    def capacity(g, prefill, decode):
        # the stopped worker's /health (timeout 1 s) is answered when it continues, at once after that
        if over.wait(1.0):
            return []
        return ["prefill-0 /health no answer TimeoutError"]

    class NoLoad:
        results: list = []

        def __init__(self, *a, **kw):
            pass

        def start(self):
            pass

        def stop(self, timeout=0):
            pass

        def in_flight_at(self, t):
            return 0

    monkeypatch.setattr(faults, "inject", inject)
    monkeypatch.setattr(faults, "capacity", capacity)
    monkeypatch.setattr(faults, "wait_capacity", lambda *a, **kw: [])
    monkeypatch.setattr(faults, "victim_state", lambda *a, **kw: "prefill-0")
    monkeypatch.setattr(faults, "Load", NoLoad)
    g = SimpleNamespace(events=[], base_url="", model="m")
    row = faults.run_fault(g, "sigstop-prefill", prefill=1, decode=1, concurrency=1, max_tokens=1, warm_s=0.0,
                           settle_s=0.5, max_s=10.0)
    assert row.recovery_s is not None and row.recovery_s >= stop_s, row
