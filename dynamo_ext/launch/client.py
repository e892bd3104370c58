"""The two HTTP calls a launch makes to Dynamo's OpenAI frontend (stdlib only).

* ``list_models(base)``: ``GET <base>/v1/models`` -> the ``data[].id`` list (``[]`` when it does not answer).
* ``complete(base, model, prompt, max_tokens)``: ``POST <base>/v1/completions`` with temperature 0,
  not streamed -> the parsed JSON response; :class:`CompletionError` carries the HTTP status and body.
* ``curl_line(...)``: the same request as a ready-to-paste shell command.
* ``scrape(url, metric)``: the samples of one metric from a worker's Prometheus ``/metrics`` (the URL of
  its ``DYNAMO_EXT_READY`` line) as ``(labels, value)``; ``[]`` when it does not answer.
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.error
import urllib.request
from typing import Any


class CompletionError(Exception):
    pass


def list_models(base: str, timeout: float = 1.0) -> list[str]:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=timeout) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return []
    return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]


def completion_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}


def complete(base: str, model: str, prompt: str, max_tokens: int = 32, timeout: float = 120.0) -> dict[str, Any]:
    body = json.dumps(completion_body(model, prompt, max_tokens)).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        raise CompletionError(f"HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
    except (OSError, ValueError) as e:
        raise CompletionError(f"{type(e).__name__}: {e}") from None


def curl_line(base: str, model: str, prompt: str = "Hello, my name is", max_tokens: int = 16) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens})
    return f"curl -s {base}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, metric: str, timeout: float = 2.0) -> list[tuple[dict[str, str], float]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode(errors="replace")
    except (OSError, ValueError):
        return []
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == metric:
            try:
                out.append((dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
            except ValueError:
                continue
    return out
