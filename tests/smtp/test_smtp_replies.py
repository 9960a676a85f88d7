"""The reply parser (RFC 5321 4.2), fed whole, one byte at a time and in odd splits."""

from __future__ import annotations

from itertools import pairwise
import pytest

from smtpgate.smtp import Reply, ReplyParser, SmtpProtocolError
from smtpgate.smtp.replies import MAX_LINE, MAX_REPLY

EHLO_REPLY = (
    b"250-mail.example.org Hello\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)


def split_whole(data: bytes) -> list[bytes]:
    return [data]


def split_bytes(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_odd(data: bytes) -> list[bytes]:
    # Cuts inside the code, right after the code, between CR and LF.
    cuts = [0, 2, 3, 4, 7, 20, 21, 22, 50, len(data)]
    return [data[a:b] for a, b in pairwise(cuts) if a < len(data)]


SPLITS = [split_whole, split_bytes, split_odd]


def parse_all(data: bytes, split) -> list[Reply]:
    parser = ReplyParser()
    replies = []
    for piece in split(data):
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies


@pytest.mark.parametrize("split", SPLITS)
def test_multi_line_reply_is_one_reply_whatever_the_read_boundaries(split):
    replies = parse_all(EHLO_REPLY + b"250 2.1.0 Ok\r\n", split)
    assert replies == [
        Reply(250, ("mail.example.org Hello", "SIZE 10240000", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES")),
        Reply(250, ("2.1.0 Ok",)),
    ]


def test_incomplete_reply_stays_buffered_and_trailing_bytes_unconsumed():
    parser = ReplyParser()
    parser.feed(b"250-first\r\n250-second\r\n")
    assert parser.next_reply() is None
    assert parser.pending == len(b"250-first\r\n250-second\r\n")
    parser.feed(b"250 last\r\n354 go")
    assert parser.next_reply() == Reply(250, ("first", "second", "last"))
    assert parser.next_reply() is None
    assert parser.pending == len(b"354 go")
    parser.feed(b" ahead\r\n")
    assert parser.next_reply() == Reply(354, ("go ahead",))
    assert parser.pending == 0


def test_bare_code_and_bare_lf_are_accepted():
    assert parse_all(b"250\r\n221 bye\n", split_whole) == [Reply(250, ("",)), Reply(221, ("bye",))]


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",  # not a reply at all
        b"25 ok\r\n",  # two digits
        b"2500 ok\r\n",  # four digits
        b"650 ok\r\n",  # first digit out of 2-5
        b"250_ok\r\n",  # neither space nor hyphen after the code
        b"250-first\r\n550 second\r\n",  # code changes inside a multi-line reply
        b"\r\n",
    ],
)
@pytest.mark.parametrize("split", SPLITS)
def test_grammar_violations_are_protocol_errors(data, split):
    with pytest.raises(SmtpProtocolError):
        parse_all(data, split)


def test_endless_line_without_lf_is_refused_before_growing_past_the_cap():
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * MAX_LINE)
    with pytest.raises(SmtpProtocolError, match="longer than"):
        parser.next_reply()


def test_endless_continuation_lines_are_refused():
    line = b"250-" + b"x" * 1000 + b"\r\n"
    with pytest.raises(SmtpProtocolError, match="reply longer"):
        parse_all(line * (MAX_REPLY // len(line) + 1), split_whole)


@pytest.mark.parametrize(
    "reply, enhanced",
    [
        (Reply(250, ("2.0.0 Ok: queued as 4F2",)), "2.0.0"),
        (Reply(550, ("5.1.1 <x@y>: Recipient address rejected",)), "5.1.1"),
        (Reply(451, ("4.7.1 Try again later",)), "4.7.1"),
        (Reply(250, ("Ok",)), None),
        (Reply(550, ("2.0.0 class does not match the code",)), None),
        (Reply(250, ("2.0.0x not a code",)), None),
    ],
)
def test_enhanced_status_code(reply, enhanced):
    assert reply.enhanced == enhanced


def test_text_str_and_classes():
    reply = Reply(250, ("2.0.0 Ok: queued as 4F2",))
    assert str(reply) == "250 2.0.0 Ok: queued as 4F2"
    assert reply.text == "2.0.0 Ok: queued as 4F2"
    multi = Reply(550, ("5.7.1 first", "second"))
    assert str(multi) == "550 5.7.1 first\n550 second"
    assert multi.text == "5.7.1 first\nsecond"
    assert multi.is_permanent and not multi.is_transient and not multi.is_positive
    assert Reply(421, ("x",)).is_transient
    assert Reply(354, ("go",)).is_positive


def test_non_utf8_text_is_replaced_not_a_crash():
    (reply,) = parse_all(b"550 caf\xe9\r\n", split_whole)
    assert reply.code == 550 and reply.text == "caf\ufffd"
