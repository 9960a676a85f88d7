#!/usr/bin/env python3
"""CPU per message of the delivery process's pure-Python parts, each alone.

The bench's message (bench/daemon_bench.py REQUEST) is built from its
stored spec, sent through the sans-IO SMTP core against smtp-sink's
replies (PIPELINING, no CHUNKING), its outcomes made, and the pipe
messages of its relay pickled and unpickled; timeit, best of 5, in µs per
message. What bench/delivery_cpu.py measures beyond these is asyncio, the
driver, the scheduler, the pool and the kernel.

    python bench/delivery_parts.py
"""

from __future__ import annotations

import json
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_bench import REQUEST  # noqa: E402

from smtpgate.delivery.retry import outcomes_from_result  # noqa: E402
from smtpgate.delivery.scheduler import default_build  # noqa: E402
from smtpgate.message.validate import validate_send  # noqa: E402
from smtpgate.proc.calls import Call  # noqa: E402
from smtpgate.proc.framing import encode, pack, take_messages, unpack  # noqa: E402
from smtpgate.smtp.core import SmtpClient  # noqa: E402
from smtpgate.spool.ops import Claimed, RecordAttempt, RecordAttempts  # noqa: E402

RECORDS_PER_FRAME = 8
SINK_EHLO = b"250-smtp-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"


def main() -> int:
    spec = validate_send(json.loads(REQUEST[5:] % 1), max_message_bytes=1 << 20, message_id_domain="example.com")
    spec_json = spec.to_json()
    data = default_build(spec_json)
    client = SmtpClient()
    client.receive_data(b"220 smtp-sink ESMTP\r\n")
    client.next_event()
    client.ehlo("bench.example")
    client.data_to_send()
    client.receive_data(SINK_EHLO)
    client.next_event()

    def transaction():
        client.send_mail("app@example.com", ["kelly@example.org"], data)
        client.next_event()
        client.data_to_send()
        client.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        client.next_event()
        client.data_to_send()
        client.receive_data(b"250 2.0.0 Ok: queued as 4F2\r\n")
        return client.next_event()

    result = transaction().result
    records = [RecordAttempt(time.time(), f"{i:026d}", outcomes_from_result(result), None, False)
               for i in range(RECORDS_PER_FRAME)]
    claimed = Claimed("0" * 26, spec_json, "app@example.com", ["kelly@example.org"], 0, time.time(), False)

    def round_trip(messages: list) -> None:
        take_messages(bytearray(b"".join(encode(messages))))

    parts = [
        ("build the message (JSON spec -> MIME bytes)", lambda: default_build(spec_json), 1),
        ("the SMTP core, one transaction (MAIL, RCPT, DATA, body)", transaction, 1),
        ("outcomes_from_result", lambda: outcomes_from_result(result), 1),
        (f"attempt records, packed, framed and unpacked {RECORDS_PER_FRAME} per frame",
         lambda: unpack(take_messages(bytearray(b"".join(encode([Call(1, RecordAttempts(pack(records)))]))))[0].op.records),
         RECORDS_PER_FRAME),
        ("a claimed message handed over, pickled and unpickled", lambda: round_trip([claimed]), 1),
    ]
    number = 4000
    print("| part | µs per message |\n| --- | ---: |")
    for name, run, per in parts:
        best = min(timeit.repeat(run, number=number, repeat=5)) / number / per * 1e6
        print(f"| {name} | {best:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
