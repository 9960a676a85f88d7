"""SEND validation and message building.

Built bytes are parsed back with the standard library's modern parser
(policy.default), which is stricter about RFC 2047 and folding than ours.
"""

import base64
import email
import json
import re
from datetime import datetime, timezone
from email import policy
from email.header import decode_header, make_header

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from smtpgate.message.build import _fast_body, _generated_body, build_message
from smtpgate.message.spec import BOUNDARY_MARK, MessageSpec, RequestError
from smtpgate.message.validate import validate_send
from smtpgate.protocol import codes

LIMIT = 25 << 20
NOW = 1795710208.0   # Thu, 26 Nov 2026 16:23:28 +0000


def validate(obj, limit=LIMIT, **kw):
    return validate_send(obj, max_message_bytes=limit, now=NOW, **kw)


def build(obj, **kw):
    """Validate, build, check framing invariants, parse back."""
    spec = validate(obj, **kw)
    data = build_message(spec)
    check_wire_form(data)
    check_fast_path(spec)
    assert len(data) <= spec.size_estimate
    # The spool stores the spec as JSON and the delivery worker rebuilds it.
    again = MessageSpec.from_json(spec.to_json())
    assert again == spec
    assert build_message(again) == data
    # check_wire_form proved every line ends in CRLF; a local reader sees LF.
    return spec, data, email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=policy.default)


def check_fast_path(spec):
    """build_message writes the MIME parts itself when it can: the bytes must be
    exactly those of the email package's generator."""
    if spec.raw is None:
        fast = _fast_body(spec)
        assert fast is None or fast == _generated_body(spec)


def check_wire_form(data: bytes):
    """CRLF only, no line over 998 octets (RFC 5322 2.1.1), no NUL, ends in CRLF."""
    assert data.endswith(b"\r\n")
    assert b"\x00" not in data
    lines = data.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(map(len, lines)) <= 998


def refused(obj, code, fragment=""):
    with pytest.raises(RequestError) as info:
        validate(obj)
    assert info.value.code == code, info.value.text
    assert fragment in info.value.text
    return info.value.text


SIMPLE = {"from": "app@example.com", "to": "kelly@example.org", "subject": "hello", "text": "Hi\nthere\n"}


# ---------------------------------------------------------------- building

def test_simple_text_message():
    spec, data, msg = build(SIMPLE)
    assert msg["From"] == "app@example.com"
    assert msg["To"] == "kelly@example.org"
    assert msg["Subject"] == "hello"
    assert msg["Date"] == "Thu, 26 Nov 2026 16:23:28 +0000" == spec.date
    assert msg["Message-ID"] == spec.message_id
    assert spec.message_id.endswith("@example.com>") and len(spec.message_id) == 2 + 26 + 12
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_content() == "Hi\nthere\n"
    assert b"\r\n\r\nHi\r\nthere\r\n" in data
    assert spec.envelope_from == "app@example.com"
    assert spec.recipients == ["kelly@example.org"]
    assert not spec.smtputf8


def test_utf8_subject_names_and_body():
    spec, data, msg = build({
        "from": "张三 <app@example.com>", "to": ["Kelly Müller <kelly@example.org>"],
        "subject": "记得收衣服", "text": "今天我不回家",
    })
    assert data.isascii()                         # RFC 2047 and base64: 7-bit clean
    assert msg["Subject"] == "记得收衣服"
    assert msg["From"].addresses[0].display_name == "张三"
    assert msg["To"].addresses[0].display_name == "Kelly Müller"
    assert msg["To"].addresses[0].addr_spec == "kelly@example.org"
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_content() == "今天我不回家"


def test_text_and_html_give_multipart_alternative():
    _, _, msg = build({**SIMPLE, "html": "<p>Hi</p>"})
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[1].get_content() == "<p>Hi</p>"
    assert "MIME-Version" not in parts[0]
    _, _, html_only = build({"from": "a@example.com", "to": "b@example.org", "html": "<b>x</b>"})
    assert html_only.get_content_type() == "text/html"


