"""The SMTP front door: programs that can only speak SMTP to a smarthost
(PHPMailer, Symfony Mailer, smtplib, a printer) hand mail to the same spool.

aiosmtpd speaks the protocol; this module decides what each step answers.
It runs on the daemon's own event loop (no Controller thread), and the
250 after DATA is sent only once `enqueue` has returned, which happens after
the message is fsynced: the same promise as `OK <id>` on the line protocol.

A session is a caller (callers.py): the anonymous caller of an open daemon,
or the one it AUTHs as (RFC 4954: user = the caller's name, password = its
token). Its policy answers MAIL FROM and RCPT TO at once (550 5.7.1), and
the hand-off checks the whole message at DATA (header senders, rate,
max_pending) as it does a SEND.

The door has the line door's limits (limits.py): connections admitted by
acceptor.py (a refused peer gets a 421), a command must be whole within
`request_timeout` of its first byte and a message's DATA within
`request_timeout` of the DATA command (aiosmtpd's own timer is an idle
timer, reset by each command), the bytes of a DATA count in the shared
budget until its reply (past it: 421 and the close, since SMTP cannot
refuse in the middle of DATA), and 3 failed AUTHs end the session.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from smtpgate import __version__
from smtpgate.config import Config, is_loopback
from smtpgate.intake.acceptor import Acceptor, listening_sockets
from smtpgate.intake.callers import Caller, CallerBusy, Callers
from smtpgate.intake.limits import MAX_AUTH_FAILURES, Gate, Limits, Slot
from smtpgate.intake.peer import Peer
from smtpgate.log import sockname
from smtpgate.message.spec import RequestError
from smtpgate.message.validate import MAX_RECIPIENTS, check_address
from smtpgate.spool.errors import SpoolFull

# enqueue(caller, envelope_from, recipients, data) -> message id, once durable.
# SpoolFull, or an exception whose `.code` is a PROTOCOL.md error code
# (BUSY, TOO_LARGE, DENIED, BAD_ADDRESS, ...; message.spec.RequestError), picks
# the SMTP reply; any other exception is answered 451 (try again later)
# without its text.
Enqueue = Callable[[Caller, str, list[str], bytes], Awaitable[str]]


# Protocol error code -> SMTP reply (RFC 5321 4.2.2, RFC 3463 enhanced codes).
# The daemon's text follows the code; it is written for people and holds no
# secrets (the texts of message/validate.py's RequestErrors).
_BUSY = "452 4.3.1 Mail system full, try again later"
_REPLY_FOR_CODE = {
    "TOO_LARGE": "552 5.3.4",
    "BAD_ADDRESS": "553 5.1.3",
    "BAD_HEADER": "554 5.6.0",
    "BAD_REQUEST": "554 5.6.0",
    "DENIED": "550 5.7.1",
}
_TEMPORARY_FAILURE = "451 4.3.0 Local error, try again later"
_AUTH_REQUIRED = "530 5.7.0 Authentication required"


def _one_line(text: str, limit: int = 200) -> str:
    """Printable ASCII only: the text goes into a reply or a header line."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def smtp_reply_for(exc: BaseException) -> str:
    """The SMTP reply for an exception raised by enqueue."""
    if isinstance(exc, CallerBusy):  # RFC 3463 4.7.1: refused by policy, for now
        return f"451 4.7.1 {_one_line(exc.text)}"
    code = "BUSY" if isinstance(exc, SpoolFull) else getattr(exc, "code", None)
    if code == "BUSY":
        return _BUSY
    if code not in _REPLY_FOR_CODE:
        # INTERNAL or a bug: nothing was stored, the client may retry; the
        # exception text stays in our log, never in the reply.
        return _TEMPORARY_FAILURE
    text = getattr(exc, "text", None) or (exc.args[-1] if exc.args else code)
    return f"{_REPLY_FOR_CODE[code]} {_one_line(str(text))}"


