"""The OpenAI API as the official ``openai`` client uses it, through Dynamo 1.6.1's frontend, our router and a
disaggregated graph (1 prefill + 1 decode worker, every request prefilled on the prefill worker and its KV pulled
by the decode worker: the first token and its log probabilities come from the prefill worker). One graph start
for the module (launch_graph, tiny preset).

Each parameter is honoured or refused with HTTP 400 naming it (issue 15, item 5; workers/README.md):
n (one routed request per choice, seeds seed + i), logprobs / top_logprobs (equal to an in-process engine's),
stop strings (the frontend cuts the text), seed, presence / frequency / repetition penalties,
stream_options.include_usage; echo, response_format, tool_choice, best_of, extra sampling arguments refused."""

from __future__ import annotations

import time

import openai
import pytest

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import Request, SamplingParams
from dynamo_ext.engine.weights import load_model
from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.infra import free_port

PROMPT = "the quick brown fox jumps over a lazy dog"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def graph(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("openai-graph")
    cfg = {
        "model": {"name": "dx/tiny", "preset": "tiny", "block_size": 16},
        "workers": {"prefill": {"count": 1}, "decode": {"count": 1}},
        "router": {"policy": "round-robin", "disagg_min_prompt_tokens": 0},  # every request through the prefill worker
        "discovery": {"namespace": "oai", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}},
    }
    t0 = time.monotonic()
    with launch_graph("graphs/disagg.py", cfg, model_dir=model_dir, log_dir=logs, ready_timeout=180) as g:
        print(f"graph ready in {time.monotonic() - t0:.1f} s")
        yield g, openai.OpenAI(base_url=g.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model in-process: (prompt text, SamplingParams) -> (tokens, log probabilities)."""
    m = load_model(str(model_dir))

    def run(text: str, sp: SamplingParams):
        eng = LlmEngine(m, EngineConfig(num_blocks=64, block_size=16))
        ids = m.tokenizer.encode(text, add_bos=False)  # what the frontend sends for a completion prompt
        eng.add_request(Request("r", ids, sp))
        toks, lps = [], []
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
                lps += o.logprobs or []
        return ids, toks, lps

    return run


def _pulls(g) -> int:
    return sum(c.log_path.read_text(errors="replace").count("kv transfer received")
               for c in g.children if c.role == "decode")


def test_n_choices_are_seeded_requests(graph):
    g, client = graph
    kw = dict(model=g.model, prompt=PROMPT, max_tokens=8, temperature=0.9, seed=11)
    r = client.completions.create(n=2, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # two draws (seeds 11, 12)
    again = client.completions.create(n=2, **kw)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # same seed, same choices
    assert client.completions.create(n=1, **kw).choices[0].text == texts[0]  # choice 0 is the n = 1 answer
    assert r.usage.completion_tokens == 16
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == texts
    chat = client.chat.completions.create(model=g.model, messages=CHAT, max_tokens=8, n=3, temperature=1.0, seed=2)
    contents = [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]
    assert len(contents) == 3 and len(set(contents)) == 3, contents


def test_logprobs_equal_the_engines_and_greedy_takes_the_top(graph, reference):
    g, client = graph
    pulls = _pulls(g)
    r = client.completions.create(model=g.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    ids, toks, lps = reference(PROMPT, SamplingParams(max_tokens=6, logprobs=3))
    assert r.usage.prompt_tokens == len(ids)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(toks) == 6
    for got, (want, top), tops in zip(lp.token_logprobs, lps, lp.top_logprobs):
        assert got == pytest.approx(want, abs=1e-4)  # the first one sampled on the prefill worker
        assert got == pytest.approx(max(tops.values()), abs=1e-6)  # greedy: the chosen token is the most likely
        assert len(tops) <= 4 and max(tops.values()) == pytest.approx(top[0][1], abs=1e-4)
    assert _pulls(g) == pulls + 1  # disaggregated: its KV went prefill -> decode
    # chat: logprobs=true, top_logprobs=k, streamed
    n_tok, entries = 0, []
    for chunk in client.chat.completions.create(model=g.model, messages=CHAT, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            n_tok = chunk.usage.completion_tokens
        for c in chunk.choices:
            entries += (c.logprobs.content or []) if c.logprobs else []
    assert n_tok == 5 and len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.token == e.top_logprobs[0].token


def test_stop_strings_cut_the_text(graph):
    g, client = graph
    full = client.completions.create(model=g.model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    k = next((i for i in range(1, len(full)) if full[i].isascii() and full[i].isprintable() and full[i] not in full[:i]),
             None)
    assert k is not None, f"no usable stop character in {full!r}"
    for stream in (False, True):
        if stream:
            text, finish = "", None
            for chunk in client.completions.create(model=g.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                                   stop=[full[k]], stream=True):
                for c in chunk.choices:
                    text += c.text
                    finish = c.finish_reason or finish
        else:
            c = client.completions.create(model=g.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                          stop=[full[k]]).choices[0]
            text, finish = c.text, c.finish_reason
        assert (text, finish) == (full[:k], "stop"), (full, k, stream)


def test_include_usage_gives_a_usage_chunk(graph):
    g, client = graph
    chunks = list(client.completions.create(model=g.model, prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model=g.model, prompt=PROMPT, max_tokens=7, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)


def test_penalties_and_seed_change_the_output(graph):
    g, client = graph

    def chat(**kw) -> str:
        return client.chat.completions.create(model=g.model, messages=CHAT, max_tokens=16, **kw).choices[0].message.content

    greedy = chat(temperature=0)
    assert len(set(greedy)) < len(greedy)  # the tiny model repeats itself: penalties have something to change
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        out = chat(temperature=0, **kw)
        assert out != greedy and len(set(out)) > len(set(greedy)), (kw, greedy, out)
    a, b = chat(temperature=1.0, seed=4), chat(temperature=1.0, seed=5)
    assert a == chat(temperature=1.0, seed=4) and a != b


@pytest.mark.parametrize("kw,name", [
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"n": 2}, "temperature"),  # n > 1 with this server's default temperature 0
    ({"extra_body": {"allowed_token_ids": [1, 2]}}, "allowed_token_ids"),
    ({"logprobs": 6}, "ogprobs"),  # refused by the frontend itself (0 .. 5)
    ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),  # the frontend refuses unknown fields
])
def test_unsupported_completion_parameters_are_400(graph, kw, name):
    g, client = graph
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=g.model, prompt=PROMPT, max_tokens=4, **kw)
    assert e.value.status_code == 400 and name in str(e.value), str(e.value)


def test_unsupported_chat_parameters_are_400(graph):
    g, client = graph
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kw, name in (({"response_format": {"type": "json_object"}}, "response_format"),
                     ({"tools": tools, "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=g.model, messages=CHAT, max_tokens=4, **kw)
        assert name in str(e.value)
        with pytest.raises(openai.APIError) as e:  # streaming: the frontend sends an error event (code 400)
            list(client.chat.completions.create(model=g.model, messages=CHAT, max_tokens=4, stream=True, **kw))
        assert name in str(e.value)


def test_streaming_chat_on_the_default_model(smollm2_dir, tmp_path):
    """The same client on SmolLM2-135M-Instruct (a real tokenizer: multi-byte tokens, ChatML template), the
    second and last graph start of this module: a streamed greedy chat with log probabilities, a stop string and
    include_usage, prefilled on the prefill worker."""
    cfg = {"model": {"name": "SmolLM2-135M-Instruct", "preset": "smollm2-135m-instruct", "block_size": 16,
                     "dtype": "float32"},
           "workers": {"prefill": {"count": 1}, "decode": {"count": 1}},
           "router": {"policy": "round-robin", "disagg_min_prompt_tokens": 0},
           "discovery": {"namespace": "oaismol", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                         "nats": {"url": f"nats://127.0.0.1:{free_port()}"}}}
    t0 = time.monotonic()
    with launch_graph("graphs/disagg.py", cfg, model_dir=smollm2_dir, log_dir=tmp_path / "logs",
                      ready_timeout=240) as g:
        t_ready = time.monotonic() - t0
        client = openai.OpenAI(base_url=g.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        text, entries, usage, finish = "", [], None, None
        for chunk in client.chat.completions.create(
                model=g.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24, temperature=0, logprobs=True, top_logprobs=2, stop=["."], stream=True,
                stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            for c in chunk.choices:
                text += c.delta.content or ""
                entries += (c.logprobs.content or []) if c.logprobs else []
                finish = c.finish_reason or finish
        assert _pulls(g) == 1  # prefilled on the prefill worker, KV pulled by the decode worker
    print(f"SmolLM2 graph ready in {t_ready:.1f} s, total {time.monotonic() - t0:.1f} s: {text!r}, "
          f"{usage.completion_tokens} tokens")
    assert "Paris" in text and "." not in text and finish == "stop", (text, finish)
    assert usage is not None and len(entries) == usage.completion_tokens >= 2
    assert "".join(e.token for e in entries).startswith(text)  # the tokens spell the text (and the cut stop token)
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
