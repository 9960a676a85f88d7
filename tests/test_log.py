"""The log's lines: each is one write, so processes sharing a log file
(the daemon and its two children, or the journal's stream) never leave
half a line for another's to be glued to."""

from __future__ import annotations

import json

import pytest
import structlog

from smtpgate.log import get_logger, setup_logging


class Writes:
    """A stream that keeps every write() it is given."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_log_line_is_one_write_with_its_newline():
    stream = Writes()
    setup_logging("json", "info", stream)
    try:
        get_logger().warning("delivery_process_lost", error="the delivery process exited")
    finally:
        structlog.reset_defaults()
    [line] = stream.calls  # print() would have written the text and "\n" apart
    assert line.endswith("\n") and json.loads(line)["event"] == "delivery_process_lost"


def test_a_json_line_carries_its_fields_level_and_utc_time(monkeypatch):
    """The JSON renderer and time stamp of log.py (made cheaper than
    structlog's, as a line per relayed message pays them): the bound and
    given fields as JSON (text not escaped to ASCII, other objects by
    repr), the level, and the time in UTC with microseconds."""
    import time
    from datetime import datetime, timezone

    stream = Writes()
    setup_logging("json", "info", stream)
    try:
        for now in (1_800_000_000.25, 1_800_000_000.5, 1_800_000_061.000001):
            monkeypatch.setattr(time, "time", lambda now=now: now)
            get_logger().bind(message_id="01JD").info("delivery_attempt", replies={"zoë@example.org": "250 ok"},
                                                      upstream=None, note=object())
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.calls]
    assert [line["timestamp"] for line in lines] == [
        "2027-01-15T08:00:00.250000Z", "2027-01-15T08:00:00.500000Z", "2027-01-15T08:01:01.000001Z"]
    assert datetime.fromisoformat(lines[0]["timestamp"].replace("Z", "+00:00")) == \
        datetime.fromtimestamp(1_800_000_000.25, timezone.utc)
    first = lines[0]
    assert first["event"] == "delivery_attempt" and first["level"] == "info" and first["message_id"] == "01JD"
    assert first["replies"] == {"zoë@example.org": "250 ok"} and first["upstream"] is None
    assert first["note"].startswith("<object object at ")
    assert "zoë" in stream.calls[0]  # not \\u00eb


def test_json_line_writes_the_renderers_line_byte_for_byte(monkeypatch):
    """log.json_line, the delivery process's way to write its line per
    attempt: the same bytes as log.info(event, **fields) through structlog
    (fields in the order given, text not escaped to ASCII, quotes and
    newlines escaped, other objects by repr), in one write()."""
    import time

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    note = object()
    fields = dict(message_id="01JD", state="deferred", attempt=3, upstream=None,
                  replies={"zoë@example.org": '451 "try" later\n', "b@example.org": "250 ok"},
                  possible_duplicate=True, known=False, next_attempt=1_800_000_060.5, note=note,
                  ratio=float("inf"))
    stream = Writes()
    setup_logging("json", "info", stream)
    try:
        from smtpgate.log import json_line

        json_line("delivery_attempt")(**fields)
        get_logger().info("delivery_attempt", **fields)
    finally:
        structlog.reset_defaults()
    fast, through_structlog = stream.calls
    assert fast == through_structlog
    line = json.loads(fast)
    assert list(line) == [*fields, "event", "level", "timestamp"]
    assert line["replies"]["zoë@example.org"] == '451 "try" later\n' and line["timestamp"].endswith(".250000Z")


@pytest.mark.parametrize("fmt, level", [("console", "info"), ("json", "warning")])
def test_json_line_is_none_where_the_logger_writes_no_json_line(fmt, level):
    """The console format, or info lines not logged: callers fall back to
    the logger (which then renders for a terminal, or drops the line)."""
    from smtpgate.log import json_line

    setup_logging(fmt, level, Writes())
    try:
        assert json_line("delivery_attempt") is None
    finally:
        structlog.reset_defaults()
