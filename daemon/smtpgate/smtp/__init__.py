"""The SMTP client core: a sans-IO state machine (core.py) and its asyncio driver (client.py).

See docs/architecture.md, section "smtp/", for the contract the delivery
layer codes against.
"""

from .client import SmtpConnection
from .core import DeliveryResult, RecipientResult, SmtpClient, SmtpUsageError, prepare_body
from .errors import (
    SmtpAuthError,
    SmtpConnectError,
    SmtpConnectionLost,
    SmtpMessageError,
    SmtpProtocolError,
    SmtpServerRefused,
    SmtpSessionError,
    SmtpStartTlsUnavailable,
    SmtpTimeout,
    SmtpTlsError,
)
from .replies import Reply, ReplyParser
from .settings import Timeouts, UpstreamSettings

__all__ = [
    "UpstreamSettings",
    "Timeouts",
    "SmtpConnection",
    "DeliveryResult",
    "RecipientResult",
    "Reply",
    "ReplyParser",
    "SmtpClient",
    "SmtpUsageError",
    "prepare_body",
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
