"""What a validated SEND is: a `MessageSpec`, the form in which intake
stores a message (as JSON, in the spool) and from which delivery builds its
bytes; and the promises every spec keeps, which validation makes
(validate.py) and building relies on (build.py)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, fields
from typing import NamedTuple


class RequestError(Exception):
    """A request refused with a protocol error code (`ERR code text`)."""

    def __init__(self, code: str, text: str):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


# Raw octets that are not UTF-8 live in str as surrogate escapes (PEP 383)
# from validation to the wire; only raw_base64 can bring them in.
OCTETS = "surrogateescape"
MAX_LINE_OCTETS = 998          # RFC 5322 2.1.1, without the CRLF
# Folding (RFC 5322 3.2.2) only breaks before white space, so the longest
# unbreakable piece is a white-space run plus a word: runs over 64 are made one
# space, ASCII words are capped at 800, and 76 (name) + 2 + 64 + 800 < 998.
MAX_HEADER_WORD = 800
MAX_HEADER_SPACE_RUN = 64
# Multipart boundaries: "=" and "_" never occur in base64, and a 7-bit text
# part containing this marker is sent base64 instead, so the boundary never
# collides with content.
BOUNDARY_MARK = "=_smtpgate_"
# Deleting these from a body's ASCII octets leaves nothing when it is 7bit
# text: 0.5-1.5 ns per character, where the regex class [^\t\n\x20-\x7e]
# took ~8 ns (6-11 us of a 1,000-character body, at intake and at delivery).
_7BIT_TEXT_OCTETS = b"\t\n" + bytes(range(0x20, 0x7f))


def is_7bit_text(body: str) -> bool:
    """True when a body (LF line endings) can go as 7bit: printable ASCII, lines
    of at most 998 octets, no boundary mark."""
    if not body.isascii() or body.encode("ascii").translate(None, _7BIT_TEXT_OCTETS) or BOUNDARY_MARK in body:
        return False
    return len(body) <= MAX_LINE_OCTETS or max(map(len, body.split("\n"))) <= MAX_LINE_OCTETS


class Attachment(NamedTuple):
    filename: str
    content_type: str          # "type/subtype", checked, lower case
    content_base64: str        # checked; line breaks removed if it had any
    content_id: str | None     # without angle brackets; set for inline images


@dataclass(slots=True)
class MessageSpec:
    """A validated SEND: everything build_message needs, stored in the spool as JSON."""
    envelope_from: str
    recipients: list[str]                        # to + cc + bcc, deduplicated, envelope form
    message_id: str                              # "<...@...>"
    date: str                                    # RFC 5322 3.3
    from_: tuple[str, str] = ("", "")            # (display name, address)
    to: list[tuple[str, str]] = field(default_factory=list)
    cc: list[tuple[str, str]] = field(default_factory=list)
    reply_to: list[tuple[str, str]] = field(default_factory=list)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: str | None = None                       # LF line endings; Date/Message-ID present
    smtputf8: bool = False                       # an address or raw header needs SMTPUTF8
    eight_bit: bool = False                      # a raw body has 8-bit octets (8BITMIME)
    idempotency_key: str | None = None
    size_estimate: int = 0                       # upper bound of len(build_message(spec))

    def to_json(self) -> bytes:
        """Serialise for the spool (UTF-8 JSON, one line)."""
        # Not dataclasses.asdict: its deep copy costs 2x validation on the hot path.
        d = {name: getattr(self, name) for name in _SPEC_FIELDS}
        d["attachments"] = [a._asdict() for a in self.attachments]
        d["v"] = 1
        return _JSON_ENCODER.encode(d).encode("utf-8", OCTETS)

    @classmethod
    def from_json(cls, data: bytes | str) -> "MessageSpec":
        """Inverse of to_json."""
        if isinstance(data, bytes):
            data = data.decode("utf-8", OCTETS)
        d = json.loads(data)
        d.pop("v", None)
        d["from_"] = tuple(d["from_"])
        # Most of these lists are empty (a message has no Cc, no attachment):
        # the JSON's own empty list does, without a comprehension each.
        for key in ("to", "cc", "reply_to", "headers"):
            if d[key]:
                d[key] = [tuple(pair) for pair in d[key]]
        if d["attachments"]:
            d["attachments"] = [Attachment(**a) for a in d["attachments"]]
        return cls(**d)


_SPEC_FIELDS = tuple(f.name for f in fields(MessageSpec))
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def raw_send(sender: str, recipients: list[str], data: bytes) -> dict:
    """The SEND object (PROTOCOL.md) for raw message octets, as the SMTP door
    and `smtpgate sendmail` hand them over: `raw` when they are UTF-8, else
    `raw_base64`, so no octet is changed."""
    try:
        return {"from": sender, "to": recipients, "raw": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"from": sender, "to": recipients, "raw_base64": base64.b64encode(data).decode("ascii")}
