"""Correctness on real text (issue 15.3): SmolLM2-135M-Instruct (the default model, real weights) through real
graphs (launch_graph: etcd, NATS, Dynamo's frontend, our router, worker processes), greedy.

* Disaggregated == aggregated, token for token: 32 chat prompts (tests/launch/data/smollm2_chat_prompts.json: 4
  system prompts of 242-282 tokens x 8 user questions, SmolLM2's ChatML) through an aggregated graph (1 agg
  worker) and a disaggregated one (1 prefill + 1 decode; the router disaggregates every prompt:
  ``disagg_min_prompt_tokens: 0, local_prefill: false``). The token ids come from the completions API itself
  (``nvext.extra_fields: ["completion_token_ids"]``: Dynamo's frontend returns the ids it detokenized). Requests
  that share a system prompt share its KV blocks: the prefill worker and the agg worker find them in their prefix
  caches, and the decode worker's prefix-aware pull reads only the blocks it lacks. The engines' own counters
  (``/health`` ``engine``) are asserted equal to the hits the prompts' tokens predict (full 16-token blocks of the
  longest prefix shared with an earlier prompt): prefill worker == agg worker == decode worker's pull.
  The requests go one at a time on each graph (the two graphs side by side): each prompt then meets the same
  prefix-cache state and decodes at batch 1 on both graphs, so equal outputs are what the design promises (no
  tolerance on tokens).
* KV migration on the real model: a decode worker is added, a long greedy stream runs, the decode worker that
  holds it is drained mid-stream (SIGTERM: ``workers.migrate_on_drain``); the router moves the stream, the other
  decode worker pulls its KV from the drained one and goes on. The client's token ids equal the uninterrupted
  greedy run of the same prompt on the aggregated graph, token for token.

Two graph starts (module scope); ~60-90 s on 2 shared cores."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.infra import free_port

DATA = json.loads((Path(__file__).parent / "data" / "smollm2_chat_prompts.json").read_text())
BLOCK = 16
N_OUT = 16  # output tokens per request of the disagg == agg comparison
N_LONG = 160  # output tokens of the migrated stream
MOVE_AFTER = 12  # tokens the client has seen before the decode worker holding the stream is drained


def chatml(system: str, user: str) -> str:
    """SmolLM2's chat template (tokenizer_config.json), as the frontend renders /v1/chat/completions."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# interleaved: question 0 of each system prompt, then question 1, ... (the first of each is a cache miss)
PROMPTS = [chatml(s["text"], s["questions"][q]) for q in range(8) for s in DATA["systems"]]
LONG_PROMPT = ("<|im_start|>user\nTell me a long story about a lighthouse keeper who finds a message in a bottle, "
               "with many details about the sea, the weather and the people of the village.<|im_end|>\n"
               "<|im_start|>assistant\n")


def config(namespace: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"preset": "smollm2-135m-instruct", "block_size": BLOCK, "dtype": "float32"},
        "kv_transfer": {"backend": "nixl", "timeout_ms": 5000},
        "discovery": {"namespace": namespace, "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}},
    }
    cfg.update(over)
    return cfg


