"""Bad input through Dynamo's HTTP frontend, real processes (issue 13, item 4): a prompt over the context and a
chat of 1,000 messages get HTTP 400 with a message naming the limit (streaming: an error event with code 400),
refused by the router before the prompt travels to a worker; normal requests keep completing while oversized
ones are refused; the model is listed only once a decode worker can serve it."""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request

from conftest import Graph

CTX = 512


def _post(base: str, path: str, body: dict, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _listed(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=2) as r:
            return "dx/tiny" in r.read().decode()
    except Exception:  # noqa: BLE001
        return False


def test_oversized_input_is_a_400_and_the_model_is_listed_only_when_servable(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="badin", model={"name": "dx/tiny", "preset": "tiny",
              "block_size": 16, "dtype": "float32", "max_model_len": CTX})
    try:
        p = g.start("prefill", wait=False)
        r = g.start("router", wait=False)  # before any decode worker: it must not register the model yet
        time.sleep(3.0)
        assert r.ready_line() is None  # waiting for a decode worker
        import subprocess
        import sys

        from fixtures.servers import free_port

        port = free_port()
        err = tmp_path / "frontend.err"
        from dynamo_ext.config import load_config
        from dynamo_ext.launch.plan import frontend_env

        fe_env = frontend_env(load_config(g.write_config("fe", frontend={"max_request_mb": 1})), g.env)
        fe = subprocess.Popen([sys.executable, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port",
                               str(port), "--router-mode", "round-robin", "--event-plane", "nats", "--namespace", "badin"],
                              env=fe_env, stdout=open(err, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        from conftest import Proc

        g.procs.append(Proc("frontend", fe, err, err))
        time.sleep(3.0)
        assert not _listed(base)  # nothing can serve it yet: not listed
        d = g.start("decode", wait=False)
        g.wait_ready([p, d, r])
        t_end = time.monotonic() + 60
        while not _listed(base):
            assert time.monotonic() < t_end, "the model was never listed"
            time.sleep(0.2)

        ok, body = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "hello there", "max_tokens": 4})
        assert ok == 200, body
        code, body = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "x" * 2000, "max_tokens": 4})
        assert code == 400 and "context of this model is 512 tokens" in body and "model.max_model_len" in body, body
        code, body = _post(base, "/v1/chat/completions", {"model": "dx/tiny", "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}] * 1000})
        assert code == 400 and "context" in body, body
        code, body = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "x" * 2000, "max_tokens": 4,
                                                     "stream": True})
        assert '"code":400' in body.replace(" ", "") and "context" in body, (code, body)
        assert "x" * 600 not in d.log()  # the oversized prompt never reached the decode worker
        # a body over frontend.max_request_mb (1 here) is refused by the frontend before it is parsed
        code, body = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "z" * 1_500_000, "max_tokens": 4})
        print(f"1.5 MB body with frontend.max_request_mb=1: HTTP {code}: {body[:120]!r}")
        assert code == 413, (code, body[:300])
        assert "z" * 600 not in r.log()  # it never reached the router

        # normal requests keep their latency while oversized ones are refused
        def normal() -> float:
            t0 = time.monotonic()
            c, b = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "the quick brown fox", "max_tokens": 8})
            assert c == 200, b
            return time.monotonic() - t0

        base_lat = statistics.median(normal() for _ in range(8))
        stop = threading.Event()
        refused: list[int] = []

        def flood() -> None:
            while not stop.is_set():
                c, _ = _post(base, "/v1/completions", {"model": "dx/tiny", "prompt": "y" * 200_000, "max_tokens": 4})
                refused.append(c)

        ths = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
        for t in ths:
            t.start()
        time.sleep(0.5)
        lat = [normal() for _ in range(8)]
        stop.set()
        for t in ths:
            t.join(60)
        print(f"normal request latency p50 {base_lat * 1e3:.1f} ms alone, {statistics.median(lat) * 1e3:.1f} ms with "
              f"4 clients of 200 KB prompts ({len(refused)} refused)")
        assert refused and set(refused) == {400}, refused
        assert statistics.median(lat) < max(10 * base_lat, 0.5), (base_lat, lat)
    finally:
        g.stop()