def test_attachments_inline_images_and_files():
    pdf = bytes(range(256)) * 40
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    _, _, msg = build({**SIMPLE, "html": '<img src="cid:logo">', "attachments": [
        {"filename": "报告 2026.pdf", "content_type": "application/pdf",
         "content_base64": base64.b64encode(pdf).decode()},
        {"filename": "logo.png", "content_type": "image/png",
         "content_base64": base64.encodebytes(png).decode(), "content_id": "<logo>"},
    ]})
    assert msg.get_content_type() == "multipart/mixed"
    related, attached = msg.iter_parts()
    assert related.get_content_type() == "multipart/related"
    alternative, image = related.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == png
    assert attached.get_filename() == "报告 2026.pdf"
    assert attached.get_content_disposition() == "attachment"
    assert attached.get_content() == pdf


def test_long_part_headers_are_left_to_the_generator():
    name = "quarterly report " * 6 + ".pdf"          # Content-Disposition over 78 columns
    spec, data, msg = build({**SIMPLE, "attachments": [{"filename": name, "content_base64": "aGk="}]})
    assert _fast_body(spec) is None                    # the generator folds it
    assert list(msg.iter_attachments())[0].get_filename() == name
    short, _, _ = build({**SIMPLE, "html": "<p>x</p>", "attachments": [
        {"filename": "a.pdf", "content_base64": "aGk="}, {"filename": "i.png", "content_base64": "", "content_id": "i"}]})
    assert _fast_body(short) is not None


def test_bcc_never_in_the_headers_but_in_the_envelope():
    spec, data, msg = build({**SIMPLE, "cc": ["c@example.org"], "bcc": ["secret@example.net", "kelly@EXAMPLE.org"]})
    assert b"secret" not in data and "Bcc" not in msg
    assert msg["Cc"] == "c@example.org"
    # Duplicates are delivered once; domains compare case-insensitively, local
    # parts do not (RFC 5321 2.4).
    assert validate({**SIMPLE, "cc": "Kelly@example.org"}).recipients == ["kelly@example.org", "Kelly@example.org"]
    assert spec.recipients == ["kelly@example.org", "c@example.org", "secret@example.net"]


def test_bcc_only():
    spec, data, msg = build({"from": "a@example.com", "bcc": ["x@example.org", "y@example.org"], "text": "t"})
    assert spec.recipients == ["x@example.org", "y@example.org"]
    assert msg["To"] == "undisclosed-recipients:;" and "Cc" not in msg
    assert b"x@example.org" not in data and b"y@example.org" not in data


def test_reply_to_and_extra_headers():
    _, _, msg = build({**SIMPLE, "reply_to": ["Support <help@example.com>", "x@example.com"], "headers": {
        "X-Campaign": "summer", "List-Unsubscribe": "<https://example.com/u?a=1,b=2>",
        "X-Note": "Grüße aus Köln", "Message-ID": "<thread-1@example.com>",
    }})
    assert msg["Reply-To"] == "Support <help@example.com>, x@example.com"
    assert msg["X-Campaign"] == "summer"
    assert msg["List-Unsubscribe"] == "<https://example.com/u?a=1,b=2>"
    assert msg["X-Note"] == "Grüße aus Köln"
    assert msg["Message-ID"] == "<thread-1@example.com>"


def test_long_lines_are_encoded():
    long_word = "x" * 5000
    short_lines = "<p>y</p>\n" * 3000
    spec, data, msg = build({**SIMPLE, "subject": "a" * 3000, "text": long_word, "html": short_lines})
    assert msg["Subject"] == "a" * 3000
    text, html = msg.iter_parts()
    assert text["Content-Transfer-Encoding"] == "base64" and text.get_content() == long_word
    assert html["Content-Transfer-Encoding"] == "7bit" and html.get_content() == short_lines
    _, _, msg = build({**SIMPLE, "text": "ok\n" + "z" * 998 + "\n"})
    assert msg["Content-Transfer-Encoding"] == "7bit"
    _, _, msg = build({**SIMPLE, "text": "ok\n" + "z" * 999 + "\n"})
    assert msg["Content-Transfer-Encoding"] == "base64"


