"""The sans-IO SMTP client state machine (RFC 5321), in the h11 shape.

The caller owns the socket.  It calls an action (``ehlo()``, ``send_mail()``
...), writes ``data_to_send()`` in one write, feeds every byte the server
sends to ``receive_data()`` (``b""`` for end of stream) and calls
``next_event()`` until it returns an event instead of ``NEED_DATA``.  Each
action ends with exactly one event (or a SmtpSessionError); the steps inside
it (HELO fallback, the LOGIN challenges, the body after 354) are queued here,
so the driver stays a dumb pump.

Replies are matched to commands strictly in order (a FIFO of expected
replies, RFC 2920 3.1).  Bytes that arrive while no reply is expected are a
protocol error, never held for the next command: this is what keeps a server
that sends unsolicited or extra reply lines from shifting every later reply
by one (aiosmtplib's reply desync), and why bytes that follow the 220 to
STARTTLS in the same read are refused instead of being read after the TLS
handshake as if they came over TLS (aiosmtplib's STARTTLS buffer injection).

States and the actions allowed in each (anything else raises
SmtpUsageError, a bug in the caller)::

    GREETING      (waiting for 220)         -> GREETED | error
    GREETED       ehlo, quit                -> READY
    READY         starttls, auth, send_mail, rset, noop, quit, ehlo
    BUSY          (an action is waiting for replies) -> READY | TLS_HANDSHAKE | CLOSED
    TLS_HANDSHAKE tls_started               -> GREETED (EHLO again, RFC 3207 4.2)
    CLOSED / ERROR: every call raises the error that ended the session.
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

from .errors import (
    SmtpAuthError,
    SmtpConnectionLost,
    SmtpMessageError,
    SmtpProtocolError,
    SmtpServerRefused,
    SmtpSessionError,
    SmtpStartTlsUnavailable,
    SmtpTlsError,
)
from .replies import Reply, ReplyParser

__all__ = [
    "SmtpClient",
    "SmtpUsageError",
    "State",
    "NEED_DATA",
    "Greeting",
    "Hello",
    "TlsReady",
    "Authenticated",
    "Delivered",
    "CommandDone",
    "DeliveryResult",
    "RecipientResult",
    "prepare_body",
]


class State(enum.Enum):
    GREETING = "GREETING"
    GREETED = "GREETED"
    READY = "READY"
    BUSY = "BUSY"
    TLS_HANDSHAKE = "TLS_HANDSHAKE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class SmtpUsageError(RuntimeError):
    """The caller used the state machine wrongly (h11's LocalProtocolError)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# ---- results ---------------------------------------------------------------

RecipientStatus = Literal["accepted", "temporary", "permanent"]


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What became of one recipient: status by reply class, and the reply that decided it."""

    address: str
    status: RecipientStatus
    reply: Reply


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome of one mail transaction.

    recipients: one result per recipient, in the order given.
    mail_reply: the reply to MAIL FROM.
    data_reply: the end-of-data reply; the reply to DATA itself if that was
      refused; None if DATA was never sent (MAIL or every RCPT refused).
    """

    recipients: list[RecipientResult]
    mail_reply: Reply
    data_reply: Reply | None

    @property
    def accepted(self) -> list[str]:
        return [r.address for r in self.recipients if r.status == "accepted"]


def _status(reply: Reply) -> RecipientStatus:
    if reply.code < 400:
        return "accepted"
    return "temporary" if reply.code < 500 else "permanent"


# ---- events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO (esmtp=True) or, after EHLO was refused, HELO accepted."""

    reply: Reply
    extensions: dict[str, str]
    esmtp: bool


@dataclass(frozen=True, slots=True)
class TlsReady:
    """220 to STARTTLS: the caller now runs the TLS handshake, then tls_started()."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Authenticated:
    reply: Reply


@dataclass(frozen=True, slots=True)
class Delivered:
    result: DeliveryResult


@dataclass(frozen=True, slots=True)
class CommandDone:
    """The reply to RSET, NOOP or QUIT (QUIT: reply None if the server just closed)."""

    verb: str
    reply: Reply | None


# ---- message body ----------------------------------------------------------

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF, so
# 998 of content.  The transparency dot added by stuffing is not counted
# (998 + dot + CRLF = 1001 is what a server must accept, as aiosmtpd does).
MAX_TEXT_LINE = 998
# A LF then 999 octets of a line and its CR without another LF.  The literal
# LF lets the regex engine skip ahead to candidates: ~1 ns per octet (30 ms
# for a 25 MiB body), where a search anchored with (?m)^ took 170 ms and an
# unanchored one seconds, blocking the event loop.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % (MAX_TEXT_LINE + 2))
# Control characters (and the angle brackets that delimit the path) would let
# an address end the command early or inject another one.
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_BAD_ARGUMENT = re.compile(r"[\x00-\x20\x7f]")


def prepare_body(data: bytes) -> bytes:
    """Return DATA's wire form: CRLF line ends, dot-stuffed, ended by CRLF "." CRLF.

    Every bare CR and bare LF becomes CRLF first (so "<LF>.<LF>" or
    "<CR><LF>.<CR>" cannot reach the server as an end of data), then a dot
    starting a line is doubled (RFC 5321 4.5.2).  Raises SmtpMessageError if
    a line is longer than 998 octets: a line is never cut or folded here.
    """
    return _dot_stuffed(canonical_body(data))


def _dot_stuffed(canonical: bytes) -> bytes:
    """A canonical body (canonical_body) dot-stuffed and ended by the final dot."""
    if canonical.startswith(b"."):
        canonical = b"." + canonical
    if b"\r\n." in canonical:
        canonical = canonical.replace(b"\r\n.", b"\r\n..")
    return canonical + b".\r\n"


def canonical_body(data: bytes) -> bytes:
    """The message with CRLF line ends (every bare CR and LF made one), ending
    in CRLF unless empty: what BDAT sends as it is (RFC 3030 3), and DATA
    after dot-stuffing.  Raises SmtpMessageError if a line is longer than
    998 octets."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        # Some bare CR or LF.  (Counting first spares the three copies for
        # the usual input, which the message builder already ends in CRLF.)
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if len(data) > MAX_TEXT_LINE + 2:
        # Every line now ends in CRLF, so a line is too long exactly when
        # 998 + 1 octets and its CR run without a LF.
        line_no = 0
        if data.find(b"\n") > MAX_TEXT_LINE + 1:
            line_no = 1
        elif match := _LONG_LINE.search(data):
            line_no = data.count(b"\n", 0, match.start()) + 2
        if line_no:
            raise SmtpMessageError(
                f"message line {line_no} is longer than {MAX_TEXT_LINE} octets "
                "(RFC 5321 4.5.3.1.6); fold or encode it before sending"
            )
    return data


# ---- the state machine -----------------------------------------------------


@dataclass
class _Transaction:
    mail_from: str
    recipients: list[str]
    body: bytes
    pipelined: bool
    chunking: bool
    dot_queued: bool = False  # its final dot (or the empty message's) is queued or sent
    mail_reply: Reply | None = None
    rcpt_replies: list[Reply] = field(default_factory=list)
    data_reply: Reply | None = None


_Handler = Callable[[Reply], None]

# Which actions each state allows (the data table of h11's _state.py).
_ALLOWED: dict[State, frozenset[str]] = {
    State.GREETING: frozenset(),
    State.GREETED: frozenset({"ehlo", "quit"}),
    State.READY: frozenset({"ehlo", "starttls", "auth", "send_mail", "rset", "noop", "quit"}),
    State.BUSY: frozenset(),
    State.TLS_HANDSHAKE: frozenset({"tls_started"}),
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
}


class SmtpClient:
    """One SMTP session, without I/O.  See the module docstring for the loop."""

    def __init__(self, *, tls_active: bool = False) -> None:
        self.state = State.GREETING
        self.tls_active = tls_active  # implicit TLS (port 465) starts True
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        # True while the server may hold an open transaction (MAIL accepted,
        # no end of data since): the next send_mail() sends RSET first.
        self.needs_reset = False
        self.replies_received = 0  # lets the driver tell one awaited reply from the next
        # True when the bytes data_to_send() returns next hold a message's
        # final dot: once they are written the server may have the message,
        # whatever happens to its reply (the driver's cue to record that).
        self.data_end_queued = False
        self._parser = ReplyParser()
        self._expected: deque[tuple[str, _Handler]] = deque()
        self._expected.append(("GREETING", self._on_greeting))
        # How many of the leading expectations have had their command handed
        # out by data_to_send(): only those can be answered by bytes we hold.
        self._sent = 1
        self._out: list[bytes] = []
        self._events: deque[object] = deque()
        self._eof = False
        self._error: SmtpSessionError | None = None
        # The transactions in flight, oldest first: replies come in order, so
        # the oldest is the one every reply handler works on. A second one
        # only behind the first's final dot (send_mail, takes_next_mail).
        self._txns: deque[_Transaction] = deque()
        self._pending_mail: tuple[str, list[str]] = ("", [])  # MAIL held behind a lone RSET

    # -- I/O side ------------------------------------------------------------

    @property
    def awaiting(self) -> str | None:
        """The command whose reply comes next (picks the timeout), or None."""
        return self._expected[0][0] if self._expected else None

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the server; b"" means the server closed the stream."""
        if not data:
            self._eof = True
        elif self.state is State.TLS_HANDSHAKE:
            # Plaintext after the 220 to STARTTLS, before the handshake: it
            # would otherwise be read as the first replies over TLS.
            self._fail(SmtpProtocolError("server sent plaintext after its 220 to STARTTLS"))
        else:
            self._parser.feed(data)

    @property
    def mail_in_flight(self) -> bool:
        """Whether a mail transaction awaits replies."""
        return bool(self._txns)

    @property
    def pipelines_next_mail(self) -> bool:
        """Whether the transaction in flight lets the next message's
        commands follow its final dot (send_mail, once takes_next_mail)."""
        if self._error is not None or len(self._txns) != 1:
            return False
        txn = self._txns[0]
        return txn.pipelined and not txn.chunking

    @property
    def takes_next_mail(self) -> bool:
        """Whether send_mail() may be called now, a transaction still in
        flight: its final dot is queued, so the next MAIL, RCPTs and DATA go
        behind it (RFC 2920 3.1: message content may open a group, DATA must
        close it). Not behind BDAT: a refused chunk leaves the transaction
        open (RFC 3030 2), and the next MAIL would be a nested one."""
        return self.pipelines_next_mail and self._txns[0].dot_queued

    def data_to_send(self) -> bytes:
        """The bytes queued since the last call, to go out in one write."""
        out = b"".join(self._out)
        self._out.clear()
        self._sent = len(self._expected)
        self.data_end_queued = False
        return out

    def next_event(self) -> object:
        """The next event, or NEED_DATA; raises the SmtpSessionError that ends the session."""
        if self._error is not None:
            raise self._error
        try:
            event = self._next_event()
        except SmtpSessionError as exc:
            self._fail(exc)
            raise
        if event is not NEED_DATA and not self._expected and self._parser.pending:
            if self.state is not State.CLOSED:
                # Extra lines after the last awaited reply: the action is
                # complete (its result stands), but the session is out of step.
                self._fail(SmtpProtocolError("server sent data while no reply was expected"))
        return event

    def _next_event(self) -> object:
        while not self._events:
            if not self._expected:
                if self._parser.pending:
                    self._unsolicited()
                if self._eof:
                    self.state = State.CLOSED
                    raise SmtpConnectionLost("server closed the connection")
                return NEED_DATA
            if not self._sent:
                if self._parser.pending:
                    # The next command has not gone out yet, so these bytes
                    # cannot be its reply: an extra reply from the server.
                    raise SmtpProtocolError("server sent a reply before the command it would answer")
                return NEED_DATA
            reply = self._parser.next_reply()
            if reply is None:
                if self._eof:
                    verb = self._expected[0][0]
                    if verb == "QUIT":
                        self._expected.popleft()
                        self._sent -= 1
                        self.state = State.CLOSED
                        return CommandDone("QUIT", None)
                    raise SmtpConnectionLost(
                        f"server closed the connection while {verb} awaited its reply",
                        after_data_end=verb == "DATA_END",
                    )
                return NEED_DATA
            verb, handler = self._expected.popleft()
            self._sent -= 1
            self.replies_received += 1
            if reply.code == 421 and verb != "QUIT":
                # RFC 5321 3.8: 421 may come in reply to any command; the
                # server then closes.  Nothing of this transaction was taken.
                raise SmtpServerRefused(f"server closing the session ({verb}): {reply}", reply=reply)
            handler(reply)
        return self._events.popleft()

    def _unsolicited(self) -> None:
        try:
            reply = self._parser.next_reply()
        except SmtpProtocolError:
            reply = None
        if reply is not None and reply.code == 421:
            raise SmtpServerRefused(f"server closing the session: {reply}", reply=reply)
        raise SmtpProtocolError("server sent data while no reply was expected")

    def _fail(self, exc: SmtpSessionError) -> None:
        self._error = exc
        self.state = State.ERROR
        self._expected.clear()
        self._sent = 0
        self._out.clear()
        self.data_end_queued = False

    def _begin(self, action: str) -> None:
        if self._error is not None:
            raise self._error
        if action not in _ALLOWED[self.state]:
            raise SmtpUsageError(f"can't {action} in state {self.state.name}")
        if self._parser.pending:
            # Checked before anything goes out: leftover bytes would be taken
            # as the reply to the command we are about to send.
            exc = SmtpProtocolError("server sent data while no reply was expected")
            self._fail(exc)
            raise exc

    def _command(self, line: str, verb: str, handler: _Handler) -> None:
        self._out.append(line.encode("utf-8") + b"\r\n")
        self._expected.append((verb, handler))

    def _emit(self, event: object, state: State = State.READY) -> None:
        self.state = state
        self._events.append(event)

    # -- greeting, EHLO / HELO -------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code != 220:
            raise SmtpServerRefused(
                f"server refused the session at greeting: {reply}",
                reply=reply,
                retryable=reply.is_transient,
            )
        self._emit(Greeting(reply), State.GREETED)

    def ehlo(self, name: str) -> None:
        """Queue EHLO; ends with Hello (after a HELO fallback if EHLO is refused)."""
        self._begin("ehlo")
        _check_argument(name, "EHLO name")
        self.state = State.BUSY
        self._command(f"EHLO {name}", "EHLO", lambda reply: self._on_ehlo(reply, name))

    def _on_ehlo(self, reply: Reply, name: str) -> None:
        if reply.code == 250:
            self.extensions = parse_extensions(reply)
            self.esmtp = True
            self._emit(Hello(reply, self.extensions, True))
        elif reply.is_permanent:
            # RFC 5321 3.2: a server that does not know EHLO answers 5xx; the
            # client then falls back to HELO, without any extension.
            self._command(f"HELO {name}", "HELO", self._on_helo)
        else:
            raise SmtpServerRefused(f"EHLO refused: {reply}", reply=reply, retryable=reply.is_transient)

    def _on_helo(self, reply: Reply) -> None:
        if reply.code != 250:
            raise SmtpServerRefused(f"HELO refused: {reply}", reply=reply, retryable=reply.is_transient)
        self.extensions = {}
        self.esmtp = False
        self._emit(Hello(reply, {}, False))

    # -- STARTTLS (RFC 3207) ------------------------------------------------------

    def starttls(self) -> None:
        """Queue STARTTLS; ends with TlsReady.  Raises SmtpStartTlsUnavailable if not offered."""
        self._begin("starttls")
        if "STARTTLS" not in self.extensions:
            exc = SmtpStartTlsUnavailable("STARTTLS required but not offered by the server")
            self._fail(exc)
            raise exc
        self.state = State.BUSY
        self._command("STARTTLS", "STARTTLS", self._on_starttls)

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            raise SmtpTlsError(f"STARTTLS refused: {reply}", reply=reply)
        if self._parser.pending:
            raise SmtpProtocolError("server sent data after its 220 to STARTTLS")
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.extensions = {}
        self.esmtp = False
        self._emit(TlsReady(reply), State.TLS_HANDSHAKE)

    def tls_started(self) -> None:
        """The caller finished the TLS handshake; EHLO must be sent again."""
        self._begin("tls_started")
        self.tls_active = True
        self.state = State.GREETED

    # -- AUTH (RFC 4954) ---------------------------------------------------------

    def auth(
        self,
        username: str,
        password: str | None = None,
        *,
        xoauth2_token: str | None = None,
        allow_plaintext: bool = False,
    ) -> None:
        """Queue AUTH (XOAUTH2 if a token is given, else PLAIN, else LOGIN); ends with Authenticated.

        Raises SmtpAuthError before sending anything if the connection is not
        encrypted and allow_plaintext is false, or no usable mechanism is offered.
        """
        self._begin("auth")
        if not self.tls_active and not allow_plaintext:
            raise self._auth_refused(
                "refusing to send credentials over a plaintext connection "
                "(allow_plaintext_auth is off)"
            )
        if "AUTH" not in self.extensions:
            raise self._auth_refused("credentials configured but the server does not offer AUTH")
        offered = set(self.extensions["AUTH"].upper().split())
        user = username.encode("utf-8")
        if xoauth2_token is not None:
            if "XOAUTH2" not in offered:
                raise self._auth_refused("server does not offer AUTH XOAUTH2")
            # https://developers.google.com/gmail/imap/xoauth2-protocol
            blob = b"user=%s\x01auth=Bearer %s\x01\x01" % (user, xoauth2_token.encode("utf-8"))
            self._secret_command(b"AUTH XOAUTH2 " + _b64(blob), self._on_xoauth2)
        elif password is None:
            raise self._auth_refused("no password or token configured")
        elif "PLAIN" in offered:
            # RFC 4616: authzid NUL authcid NUL passwd, as the initial response.
            blob = b"\0%s\0%s" % (user, password.encode("utf-8"))
            self._secret_command(b"AUTH PLAIN " + _b64(blob), self._on_auth_final)
        elif "LOGIN" in offered:
            secret = password.encode("utf-8")
            self._secret_command(b"AUTH LOGIN", lambda reply: self._on_login(reply, user, secret))
        else:
            raise self._auth_refused("server offers neither PLAIN nor LOGIN")
        self.state = State.BUSY

    def _auth_refused(self, why: str) -> SmtpAuthError:
        exc = SmtpAuthError(why, retryable=False)
        self._fail(exc)
        return exc

    def _secret_command(self, line: bytes, handler: _Handler) -> None:
        # Never logged, never in an error text: only the verb is remembered.
        self._out.append(line + b"\r\n")
        self._expected.append(("AUTH", handler))

    def _on_login(self, reply: Reply, user: bytes, secret: bytes) -> None:
        if reply.code != 334:
            return self._on_auth_final(reply)
        self._secret_command(_b64(user), lambda reply: self._on_login_password(reply, secret))

    def _on_login_password(self, reply: Reply, secret: bytes) -> None:
        if reply.code != 334:
            return self._on_auth_final(reply)
        self._secret_command(_b64(secret), self._on_auth_final)

    def _on_xoauth2(self, reply: Reply) -> None:
        if reply.code == 334:
            # The server's error details, base64 JSON; an empty line gets the
            # final (failure) reply.
            self._secret_command(b"", self._on_auth_final)
            return
        self._on_auth_final(reply)

    def _on_auth_final(self, reply: Reply) -> None:
        if reply.code == 235:
            self._emit(Authenticated(reply))
        elif reply.code == 334 or not (reply.is_transient or reply.is_permanent):
            raise SmtpProtocolError(f"unexpected reply to AUTH: {reply.code}")
        else:
            raise SmtpAuthError(
                f"authentication refused: {reply}", reply=reply, retryable=reply.is_transient
            )

    # -- the mail transaction ------------------------------------------------------

    def send_mail(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        """Queue one transaction (RSET if needed, MAIL, RCPTs, DATA, body); ends with Delivered.

        With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one
        write; with CHUNKING as well (RFC 3030), MAIL, every RCPT and the
        body as BDAT ... LAST do, and its reply ends the data.  While
        `takes_next_mail`, the transaction queues behind the one in flight
        (no RSET: that one's final dot ends it whatever its reply, RFC 5321
        4.1.1.4), and its Delivered comes after that one's.  Raises
        SmtpMessageError, with nothing sent and the session still usable,
        if the message or an address cannot be sent as given.
        8-bit data to a server without 8BITMIME goes out as it is (as Postfix
        does for non-MIME mail): the transfer encoding is the message
        builder's choice, and refusing would bounce mail most servers take.
        """
        behind = self.takes_next_mail
        if not behind:
            # (Behind a transaction, the parser may hold replies to its
            # commands, all sent: nothing to check there.)
            self._begin("send_mail")
        if not recipients:
            raise SmtpMessageError("no recipients")
        for address in (mail_from, *recipients):
            if _BAD_ADDRESS.search(address):
                raise SmtpMessageError(f"control character or angle bracket in address {address!r}")
        pipelined = "PIPELINING" in self.extensions
        # RFC 3030: with CHUNKING the body goes as one BDAT ... LAST chunk,
        # its octets as they are, pipelined with MAIL and RCPT (RFC 3030
        # 4.2): one write and one round trip per message where DATA takes
        # two (MAIL..DATA, then the body after 354).  Only with PIPELINING:
        # without it each command waits for its reply anyway.
        chunking = pipelined and "CHUNKING" in self.extensions
        canonical = canonical_body(data)
        body = canonical if chunking else _dot_stuffed(canonical)
        params = []
        if "SIZE" in self.extensions:
            # RFC 1870: the octets with CRLF line ends, without DATA's
            # transparency dots and final ".CRLF".
            params.append(f"SIZE={len(canonical)}")
        if not data.isascii() and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")  # RFC 6152
        if not all(address.isascii() for address in (mail_from, *recipients)):
            if "SMTPUTF8" not in self.extensions:
                raise SmtpMessageError(
                    "an address is not ASCII and the server does not offer SMTPUTF8 (RFC 6531)"
                )
            params.append("SMTPUTF8")
        txn = _Transaction(mail_from, list(recipients), body, pipelined, chunking)
        self._txns.append(txn)
        self.state = State.BUSY
        if self.needs_reset and not behind:
            self._command("RSET", "RSET", self._on_txn_rset)
            if not pipelined:
                self._pending_mail = (mail_from, params)
                return
        self._queue_mail(mail_from, params)
        if pipelined:
            for address in txn.recipients:
                self._command(f"RCPT TO:<{address}>", "RCPT", self._on_rcpt)
            if not chunking:
                self._command("DATA", "DATA", self._on_data)
                return
            # The body leaves before any RCPT reply: if none was accepted,
            # the server refuses the chunk (RFC 3030 2: 503 or 554) and the
            # recipients' own replies decide.  Its reply is the end of data's.
            self._out.append(b"BDAT %d LAST\r\n" % len(body) + body)
            self._expected.append(("DATA_END", self._on_bdat_last))
            self.data_end_queued = txn.dot_queued = True

    def _queue_mail(self, mail_from: str, params: list[str]) -> None:
        line = " ".join([f"MAIL FROM:<{mail_from}>", *params])
        self._command(line, "MAIL", self._on_mail)

    def _on_txn_rset(self, reply: Reply) -> None:
        if reply.code != 250:
            raise SmtpProtocolError(f"RSET refused: {reply}")
        self.needs_reset = False
        txn = self._txns[0]
        if not txn.pipelined:
            self._queue_mail(*self._pending_mail)

    def _on_mail(self, reply: Reply) -> None:
        txn = self._txns[0]
        _check_class(reply, "MAIL")
        txn.mail_reply = reply
        if reply.code < 300:
            self.needs_reset = True
            if not txn.pipelined:
                self._command(f"RCPT TO:<{txn.recipients[0]}>", "RCPT", self._on_rcpt)
        elif not txn.pipelined:
            self._finish()

    def _on_rcpt(self, reply: Reply) -> None:
        txn = self._txns[0]
        _check_class(reply, "RCPT")
        txn.rcpt_replies.append(reply)
        if txn.pipelined:
            return
        done = len(txn.rcpt_replies)
        if done < len(txn.recipients):
            self._command(f"RCPT TO:<{txn.recipients[done]}>", "RCPT", self._on_rcpt)
        elif self._any_accepted():
            self._command("DATA", "DATA", self._on_data)
        else:
            self._finish()

    def _any_accepted(self) -> bool:
        txn = self._txns[0]
        assert txn.mail_reply is not None
        return txn.mail_reply.code < 300 and any(r.code < 300 for r in txn.rcpt_replies)

    def _on_data(self, reply: Reply) -> None:
        txn = self._txns[0]
        if reply.code == 354:
            if self._any_accepted():
                self._out.append(txn.body)
                self._expected.append(("DATA_END", self._on_data_end))
                self.data_end_queued = txn.dot_queued = True
            else:
                # RFC 2920 3.1: DATA accepted although no RCPT was; end the
                # empty message at once, the server has no one to deliver to.
                self._out.append(b".\r\n")
                self._expected.append(("DATA_END", self._on_discarded_end))
                txn.dot_queued = True
            return
        if reply.code < 400:
            # 354 is DATA's only positive reply (RFC 5321 4.3.2); a 250 here
            # would claim delivery of a body that never went out.
            raise SmtpProtocolError(f"unexpected reply to DATA: {reply.code}")
        if txn.mail_reply is not None and txn.mail_reply.code < 300 and self._any_accepted():
            txn.data_reply = reply
        self._finish()

    def _on_data_end(self, reply: Reply) -> None:
        txn = self._txns[0]
        _check_class(reply, "end of data")
        txn.data_reply = reply
        self.needs_reset = False  # RFC 5321 4.1.1.4: end of data ends the transaction
        self._finish()

    def _on_bdat_last(self, reply: Reply) -> None:
        txn = self._txns[0]
        assert txn.mail_reply is not None
        _check_class(reply, "BDAT")
        if reply.code < 300:
            self.needs_reset = False  # the last chunk taken ends the transaction
        if txn.mail_reply.code < 300 and self._any_accepted():
            txn.data_reply = reply
        self._finish()

    def _on_discarded_end(self, reply: Reply) -> None:
        self.needs_reset = False
        self._finish()

    def _finish(self) -> None:
        txn = self._txns.popleft()
        assert txn.mail_reply is not None
        results = []
        for index, address in enumerate(txn.recipients):
            if txn.mail_reply.code >= 300:
                decided_by = txn.mail_reply
            elif index >= len(txn.rcpt_replies):
                raise SmtpProtocolError("transaction ended before every RCPT had a reply")
            elif txn.rcpt_replies[index].code >= 300 or txn.data_reply is None:
                decided_by = txn.rcpt_replies[index]
            else:
                decided_by = txn.data_reply
            results.append(RecipientResult(address, _status(decided_by), decided_by))
        # Still BUSY while the next transaction awaits its replies.
        self._emit(Delivered(DeliveryResult(results, txn.mail_reply, txn.data_reply)),
                   State.BUSY if self._txns else State.READY)

    # -- RSET, NOOP, QUIT ------------------------------------------------------------

    def rset(self) -> None:
        """Queue RSET (abort any open transaction); ends with CommandDone("RSET")."""
        self._begin("rset")
        self.state = State.BUSY
        self._command("RSET", "RSET", self._on_rset)

    def _on_rset(self, reply: Reply) -> None:
        if reply.code != 250:
            raise SmtpProtocolError(f"RSET refused: {reply}")
        self.needs_reset = False
        self._emit(CommandDone("RSET", reply))

    def noop(self) -> None:
        """Queue NOOP; ends with CommandDone("NOOP", reply) whatever the code."""
        self._begin("noop")
        self.state = State.BUSY
        self._command("NOOP", "NOOP", lambda reply: self._emit(CommandDone("NOOP", reply)))

    def quit(self) -> None:
        """Queue QUIT; ends with CommandDone("QUIT") and state CLOSED."""
        self._begin("quit")
        self.state = State.BUSY
        self._command(
            "QUIT", "QUIT", lambda reply: self._emit(CommandDone("QUIT", reply), State.CLOSED)
        )


def parse_extensions(reply: Reply) -> dict[str, str]:
    """The EHLO keywords (upper case) and their parameters (RFC 5321 4.1.1.1).

    The first line is the greeting.  "AUTH=LOGIN PLAIN" (the pre-RFC 4954 form
    some servers still send) counts as AUTH; several AUTH lines are merged.
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
        keyword = keyword.upper()
        if not keyword:
            continue
        if keyword == "AUTH" and keyword in extensions:
            params = f"{extensions[keyword]} {params}".strip()
        extensions[keyword] = params
    return extensions


def _check_class(reply: Reply, what: str) -> None:
    if not (200 <= reply.code < 300 or reply.is_transient or reply.is_permanent):
        raise SmtpProtocolError(f"unexpected reply to {what}: {reply.code}")


def _check_argument(value: str, what: str) -> None:
    if not value or _BAD_ARGUMENT.search(value):
        raise SmtpUsageError(f"{what} is empty or has spaces or control characters")


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)
