"""Formatting of reply lines: `OK[ PAYLOAD]\\r\\n` and `ERR CODE TEXT\\r\\n`."""

from .codes import ALL_CODES

_CRLF_TO_SPACE = str.maketrans({"\r": " ", "\n": " "})


def reply_ok(payload: str | None = None) -> bytes:
    """Return the bytes of an OK reply; ValueError if the payload holds CR or LF.

    The payload is ours (an id, JSON from json.dumps, PONG): a line break in it
    is a bug that would desynchronise every pipelined reply after it, so it is
    refused rather than silently rewritten.
    """
    if payload is None or payload == "":
        return b"OK\r\n"
    if "\n" in payload or "\r" in payload:
        raise ValueError("reply payload must be one line")
    return b"OK " + payload.encode("utf-8") + b"\r\n"


def reply_err(code: str, text: str = "") -> bytes:
    """Return the bytes of an ERR reply; CR/LF in the text become spaces.

    The text may quote what the caller sent, so it is made one line here
    instead of trusting every call site.
    """
    if code not in ALL_CODES:
        raise ValueError(f"unknown error code {code!r}")
    text = text.translate(_CRLF_TO_SPACE)
    if not text:
        return b"ERR " + code.encode("ascii") + b"\r\n"
    return b"ERR " + code.encode("ascii") + b" " + text.encode("utf-8", "replace") + b"\r\n"