def test_boundary_marker_in_text_forces_base64():
    text = f"--{BOUNDARY_MARK}x\n"
    _, _, msg = build({**SIMPLE, "text": text, "html": "<p>x</p>"})
    plain, _ = msg.iter_parts()
    assert plain["Content-Transfer-Encoding"] == "base64"
    assert plain.get_content() == text.replace("\n", "\r\n")  # canonical CRLF inside base64


def test_only_printable_ascii_tab_and_lf_go_7bit():
    # NUL is refused and CR made LF at validation; every other octet decides.
    for char in [chr(c) for c in range(1, 0x80) if c != 0x0D] + ["\x80", "é", "\u2028", "\U0001F600"]:
        text = f"a{char}b\nc\n"
        _, _, msg = build({**SIMPLE, "text": text})
        seven_bit = char in "\t\n" or " " <= char <= "~"
        assert msg["Content-Transfer-Encoding"] == ("7bit" if seven_bit else "base64"), repr(char)
        assert msg.get_content().replace("\r\n", "\n") == text, repr(char)


def test_line_endings_normalised_in_bodies():
    _, data, msg = build({**SIMPLE, "text": "a\r\nb\rc\n"})
    assert msg.get_content() == "a\nb\nc\n"
    assert b"\r\n\r\na\r\nb\r\nc\r\n" in data


def test_internationalised_addresses():
    spec, data, msg = build({"from": "app@bücher.de", "to": ["用户@例子.广告", "kelly@example.org"]})
    assert spec.envelope_from == "app@xn--bcher-kva.de"
    assert spec.recipients == ["用户@例子.广告", "kelly@example.org"]
    assert spec.smtputf8
    assert "用户@例子.广告".encode() in data        # RFC 6532: UTF-8, not encoded-words
    assert spec.message_id.endswith("@xn--bcher-kva.de>")
    assert not validate(SIMPLE).smtputf8


