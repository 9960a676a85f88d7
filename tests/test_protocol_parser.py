"""The sans-IO line parser and the reply formatters.

Every reader is run three ways (h11 tests/test_io.py::tr): the whole input in
one feed, one byte per feed, and with trailing bytes that must stay unconsumed.
"""

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.protocol import (
    FOREIGN_PREFIXES, BadLine, ForeignProtocol, LineParser, LineTooLong,
    Request, codes, reply_err, reply_ok,
)


def drain(parser):
    events = []
    while (ev := parser.next_event()) is not None:
        events.append(ev)
    return events


def run_whole(data, max_line=100):
    p = LineParser(max_line)
    p.feed(data)
    return drain(p), p


def run_bytewise(data, max_line=100):
    p = LineParser(max_line)
    events = []
    for i in range(len(data)):
        p.feed(data[i:i + 1])
        events += drain(p)
    return events, p


def tr(data, expected, max_line=100):
    """Assert `data` gives `expected` fed whole and byte by byte, and that an
    incomplete trailing line is held, not consumed nor turned into an event."""
    for run in (run_whole, run_bytewise):
        events, p = run(data, max_line)
        assert events == expected, run.__name__
        assert p.pending_bytes == 0, run.__name__
    trailing = b"PIN"
    events, p = run_whole(data + trailing, max_line)
    assert events == expected
    assert p.pending_bytes == len(trailing)
    p.feed(b"G\n")
    assert p.next_event() == Request("PING", None)
    assert p.next_event() is None


@pytest.mark.parametrize("data, expected", [
    (b"PING\n", [Request("PING", None)]),
    (b"PING\r\n", [Request("PING", None)]),
    (b"ping\n", [Request("PING", None)]),
    (b"HELLO 1\r\n", [Request("HELLO", "1")]),
    (b"SEND {\"a\": \"b c\"}\n", [Request("SEND", '{"a": "b c"}')]),
    # Only the first space separates; the argument keeps the rest verbatim.
    (b"WAIT id  5 \n", [Request("WAIT", "id  5 ")]),
    (b"NOOP \n", [Request("NOOP", "")]),
    # Only a CR right before the LF is dropped.
    (b"AUTH a\rb\r\n", [Request("AUTH", "a\rb")]),
    (b"AUTH t\r\r\n", [Request("AUTH", "t\r")]),
    ("SEND {\"subject\":\"记得收衣服\"}\n".encode(), [Request("SEND", '{"subject":"记得收衣服"}')]),
    (b"PING\nSTATS\r\nQUIT\n", [Request("PING", None), Request("STATS", None), Request("QUIT", None)]),
])
def test_requests(data, expected):
    tr(data, expected)


@pytest.mark.parametrize("data, reason", [
    (b"\n", "empty request line"),
    (b"\r\n", "empty request line"),
    (b" PING\n", "request starts with a space"),
    (b"SEND \xff\xfe\n", "request is not valid UTF-8 (byte 5)"),
    (b"SEND \xed\xa0\x80\n", "request is not valid UTF-8 (byte 5)"),  # encoded surrogate
    # U+017F upper-cases to "S": "ſend" must not become SEND.
    ("ſend {}\n".encode(), "verb is not ASCII"),
])
def test_bad_lines_keep_the_connection_usable(data, reason):
    tr(data, [BadLine(reason)])


def test_line_limit_excludes_the_terminator():
    tr(b"A" * 10 + b"\r\n", [Request("A" * 10, None)], max_line=10)
    tr(b"A" * 10 + b"\n", [Request("A" * 10, None)], max_line=10)
    tr(b"A" * 11 + b"\n", [LineTooLong(11)], max_line=10)
    tr(b"A" * 10 + b"\rB\n", [LineTooLong(12)], max_line=10)
    tr(b"A" * 11 + b"\r\n", [LineTooLong(12)], max_line=10)
    tr(b"A" * 10 + b"\r\r\n", [LineTooLong(12)], max_line=10)


def test_over_long_line_is_drained_and_the_next_request_parsed():
    data = b"SEND " + b"x" * 5000 + b"\nPING\n"
    tr(data, [LineTooLong(5005), Request("PING", None)], max_line=100)


def test_draining_holds_no_bytes():
    p = LineParser(max_line=1000)
    p.feed(b"SEND ")
    assert p.next_event() is None
    chunk = b"y" * 65536
    for _ in range(100):                  # 6.5 MB through a 1000-byte limit
        p.feed(chunk)
        assert p.next_event() is None
        assert p.pending_bytes == 0
    p.feed(b"\r\nNOOP\n")
    assert drain(p) == [LineTooLong(5 + 100 * 65536 + 1), Request("NOOP", None)]


def test_incomplete_line_held_up_to_the_limit_only():
    p = LineParser(max_line=50)
    p.feed(b"S" * 51)                     # still may end in CR LF
    assert p.next_event() is None
    assert p.pending_bytes == 51
    p.feed(b"S")
    assert p.next_event() is None
    assert p.pending_bytes == 0           # draining now


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"POST /send HTTP/1.1", b"HEAD / HTTP/1.0", b"PUT /x HTTP/1.1",
    b"OPTIONS * HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1", b"DELETE /x HTTP/1.1",
    b"Host: 127.0.0.1:2526", b"User-Agent: Mozilla/5.0", b"host:x",
    b"EHLO client.example", b"HELO client.example", b"helo", b"EHLO",
    b"MAIL FROM:<a@example.com>", b"mail from:<>", b"RCPT TO:<b@example.com>",
    b"PRI * HTTP/2.0", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
])
def test_foreign_protocol_closes(line):
    for run in (run_whole, run_bytewise):
        events, p = run(line + b"\r\n" + b"PING\n")
        assert len(events) == 1 and isinstance(events[0], ForeignProtocol), run.__name__
        assert line.startswith(events[0].line_start[:len(line)])
        assert p.closed
        p.feed(b"PING\n")                 # nothing more is parsed
        assert p.next_event() is None


