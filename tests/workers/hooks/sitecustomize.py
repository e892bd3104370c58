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
