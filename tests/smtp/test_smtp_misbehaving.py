"""SmtpConnection against servers that misbehave, on real sockets speaking scripted bytes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from smtp_helpers import HANG, PASSWORD, USER, ScriptedServer, esmtp_responder, run

from smtpgate.smtp import (
    SmtpConnectError,
    SmtpConnection,
    SmtpConnectionLost,
    SmtpProtocolError,
    SmtpServerRefused,
    SmtpSessionError,
    SmtpStartTlsUnavailable,
    SmtpTimeout,
    SmtpTlsError,
    Timeouts,
    UpstreamSettings,
)

# Short waits so a silent server fails the test quickly; not a timing assertion.
SHORT = Timeouts(connect=2, greeting=0.5, command=0.5, mail=0.5, rcpt=0.5, data_init=0.5,
                 data_block=0.5, data_end=0.5)


def settings(port: int, **overrides) -> UpstreamSettings:
    values = dict(host="127.0.0.1", port=port, tls="none", helo_name="client.example", timeouts=SHORT)
    values.update(overrides)
    return UpstreamSettings(**values)


def commands(received: bytes) -> list[bytes]:
    """The command verbs the server saw, in order (not the body lines)."""
    verbs = []
    for line in received.split(b"\r\n"):
        verb = line.split(b" ")[0].split(b":")[0]
        if verb in (b"EHLO", b"HELO", b"STARTTLS", b"AUTH", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT"):
            verbs.append(verb.decode())
    return verbs


async def send_one(port: int, **overrides):
    conn = await SmtpConnection.open(settings(port, **overrides))
    try:
        return await conn.send("a@example.org", ["b@example.org", "c@example.org"], b"Subject: x\r\n\r\nbody\r\n")
    finally:
        conn.close()


def test_421_in_the_middle_of_a_session():
    async def scenario():
        responder = esmtp_responder(RCPT=lambda line: b"421 4.3.2 shutting down\r\n" if b"c@" in line else b"250 ok\r\n")
        async with ScriptedServer(responder) as server:
            with pytest.raises(SmtpServerRefused) as caught:
                await send_one(server.port)
            return caught.value, bytes(server.received)

    error, received = run(scenario())
    assert error.retryable and error.reply.code == 421 and not error.after_data_end
    assert b"body" not in received  # the body never went out


def test_connection_dropped_after_the_final_dot_may_have_delivered():
    async def scenario():
        async with ScriptedServer(esmtp_responder(**{".": None})) as server:
            with pytest.raises(SmtpConnectionLost) as caught:
                await send_one(server.port)
            return caught.value, bytes(server.received)

    error, received = run(scenario())
    assert error.after_data_end and error.retryable
    assert received.endswith(b"body\r\n.\r\n")


def test_connection_dropped_at_data_did_not_deliver():
    async def scenario():
        async with ScriptedServer(esmtp_responder(DATA=None)) as server:
            with pytest.raises(SmtpConnectionLost) as caught:
                await send_one(server.port)
            return caught.value

    assert not run(scenario()).after_data_end


@pytest.mark.parametrize("silent_at, after_data_end", [("EHLO", False), ("MAIL", False), (".", True)])
def test_server_that_never_answers_times_out(silent_at, after_data_end):
    async def scenario():
        async with ScriptedServer(esmtp_responder(**{silent_at: HANG})) as server:
            with pytest.raises(SmtpTimeout) as caught:
                await send_one(server.port)
            return caught.value

    error = run(scenario())
    assert error.retryable and error.after_data_end is after_data_end
    assert isinstance(error, TimeoutError)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_short_wait_after_a_long_one_times_out_at_its_own_deadline(loop_name):
    """A connection sets one timer, not one per wait (smtp/client.py): set
    during the 30 s greeting, it must still end the 0.3 s wait for the
    EHLO reply, long before the greeting's deadline and the scenario's
    20 s bound."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
    long_then_short = Timeouts(connect=2, greeting=30, command=0.3, mail=30, rcpt=30, data_init=30,
                               data_block=30, data_end=30)

    async def scenario():
        async with ScriptedServer(esmtp_responder(EHLO=HANG)) as server:
            with pytest.raises(SmtpTimeout, match="EHLO within 0.3 s"):
                await SmtpConnection.open(settings(server.port, timeouts=long_then_short))

    if loop_name == "asyncio":
        run(scenario())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(scenario(), 20))


