"""Supervisor on plain child processes: readiness line, failure reports, reverse-order stop, no orphans."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dynamo_ext.launch.supervisor import (ChildExited, ChildSpec, ReadyTimeout, RestartPolicy, RestartsExhausted,
                                        Supervisor, group_members, ready_line)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


READY = """
    import signal, sys, time
    def bye(*_):
        open(sys.argv[1], "a").write(sys.argv[2] + "\\n"); sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("starting", flush=True)
    print("DYNAMO_EXT_READY role=agg instance_id=0x2a metrics=http://127.0.0.1:1/metrics", flush=True)
    while True: time.sleep(0.05)
"""


def spec(name: str, code: str, *args: str, **kw) -> ChildSpec:
    return ChildSpec(name, py(code) + list(args), dict(os.environ), **kw)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ready_line_and_graceful_reverse_stop(tmp_path):
    sup = Supervisor(tmp_path / "logs")
    order = tmp_path / "order"
    for comp in ("prefill", "decode", "frontend"):
        sup.start(spec(f"{comp}-0", READY, str(order), comp, component=comp, ready=ready_line("DYNAMO_EXT_READY")))
    lines = []
    sup.wait_ready(20, progress=lines.append)
    assert all(c.ready_info == {"role": "agg", "instance_id": "0x2a", "metrics": "http://127.0.0.1:1/metrics"}
               for c in sup.children)
    assert "ready 3/3" in lines[-1]
    result = sup.stop_all()
    assert result == [("frontend-0", "exit 0"), ("decode-0", "exit 0"), ("prefill-0", "exit 0")]
    assert order.read_text().split() == ["frontend", "decode", "prefill"]
    assert sup.leftovers() == []
    assert (tmp_path / "logs" / "decode-0.log").read_text().startswith("starting")


def test_exit_before_ready_reports_last_log_lines(tmp_path):
    sup = Supervisor(tmp_path)
    sup.start(spec("ok", READY, str(tmp_path / "o"), "ok", ready=ready_line("DYNAMO_EXT_READY")))
    sup.start(spec("bad", "import sys\nfor i in range(30): print(f'line {i}')\nsys.exit(3)",
                   ready=ready_line("DYNAMO_EXT_READY")))
    with pytest.raises(ChildExited) as e:
        sup.wait_ready(20)
    msg = str(e.value)
    assert "bad exited unexpectedly before it was ready (exit 3" in msg
    assert "| line 29" in msg and "| line 10" in msg and "| line 9\n" not in msg
    sup.stop_all()
    assert sup.leftovers() == []


def test_exit_while_serving_is_reported_and_tolerated_while_siblings_live(tmp_path):
    tolerated = []
    sup = Supervisor(tmp_path, on_tolerated=tolerated.append)
    die = ("import time\nprint('DYNAMO_EXT_READY role=decode', flush=True)\ntime.sleep(0.3)\n"
           "print('oops', flush=True)\nraise SystemExit(4)")
    sup.start(spec("decode-0", die, component="decode", ready=ready_line("DYNAMO_EXT_READY"), tolerate_exit=True))
    sup.start(spec("decode-1", READY, str(tmp_path / "o"), "d1", component="decode",
                   ready=ready_line("DYNAMO_EXT_READY"), tolerate_exit=True))
    sup.start(spec("router-0", die.replace("0.3", "1.0"), component="router", ready=ready_line("DYNAMO_EXT_READY")))
    sup.wait_ready(20)
    deadline = time.monotonic() + 10
    with pytest.raises(ChildExited) as e:
        while time.monotonic() < deadline:
            sup.check()
            time.sleep(0.05)
    assert [c.name for c in tolerated] == ["decode-0"]
    assert "router-0 exited unexpectedly while serving (exit 4" in str(e.value) and "| oops" in str(e.value)
    sup.stop_all()


def test_ready_timeout_names_the_pending(tmp_path):
    sup = Supervisor(tmp_path)
    sup.start(spec("slow", "import time\nprint('warming up', flush=True)\ntime.sleep(60)", ready=ready_line("X")))
    with pytest.raises(ReadyTimeout, match=r"not ready after 1s: slow(.|\n)*warming up"):
        sup.wait_ready(0.6)
    assert sup.stop_all() == [("slow", "killed by SIGTERM")]


def test_stubborn_child_and_grandchild_are_killed_no_orphan(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    code = f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        g = subprocess.Popen([sys.executable, "-c", ignore])
        open({str(pidfile)!r}, "w").write(str(g.pid))
        print("DYNAMO_EXT_READY role=router", flush=True)
        time.sleep(600)
    """
    sup = Supervisor(tmp_path)
    child = sup.start(spec("stubborn", code, ready=ready_line("DYNAMO_EXT_READY"), stop_timeout=0.5))
    sup.wait_ready(20)
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    gpid = int(Path(pidfile).read_text())
    assert alive(gpid) and set(group_members(child.pid)) == {child.pid, gpid}
    t = time.monotonic()
    assert sup.stop_all() == [("stubborn", "killed by SIGKILL after 0.5s SIGTERM timeout")]
    assert time.monotonic() - t < 5
    assert not alive(child.pid) and not alive(gpid)
    assert group_members(child.pid) == [] and sup.leftovers() == []


