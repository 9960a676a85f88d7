"""SEND validation, at intake.

`validate_send(obj)` checks every field of a SEND object (PROTOCOL.md, SEND)
and returns a `MessageSpec` with its Date and Message-ID fixed, so a rebuild
on retry gives the same headers. Everything that could make the build fail or
inject a header is refused here: `build.build_message(spec)` never sees an
unvalidated field and cannot fail on a spec that validation returned.

Why two steps: even a fast build costs more than validating, and the
hand-off budget is 0.5 ms, so intake validates (~13-20 us for a text
message; bench/message_bench.py, figures in build.py) and the delivery
worker builds.
"""

from __future__ import annotations

import binascii
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime

from smtpgate.message import sendmail
from smtpgate.message.spec import (
    MAX_HEADER_SPACE_RUN, MAX_HEADER_WORD, MAX_LINE_OCTETS, OCTETS, Attachment, MessageSpec,
    RequestError, is_7bit_text,
)
from smtpgate.protocol.codes import BAD_ADDRESS, BAD_HEADER, BAD_REQUEST, TOO_LARGE
from smtpgate.spool.ulid import new_ulid

# ---------------------------------------------------------------- limits

MAX_RECIPIENTS = 1000          # RFC 5321 4.5.3.1.8 asks servers for >= 100; we relay up to this
MAX_NAME_CHARS = 200           # display names: an ASCII name stays one foldable quoted string
MAX_SUBJECT_CHARS = 4000       # encoded-words split it into folded lines of <= 78
MAX_HEADER_VALUE_CHARS = 4000
MAX_HEADERS = 100
MAX_FILENAME_OCTETS = 255      # RFC 2231 percent-encoding triples this: 765 + params < 998
MAX_CONTENT_ID = 200
MAX_IDEMPOTENCY_KEY = 200      # PROTOCOL.md
# RFC 5321 4.5.3.1.1-3: local part 64 octets, domain 255, a path 256 with
# its angle brackets, so an address is at most 254.
MAX_LOCAL_OCTETS, MAX_DOMAIN_OCTETS, MAX_ADDRESS_OCTETS = 64, 255, 254


def over_max_message_size(what: str, size: int, limit: int) -> str:
    """The TOO_LARGE text: how large, the limit and the key that sets it."""
    mib = 1024 * 1024
    return (f"{what} would be up to {size} bytes ({size / mib:.1f} MiB), over "
            f"max_message_size = {limit} ({limit / mib:.1f} MiB)")


# ---------------------------------------------------------------- characters

# Header text (names, subject, values): C0 controls except TAB, DEL, C1
# (U+0085 NEL included), U+2028/2029 (line and paragraph separators: Python's
# str.splitlines() and some mail readers break lines there) and lone
# surrogates (json.loads yields them from "\ud800"; they cannot be encoded).
_BAD_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_BAD_NAME = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")   # TAB too
_BAD_BODY = re.compile("[\x00\ud800-\udfff]")   # NUL is never allowed in a body (RFC 5322 2.3)

