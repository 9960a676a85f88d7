#!/usr/bin/env python3
"""Cost of SEND validation (intake hot path) and message building (delivery),
and of the line parser that frames the requests.

    python3 bench/message_bench.py [repeats] [iterations]

For each case it times validate_send and build_message, and as the
reference the same message built with EmailMessage + policy.SMTP (what the
issue names). The three run alternately, `repeats` times, and the median of
the per-run means is printed, because the machine is shared and noisy.
Targets: validation <= 40 us for a simple text message (hand-off budget
0.5 ms), building well under 1 ms (thousands of messages/s per worker core).
"""

import base64
import json
import statistics
import sys
import time
from email import policy
from email.message import EmailMessage

from smtpgate.message.build import build_message
from smtpgate.message.validate import validate_send
from smtpgate.protocol import LineParser

LIMIT = 25 << 20
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40).decode()

CASES = {
    "simple text": {
        "from": "app@example.com", "to": "kelly@example.org", "subject": "Your order 4711",
        "text": "Hello Kelly,\n\nyour order has shipped.\n\n-- \nThe shop\n",
    },
    "utf-8 text+html": {
        "from": "商店 <app@example.com>", "to": ["Kelly Müller <kelly@example.org>"],
        "subject": "记得收衣服", "text": "今天我不回家\n" * 10, "html": "<p>今天我不回家</p>\n" * 10,
    },
    "text+html+10KiB attachment": {
        "from": "app@example.com", "to": "kelly@example.org", "subject": "Invoice",
        "text": "See the attachment.\n", "html": "<p>See the attachment.</p>\n",
        "attachments": [{"filename": "invoice.png", "content_type": "image/png", "content_base64": PNG}],
    },
}


def reference_build(obj) -> bytes:
    """The same message with EmailMessage + policy.SMTP (the modern API)."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = obj["from"]
    msg["To"] = obj["to"] if isinstance(obj["to"], str) else ", ".join(obj["to"])
    msg["Subject"] = obj["subject"]
    msg["Date"] = "Thu, 26 Nov 2026 16:23:28 +0000"
    msg["Message-ID"] = "<06H1HCJJ06WP7MM4H4210ZW6BM@example.com>"
    msg.set_content(obj["text"])
    if "html" in obj:
        msg.add_alternative(obj["html"], subtype="html")
    for att in obj.get("attachments", []):
        maintype, subtype = att["content_type"].split("/")
        msg.add_attachment(base64.b64decode(att["content_base64"]), maintype=maintype,
                           subtype=subtype, filename=att["filename"])
    return msg.as_bytes()


def mean_us(fn, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e6


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    print(f"python {sys.version.split()[0]}, {repeats} runs x {iterations} iterations, median of run means")
    print(f"{'case':30} {'validate':>10} {'build':>10} {'EmailMessage+SMTP':>18} {'bytes':>7}")
    for name, obj in CASES.items():
        obj = json.loads(json.dumps(obj))          # as the server gets it
        spec = validate_send(obj, max_message_bytes=LIMIT)
        funcs = {
            "validate": lambda obj=obj: validate_send(obj, max_message_bytes=LIMIT),
            "build": lambda spec=spec: build_message(spec),
            "reference": lambda obj=obj: reference_build(obj),
        }
        runs = {key: [] for key in funcs}
        for _ in range(repeats):
            for key, fn in funcs.items():          # alternate: noise hits all three
                runs[key].append(mean_us(fn, iterations if key == "validate" else max(iterations // 4, 1)))
        med = {key: statistics.median(values) for key, values in runs.items()}
        print(f"{name:30} {med['validate']:8.1f}us {med['build']:8.1f}us {med['reference']:16.1f}us"
              f" {len(build_message(spec)):7}")
    parser_figures(repeats)


def parser_figures(repeats: int) -> None:
    """Pipelined SENDs in one feed (us per request) and one line fed byte by
    byte (us per byte): both must stay flat as they grow (O(n), not O(n^2))."""
    line = ("SEND " + json.dumps(CASES["simple text"]) + "\r\n").encode()
    for count in (1000, 10000):
        data = line * count
        runs = []
        for _ in range(repeats):
            parser = LineParser(max_line=1 << 20)
            start = time.perf_counter()
            parser.feed(data)
            while parser.next_event() is not None:
                pass
            runs.append((time.perf_counter() - start) / count * 1e6)
        print(f"parser: {count} pipelined SENDs in one feed   {statistics.median(runs):6.2f} us/request")
    for size in (10000, 100000):
        runs = []
        for _ in range(repeats):
            parser = LineParser(max_line=1 << 20)
            start = time.perf_counter()
            for _ in range(size):
                parser.feed(b"x")
                parser.next_event()
            runs.append((time.perf_counter() - start) / size * 1e6)
        print(f"parser: a {size}-byte line fed byte by byte  {statistics.median(runs):6.2f} us/byte")


if __name__ == "__main__":
    main()
