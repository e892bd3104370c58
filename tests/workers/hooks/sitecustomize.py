"""Test-only fault injection for worker processes, loaded at interpreter start-up when this folder is on
the process's PYTHONPATH (``hooks_env()`` in tests/workers/conftest.py). Production modules carry no test
hooks: this file patches them from outside.

``DXTEST_PULL_DELAY_S=<s>``: ``serving.ServingWorker.pull`` waits that long before it pulls (widens the
window between a KV hand-off and the READ, e.g. to kill the prefill worker inside it).
"""

import os

_delay = float(os.environ.get("DXTEST_PULL_DELAY_S", "0") or 0)
if _delay > 0:
    import asyncio

    from dynamo_ext.serving import worker as _w

    _pull = _w.ServingWorker.pull

    async def _slow_pull(self, *a, **kw):  # type: ignore[no-untyped-def]
        await asyncio.sleep(_delay)
        return await _pull(self, *a, **kw)

    _w.ServingWorker.pull = _slow_pull  # type: ignore[method-assign]

# ``DXTEST_STEP_DELAY_S=<s>``: every engine step of this process takes that much longer (streams that outlast
# a worker's start-up, whatever the machine's speed).
_step = float(os.environ.get("DXTEST_STEP_DELAY_S", "0") or 0)
if _step > 0:
    import time

    from dynamo_ext.engine import core as _core

    _orig_step = _core.LlmEngine.step

    def _slow_step(self):  # type: ignore[no-untyped-def]
        time.sleep(_step)
        return _orig_step(self)

    _core.LlmEngine.step = _slow_step  # type: ignore[method-assign]

# ``DXTEST_CORRUPT_KV=1``: a prefill worker flips one byte of the last block of every KV handle it hands out,
# after the handle (and its digests) are made: what a faulty link or a stray write would do to the KV.
if os.environ.get("DXTEST_CORRUPT_KV") == "1":
    from dynamo_ext.serving import worker as _wk

    _prefill = _wk.ServingWorker.prefill

    async def _corrupting_prefill(self, *a, **kw):  # type: ignore[no-untyped-def]
        chunk = await _prefill(self, *a, **kw)
        h = chunk.get("kv_handle") if isinstance(chunk, dict) else None
        if h and self.kv_pool is not None:
            lay = self.kv_pool.layout
            off = lay.chunk_offset(h["block_ids"][-1], lay.num_layers - 1, 1) + 3
            t = self.kv_pool.tensor_u8()
            t[off] = (int(t[off]) ^ 0x5A) & 0xFF
        return chunk

    _wk.ServingWorker.prefill = _corrupting_prefill  # type: ignore[method-assign]

# ``DXTEST_DROP_KV_MESSAGES=<n>[,<n>...]``: the router's KV event index drops the n-th message(s) it receives (1 =
# the first), as if NATS had lost them: the next message of that publisher shows the gap.
_drop = {int(x) for x in os.environ.get("DXTEST_DROP_KV_MESSAGES", "").split(",") if x.strip()}
if _drop:
    from dynamo_ext.kv import indexer as _ix

    _apply = _ix.KvEventIndexer.apply_message
    _seen = [0]

    def _lossy_apply(self, data):  # type: ignore[no-untyped-def]
        _seen[0] += 1
        if _seen[0] in _drop:
            return 0
        return _apply(self, data)

    _ix.KvEventIndexer.apply_message = _lossy_apply  # type: ignore[method-assign]
