"""The asyncio driver: pumps bytes between a transport and the sans-IO SmtpClient.

An asyncio protocol (not StreamReader) feeds every received byte to the
core at once, even between commands, so an unsolicited reply is noticed when
it arrives and the connection is marked unusable before the next message.
Each burst the core queues goes out in one transport.write() on a socket
with TCP_NODELAY: the last line of a burst never waits for a delayed ACK.

Messages pipelined across (RFC 2920 3.1): a send() while another is in
flight on the connection (the pool hands out a connection that `takes_next`
when all are busy) queues its MAIL, RCPTs and DATA behind the other's
final dot, in the same write where it can, and pumps once that one's send()
is over. Against a server that answers MAIL..DATA and then the body, that
is one write and one wake-up per message instead of two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl
import time
from typing import Callable

from .core import (
    NEED_DATA,
    CommandDone,
    Delivered,
    DeliveryResult,
    SmtpClient,
    State,
)
from .errors import (
    SmtpConnectError,
    SmtpConnectionLost,
    SmtpMessageError,
    SmtpSessionError,
    SmtpTimeout,
    SmtpTlsError,
)
from .settings import UpstreamSettings

__all__ = ["SmtpConnection"]


# Replies are short: a read buffer of this size holds every burst of them.
READ_BUFFER = 16 * 1024


class _Protocol(asyncio.BufferedProtocol):
    """Hands transport callbacks to the SmtpConnection that owns it.

    Buffered: the transport reads into our one buffer. A plain Protocol's
    transport (asyncio's selector loop) makes a new 256 KiB bytes object for
    every read, an mmap, mremap and munmap per reply burst (strace of the
    delivery process: about 1.6 of each per message relayed)."""

    def __init__(self, owner: SmtpConnection) -> None:
        self._owner = owner
        self._buffer = memoryview(bytearray(READ_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._owner._on_data(bytes(self._buffer[:nbytes]))

    def eof_received(self) -> bool:
        self._owner._on_data(b"")
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_data(b"")

    def pause_writing(self) -> None:
        self._owner._write_paused = True

    def resume_writing(self) -> None:
        self._owner._write_paused = False
        self._owner._wake()


@dataclasses.dataclass
class _Behind:
    """A send() waiting behind the one in flight."""

    mail_from: str
    recipients: list[str]
    data: bytes
    before_data_end: Callable[[], None] | None
    turn: asyncio.Future  # done when the send() in flight is over (or ours was refused)
    queued: bool = False  # its transaction is in the core, behind the other's final dot


class SmtpConnection:
    """One SMTP session to an upstream; use ``await SmtpConnection.open(settings)``.

    Not for concurrent use: one send/reset/noop/quit at a time.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._core = SmtpClient(tls_active=settings.tls == "tls")
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the connection was opened on
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0  # of the wait in _waiter (loop time)
        self._timer: asyncio.TimerHandle | None = None  # fires at or before _deadline (_wait)
        self._write_paused = False
        self._busy = False
        self._eof = False
        self._before_data_end: Callable[[], None] | None = None  # of the next final dot queued
        self._behind: _Behind | None = None
        self.last_used = time.monotonic()

    # -- public API --------------------------------------------------------------

    @classmethod
    async def open(cls, settings: UpstreamSettings) -> SmtpConnection:
        """Connect, read the greeting, EHLO (or HELO), STARTTLS + EHLO, AUTH.

        Raises a SmtpSessionError subclass; the connection is closed then.
        """
        conn = cls(settings)
        await conn._connect()
        try:
            await conn._handshake()
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def usable(self) -> bool:
        """True while the session can take the next command."""
        return self._transport is not None and self._core.state is State.READY

    @property
    def takes_next(self) -> bool:
        """Whether a send() now would be pipelined behind the one in flight."""
        return self._behind is None and self._transport is not None and self._core.pipelines_next_mail

    @property
    def dot_queued(self) -> bool:
        """Whether the final dot of the message in flight went out already
        (then a send() behind it writes its commands alone, not with the dot)."""
        return self._core.takes_next_mail

    @property
    def extensions(self) -> dict[str, str]:
        """EHLO keywords (upper case) to their parameters, as last announced."""
        return self._core.extensions

    @property
    def awaiting(self) -> str | None:
        """The command whose reply the session waits for ("DATA_END": the
        reply to the final dot), or None."""
        return self._core.awaiting

    async def send(self, mail_from: str, recipients: list[str], data: bytes, *,
                   before_data_end: Callable[[], None] | None = None) -> DeliveryResult:
        """Run one mail transaction; per-recipient results in the DeliveryResult.

        `before_data_end` is called just before the write that carries the
        final dot, or the last BDAT chunk (not at all if the message never
        gets that far): from then on the server may have the message.

        While another send() is in flight (`takes_next`), this one is
        pipelined behind it and returns after it.

        Raises SmtpMessageError (connection still usable) if the message cannot
        be sent as given, other SmtpSessionError subclasses (connection closed)
        for session failures.
        """
        queued = False
        if self._core.mail_in_flight:
            queued = await self._send_behind(_Behind(mail_from, recipients, data, before_data_end,
                                                     self._loop.create_future()))
        if not queued:
            self._check_usable()
            self._core.send_mail(mail_from, recipients, data)
            self._before_data_end = before_data_end
        try:
            event = await self._run()
        except BaseException:
            self._before_data_end = None
            raise
        assert isinstance(event, Delivered)
        return event.result

    async def _send_behind(self, behind: _Behind) -> bool:
        """Wait for the send() in flight to be over, our transaction queued
        behind its final dot (by its pump, or here if the dot is out
        already); True if it was. If that send() failed, the connection is
        closed and nothing of ours reached the server's DATA: an error
        without after_data_end."""
        if not self.takes_next:
            raise RuntimeError("SmtpConnection takes no message behind the one in flight")
        self._behind = behind
        try:
            if self._core.takes_next_mail:
                self._queue_behind()
                out = self._core.data_to_send()
                if out:
                    self._transport.write(out)
            await behind.turn
        except BaseException:
            if behind.queued:
                self.close()  # a transaction nobody will read the replies of
            raise
        finally:
            if self._behind is behind:
                self._behind = None
        if self._transport is None:
            raise SmtpConnectionLost(f"connection to {self._where} was lost before this message went out")
        return behind.queued

    def _queue_behind(self) -> None:
        """Queue the waiting send()'s transaction behind the final dot just queued."""
        behind = self._behind
        try:
            self._core.send_mail(behind.mail_from, behind.recipients, behind.data)
        except SmtpMessageError as exc:
            behind.turn.set_exception(exc)  # nothing of it was queued
            return
        behind.queued = True
        self._before_data_end = behind.before_data_end

    async def reset(self) -> None:
        """Make the session ready for a new message: RSET, only if a transaction may be open."""
        self._check_usable()
        if self._core.needs_reset:
            self._core.rset()
            await self._run()

    async def noop(self) -> bool:
        """Check a pooled connection: False (and closed) if it no longer answers 250."""
        if not self.usable:
            return False
        try:
            self._core.noop()
            event = await self._run()
        except SmtpSessionError:
            return False
        assert isinstance(event, CommandDone) and event.reply is not None
        if event.reply.code != 250:
            self.close()
            return False
        return True

    async def quit(self) -> None:
        """Polite close: QUIT, wait for its reply (errors ignored), close."""
        try:
            if self.usable or self._core.state is State.GREETED:
                self._core.quit()
                await self._run()
        except SmtpSessionError:
            pass
        finally:
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            self._stop_timer()

    def close(self) -> None:
        """Abrupt close: drop the connection without QUIT."""
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        self._stop_timer()

    async def __aenter__(self) -> SmtpConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.quit()

    # -- session setup -------------------------------------------------------------

    async def _connect(self) -> None:
        settings = self.settings
        loop = self._loop = asyncio.get_running_loop()
        implicit_tls = settings.tls == "tls"
        context = settings.make_ssl_context() if implicit_tls else None
        try:
            async with asyncio.timeout(settings.timeouts.connect):
                transport, _ = await loop.create_connection(
                    lambda: _Protocol(self),
                    settings.host,
                    settings.port,
                    ssl=context,
                    server_hostname=settings.host if implicit_tls else None,
                    ssl_handshake_timeout=settings.timeouts.tls_handshake if implicit_tls else None,
                )
        except (ssl.SSLError, ConnectionAbortedError) as exc:
            # ConnectionAbortedError: asyncio's ssl_handshake_timeout expired.
            raise SmtpTlsError(f"TLS handshake with {self._where} failed: {exc}") from exc
        except TimeoutError as exc:
            raise SmtpConnectError(f"connecting to {self._where} timed out") from exc
        except OSError as exc:
            # asyncio's own text repeats the address ("Connect call failed
            # ('127.0.0.1', 25)"): the errno says it plainly.
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise SmtpConnectError(f"cannot connect to {self._where}: {why}") from exc
        self._transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)

    async def _handshake(self) -> None:
        settings = self.settings
        core = self._core
        await self._run()  # greeting
        core.ehlo(settings.helo_name)
        await self._run()
        if settings.tls == "starttls":
            core.starttls()  # raises SmtpStartTlsUnavailable if not offered
            await self._run()
            await self._start_tls()
            core.tls_started()
            core.ehlo(settings.helo_name)
            await self._run()
        if settings.username is not None or settings.xoauth2_token is not None:
            core.auth(
                settings.username or "",
                settings.password,
                xoauth2_token=settings.xoauth2_token,
                allow_plaintext=settings.allow_plaintext_auth,
            )
            await self._run()

    async def _start_tls(self) -> None:
        loop = self._loop
        transport = self._transport
        if transport is None:
            # Plaintext arrived after the 220 and the core refused it.
            self._core.next_event()
            raise SmtpConnectionLost(f"connection to {self._where} is closed")
        try:
            new_transport = await loop.start_tls(
                transport,
                transport.get_protocol(),
                self.settings.make_ssl_context(),
                server_hostname=self.settings.host,
                ssl_handshake_timeout=self.settings.timeouts.tls_handshake,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            raise SmtpTlsError(f"TLS handshake with {self._where} failed: {exc}") from exc
        if new_transport is None:
            raise SmtpConnectionLost(f"{self._where} closed the connection during the TLS handshake")
        self._transport = new_transport  # type: ignore[assignment]

    # -- the pump ------------------------------------------------------------------

    async def _run(self) -> object:
        """Write what the core queued and feed it replies until it has an event.

        On a session error the connection is closed (except SmtpMessageError,
        raised before anything is sent) and the error re-raised.
        """
        if self._busy:
            raise RuntimeError("SmtpConnection is not for concurrent use")
        self._busy = True
        try:
            return await self._pump()
        except SmtpMessageError:
            raise
        except SmtpSessionError:
            self.close()
            raise
        except BaseException:
            self.close()  # cancelled mid-command: the session is out of step
            raise
        finally:
            self._busy = False
            self.last_used = time.monotonic()
            behind, self._behind = self._behind, None
            if behind is not None and not behind.turn.done():
                # Its turn to pump; from now on another send() may wait
                # behind it (takes_next) before it resumes.
                behind.turn.set_result(None)

    async def _pump(self) -> object:
        core = self._core
        timeouts = self.settings.timeouts
        loop = self._loop
        waiting_for = None
        deadline = 0.0
        while True:
            event = core.next_event()
            if core.data_end_queued:
                if self._before_data_end is not None:
                    self._before_data_end()
                    self._before_data_end = None
                behind = self._behind
                if behind is not None and not behind.queued and not behind.turn.done() and core.takes_next_mail:
                    self._queue_behind()  # in this very write
            out = core.data_to_send()
            if out:
                if self._transport is None:
                    raise SmtpConnectionLost(f"connection to {self._where} is closed")
                self._transport.write(out)
                while self._write_paused and not self._eof:
                    # A large body: wait for the socket to drain, each wait
                    # bounded by the data block timeout (RFC 5321 4.5.3.2.5).
                    await self._wait(loop.time() + timeouts.data_block, core.awaiting, writing=True)
            if event is not NEED_DATA:
                return event
            # One deadline per awaited reply, not per read: a server trickling
            # a byte now and then cannot stretch the RFC 5321 4.5.3.2 timeout.
            if (core.replies_received, core.awaiting) != waiting_for:
                waiting_for = (core.replies_received, core.awaiting)
                deadline = loop.time() + timeouts.for_reply(core.awaiting)
            await self._wait(deadline, core.awaiting)

    async def _wait(self, deadline: float, verb: str | None, writing: bool = False) -> None:
        """Sleep until the protocol calls _wake (data, EOF, writable) or the
        deadline passes (then SmtpTimeout: `writing`, the server stopped
        taking the message's bytes; else no reply came to `verb`)."""
        if self._eof:
            return  # the core reports the EOF on the next next_event()
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._deadline = deadline
        if self._timer is None:
            self._arm_timer()
        try:
            await waiter
        except TimeoutError:
            timeouts = self.settings.timeouts
            if writing:
                why = f"{self._where} took no data for {timeouts.data_block:g} s while the message was sent"
            else:
                why = f"no reply from {self._where} to {verb} within {timeouts.for_reply(verb):g} s"
            raise SmtpTimeout(why, after_data_end=verb == "DATA_END" and not writing) from None
        finally:
            self._waiter = None

    # One timer per connection, not one per wait (two or three waits per
    # message: uvloop's call_at and cancel cost 2.7 us a pair by timeit).
    # It goes off `shortest_wait` after it is set, or at the deadline if
    # that is sooner: no wait that starts later can end before then, since
    # none is shorter. Then it expires the wait whose deadline has passed,
    # or is set again while one waits: with the default timeouts a busy
    # connection's timer goes off every 2 minutes, not twice a message.
    def _arm_timer(self) -> None:
        loop = self._loop
        when = min(self._deadline, loop.time() + self.settings.timeouts.shortest_wait)
        self._timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait sets the timer
        if self._loop.time() >= self._deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._arm_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_data(self, data: bytes) -> None:
        if not data:
            if self._eof:
                return
            self._eof = True
        self._core.receive_data(data)
        if self._waiter is not None:
            self._wake()
        elif self._core.awaiting is None:
            # Between commands: surface an unsolicited reply or an EOF now, so
            # `usable` turns false before anyone sends on this connection.
            try:
                self._core.next_event()
            except SmtpSessionError:
                self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_usable(self) -> None:
        if not self.usable:
            raise SmtpConnectionLost(f"connection to {self._where} is not usable")

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: asyncio sets it already on TCP; made explicit, it is what
    keeps the last write of a burst from a ~40 ms delayed-ACK stall."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