def test_ready_line_after_another_streams_unfinished_line(tmp_path):
    code = "import sys\nsys.stderr.write('partial warning without newline '); sys.stderr.flush()\n" \
           "print('DYNAMO_EXT_READY role=decode instance_id=7 metrics=m', flush=True)\nimport time; time.sleep(30)"
    sup = Supervisor(tmp_path)
    c = sup.start(spec("w", code, ready=ready_line("DYNAMO_EXT_READY")))
    sup.wait_ready(20)
    assert c.ready_info == {"role": "decode", "instance_id": "7", "metrics": "m"}
    sup.stop_all()


FLAKY = """
    import os, sys, time
    n = int(open(sys.argv[1]).read() or 0) if os.path.exists(sys.argv[1]) else 0
    open(sys.argv[1], "w").write(str(n + 1))
    print(f"DYNAMO_EXT_READY role=decode instance_id={n}", flush=True)
    time.sleep(float(sys.argv[2]))
    print(f"run {n} ends", flush=True)
    raise SystemExit(7)
"""


def test_exited_child_is_restarted_with_backoff_then_exhausted(tmp_path):
    events = []
    policy = RestartPolicy(enabled=True, max_restarts=2, window_s=60, backoff_initial_s=0.2, backoff_max_s=0.3)
    sup = Supervisor(tmp_path, policy=policy, on_event=lambda kind, c, text: events.append((kind, c.name, text)))
    sup.start(spec("decode-0", FLAKY, str(tmp_path / "runs"), "0.5", component="decode",
                   ready=ready_line("DYNAMO_EXT_READY")))
    sup.start(spec("router-0", READY, str(tmp_path / "o"), "r", component="router", ready=ready_line("DYNAMO_EXT_READY")))
    sup.wait_ready(20)
    assert sup.serving()
    first = sup.children[0]
    deadline = time.monotonic() + 20
    seen_not_serving = False
    with pytest.raises(RestartsExhausted) as e:
        while time.monotonic() < deadline:
            sup.check()
            seen_not_serving |= not sup.serving()
            time.sleep(0.02)
    assert seen_not_serving
    kinds = [(k, n) for k, n, _t in events]
    assert kinds == [("exited", "decode-0"), ("restarted", "decode-0"), ("ready", "decode-0"),
                     ("exited", "decode-0"), ("restarted", "decode-0"), ("ready", "decode-0")], kinds
    assert "restarting in 0.2s (exit 1 of at most 3 within 60s)" in events[0][2] and "| run 0 ends" in events[0][2]
    assert "restarting in 0.3s (exit 2 of at most 3" in events[3][2]  # 0.4 capped by backoff_max_s
    # the ready line of an earlier run does not make a restarted child ready: each run printed its own
    assert sup.children[0].ready_info == {"role": "decode", "instance_id": "2"}
    assert [c.generation for c in sup.all_children()] == [0, 1, 2, 0]
    assert sup.retired[0] is first and [c.name for c in sup.children] == ["decode-0", "router-0"]
    msg = str(e.value)
    assert "decode-0 exited 3 times within 60s (exit 7 the last time" in msg and "max_restarts: 2" in msg
    assert "| run 2 ends" in msg and "| [supervisor] restart 2 of decode-0 (exit 7 before)" in msg
    sup.stop_all()
    assert sup.leftovers() == []


