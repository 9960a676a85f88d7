"""Messages pipelined across on one connection (RFC 2920 3.1), against a
server on a real socket whose every read the test sees: a second send()
while one is in flight goes behind that one's final dot."""

from __future__ import annotations

import asyncio

import pytest
from smtp_helpers import run

from smtpgate.smtp import SmtpConnection, SmtpConnectionLost, SmtpMessageError, Timeouts, UpstreamSettings

SHORT = Timeouts(connect=2, greeting=2, command=2, mail=2, rcpt=2, data_init=2, data_block=2, data_end=2)
BODY = b"Subject: s\r\n\r\nbody\r\n"
MAIL = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<%s@example.org>\r\nDATA\r\n"


class RawServer:
    """One connection, scripted by the test: `reads` gets each read the
    server makes, `reply(bytes)` answers, `drop()` aborts the line."""

    def __init__(self, ehlo: bytes = b"250-raw\r\n250 PIPELINING\r\n"):
        self.ehlo = ehlo
        self.reads: asyncio.Queue[bytes] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        self.writer = writer
        writer.write(b"220 raw\r\n")
        await reader.readline()  # EHLO
        writer.write(self.ehlo)
        self.connected.set()
        while data := await reader.read(65536):
            self.reads.put_nowait(data)

    async def read(self) -> bytes:
        return await asyncio.wait_for(self.reads.get(), 5)

    def reply(self, data: bytes) -> None:
        self.writer.write(data)

    def drop(self) -> None:
        self.writer.transport.abort()


async def open_to(server: RawServer) -> SmtpConnection:
    settings = UpstreamSettings(host="127.0.0.1", port=server.port, tls="none", helo_name="client.example",
                                timeouts=SHORT)
    return await SmtpConnection.open(settings)


async def behind(conn: SmtpConnection, rcpt: str, dots: list[str], body: bytes = BODY) -> asyncio.Task:
    """A second send() on `conn`, once it waits behind the one in flight."""
    assert conn.takes_next
    task = asyncio.ensure_future(conn.send("a@example.org", [f"{rcpt}@example.org"], body,
                                           before_data_end=lambda: dots.append(rcpt)))
    for _ in range(100):  # bounded: it registers on its first step
        if not conn.takes_next:
            break
        await asyncio.sleep(0)
    assert not conn.takes_next  # one message behind another, no more
    return task


def first(conn: SmtpConnection, dots: list[str]) -> asyncio.Task:
    return asyncio.ensure_future(conn.send("a@example.org", ["b@example.org"], BODY,
                                           before_data_end=lambda: dots.append("b")))


async def two_in_flight(server: RawServer, dots: list[str]) -> tuple[SmtpConnection, asyncio.Task, asyncio.Task]:
    """A send() whose MAIL..DATA the server has read, and one behind it."""
    conn = await open_to(server)
    one = first(conn, dots)
    assert await server.read() == MAIL % b"b"
    return conn, one, await behind(conn, "c", dots)