def test_date_and_message_id_are_fixed_at_validation():
    spec = validate_send(SIMPLE, max_message_bytes=LIMIT,
                         now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert spec.date == "Fri, 02 Jan 2026 03:04:05 +0000"
    other = validate(SIMPLE)
    assert other.message_id != spec.message_id
    assert validate(SIMPLE, message_id_domain="mail.example.net").message_id.endswith("@mail.example.net>")


def test_spec_json_is_plain_json():
    spec = validate({**SIMPLE, "idempotency_key": "order-42"})
    assert spec.idempotency_key == "order-42"
    assert json.loads(spec.to_json())["idempotency_key"] == "order-42"


# ---------------------------------------------------------------- raw

def test_raw_normalised_and_completed():
    raw = "From: a@example.com\nTo: b@example.org\nSubject: raw\n\nline 1\r\nline 2\rline 3"
    spec, data, msg = build({"from": "bounce@example.com", "to": "b@example.org", "raw": raw})
    assert spec.envelope_from == "bounce@example.com"
    # Added at the end of the header, so trace fields stay on top.
    assert data.startswith(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: raw\r\n"
                           + f"Date: {spec.date}\r\nMessage-ID: {spec.message_id}\r\n\r\n".encode())
    assert data.endswith(b"\r\n\r\nline 1\r\nline 2\r\nline 3\r\n")
    assert msg["Subject"] == "raw"


def test_raw_base64_keeps_octets_that_are_not_utf8():
    octets = "Subject: 测试\nX-A: b\n\n你好\n".encode("gbk")
    spec, data, _ = build({"from": "a@example.com", "to": "b@example.org",
                           "raw_base64": base64.b64encode(octets).decode()})
    assert spec.eight_bit
    assert data.startswith("Subject: 测试\r\nX-A: b\r\n".encode("gbk"))
    assert data.endswith("\r\n\r\n你好\r\n".encode("gbk"))
    assert build_message(MessageSpec.from_json(spec.to_json())) == data
    with pytest.raises(RequestError) as bad:
        validate_send({"from": "a@example.com", "to": "b@example.org", "raw_base64": "!!"},
                      max_message_bytes=1 << 20)
    assert bad.value.code == "BAD_REQUEST"
    with pytest.raises(RequestError):  # JSON raw must still be valid UTF-8 text
        validate_send({"from": "a@example.com", "to": "b@example.org", "raw": "Subject: \udcb2\n\nx"},
                      max_message_bytes=1 << 20)


def test_raw_keeps_its_own_date_and_message_id_and_8bit():
    raw = "Message-ID: <mine@example.com>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: ü\r\n\r\nGrüße\r\n"
    spec, data, _ = build({"from": "a@example.com", "to": "b@example.org", "raw": raw})
    assert data == raw.encode()
    assert spec.message_id == "<mine@example.com>"
    assert spec.smtputf8 and spec.eight_bit


@pytest.mark.parametrize("raw, code, fragment", [
    ("Subject: x\n\n" + "y" * 999 + "\n", codes.TOO_LARGE, "998"),
    ("Subject: x\n\n" + "é" * 500 + "\n", codes.TOO_LARGE, "998"),   # 1000 octets, 500 characters
    ("no header here\n\nbody", codes.BAD_REQUEST, "header"),
    ("Subject: x\n\nnul \x00", codes.BAD_REQUEST, "NUL"),
    ("Subject: \ud800\n\n", codes.BAD_REQUEST, "surrogate"),
    (["Subject: x"], codes.BAD_REQUEST, "string"),
])
def test_raw_refused(raw, code, fragment):
    refused({"from": "a@example.com", "to": "b@example.org", "raw": raw}, code, fragment)


def test_raw_excludes_the_built_fields():
    refused({"from": "a@example.com", "to": "b@example.org", "raw": "Subject: x\n\n", "subject": "y"},
            codes.BAD_REQUEST, "'raw' excludes 'subject'")


def test_raw_line_of_998_octets_passes():
    build({"from": "a@example.com", "to": "b@example.org", "raw": "Subject: x\n\n" + "y" * 998})


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("obj, fragment", [
    ([], "JSON object"),
    ({"to": "b@example.org"}, "'from' is required"),
    ({"from": "a@example.com"}, "no recipient"),
    ({"from": "a@example.com", "to": []}, "no recipient"),
    ({"from": ["a@example.com"], "to": "b@example.org"}, "'from' must be a string"),
    ({"from": "a@example.com", "to": 5}, "'to' must be a string or an array"),
    ({"from": "a@example.com", "to": ["b@example.org", None]}, "'to' must be"),
    ({**SIMPLE, "subject": 1}, "'subject' must be a string"),
    ({**SIMPLE, "text": {"a": 1}}, "'text' must be a string"),
    ({**SIMPLE, "sender": "x"}, "unknown field 'sender'"),
    ({**SIMPLE, "headers": ["X-A: 1"]}, "'headers' must be an object"),
    ({**SIMPLE, "headers": {"X-A": 1}}, "string value"),
    ({**SIMPLE, "attachments": {}}, "array"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_type": "text/plain"}]}, "content_base64"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "!!!"}]}, "not valid base64"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "YQ"}]}, "not valid base64"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "", "size": 1}]}, "unknown field 'size'"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "", "content_type": "text"}]}, "type/subtype"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "",
                                 "content_type": "text/plain; charset=utf-8"}]}, "type/subtype"),
    ({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "",
                                 "content_type": "multipart/mixed"}]}, "cannot be attached"),
    ({**SIMPLE, "attachments": [{"filename": "", "content_base64": ""}]}, "'filename'"),
    ({**SIMPLE, "idempotency_key": ""}, "idempotency_key"),
    ({**SIMPLE, "idempotency_key": "k" * 201}, "idempotency_key"),
    ({**SIMPLE, "idempotency_key": "a\tb"}, "idempotency_key"),
    ({**SIMPLE, "idempotency_key": 42}, "idempotency_key"),
    ({**SIMPLE, "text": "a\x00b"}, "NUL"),
    ({**SIMPLE, "html": "é\x00"}, "NUL"),
    ({**SIMPLE, "text": "é\ud800"}, "surrogate"),
    ({**SIMPLE, "html": "a\udcffb"}, "surrogate"),
    ({**SIMPLE, "to": ["u%d@example.org" % i for i in range(1001)]}, "1000 recipients"),
])
def test_bad_requests(obj, fragment):
    refused(obj, codes.BAD_REQUEST, fragment)