def test_silent_greeting_times_out():
    async def scenario():
        async with ScriptedServer(esmtp_responder(), greeting=b"") as server:
            with pytest.raises(SmtpTimeout, match="GREETING"):
                await SmtpConnection.open(settings(server.port))

    run(scenario())


def test_starttls_required_but_not_offered_sends_no_credentials_and_no_mail():
    async def scenario():
        async with ScriptedServer(esmtp_responder()) as server:
            with pytest.raises(SmtpStartTlsUnavailable):
                await send_one(server.port, tls="starttls", username=USER, password=PASSWORD)
            return bytes(server.received)

    received = run(scenario())
    assert commands(received) == ["EHLO"]
    assert PASSWORD.encode() not in received


def test_starttls_buffer_injection_is_refused():
    # The server (or a man in the middle) appends a forged EHLO reply to the
    # 220, in plaintext: it must never be read as if it came over TLS.
    responder = esmtp_responder(
        ehlo=b"250-scripted\r\n250 STARTTLS\r\n",
        STARTTLS=b"220 2.0.0 go ahead\r\n250-forged\r\n250 AUTH PLAIN\r\n",
    )

    async def scenario():
        async with ScriptedServer(responder) as server:
            with pytest.raises(SmtpSessionError) as caught:
                await send_one(server.port, tls="starttls", verify=False, username=USER, password=PASSWORD)
            return caught.value, bytes(server.received)

    error, received = run(scenario())
    assert isinstance(error, SmtpProtocolError)
    assert commands(received) == ["EHLO", "STARTTLS"]


def test_extra_reply_lines_do_not_desync():
    # aiosmtplib's desync: an extra line after the MAIL reply would answer RCPT.
    responder = esmtp_responder(ehlo=b"250 scripted\r\n", MAIL=b"250 2.1.0 Ok\r\n550 5.1.1 extra\r\n")

    async def scenario():
        async with ScriptedServer(responder) as server:
            with pytest.raises(SmtpProtocolError):
                await send_one(server.port)
            return bytes(server.received)

    assert commands(run(scenario())) == ["EHLO", "MAIL"]  # nothing sent after the extra line


def test_extra_line_after_the_end_of_data_reply_retires_the_connection():
    responder = esmtp_responder(**{".": b"250 2.0.0 queued\r\n250 2.0.0 extra\r\n"})

    async def scenario():
        async with ScriptedServer(responder) as server:
            conn = await SmtpConnection.open(settings(server.port))
            result = await conn.send("a@example.org", ["b@example.org"], b"x")
            usable_after = conn.usable
            with pytest.raises(SmtpSessionError):
                await conn.send("a@example.org", ["b@example.org"], b"y")
            return result, usable_after, bytes(server.received)

    result, usable_after, received = run(scenario())
    assert result.recipients[0].status == "accepted"  # the message was taken
    assert usable_after is False
    assert commands(received).count("MAIL") == 1  # no second message on a desynced session


@pytest.mark.parametrize("ehlo", [b"250-ok\r\nnot smtp\r\n", b"hello world\r\n", b"250-a\r\n550 b\r\n"])
def test_grammar_breaking_replies_are_protocol_errors(ehlo):
    async def scenario():
        async with ScriptedServer(esmtp_responder(ehlo=ehlo)) as server:
            with pytest.raises(SmtpProtocolError):
                await SmtpConnection.open(settings(server.port))

    run(scenario())


def test_refused_greeting():
    async def scenario():
        async with ScriptedServer(esmtp_responder(), greeting=b"554 5.7.1 go away\r\n") as server:
            with pytest.raises(SmtpServerRefused) as caught:
                await SmtpConnection.open(settings(server.port))
            return caught.value

    error = run(scenario())
    assert error.reply.code == 554 and not error.retryable


def test_connect_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(SmtpConnectError) as caught:
            run(SmtpConnection.open(settings(port)))
    assert caught.value.retryable and isinstance(caught.value, ConnectionError)


