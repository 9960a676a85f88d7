"""The log's lines: each is one write, so processes sharing a log file
(the daemon and its two children, or the journal's stream) never leave
half a line for another's to be glued to."""

from __future__ import annotations

import json

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