class _LoginDataDeprecation(logging.Filter):
    """Drops aiosmtpd's "login_data is deprecated" warning.

    aiosmtpd 1.4 itself sets Session.login_data after every successful AUTH
    and warns about it; the warning is about its own code, not ours, and
    would otherwise appear once per authenticated connection.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


class _PeerWarnings(logging.Filter):
    """aiosmtpd's own warnings are about what a peer sent ("unrecognised"
    commands, five a connection, before any AUTH): one line of each kind a
    minute, as the daemon's own lines about peers (limits.py), so that no
    stranger writes the log at will. Its errors pass."""

    SPAN = 60.0  # seconds

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.clock = clock
        self.last: dict[str, float] = {}  # by the line's template: a few, in aiosmtpd's code

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        now, key = self.clock(), str(record.msg)
        if now - self.last.get(key, -self.SPAN) < self.SPAN:
            return False
        self.last[key] = now
        return True


class IntakeHandler:
    """aiosmtpd handler: AUTH as a caller, envelope checks by its policy,
    DATA into the spool. `callers` is the daemon's registry: a reload that
    changes it applies to the next command."""

    def __init__(self, *, enqueue: Enqueue, callers: Callers, hostname: str, log):
        self.enqueue = enqueue
        self.callers = callers
        self.hostname = hostname
        self.log = log

    def authenticate(self, server: SmtpSession, session: Session, envelope: Envelope,
                     mechanism: str, auth_data) -> AuthResult:
        """aiosmtpd authenticator: user = the caller's name, password = its token."""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            caller = self.callers.for_login(user, auth_data.password)
            if caller is not None:
                return AuthResult(success=True, auth_data=caller)
        server.wrong_token()
        return AuthResult(success=False, handled=False)

    def _caller(self, session: Session) -> Caller | None:
        """The session's caller: the one it AUTHed as (unless a reload
        revoked it), else the anonymous caller of an open daemon."""
        caller = session.auth_data if session.authenticated else None
        if caller is None or caller.revoked:
            caller = self.callers.anonymous
        return caller

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # Without tokens there is nothing to authenticate against; offering
        # AUTH would only make clients send credentials that cannot succeed.
        session.host_name = hostname
        if not self.callers.has_tokens:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # RFC 4954 6: 530 when the server requires authentication first.
        # Refusing MAIL is enough: RCPT and DATA need a MAIL first.
        caller = self._caller(session)
        if caller is None:
            return _AUTH_REQUIRED
        if not caller.policy.sender_allowed(address):
            return f"550 5.7.1 sender {_one_line(address)} is not allowed"
        if address:  # <>, a bounce's, is the DATA's to judge, as before
            try:
                check_address(address, "MAIL FROM")
            except RequestError as exc:
                return f"553 5.1.7 {_one_line(exc.text)}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # RFC 5321 4.5.3.1.8: a server must take at least 100 recipients; past
        # what a SEND may hold it answers 452, and the client sends the rest
        # in another message.
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        caller = self._caller(session)
        if caller is None:
            return _AUTH_REQUIRED
        if not caller.policy.recipient_allowed(address):
            return f"550 5.7.1 recipient {_one_line(address)} is not allowed"
        try:
            check_address(address, "RCPT TO")
        except RequestError as exc:  # this recipient only: the others still go
            return f"553 5.1.3 {_one_line(exc.text)}"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        caller = self._caller(session)
        if caller is None:
            return _AUTH_REQUIRED
        data = self._received_header(session) + envelope.original_content
        try:
            msg_id = await self.enqueue(caller, envelope.mail_from, list(envelope.rcpt_tos), data)
        except Exception as exc:  # every failure must become an SMTP reply
            reply = smtp_reply_for(exc)
            self.log.warning("smtp_refused", caller=caller.name, peer=_peer(session), reply=reply,
                             error=type(exc).__name__)
            return reply
        self.log.info("smtp_accepted", caller=caller.name, message_id=msg_id, peer=_peer(session),
                      recipients=len(envelope.rcpt_tos), size=len(data))
        return f"250 2.0.0 OK queued as {msg_id}"

    def _received_header(self, session: Session) -> bytes:
        """The trace field RFC 5321 4.4 requires of a server that accepts mail.

        With-protocol per RFC 3848: ESMTPA when the client authenticated.
        """
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.authenticated:
            protocol += "A"
        helo = _one_line(session.host_name or "unknown", 100).replace(" ", "?")
        # A TCP peer by its address literal; `sendmail -bs` (a socket pair)
        # has no address: the mail came from a local process.
        origin = f"[{session.peer[0]}]" if isinstance(session.peer, tuple) else "local"
        return (f"Received: from {helo} ({origin})\r\n"
                f"\tby {self.hostname} (smtpgate) with {protocol};\r\n"
                f"\t{formatdate(localtime=True)}\r\n").encode("ascii")


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "local")


async def start_smtp_intake(host: str | None, port: int | None, *, enqueue: Enqueue,
                            callers: Callers, max_message_bytes: int, log,
                            hostname: str | None = None, sock: socket.socket | None = None,
                            limits: Limits | None = None) -> Acceptor:
    """Listen for SMTP on host:port (or on `sock`) and return the listening server.

    AUTH PLAIN and LOGIN are offered when `callers` has tokens, and
    required unless the daemon is open (the anonymous caller). Without
    tokens at start only a loopback address is accepted (ValueError
    otherwise), as for the line protocol. `limits` are the daemon's (shared
    with the line door); without them, the defaults of the configuration.
    Close with `server.close(); await server.wait_closed()`.
    """
    # aiosmtpd would call socket.getfqdn() (a blocking DNS lookup) for every
    # connection without a hostname; gethostname() is a plain system call.
    hostname = hostname or socket.gethostname()
    handler = IntakeHandler(enqueue=enqueue, callers=callers, hostname=hostname, log=log)
    if not callers.has_tokens and sock is None and not (host and is_loopback(host)):
        raise ValueError(f"smtp_listen: {host} is not a loopback address; set tokens first")
    gate = (limits or Limits(Config(), log)).gate("smtp")
    make_session = session_factory(handler, max_message_bytes=max_message_bytes, gate=gate,
                                   loop=asyncio.get_running_loop())
    socks = [sock] if sock is not None else listening_sockets(host, port)
    server = Acceptor(socks, gate, make_session,
                      lambda why: f"421 4.7.0 {hostname} {why}, try again later\r\n".encode(), log)
    await server.start_serving()
    log.info("smtp_listening", address=[sockname(s) for s in server.sockets],
             auth=callers.has_tokens)
    return server