def test_base64_with_line_breaks_is_accepted():
    chunked = "aGVs\r\nbG8g\r\nd29y\r\nbGQ=\r\n"          # PHP chunk_split(base64_encode(...))
    _, _, msg = build({**SIMPLE, "attachments": [{"filename": "a.txt", "content_base64": chunked}]})
    assert list(msg.iter_attachments())[0].get_content() == b"hello world"


@pytest.mark.parametrize("address", [
    "", "plain", "@example.com", "a@", "a@@example.com", "a b@example.com", "a@exa mple.com",
    "a..b@example.com", ".a@example.com", "a@-example.com", "a@example..com", "a@example.com.",
    '"quoted"@example.com', "a@[127.0.0.1]", "a@example.com, b@example.org", "Name <a@example.com",
    "Name a@example.com>", "<>", "x" * 65 + "@example.com", "a@" + "b" * 64 + ".com",
    "a@" + ".".join(["b" * 60] * 5), "a\r\n@example.com", "a@example.com\r\nBcc: x@evil.example",
    "Name <a@example.com>\nBcc: x@evil.example", "a@exam\x00ple.com", "a@\u2028example.com",
    "user\u2028@example.com", "user\x85@example.com", "Evil <<a@example.com>>",
    "Ev<il <a@example.com>",
])
def test_bad_addresses(address):
    refused({"from": "a@example.com", "to": address}, codes.BAD_ADDRESS)
    refused({"from": address, "to": "b@example.org"}, codes.BAD_ADDRESS)


@pytest.mark.parametrize("address, envelope", [
    ("a@example.com", "a@example.com"),
    ("  Name  <a@example.com>  ", "a@example.com"),
    ('"Doe, John" <john.doe+tag@mail.example.com>', "john.doe+tag@mail.example.com"),
    ("<a@example.com>", "a@example.com"),
    ("o'brien!#$%&*/=?^_`{|}~-@example.com", "o'brien!#$%&*/=?^_`{|}~-@example.com"),
    ("root@localhost", "root@localhost"),
    ("a@BÜCHER.de", "a@xn--bcher-kva.de"),
    ("Ünïcödé <ü@bücher.de>", "ü@bücher.de"),
    ("用户@例子。广告", "用户@例子.广告"),       # ideographic full stop is a dot (IDNA)
    ("ü@BÜCHER.de", "ü@bücher.de"),
])
def test_good_addresses(address, envelope):
    spec, _, _ = build({"from": address, "to": address})
    assert spec.envelope_from == envelope == spec.recipients[0]


