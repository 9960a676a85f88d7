"""One exit-code table for `smtpgate send` and the C `smtpgate-send`: every
row of docs/exit-codes.md that applies to them, run against both, with the
numbers read from that table (so the docs, the Python and the C cannot
drift apart). The peer is a real socket answering each verb as scripted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_c_client import SEND, built, dead_port, peer  # noqa: F401 (fixtures)

DOC = Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md"


def documented_codes() -> dict[str, int]:
    """{"EX_USAGE": 64, ...} from the table's first two columns."""
    return {name: int(code) for code, name in re.findall(r"^\| (\d+) \| (EX_\w+) \|", DOC.read_text(), re.M)}


CODES = documented_codes()
MESSAGE = ["-f", "a@example.com", "-t", "b@example.org", "-s", "subject"]
WAITED = b'OK {"id":"01W","state":"%s","attempts":1,"recipients":[]}\r\n'

# name: (the peer's reply to each verb or None for no peer, extra arguments,
# stdin, the expected exit code's name)
CASES = {
    "queued": ({"SEND": b"OK 01ID\r\n"}, [], "body", "EX_OK"),
    "sent while waiting": ({"SEND": b"OK 01W\r\n", "WAIT": WAITED % b"sent"}, ["--wait", "1"], "x", "EX_OK"),
    "unknown option": ({"SEND": b"OK 01ID\r\n"}, ["--bogus"], "x", "EX_USAGE"),
    "no subject": ({"SEND": b"OK 01ID\r\n"}, ["NO_SUBJECT"], "x", "EX_USAGE"),
    "bad server URI": (None, ["--server", "smtp.example.com"], "x", "EX_USAGE"),
    "--wait out of range": ({"SEND": b"OK 01ID\r\n"}, ["--wait", "-1"], "x", "EX_USAGE"),
    "--timeout zero": ({"SEND": b"OK 01ID\r\n"}, ["--timeout", "0"], "x", "EX_USAGE"),
    "header without a colon": ({"SEND": b"OK 01ID\r\n"}, ["-H", "X-No-Colon"], "x", "EX_USAGE"),
    "body not UTF-8": ({"SEND": b"OK 01ID\r\n"}, [], b"caf\xe9", "EX_DATAERR"),
    "BAD_HEADER": ({"SEND": b"ERR BAD_HEADER line break in subject\r\n"}, [], "x", "EX_DATAERR"),
    "TOO_LARGE": ({"SEND": b"ERR TOO_LARGE over max_message_size\r\n"}, [], "x", "EX_DATAERR"),
    "BAD_REQUEST": ({"SEND": b"ERR BAD_REQUEST bad JSON\r\n"}, [], "x", "EX_DATAERR"),
    "attachment unreadable": ({"SEND": b"OK 01ID\r\n"}, ["-a", "/nonexistent/report.pdf"], "x", "EX_NOINPUT"),
    "token file unreadable": ({"SEND": b"OK 01ID\r\n"}, ["--token-file", "/nonexistent/token"], "x", "EX_NOINPUT"),
    "BAD_ADDRESS": ({"SEND": b"ERR BAD_ADDRESS not an address\r\n"}, [], "x", "EX_NOUSER"),
    "DENIED": ({"SEND": b"ERR DENIED recipient outside the policy\r\n"}, [], "x", "EX_NOUSER"),
    "host does not resolve": (None, ["--server", "tcp://smtpgate.invalid:2526"], "x", "EX_NOHOST"),
    "unknown error code": ({"SEND": b"ERR FROM_THE_FUTURE new\r\n"}, [], "x", "EX_UNAVAILABLE"),
    "failed while waiting": ({"SEND": b"OK 01W\r\n", "WAIT": WAITED % b"failed"}, ["--wait", "1"], "x",
                             "EX_UNAVAILABLE"),
    "not the protocol": ({"SEND": b"HTTP/1.1 400 Bad Request\r\n"}, [], "x", "EX_SOFTWARE"),
    "daemon down": (None, ["--server", "DEAD"], "x", "EX_TEMPFAIL"),
    "BUSY": ({"SEND": b"ERR BUSY spool full\r\n"}, [], "x", "EX_TEMPFAIL"),
    "INTERNAL": ({"SEND": b"ERR INTERNAL disk error\r\n"}, [], "x", "EX_TEMPFAIL"),
    "not final in time": ({"SEND": b"OK 01W\r\n", "WAIT": WAITED % b"deferred"}, ["--wait", "1"], "x",
                          "EX_TEMPFAIL"),
    "AUTH_FAILED": ({"AUTH": b"ERR AUTH_FAILED wrong token\r\n"}, ["TOKEN"], "x", "EX_NOPERM"),
    "AUTH_REQUIRED": ({"SEND": b"ERR AUTH_REQUIRED AUTH first\r\n"}, [], "x", "EX_NOPERM"),
}