# RFC 5322 3.2.3 atext, plus UTF8-non-ascii (RFC 6531 3.3) for internationalised
# local parts, minus C1, NBSP, separators and surrogates.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_UTEXT = "\u00a1-\u2027\u202f-\ud7ff\ue000-\U0010ffff"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ASCII_ADDRESS = re.compile(rf"([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LABEL}(?:\.{_LABEL})*)")
_INTL_ADDRESS = re.compile(rf"([{_ATEXT}{_UTEXT}]+(?:\.[{_ATEXT}{_UTEXT}]+)*)@([^@\s]+)")
_ASCII_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")   # RFC 5322 3.6.8 ftext; name + ": " fits 78
_MSG_ID = re.compile(r"<[!-;=?A-~]{1,250}@[!-;=?A-~]{1,250}>")   # no <, >, space, @ inside
_CONTENT_ID = re.compile(r"[!-;=?-~]{1,%d}" % MAX_CONTENT_ID)   # printable, no <, >, space
_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"   # RFC 6838 4.2
_MIME_TYPE = re.compile(rf"({_RESTRICTED_NAME})/({_RESTRICTED_NAME})")
_RAW_HEADER_LINE = re.compile(r"[!-9;-~]+[ \t]*:")
_RAW_DATE = re.compile(r"^date[ \t]*:", re.I | re.M)
_RAW_MSG_ID = re.compile(r"^message-id[ \t]*:[ \t]*(.*)$", re.I | re.M)
_LONG_LINE = re.compile(rb"[^\n]{%d}" % (MAX_LINE_OCTETS + 1))
_SPACES = re.compile(" {2,}")
_LONG_SPACE_RUN = re.compile(r"[ \t]{%d,}" % (MAX_HEADER_SPACE_RUN + 1))
_SPACE_RUN = re.compile(r"[ \t]+")
_B64_SPACE = re.compile(r"[ \t\r\n]+")

_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "reply_to", "subject", "text", "html",
    "attachments", "headers", "raw", "raw_base64", "idempotency_key", "sendmail",
})
_RAW_EXCLUDES = ("reply_to", "subject", "text", "html", "attachments", "headers")
_ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content_base64", "content_id"})

# Extra headers that the fields own, or that describe the MIME structure we
# build: setting them through `headers` would duplicate or contradict ours.
_FIELD_HEADERS = {
    "from": "from", "to": "to", "cc": "cc", "bcc": "bcc", "reply-to": "reply_to",
    "subject": "subject",
}
_OWN_HEADERS = frozenset({"date", "mime-version"})


# ---------------------------------------------------------------- validation

@dataclass(slots=True)
class _Addresses:
    """The sender and the recipients of a SEND, checked."""

    sender: tuple[str, str]              # (display name, address)
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    recipients: list[str]                # to + cc + bcc, deduplicated: the envelope
    smtputf8: bool                       # an address needs SMTPUTF8


def validate_send(obj: dict, *, max_message_bytes: int, now: float | datetime | None = None,
                  message_id_domain: str | None = None) -> MessageSpec:
    """Check a decoded SEND object and return its MessageSpec; raise RequestError.

    The fields are checked in a fixed order, so the error a bad SEND gets
    does not depend on the order of its JSON keys: unknown fields, sender,
    recipients, idempotency key, then the raw message or, for a composed
    one, reply_to, subject, headers, bodies, attachments and its size."""
    if not isinstance(obj, dict):
        raise RequestError(BAD_REQUEST, "SEND needs one JSON object")
    unknown = obj.keys() - _FIELDS
    if unknown:
        raise RequestError(BAD_REQUEST, f"unknown field {sorted(unknown)[0]!r}")
    if obj.get("sendmail") is not None:
        # The sendmail rules read the message to decide the envelope, so the
        # raw message comes first here (message/sendmail.py).
        raw, octets_ok = _raw_text(obj)
        obj, raw = sendmail.resolve(obj, raw)
        addresses = _addresses(obj)
    else:
        addresses = _addresses(obj)
        raw, octets_ok = _raw_text(obj)
    key = _idempotency_key(obj.get("idempotency_key"))
    date = _format_date(now)
    id_domain = message_id_domain or _ascii_domain(addresses.sender[1])
    if raw is not None:
        return _validate_raw(raw, addresses.sender[1], addresses.recipients, addresses.smtputf8, key, date,
                             id_domain, max_message_bytes, octets_ok=octets_ok)
    return _validate_composed(obj, addresses, key, date, id_domain, max_message_bytes)


