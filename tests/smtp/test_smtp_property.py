"""Property: any body arrives at a real aiosmtpd exactly as meant, or is refused before sending.

"As meant" is the body with every bare CR and bare LF turned into CRLF and a
final CRLF added: the only changes the client may make.  Dots at line starts,
lone CR/LF, smuggling sequences, NUL and 8-bit bytes all come through.  A line
longer than 998 octets is refused with SmtpMessageError and nothing reaches
the server.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from smtp_helpers import FreePortController, RecordingHandler, run

from smtpgate.smtp import SmtpConnection, SmtpMessageError, UpstreamSettings

TRICKY = [b".", b"..", b"\r", b"\n", b"\r\n", b"\n.\n", b"\r\n.\r", b"\r\n.\r\n", b"\r.\r",
          b"\x00", b"\xff", b"\xc3\xa9", b" ", b"\t", b"x" * 990]
pieces = st.lists(st.one_of(st.sampled_from(TRICKY), st.binary(max_size=40)), max_size=30).map(b"".join)
# One body in four gets a 999-octet run somewhere: usually a line too long.
bodies = st.tuples(pieces, st.sampled_from([b"", b"", b"", b"L" * 999]), pieces).map(b"".join)


def as_meant(data: bytes) -> bytes:
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


@pytest.fixture(scope="module")
def upstream():
    handler = RecordingHandler()
    controller = FreePortController(handler, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    yield controller.port, handler
    controller.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=bodies)
def test_any_body_arrives_exactly_as_meant(upstream, data):
    port, handler = upstream
    before = len(handler.messages)
    expected = as_meant(data)
    too_long = any(len(line) > 998 for line in expected.split(b"\r\n"))
    event("refused: line over 998" if too_long else "sent")

    async def scenario():
        conn = await SmtpConnection.open(UpstreamSettings("127.0.0.1", port, tls="none", helo_name="prop.example"))
        try:
            return await conn.send("a@example.org", ["b@example.org"], data)
        finally:
            await conn.quit()

    if too_long:
        with pytest.raises(SmtpMessageError):
            run(scenario())
        assert len(handler.messages) == before
    else:
        result = run(scenario())
        assert result.recipients[0].status == "accepted"
        assert handler.messages[-1].data == expected
        assert len(handler.messages) == before + 1