COMMANDS = {
    "smtpgate send": [sys.executable, "-m", "smtpgate", "send"],
    "smtpgate-send": [str(SEND)],
}


def test_the_table_has_every_code_the_commands_use():
    assert CODES == {"EX_OK": 0, "EX_USAGE": 64, "EX_DATAERR": 65, "EX_NOINPUT": 66, "EX_NOUSER": 67,
                     "EX_NOHOST": 68, "EX_UNAVAILABLE": 69, "EX_SOFTWARE": 70, "EX_OSERR": 71,
                     "EX_IOERR": 74, "EX_TEMPFAIL": 75,
                     "EX_NOPERM": 77, "EX_CONFIG": 78}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_both_senders_exit_with_the_documented_code(built, peer, tmp_path, command, case):  # noqa: F811
    answers, extra, body, expected = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    args = list(extra)
    if args == ["TOKEN"]:
        args, env["SMTPGATE_TOKEN"] = [], "wrong-token"
    if args[:2] == ["--server", "DEAD"]:
        args[1] = f"tcp://127.0.0.1:{dead_port()}"
    server = [] if answers is None else ["--server", peer(**answers).uri]
    message = MESSAGE
    if args == ["NO_SUBJECT"]:
        args, message = [], MESSAGE[:-2]
    data = body.encode() if isinstance(body, str) else body
    done = subprocess.run([*COMMANDS[command], *server, *message, *args], input=data, capture_output=True,
                          timeout=60, env=env)
    stderr = done.stderr.decode()
    assert done.returncode == CODES[expected], stderr
    if expected == "EX_TEMPFAIL" and case == "daemon down":
        # The error names the address it is about.
        assert f"127.0.0.1:{args[1].rsplit(':', 1)[1]}" in stderr and "Connection refused" in stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_exit_code_of_the_table(built, command):  # noqa: F811
    done = subprocess.run([*COMMANDS[command], "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    listed = {int(code) for code in re.findall(r"^  (\d+) ", done.stdout.rsplit("exit codes", 1)[1], re.M)}
    only_sendmail = {CODES[name] for name in ("EX_OSERR", "EX_IOERR", "EX_CONFIG")}
    assert listed == set(CODES.values()) - only_sendmail, done.stdout


# The rows that apply to `smtpgate sendmail`, whose daemon comes from
# $SMTPGATE_SERVER (never the command line) and whose message from stdin.
SENDMAIL_CASES = ["queued", "BAD_HEADER", "TOO_LARGE", "BAD_ADDRESS", "DENIED", "host does not resolve",
                  "unknown error code", "not the protocol", "daemon down", "BUSY", "INTERNAL", "AUTH_FAILED",
                  "AUTH_REQUIRED"]


@pytest.mark.parametrize("case", SENDMAIL_CASES)
def test_sendmail_exits_with_the_same_codes(peer, case):  # noqa: F811
    answers, extra, _, expected = CASES[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    env["SMTPGATE_CONFIG"] = "/dev/null"  # not the machine's /etc/smtpgate
    if extra == ["TOKEN"]:
        env["SMTPGATE_TOKEN"] = "wrong-token"
    env["SMTPGATE_SERVER"] = (peer(**answers).uri if answers is not None
                              else f"tcp://127.0.0.1:{dead_port()}" if extra[1] == "DEAD" else extra[1])
    done = subprocess.run([sys.executable, "-m", "smtpgate", "sendmail", "-t"], capture_output=True, timeout=60,
                          input=b"From: a@example.com\nTo: b@example.org\nSubject: s\n\nbody\n", env=env)
    assert done.returncode == CODES[expected], done.stderr.decode()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_stored_message_is_not_handed_to_the_next_daemon_when_waiting_fails(built, peer, command):  # noqa: F811
    stored = peer(SEND=b"OK 01STORED\r\n", WAIT=b"HTTP/1.1 400 Bad Request\r\n")
    other = peer(SEND=b"OK 01DUPLICATE\r\n")
    done = subprocess.run([*COMMANDS[command], "--server", stored.uri, "--server", other.uri, *MESSAGE,
                           "--wait", "5"], input=b"x", capture_output=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")})
    assert done.returncode == CODES["EX_TEMPFAIL"], done.stderr.decode()
    assert done.stdout.decode().splitlines()[0] == "01STORED"
    assert other.connections == [], "sent again elsewhere: a duplicate"