def test_noop_reports_a_dead_pooled_connection():
    async def scenario():
        async with ScriptedServer(esmtp_responder(NOOP=None)) as server:
            conn = await SmtpConnection.open(settings(server.port))
            alive = await conn.noop()
            return alive, conn.usable

    assert run(scenario()) == (False, False)


def test_server_closing_an_idle_connection_makes_it_unusable():
    async def scenario():
        async with ScriptedServer(esmtp_responder(NOOP=b"421 4.4.2 idle too long\r\n")) as server:
            conn = await SmtpConnection.open(settings(server.port))
            assert not await conn.noop()
            with pytest.raises(SmtpConnectionLost):
                await conn.send("a@example.org", ["b@example.org"], b"x")

    run(scenario())


def test_a_trickling_server_cannot_stretch_the_reply_timeout():
    # One byte every 0.2 s: each read comes well within the 0.5 s greeting
    # timeout, but the whole reply does not, and the deadline is per reply.
    async def trickle(reader, writer):
        for byte in b"220 slow server\r\n":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.2)
        await reader.read()

    async def scenario():
        server = await asyncio.start_server(trickle, "127.0.0.1", 0)
        try:
            with pytest.raises(SmtpTimeout, match="GREETING"):
                await SmtpConnection.open(settings(server.sockets[0].getsockname()[1]))
        finally:
            server.close()

    run(scenario())


async def send_to(serve, recipients: list[str], data: bytes, **kwargs):
    """One message from a@example.org through SmtpConnection to the server `serve` runs."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        conn = await SmtpConnection.open(settings(server.sockets[0].getsockname()[1]))
        result = await conn.send("a@example.org", recipients, data, **kwargs)
        conn.close()
        return result
    finally:
        server.close()


def test_pipelined_commands_leave_in_one_write():
    # With PIPELINING, MAIL, every RCPT and DATA are one write (one segment
    # on loopback): the server's first read after EHLO holds all of them.
    first_reads: list[bytes] = []

    async def serve(reader, writer):
        writer.write(b"220 raw\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-raw\r\n250 PIPELINING\r\n")
        first_reads.append(await reader.read(65536))
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")
        await reader.read()

    result = run(send_to(serve, ["b@example.org", "c@example.org"], b"x"))
    assert [r.status for r in result.recipients] == ["accepted", "accepted"]
    assert first_reads == [b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"]


def test_with_chunking_a_message_is_one_write_and_one_round_trip():
    # A server offering CHUNKING (RFC 3030; aiosmtpd and smtp-sink do not,
    # Postfix's smtpd does): its first read after EHLO holds MAIL, RCPT and
    # BDAT LAST with the body, and one reply burst ends the transaction;
    # before_data_end runs before that one write.
    first_reads: list[bytes] = []
    order: list[str] = []

    async def serve(reader, writer):
        writer.write(b"220 raw\r\n")
        await reader.readline()  # EHLO
        writer.write(b"250-raw\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        first_reads.append(await reader.read(65536))
        order.append("read")
        writer.write(b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
        await reader.read()

    result = run(send_to(serve, ["b@example.org"], b"Subject: s\r\n\r\n.x\r\n",
                         before_data_end=lambda: order.append("before_data_end")))
    assert [r.status for r in result.recipients] == ["accepted"] and result.data_reply.code == 250
    assert first_reads == [b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
                           b"BDAT 18 LAST\r\nSubject: s\r\n\r\n.x\r\n"]
    assert order == ["before_data_end", "read"]


@pytest.mark.parametrize("tls", ["tls", "starttls"])
def test_tls_handshake_that_never_completes(tls):
    # The server takes the connection (and, for STARTTLS, says 220) but never
    # answers the ClientHello: a TLS failure, bounded by tls_handshake.
    responder = esmtp_responder(ehlo=b"250-scripted\r\n250 STARTTLS\r\n", STARTTLS=b"220 go ahead\r\n")

    async def scenario():
        greeting = b"" if tls == "tls" else b"220 scripted ESMTP\r\n"
        async with ScriptedServer(responder, greeting=greeting) as server:
            quick = Timeouts(connect=2, tls_handshake=0.3, greeting=2, command=2)
            with pytest.raises(SmtpTlsError) as caught:
                await SmtpConnection.open(settings(server.port, tls=tls, verify=False, timeouts=quick))
            return caught.value

    assert run(scenario()).retryable
