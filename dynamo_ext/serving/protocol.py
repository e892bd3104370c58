"""What crosses the wire between frontend, router, prefill and decode workers (plain dicts; msgpack/JSON).

Requests (Dynamo's Tokens contract, notes §4) arrive as dicts::

    {"token_ids": [...], "stop_conditions": {"max_tokens": N, "stop_token_ids_hidden": [...], "ignore_eos": b},
     "sampling_options": {"temperature": t, "top_p": p, "seed": s}, ...,
     "kv_handle": {...}                       added by our router (policy dynamo-ext | round-robin)
     "prefill_result": {"disaggregated_params": {...}}   added by Dynamo's frontend (policy dynamo-kv)}

``parse_request`` turns one into an engine ``Request`` or raises ``BadRequest`` with a message that
names the field; workers answer a bad request with one terminal error chunk (``error_chunk``) and
carry on. Output chunks are ``{"token_ids": [t...]}``, the last one with ``finish_reason`` and
``completion_usage``; with ``output_options.logprobs`` = k also ``log_probs`` (one per token) and
``top_logprobs`` (per token, the k most likely: ``{rank, token_id, token, logprob}``), Dynamo's
``LLMEngineOutput`` fields; a choice of an ``n`` > 1 request carries ``index`` (``serving.choices``).

``check_options`` is the OpenAI parameter contract (workers/README.md): what Dynamo 1.6.1's frontend
forwards and the engine cannot honour is refused (BadRequest naming the OpenAI parameter, the request
field and what is allowed): structured output (``guided_decoding``), prompt log probabilities
(``echo``), beam search, ``best_of`` other than ``n``, reasoning budgets, LoRA / multimodal inputs,
``extra_args`` (allowed_token_ids, bad_words_token_ids; ``nvext.extra_fields`` ["completion_token_ids"] passes:
the frontend answers it), ``n`` > 1 without temperature > 0.

``KvHandle`` is what a prefill worker returns: where the prompt's KV lives (worker instance id,
NIXL agent, pool name, block ids, layout) and until when it is held (``deadline``, unix seconds).
Whoever pulls it calls the prefill worker's ``release`` endpoint with ``{"handle_id": ...}``; the
answer ``{"released": true}`` proves the blocks were still held (not reaped at the deadline and
reused) while the bytes were read. A handle nobody releases is freed at its deadline.

A decode stream that a worker hands over (drain, rebalance) ends with ``{"token_ids": [], "migrate": {
kv_handle, tokens, output_len, peer_info}}`` (``peer_info``: base64 of ``serving.PeerTransports``); the
router continues it with ``migration_request`` (the target pulls the KV) or ``rerun_request`` (prompt +
streamed tokens, recomputed); ``rerun_usage`` rewrites the last chunk's usage for the client's request.
"""

from __future__ import annotations

from typing import Any, Callable

import msgspec

from dynamo_ext.engine.protocol import MAX_LOGPROBS, Request, SamplingParams, TokenLogprobs

# the largest max_tokens a request may ask for; beyond the context it is clamped by the engine
MAX_TOKENS_LIMIT = 1 << 20
#: the most choices (``n``) one request may ask for (Dynamo's frontend allows 1..128)
MAX_CHOICES = 128


class BadRequest(ValueError):
    """The request cannot be served as given (the message names the field)."""


