"""Structured logs: JSON lines when stderr is not a terminal, readable lines when it is.

Every line about a message carries `message_id`, its first field (given
first, or bound with `log.bind(message_id=...)`). The delivery process's
line per attempt goes by `json_line`, the same bytes for about two thirds of the cost.
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

# What setup_logging chose, for json_line: the stream and level when the
# lines are JSON, else None.
_json_setup: tuple[object, int] | None = None


def setup_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty()) if fmt == "console" else _render_json
    global _json_setup, _stamp
    _json_setup = (stream, _LEVELS[level]) if fmt == "json" else None
    _stamp = _TimeStamper()
    structlog.configure(
        # Nothing binds context variables (structlog.contextvars): lines
        # carry what their logger was bound with. The delivery process logs
        # a line per attempt, so each step here is paid per message relayed.
        processors=[
            structlog.processors.add_log_level,
            _stamp,
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
        event_dict["timestamp"] = self.now()
        return event_dict

    def now(self) -> str:
        second, micro = divmod(round(time.time() * 1_000_000), 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micro:06d}Z"


_stamp = _TimeStamper()  # setup_logging's, shared by json_line


# One encoder for every line, the C one json.JSONEncoder(ensure_ascii=False,
# default=repr) builds anew inside every encode() call (and json.dumps with
# any option builds the JSONEncoder too): 4.5 -> 3.3 us for the
# delivery_attempt line by timeit. No check for circular containers
# (markers None): a line's fields are built by our own calls.
_ENCODE = json.encoder.c_make_encoder(None, repr, json.encoder.encode_basestring, None, ": ", ", ",
                                      False, False, True)


def _render_json(logger, name: str, event_dict: dict) -> str:
    return "".join(_ENCODE(event_dict, 0))


def json_line(event: str, level: str = "info"):
    """For a line logged for every message relayed (delivery_attempt): a
    function that writes `event` with the fields it is given, byte for
    byte the line the JSON renderer makes of `log.<level>(event,
    **fields)` (the fields in the order given, then event, level and
    timestamp), straight to the stream; None when the lines are not JSON
    or `level` is not logged (then log through the logger as usual).

    Why: structlog's path (a bound logger's method, the event dict, four
    processors, the encoder of the whole dict, the stream) took 11.5 us by
    timeit for delivery_attempt, this one 7.4 (9.1 and 5.8 to /dev/null);
    the delivery process paid the difference two to four times over in
    place (issue 15)."""
    if _json_setup is None or _LEVELS[level] < _json_setup[1]:
        return None
    stream, stamp = _json_setup[0], _stamp
    tail = f', "event": {_str(event)}, "level": {_str(level)}, "timestamp": "'

    def write(**fields) -> None:
        # One write() per line, as structlog's WriteLogger does it.
        stream.write(f"{{{', '.join([f'{_str(key)}: {_value(value)}' for key, value in fields.items()])}"
                     f'{tail}{stamp.now()}"}}\n')
        stream.flush()

    return write


_str = json.encoder.encode_basestring


def _value(value) -> str:
    """What _ENCODE makes of `value`; the common kinds without it."""
    kind = type(value)
    if kind is str:
        return _str(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    return "".join(_ENCODE(value, 0))


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
