"""Who a message says wrote it: the addresses of its originator fields,
From and Sender (RFC 5322 3.6.2) and Resent-From and Resent-Sender
(3.6.6), as a reader's mail program shows them. A caller's allowed
senders are checked against these as well as the envelope sender
(intake/callers.py): an allowed envelope does not make a message from the
bank's CEO acceptable.

A composed SEND names its From in the `from` field and may add Sender or
Resent-* in `headers`; a raw one has them in its own header section. A
field that cannot be read as a plain list of addresses is refused rather
than guessed at: Python's parser and a mail program may disagree on
`a@shop.example <ceo@bank.example>`, and the check must not be the one
that reads it more kindly.
"""

from __future__ import annotations

import re
from email.errors import NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.header import decode_header, make_header
from email.policy import default as _policy

from smtpgate.message.spec import MessageSpec, RequestError
from smtpgate.protocol.codes import DENIED

ORIGINATOR_FIELDS = ("from", "sender", "resent-from", "resent-sender")
# A field name at the start of a header line (RFC 5322 2.2, 3.6.8).
_FIELD = re.compile(r"^([!-9;-~]+)[ \t]*:(.*)$")
# Something a reader would take for an address, inside a display name
# ("ceo@bank.example" <app@shop.example>).
_ADDRESS_LIKE = re.compile(r"[^\s<>\"'@,;:()\[\]]+@[^\s<>\"'@,;:()\[\]]+\.[^\s<>\"'@,;:()\[\]]+")
_SURROGATES = re.compile("[\udc80-\udcff]")
# Defects that do not change which addresses a field holds: UTF-8 local
# parts (RFC 6532), and the obsolete syntax of RFC 5322 4 that readers
# still show the same way ("J. Smith <j@x.example>", a source route). An
# ambiguous field always has an InvalidHeaderDefect too.
_HARMLESS = (NonASCIILocalPartDefect, ObsoleteHeaderDefect)
# The forms nearly every field has, `addr` and `Name <addr>` with a plain
# name (no quotes, comments, encoded-words, "@" or "."), read without the
# full parser, which costs some 150 us a field: both read them alike
# (tests/test_callers.py checks it on generated fields).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
# The full parser is pure Python and slow on hostile shapes (~36 ms for
# 1,000 characters of "a . . . .", a RecursionError for nested comments):
# a message may have it read this many characters of fields in all, and
# this many originator fields, so a hostile SEND costs the event loop a
# few milliseconds at most. Real fields that are not plain fit easily.
MAX_PARSED_CHARS = 500
MAX_FIELDS = 16
_PLAIN_FIELD = re.compile(
    rf"(?:(?:[^\W_]|[ \t!#$%&'*+/^_`{{|}}~-])*<({_PLAIN_ADDRESS})>|[ \t]*({_PLAIN_ADDRESS}))[ \t]*")


def originators(spec: MessageSpec) -> list[str]:
    """The addresses the message's originator fields name, and any text in
    them that looks like an address (in a display name, say). Raises
    RequestError(DENIED) for a field that cannot be read as addresses."""
    if spec.raw is not None:
        fields = _raw_fields(spec.raw)
        found = []
    else:
        fields = [(name.lower(), value) for name, value in spec.headers if name.lower() in ORIGINATOR_FIELDS]
        name, address = spec.from_
        found = [address, *_addresses_in(_decoded(name))] if name else [address]
    if len(fields) > MAX_FIELDS:
        raise RequestError(DENIED, f"more than {MAX_FIELDS} From, Sender, Resent-From and Resent-Sender fields")
    budget = [MAX_PARSED_CHARS]
    for name, value in fields:
        found += _field_addresses(name, value, budget)
    return list(dict.fromkeys(found))


def _raw_fields(raw: str) -> list[tuple[str, str]]:
    """The originator fields of a raw message's header section (LF line
    endings, as validation leaves them), unfolded."""
    end = raw.find("\n\n")
    head = raw if end < 0 else raw[:end]
    fields, current = [], None
    for line in head.split("\n"):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current[1] += line  # unfolding removes the line break only (RFC 5322 2.2.3)
            continue
        current = None
        m = _FIELD.match(line)
        if m is not None and m.group(1).lower() in ORIGINATOR_FIELDS:
            current = [m.group(1).lower(), m.group(2)]
            fields.append(current)
    return [tuple(field) for field in fields]


def _field_addresses(name: str, value: str, budget: list[int]) -> list[str]:
    """The addresses of one field, and every address-like text anywhere in
    it: in a display name, a quoted string or a comment (`a@shop.example
    (ceo@bank.example)` shows as "ceo@bank.example" in some readers).
    `budget`: the characters the full parser may still read (taken from)."""
    # Octets that are not UTF-8 (raw_base64: a GBK display name) are
    # surrogate escapes here; they are never part of an address.
    value = _SURROGATES.sub("\ufffd", value)
    plain = _PLAIN_FIELD.fullmatch(value)
    if plain is not None:
        return [plain.group(1) or plain.group(2)]
    budget[0] -= len(value)
    if budget[0] < 0:
        raise RequestError(DENIED, f"header {name.title()}: too long to check ({MAX_PARSED_CHARS} characters "
                                   "in all for sender fields that are not a plain 'Name <address>')")
    unreadable = RequestError(DENIED, f"header {name.title()}: cannot be read as a list of addresses: "
                                      f"{value.strip()[:100]!r}")
    try:
        header = _policy.header_factory(name, value)
    except Exception:  # RecursionError, and the parser's own slips (an AttributeError on some groups)
        raise unreadable from None
    defects = [d for d in header.defects if not isinstance(d, _HARMLESS)]
    if defects or any(not a.username or not a.domain for a in header.addresses):
        raise unreadable
    return [a.addr_spec for a in header.addresses] + _addresses_in(_decoded(value))


def _addresses_in(text: str) -> list[str]:
    return _ADDRESS_LIKE.findall(text) if "@" in text else []


def _decoded(name: str) -> str:
    """A display name as a reader sees it: RFC 2047 encoded-words decoded
    (a composed SEND's name is passed on as given)."""
    if "=?" not in name:
        return name
    try:
        return str(make_header(decode_header(name)))
    except (ValueError, LookupError):
        return name