@pytest.mark.parametrize("start", [b"GET ", b"POST ", b"Host:", b"EHLO ", b"MAIL FROM:", b"\x16\x03"])
def test_foreign_protocol_detected_before_the_lf(start):
    p = LineParser(max_line=100)
    for i in range(len(start) - 1):
        p.feed(start[i:i + 1])
        assert p.next_event() is None, start[:i + 1]
    p.feed(start[-1:])
    assert isinstance(p.next_event(), ForeignProtocol)


def test_foreign_protocol_after_a_valid_request():
    p = LineParser(max_line=100)
    p.feed(b"PING\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert p.next_event() == Request("PING", None)
    assert isinstance(p.next_event(), ForeignProtocol)
    assert p.next_event() is None


@pytest.mark.parametrize("line", [b"HELLO 1", b"HELP", b"POSTPONE", b"GETS", b"HOSTS x", b"EHLOX", b"MAIL"])
def test_our_verbs_and_lookalikes_are_not_foreign(line):
    tr(line + b"\n", [Request(line.split(b" ")[0].decode(), (line.split(b" ", 1) + [None])[1] and line.split(b" ", 1)[1].decode())])


def test_no_verb_of_ours_starts_like_a_foreign_protocol():
    for verb in ("PING", "HELLO", "AUTH", "SEND", "STATUS", "WAIT", "STATS", "NOOP", "HELP", "QUIT"):
        assert not (verb + " ").encode().startswith(FOREIGN_PREFIXES)


def test_thousand_pipelined_requests_in_one_feed():
    one = b'SEND {"from":"a@example.com","to":"b@example.org","text":"hi"}\r\n'
    p = LineParser(max_line=1 << 20)
    p.feed(one * 1000 + b"QUIT\n")
    events = drain(p)
    assert len(events) == 1001
    assert events[0] == Request("SEND", '{"from":"a@example.com","to":"b@example.org","text":"hi"}')
    assert all(ev == events[0] for ev in events[:1000])
    assert events[-1] == Request("QUIT", None)
    assert p.pending_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=40),
                min_size=1, max_size=8),
       st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=50))
def test_any_split_gives_the_same_events(lines, cuts):
    data = b"".join(b"NOOP " + line.encode() + b"\r\n" for line in lines)
    whole, _ = run_whole(data, max_line=1 << 16)
    p, events, pos, i = LineParser(1 << 16), [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        p.feed(data[pos:pos + step])
        events += drain(p)
        pos, i = pos + step, i + 1
    assert events == whole == [Request("NOOP", line) for line in lines]


def test_reply_ok():
    assert reply_ok() == b"OK\r\n"
    assert reply_ok("PONG") == b"OK PONG\r\n"
    assert reply_ok('{"id":"x","subject":"记"}') == '{"id":"x","subject":"记"}'.join(["OK ", "\r\n"]).encode()
    with pytest.raises(ValueError):
        reply_ok("a\nb")


def test_reply_err_is_always_one_line():
    assert reply_err(codes.BAD_REQUEST, "unknown verb") == b"ERR BAD_REQUEST unknown verb\r\n"
    assert reply_err(codes.BAD_HEADER, "bad\r\nX-Injected: 1") == b"ERR BAD_HEADER bad  X-Injected: 1\r\n"
    assert reply_err(codes.BUSY, "") == b"ERR BUSY\r\n"
    with pytest.raises(ValueError):
        reply_err("NOPE", "x")


def test_codes_match_the_protocol_table():
    assert codes.ALL_CODES == {
        "BAD_REQUEST", "BAD_ADDRESS", "BAD_HEADER", "TOO_LARGE", "AUTH_REQUIRED",
        "AUTH_FAILED", "NOT_FOUND", "DENIED", "BUSY", "INTERNAL",
    }


def _comparable(events):
    # A foreign line's start is reported from the bytes in at detection time.
    return [type(ev) if isinstance(ev, ForeignProtocol) else ev for ev in events]


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=400).map(lambda b: b.replace(b"\x00", b"\n")),
    st.lists(st.sampled_from([b"GET ", b"HELO", b"\r", b"\n", b"PING", b"x", b"\xff", b" ", b"Host:",
                              b"\x16\x03", b"SEND {}"]), max_size=30).map(b"".join)),
       st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30),
       st.integers(min_value=1, max_value=40))
def test_any_bytes_any_split(data, cuts, max_line):
    """Whatever the bytes and however they are cut: no exception, the same events
    as in one feed, and never more held than one line of max_line + CR."""
    whole, _ = run_whole(data, max_line)
    p, events, pos, i = LineParser(max_line), [], 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        p.feed(data[pos:pos + step])
        events += drain(p)
        assert p.closed or p.pending_bytes <= max(max_line + 1, max(map(len, FOREIGN_PREFIXES)))
        pos, i = pos + step, i + 1
    assert _comparable(events) == _comparable(whole)
