"""Building a message's bytes from its spec, at delivery.

How the bytes are built. `EmailMessage` with `policy.SMTP` costs ~700-900 us
for a simple message here and the compat32 `email.mime` classes with their
generator ~90-300 us: too slow for a delivery path that must build thousands
of messages a second. The MIME tree is defined once with compat32
(`_mime_tree`, written by the email package's generator); `_fast_body` writes
the same tree directly with the package's encoders (base64mime, RFC 2231
parameters), byte for byte what the generator gives (the tests compare both
on every message they build, fuzzed ones included), and leaves the rare part
whose header the generator would fold to the generator. Top-level headers are
written here with RFC 2047 encoded-words, because compat32 would turn an
internationalised address (RFC 6532, SMTPUTF8) into encoded-words, which
RFC 2047 section 5 forbids in an addr-spec.

Measured with `python3 bench/message_bench.py 5 2000` (2-core VM shared with
other work, Python 3.11.7, medians of 5 runs, 2026-11-26), in microseconds,
validate / build / the same message with EmailMessage+policy.SMTP:
simple text 17.8 / 3.5 / 1592; UTF-8 text+html 21.0 / 18.7 / 2250;
text+html+10 KiB attachment 56.9 / 98.6 / 2505. (On a quiet moment the
reference took 699 us and validation 12.7 us: the machine was loaded.)

Line lengths (RFC 5322 2.1.1: at most 998 octets + CRLF): header values are
folded at 78 columns; encoded-words are at most 75 characters (RFC 2047 2);
text that is not 7-bit clean with short lines is sent base64 (lines of 76),
attachments always base64; names, filenames and header words are capped
(validate.py) so that no unfoldable piece can reach 998.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from email.base64mime import header_encode
from email.charset import Charset
from email.generator import BytesGenerator
from email.header import Header
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email import policy as email_policy
from email.utils import encode_rfc2231, quote

from smtpgate.message.spec import BOUNDARY_MARK, MAX_HEADER_WORD, OCTETS, Attachment, MessageSpec, is_7bit_text

# ASCII names with RFC 5322 specials are quoted. ASCII text that already holds
# encoded-words (PHP's mb_encode_mimeheader output) is passed on as is, so
# readers decode it as the caller meant.
_QUOTE_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
_POLICY = email_policy.compat32.clone(linesep="\r\n", max_line_length=78)
_UTF8 = Charset("utf-8")            # text bodies that are not 7-bit: base64
_CRLF = "\r\n"
_LF = "\n"


def build_message(spec: MessageSpec) -> bytes:
    """Return the RFC 5322 bytes of a validated spec, CRLF line endings, ready for DATA."""
    if spec.raw is not None:
        return spec.raw.replace("\n", "\r\n").encode("utf-8", OCTETS)
    out = [_address_header("From", [spec.from_])]
    if spec.to:
        out.append(_address_header("To", spec.to))
    if spec.cc:
        out.append(_address_header("Cc", spec.cc))
    if not spec.to and not spec.cc:
        # Only Bcc recipients: an empty group says so (RFC 5322 3.4, A.1.3)
        # instead of leaving readers and spam filters without a To.
        out.append("To: undisclosed-recipients:;\r\n")
    if spec.reply_to:
        out.append(_address_header("Reply-To", spec.reply_to))
    if spec.subject is not None:
        out.append(_text_header("Subject", spec.subject, unstructured=True))
    out.append(f"Date: {spec.date}\r\n")
    out.append(f"Message-ID: {spec.message_id}\r\n")
    for name, value in spec.headers:
        out.append(_text_header(name, value, unstructured=False))
    head = "".join(out).encode("utf-8")
    body = _fast_body(spec)
    data = head + (body if body is not None else _generated_body(spec))
    # DATA ends with CRLF "." CRLF (RFC 5321 4.1.1.4): a body without a final
    # line break gets one here rather than from each SMTP client.
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _generated_body(spec: MessageSpec) -> bytes:
    """The MIME part(s) of a message, written by the email package's generator."""
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, policy=_POLICY).flatten(_mime_tree(spec))
    return buf.getvalue()


def _boundary_base(spec: MessageSpec) -> str:
    """Boundaries derived from the Message-ID (a rebuild gives the same bytes), short
    enough that `Content-Type: multipart/alternative; boundary="..."` fits 78 columns."""
    digest = hashlib.blake2s(spec.message_id.encode("utf-8"), digest_size=9).digest()
    return BOUNDARY_MARK + base64.b32encode(digest).decode("ascii")[:12]


