"""Text from other parties made safe for an operator's terminal.

An upstream's reply (and a down upstream's reason, which quotes it) is
another server's text: a control character in it, printed as it is, would
reach the terminal of whoever runs `smtpgate queue list` or `smtpgate
stats`, where an escape sequence can clear the screen, rewrite the lines
above or set the window's title. The reply parser keeps every byte but the
line's end (smtp/replies.py: a reply is shown as the upstream sent it), so
the tools escape them when they print text.
"""

from __future__ import annotations

import json
import re

# C0, DEL and C1 (U+0080-U+009F: a terminal in 8-bit mode takes U+009B as CSI).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def escaped(text: str) -> str:
    """`text` with each control character written as \\xNN."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found[0]):02x}", text)


_JSON_UNESCAPED = re.compile("[\x7f-\x9f]")  # json.dumps escapes C0 itself, not DEL and C1


def escaped_json(value, indent: int | None = None) -> str:
    """`value` as JSON, UTF-8 as it is, with no control character left raw:
    the same JSON (DEL and C1 inside its strings as \\u escapes)."""
    return _JSON_UNESCAPED.sub(lambda found: f"\\u{ord(found[0]):04x}", json.dumps(value, ensure_ascii=False, indent=indent))