def _addresses(obj: dict) -> _Addresses:
    """`from`, `to`, `cc` and `bcc`: parsed, checked, the recipients deduplicated."""
    sender = obj.get("from")
    if sender is None:
        raise RequestError(BAD_REQUEST, "field 'from' is required")
    if not isinstance(sender, str):
        raise RequestError(BAD_REQUEST, "field 'from' must be a string")
    from_name, from_addr, smtputf8 = _mailbox(sender, "from")

    seen: set[str] = set()
    recipients: list[str] = []
    lists = {key: _string_list(obj.get(key), key) for key in ("to", "cc", "bcc")}
    if sum(map(len, lists.values())) > MAX_RECIPIENTS:   # before parsing thousands
        raise RequestError(BAD_REQUEST, f"more than {MAX_RECIPIENTS} recipients")
    for key in ("to", "cc", "bcc"):
        mailboxes = []
        for value in lists[key]:
            name, addr, intl = _mailbox(value, key)
            smtputf8 |= intl
            mailboxes.append((name, addr))
            dedup = _dedup_key(addr)
            if dedup not in seen:
                seen.add(dedup)
                recipients.append(addr)
        lists[key] = mailboxes
    if not recipients:
        raise RequestError(BAD_REQUEST, "no recipient: give 'to', 'cc' or 'bcc'")
    if len(recipients) > MAX_RECIPIENTS:
        raise RequestError(BAD_REQUEST, f"more than {MAX_RECIPIENTS} recipients")
    return _Addresses((from_name, from_addr), lists["to"], lists["cc"], recipients, smtputf8)


