"""The hand-off both front doors share: the checks a message passes
before it is stored, whichever door it came in by."""

from __future__ import annotations

from smtpgate.config import Config
from smtpgate.message.spec import RequestError
from smtpgate.protocol import codes

# SEND arguments (and SMTP messages) above this many characters are
# validated in a thread.
LARGE_REQUEST = 256 * 1024


def _address_allowed(address: str, patterns: list[str]) -> bool:
    """`patterns` holds full addresses or "@domain"; empty means everything."""
    if not patterns:
        return True
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p.lower() in (address, domain) for p in patterns)


def check_policy(config: Config, spec) -> None:
    if not _address_allowed(spec.envelope_from, config.allowed_senders):
        raise RequestError(codes.DENIED, f"sender {spec.envelope_from} is not allowed")
    for rcpt in spec.recipients:
        if not _address_allowed(rcpt, config.allowed_recipients):
            raise RequestError(codes.DENIED, f"recipient {rcpt} is not allowed")