# Every way of breaking a header line that we know of: CR, LF, CRLF, NUL,
# NEL (U+0085), LINE SEPARATOR, PARAGRAPH SEPARATOR, other C0 and C1 controls.
INJECTIONS = ["\r", "\n", "\r\n", "\x00", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\x1b", "\x7f", "\x9b"]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_refused_everywhere(bad):
    tail = bad + "Bcc: victim@example.net"
    header = codes.BAD_HEADER
    refused({**SIMPLE, "subject": "hi" + tail}, header, "subject")
    refused({**SIMPLE, "from": f"Name{tail} <a@example.com>"}, header, "from")
    refused({**SIMPLE, "to": f'"Name{tail}" <b@example.org>'}, header, "to")
    refused({**SIMPLE, "reply_to": f"Name{tail} <c@example.org>"}, header, "reply_to")
    refused({**SIMPLE, "to": f"b@example.org{tail}"}, codes.BAD_ADDRESS)
    refused({**SIMPLE, "cc": f"c{bad}@example.org"}, codes.BAD_ADDRESS)
    refused({**SIMPLE, "headers": {"X-A": "v" + tail}}, header, "X-A")
    refused({**SIMPLE, "headers": {"X-A" + bad: "v"}}, header, "bad header name")
    refused({**SIMPLE, "headers": {"Message-ID": "<a@b>" + tail}}, header)
    refused({**SIMPLE, "attachments": [{"filename": "a" + tail, "content_base64": ""}]}, header, "filename")
    refused({**SIMPLE, "attachments": [{"filename": "a", "content_base64": "", "content_id": "x" + tail}]},
            header, "content_id")


@pytest.mark.parametrize("name", ["X A", "X-A:", "X:A", "", "Ü-Header", "X\tA", "x" * 77])
def test_bad_header_names(name):
    refused({**SIMPLE, "headers": {name: "v"}}, codes.BAD_HEADER, "header name")


@pytest.mark.parametrize("name", [
    "Content-Type", "content-transfer-encoding", "MIME-Version", "Content-Disposition", "Date",
])
def test_structural_headers_refused(name):
    refused({**SIMPLE, "headers": {name: "text/html"}}, codes.BAD_HEADER, "set by smtpgate")


@pytest.mark.parametrize("name, field", [
    ("Bcc", "bcc"), ("BCC", "bcc"), ("From", "from"), ("To", "to"), ("Cc", "cc"),
    ("Subject", "subject"), ("Reply-To", "reply_to"),
])
def test_field_headers_refused(name, field):
    refused({**SIMPLE, "headers": {name: "x@example.org"}}, codes.BAD_HEADER, f"'{field}' field")


def test_header_limits():
    refused({**SIMPLE, "headers": {"X-Long": "a" * 901}}, codes.BAD_HEADER, "cannot be folded")
    refused({**SIMPLE, "headers": {"Message-ID": "no-brackets@x"}}, codes.BAD_HEADER, "Message-ID")
    refused({**SIMPLE, "subject": "s" * 4001}, codes.BAD_HEADER, "subject longer")
    refused({**SIMPLE, "from": "n" * 201 + " <a@example.com>"}, codes.BAD_HEADER, "display name")
    refused({**SIMPLE, "attachments": [{"filename": "é" * 128, "content_base64": ""}]}, codes.BAD_HEADER, "255")
    _, _, msg = build({**SIMPLE, "headers": {"X-Long": " ".join(["word"] * 500)}})
    assert msg["X-Long"] == " ".join(["word"] * 500)
    # White-space runs cannot be folded into short lines: long ones become one space.
    _, _, msg = build({**SIMPLE, "subject": "a" + " " * 1000 + "b", "headers": {"X-Blank": " \t" * 500}})
    assert msg["Subject"] == "a b"
    _, _, msg = build({**SIMPLE, "subject": "a" + " " * 64 + "b"})
    assert msg["Subject"] == "a" + " " * 64 + "b"


def test_pre_encoded_words_pass_through():
    # What PHP's mb_encode_mimeheader() gives: readers decode it as meant.
    _, _, msg = build({**SIMPLE, "from": "=?UTF-8?B?5byg5LiJ?= <a@example.com>",
                       "subject": "=?UTF-8?B?6K6w5b6X?="})
    assert msg["From"].addresses[0].display_name == "张三"
    assert msg["Subject"] == "记得"


def test_too_large():
    content = base64.b64encode(b"\x00" * 3000).decode()
    att = [{"filename": "a.bin", "content_base64": content}]
    spec, data, _ = build({**SIMPLE, "attachments": att})
    refused_text = None
    with pytest.raises(RequestError) as info:
        validate({**SIMPLE, "attachments": att}, limit=len(data) - 1)
    refused_text = info.value.text
    # How large it would be, the limit and the key that sets it (issue 13).
    assert info.value.code == codes.TOO_LARGE
    assert re.search(rf"would be up to \d+ bytes \(0\.0 MiB\), over max_message_size = {len(data) - 1} "
                     r"\(0\.0 MiB\); attachments count in base64", refused_text), refused_text
    # The estimate is an upper bound, not far above the truth.
    assert len(data) <= spec.size_estimate <= 2 * len(data) + 4096
    with pytest.raises(RequestError) as info:
        validate({**SIMPLE, "raw": None, "text": "x" * 2000}, limit=1000)
    assert info.value.code == codes.TOO_LARGE
    with pytest.raises(RequestError) as info:
        validate({"from": "a@example.com", "to": "b@example.org", "raw": "S: x\n\n" + "y\n" * 600}, limit=1000)
    assert info.value.code == codes.TOO_LARGE and "over max_message_size = 1000" in info.value.text


def test_null_means_absent():
    spec, _, msg = build({**SIMPLE, "cc": None, "html": None, "headers": None, "attachments": None,
                          "reply_to": None, "raw": None, "idempotency_key": None})
    assert msg.get_content_type() == "text/plain" and spec.idempotency_key is None


def test_error_texts_do_not_echo_line_breaks():
    text = refused({**SIMPLE, "to": "a\r\nb@example.org"}, codes.BAD_ADDRESS)
    assert "\r" not in text and "\n" not in text


# ---------------------------------------------------------------- properties

# Text a caller may put in a header: anything but the refused characters.
header_text = st.text(alphabet=st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029"), max_size=120)
body_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=3000)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=header_text)
@example(subject="  two  spaces  " * 20)
@example(subject="word " * 40 + "x" * 950)
@example(subject="记得收衣服 " * 100)
def test_any_subject_round_trips(subject):
    _, _, msg = build({**SIMPLE, "subject": subject})
    # Whitespace right after "Subject:" is not part of the value (RFC 5322 3.2.5).
    assert msg["Subject"] == subject.lstrip(" \t") or (not subject.isascii() and msg["Subject"] == subject)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=header_text.filter(lambda n: len(n) <= 200))
