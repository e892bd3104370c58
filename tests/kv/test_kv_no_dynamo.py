"""kv/ imports on a machine without Dynamo (DESIGN.md: only lazy, caller-driven use of Dynamo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["dynamo"] = None  # any `import dynamo...` now raises ImportError
import dynamo_ext.kv, dynamo_ext.kv.hashing, dynamo_ext.kv.events, dynamo_ext.kv.pool
import dynamo_ext.kv.indexer, dynamo_ext.kv.tiers
from dynamo_ext.kv.pool import BlockPool
from dynamo_ext.kv.events import RecordingKvEventSink
p = BlockPool(4, 2, RecordingKvEventSink())
ids = p.allocate(2)
p.commit(ids, [1, 2, 3, 4])
assert p.match_tokens([1, 2, 3, 4]) == ids
print("ok")
"""


def test_kv_imports_and_works_without_dynamo():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
