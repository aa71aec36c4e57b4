"""Logging: text or JSON lines, the context of each line, redaction, one line per task.

:func:`configure` sets up the root logger once per process (``--log-level``,
``--log-format``). With ``json``, every line is one JSON object::

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "gateway.tasks",
     "message": "task … success in 0.412 s", "taskUUID": "…", "connectionSessionUUID": "…", …}

Context fields come from three places: :data:`TASK_UUID` and :data:`SESSION` (context
variables: a connection sets them while it handles a frame, and what it spawns inherits
them), the process's own (:func:`set_process_fields`: a worker's ``workerId``), and a
call's ``extra=`` (which wins). Text lines stay the classic one-liners.

Redaction, on every line of every logger at every level (:func:`redact`): the API keys
the server was given, data URIs, base64 runs, long bytes literals and URL query strings
(a presigned upload URL is a credential) are replaced before a line is written.
websockets, which logs whole frames at DEBUG, is kept at INFO where it is used.

:func:`task_ended` writes the one line per task at its end, with its timings by stage:
at INFO in JSON (for log pipelines), at DEBUG in text (where it would drown the rest).
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable

import orjson

from engine.stats import RequestDone

__all__ = [
    "SESSION",
    "TASK_UUID",
    "EngineStages",
    "configure",
    "redact",
    "set_process_fields",
    "stage_seconds",
    "task_ended",
    "task_lines_enabled",
]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

TASK_UUID: contextvars.ContextVar[str | None] = contextvars.ContextVar("taskUUID", default=None)
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("connectionSessionUUID", default=None)

task_logger = logging.getLogger("gateway.tasks")
_task_level = logging.DEBUG  # INFO once configured for JSON
_process_fields: dict[str, str] = {}
_secrets: list[str] = []

# Third-party loggers that would otherwise write payloads or a line per chunk at DEBUG.
_QUIET = {"PIL": logging.INFO, "websockets": logging.INFO, "gateway.websockets": logging.INFO}


def configure(
    level: str | int = "INFO",
    fmt: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream=None,
    fmt_text: str = TEXT_FORMAT,
) -> None:
    """Log to ``stream`` (stderr) at ``level`` in ``fmt`` (``text``, laid out as
    ``fmt_text``, or ``json``), redacting ``secrets`` (the API keys) wherever they appear."""
    global _task_level
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}")
    _secrets[:] = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(fmt_text))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name, floor in _QUIET.items():
        quiet = logging.getLogger(name)
        quiet.setLevel(max(floor, quiet.getEffectiveLevel()))
    _task_level = logging.INFO if fmt == "json" else logging.DEBUG
    if fmt == "json":  # nothing but JSON lines on stderr: no download or loading progress bars
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def set_process_fields(**fields: str) -> None:
    """Fields on every JSON line of this process (e.g. ``workerId``)."""
    _process_fields.update(fields)


# Redaction

_DATA_URI = re.compile(r"data:([\w.+/-]{0,64});base64,[A-Za-z0-9+/=]*")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{80,}={0,2}")
_BYTES_LITERAL = re.compile(r"""b(['"])(?:\\.|(?!\1).){80,}?\1""")
_QUERY = re.compile(r"((?:https?|wss?)://[^\s?#\"'<>]+)\?[^\s\"'<>]*")


def redact(text: str) -> str:
    """``text`` without API keys, image payloads, data URIs or URL query strings."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "<redacted>")
    if "base64," in text:
        text = _DATA_URI.sub(lambda m: f"data:{m.group(1)};base64,<{len(m.group(0))} chars>", text)
    if len(text) >= 80:
        text = _BASE64_RUN.sub(lambda m: f"<base64: {len(m.group(0))} chars>", text)
        text = _BYTES_LITERAL.sub(lambda m: f"b<{len(m.group(0))} chars>", text)
    if "?" in text:
        text = _QUERY.sub(r"\1?<query>", text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then context fields."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict = {
            "time": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            **_process_fields,
        }
        task_uuid, session = TASK_UUID.get(), SESSION.get()
        if task_uuid is not None:
            line["taskUUID"] = task_uuid
        if session is not None:
            line["connectionSessionUUID"] = session
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            if isinstance(value, str):
                line[key] = redact(value)
            elif value is None or isinstance(value, int | float | dict | list):  # not objects' reprs
                line[key] = value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(line, default=str).decode()


# One line per task


def task_lines_enabled() -> bool:
    """Whether :func:`task_ended` writes anything (worth gathering its timings)."""
    return task_logger.isEnabledFor(_task_level)


def task_ended(
    task_uuid: str,
    task_type: str,
    *,
    code: str | None,
    deliver_async: bool,
    session_id: str | None,
    seconds: dict[str, float],
    **fields,
) -> None:
    """The one line of a task at its end: outcome and timings by stage (seconds)."""
    if not task_logger.isEnabledFor(_task_level):
        return
    outcome = "success" if code is None else code
    stages = ", ".join(f"{k} {v:.4f}" for k, v in seconds.items() if k != "total")
    extra = {
        "taskUUID": task_uuid,
        "taskType": task_type,
        "outcome": outcome,
        "delivery": "async" if deliver_async else "sync",
        "seconds": seconds,
        **fields,
    }
    if code is not None:
        extra["code"] = code
    if session_id:
        extra["connectionSessionUUID"] = session_id
    total = seconds.get("total")
    took = "" if total is None else f" in {total:.4f} s"
    task_logger.log(
        _task_level, "task %s %s%s (%s)", task_uuid, outcome, took, stages or "no stages", extra=extra
    )


class EngineStages:
    """The engine's :class:`~engine.stats.RequestDone` of each request, kept until its
    task's line is written (an engine observer; bounded: the oldest go first). The
    engine reports a request done before it emits the request's output, so the entry is
    there when the output is handled."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._done: OrderedDict[str, RequestDone] = OrderedDict()

    def observe(self, event) -> None:
        if isinstance(event, RequestDone):
            self._done[event.request_id] = event
            if len(self._done) > self.limit:
                self._done.popitem(last=False)

    def pop(self, request_id: str) -> RequestDone | None:
        return self._done.pop(request_id, None)


def stage_seconds(
    total: float,
    *,
    before_engine: float | None = None,
    done: RequestDone | None = None,
    queued: float | None = None,
) -> dict[str, float]:
    """A task's timings by stage: ``total``, then (when known) ``cluster_queue`` (on a
    worker: the ``queued`` seconds on Redis, part of ``before_engine``), ``input``
    (accepted or begun → submitted to the engine: input decoded, fetched, stored),
    ``queue`` (→ first UNet step), ``denoise`` (→ last step), ``decode`` (→ the
    engine's output: VAE decode and image encode), ``deliver`` (→ the terminal item
    sent: stored, uploaded)."""
    out = {"total": total}
    if queued is not None:
        out["cluster_queue"] = queued
    if before_engine is not None:
        out["input"] = max(0.0, before_engine - (queued or 0.0))
    if done is not None and before_engine is not None:
        if done.first_step is not None:
            out["queue"] = done.first_step
            if done.denoised is not None:
                out["denoise"] = done.denoised - done.first_step
        if done.denoised is not None:
            out["decode"] = done.finished - done.denoised
        out["deliver"] = max(0.0, total - before_engine - done.finished)
    return {k: round(v, 6) for k, v in out.items()}
