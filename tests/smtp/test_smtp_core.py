"""The sans-IO state machine with scripted server bytes: what it writes, what it concludes."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings, strategies as st

from smtpgate.smtp import (
    SmtpAuthError,
    SmtpClient,
    SmtpConnectionLost,
    SmtpMessageError,
    SmtpProtocolError,
    SmtpServerRefused,
    SmtpStartTlsUnavailable,
    SmtpTlsError,
    SmtpUsageError,
    prepare_body,
)
from smtpgate.smtp.core import (
    NEED_DATA,
    Authenticated,
    CommandDone,
    Greeting,
    Hello,
    State,
    TlsReady,
    parse_extensions,
)
from smtpgate.smtp.replies import Reply

EHLO_PIPELINING = (
    b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN XOAUTH2\r\n250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mx.example.org\r\n250 SIZE\r\n"


def pieces(data: bytes, split: str) -> list[bytes]:
    if split == "bytes":
        return [data[i : i + 1] for i in range(len(data))] or [b""]
    return [data]


def converse(client: SmtpClient, *replies: bytes, split: str = "whole"):
    """Play the server: after each flush, feed the next scripted reply.

    Returns (the bytes the client wrote, the event that ended the action).
    A reply is only fed once the client has written what it answers, as on
    a real connection.
    """
    wire = bytearray()
    queue = list(replies)
    while True:
        event = client.next_event()
        wire += client.data_to_send()
        if event is not NEED_DATA:
            assert not queue, f"unused scripted replies: {queue}"
            return bytes(wire), event
        assert queue, f"client waits for a reply; it wrote {bytes(wire)!r}"
        for piece in pieces(queue.pop(0), split):
            client.receive_data(piece)


def ready_client(ehlo: bytes = EHLO_PIPELINING, **kwargs) -> SmtpClient:
    client = SmtpClient(**kwargs)
    assert isinstance(converse(client, b"220 mx.example.org ESMTP\r\n")[1], Greeting)
    client.ehlo("client.example")
    assert isinstance(converse(client, ehlo)[1], Hello)
    return client


# ---- greeting and EHLO -------------------------------------------------------------


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_greeting_then_ehlo_parses_extensions(split):
    client = SmtpClient()
    wire, event = converse(client, b"220-mx.example.org ESMTP\r\n220 welcome\r\n", split=split)
    assert wire == b"" and event.reply.code == 220 and client.state is State.GREETED
    client.ehlo("client.example")
    wire, event = converse(client, EHLO_PIPELINING, split=split)
    assert wire == b"EHLO client.example\r\n"
    assert event.esmtp and client.state is State.READY
    assert event.extensions == {
        "PIPELINING": "", "SIZE": "1000000", "8BITMIME": "", "SMTPUTF8": "", "STARTTLS": "",
        "AUTH": "PLAIN LOGIN XOAUTH2", "ENHANCEDSTATUSCODES": "",
    }


@pytest.mark.parametrize("greeting, retryable", [(b"421 4.3.2 busy\r\n", True), (b"554 no service\r\n", False)])
def test_refused_greeting(greeting, retryable):
    client = SmtpClient()
    with pytest.raises(SmtpServerRefused) as caught:
        converse(client, greeting)
    assert caught.value.retryable is retryable
    assert caught.value.reply.code == int(greeting[:3])
    assert client.state is State.ERROR
    with pytest.raises(SmtpServerRefused):  # h11: after an error every call raises it
        client.ehlo("client.example")


def test_ehlo_refused_falls_back_to_helo_without_extensions():
    client = SmtpClient()
    converse(client, b"220 old server\r\n")
    client.ehlo("client.example")
    wire, event = converse(client, b"502 5.5.2 command not recognized\r\n", b"250 old server\r\n")
    assert wire == b"EHLO client.example\r\nHELO client.example\r\n"
    assert isinstance(event, Hello) and not event.esmtp and client.extensions == {}


def test_helo_refused_too():
    client = SmtpClient()
    converse(client, b"220 x\r\n")
    client.ehlo("client.example")
    with pytest.raises(SmtpServerRefused):
        converse(client, b"500 no\r\n", b"550 no either\r\n")


def test_old_style_auth_lines_are_merged():
    reply = Reply(250, ("mx", "AUTH=LOGIN", "AUTH PLAIN CRAM-MD5", "size 100"))
    assert parse_extensions(reply) == {"AUTH": "LOGIN PLAIN CRAM-MD5", "SIZE": "100"}


def test_bad_ehlo_name_is_a_usage_error():
    client = SmtpClient()
    converse(client, b"220 x\r\n")
    with pytest.raises(SmtpUsageError):
        client.ehlo("bad name\r\nMAIL FROM:<x>")


def test_actions_out_of_order_are_usage_errors():
    client = SmtpClient()
    with pytest.raises(SmtpUsageError, match="can't send_mail in state GREETING"):
        client.send_mail("a@x", ["b@y"], b"hi")
    converse(client, b"220 x\r\n")
    with pytest.raises(SmtpUsageError):
        client.send_mail("a@x", ["b@y"], b"hi")  # before EHLO


# ---- the mail transaction -----------------------------------------------------------


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_pipelined_transaction_is_one_write_and_replies_match_in_order(split):
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org", "bad@y.org", "later@y.org"], b"Subject: s\r\n\r\nbody\r\n")
    first_burst = client.data_to_send()
    assert first_burst == (
        b"MAIL FROM:<a@x.org> SIZE=20\r\n"
        b"RCPT TO:<b@y.org>\r\nRCPT TO:<bad@y.org>\r\nRCPT TO:<later@y.org>\r\n"
        b"DATA\r\n"
    )
    wire, event = converse(
        client,
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n450 4.2.0 greylisted\r\n354 go\r\n",
        b"250 2.0.0 Ok: queued as 4F2\r\n",
        split=split,
    )
    assert wire == b"Subject: s\r\n\r\nbody\r\n.\r\n"  # the body only after 354
    result = event.result
    assert [(r.address, r.status, r.reply.code) for r in result.recipients] == [
        ("b@y.org", "accepted", 250),
        ("bad@y.org", "permanent", 550),
        ("later@y.org", "temporary", 450),
    ]
    assert result.recipients[0].reply == result.data_reply == Reply(250, ("2.0.0 Ok: queued as 4F2",))
    assert result.mail_reply.code == 250
    assert not client.needs_reset and client.state is State.READY


EHLO_CHUNKING = b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 CHUNKING\r\n"


@pytest.mark.parametrize("split", ["whole", "bytes"])
def test_with_chunking_the_body_goes_as_bdat_last_in_the_first_write(split):
    """RFC 3030: MAIL, the RCPTs and BDAT <size> LAST with the body, one
    write; the body as it is (CRLF made canonical, no dot-stuffing, no final
    dot), SIZE its exact octets; the BDAT reply ends the data."""
    client = ready_client(EHLO_CHUNKING)
    body = b"Subject: s\n\n.leading dot\r\nbody\n"
    client.send_mail("a@x.org", ["b@y.org", "bad@y.org"], body)
    assert client.data_end_queued
    first_burst = client.data_to_send()
    canonical = b"Subject: s\r\n\r\n.leading dot\r\nbody\r\n"
    assert first_burst == (
        b"MAIL FROM:<a@x.org> SIZE=%d\r\nRCPT TO:<b@y.org>\r\nRCPT TO:<bad@y.org>\r\n"
        b"BDAT %d LAST\r\n" % (len(canonical), len(canonical)) + canonical
    )
    wire, event = converse(
        client, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n250 2.0.0 Ok: queued as 4F2\r\n",
        split=split,
    )
    assert wire == b""  # nothing after the replies: no DATA, no body, no dot
    result = event.result
    assert [(r.address, r.status, r.reply.code) for r in result.recipients] == [
        ("b@y.org", "accepted", 250), ("bad@y.org", "permanent", 550)]
    assert result.data_reply == Reply(250, ("2.0.0 Ok: queued as 4F2",))
    assert not client.needs_reset and client.state is State.READY


def test_bdat_refused_when_no_recipient_was_taken_leaves_the_rcpt_replies_deciding():
    client = ready_client(EHLO_CHUNKING)
    client.send_mail("a@x.org", ["b@y.org"], b"hi\r\n")
    wire, event = converse(client, b"250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n")
    assert wire.endswith(b"BDAT 4 LAST\r\nhi\r\n")
    assert [(r.status, r.reply.code) for r in event.result.recipients] == [("permanent", 550)]
    assert event.result.data_reply is None
    assert client.needs_reset  # MAIL was taken: the next transaction starts with RSET
    client.send_mail("a@x.org", ["c@y.org"], b"hi\r\n")
    assert client.data_to_send().startswith(b"RSET\r\nMAIL FROM:<a@x.org>")


def test_a_refused_last_chunk_fails_the_accepted_recipients_by_its_reply():
    client = ready_client(EHLO_CHUNKING)
    client.send_mail("a@x.org", ["b@y.org"], b"hi\r\n")
    _, event = converse(client, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n452 4.3.1 out of storage\r\n")
    assert [(r.status, r.reply.code) for r in event.result.recipients] == [("temporary", 452)]
    assert client.needs_reset


def test_chunking_without_pipelining_keeps_data():
    client = ready_client(b"250-mx.example.org\r\n250 CHUNKING\r\n")
    client.send_mail("a@x.org", ["b@y.org"], b"hi\r\n")
    wire, event = converse(client, b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued\r\n")
    assert wire == b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nhi\r\n.\r\n"
    assert event.result.accepted == ["b@y.org"]


def test_a_connection_lost_after_the_last_chunk_went_out_may_have_delivered():
    client = ready_client(EHLO_CHUNKING)
    client.send_mail("a@x.org", ["b@y.org"], b"hi\r\n")
    client.data_to_send()
    client.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert client.next_event() is NEED_DATA and client.awaiting == "DATA_END"
    client.receive_data(b"")
    with pytest.raises(SmtpConnectionLost) as caught:
        client.next_event()
    assert caught.value.after_data_end


def test_without_pipelining_each_command_waits_for_its_reply():
    client = ready_client(EHLO_PLAIN)
    client.send_mail("a@x.org", ["b@y.org", "c@y.org"], b"hi\r\n")
    wire, event = converse(
        client, b"250 ok\r\n", b"250 ok\r\n", b"550 no\r\n", b"354 go\r\n", b"250 queued\r\n"
    )
    assert wire == (
        b"MAIL FROM:<a@x.org> SIZE=4\r\nRCPT TO:<b@y.org>\r\nRCPT TO:<c@y.org>\r\nDATA\r\nhi\r\n.\r\n"
    )
    assert [r.status for r in event.result.recipients] == ["accepted", "permanent"]


@pytest.mark.parametrize("data, size, wire", [
    (b".a\n..b\r\nc\r\n.\r\n", 15, b"..a\r\n...b\r\nc\r\n..\r\n.\r\n"),
    (b"..\r\n", 4, b"...\r\n.\r\n"),
    (b"a\r\n.", 6, b"a\r\n..\r\n.\r\n"),
    (b"", 0, b".\r\n"),
])
def test_size_counts_neither_transparency_dots_nor_the_final_dot(data, size, wire):
    """RFC 1870: SIZE is the message's octets with CRLF line ends, without
    what DATA adds on the wire (RFC 5321 4.5.2)."""
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], data)
    assert client.data_to_send().split(b"\r\n")[0] == b"MAIL FROM:<a@x.org> SIZE=%d" % size
    assert converse(client, b"250 ok\r\n250 ok\r\n354 go\r\n", b"250 queued\r\n")[0] == wire


def test_mail_refused_gives_every_recipient_the_mail_reply():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org", "c@y.org"], b"hi")
    wire, event = converse(client, b"451 4.3.0 try later\r\n503 5.5.1 no MAIL\r\n503 no MAIL\r\n554 no valid recipients\r\n")
    assert b"hi" not in wire
    assert {(r.status, r.reply.code) for r in event.result.recipients} == {("temporary", 451)}
    assert event.result.data_reply is None and not client.needs_reset


def test_every_rcpt_refused_sends_no_body_and_next_message_resets_first():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"secret body")
    # Some servers answer 354 to a pipelined DATA even with no recipient
    # (RFC 2920 3.1): the client ends the data at once, sending nothing.
    wire, event = converse(client, b"250 ok\r\n550 no\r\n354 go\r\n", b"554 no valid recipients\r\n")
    assert wire.endswith(b"DATA\r\n.\r\n") and b"secret" not in wire
    assert event.result.recipients[0].status == "permanent"
    assert event.result.data_reply is None

    client = ready_client(EHLO_PLAIN)
    client.send_mail("a@x.org", ["b@y.org"], b"body")
    wire, event = converse(client, b"250 ok\r\n", b"550 no\r\n")
    assert b"DATA" not in wire and client.needs_reset
    client.send_mail("a@x.org", ["c@y.org"], b"body2")
    wire, event = converse(client, b"250 reset\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 ok\r\n")
    assert wire.startswith(b"RSET\r\nMAIL FROM:<a@x.org>")
    assert event.result.recipients[0].status == "accepted"


def test_rset_goes_in_the_same_burst_when_pipelining():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"body")
    converse(client, b"250 ok\r\n550 no\r\n554 no valid recipients\r\n")
    assert client.needs_reset
    client.send_mail("a@x.org", ["c@y.org"], b"body")
    assert client.data_to_send().startswith(b"RSET\r\nMAIL FROM:<a@x.org>")


def test_data_refused_after_rcpt_accepted():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"body")
    wire, event = converse(client, b"250 ok\r\n250 ok\r\n451 4.3.0 local error\r\n")
    assert event.result.recipients[0].status == "temporary"
    assert event.result.data_reply.code == 451


def test_end_of_data_refused():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org", "c@y.org"], b"body")
    wire, event = converse(client, b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"554 5.7.1 spam\r\n")
    assert {(r.status, str(r.reply)) for r in event.result.recipients} == {("permanent", "554 5.7.1 spam")}


def test_size_8bitmime_and_smtputf8_parameters():
    client = ready_client()
    client.send_mail("josé@x.org", ["b@y.org"], "Subject: café\r\n\r\nx\r\n".encode())
    assert client.data_to_send().split(b"\r\n")[0] == "MAIL FROM:<josé@x.org> SIZE=21 BODY=8BITMIME SMTPUTF8".encode()


def test_smtputf8_needed_but_not_offered_refused_before_sending():
    client = ready_client(EHLO_PLAIN)
    with pytest.raises(SmtpMessageError, match="SMTPUTF8"):
        client.send_mail("a@x.org", ["josé@y.org"], b"x")
    assert client.data_to_send() == b""
    assert client.state is State.READY  # the session is still usable


@pytest.mark.parametrize("address", ["b@y.org>\r\nRCPT TO:<evil@z", "b@y.org\nDATA", "a\x00b@y", "<b@y>"])
def test_address_injection_is_refused(address):
    client = ready_client()
    with pytest.raises(SmtpMessageError):
        client.send_mail("a@x.org", [address], b"x")
    assert client.data_to_send() == b""


def test_line_over_998_octets_refused_before_anything_is_sent():
    client = ready_client()
    data = b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n"
    with pytest.raises(SmtpMessageError, match="line 3 is longer than 998") as caught:
        client.send_mail("a@x.org", ["b@y.org"], data)
    assert caught.value.retryable is False
    assert client.data_to_send() == b"" and client.state is State.READY


@pytest.mark.parametrize(
    "data, line_no",
    [
        (b"y" * 999, 1),
        (b"y" * 999 + b"\r\nshort", 1),
        (b"short\r\n" + b"y" * 999, 2),  # unterminated last line
        (b"a\nb\rc\r\n" + b"y" * 1500 + b"\r\nd", 4),
        (b"." + b"y" * 998 + b"\n.", 1),  # 999 with its leading dot; stuffing is not counted
    ],
)
def test_long_lines_anywhere_are_found(data, line_no):
    with pytest.raises(SmtpMessageError, match=f"line {line_no} is longer"):
        prepare_body(data)


def test_lines_of_exactly_998_octets_pass_anywhere():
    line = b"y" * 998
    assert prepare_body(line + b"\r\n" + line + b"\n" + line) == (line + b"\r\n") * 3 + b".\r\n"
    assert prepare_body(b"." + line[1:]) == b".." + line[1:] + b"\r\n.\r\n"


@pytest.mark.parametrize(
    "data, wire",
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),  # smuggling attempt <LF>.<LF>
        (b"a\r\n.\rb", b"a\r\n..\r\nb\r\n.\r\n"),  # <CR><LF>.<CR>
        (b"a\rb\nc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
        (b"..x\r\n.y", b"...x\r\n..y\r\n.\r\n"),
        (b"x" * 998, b"x" * 998 + b"\r\n.\r\n"),  # exactly the limit
        (b"\xff\xfe 8-bit", b"\xff\xfe 8-bit\r\n.\r\n"),
    ],
)
def test_prepare_body(data, wire):
    assert prepare_body(data) == wire


# ---- STARTTLS -------------------------------------------------------------------------


def test_starttls_then_fresh_ehlo():
    client = ready_client()
    client.starttls()
    wire, event = converse(client, b"220 2.0.0 Ready to start TLS\r\n")
    assert wire == b"STARTTLS\r\n" and isinstance(event, TlsReady)
    assert client.extensions == {} and client.state is State.TLS_HANDSHAKE
    with pytest.raises(SmtpUsageError):
        client.send_mail("a@x", ["b@y"], b"x")  # nothing before the handshake and a new EHLO
    client.tls_started()
    assert client.tls_active and client.state is State.GREETED
    client.ehlo("client.example")
    wire, event = converse(client, b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert wire == b"EHLO client.example\r\n" and client.extensions == {"AUTH": "PLAIN"}


def test_starttls_not_offered_fails_before_sending_anything():
    client = ready_client(EHLO_PLAIN)
    with pytest.raises(SmtpStartTlsUnavailable) as caught:
        client.starttls()
    assert caught.value.retryable
    assert client.data_to_send() == b""
    with pytest.raises(SmtpStartTlsUnavailable):  # no mail on this session afterwards
        client.send_mail("a@x", ["b@y"], b"x")


def test_starttls_refused():
    client = ready_client()
    client.starttls()
    with pytest.raises(SmtpTlsError) as caught:
        converse(client, b"454 4.7.0 TLS not available\r\n")
    assert caught.value.reply.code == 454


def test_starttls_injection_in_the_same_read_is_refused():
    # aiosmtplib's STARTTLS buffer injection: a reply sent in plaintext right
    # after the 220 must never be taken as the first reply over TLS.
    client = ready_client()
    client.starttls()
    with pytest.raises(SmtpProtocolError, match="after its 220 to STARTTLS"):
        converse(client, b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")


def test_plaintext_arriving_before_the_handshake_is_refused():
    client = ready_client()
    client.starttls()
    converse(client, b"220 go ahead\r\n")
    client.receive_data(b"250 injected\r\n")
    with pytest.raises(SmtpProtocolError):
        client.tls_started()


# ---- AUTH --------------------------------------------------------------------------------


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_auth_plain():
    client = ready_client(tls_active=True)
    client.auth("user@x", "pässword")
    wire, event = converse(client, b"235 2.7.0 Authentication successful\r\n")
    assert wire == b"AUTH PLAIN " + b64("\0user@x\0pässword") + b"\r\n"
    assert isinstance(event, Authenticated)


def test_auth_login_answers_both_challenges():
    client = ready_client(b"250-mx\r\n250 AUTH LOGIN\r\n", tls_active=True)
    client.auth("user@x", "pw")
    wire, event = converse(client, b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 ok\r\n")
    assert wire == b"AUTH LOGIN\r\n" + b64("user@x") + b"\r\n" + b64("pw") + b"\r\n"
    assert isinstance(event, Authenticated)


def test_auth_xoauth2_failure_gets_the_final_reply():
    client = ready_client(tls_active=True)
    client.auth("user@x", xoauth2_token="tok")
    with pytest.raises(SmtpAuthError) as caught:
        converse(client, b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n", b"535 5.7.8 not accepted\r\n")
    assert caught.value.reply.code == 535 and not caught.value.retryable


def test_xoauth2_wire_form():
    client = ready_client(tls_active=True)
    client.auth("user@x", xoauth2_token="tok")
    wire, _ = converse(client, b"235 ok\r\n")
    assert wire == b"AUTH XOAUTH2 " + b64("user=user@x\x01auth=Bearer tok\x01\x01") + b"\r\n"


@pytest.mark.parametrize("code, retryable", [(b"454 4.7.0 temporary", True), (b"535 5.7.8 bad credentials", False)])
def test_auth_refused_says_if_retry_makes_sense_and_hides_the_password(code, retryable):
    client = ready_client(tls_active=True)
    client.auth("user@x", "hunter2")
    with pytest.raises(SmtpAuthError) as caught:
        converse(client, code + b"\r\n")
    assert caught.value.retryable is retryable
    text = str(caught.value)
    assert "hunter2" not in text and b64("\0user@x\0hunter2").decode() not in text


def test_auth_over_plaintext_is_refused_unless_allowed():
    client = ready_client()
    with pytest.raises(SmtpAuthError, match="plaintext"):
        client.auth("user@x", "pw")
    assert client.data_to_send() == b""

    client = ready_client()
    client.auth("user@x", "pw", allow_plaintext=True)
    assert client.data_to_send().startswith(b"AUTH PLAIN ")


def test_auth_without_a_usable_mechanism():
    client = ready_client(b"250-mx\r\n250 AUTH CRAM-MD5\r\n", tls_active=True)
    with pytest.raises(SmtpAuthError, match="neither PLAIN nor LOGIN"):
        client.auth("user@x", "pw")


# ---- misbehaving servers -------------------------------------------------------------------


def test_421_in_the_middle_of_a_transaction():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    with pytest.raises(SmtpServerRefused) as caught:
        converse(client, b"250 ok\r\n421 4.3.2 shutting down\r\n")
    assert caught.value.retryable and caught.value.reply.code == 421


def test_extra_reply_line_is_never_taken_for_the_next_reply():
    # aiosmtplib's desync: "250 ok" + an extra "250 extra" to MAIL would be
    # read as the reply to RCPT, and every later reply one step behind.
    client = ready_client(EHLO_PLAIN)
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    with pytest.raises(SmtpProtocolError, match="before the command"):
        converse(client, b"250 ok\r\n250 extra\r\n")


def test_extra_line_after_the_last_reply_keeps_the_result_but_ends_the_session():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    wire, event = converse(client, b"250 ok\r\n250 ok\r\n354 go\r\n", b"250 queued\r\n250 extra\r\n")
    assert event.result.recipients[0].status == "accepted"  # the message was taken
    assert client.state is State.ERROR
    with pytest.raises(SmtpProtocolError):
        client.send_mail("a@x.org", ["b@y.org"], b"x")


def test_unsolicited_data_while_idle():
    client = ready_client()
    client.receive_data(b"250 surprise\r\n")
    with pytest.raises(SmtpProtocolError, match="no reply was expected"):
        client.next_event()


def test_idle_421_is_a_server_refusal():
    client = ready_client()
    client.receive_data(b"421 4.4.2 idle timeout\r\n")
    with pytest.raises(SmtpServerRefused):
        client.next_event()


def test_connection_lost_after_the_final_dot_may_have_delivered():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    converse_until_body = client.data_to_send()
    assert converse_until_body.endswith(b"DATA\r\n")
    client.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert client.next_event() is NEED_DATA
    assert client.data_to_send() == b"x\r\n.\r\n"
    client.receive_data(b"")
    with pytest.raises(SmtpConnectionLost) as caught:
        client.next_event()
    assert caught.value.after_data_end and caught.value.retryable


def test_connection_lost_before_the_body_did_not_deliver():
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    client.data_to_send()
    client.receive_data(b"250 ok\r\n")
    client.receive_data(b"")
    with pytest.raises(SmtpConnectionLost) as caught:
        client.next_event()
    assert not caught.value.after_data_end


@pytest.mark.parametrize(
    "bad",
    [
        b"250 ok\r\n250 ok\r\n250 ok without 354\r\n",  # DATA "accepted" with no body sent
        b"250 ok\r\nnonsense\r\n",
        b"250 ok\r\n354-go\r\n250 on\r\n",  # code changes inside a reply
        b"250 ok\r\n150 hm\r\n",
    ],
)
def test_broken_replies_mid_transaction_are_protocol_errors(bad):
    client = ready_client()
    client.send_mail("a@x.org", ["b@y.org"], b"x")
    with pytest.raises(SmtpProtocolError):
        converse(client, bad)


def test_rset_then_421_to_noop():
    client = ready_client()
    client.rset()
    assert converse(client, b"250 ok\r\n") == (b"RSET\r\n", CommandDone("RSET", Reply(250, ("ok",))))
    client.noop()
    with pytest.raises(SmtpServerRefused):  # 421 to any command ends the session
        converse(client, b"421 going away\r\n")


def test_noop_and_quit():
    client = ready_client()
    client.noop()
    assert converse(client, b"250 ok\r\n")[1].reply.code == 250
    client.quit()
    wire, event = converse(client, b"221 bye\r\n")
    assert wire == b"QUIT\r\n" and event.verb == "QUIT" and client.state is State.CLOSED


def test_quit_answered_by_a_plain_close():
    client = ready_client()
    client.quit()
    client.data_to_send()
    client.receive_data(b"")
    assert client.next_event() == CommandDone("QUIT", None)


def test_timeouts_follow_rfc_5321_section_4_5_3_2():
    from smtpgate.smtp import Timeouts

    timeouts = Timeouts()
    assert [timeouts.for_reply(verb) for verb in ("GREETING", "MAIL", "RCPT", "DATA", "DATA_END")] == [
        300, 300, 300, 120, 600,
    ]
    assert timeouts.data_block == 180
    assert Timeouts(command=7).for_reply("EHLO") == 7


def test_auth_configured_but_not_offered():
    client = ready_client(EHLO_PLAIN, tls_active=True)
    with pytest.raises(SmtpAuthError, match="does not offer AUTH"):
        client.auth("user@x", "pw")


def _reference_body(data: bytes) -> bytes | None:
    """prepare_body written the slow, obvious way (None: a line is too long)."""
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()
    if any(len(line) > 998 for line in lines):
        return None
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


_PIECES = st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x", b"\xff", b"y" * 400, b"z" * 998])


@settings(max_examples=1500, deadline=None)
@given(data=st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=40).map(b"".join))
def test_prepare_body_matches_the_obvious_implementation(data):
    expected = _reference_body(data)
    if expected is None:
        with pytest.raises(SmtpMessageError):
            prepare_body(data)
    else:
        assert prepare_body(data) == expected
