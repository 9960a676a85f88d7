"""How to reach one upstream SMTP server: address, TLS mode, credentials, timeouts."""

from __future__ import annotations

import functools
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["UpstreamSettings", "Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each reply, RFC 5321 4.5.3.2 defaults.

    The RFC sets minimums a client should wait: greeting 5 min, MAIL 5 min,
    RCPT 5 min, DATA initiation 2 min, each data block 3 min, end of data
    10 min (the server may be filtering the message).  It names no value for
    EHLO, STARTTLS, AUTH, RSET, NOOP and QUIT; 5 min as for MAIL (Postfix's
    smtp_helo_timeout).  Connecting and the TLS handshake are not SMTP
    commands; 30 s and 60 s keep a dead host from holding a worker long.
    """

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0  # EHLO, HELO, STARTTLS, AUTH, RSET, NOOP, QUIT
    tls_handshake: float = 60.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0  # each wait for the body to drain to the socket
    data_end: float = 600.0

    def for_reply(self, verb: str | None) -> float:
        """The timeout for the reply to `verb` (SmtpClient.awaiting)."""
        return getattr(self, _REPLY_TIMEOUTS.get(verb, "command"))

    @property
    def shortest_wait(self) -> float:
        """The shortest of the waits bounded by for_reply and data_block."""
        return min(self.greeting, self.command, self.mail, self.rcpt, self.data_init, self.data_block, self.data_end)


# The command awaiting a reply -> the Timeouts field for it; the others: `command`.
_REPLY_TIMEOUTS = {"GREETING": "greeting", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data_init",
                   "DATA_END": "data_end"}


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream server.

    tls: "none" (plaintext), "starttls" (RFC 3207, required: no downgrade if
      not offered), "tls" (implicit TLS from the first byte, port 465 style).
    verify / ca_file: certificate checks (system CA store unless ca_file);
      ssl_context, if given, overrides both (tests use it).
    allow_plaintext_auth: send credentials over an unencrypted connection.
    """

    host: str
    port: int = 25
    tls: Literal["none", "starttls", "tls"] = "starttls"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    xoauth2_token: str | None = field(default=None, repr=False)
    allow_plaintext_auth: bool = False
    ca_file: str | None = None
    verify: bool = True
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    helo_name: str = field(default_factory=socket.gethostname)  # no DNS lookup
    timeouts: Timeouts = field(default_factory=Timeouts)

    def __post_init__(self) -> None:
        if self.tls not in ("none", "starttls", "tls"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'tls', not {self.tls!r}")

    def make_ssl_context(self) -> ssl.SSLContext:
        """The TLS context to use: the given one, or a verifying default (TLS 1.2+)."""
        if self.ssl_context is not None:
            return self.ssl_context
        stamp = os.stat(self.ca_file).st_mtime_ns if self.ca_file else None
        return _default_context(self.ca_file, stamp, self.verify)


@functools.lru_cache(maxsize=8)
def _default_context(ca_file: str | None, ca_file_stamp: int | None, verify: bool) -> ssl.SSLContext:
    """Built once per CA file version: loading the CA store takes ~25 ms of
    CPU, on the event loop, for every new upstream connection otherwise. The
    file's mtime is in the key, so a replaced CA file is read again."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
