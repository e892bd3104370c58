"""KV pull statistics from the workers' Prometheus ``/metrics`` (never from their logs).

The transport layer counts every completed transfer in the process that moves it (the decode worker that
pulls), labelled ``path``, ``direction``, ``backend`` (``dynamo_ext/transport/metrics.py``):
``dynamo_ext_kv_transfer_bytes_total`` (counter), ``dynamo_ext_kv_transfer_seconds`` (histogram: one
observation per transfer, ``_count`` = transfers, ``_sum`` = seconds) and
``dynamo_ext_kv_transfer_descriptors`` (histogram, ``_sum`` = wire descriptors).

    before = kv_totals(g.metrics(role="decode"))     # {child: text} -> {(backend, path, direction): KvTotals}
    ... the measured cell ...
    cell = kv_summary(kv_delta(kv_totals(g.metrics(role="decode")), before))

``counter_total(texts, "dynamo_ext_worker_local_prefill_total")``: one counter summed over workers and labels.

``kv_summary`` gives, over the cell: ``kv_bytes``, ``kv_transfers`` (pulls), ``kv_pull_s_mean``,
``kv_pull_gbps`` (bytes / summed pull seconds, 1 GB = 1e9 B), ``kv_backends`` and ``kv_paths`` (the
``backend`` and ``path`` labels seen, sorted: e.g. ``cuda_ipc``, ``device->device``) and ``kv_by_path`` (one
entry per backend / path / direction with the same fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

BYTES = "dynamo_ext_kv_transfer_bytes"  # family name of the counter dynamo_ext_kv_transfer_bytes_total
SECONDS = "dynamo_ext_kv_transfer_seconds"
DESCRIPTORS = "dynamo_ext_kv_transfer_descriptors"

Key = tuple[str, str, str]  # (backend, path, direction)


@dataclass
class KvTotals:
    bytes: float = 0.0
    transfers: float = 0.0
    seconds: float = 0.0
    descriptors: float = 0.0

    def minus(self, other: KvTotals) -> KvTotals:
        return KvTotals(self.bytes - other.bytes, self.transfers - other.transfers, self.seconds - other.seconds,
                        self.descriptors - other.descriptors)  # fmt: skip


def kv_totals(texts: Mapping[str, str]) -> dict[Key, KvTotals]:
    """Sum over the scraped workers (``{name: /metrics text}``) of the transfer counters, per label set."""
    out: dict[Key, KvTotals] = {}
    for text in texts.values():
        for fam in text_string_to_metric_families(text):
            if fam.name not in (BYTES, SECONDS, DESCRIPTORS):
                continue
            for s in fam.samples:
                key = (s.labels.get("backend", "?"), s.labels.get("path", "?"), s.labels.get("direction", "?"))
                t = out.setdefault(key, KvTotals())
                if fam.name == BYTES and s.name == BYTES + "_total":
                    t.bytes += s.value
                elif fam.name == SECONDS and s.name == SECONDS + "_count":
                    t.transfers += s.value
                elif fam.name == SECONDS and s.name == SECONDS + "_sum":
                    t.seconds += s.value
                elif fam.name == DESCRIPTORS and s.name == DESCRIPTORS + "_sum":
                    t.descriptors += s.value
    return out


def kv_delta(after: Mapping[Key, KvTotals], before: Mapping[Key, KvTotals]) -> dict[Key, KvTotals]:
    """What happened between two scrapes (label sets that did not move are left out)."""
    out = {}
    for key, a in after.items():
        d = a.minus(before.get(key, KvTotals()))
        if d.transfers or d.bytes:
            out[key] = d
    return out


def _fields(t: KvTotals) -> dict[str, Any]:
    n = int(round(t.transfers))
    return {"kv_bytes": int(round(t.bytes)), "kv_transfers": n,
            "kv_pull_s_mean": round(t.seconds / n, 6) if n else None,
            "kv_pull_gbps": round(t.bytes / t.seconds / 1e9, 4) if t.seconds > 0 else None,
            "kv_descriptors_mean": round(t.descriptors / n, 1) if n else None}  # fmt: skip


def kv_summary(delta: Mapping[Key, KvTotals]) -> dict[str, Any]:
    total = KvTotals()
    for t in delta.values():
        total = KvTotals(total.bytes + t.bytes, total.transfers + t.transfers, total.seconds + t.seconds,
                         total.descriptors + t.descriptors)  # fmt: skip
    return {**_fields(total), "kv_backends": sorted({k[0] for k in delta}), "kv_paths": sorted({k[1] for k in delta}),
            "kv_by_path": [{"backend": b, "path": p, "direction": d, **_fields(t)}
                           for (b, p, d), t in sorted(delta.items())]}  # fmt: skip


def counter_total(texts: Mapping[str, str], name: str) -> float:
    """The sum of a counter's samples (``name`` with its ``_total``) over the scraped workers and all labels."""
    family = name.removesuffix("_total")
    total = 0.0
    for text in texts.values():
        for fam in text_string_to_metric_families(text):
            if fam.name == family:
                total += sum(s.value for s in fam.samples if s.name == family + "_total")
    return total