def test_any_display_name_round_trips(name):
    assume("=?" not in name)
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    spec, data, msg = build({**SIMPLE, "from": f"{quoted} <a@example.com>"})
    assert msg["From"].addresses[0].addr_spec == "a@example.com"
    # policy.default puts a space between adjacent encoded-words of a phrase,
    # against RFC 2047 6.2; the legacy decoder follows the RFC.
    expected = re.sub(" +", " ", name).strip(" ")
    assert spec.from_[0] == expected
    if expected.isascii():
        assert msg["From"].addresses[0].display_name == expected
    else:
        legacy = email.message_from_bytes(data, policy=policy.compat32)
        assert str(make_header(decode_header(legacy["From"]))) == f"{expected} <a@example.com>"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=body_text, html=st.none() | body_text)
def test_any_body_round_trips(text, html):
    _, _, msg = build({**SIMPLE, "text": text, "html": html})
    parts = [msg] if html is None else list(msg.iter_parts())
    # A message always ends in CRLF (SMTP DATA): a lone 7-bit body gains it.
    # base64 text carries CRLF line breaks (RFC 2045 canonical form); readers
    # turn them into local line ends, as we do here.
    assert parts[0].get_content().replace("\r\n", "\n") in (text, text + "\n")
    if html is not None:
        assert parts[1].get_content().replace("\r\n", "\n") == html


# Text of every kind a caller could send: any code point (surrogates and
# controls included), and long runs of white space that folding must survive.
any_text = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=" \t\r\nab,;:<>\"\\=?@.é记\u2028\x85", max_size=2000),
    st.builds(lambda w, n: (w + " ") * n, st.text(alphabet="xé", min_size=1, max_size=1200), st.integers(1, 3)),
)
valid_addresses = st.sampled_from([
    "a@example.com", "Kelly <k@example.org>", '"Li, K" <k@bücher.de>', "用户@例子.广告",
    "=?UTF-8?B?5byg5LiJ?= <z@example.net>", "<x@example.com>"])


def mostly(valid, odd):
    """Valid four times in five: the point is to reach build_message with odd but valid parts."""
    return st.integers(0, 4).flatmap(lambda i: odd if i == 0 else valid)


