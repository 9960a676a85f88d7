"""A SEND's `sendmail` field: a message handed over as sendmail(8) takes
one, turned into the plain raw SEND the rest of validation checks.

The sendmail-compatible commands (`smtpgate sendmail` in Python and
`smtpgate-sendmail` in C) parse their command line and read stdin; what
needs the message's header (the recipients of -t from To, Cc and Bcc, Bcc
removed; the sender from From; a From field for a message without one) is
done here, once, so that both commands behave alike and no C code parses
RFC 5322 addresses.

    {"raw": "...", "sendmail": {"extract_recipients": true, "recipients": ["ops@example.org"],
     "sender": "bounce@example.com", "full_name": null, "default_sender": "www-data@web1"}}
"""

from __future__ import annotations

import re
from email.utils import formataddr, getaddresses

from smtpgate.message.spec import RequestError
from smtpgate.protocol.codes import BAD_REQUEST

MAX_WORDS = 1000         # command-line recipient words, as MAX_RECIPIENTS
MAX_WORD_CHARS = 4000    # one word may hold a list ("a@x, B <b@y>")
MAX_NAME_CHARS = 200     # -F, as display names in `from`

_KEYS = {"extract_recipients": bool, "recipients": list, "sender": str, "full_name": str,
         "default_sender": str}
# Fields the sendmail rules decide; a SEND with `sendmail` must not give them.
_DECIDED = ("from", "to", "cc", "bcc")

_FIELD_NAME = re.compile(r"[!-9;-~]+[ \t]*:")  # RFC 5322 2.2 (and obs- space before the colon)
# -F becomes a display name: no control characters (a line break would
# start a header of the caller's choosing).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def resolve(obj: dict, message: str | None) -> tuple[dict, str]:
    """A SEND with `sendmail` and its raw message as text, as a plain raw
    SEND: (the object with `from` and `to` set, the message), as the
    sendmail rules make them (docs/protocol.md, sendmail). Raises
    RequestError(BAD_REQUEST) for a malformed `sendmail` field."""
    if message is None:
        raise RequestError(BAD_REQUEST, "'sendmail' needs the message in 'raw' or 'raw_base64'")
    opts = obj["sendmail"]
    if not isinstance(opts, dict):
        raise RequestError(BAD_REQUEST, "field 'sendmail' must be an object")
    for key, value in opts.items():
        kind = _KEYS.get(key)
        if kind is None:
            raise RequestError(BAD_REQUEST, f"unknown key {key!r} in 'sendmail'")
        if value is not None and not isinstance(value, kind):
            raise RequestError(BAD_REQUEST, f"'sendmail.{key}' must be a {kind.__name__}")
    for name in _DECIDED:
        if obj.get(name) is not None:
            raise RequestError(BAD_REQUEST, f"'sendmail' excludes '{name}': the sendmail rules decide it")
    words = opts.get("recipients") or []
    if len(words) > MAX_WORDS or not all(isinstance(w, str) and len(w) <= MAX_WORD_CHARS for w in words):
        raise RequestError(BAD_REQUEST, f"'sendmail.recipients' must be at most {MAX_WORDS} strings "
                                        f"of at most {MAX_WORD_CHARS} characters")
    full_name = opts.get("full_name")
    if full_name and (_CONTROL.search(full_name) or len(full_name) > MAX_NAME_CHARS):
        raise RequestError(BAD_REQUEST, f"'sendmail.full_name' must be at most {MAX_NAME_CHARS} characters "
                                        "without control characters or line breaks")
    if not opts.get("default_sender"):
        raise RequestError(BAD_REQUEST, "'sendmail.default_sender' is required (user@host)")

    sender, recipients, message = prepare(message, words, bool(opts.get("extract_recipients")),
                                          opts.get("sender"), full_name, opts["default_sender"])
    plain = {k: v for k, v in obj.items() if k != "sendmail"}
    plain["from"], plain["to"] = sender, recipients
    return plain, message


def prepare(message: str, words: list[str], extract: bool, sender_arg: str | None,
            full_name: str | None, default_sender: str) -> tuple[str, list[str], str]:
    """(envelope sender, recipients, message) by sendmail's rules.

    -t takes the recipients from To, Cc and Bcc (added to those on the
    command line, as Postfix does) and removes Bcc from the message. The
    sender is -f, else the From field's address, else user@host. A message
    without From gets one built from -F and the sender.
    """
    header, body = split_header(message)
    fields = header_fields(header)
    recipients = addresses(words)
    if extract:
        recipients += addresses([v for name, v, _ in fields if name in ("to", "cc", "bcc")])
        header = [line for name, _, raw in fields if name != "bcc" for line in raw]
    from_values = [v for name, v, _ in fields if name == "from"]
    # -f "Name <a@b>" and -f "<a@b>" both mean a@b; -f "" or "<>" (the null
    # sender of bounces) is not something a relay account may send as.
    sender = (next(iter(addresses([sender_arg or ""])), None)
              or next(iter(addresses(from_values)), None) or default_sender)
    if not from_values:
        newline = "\r\n" if "\r\n" in message[:1000] else "\n"
        header.insert(0, f"From: {formataddr((full_name or '', sender))}{newline}")
    return sender, list(dict.fromkeys(recipients)), "".join(header) + body


def split_header(text: str) -> tuple[list[str], str]:
    """(header lines with their line endings, the rest from the blank line on).

    As sendmail does, the header also ends at the first line that is neither
    a field nor a continuation; the blank line the message lacked is added.
    """
    # Lines end at LF only: str.splitlines() also splits at FF, VT, NEL and
    # U+2028, which a header may carry as text.
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    if not lines[-1]:
        lines.pop()
    for index, line in enumerate(lines):
        if line in ("\n", "\r\n"):
            return lines[:index], "".join(lines[index:])
        if not _FIELD_NAME.match(line) and not (index and line[:1] in (" ", "\t")):
            newline = "\r\n" if line.endswith("\r\n") else "\n"
            return lines[:index], newline + "".join(lines[index:])
    return lines, ""


def header_fields(lines: list[str]) -> list[tuple[str, str, list[str]]]:
    """Group header lines into fields: (lower-case name, unfolded value, raw lines).

    A line starting with white space continues the field before it
    (RFC 5322 2.2.3, folding).
    """
    fields: list[tuple[str, str, list[str]]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and fields:
            name, value, raw = fields[-1]
            fields[-1] = (name, value + " " + line.strip(), raw + [line])
        else:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip(), [line]))
    return fields


def addresses(values: list[str]) -> list[str]:
    """The bare addresses in header values or command-line words ("a@x, B <b@y>")."""
    return [addr for _, addr in getaddresses(values) if addr]
