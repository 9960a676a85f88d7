#!/usr/bin/env python3
"""CPU of the hand-off per SEND, in one process, without sockets or spool.

    python3 bench/handoff_cpu.py [--n 20000] [--repeats 7]

`Handoff.take_send` as the line door calls it (JSON, validation, the
caller's policy and rate, the enqueue call), with a spool whose enqueue
answers at once: what each SEND costs the daemon's event loop between the
parser and the pipe to the writer. The socket and the commit are
daemon_bench.py's business. Reported: microseconds of CPU per SEND, the
best of `repeats` runs of `n` SENDs, for

- open: a daemon without callers (the anonymous caller, no policy);
- caller: a named caller with allowed senders and recipients and both
  rates (set high enough never to refuse), i.e. every check on;
- caller, raw: the same for a raw message, whose From header is parsed.

Runs against whichever smtpgate is importable (PYTHONPATH=other/daemon to
compare a tree without callers: it has only the first case, and a
version with the global allowed_senders/allowed_recipients).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

from smtpgate.config import Config
from smtpgate.intake import handoff as handoff_module
from smtpgate.spool.ops import Enqueued

TEXT = ("x" * 99 + "\n") * 10  # 1000 characters, in lines a raw message may have
COMPOSED = json.dumps({"from": "app@example.com", "to": "kelly@example.org", "subject": "bench",
                       "text": TEXT}, separators=(",", ":"))
RAW = json.dumps({"from": "app@example.com", "to": "kelly@example.org",
                  "raw": f"From: App <app@example.com>\r\nTo: kelly@example.org\r\nSubject: bench\r\n\r\n{TEXT}"},
                 separators=(",", ":"))


class _Stored:
    """A future that is done already: callbacks run at once."""

    def __init__(self, value):
        self.value = value

    def add_done_callback(self, callback):
        callback(self)

    def cancelled(self):
        return False

    def exception(self):
        return None

    def result(self):
        return self.value


class _Spool:
    caller_key = b"bench"
    pending: dict = {}

    def enqueue(self, *args):
        return _Stored(Enqueued("01JD3Q7Z8K4W6X2V9N5B0C1T00", False))


class _Delivery:
    def wake(self):
        pass


def _take(handoff, caller):
    """handoff.take_send for either signature (with callers: the caller first)."""
    if "caller" in inspect.signature(handoff.take_send).parameters:
        return lambda arg, done: handoff.take_send(caller, arg, done)
    return handoff.take_send


def run(config: Config, caller_name: str | None, arg: str, n: int, repeats: int) -> float:
    handoff = handoff_module.Handoff(config, _Spool(), _Delivery(), None)
    callers = getattr(handoff, "callers", None)  # None: a tree without callers
    caller = callers and (callers.by_name[caller_name] if caller_name else callers.anonymous)
    take = _take(handoff, caller)
    results = []
    done = results.append
    best = float("inf")
    for _ in range(repeats):
        results.clear()
        start = time.process_time()
        for _ in range(n):
            take(arg, done)
        best = min(best, time.process_time() - start)
        assert len(results) == n and isinstance(results[0], Enqueued), results[:1]
    return best / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    policy = {"allowed_senders": ["@example.com"], "allowed_recipients": ["@example.org"]}
    rows = [("open, composed SEND", Config(), None, COMPOSED)]
    if hasattr(handoff_module, "Callers"):
        from smtpgate.config import CallerConfig
        busy = {"sends_per_minute": 10**9, "sends_per_day": 10**9}
        config = Config(callers={"shop": CallerConfig("shop", tokens=["t" * 16], **policy, **busy)})
        rows += [("caller with every check, composed SEND", config, "shop", COMPOSED),
                 ("caller with every check, raw SEND", config, "shop", RAW)]
    else:
        rows += [("global allowed_senders/recipients, composed SEND", Config(**policy), None, COMPOSED),
                 ("global allowed_senders/recipients, raw SEND", Config(**policy), None, RAW)]
    for name, config, caller, arg in rows:
        print(f"| {name} | {run(config, caller, arg, args.n, args.repeats):.1f} us |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