def _idempotency_key(key) -> str | None:
    if key is not None:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise RequestError(BAD_REQUEST, f"'idempotency_key' must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


def _raw_text(obj: dict) -> tuple[str | None, bool]:
    """A raw SEND's message as text (None for a composed one), and whether it
    came as raw_base64 (then octets that are not UTF-8 are kept, as surrogate
    escapes)."""
    raw = obj.get("raw")
    raw_base64 = obj.get("raw_base64")
    if raw is not None and raw_base64 is not None:
        raise RequestError(BAD_REQUEST, "give 'raw' or 'raw_base64', not both")
    if raw_base64 is not None:
        # A raw message that is not UTF-8 (legacy 8-bit charsets such as GBK
        # or ISO-8859-1 that PHP's mail() passes on): its octets travel as
        # base64 and are kept exactly, as surrogate escapes in the spec.
        if not isinstance(raw_base64, str):
            raise RequestError(BAD_REQUEST, "field 'raw_base64' must be a string")
        try:
            raw = binascii.a2b_base64(_B64_SPACE.sub("", raw_base64), strict_mode=True)
        except (binascii.Error, ValueError):
            raise RequestError(BAD_REQUEST, "field 'raw_base64' is not valid base64") from None
        raw = raw.decode("utf-8", OCTETS)
    if raw is not None:
        for name in _RAW_EXCLUDES:
            if obj.get(name) is not None:
                raise RequestError(BAD_REQUEST, f"'raw' excludes '{name}': put it in the raw message")
    return raw, raw_base64 is not None


def _validate_composed(obj: dict, addresses: _Addresses, key: str | None, date: str, id_domain: str,
                       max_message_bytes: int) -> MessageSpec:
    """A message smtpgate composes from fields (subject, text, html, attachments, headers)."""
    get = obj.get
    smtputf8 = addresses.smtputf8
    reply_to = []
    for value in _string_list(get("reply_to"), "reply_to"):
        name, addr, intl = _mailbox(value, "reply_to")
        smtputf8 |= intl
        reply_to.append((name, addr))

    # Header-ish sizes: encoded-words grow UTF-8 by 4/3 plus ~12 octets per
    # 75, folding adds 3 per 78: twice the UTF-8 length bounds it.
    from_name, from_addr = addresses.sender
    size = 1024 + 2 * (len(from_name) * 4 + len(from_addr)) + 8 * len(addresses.recipients)
    for name, addr in addresses.to + addresses.cc + reply_to:
        size += 2 * (len(name) * 4 + len(addr)) + 4

    subject = _subject(get("subject"))
    if subject is not None:
        size += 8 * len(subject)

    message_id = None
    headers = []
    extra = get("headers")
    if extra is not None:
        headers, message_id, extra_octets = _extra_headers(extra)
        size += extra_octets
    if message_id is None:
        message_id = _new_message_id(id_domain)

    text = get("text")
    html = get("html")
    if text is not None:
        text = _normalise_body(text, "text")
        size += _text_part_size(text, "text")
    if html is not None:
        html = _normalise_body(html, "html")
        size += _text_part_size(html, "html")
    attachments = []
    raw_attachments = get("attachments")
    if raw_attachments is not None:
        attachments, attachment_octets = _attachments(raw_attachments)
        size += attachment_octets
    if size > max_message_bytes:
        # Attachments count as base64, 4/3 of their size: a 20 MB file is 27 MB.
        raise RequestError(TOO_LARGE, over_max_message_size("the message", size, max_message_bytes)
                           + "; attachments count in base64, 4/3 of their size")

    return MessageSpec(
        envelope_from=from_addr, recipients=addresses.recipients, message_id=message_id, date=date,
        from_=addresses.sender, to=addresses.to, cc=addresses.cc, reply_to=reply_to,
        subject=subject, text=text, html=html, attachments=attachments, headers=headers,
        smtputf8=smtputf8, idempotency_key=key, size_estimate=size,
    )


def _subject(subject) -> str | None:
    if subject is None:
        return None
    if not isinstance(subject, str):
        raise RequestError(BAD_REQUEST, "field 'subject' must be a string")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise RequestError(BAD_HEADER, f"subject longer than {MAX_SUBJECT_CHARS} characters")
    if _BAD_TEXT.search(subject):
        raise RequestError(BAD_HEADER, "subject contains a control character or line break")
    return _foldable(subject)


def _string_list(value, name: str) -> list:
    """A field that is a string or an array of strings, as a list (None -> [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise RequestError(BAD_REQUEST, f"field '{name}' must be a string or an array of strings")


def _mailbox(value: str, field_name: str) -> tuple[str, str, bool]:
    """Parse `addr` or `Name <addr>` -> (name, envelope address, needs SMTPUTF8)."""
    value = value.strip(" \t")
    name = ""
    if value.endswith(">"):
        lt = value.rfind("<")
        if lt < 0:
            raise RequestError(BAD_ADDRESS, f"{field_name}: unbalanced '>' in {value[:100]!r}")
        name = value[:lt].strip(" \t")
        value = value[lt + 1:-1]
        if len(name) >= 2 and name[0] == '"' and name[-1] == '"':
            name = re.sub(r'\\(.)', r"\1", name[1:-1])
        elif "<" in name or ">" in name:
            raise RequestError(BAD_ADDRESS, f"{field_name}: unbalanced '<' in {value[:100]!r}")
        name = _SPACES.sub(" ", name).strip(" ")  # runs of spaces could fold into blank lines
        if len(name) > MAX_NAME_CHARS:
            raise RequestError(BAD_HEADER, f"{field_name}: display name longer than {MAX_NAME_CHARS} characters")
        if _BAD_NAME.search(name):
            raise RequestError(BAD_HEADER, f"{field_name}: display name contains a control character or line break")
    addr, intl = _address(value, field_name)
    return name, addr, intl


def _address(value: str, field_name: str) -> tuple[str, bool]:
    """Check an addr-spec; return it (domain IDNA-encoded when the local part is ASCII)
    and whether it needs SMTPUTF8. Quoted local parts and address literals are refused."""
    m = _ASCII_ADDRESS.fullmatch(value)
    if m is not None:
        local, domain = m.groups()
        intl = False
    else:
        m = _INTL_ADDRESS.fullmatch(value)
        if m is None:
            raise RequestError(BAD_ADDRESS, f"{field_name}: not an address: {value[:100]!r}")
        local, domain = m.groups()
        if not domain.isascii():
            try:
                a_domain = domain.encode("idna").decode("ascii")
            except UnicodeError:
                raise RequestError(BAD_ADDRESS, f"{field_name}: bad domain in {value[:100]!r}") from None
        else:
            a_domain = domain
        if not _ASCII_DOMAIN.fullmatch(a_domain):
            raise RequestError(BAD_ADDRESS, f"{field_name}: bad domain in {value[:100]!r}")
        intl = not local.isascii()
        if not intl:
            domain = a_domain          # an ASCII mailbox at an IDN: plain SMTP works
        elif not domain.isascii():
            # SMTPUTF8 keeps U-labels, normalised (IDNA maps "。" to "." and case).
            domain = a_domain.encode("ascii").decode("idna")
    if len(local.encode()) > MAX_LOCAL_OCTETS:
        raise RequestError(BAD_ADDRESS, f"{field_name}: local part over {MAX_LOCAL_OCTETS} octets")
    addr = f"{local}@{domain}"
    if len(domain) > MAX_DOMAIN_OCTETS or len(addr.encode()) > MAX_ADDRESS_OCTETS:
        raise RequestError(BAD_ADDRESS, f"{field_name}: address over {MAX_ADDRESS_OCTETS} octets")
    return addr, intl


def check_address(value: str, field_name: str) -> None:
    """Raise RequestError(BAD_ADDRESS) for an envelope address a SEND would
    refuse (the SMTP door asks at MAIL and RCPT, not first at the end of
    DATA, where one bad recipient failed the whole message)."""
    _address(value, field_name)


def _dedup_key(addr: str) -> str:
    local, _, domain = addr.rpartition("@")
    return f"{local}@{domain.lower()}"


def _ascii_domain(addr: str) -> str:
    domain = addr.rpartition("@")[2]
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


_date_cache: tuple[int, str] = (-1, "")


def _format_date(now: float | datetime | None) -> str:
    """RFC 5322 3.3 date in UTC ("+0000"), cached per second (it is on the hot path)."""
    global _date_cache
    if isinstance(now, datetime):
        return format_datetime(now.astimezone(timezone.utc))
    ts = int(time.time() if now is None else now)
    if _date_cache[0] != ts:
        _date_cache = (ts, format_datetime(datetime.fromtimestamp(ts, timezone.utc)))
    return _date_cache[1]


def _new_message_id(domain: str) -> str:
    """A new RFC 5322 3.6.4 msg-id `<ULID@domain>`."""
    return f"<{new_ulid(time.time())}@{domain}>"


def _extra_headers(extra) -> tuple[list[tuple[str, str]], str | None, int]:
    """Check `headers`; return (pairs, a Message-ID given there or None, size bound)."""
    if not isinstance(extra, dict):
        raise RequestError(BAD_REQUEST, "field 'headers' must be an object of strings")
    if len(extra) > MAX_HEADERS:
        raise RequestError(BAD_HEADER, f"more than {MAX_HEADERS} extra headers")
    pairs, message_id, octets = [], None, 0
    for name, value in extra.items():
        if not _HEADER_NAME.fullmatch(name):
            raise RequestError(BAD_HEADER, f"bad header name {name[:80]!r}")
        lower = name.lower()
        if lower in _FIELD_HEADERS:
            raise RequestError(BAD_HEADER, f"set {name} with the '{_FIELD_HEADERS[lower]}' field, not in 'headers'")
        if lower in _OWN_HEADERS or lower.startswith("content-"):
            raise RequestError(BAD_HEADER, f"{name} is set by smtpgate and cannot be given in 'headers'")
        if not isinstance(value, str):
            raise RequestError(BAD_REQUEST, f"header {name} must have a string value")
        if len(value) > MAX_HEADER_VALUE_CHARS:
            raise RequestError(BAD_HEADER, f"header {name} longer than {MAX_HEADER_VALUE_CHARS} characters")
        if _BAD_TEXT.search(value):
            raise RequestError(BAD_HEADER, f"header {name} contains a control character or line break")
        value = _foldable(value)
        if value.isascii() and len(value) > MAX_HEADER_WORD and max(map(len, value.split()), default=0) > MAX_HEADER_WORD:
            raise RequestError(BAD_HEADER, f"header {name} has a word over {MAX_HEADER_WORD} characters: it cannot be folded")
        if lower == "message-id":
            value = value.strip(" \t")
            if not _MSG_ID.fullmatch(value):
                raise RequestError(BAD_HEADER, "Message-ID must look like <left@right>")
            message_id = value
            continue
        pairs.append((name, value))
        octets += len(name) + 8 * len(value) + 4
    return pairs, message_id, octets


def _foldable(value: str) -> str:
    """A header text with white-space runs over MAX_HEADER_SPACE_RUN made one
    space, so folding can always keep lines short (see MAX_HEADER_WORD)."""
    if len(value) > MAX_HEADER_SPACE_RUN and _LONG_SPACE_RUN.search(value):
        return _SPACE_RUN.sub(" ", value)
    return value


def _text_part_size(body: str, name: str) -> int:
    """Check a text/html body (line endings already LF); return an upper bound of
    its built size, part headers included."""
    # The regex scans ~7 ns per character: only text that is not ASCII can
    # hold a surrogate, and NUL is a substring search.
    if "\x00" in body or (not body.isascii() and _BAD_BODY.search(body)):
        raise RequestError(BAD_REQUEST, f"field '{name}' contains NUL or an unpaired surrogate")
    if is_7bit_text(body):
        return 200 + len(body) + body.count("\n") + 2       # LF -> CRLF
    return 200 + _base64_size(len(body.encode("utf-8")) + body.count("\n"))  # CRLF inside


def _normalise_body(body, name: str) -> str:
    """A body field with its line endings made LF (CRLF when built)."""
    if not isinstance(body, str):
        raise RequestError(BAD_REQUEST, f"field '{name}' must be a string")
    if "\r" in body:
        body = body.replace("\r\n", "\n").replace("\r", "\n")
    return body


def _base64_size(n: int) -> int:
    """Octets of n bytes in base64 with 76-character lines and CRLF (RFC 2045 6.8)."""
    encoded = 4 * ((n + 2) // 3)
    return encoded + 2 * ((encoded + 75) // 76)


def _attachments(items) -> tuple[list[Attachment], int]:
    """Check `attachments`; return them and an upper bound of their built size."""
    if not isinstance(items, list):
        raise RequestError(BAD_REQUEST, "field 'attachments' must be an array of objects")
    out, octets = [], 0
    for i, item in enumerate(items):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise RequestError(BAD_REQUEST, f"{where} must be an object")
        unknown = item.keys() - _ATTACHMENT_FIELDS
        if unknown:
            raise RequestError(BAD_REQUEST, f"{where}: unknown field {sorted(unknown)[0]!r}")
        filename = item.get("filename")
        ctype = item.get("content_type") or "application/octet-stream"
        content = item.get("content_base64")
        cid = item.get("content_id")
        if not isinstance(filename, str) or not filename:
            raise RequestError(BAD_REQUEST, f"{where}: 'filename' must be a non-empty string")
        if _BAD_NAME.search(filename):
            raise RequestError(BAD_HEADER, f"{where}: filename contains a control character or line break")
        filename = _SPACES.sub(" ", filename)   # runs of spaces could fold into blank lines
        if len(filename.encode("utf-8")) > MAX_FILENAME_OCTETS:
            raise RequestError(BAD_HEADER, f"{where}: filename over {MAX_FILENAME_OCTETS} octets")
        if not isinstance(ctype, str):
            raise RequestError(BAD_REQUEST, f"{where}: 'content_type' must be a string")
        if _BAD_NAME.search(ctype):  # it ends up in a header, like the filename
            raise RequestError(BAD_HEADER, f"{where}: content_type contains a control character or line break")
        if not (m := _MIME_TYPE.fullmatch(ctype)):
            raise RequestError(BAD_REQUEST, f"{where}: 'content_type' must be type/subtype without parameters")
        if m.group(1).lower() in ("multipart", "message"):
            # RFC 2045 6.4 / RFC 2046 5.2.1: these may not be base64-encoded.
            raise RequestError(BAD_REQUEST, f"{where}: {ctype} cannot be attached; use application/octet-stream")
        if not isinstance(content, str):
            raise RequestError(BAD_REQUEST, f"{where}: 'content_base64' must be a string")
        try:
            decoded = binascii.a2b_base64(content, strict_mode=True)
        except (binascii.Error, ValueError):
            # Encoders like PHP's chunk_split() add line breaks: allow whitespace only.
            content = _B64_SPACE.sub("", content)
            try:
                decoded = binascii.a2b_base64(content, strict_mode=True)
            except (binascii.Error, ValueError):
                raise RequestError(BAD_REQUEST, f"{where}: 'content_base64' is not valid base64") from None
        if cid is not None:
            if not isinstance(cid, str):
                raise RequestError(BAD_REQUEST, f"{where}: 'content_id' must be a string")
            if cid.startswith("<") and cid.endswith(">"):
                cid = cid[1:-1]
            if not _CONTENT_ID.fullmatch(cid):
                raise RequestError(BAD_HEADER, f"{where}: 'content_id' must be printable ASCII without <, > or spaces")
        out.append(Attachment(filename, ctype.lower(), content, cid))
        octets += 400 + 3 * len(filename.encode("utf-8")) + _base64_size(len(decoded))
    return out, octets


def _validate_raw(raw, envelope_from, recipients, smtputf8, key, date, id_domain, max_message_bytes,
                  octets_ok: bool = False) -> MessageSpec:
    """Check a raw message, normalise its line endings to LF (CRLF when built) and
    add Date and Message-ID when missing. With octets_ok, non-UTF-8 octets
    (surrogate escapes from raw_base64) are kept as they are."""
    if not isinstance(raw, str):
        raise RequestError(BAD_REQUEST, "field 'raw' must be a string")
    if "\x00" in raw:
        raise RequestError(BAD_REQUEST, "raw message contains NUL")
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    try:
        data = raw.encode("utf-8", OCTETS if octets_ok else "strict")
    except UnicodeEncodeError:
        raise RequestError(BAD_REQUEST, "raw message contains an unpaired surrogate") from None
    size = len(data) + 2 * raw.count("\n") + 200
    if size > max_message_bytes:
        raise RequestError(TOO_LARGE, over_max_message_size("the raw message", size, max_message_bytes))
    if _LONG_LINE.search(data):
        raise RequestError(TOO_LARGE, f"raw message has a line over {MAX_LINE_OCTETS} octets (RFC 5322 2.1.1); "
                                      "encode long lines as quoted-printable or base64")
    end = raw.find("\n\n")
    head = raw if end < 0 else raw[:end + 1]
    if not _RAW_HEADER_LINE.match(head):
        raise RequestError(BAD_REQUEST, "raw message does not start with a header field")
    # Added fields go last in the header: trace fields (Received:, put on by
    # the SMTP door) must stay on top (RFC 5321 4.4, RFC 5322 3.6.7).
    added = ""
    if not _RAW_DATE.search(head):
        added += f"Date: {date}\n"
    m = _RAW_MSG_ID.search(head)
    if m is None:
        message_id = _new_message_id(id_domain)
        added += f"Message-ID: {message_id}\n"
    else:
        message_id = m.group(1).strip()
    if not raw.endswith("\n"):
        raw += "\n"
    body = "" if end < 0 else raw[end + 2:]
    if added:
        raw = head + added + raw[len(head):]
    return MessageSpec(
        envelope_from=envelope_from, recipients=recipients, message_id=message_id, date=date,
        raw=raw, smtputf8=smtputf8 or not head.isascii(), eight_bit=not body.isascii(),
        idempotency_key=key, size_estimate=len(data) + len(added) + 2 * raw.count("\n") + 2,
    )