def test_child_stopped_by_us_is_not_restarted_and_exit_0_is(tmp_path):
    """stop_group (the planner's scale-down) is never undone; an exit 0 nobody asked for (an outside SIGTERM
    that drained the worker) is restarted like any other exit."""
    events = []
    sup = Supervisor(tmp_path, policy=RestartPolicy(enabled=True, backoff_initial_s=0.05),
                     on_event=lambda kind, c, text: events.append((kind, c.name)))
    for i in range(3):
        sup.start(spec(f"decode-{i}", READY, str(tmp_path / "o"), str(i), component="decode",
                       ready=ready_line("DYNAMO_EXT_READY")))
    sup.wait_ready(20)
    assert sup.stop_group([sup.children[2]]) == [("decode-2", "exit 0")]
    os.kill(sup.children[1].pid, signal.SIGTERM)  # the child's handler exits 0
    deadline = time.monotonic() + 20
    while ("ready", "decode-1") not in events and time.monotonic() < deadline:
        sup.check()
        time.sleep(0.02)
    assert events == [("exited", "decode-1"), ("restarted", "decode-1"), ("ready", "decode-1")]
    assert sup.children[2].returncode == 0 and sup.children[2].generation == 0
    assert sup.serving()  # decode-2 was stopped on purpose: not missing capacity
    sup.stop_all()
    assert sup.leftovers() == []


class _Lines:
    def __init__(self, lines):
        self.lines, self.ready_info = lines, {}

    def new_lines(self):
        return self.lines


def test_ready_line_ignores_a_log_line_glued_onto_it():
    """A worker's READY line and the Rust logger share one log: the logger's line (ESC-coloured) may land
    right after the URL, before the newline; the URL must still be the URL."""
    glued = ("\x1b[2m2026-12-04T22:10:01Z\x1b[0m INFO other line DYNAMO_EXT_READY role=decode instance_id=42 "
             "metrics=http://127.0.0.1:4242/metrics\x1b[2m2026-12-04T22:10:01.5Z\x1b[0m \x1b[32m INFO\x1b[0m x=y")
    child = _Lines(["warming up", glued])
    assert ready_line("DYNAMO_EXT_READY")(child)
    assert child.ready_info == {"role": "decode", "instance_id": "42", "metrics": "http://127.0.0.1:4242/metrics"}
    child = _Lines(["NOTDYNAMO_EXT_READY role=x", "no ready here"])
    assert not ready_line("DYNAMO_EXT_READY")(child)


def test_children_outlive_the_thread_that_started_them(tmp_path):
    """PR_SET_PDEATHSIG follows the forking thread: children are forked from a thread as lasting as the
    process, so a supervisor used from a short-lived thread keeps them."""
    import threading

    sup = Supervisor(tmp_path)
    started = []
    t = threading.Thread(target=lambda: started.append(sup.start(spec("w", READY, str(tmp_path / "o"), "w"))))
    t.start()
    t.join()
    try:
        (child,) = started
        time.sleep(1.0)
        assert alive(child.proc.pid)
    finally:
        sup.stop_all()