class KvHandle(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    handle_id: str
    worker_id: int  # Dynamo instance id (= lease id) of the prefill worker
    component: str  # where its record lives: dynamo_ext/v1/workers/<ns>/<component>/<worker_id>
    agent: str  # its NIXL agent name
    pool: str  # its registered pool
    block_ids: list[int]
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token: int  # sampled by the prefill worker
    layout: dict[str, Any]  # KvLayout.to_dict() of the pool
    deadline: float  # unix seconds; the blocks are freed after it unless released earlier
    #: kv_transfer.verify: [index into block_ids, 64-bit digest of that block] (transport.verify.block_digests)
    digests: list[tuple[int, int]] = msgspec.field(default_factory=list)
    digest_kind: str = ""  # how they were computed (transport.verify.DIGEST_KINDS): the puller computes the same
    #: first_token's log probability and the top k (token id, log probability), when the request asked for them
    first_logprobs: tuple[float, list[tuple[int, float]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, d: Any) -> "KvHandle":
        try:
            return msgspec.convert(d, cls)
        except (msgspec.ValidationError, TypeError) as e:
            raise BadRequest(f"malformed kv_handle: {e}") from None


def handle_of(request: dict[str, Any]) -> KvHandle | None:
    """The KV handle a decode request carries: ours (``kv_handle``) or Dynamo's (``prefill_result``)."""
    h = request.get("kv_handle")
    if h is None:
        pr = request.get("prefill_result") or {}
        h = pr.get("disaggregated_params") if isinstance(pr, dict) else None
        if isinstance(h, dict) and "kv_handle" in h:
            h = h["kv_handle"]
    return None if h is None else KvHandle.from_dict(h)


def choices_of(samp: dict[str, Any]) -> int:
    n = samp.get("n")
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n (sampling_options.n): {n!r} is not allowed (1 .. {MAX_CHOICES})")
    return n


#: ``nvext.extra_fields`` entries that Dynamo's frontend fills in its own response (it forwards the list to the
#: workers as ``extra_args.nvext.extra_fields``; they need do nothing): ``completion_token_ids`` = the generated
#: token ids (response ``nvext.completion_token_ids``; one choice only, the frontend refuses n > 1 itself)
FRONTEND_EXTRA_FIELDS = ("completion_token_ids",)


def _without_frontend_fields(extra: Any) -> Any:
    """``extra_args`` less ``nvext.extra_fields`` when every entry is one the frontend answers itself
    (BadRequest naming the entry and the allowed values otherwise)."""
    if not isinstance(extra, dict) or not isinstance(extra.get("nvext"), dict) or "extra_fields" not in extra["nvext"]:
        return extra
    fields = extra["nvext"]["extra_fields"]
    allowed = f"allowed: a list of {', '.join(repr(f) for f in FRONTEND_EXTRA_FIELDS)}"
    if not isinstance(fields, list):
        raise BadRequest(f"nvext.extra_fields (extra_args.nvext.extra_fields): {fields!r} is not a list; {allowed}")
    bad = [f for f in fields if f not in FRONTEND_EXTRA_FIELDS]
    if bad:
        raise BadRequest(f"nvext.extra_fields (extra_args.nvext.extra_fields): {bad!r} not supported; {allowed}")
    nvext = {k: v for k, v in extra["nvext"].items() if k != "extra_fields"}
    return {k: v for k, v in {**extra, "nvext": nvext}.items() if v}


def check_options(request: dict[str, Any]) -> None:
    """Refuse what the engine cannot honour (BadRequest naming the OpenAI parameter, the request field and the
    allowed values); what it can is read by ``parse_request``. Needs no model: the router calls it too."""
    stop = request.get("stop_conditions") or {}
    samp = request.get("sampling_options") or {}
    out = request.get("output_options") or {}
    if not isinstance(stop, dict) or not isinstance(samp, dict) or not isinstance(out, dict):
        raise BadRequest("stop_conditions, sampling_options and output_options must be maps")
    n = choices_of(samp)
    if samp.get("guided_decoding") is not None:
        raise BadRequest("response_format / tool_choice (sampling_options.guided_decoding): structured output is not "
                         "supported by this engine; allowed: response_format {\"type\": \"text\"} or none, tool_choice "
                         "\"auto\" or \"none\"")
    if out.get("prompt_logprobs") is not None:
        raise BadRequest("echo / prompt_logprobs (output_options.prompt_logprobs): prompt log probabilities and echo "
                         "are not supported; allowed: echo false, no prompt_logprobs")
    if samp.get("use_beam_search"):
        raise BadRequest("use_beam_search (sampling_options.use_beam_search): beam search is not supported; "
                         "allowed: false")
    if samp.get("length_penalty") is not None:
        raise BadRequest("length_penalty (sampling_options.length_penalty): only meaningful with beam search, which "
                         "is not supported; allowed: unset")
    best_of = samp.get("best_of")
    if best_of is not None and best_of not in (1, n):
        raise BadRequest(f"best_of (sampling_options.best_of): {best_of!r} is not supported: choices are not ranked; "
                         f"allowed: unset, 1 or equal to n ({n})")
    if stop.get("max_thinking_tokens") is not None:
        raise BadRequest("max_thinking_tokens (stop_conditions.max_thinking_tokens): no reasoning budget in this "
                         "engine; allowed: unset")
    for key, what in (("lora_name", "LoRA adapters"), ("multi_modal_data", "multimodal inputs"),
                      ("prompt_embeds", "prompt embeddings")):
        if request.get(key) is not None:
            raise BadRequest(f"{key}: {what} are not supported; allowed: unset")
    extra = _without_frontend_fields(request.get("extra_args"))
    if extra:  # the frontend's passthrough fields: allowed_token_ids, bad_words_token_ids, detokenize, cache_salt...
        names: list[str] = []
        for k, v in (extra.items() if isinstance(extra, dict) else ()):
            names += [f"{x} (extra_args.{k}.{x})" for x in sorted(v)] if isinstance(v, dict) and v else [f"extra_args.{k}"]
        raise BadRequest(f"{', '.join(names) or 'extra_args'}: not supported by this engine (token masks, detokenize, "
                         f"cache_salt and other extra arguments); allowed: unset")
    lp = out.get("logprobs")
    if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_LOGPROBS):
        raise BadRequest(f"logprobs / top_logprobs (output_options.logprobs): {lp!r} is not allowed "
                         f"(0 .. {MAX_LOGPROBS})")
    if n > 1:
        t = samp.get("temperature")
        if not isinstance(t, (int, float)) or t <= 0:
            raise BadRequest(f"n (sampling_options.n) = {n} needs temperature > 0 (got {t!r}; this server's default "
                             f"temperature is 0, greedy, which would make the {n} choices identical); allowed: n = 1, or "
                             f"n > 1 with temperature > 0")


def parse_request(request: Any, request_id: str, *, vocab_size: int, max_model_len: int) -> Request:
    if not isinstance(request, dict):
        raise BadRequest(f"request must be a map, got {type(request).__name__}")
    toks = request.get("token_ids")
    if not isinstance(toks, list) or not toks:
        raise BadRequest("token_ids: empty prompt (at least one token is needed)")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in toks):
        raise BadRequest(f"token_ids: ids must be integers in [0, {vocab_size})")
    if len(toks) >= max_model_len:
        raise BadRequest(f"token_ids: prompt of {len(toks)} tokens does not fit the context of {max_model_len}")
    check_options(request)
    stop = request.get("stop_conditions") or {}
    samp = request.get("sampling_options") or {}
    out = request.get("output_options") or {}
    mt = stop.get("max_tokens")
    if mt is None:
        mt = max_model_len - len(toks)
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1 or mt > MAX_TOKENS_LIMIT:
        raise BadRequest(f"stop_conditions.max_tokens: {mt!r} is not allowed (1 .. {MAX_TOKENS_LIMIT})")
    mt = min(mt, max_model_len - len(toks))
    temp = samp.get("temperature")
    top_p = samp.get("top_p")
    seed = samp.get("seed")
    try:
        temp = 0.0 if temp is None else float(temp)
        top_p = 1.0 if top_p is None else float(top_p)
        if temp < 0:
            raise ValueError("temperature must be >= 0")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError("seed must be an integer")
        # every stop id the frontend sends: EOS (hidden), the request's stop_token_ids (visible or not)
        stop_ids: set[int] = set()
        for key in ("stop_token_ids_hidden", "stop_token_ids", "stop_token_ids_visible"):
            stop_ids.update(int(t) for t in (stop.get(key) or []))
        top_k = samp.get("top_k")
        sp = SamplingParams(max_tokens=mt, temperature=temp, top_p=top_p, seed=seed, stop_token_ids=tuple(sorted(stop_ids)),
                            ignore_eos=bool(stop.get("ignore_eos", False)),
                            top_k=0 if top_k is None else int(top_k),
                            min_p=float(samp.get("min_p") or 0.0),
                            presence_penalty=float(samp.get("presence_penalty") or 0.0),
                            frequency_penalty=float(samp.get("frequency_penalty") or 0.0),
                            repetition_penalty=float(samp.get("repetition_penalty") or 1.0),
                            min_tokens=int(stop.get("min_tokens") or 0),
                            logprobs=out.get("logprobs"))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"sampling: {e}") from None
    earlier = request.get("earlier_output", 0)
    if not isinstance(earlier, int) or isinstance(earlier, bool) or not 0 <= earlier < len(toks):
        raise BadRequest(f"earlier_output: {earlier!r} is not allowed (0 .. {len(toks) - 1}: output tokens of a "
                         f"migrated stream inside token_ids)")
    return Request(request_id, list(toks), sp, num_earlier_output=earlier)


