"""A draining decode worker hands its running requests over (issue #6: migration executed through transport).

Real processes: Dynamo's HTTP frontend, our router (round-robin), 1 prefill + 2 decode workers (tiny CPU model,
KV by NIXL in host memory). Long greedy streams run on both decode workers; one of them gets SIGTERM (scale-down):
it exports every running request (``engine.detach``: the KV stays in its pool), ends each stream with a
``migrate`` chunk (KvHandle over the blocks + its PeerInfo + the tokens), and the router asks
``routing.plan_migrations(reason=drain)``: Move -> the other decode worker pulls the blocks with one planned
READ and continues. Asserted: every stream completes all its tokens, its text equals an uninterrupted greedy
run of the same prompt, the survivor pulled the KV from the drained worker (its transfer log names it, bytes
> 0), and the drained worker exits long before its streams would have ended.
"""

from __future__ import annotations

import re
import signal
import threading
import time

from conftest import Graph, hooks_env
from test_decode_kill import Stream, _stream

N_STREAMS = 4
LONG = 1500
STEP_DELAY_S = 0.004  # >= 6 s for LONG tokens on the slowed worker


def test_draining_decode_worker_migrates_its_streams(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="migr")
    try:
        p = g.start("prefill", wait=False)
        d0, d1 = g.start("decode", wait=False), g.start("decode", wait=False)
        r = g.start("router", wait=False)
        g.wait_ready([p, d0, d1, r])
        base = g.frontend("round-robin")

        streams = [Stream(f"stream {i} starts a very long greedy story about", LONG) for i in range(N_STREAMS)]
        threads = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in streams]
        for t in threads:
            t.start()
        t_end = time.monotonic() + 30
        while not all(s.chunks > 5 or s.done for s in streams):
            assert time.monotonic() < t_end, [(s.chunks, s.error) for s in streams]
            time.sleep(0.05)
        running = [d0.health()["running"], d1.health()["running"]]
        assert min(running) > 0, running
        t_term = time.monotonic()
        d0.popen.send_signal(signal.SIGTERM)
        rc = d0.popen.wait(30)
        t_exit = time.monotonic() - t_term
        for t in threads:
            t.join(90)
        summary = [(s.chunks, s.tokens, s.finish, s.error) for s in streams]
        print(f"drained worker exited {t_exit:.2f} s after SIGTERM (rc {rc}); streams:", summary)
        assert rc == 0
        assert all(s.tokens == LONG and s.finish == "length" and not s.error for s in streams), summary

        rlog = re.sub(r"\x1b\[[0-9;]*m", "", r.err_path.read_text(errors="replace"))
        moves = re.findall(rf"decode worker {d0.instance_id} drains after (\d+) tokens: move to {d1.instance_id}", rlog)
        assert len(moves) == running[0] and all(int(n) > 0 for n in moves), rlog[-3000:]
        dlog = re.sub(r"\x1b\[[0-9;]*m", "", d1.err_path.read_text(errors="replace"))
        pulls = re.findall(rf"kv transfer received: peer={d0.instance_id} .*?bytes=(\d+)", dlog)
        assert len(pulls) == running[0] and all(int(b) > 0 for b in pulls), dlog[-3000:]
        assert "prefilling locally" not in dlog  # every hand-over was a pull, no recompute fallback

        # greedy: each handed-over stream goes on with exactly the tokens of an uninterrupted run
        again = [Stream(s.prompt, LONG) for s in streams]
        ths = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in again]
        for t in ths:
            t.start()
        for t in ths:
            t.join(90)
        assert all(a.tokens == LONG and not a.error for a in again), [(a.tokens, a.error) for a in again]
        diff = [i for i, (s, a) in enumerate(zip(streams, again)) if s.text != a.text]
        assert not diff, f"streams {diff} differ from an uninterrupted greedy run"
    finally:
        g.stop()


def test_router_rebalances_running_streams_onto_a_new_decode_worker(servers, model_dir, tmp_path):
    """Imbalance: 4 long streams run on the only decode worker; a second one starts. The router's rebalancing
    round (router.rebalance_s) asks routing.plan_migrations(reason=imbalance), exports the planned requests
    from the busy worker (its ``export`` endpoint) and the new worker pulls their KV and continues them: the
    texts equal uninterrupted greedy runs, the new worker's transfer log names the busy one."""
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="rebal")
    try:
        p = g.start("prefill", wait=False)
        # d0's steps are slowed (test hook) so that its streams outlast the new worker's start-up on any machine
        d0 = g.start("decode", wait=False, extra_env=hooks_env(DXTEST_STEP_DELAY_S=str(STEP_DELAY_S)))
        cfg = g.write_config("rebal", router={"policy": "round-robin", "disagg_min_prompt_tokens": 0, "rebalance_s": 0.5})
        r = g.start("router", wait=False, config=cfg)
        g.wait_ready([p, d0, r])
        base = g.frontend("round-robin")
        n_tok = LONG
        streams = [Stream(f"stream {i} keeps telling a very long greedy story about", n_tok) for i in range(N_STREAMS)]
        threads = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in streams]
        for t in threads:
            t.start()
        t_end = time.monotonic() + 30
        while not all(s.chunks > 1 or s.done for s in streams):
            assert time.monotonic() < t_end, [(s.chunks, s.error) for s in streams]
            time.sleep(0.05)
        assert d0.health()["running"] == N_STREAMS
        d1 = g.start("decode")  # the new, empty decode worker
        for t in threads:
            t.join(90)
        summary = [(s.chunks, s.tokens, s.finish, s.error) for s in streams]
        assert all(s.tokens == n_tok and s.finish == "length" and not s.error for s in streams), summary
        rlog = re.sub(r"\x1b\[[0-9;]*m", "", r.err_path.read_text(errors="replace"))
        moved = re.findall(rf"decode worker {d0.instance_id} rebalances after (\d+) tokens: rebalance to {d1.instance_id}", rlog)
        print("rebalanced streams (tokens streamed before the move):", moved)
        assert 1 <= len(moved) < N_STREAMS, rlog[-3000:]  # some moved, not all: balance, not evacuation
        dlog = re.sub(r"\x1b\[[0-9;]*m", "", d1.err_path.read_text(errors="replace"))
        pulls = re.findall(rf"kv transfer received: peer={d0.instance_id} .*?bytes=(\d+)", dlog)
        assert len(pulls) == len(moved) and all(int(b) > 0 for b in pulls), dlog[-3000:]

        again = [Stream(s.prompt, n_tok) for s in streams]
        ths = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in again]
        for t in ths:
            t.start()
        for t in ths:
            t.join(90)
        diff = [i for i, (s, a) in enumerate(zip(streams, again)) if s.text != a.text]
        assert not diff, f"streams {diff} differ from an uninterrupted greedy run"
    finally:
        g.stop()
