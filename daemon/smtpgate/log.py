"""Structured logs: JSON lines when stderr is not a terminal, readable lines when it is.

Every line about a message carries `msg_id` (bind it with `log.bind(msg_id=...)`).
Secrets never reach a log call; `redact` exists for values that might hold one.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty()) if fmt == "console" else _render_json
    structlog.configure(
        # Nothing binds context variables (structlog.contextvars): lines
        # carry what their logger was bound with. The delivery process logs
        # a line per attempt, so each step here is paid per message relayed.
        processors=[
            structlog.processors.add_log_level,
            _TimeStamper(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() per line: print() writes the text and its newline
        # apart, which unbuffered (PYTHONUNBUFFERED) is two system calls; a
        # child killed between them left half a line, and the next process
        # to log appended its own line to it, unreadable.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers = [_StdlibToStructlog()]
    # aiosmtpd logs every connection at INFO; its warnings are what matter.
    root.setLevel(max(logging.WARNING, _LEVELS[level]))


class _TimeStamper:
    """`timestamp`: the time in UTC, ISO 8601 with microseconds
    ("2026-12-06T20:31:38.123456Z"), its date and seconds formatted once a
    second: a third of what a datetime and its isoformat() cost per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger, name: str, event_dict: dict) -> dict:
        second, micro = divmod(round(time.time() * 1_000_000), 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        event_dict["timestamp"] = f"{self._prefix}.{micro:06d}Z"
        return event_dict


# One encoder for every line: json.dumps with any option makes a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, default=repr)


def _render_json(logger, name: str, event_dict: dict) -> str:
    return _JSON.encode(event_dict)


class _StdlibToStructlog(logging.Handler):
    """Routes stdlib logging (aiosmtpd logs through `mail.log`) into our renderer,
    so the journal stays one format."""

    def emit(self, record: logging.LogRecord) -> None:
        log = get_logger(logger=record.name)
        method = getattr(log, record.levelname.lower(), log.warning)
        if record.exc_info:
            method(record.getMessage(), exc_info=record.exc_info)
        else:
            method(record.getMessage())


def get_logger(**bound):
    return structlog.get_logger("smtpgate").bind(**bound)


def sockname(sock) -> str:
    """A listening socket's address for a log line: "host:port", or the Unix socket's path."""
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)
