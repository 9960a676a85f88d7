"""`smtpgate queue list|show|retry|delete|upstreams`: the queue tools (like
mailq, postqueue, postsuper).

They work on the spool whether or not the daemon runs, through the spool's
own access for operators (spool/admin.py); after a change the running
daemon is told with SIGUSR1 (and probes a down upstream at once).

The upstreams' health comes from the spool too, where the running daemon's
delivery records it at every change: the tool needs no socket and no
token, and reads it in the same snapshot as the messages it holds. Without
a running daemon nothing is held, and no health is shown.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import sys
import tomllib

from smtpgate.config import DEFAULT_CONFIG_PATH, Config
from smtpgate.spool.admin import SpoolAdmin
from smtpgate.spool.errors import SpoolError
from smtpgate.spool.schema import FINAL_STATES, STATES
from smtpgate.tools.exits import EX_CONFIG, EX_NOINPUT
from smtpgate.tools.terminal import escaped, escaped_json


class _QueueError(Exception):
    """(exit code, message): the tool cannot start."""


def _spool_dir(args) -> str:
    if args.spool:
        return args.spool
    path = args.config or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    if path:
        # Only the spool key: a full load_config would also open the password
        # and token files, which the operator running the tool need not read.
        try:
            with open(path, "rb") as fh:
                spool = tomllib.load(fh).get("spool")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise _QueueError(EX_CONFIG, f"cannot read the configuration {path}: "
                                         f"{getattr(exc, 'strerror', None) or exc}") from None
        if spool is not None:
            return spool
    return os.environ.get("STATE_DIRECTORY", Config.spool)


def run_queue_command(args) -> int:
    command = args.queue_command
    try:
        path = _spool_dir(args)
        try:
            spool = SpoolAdmin(path, write=command in ("retry", "delete"))
        except SpoolError as exc:
            raise _QueueError(EX_NOINPUT, f"{exc} (give --spool DIR or --config FILE)") from None
    except _QueueError as exc:
        code, text = exc.args
        print(f"smtpgate queue: {text}", file=sys.stderr)
        return code
    with spool:
        if command == "show":
            found = spool.entries(msg_id=args.id)
            if not found:
                print(f"smtpgate queue: no message {args.id}", file=sys.stderr)
                return 1
            print(escaped_json(found[0], indent=2))
            return 0
        if command == "list":
            if not args.json:
                _print_upstreams(spool.upstreams(), only_trouble=True)
            _print_list(spool.entries(include_final=args.all), args.json)
            return 0
        if command == "upstreams":
            upstreams = spool.upstreams()
            if args.json:
                print(json.dumps(upstreams))
            else:
                _print_upstreams(upstreams, only_trouble=False)
            return 0
        if command == "retry":
            changed = spool.retry(None if args.all else args.id)
            print(f"{_count(changed, 'message')} due now")
            _tell_daemon(spool)
            return 0 if changed or args.all else 1
        state = spool.delete(args.id)
        if state is None:
            print(f"smtpgate queue: no message {args.id}", file=sys.stderr)
            return 1
        print(f"deleted {args.id} ({state})")
        _tell_daemon(spool)
        return 0


def _tell_daemon(spool: SpoolAdmin) -> None:
    if not spool.notify_daemon():
        print("the daemon is not running; it sees the change when it starts", file=sys.stderr)


def _print_upstreams(upstreams: list[dict] | None, only_trouble: bool) -> None:
    """One line per upstream (`list`: only when one is down)."""
    if upstreams is None:
        if not only_trouble:
            print("no daemon is running: no upstream is being tried")
        return
    if only_trouble and all(u["state"] != "down" for u in upstreams):
        return
    for u in upstreams:
        line = f"upstream {u['name']}: {u['state']} since {u['since']}"
        if u["state"] == "down":
            line += (f" ({escaped(u['reason'])}); {_count(u['failures'], 'failed try', 'failed tries')}, "
                     f"next probe {u['next_probe']}, {_count(u['waiting'], 'message')} waiting")
        print(line)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _print_list(entries: list[dict], as_json: bool) -> None:
    """A header line, one line per message (and one per recipient not yet
    final, with its last reply), then the totals by state."""
    if as_json:
        print(escaped_json(entries))
        return
    if entries:
        print(f"{'ID':<26}  {'STATE':<8} {'TRIES':>5}  {'NEXT TRY OR LAST CHANGE':<24}  FROM  (CALLER)")
    for m in entries:
        pending = [r for r in m["recipients"] if r["state"] not in FINAL_STATES] or m["recipients"]
        when = m.get("next_attempt", m["updated"])
        print(f"{m['id']:<26}  {m['state']:<8} {m['attempts']:>5}  {when:<24}  {m['from']}  ({m['caller']})")
        for r in pending:
            print(f"    {r['address']:<40} {r['state']:<8} {escaped(r['reply'] or '')}")
    by_state = Counter(m["state"] for m in entries)
    totals = ", ".join(f"{by_state[state]} {state}" for state in STATES if by_state[state])
    print(f"-- {_count(len(entries), 'message')}" + (f": {totals}" if totals else ""))
