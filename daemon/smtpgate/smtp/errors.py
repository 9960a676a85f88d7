"""Session errors of the SMTP client, each saying whether a retry makes sense.

The delivery layer acts on the type and on ``.retryable`` / ``.reply`` /
``.after_data_end``, never on the text.  Texts name the server and the
command, never credentials: the AUTH command lines are never put in an error.

Transport errors also subclass ``ConnectionError`` / ``TimeoutError`` (as
aiosmtplib does) so generic handlers still recognise them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .replies import Reply

__all__ = [
    "SmtpSessionError",
    "SmtpConnectError",
    "SmtpConnectionLost",
    "SmtpTimeout",
    "SmtpTlsError",
    "SmtpStartTlsUnavailable",
    "SmtpAuthError",
    "SmtpProtocolError",
    "SmtpServerRefused",
    "SmtpMessageError",
]


class SmtpSessionError(Exception):
    """Base of every session failure.

    retryable: a later attempt may succeed (class default, overridable).
    reply: the server reply that caused it, if any.
    after_data_end: the final "." went out and no reply came back, so the
      upstream may already have the message (a retry may duplicate it).
    """

    retryable: bool = True

    def __init__(
        self,
        message: str,
        *,
        reply: Reply | None = None,
        retryable: bool | None = None,
        after_data_end: bool = False,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        if retryable is not None:
            self.retryable = retryable
        self.after_data_end = after_data_end


class SmtpConnectError(SmtpSessionError, ConnectionError):
    """The TCP connection could not be made (refused, unreachable, timed out)."""


class SmtpConnectionLost(SmtpSessionError, ConnectionError):
    """The server closed the connection or the connection broke mid-session."""


class SmtpTimeout(SmtpSessionError, TimeoutError):
    """No reply within the RFC 5321 4.5.3.2 timeout of the command awaited."""


class SmtpTlsError(SmtpSessionError):
    """TLS handshake or certificate verification failed, or STARTTLS was refused."""


class SmtpStartTlsUnavailable(SmtpSessionError):
    """STARTTLS is required by the configuration but the server does not offer it.

    Raised before any credential or mail is sent (no downgrade).  Retryable,
    as Postfix treats it: the server may be fixed, or the offer stripped by a
    man in the middle only for a while.
    """


class SmtpAuthError(SmtpSessionError):
    """Authentication failed or was not attempted for safety (plaintext, no mechanism).

    Retryable only for a 4xx reply (e.g. 454 temporary authentication failure).
    """

    retryable = False


class SmtpProtocolError(SmtpSessionError):
    """The server broke the SMTP grammar or sequence (bad reply, unsolicited data)."""


class SmtpServerRefused(SmtpSessionError):
    """The server refused the session: 421/554 greeting, 421 at any point, EHLO/HELO refused.

    Retryable when the reply is 4xx.
    """


class SmtpMessageError(SmtpSessionError):
    """The message cannot be sent as given; raised before anything goes out.

    A line over 998 octets, a non-ASCII address to a server without SMTPUTF8,
    a control character in an address.  Never retryable; the connection stays
    usable.
    """

    retryable = False
