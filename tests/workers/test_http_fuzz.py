"""HTTP fuzz of the disaggregated graph through Dynamo's frontend (issue 13, item 7): 240 seeded bodies —
malformed JSON, wrong types, out-of-range numbers, unknown models, empty and oversized prompts, odd unicode,
huge max_tokens, bad sampling values, streaming and not, completions and chat — none may get a 5xx, and the
graph answers a normal request correctly afterwards (no worker restarted: their pids are unchanged)."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request

from conftest import Graph

N = 240


def _send(base: str, path: str, raw: bytes) -> int:
    req = urllib.request.Request(base + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def _bodies(seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    junk = ["", "{", "[]", "null", "1", '{"model": }', "\x00\x01", '{"prompt": "a"', "{" * 200, "\ud800"]
    values = [None, True, -1, 0, 1, 2**31, -(2**63), 1e308, float("nan"), "", "x", "🦄" * 50, [], {}, [1, 2],
              {"a": 1}, "dx/tiny", "other/model", 4, 16, 10**9, -5, 0.5, 3.0, "\u0000", "a" * 5000]
    keys = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stream", "n", "stop", "seed",
            "logprobs", "echo", "presence_penalty", "frequency_penalty", "stream_options", "min_tokens", "bogus"]
    out: list[tuple[str, bytes]] = []
    for i in range(N):
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        kind = i % 4
        if kind == 0:  # not even JSON, or JSON of the wrong shape
            raw = rng.choice(junk).encode("utf-8", "surrogatepass")
        else:
            body: dict = {"model": "dx/tiny"}
            if path.endswith("completions") and "chat" not in path:
                body["prompt"] = rng.choice(["hello", "", " ", "x" * rng.randrange(0, 3000), [1, 2, 3], ["a", "b"]])
            else:
                body["messages"] = rng.choice([[{"role": "user", "content": "hi"}], [], [{"role": "bogus"}],
                                               [{"role": "user", "content": ""}], "hi",
                                               [{"role": "user", "content": "x" * rng.randrange(0, 3000)}]])
            body["max_tokens"] = rng.choice([1, 4, 0, -1, 10**9, "8", None])
            for _ in range(rng.randrange(0, 4)):
                body[rng.choice(keys)] = rng.choice(values)
            raw = json.dumps(body, allow_nan=True).encode()
        out.append((path, raw))
    return out


def test_fuzzed_http_bodies_never_get_a_5xx(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="fuzz",
              model={"name": "dx/tiny", "preset": "tiny", "block_size": 16, "dtype": "float32", "max_model_len": 1024})
    try:
        p, d, r = g.start("prefill", wait=False), g.start("decode", wait=False), g.start("router", wait=False)
        g.wait_ready([p, d, r])
        base = g.frontend("round-robin")
        pids = [x.popen.pid for x in (p, d, r)]
        codes: dict[int, int] = {}
        bad: list[tuple[int, str, bytes]] = []
        for path, raw in _bodies(seed=1234):
            c = _send(base, path, raw)
            codes[c] = codes.get(c, 0) + 1
            if c >= 500:
                bad.append((c, path, raw[:200]))
        print("status codes of", N, "fuzzed bodies:", dict(sorted(codes.items())))
        assert not bad, bad[:10]
        assert codes.get(200, 0) >= 5 and sum(v for k, v in codes.items() if 400 <= k < 500) > 50, codes
        assert all(x.popen.poll() is None for x in (p, d, r)) and [x.popen.pid for x in (p, d, r)] == pids
        ok = _send(base, "/v1/completions", json.dumps({"model": "dx/tiny", "prompt": "hello", "max_tokens": 4}).encode())
        assert ok == 200
    finally:
        g.stop()