def test_the_next_message_leaves_in_the_write_of_the_final_dot():
    async def scenario():
        dots: list[str] = []
        async with RawServer() as server:
            conn, one, two = await two_in_flight(server, dots)
            server.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            # One write: the body, its dot, and the next MAIL, RCPT, DATA.
            assert await server.read() == BODY + b".\r\n" + MAIL % b"c"
            assert dots == ["b"]
            server.reply(b"250 2.0.0 queued as 1\r\n250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            assert dots == ["b", "c"]
            assert one.done() and not conn.usable  # the second is still in flight
            server.reply(b"250 2.0.0 queued as 2\r\n")
            results = await asyncio.gather(one, two)
            assert conn.usable  # both over: ready for the next message
            conn.close()
            return results

    one, two = run(scenario())
    assert one.data_reply.text.endswith("queued as 1") and one.accepted == ["b@example.org"]
    assert two.data_reply.text.endswith("queued as 2") and two.accepted == ["c@example.org"]


def test_a_message_behind_a_dot_already_out_goes_at_once():
    # The second send() comes after the first's body left: its commands go
    # in a write of their own, before the first's reply, not after it.
    async def scenario():
        dots: list[str] = []
        async with RawServer() as server:
            conn = await open_to(server)
            one = first(conn, dots)
            await server.read()
            server.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            two = await behind(conn, "c", dots)
            assert await server.read() == MAIL % b"c"  # the first is not answered yet
            server.reply(b"250 2.0.0 queued as 1\r\n250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            server.reply(b"250 2.0.0 queued as 2\r\n")
            results = await asyncio.gather(one, two)
            conn.close()
            return results, dots

    (one, two), dots = run(scenario())
    assert dots == ["b", "c"]
    assert [one.data_reply.code, two.data_reply.code] == [250, 250]


def test_line_dropped_after_the_first_dot_fails_the_second_as_never_sent():
    # The first message may have been delivered (its dot went out); the
    # second got no further than DATA: not a possible duplicate.
    async def scenario():
        dots: list[str] = []
        async with RawServer() as server:
            conn, one, two = await two_in_flight(server, dots)
            server.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n" + MAIL % b"c"
            server.drop()
            errors = await asyncio.gather(one, two, return_exceptions=True)
            return errors, dots, conn.usable

    (error_one, error_two), dots, usable = run(scenario())
    assert isinstance(error_one, SmtpConnectionLost) and error_one.after_data_end
    assert isinstance(error_two, SmtpConnectionLost) and not error_two.after_data_end
    assert dots == ["b"] and not usable


def test_a_refused_final_dot_does_not_hold_up_the_message_behind_it():
    # The final dot ends the transaction whatever its reply (RFC 5321
    # 4.1.1.4): the next MAIL needs no RSET.
    async def scenario():
        dots: list[str] = []
        async with RawServer() as server:
            conn, one, two = await two_in_flight(server, dots)
            server.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            await server.read()
            server.reply(b"554 5.7.1 rejected\r\n250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            server.reply(b"250 2.0.0 queued\r\n")
            results = await asyncio.gather(one, two)
            conn.close()
            return results

    one, two = run(scenario())
    assert [r.status for r in one.recipients] == ["permanent"] and one.data_reply.code == 554
    assert [r.status for r in two.recipients] == ["accepted"]


def test_a_refused_data_lets_the_message_behind_go_after_a_rset():
    # No final dot to go behind: the second send() starts its own
    # transaction once the first is over, with the RSET its MAIL needs.
    async def scenario():
        dots: list[str] = []
        async with RawServer() as server:
            conn, one, two = await two_in_flight(server, dots)
            server.reply(b"250 ok\r\n250 ok\r\n554 5.3.4 no data today\r\n")
            assert await server.read() == b"RSET\r\n" + MAIL % b"c"
            server.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            server.reply(b"250 2.0.0 queued\r\n")
            results = await asyncio.gather(one, two)
            conn.close()
            return results, dots

    (one, two), dots = run(scenario())
    assert one.data_reply.code == 554 and two.data_reply.code == 250
    assert dots == ["c"]


@pytest.mark.parametrize("ehlo", [b"250 raw\r\n", b"250-raw\r\n250-PIPELINING\r\n250 CHUNKING\r\n"])
def test_no_message_goes_behind_without_pipelining_or_behind_bdat(ehlo):
    # Without PIPELINING each command waits for its reply anyway; behind
    # BDAT a refused chunk would leave the transaction open (RFC 3030 2).
    async def scenario():
        async with RawServer(ehlo) as server:
            conn = await open_to(server)
            one = first(conn, [])
            await server.read()
            takes_next = conn.takes_next
            conn.close()
            await asyncio.gather(one, return_exceptions=True)
            return takes_next

    assert run(scenario()) is False


def test_a_message_refused_behind_another_leaves_that_one_alone():
    # The second message cannot be sent as given (a line over 998 octets):
    # its send() fails with nothing sent, the first goes on, the connection
    # stays usable.
    async def scenario():
        async with RawServer() as server:
            conn = await open_to(server)
            one = first(conn, [])
            await server.read()
            two = await behind(conn, "c", [], b"x" * 1200 + b"\r\n")
            server.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
            assert await server.read() == BODY + b".\r\n"
            server.reply(b"250 2.0.0 queued\r\n")
            result = await one
            refused = await asyncio.gather(two, return_exceptions=True)
            usable = conn.usable
            conn.close()
            return result, refused[0], usable

    result, refused, usable = run(scenario())
    assert result.data_reply.code == 250
    assert isinstance(refused, SmtpMessageError) and usable


def test_the_pool_puts_a_message_behind_a_final_dot_still_to_go():
    """Every connection busy: the next message goes behind one whose
    message has not sent its final dot yet, where there is one (its MAIL,
    RCPT and DATA then leave in that dot's write, not in one of their own),
    not behind the first connection found."""
    from smtp_helpers import HANG, ScriptedServer, esmtp_responder

    from smtpgate.delivery.pool import UpstreamPool
    from smtpgate.delivery.settings import DeliverySettings

    datas = []

    async def scenario():
        dot_read, second_data_read = asyncio.Event(), asyncio.Event()

        def on_data(line: bytes):
            datas.append(line)
            if len(datas) == 1:
                return b"354 go ahead\r\n"
            second_data_read.set()
            return HANG  # the second message waits for its 354

        def on_dot(line: bytes):
            dot_read.set()
            return HANG

        responder = esmtp_responder(ehlo=b"250-scripted\r\n250 PIPELINING\r\n", DATA=on_data, **{".": on_dot})
        async with ScriptedServer(responder) as server:
            upstream = UpstreamSettings(host="127.0.0.1", port=server.port, tls="none", helo_name="client.example",
                                        timeouts=SHORT)
            pool = UpstreamPool(upstream, DeliverySettings(upstreams=[upstream], connections_per_upstream=2))
            dot_out, _ = await pool.acquire()
            sending = [asyncio.ensure_future(dot_out.send("a@example.org", ["b@example.org"], BODY))]
            await dot_read.wait()  # bounded by run()
            dot_to_go, _ = await pool.acquire()
            sending.append(asyncio.ensure_future(dot_to_go.send("a@example.org", ["c@example.org"], BODY)))
            await second_data_read.wait()
            behind, reused = await pool.acquire()
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            return dot_out, dot_to_go, behind, reused

    dot_out, dot_to_go, behind, reused = run(scenario())
    assert dot_out is not dot_to_go and dot_out.usable is False  # (closed by the cancelled send)
    assert behind is dot_to_go and reused
