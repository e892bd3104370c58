"""One log format per process, Dynamo's: the Python log records of a dynamo_ext process are written in the
format Dynamo's Rust runtime uses for its own lines in the same process, so a log file reads (and parses) as
one stream.

Who calls what::

    worker / router process start (workers/__main__.py)   configure(role, index)      root handler -> stderr
    anything that logs                                    log.info("...", extra={"request_id": ..., ...})
    the ready line (workers/runtime.py)                   ready_line_text({...})      one line on stdout
    a logging handler someone else installed (NIXL's)     adopt(handler)              our format, stderr

Formats, chosen by the same variables as Dynamo's runtime:

* ``DYN_LOGGING_JSONL`` truthy (``1``, ``true``, ``yes``, ``on``): one JSON object per line, the schema of the
  runtime's JSONL lines: ``time`` (RFC 3339, UTC, microseconds, ``Z``), ``level`` (``TRACE`` ``DEBUG`` ``INFO``
  ``WARN`` ``ERROR``), ``target`` (the logger's name, like the Rust module path), ``message``, ``file``, ``line``,
  then every ``extra=`` field of the record as its own key (a KV transfer line carries ``request_id``,
  ``worker``, ``peer``, ``path``, ``bytes``, ``seconds``...). A traceback is part of ``message``.
* else Rust tracing's compact text line: ``<time>  INFO <target>: <message>``, without the ANSI colours the
  runtime adds to its own lines (``DYN_SDK_DISABLE_ANSI_LOGGING=1`` or ``NO_COLOR`` turn those off too; log
  readers such as the tests' drop coloured lines). ``extra=`` fields are not repeated in text: messages that
  carry fields also say them as ``key=value`` words.

Level: ``DYNAMO_EXT_LOG_LEVEL`` (Python level name) when set, else the base level of ``DYN_LOG`` (``debug``,
``info``, ``warn``, ``error``; default ``info``), the variable Dynamo's runtime reads.

Why not ``dynamo.runtime.logging.configure_dynamo_logging`` (Dynamo's own Python set-up): it forwards each
record to the Rust logger through ``log_message(level, message, module, file, line)``, which takes no fields,
so request id, peer, bytes and seconds would only exist inside the message text; and it makes every process
that logs import Dynamo (``transport/``, ``engine/`` must not). The schema here is the one its JSONL lines
have (measured with Dynamo 1.6.1: ``{"time","level","target","message",...}``), fields at the top level like
the runtime's own structured fields.

Every line is written with one ``write(2)`` on file descriptor 2, so that the runtime's lines (same
descriptor, same file) never land inside ours. Nothing here imports Dynamo.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

TRUTHY = ("1", "true", "yes", "on")
READY_PREFIX = "DYNAMO_EXT_READY"
_LEVELS = {"TRACE": "TRACE", "DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR",
           "CRITICAL": "ERROR"}
_COLOURS = {"TRACE": "\x1b[35m", "DEBUG": "\x1b[34m", "INFO": "\x1b[32m", "WARN": "\x1b[33m", "ERROR": "\x1b[31m"}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"
#: attributes every LogRecord has: anything else on a record came from ``extra=`` and becomes a field
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def jsonl_enabled(env: dict[str, str] | None = None) -> bool:
    """``DYN_LOGGING_JSONL`` is set to a truthy value (Dynamo's switch for JSON lines)."""
    return (os.environ if env is None else env).get("DYN_LOGGING_JSONL", "").strip().lower() in TRUTHY


def log_level(env: dict[str, str] | None = None) -> int:
    e = os.environ if env is None else env
    name = e.get("DYNAMO_EXT_LOG_LEVEL")
    if name:
        lvl = logging.getLevelName(name.strip().upper())
        return lvl if isinstance(lvl, int) else logging.INFO
    base = next((d.strip().lower() for d in e.get("DYN_LOG", "info").split(",") if "=" not in d), "info")
    return {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
            "warning": logging.WARNING, "error": logging.ERROR}.get(base, logging.INFO)


def _now(created: float) -> str:
    return datetime.fromtimestamp(created, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonLineFormatter(logging.Formatter):
    """A record as one JSON object in the schema of Dynamo's JSONL lines (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            msg += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            msg += "\n" + self.formatStack(record.stack_info)
        out: dict[str, Any] = {"time": _now(record.created), "level": _LEVELS.get(record.levelname, record.levelname),
                               "target": record.name, "message": msg, "file": record.pathname, "line": record.lineno}
        for k, v in record_fields(record).items():
            out.setdefault(k, v)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextLineFormatter(logging.Formatter):
    """A record as Rust tracing's compact line (the runtime's text format)."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVELS.get(record.levelname, record.levelname)
        msg = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            msg += "\n" + self.formatException(record.exc_info)
        ts = _now(record.created)
        if not self.colour:
            return f"{ts} {level:>5} {record.name}: {msg}"
        return (f"{_DIM}{ts}{_RESET} {_COLOURS.get(level, '')}{level:>5}{_RESET} {_DIM}{record.name}{_RESET}"
                f"{_DIM}:{_RESET} {msg}")


def formatter() -> logging.Formatter:
    return JsonLineFormatter() if jsonl_enabled() else TextLineFormatter()


class FdLineHandler(logging.Handler):
    """Each record as one line written with a single ``os.write`` (the rest retried) on a file descriptor."""

    def __init__(self, fd: int = 2, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record).replace("\r", "") + "\n").encode("utf-8", "replace")
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure(level: int | None = None) -> logging.Handler:
    """Root logger -> fd 2 in this process's format; warnings and uncaught exceptions (main and threads) go
    through it too. Replaces any root handler installed before. Returns the handler."""
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    handler = FdLineHandler(2)
    handler.setFormatter(formatter())
    root.addHandler(handler)
    root.setLevel(log_level() if level is None else level)
    logging.captureWarnings(True)

    def _excepthook(tp: Any, value: Any, tb: Any) -> None:
        logging.getLogger("dynamo_ext").error("uncaught exception", exc_info=(tp, value, tb))

    def _thread_excepthook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("dynamo_ext").error("uncaught exception in thread %s",
                                              getattr(args.thread, "name", "?"),
                                              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    return handler


def adopt(handler: logging.Handler) -> None:
    """A handler installed by a library (NIXL writes to stdout with its own format): our format, on stderr."""
    if isinstance(handler, logging.StreamHandler):
        handler.setStream(sys.stderr)
    handler.setFormatter(formatter())


def ready_line_text(fields: dict[str, Any]) -> str:
    """The readiness line a worker prints on stdout (``launch.supervisor.ready_line`` reads both forms):
    text ``DYNAMO_EXT_READY k=v ...``; with ``DYN_LOGGING_JSONL`` a JSON line of the log schema whose message is
    that text and whose fields are ``fields``."""
    text = " ".join([READY_PREFIX] + [f"{k}={v}" for k, v in fields.items()])
    if not jsonl_enabled():
        return text
    out = {"time": _now(time.time()), "level": "INFO", "target": "dynamo_ext.ready", "message": text}
    out.update({k: v for k, v in fields.items() if k not in out})
    return json.dumps(out, default=str)


__all__ = ["FdLineHandler", "JsonLineFormatter", "READY_PREFIX", "TextLineFormatter", "adopt", "configure",
           "formatter", "jsonl_enabled", "log_level", "ready_line_text", "record_fields"]
