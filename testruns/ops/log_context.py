"""Log lines that say which run and which case they are about.

Code logs with `extra={"run_id": ..., "case_id": ...}`, or wraps a stretch of work in
`log_context(run_id=..., case_id=...)` so that every line inside it (from any module, the
providers' and the gate's too) carries them. `RunContextFilter` fills in both attributes on
every record, and one of two formatters writes them:

- `PlainFormatter` (the default): `2025-01-01 12:00:00,000 INFO testruns.engine.launching run queued
  run=12 case=345`, the ids appended only when known;
- `JSONFormatter` (LOG_FORMAT=json): one JSON object per line with time, level, logger,
  message, run_id, case_id and, for errors, the traceback.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_run_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("log_run_id", default=None)
_case_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("log_case_id", default=None)


@contextmanager
def log_context(*, run_id: int | None = None, case_id: int | None = None) -> Iterator[None]:
    """Within this block, log records without their own ids get these."""
    run_token = _run_id.set(run_id)
    case_token = _case_id.set(case_id)
    try:
        yield
    finally:
        _case_id.reset(case_token)
        _run_id.reset(run_token)


class RunContextFilter(logging.Filter):
    """Gives every record `run_id` and `case_id` (None when unknown), from its `extra` or
    else from the enclosing log_context. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is None:
            record.run_id = _run_id.get()
        if getattr(record, "case_id", None) is None:
            record.case_id = _case_id.get()
        return True


def context_suffix(run_id: int | None, case_id: int | None) -> str:
    parts = []
    if run_id is not None:
        parts.append(f"run={run_id}")
    if case_id is not None:
        parts.append(f"case={case_id}")
    return " " + " ".join(parts) if parts else ""


class PlainFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s %(message)s` plus the ids, also when a record did
    not pass through RunContextFilter (a handler configured without it)."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s %(message)s", datefmt)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        suffix = context_suffix(getattr(record, "run_id", None), getattr(record, "case_id", None))
        if not suffix:
            return text
        # The ids close the message's first line, not a traceback that follows it.
        first, newline, rest = text.partition("\n")
        return f"{first}{suffix}{newline}{rest}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
            "case_id": getattr(record, "case_id", None),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