def _mime_tree(spec: MessageSpec):
    """The MIME body: alternative(text, html) inside related(+inline) inside mixed(+files)."""
    boundary_base = _boundary_base(spec)
    parts = []
    if spec.text is not None or spec.html is None:
        parts.append(_text_part(spec.text or "", "plain"))
    if spec.html is not None:
        parts.append(_text_part(spec.html, "html"))
    body = parts[0] if len(parts) == 1 else _multipart("alternative", parts, boundary_base + "_a")
    inline = [a for a in spec.attachments if a.content_id is not None]
    files = [a for a in spec.attachments if a.content_id is None]
    if inline:
        body = _multipart("related", [body] + [_attachment_part(a, "inline") for a in inline], boundary_base + "_r")
    if files:
        body = _multipart("mixed", [body] + [_attachment_part(a, "attachment") for a in files], boundary_base + "_m")
    return body


# The fast path. The generator above costs ~80 us of a ~90 us one-part build
# and ~300 us for text+html: too much for a delivery path that must build
# thousands of messages a second. _fast_body writes the same tree directly
# with the email package's encoders, byte for byte what the generator gives
# (the tests compare both on every message they build, fuzzed ones included);
# where the generator would fold a long part header, it returns None and the
# generator does the work.

def _fast_body(spec: MessageSpec) -> bytes | None:
    """The MIME part(s) of a message as _generated_body gives them, or None."""
    top = not spec.attachments
    parts = []
    if spec.text is not None or spec.html is None:
        parts.append(_fast_text_part(spec.text or "", "plain", top and spec.html is None))
    if spec.html is not None:
        parts.append(_fast_text_part(spec.html, "html", top and spec.text is None))
    if len(parts) == 1:
        body = parts[0]
    else:
        boundary_base = _boundary_base(spec)
        body = _fast_multipart("alternative", parts, boundary_base + "_a", top)
    if not spec.attachments:
        return body
    boundary_base = _boundary_base(spec)
    inline = [a for a in spec.attachments if a.content_id is not None]
    files = [a for a in spec.attachments if a.content_id is None]
    for attachments, subtype, disposition in ((inline, "related", "inline"), (files, "mixed", "attachment")):
        if attachments:
            encoded = [_fast_attachment_part(a, disposition) for a in attachments]
            if None in encoded:
                return None
            top = subtype == "mixed" or not files
            body = _fast_multipart(subtype, [body] + encoded, boundary_base + "_" + subtype[0], top)
    return body


def _fast_text_part(body: str, subtype: str, top: bool) -> bytes:
    version = "MIME-Version: 1.0\r\n" if top else ""
    if is_7bit_text(body):
        return (f'Content-Type: text/{subtype}; charset="us-ascii"\r\n{version}'
                f"Content-Transfer-Encoding: 7bit\r\n\r\n{body.replace(_LF, _CRLF)}").encode("ascii")
    # RFC 2045 6.8 / RFC 2046 4.1.1: text is encoded in its canonical form,
    # line breaks as CRLF, so a base64 body decodes to CRLF lines too.
    # Lines of 76 characters (57 octets), as email.base64mime.body_encode
    # writes them for the generator, at half its cost (its loop is Python's).
    encoded = base64.encodebytes(body.replace(_LF, _CRLF).encode("utf-8")).replace(b"\n", b"\r\n")
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n{version}'
            f"Content-Transfer-Encoding: base64\r\n\r\n").encode("ascii") + encoded


def _fast_multipart(subtype: str, parts: list[bytes], boundary: str, top: bool) -> bytes:
    version = "MIME-Version: 1.0\r\n" if top else ""
    head = f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n{version}\r\n--{boundary}\r\n'
    return head.encode("ascii") + f"\r\n--{boundary}\r\n".encode("ascii").join(parts) + \
        f"\r\n--{boundary}--\r\n".encode("ascii")


