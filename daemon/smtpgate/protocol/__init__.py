"""The smtpgate line protocol, sans-IO: request parsing (parser.py) and reply
formatting (formatter.py).

See PROTOCOL.md for the wire contract and docs/protocol.md for users.
"""

from . import codes
from .parser import (
    FOREIGN_PREFIXES,
    BadLine,
    ForeignProtocol,
    LineDropped,
    LineParser,
    LineTooLong,
    Request,
)
from .formatter import reply_err, reply_ok

__all__ = [
    "codes", "LineParser", "Request", "LineTooLong", "LineDropped", "ForeignProtocol",
    "BadLine", "FOREIGN_PREFIXES", "reply_ok", "reply_err",
]