def logprob_fields(lps: list[TokenLogprobs], token_text: Callable[[int], str | None]) -> dict[str, Any]:
    """A chunk's ``log_probs`` / ``top_logprobs`` (Dynamo's LLMEngineOutput fields) for its tokens' log probabilities."""
    return {"log_probs": [float(lp) for lp, _ in lps],
            "top_logprobs": [[{"rank": r + 1, "token_id": int(t), "token": token_text(int(t)), "logprob": float(x)}
                              for r, (t, x) in enumerate(top)] for _, top in lps]}


def drop_first_token(chunk: dict[str, Any]) -> dict[str, Any]:
    """``chunk`` without its first token (and that token's log probabilities)."""
    out = {**chunk, "token_ids": list(chunk.get("token_ids") or ())[1:]}
    for key in ("log_probs", "top_logprobs"):
        if isinstance(chunk.get(key), list):
            out[key] = chunk[key][1:]
    return out


def error_chunk(message: str, prompt_tokens: int = 0, *, invalid: bool = False) -> dict[str, Any]:
    """The one terminal chunk a bad or failed request gets (the stream then ends). ``invalid``: the request
    itself is wrong (a client error: the adapter facing Dynamo's frontend turns it into HTTP 400)."""
    # Dynamo's frontend reads the message from the finish reason ("error: <message>")
    out: dict[str, Any] = {"token_ids": [], "finish_reason": f"error: {message}", "error": message,
                           "completion_usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                                                "total_tokens": prompt_tokens}}
    if invalid:
        out["error_type"] = "invalid_argument"
    return out


def is_invalid(chunk: Any) -> bool:
    """Whether ``chunk`` is the error chunk of a request the client got wrong (``error_chunk(invalid=True)``)."""
    return isinstance(chunk, dict) and chunk.get("error_type") == "invalid_argument"


# -- continuing a stream on another decode worker (the router's session) ------------------------------
def migration_request(request: dict[str, Any], mig: dict[str, Any]) -> dict[str, Any] | None:
    """The request a target decode worker continues a migrated stream with: the tokens whose KV the handle
    holds (all but the last) as the prompt, the handle (its first_token = the last streamed token), the
    source's peer info (its record is gone while it drains), max_tokens reduced (+1: the repeated token)."""
    toks = [int(t) for t in mig["tokens"]]
    out = {k: v for k, v in request.items() if k not in ("kv_handle", "prefill_result")}
    out["token_ids"] = toks[:-1]
    # the output streamed before the move, inside the new prompt (the last streamed token is the handle's first)
    out["earlier_output"] = max(len(toks) - 1 - len(request.get("token_ids") or ()), 0)
    out["kv_handle"] = dict(mig["kv_handle"])
    out["kv_peer_info"] = mig.get("peer_info")
    stop = dict(out.get("stop_conditions") or {})
    mt = stop.get("max_tokens")
    if isinstance(mt, int):
        left = mt - int(mig["output_len"])
        if left <= 0:
            return None
        stop["max_tokens"] = left + 1
    out["stop_conditions"] = stop
    return out


def rerun_request(request: dict[str, Any], prompt: list[int], emitted: list[int]) -> dict[str, Any] | None:
    """The request that continues a stream on another worker: prompt + emitted tokens, max_tokens reduced by
    what was emitted (None: nothing left). Sampling options are kept (greedy continues exactly)."""
    out = dict(request)
    out.pop("kv_handle", None)
    out["token_ids"] = list(prompt) + list(emitted)
    out["earlier_output"] = len(emitted)  # seeded draws and penalties go on where they were (engine Request)
    stop = dict(out.get("stop_conditions") or {})
    mt = stop.get("max_tokens")
    if isinstance(mt, int):
        if mt - len(emitted) <= 0:
            return None
        stop["max_tokens"] = mt - len(emitted)
    out["stop_conditions"] = stop
    return out


def rerun_usage(chunk: dict[str, Any], n_prompt: int, n_before: int) -> dict[str, Any]:
    """The last chunk of a re-run reports usage for the client's request: its prompt, all tokens streamed."""
    u = dict(chunk["completion_usage"])
    comp = int(u.get("completion_tokens") or 0) + n_before
    u.update(prompt_tokens=n_prompt, completion_tokens=comp, total_tokens=n_prompt + comp)
    return {**chunk, "completion_usage": u}