def session_factory(handler: IntakeHandler, *, max_message_bytes: int, gate: Gate,
                    loop: asyncio.AbstractEventLoop) -> Callable[[Peer, Slot], SmtpSession]:
    """Makes the session of an admitted connection: `make(peer, slot)`.

    Shared by the listening door and `smtpgate sendmail -bs` (SMTP on stdin).
    """
    aiosmtpd_log = logging.getLogger("mail.log")
    if not any(isinstance(f, _LoginDataDeprecation) for f in aiosmtpd_log.filters):
        aiosmtpd_log.addFilter(_LoginDataDeprecation())
        aiosmtpd_log.addFilter(_PeerWarnings())
    sessions: set[SmtpSession] = set()

    def stressed() -> None:  # the open sessions' timers shrink too
        for session in sessions:
            session._reset_timeout()

    gate.on_stress = stressed

    def make(peer: Peer, slot: Slot) -> SmtpSession:
        return SmtpSession(
            handler, gate=gate, peer=peer, slot=slot, sessions=sessions,
            hostname=handler.hostname,
            ident=f"smtpgate {__version__} ESMTP",
            data_size_limit=max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=gate.idle_timeout,
            # AUTH is enforced in handle_MAIL (aiosmtpd's auth_required
            # would warn on every connection that AUTH is allowed without
            # TLS). This door is meant for loopback, where plaintext AUTH
            # crosses no network; tokens are what guard a wider listener.
            auth_required=False,
            auth_require_tls=False,
            authenticator=handler.authenticate,
            loop=loop,
        )

    return make


class SmtpSession(SMTP):
    """An aiosmtpd session under the door's limits (module docstring).

    aiosmtpd calls `_reset_timeout()` (no argument) when a command has come
    in whole and when a session begins; from then on the timer is the idle
    one, until the first byte of the next command starts its deadline.
    """

    def __init__(self, handler, *, gate: Gate, peer: Peer, slot: Slot, sessions: set, **kwargs):
        self.gate = gate
        self.limits = gate.limits
        self.peer = peer
        self.slot = slot
        self.sessions = sessions
        self.command_started = False
        self.held: int | None = None  # bytes of the DATA being received, in limits.inflight
        self.failed_auths = 0
        super().__init__(handler, **kwargs)

    def connection_made(self, transport) -> None:
        self.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self.sessions.discard(self)
        self.slot.release()
        self._data_done()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if duration is None:
            self.command_started = False
            duration = self.gate.idle_timeout
        super()._reset_timeout(duration)

    def data_received(self, data: bytes) -> None:
        if self.held is not None:
            self.held += len(data)
            self.limits.inflight += len(data)
            if not self.limits.budget_allows(0):
                self._over_budget()
                return
        elif not self.command_started:
            self.command_started = True
            self._reset_timeout(self.gate.request_timeout)
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        if not self.limits.budget_allows(0):
            self.limits.refuse_over_budget()
            await self.push("452 4.3.1 Too much mail in flight, try again later")
            return
        self.held = 0
        self._reset_timeout(self.gate.request_timeout)  # the whole message, from the DATA command
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_done()

    async def _call_handler_hook(self, command: str, *args):
        if command == "DATA":  # the message is in: its commit is not the client's time
            self._reset_timeout()
        return await super()._call_handler_hook(command, *args)

    def _data_done(self) -> None:
        if self.held is not None:
            self.limits.inflight -= self.held
            self.held = None

    def _over_budget(self) -> None:
        """Past the budget in the middle of DATA: SMTP has no refusal there but 421 and the close."""
        self.limits.refuse_over_budget()
        self._data_done()
        if self.transport is not None:
            self.transport.write(f"421 4.3.2 {self.hostname} too much mail in flight, "
                                 "try again later\r\n".encode())
            self.transport.close()

    # (Not auth_*: aiosmtpd takes every method of that name for a mechanism.)
    def wrong_token(self) -> None:
        """A wrong token (the handler's authenticator)."""
        self.failed_auths += 1
        self.limits.auth_failed("smtp", self.peer)

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        if self.failed_auths >= MAX_AUTH_FAILURES and self.transport is not None:
            self.limits.counters["auth_closed"] += 1
            await self.push(f"421 4.7.0 {self.hostname} too many failed authentications")
            self.transport.close()
