"""A decode worker SIGKILLed while requests stream through it (real processes: Dynamo's HTTP frontend,
router policy round-robin, 1 prefill + 2 decode workers, tiny CPU model, KV by NIXL).

Six long streaming completions (ignore_eos, many tokens) are started; once every stream has produced
tokens, the decode worker serving some of them is SIGKILLed. Asserted:

- every in-flight stream ends, bounded by a timeout (none hangs; measured: ~0.5 s after the kill);
- the streams on the killed worker are re-run by the router on the surviving decode worker from prompt +
  the tokens already streamed (a local prefill there, max_tokens reduced), inside the same client stream:
  every stream completes all its tokens with finish ``length``, and its text equals an uninterrupted greedy
  run of the same prompt (asserted by running the prompts again after the kill);
- the graph keeps serving: new requests complete, on the surviving decode worker (its
  ``dynamo_ext_worker_requests_total{outcome="ok"}`` grows by their number), also while the dead
  worker's instance may still be listed (until its lease expires, a call to it fails before the first
  token and the router retries on the other one).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from conftest import Graph

N_STREAMS = 6
LONG = 1500  # tokens per in-flight stream: seconds of decoding on 2 cores
END_TIMEOUT_S = 20.0


@dataclass
class Stream:
    prompt: str
    max_tokens: int
    status: int = 0
    chunks: int = 0  # SSE data chunks with a choice (the detokenizer may hold bytes back: text can be empty)
    tokens: int = 0  # usage.completion_tokens of the final chunk
    finish: str | None = None
    error: str | None = None
    text: str = ""
    done: float = 0.0
    events: list[str] = field(default_factory=list)


def _stream(base: str, s: Stream, timeout: float = 60.0) -> None:
    u = urlparse(base)
    body = json.dumps({"model": "dx/tiny", "prompt": s.prompt, "max_tokens": s.max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        s.status = r.status
        if r.status != 200:
            s.error = f"HTTP {r.status}: {r.read()[:500]!r}"
            return
        for raw in r:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            s.events.append(line[:300])
            if line.startswith("event:") and "error" in line:
                s.error = s.error or line
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                d = json.loads(data)
            except ValueError:
                s.error = s.error or data[:300]
                continue
            if "error" in d and not d.get("choices"):
                s.error = s.error or json.dumps(d)[:300]
            if d.get("usage"):
                s.tokens = int(d["usage"].get("completion_tokens") or 0)
            for c in d.get("choices") or []:
                s.chunks += 1
                s.text += c.get("text") or ""
                if c.get("finish_reason"):
                    s.finish = c["finish_reason"]
    except Exception as e:  # noqa: BLE001 - connection closed mid-stream counts as an error end
        s.error = s.error or f"{type(e).__name__}: {e}"
    finally:
        s.done = time.monotonic()


def _ok_count(metrics: str) -> float:
    m = re.search(r'^dynamo_ext_worker_requests_total\{[^}]*outcome="ok"[^}]*\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_decode_worker_killed_mid_stream(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="dkill")
    try:
        p = g.start("prefill", wait=False)
        d0, d1 = g.start("decode", wait=False), g.start("decode", wait=False)
        r = g.start("router", wait=False)
        g.wait_ready([p, d0, d1, r])
        base = g.frontend("round-robin")

        streams = [Stream(f"stream number {i} tells a long story about", LONG) for i in range(N_STREAMS)]
        threads = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in streams]
        for t in threads:
            t.start()
        t_end = time.monotonic() + 30
        while not all(s.chunks > 0 or s.done for s in streams):
            assert time.monotonic() < t_end, [(s.chunks, s.error) for s in streams]
            time.sleep(0.05)
        # the first token reaches the client from the prefill result, maybe before the decode worker admitted
        # the stream: wait until every stream runs on a decode worker
        while True:
            running = [d0.health()["running"], d1.health()["running"]]
            if sum(running) == N_STREAMS or time.monotonic() > t_end:
                break
            time.sleep(0.02)
        assert sum(running) == N_STREAMS and min(running) > 0, running  # round-robin split them
        victim, survivor = d0, d1
        on_victim = running[0]
        ok_before = _ok_count(survivor.metrics())

        t_kill = time.monotonic()
        victim.popen.kill()
        victim.popen.wait()
        for t in threads:
            t.join(max(0.1, t_kill + END_TIMEOUT_S - time.monotonic()))
        hung = [i for i, t in enumerate(threads) if t.is_alive()]
        assert not hung, f"streams {hung} still open {END_TIMEOUT_S} s after the kill"
        ends = [round(s.done - t_kill, 2) for s in streams]
        summary = [(s.chunks, s.tokens, s.finish, s.error) for s in streams]
        print("stream ends after the kill (s):", ends)
        print("streams (chunks, tokens, finish, error):", summary)
        # every stream completes every token: the killed worker's streams were re-run on the survivor from
        # prompt + streamed tokens, inside the same client stream
        assert all(s.tokens == LONG and s.finish == "length" and not s.error for s in streams), summary
        rlog = re.sub(r"\x1b\[[0-9;]*m", "", r.err_path.read_text(errors="replace"))
        reruns = re.findall(rf"decode worker {victim.instance_id} died after (\d+) tokens", rlog)
        assert len(reruns) == on_victim and all(int(n) > 0 for n in reruns), rlog[-3000:]
        # greedy: a re-run stream has exactly the text an uninterrupted run gives (same prompts again, on the
        # survivor, after the kill)
        again = [Stream(s.prompt, LONG) for s in streams]
        ths = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in again]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        assert all(a.tokens == LONG and not a.error for a in again), [(a.tokens, a.error) for a in again]
        diff = [i for i, (s, a) in enumerate(zip(streams, again)) if s.text != a.text]
        assert not diff, f"streams {diff} differ from an uninterrupted greedy run"

        # the graph keeps serving, on the surviving decode worker
        fresh = [Stream(f"after the kill {i}", 8) for i in range(6)]
        t0 = time.monotonic()
        ths = [threading.Thread(target=_stream, args=(base, s), daemon=True) for s in fresh]
        for t in ths:
            t.start()
        for t in ths:
            t.join(30)
        summary = [(s.chunks, s.tokens, s.finish, s.error) for s in fresh]
        print(f"6 new requests after the kill: {time.monotonic() - t0:.2f} s;", summary)
        assert all(s.finish == "length" and s.tokens == 8 and not s.error for s in fresh), summary
        ok_after = _ok_count(survivor.metrics())
        # the survivor completed its own streams, the re-runs, the uninterrupted repeats and the fresh requests
        assert ok_after - ok_before == N_STREAMS + len(again) + len(fresh), (ok_before, ok_after)
        assert survivor.health()["status"] == "ok" and p.health()["status"] == "ok"
        assert r.popen.poll() is None
    finally:
        g.stop()
