"""The OpenAI parameter contract of the serving core, without processes: what a PreprocessedRequest from
Dynamo's frontend becomes (SamplingParams), what is refused (the message names the OpenAI parameter and the
request field), n > 1 as one request per choice (seeds, index, cancellation), log probabilities on the wire."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_ext.serving.choices import choice_requests, merge_choices
from dynamo_ext.serving.protocol import (BadRequest, KvHandle, check_options, drop_first_token, logprob_fields,
                                         parse_request)

# what Dynamo 1.6.1's frontend sent for a plain completion (recorded with a logging router, workers/README.md)
BASE = {"token_ids": [104, 101, 108, 108, 111],
        "stop_conditions": {"max_tokens": 3, "stop": None, "stop_token_ids": None, "stop_token_ids_visible": None,
                            "stop_token_ids_hidden": [257], "min_tokens": None, "ignore_eos": None,
                            "max_thinking_tokens": None},
        "sampling_options": {"n": None, "best_of": None, "presence_penalty": None, "frequency_penalty": None,
                             "repetition_penalty": None, "temperature": None, "top_p": None, "top_k": None,
                             "min_p": None, "use_beam_search": None, "length_penalty": None, "seed": None,
                             "include_stop_str_in_output": None, "guided_decoding": None},
        "output_options": {"logprobs": None, "prompt_logprobs": None, "skip_special_tokens": None,
                           "formatted_prompt": None, "return_tokens_as_token_ids": None},
        "eos_token_ids": [257], "annotations": [], "routing": {}, "router_config_override": None}


def req(**over):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, val in over.items():
        section, _, field = key.partition("__")
        if field:
            out[section][field] = val
        else:
            out[section] = val
    return out


def parse(r):
    return parse_request(r, "r", vocab_size=259, max_model_len=64).sampling


def test_plain_request_is_greedy_with_eos():
    sp = parse(req())
    assert sp.temperature == 0 and sp.logprobs is None and sp.plain and sp.stop_token_ids == (257,)


def test_supported_options_reach_the_engine():
    sp = parse(req(sampling_options__temperature=0.7, sampling_options__seed=7, sampling_options__top_k=5,
                   sampling_options__min_p=0.1, sampling_options__presence_penalty=0.5,
                   sampling_options__frequency_penalty=0.3, sampling_options__repetition_penalty=1.2,
                   stop_conditions__min_tokens=2, stop_conditions__stop_token_ids=[5],
                   stop_conditions__stop=["x"], output_options__logprobs=3))
    assert (sp.temperature, sp.seed, sp.top_k, sp.min_p) == (0.7, 7, 5, 0.1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, 0.3, 1.2)
    assert sp.min_tokens == 2 and sp.logprobs == 3 and sp.stop_token_ids == (5, 257)


@pytest.mark.parametrize("over,names", [
    ({"sampling_options__guided_decoding": {"json": {"type": "object"}}}, ["response_format", "tool_choice"]),
    ({"output_options__prompt_logprobs": 1}, ["echo", "prompt_logprobs"]),
    ({"sampling_options__use_beam_search": True}, ["use_beam_search"]),
    ({"sampling_options__length_penalty": 0.5}, ["length_penalty"]),
    ({"sampling_options__best_of": 3}, ["best_of", "allowed"]),
    ({"stop_conditions__max_thinking_tokens": 10}, ["max_thinking_tokens"]),
    ({"extra_args": {"sampling_options": {"allowed_token_ids": [1, 2]}}}, ["allowed_token_ids"]),
    ({"extra_args": {"nvext": {"cache_salt": "tenant-a"}}}, ["cache_salt"]),
    ({"extra_args": {"nvext": {"extra_fields": ["worker_id"]}}}, ["extra_fields", "'worker_id'", "completion_token_ids"]),
    ({"extra_args": {"nvext": {"extra_fields": "completion_token_ids"}}}, ["extra_fields", "a list of"]),
    ({"extra_args": {"nvext": {"extra_fields": ["completion_token_ids"], "cache_salt": "t"}}}, ["cache_salt"]),
    ({"lora_name": "x"}, ["lora_name"]),
    ({"output_options__logprobs": 21}, ["logprobs", "0 .. 20"]),
    ({"sampling_options__n": 2}, ["n ", "temperature > 0"]),
    ({"sampling_options__n": 2, "sampling_options__temperature": 0.0}, ["n ", "temperature > 0"]),
    ({"sampling_options__n": 0, "sampling_options__temperature": 1.0}, ["n ", "1 .. 128"]),
])
def test_refused_options_name_the_parameter(over, names):
    with pytest.raises(BadRequest) as e:
        parse(req(**over))
    for name in names:
        assert name in str(e.value), str(e.value)
    with pytest.raises(BadRequest):
        check_options(req(**over))  # the router refuses the same, without the model


def test_completion_token_ids_are_left_to_the_frontend():
    """nvext.extra_fields ["completion_token_ids"]: Dynamo's frontend puts the generated ids in its own response
    (measured on 1.6.1); it forwards the list as extra_args.nvext.extra_fields, which the engine needs not honour."""
    r = req(extra_args={"nvext": {"extra_fields": ["completion_token_ids"]}})
    check_options(r)
    assert parse(r).plain


def test_best_of_equal_to_n_and_n_with_temperature_are_accepted():
    check_options(req(sampling_options__n=3, sampling_options__best_of=3, sampling_options__temperature=0.5))
    assert choice_requests(req()) is None


def test_choices_are_seeded_requests_of_n_1():
    subs = choice_requests(req(sampling_options__n=3, sampling_options__temperature=1.0, sampling_options__seed=2**64 - 2))
    assert [s["sampling_options"]["seed"] for s in subs] == [2**64 - 2, 2**64 - 1, 0]
    assert all(s["sampling_options"]["n"] is None and s["token_ids"] == BASE["token_ids"] for s in subs)
    unseeded = choice_requests(req(sampling_options__n=2, sampling_options__temperature=1.0))
    assert [s["sampling_options"]["seed"] for s in unseeded] == [None, None]


async def _stream(tag: str, n: int, delay: float, log: list[str]):
    try:
        for k in range(n):
            await asyncio.sleep(delay)
            yield {"token_ids": [k], "tag": tag}
    finally:
        log.append(f"closed {tag}")


async def test_merge_tags_choices_and_closing_cancels_all():
    log: list[str] = []
    got = [c async for c in merge_choices([_stream("a", 3, 0.001, log), _stream("b", 2, 0.002, log)])]
    assert sorted((c["index"], c["tag"], c["token_ids"][0]) for c in got) == [
        (0, "a", 0), (0, "a", 1), (0, "a", 2), (1, "b", 0), (1, "b", 1)]
    log.clear()
    m = merge_choices([_stream("a", 100, 0.001, log), _stream("b", 100, 0.001, log)])
    first = await m.__anext__()
    await m.aclose()  # the client went away: both choices stop
    assert first["index"] in (0, 1) and sorted(log) == ["closed a", "closed b"]


async def test_merge_raises_a_choices_failure():
    async def bad():
        yield {"token_ids": [1]}
        raise RuntimeError("decode worker died")

    log: list[str] = []
    with pytest.raises(RuntimeError, match="died"):
        async for _ in merge_choices([bad(), _stream("b", 100, 0.01, log)]):
            pass
    assert log == ["closed b"]


def test_logprobs_on_the_wire_and_the_handle():
    lps = [(-0.1, [(5, -0.1), (9, -2.5)]), (-1.0, [(7, -0.5), (5, -1.0)])]
    f = logprob_fields(lps, lambda t: chr(t + 60))
    assert f["log_probs"] == [-0.1, -1.0]
    assert f["top_logprobs"][1] == [{"rank": 1, "token_id": 7, "token": "C", "logprob": -0.5},
                                    {"rank": 2, "token_id": 5, "token": "A", "logprob": -1.0}]
    c = drop_first_token({"token_ids": [5, 7], **f})
    assert c["token_ids"] == [7] and c["log_probs"] == [-1.0] and len(c["top_logprobs"]) == 1
    h = KvHandle(handle_id="h", worker_id=1, component="prefill", agent="a", pool="p", block_ids=[1], num_tokens=3,
                 first_token=5, layout={}, deadline=1.0, first_logprobs=lps[0])
    back = KvHandle.from_dict(h.to_dict())
    assert back == h and back.first_logprobs == (-0.1, [(5, -0.1), (9, -2.5)])
    old = {k: v for k, v in h.to_dict().items() if k != "first_logprobs"}  # a handle without them still parses
    assert KvHandle.from_dict(old).first_logprobs is None


def test_a_continued_stream_carries_its_earlier_output_count():
    """rerun_request (recompute: prompt + streamed tokens) and migration_request (move: the handle's first token
    is the last streamed one) tell the engine how many prompt tokens are earlier output (Request.num_earlier_output)."""
    from dynamo_ext.serving.protocol import migration_request, rerun_request

    r = req()
    r["stop_conditions"]["max_tokens"] = 10
    prompt = list(r["token_ids"])
    rr = rerun_request(r, prompt, [7, 8, 9])
    assert rr["token_ids"] == prompt + [7, 8, 9] and rr["earlier_output"] == 3
    assert parse_request(rr, "x", vocab_size=300, max_model_len=64).num_earlier_output == 3
    mig = {"tokens": prompt + [7, 8, 9], "kv_handle": {"handle_id": 1}, "output_len": 3}
    mr = migration_request(r, mig)
    assert mr["token_ids"] == prompt + [7, 8] and mr["earlier_output"] == 2
    assert parse_request(mr, "x", vocab_size=300, max_model_len=64).num_earlier_output == 2
    assert parse_request(req(), "x", vocab_size=300, max_model_len=64).num_earlier_output == 0
    for bad in (-1, len(prompt), "2", True):
        with pytest.raises(BadRequest, match="earlier_output"):
            parse_request({**req(), "earlier_output": bad}, "x", vocab_size=300, max_model_len=64)
