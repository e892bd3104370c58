"""What crosses the wire between frontend, router, prefill and decode workers (plain dicts; msgpack/JSON).

Requests (Dynamo's Tokens contract, notes §4) arrive as dicts::

    {"token_ids": [...], "stop_conditions": {"max_tokens": N, "stop_token_ids_hidden": [...], "ignore_eos": b},
     "sampling_options": {"temperature": t, "top_p": p, "seed": s}, ...,
     "kv_handle": {...}                       added by our router (policy dynamo-ext | round-robin)
     "prefill_result": {"disaggregated_params": {...}}   added by Dynamo's frontend (policy dynamo-kv)}

``parse_request`` turns one into an engine ``Request`` or raises ``BadRequest`` with a message that
names the field; workers answer a bad request with one terminal error chunk (``error_chunk``) and
carry on. Output chunks are ``{"token_ids": [t...]}``, the last one with ``finish_reason`` and
``completion_usage``.

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

from typing import Any

import msgspec

from dynamo_ext.engine.protocol import Request, SamplingParams

# the largest max_tokens a request may ask for; beyond the context it is clamped by the engine
MAX_TOKENS_LIMIT = 1 << 20


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
    stop = request.get("stop_conditions") or {}
    samp = request.get("sampling_options") or {}
    if not isinstance(stop, dict) or not isinstance(samp, dict):
        raise BadRequest("stop_conditions and sampling_options must be maps")
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
        if seed is not None and not isinstance(seed, int):
            raise ValueError("seed must be an integer")
        stop_ids = tuple(int(t) for t in (stop.get("stop_token_ids_hidden") or stop.get("stop_token_ids") or []))
        sp = SamplingParams(max_tokens=mt, temperature=temp, top_p=top_p, seed=seed, stop_token_ids=stop_ids,
                            ignore_eos=bool(stop.get("ignore_eos", False)))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"sampling: {e}") from None
    return Request(request_id, list(toks), sp)


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
