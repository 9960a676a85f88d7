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