def completion_ids(base: str, model: str, prompt: str, max_tokens: int, **extra: Any) -> tuple[list[int], dict]:
    """Greedy, not streamed: (the generated token ids from the frontend's nvext, the response)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False,
            "nvext": {"extra_fields": ["completion_token_ids"]}, **extra}
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        resp = json.loads(r.read())
    ids = resp.get("nvext", {}).get("completion_token_ids")
    assert isinstance(ids, list) and len(ids) == resp["usage"]["completion_tokens"], resp
    return ids, resp


class Stream:
    """A streamed greedy completion read chunk by chunk: the token ids of each chunk (nvext), finish_reason."""

    def __init__(self, base: str, model: str, prompt: str, max_tokens: int) -> None:
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                     "ignore_eos": True, "nvext": {"extra_fields": ["completion_token_ids"]}}
        self.url = urlparse(base)
        self.ids: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=120)
            conn.request("POST", "/v1/completions", body=json.dumps(self.body),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                self.error = f"HTTP {r.status}: {r.read()[:500]!r}"
                return
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if line.startswith("event:") and "error" in line:
                    self.error = self.error or line
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                d = json.loads(data)
                if "error" in d and not d.get("choices"):
                    self.error = self.error or data[:300]
                self.ids += (d.get("nvext") or {}).get("completion_token_ids") or []
                for c in d.get("choices") or []:
                    self.finish = c.get("finish_reason") or self.finish
        except Exception as e:  # noqa: BLE001 - reported by the test's assertions
            self.error = f"{type(e).__name__}: {e}"


def health(child: Any) -> dict[str, Any]:
    url = child.metrics_url.rsplit("/", 1)[0] + "/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read() or b"{}"))


def engines(g: Any, role: str) -> dict[str, float]:
    """The engine counters of every live worker of ``role``, summed (their /health ``engine``)."""
    out: dict[str, float] = {}
    for c in g.alive():
        if c.role == role:
            for k, v in (health(c).get("engine") or {}).items():
                out[k] = out.get(k, 0) + v
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def expected_hits(prompts_ids: list[list[int]]) -> int:
    """Prompt tokens a prefix cache that keeps every prompt's full blocks serves: per prompt, the full blocks
    of its longest prefix shared with an earlier prompt (a prompt never reuses its own last token's block)."""
    total = 0
    for i, ids in enumerate(prompts_ids):
        best = 0
        for prev in prompts_ids[:i]:
            n = 0
            while n < min(len(ids), len(prev)) and ids[n] == prev[n]:
                n += 1
            best = max(best, n)
        total += min(best // BLOCK, (len(ids) - 1) // BLOCK) * BLOCK
    return total


def _hold(cm: Any, got: dict[str, Any], key: str, ready: threading.Event, stop: threading.Event) -> None:
    """Enter a launch in this thread and stay in it until ``stop``: the supervisor starts its children with
    PR_SET_PDEATHSIG, which fires when the *thread* that forked them ends."""
    try:
        with cm as g:
            got[key] = g
            ready.set()
            stop.wait()
    except BaseException as e:  # noqa: BLE001 - re-raised by the fixture
        got[key + "_error"] = e
    finally:
        ready.set()


@pytest.fixture(scope="module")
def graphs(smollm2_dir, tmp_path_factory):
    """(agg, disagg) launched graphs on the imported model, started together (the model loads overlap)."""
    logs = tmp_path_factory.mktemp("smollm2-graphs")
    agg_cfg = config("dxsmagg", workers={"agg": {"count": 1, "num_kv_blocks": 512}}, router={"policy": "round-robin"})
    dis_cfg = config("dxsmdis", workers={"prefill": {"count": 1, "num_kv_blocks": 512},
                                         "decode": {"count": 1, "num_kv_blocks": 512}},
                     router={"policy": "dynamo-ext", "disagg_min_prompt_tokens": 0, "local_prefill": False})
    got: dict[str, Any] = {}
    stop = threading.Event()
    held = []
    for name, cfg in (("agg", agg_cfg), ("disagg", dis_cfg)):
        cm = launch_graph(f"graphs/{name}.py", cfg, model_dir=smollm2_dir, log_dir=logs / name, ready_timeout=240)
        ready = threading.Event()
        t = threading.Thread(target=_hold, args=(cm, got, name, ready, stop), name=f"launch-{name}", daemon=True)
        t.start()
        held.append((t, ready))
    try:
        for _t, ready in held:
            ready.wait()
        for name in ("agg", "disagg"):
            if name + "_error" in got:
                raise got[name + "_error"]
        yield got["agg"], got["disagg"]
    finally:
        stop.set()
        for t, _ready in held:
            t.join(60)
    errors = [got[k] for k in ("agg_error", "disagg_error") if k in got]
    if errors:
        raise errors[0]


def test_disaggregated_equals_aggregated_token_for_token(graphs, smollm2_dir):
    import transformers

    agg, dis = graphs
    assert agg.model == dis.model == "SmolLM2-135M-Instruct"
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    before = {"agg": engines(agg, "agg"), "prefill": engines(dis, "prefill"), "decode": engines(dis, "decode")}
    router = next(c for c in dis.alive() if c.role == "router")
    decisions0 = dict(health(router).get("decisions") or {})

    def run(g: Any) -> list[tuple[list[int], dict]]:  # one request at a time on each graph, the graphs side by side
        return [completion_ids(g.base_url, g.model, p, N_OUT) for p in PROMPTS]

    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        ref, got = ex.map(run, (agg, dis))
    print(f"{len(PROMPTS)} prompts on each graph (one at a time, the graphs concurrently): {time.monotonic() - t0:.1f} s")

    for ids, (_, resp) in zip(prompt_ids, ref):  # the frontend's tokenization is transformers'
        assert resp["usage"]["prompt_tokens"] == len(ids)
    diff = [i for i, ((a, _), (d, _)) in enumerate(zip(ref, got)) if a != d]
    assert not diff, "disaggregated != aggregated for prompts " + "; ".join(
        f"#{i}: agg {ref[i][0]} ({ref[i][1]['choices'][0]['text']!r}) vs disagg {got[i][0]} "
        f"({got[i][1]['choices'][0]['text']!r})" for i in diff[:3])
    assert all(len(ids) > 0 for ids, _ in ref)
    assert len({tuple(ids) for ids, _ in ref}) > len(PROMPTS) // 2  # real answers, not one repeated output
    print("e.g.", repr(ref[0][1]["choices"][0]["text"]), "|", repr(ref[3][1]["choices"][0]["text"]))

    e_agg = delta(engines(agg, "agg"), before["agg"])
    e_pre = delta(engines(dis, "prefill"), before["prefill"])
    e_dec = delta(engines(dis, "decode"), before["decode"])
    want = expected_hits(prompt_ids)
    total = sum(len(ids) for ids in prompt_ids)
    print(f"prefix hits: expected {want}/{total} prompt tokens; agg {e_agg.get('prefill_cached_tokens')}, "
          f"prefill worker {e_pre.get('prefill_cached_tokens')}, decode pull {e_dec.get('pull_cached_tokens')}")
    decisions = delta(dict(health(router).get("decisions") or {}), decisions0)
    assert decisions == {"no_local_option": len(PROMPTS)}, decisions  # local_prefill false: always a pair
    # every prompt prefilled once, on the prefill worker; every one pulled by the decode worker, none recomputed
    assert e_agg["prefills"] == e_pre["prefills"] == e_dec["pulls"] == len(PROMPTS), (e_agg, e_pre, e_dec)
    assert e_dec["prefills"] == 0, e_dec
    assert e_agg["prefill_prompt_tokens"] == e_pre["prefill_prompt_tokens"] == e_dec["pull_prompt_tokens"] == total
    # prefix-cache hits on both sides of the disaggregated graph, as many as the prompts allow
    assert want > 0.6 * total  # the data shares long prefixes (28 of 32 prompts hit 15-17 blocks)
    assert e_agg["prefill_cached_tokens"] == e_pre["prefill_cached_tokens"] == want, (e_agg, e_pre, want)
    assert e_dec["pull_cached_tokens"] == want, (e_dec, want)
    agg.check()
    dis.check()


def test_a_drained_decode_workers_stream_goes_on_with_the_uninterrupted_tokens(graphs):
    agg, dis = graphs
    ref, resp = completion_ids(agg.base_url, agg.model, LONG_PROMPT, N_LONG, ignore_eos=True)
    assert len(ref) == N_LONG and resp["choices"][0]["finish_reason"] == "length"

    dis.scale("decode", 2)
    decode = [c for c in dis.alive() if c.role == "decode"]
    assert len(decode) == 2
    before = {c.name: health(c).get("engine") or {} for c in decode}
    s = Stream(dis.base_url, dis.model, LONG_PROMPT, N_LONG)
    s.thread.start()
    t_end = time.monotonic() + 60
    while len(s.ids) < MOVE_AFTER and s.thread.is_alive():
        assert time.monotonic() < t_end, (s.ids, s.error)
        time.sleep(0.01)
    busy = [c for c in decode if health(c).get("running")]
    assert len(busy) == 1 and not s.error, (busy, s.error, len(s.ids))
    src, dst = busy[0], next(c for c in decode if c is not busy[0])
    seen = len(s.ids)
    how = dis.stop_child(src.name)  # returns once it exited: its stream was handed over first
    s.thread.join(120)
    print(f"drained {src.name} after the client saw {seen} tokens ({how}); stream: {len(s.ids)} tokens, "
          f"finish {s.finish}, error {s.error}")
    assert how == "exit 0" and not s.error and s.finish == "length", (how, s.error, s.finish)
    assert len(s.ids) == N_LONG
    first = next((i for i, (a, b) in enumerate(zip(s.ids, ref)) if a != b), None)
    assert s.ids == ref, f"the migrated stream differs from the uninterrupted run from token {first}"

    strip = re.compile(r"\x1b\[[0-9;]*m")
    rlog = strip.sub("", next(c for c in dis.alive() if c.role == "router").log_path.read_text(errors="replace"))
    moves = re.findall(rf"decode worker {src.instance_id} drains after (\d+) tokens: move to {dst.instance_id}", rlog)
    assert len(moves) == 1 and seen <= int(moves[0]) < N_LONG, rlog[-3000:]
    dlog = strip.sub("", dst.log_path.read_text(errors="replace"))
    pulls = re.findall(rf"kv transfer received: peer={src.instance_id} .*?bytes=(\d+)", dlog)
    assert len(pulls) == 1 and int(pulls[0]) > 0, dlog[-3000:]
    e = delta(health(dst).get("engine") or {}, before[dst.name])
    assert e["pulls"] == 1 and e["prefills"] == 0, e  # the KV was pulled, nothing recomputed
    # the KV of the prompt and of every token streamed before the move but the last (the target's first input)
    assert e["pull_prompt_tokens"] == resp["usage"]["prompt_tokens"] + int(moves[0]) - 1, e
    dis.check()
