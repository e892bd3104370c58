"""``n`` > 1: one request, n choices (OpenAI's ``n``), each an ordinary request of its own.

    subs = choice_requests(request)            None when n <= 1; else n requests with n = 1 and seeds seed + i
    async for chunk in merge_choices([run(sub) for sub in subs]):
        ...                                    every chunk of choice i carries "index": i (Dynamo's LLMEngineOutput)

Dynamo 1.6.1's frontend does not fan ``n`` out: it forwards ``sampling_options.n`` and detokenizes, applies
stop strings and counts usage per ``index`` of the chunks it receives (measured, workers/README.md). So the
component that receives the request runs the choices: the router (one routed session per choice: its own
prefill, pull, decode, recovery) or, without a router (policy dynamo-kv), the decode / aggregated worker.
Choice i is seeded with ``seed + i`` (mod 2^64) when the request has a seed: choice 0 is the n = 1 answer, and
the same seed gives the same choices again. Without a seed each choice's engine draws its own.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from .protocol import BadRequest, choices_of

_SEED_MOD = 1 << 64


def num_choices(request: Any) -> int:
    """``sampling_options.n`` (1 when absent or malformed: ``check_options`` refuses the latter)."""
    samp = request.get("sampling_options") if isinstance(request, dict) else None
    try:
        return choices_of(samp) if isinstance(samp, dict) else 1
    except BadRequest:
        return 1


def choice_requests(request: Any) -> list[dict[str, Any]] | None:
    """The n requests of an ``n`` > 1 request (n = 1, best_of unset, seed + i), or None when n <= 1."""
    n = num_choices(request)
    if n <= 1:
        return None
    samp = dict(request.get("sampling_options") or {})
    seed = samp.get("seed")
    subs = []
    for i in range(n):
        s = {**samp, "n": None, "best_of": None}
        if isinstance(seed, int) and not isinstance(seed, bool):
            s["seed"] = (seed + i) % _SEED_MOD
        subs.append({**request, "sampling_options": s})
    return subs


async def merge_choices(streams: list[AsyncIterator[dict[str, Any]]]) -> AsyncIterator[dict[str, Any]]:
    """The chunks of all ``streams`` as they come, each tagged ``"index": i``; an exception of one stream ends
    the merge (the others are cancelled) and is raised. Closing the merge cancels every stream."""
    q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for chunk in stream:
                q.put_nowait((i, chunk))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer (CancelledError: we are closing)
            q.put_nowait((i, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            q.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield {**item, "index": i}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            aclose = getattr(s, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 - already finished or failed: nothing left to close
                    pass


__all__ = ["choice_requests", "merge_choices", "num_choices"]