def _fast_attachment_part(att: Attachment, disposition: str) -> bytes | None:
    if att.filename.isascii():
        param = f'filename="{quote(att.filename)}"'
    else:
        param = "filename*=" + encode_rfc2231(att.filename, "utf-8", "")
    lines = [f"Content-Type: {att.content_type}", "Content-Transfer-Encoding: base64",
             f"Content-Disposition: {disposition}; {param}"]
    if att.content_id is not None:
        lines.append(f"Content-ID: <{att.content_id}>")
    if max(map(len, lines)) > 78:
        return None                     # the generator folds it
    payload = base64.encodebytes(binascii.a2b_base64(att.content_base64)).replace(b"\n", b"\r\n")
    return (_CRLF.join(lines) + "\r\n\r\n").encode("ascii") + payload


def _multipart(subtype: str, parts: list, boundary: str) -> MIMEMultipart:
    msg = MIMEMultipart(subtype, boundary=boundary)
    for part in parts:
        del part["MIME-Version"]      # only the top level carries it (RFC 2045 4)
        msg.attach(part)
    return msg


def _text_part(body: str, subtype: str) -> MIMEText:
    if is_7bit_text(body):
        return MIMEText(body, subtype, "us-ascii")
    return MIMEText(body.replace(_LF, _CRLF), subtype, _UTF8)  # base64 of canonical CRLF text


def _attachment_part(att: Attachment, disposition: str) -> MIMEBase:
    maintype, subtype = att.content_type.split("/", 1)
    part = MIMEBase(maintype, subtype)
    part.set_payload(base64.encodebytes(binascii.a2b_base64(att.content_base64)).decode("ascii"))
    part["Content-Transfer-Encoding"] = "base64"
    filename = att.filename if att.filename.isascii() else ("utf-8", "", att.filename)  # RFC 2231
    part.add_header("Content-Disposition", disposition, filename=filename)
    if att.content_id is not None:
        part["Content-ID"] = f"<{att.content_id}>"
    return part


def _text_header(name: str, value: str, unstructured: bool) -> str:
    """One folded header line of text; RFC 2047 encoded-words when not ASCII."""
    if value.isascii():
        if len(name) + 2 + len(value) <= 78:
            return f"{name}: {value}\r\n"
        if not unstructured or max(map(len, value.split()), default=0) <= MAX_HEADER_WORD:
            # Fold at existing spaces only: folding after "," or ";" would add a
            # space inside values such as URLs.
            return f"{name}: {Header(value, 'us-ascii', header_name=name).encode(splitchars=' ', linesep=_CRLF)}\r\n"
    # Non-ASCII text, or a subject with an unfoldable word: encoded-words can
    # be split anywhere.
    return _fold(name, _encoded_words(value))


# RFC 2047 2: an encoded-word is at most 75 characters. "=?utf-8?b?" + "?="
# is 12, leaving 63 base64 characters: 45 octets of UTF-8 (60 characters).
_ENCODED_WORD_OCTETS = 45


def _encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 B-encoded words of at most 75 characters, split between
    characters (a word must hold whole characters, RFC 2047 5(3))."""
    data = text.encode("utf-8")
    if len(data) <= _ENCODED_WORD_OCTETS:
        return [header_encode(data, "utf-8")]
    words, chunk, size = [], [], 0
    for ch in text:
        n = len(ch.encode("utf-8"))
        if size + n > _ENCODED_WORD_OCTETS:
            words.append(header_encode("".join(chunk).encode("utf-8"), "utf-8"))
            chunk, size = [], 0
        chunk.append(ch)
        size += n
    words.append(header_encode("".join(chunk).encode("utf-8"), "utf-8"))
    return words


def _address_header(name: str, mailboxes: list[tuple[str, str]]) -> str:
    """An address-list header, display names quoted or encoded as needed."""
    words: list[str] = []
    for i, (display, addr) in enumerate(mailboxes):
        comma = "," if i < len(mailboxes) - 1 else ""
        if not display:
            words.append(addr + comma)
            continue
        if display.isascii():
            if _QUOTE_SPECIALS.search(display):
                display = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'
            words.extend(display.split(" "))   # validation left no runs of spaces
        else:
            words.extend(_encoded_words(display))
        words.append(f"<{addr}>{comma}")
    return _fold(name, words)


def _fold(name: str, words: list[str]) -> str:
    """`name: words` joined by spaces, folded before a word where a line would pass
    78 columns (RFC 5322 2.1.1, 3.2.2). No word is empty, so no line is blank."""
    lines, line = [], name + ":"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line != name + ":":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"