addresses = mostly(valid_addresses, st.one_of(st.builds(lambda name: f"{name} <n@example.com>", any_text), any_text))
address_field = mostly(st.one_of(valid_addresses, st.lists(valid_addresses, min_size=1, max_size=3)), addresses)
base64_text = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
attachment = st.fixed_dictionaries(
    {"filename": mostly(st.just("a.bin"), any_text), "content_base64": mostly(base64_text, any_text)},
    optional={"content_type": mostly(st.sampled_from(["image/png", "text/plain", "application/x-foo+json"]), any_text),
              "content_id": mostly(st.just("<logo@x>"), any_text)})
header_names = mostly(st.sampled_from(["X-A", "In-Reply-To", "Message-ID", "List-Unsubscribe"]), any_text)
send_object = st.fixed_dictionaries(
    {"from": addresses, "to": address_field},
    optional={"cc": address_field, "bcc": address_field, "reply_to": address_field, "subject": any_text,
              "text": any_text, "html": any_text, "headers": st.dictionaries(header_names, any_text, max_size=3),
              "attachments": st.lists(attachment, max_size=2), "idempotency_key": any_text})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(obj=send_object)
def test_whatever_validates_builds(obj):
    """build_message never fails on a validated spec, and its output is always
    well-formed: anything that could break it must be refused by validation."""
    try:
        validate(obj)
    except RequestError as exc:
        assert exc.code in codes.ALL_CODES
        return
    spec, data, msg = build(obj)
    assert msg["From"] is not None
    assert not msg.defects


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=any_text, to=address_field)
def test_whatever_raw_validates_builds(raw, to):
    try:
        validate({"from": "a@example.com", "to": to, "raw": raw})
    except RequestError:
        return
    build({"from": "a@example.com", "to": to, "raw": raw})


# ---------------------------------------------------------------- sendmail

def sendmail_send(raw="To: a@example.org\nBcc: b@example.org\nSubject: s\n\nbody\n", **opts):
    return {"raw": raw, "sendmail": {"default_sender": "www-data@web1", **opts}}


def test_sendmail_field_applies_t_and_removes_bcc():
    spec = validate_send(sendmail_send(extract_recipients=True, recipients=["c@example.org, D <d@example.org>"]),
                         max_message_bytes=10**6)
    assert spec.recipients == ["c@example.org", "d@example.org", "a@example.org", "b@example.org"]
    assert spec.envelope_from == "www-data@web1"
    assert spec.raw.startswith("From: www-data@web1\nTo: a@example.org\nSubject: s\n")
    assert "Bcc" not in spec.raw


def test_sendmail_field_sender_from_f_then_from_field():
    raw = "From: Shop <shop@example.com>\nTo: a@example.org\n\nbody\n"
    assert validate_send(sendmail_send(raw, extract_recipients=True), max_message_bytes=10**6).envelope_from \
        == "shop@example.com"
    spec = validate_send(sendmail_send(raw, extract_recipients=True, sender="<bounce@example.com>"),
                         max_message_bytes=10**6)
    assert spec.envelope_from == "bounce@example.com"
    assert spec.raw.startswith("From: Shop <shop@example.com>\n")


@pytest.mark.parametrize("send, fragment", [
    ({"raw": "S: s\n\nb\n", "sendmail": "yes"}, "must be an object"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "recipients": "x@y.z"}}, "must be a list"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "recipients": [1]}}, "at most 1000 strings"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "recipients": ["x@y.z"] * 1001}},
     "at most 1000 strings"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "recipients": ["x@y.z"], "Q": 1}},
     "unknown key"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"recipients": ["x@y.z"]}}, "default_sender"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "recipients": ["x@y.z"],
                                         "full_name": "Eve\nBcc: victim@example.org"}}, "control"),
    ({"raw": "S: s\n\nb\n", "to": "x@y.z", "sendmail": {"default_sender": "a@b.c"}}, "excludes 'to'"),
    ({"subject": "s", "text": "b", "sendmail": {"default_sender": "a@b.c", "recipients": ["x@y.z"]}},
     "needs the message in 'raw'"),
    ({"raw": "S: s\n\nb\n", "sendmail": {"default_sender": "a@b.c", "extract_recipients": True}}, "no recipient"),
])
def test_sendmail_field_refused(send, fragment):
    refused(send, codes.BAD_REQUEST, fragment)
