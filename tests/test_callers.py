"""Callers as principals (PROTOCOL.md "Authentication and callers",
docs/callers.md): a real daemon, real sockets, a real upstream.

Who may see whose message (STATUS, WAIT), whose idempotency key is whose,
a Unix peer known by its uid (a client run as `nobody`), each caller's
policy (senders in the envelope and the header, recipients), its rate and
its cap on messages not yet final, the SMTP door's AUTH as a caller, ids
that tell nothing of the next one, and a spool of the previous schema.
"""

from __future__ import annotations

from itertools import pairwise
import json
import os
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from email.errors import NonASCIILocalPartDefect, ObsoleteHeaderDefect
from email.policy import default as email_policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import read_line, read_lines

from smtpgate.config import ConfigError, load_config
from smtpgate.intake.callers import Callers, SlidingCount
from smtpgate.intake.peer import Peer
from smtpgate.spool.schema import SCHEMA_VERSION
from smtpgate.message.originators import _PLAIN_FIELD, _field_addresses
from smtpgate.message.validate import validate_send
from smtpgate.spool.schema import SCHEMA_V1

# Tokens of 16 characters and more (shorter ones are a configuration error).
TOKEN_A = "tok-a-51f0c3e98d2b7a46"
TOKEN_B = "tok-b-0e7c2d19a8f4b635"
TOKEN_C = "tok-c-9d3a61b7e0c5f248"
NOBODY = 65534


def send_line(message: dict) -> str:
    return "SEND " + json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def message(subject: str = "hi", **fields) -> dict:
    return {"from": "App <app@shop.example>", "to": "kelly@example.org", "subject": subject,
            "text": "hello", **fields}


class Line:
    """One line-protocol connection (TCP or Unix); `ask` returns the raw reply line."""

    def __init__(self, address, token: str | None = None):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(address)
        if token is not None:
            assert self.ask(f"AUTH {token}") == "OK"

    def ask(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return read_line(self.sock)

    def send(self, msg: dict) -> str:
        return self.ask(send_line(msg))

    def sent_id(self, msg: dict) -> str:
        reply = self.send(msg)
        assert reply.startswith("OK "), reply
        return reply[3:]

    def stats(self) -> dict:
        return json.loads(self.ask("STATS")[3:])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def token_file(folder, name: str, *tokens: str) -> str:
    path = folder / f"{name}.token"
    path.write_text("".join(t + "\n" for t in tokens))
    path.chmod(0o600)
    return str(path)


def start(make_daemon, callers: dict | None = None, **settings):
    """A daemon whose configuration also has the [callers.NAME] tables of `callers`."""
    daemon = make_daemon(start=False, **settings)
    write_plain = daemon.write_config

    def write_config():
        write_plain()
        with open(daemon.config_path, "a") as fh:
            for name, table in (callers or {}).items():
                fh.write(f"\n[callers.{name}]\n")
                # JSON's strings, numbers, booleans and arrays are TOML's too.
                fh.writelines(f"{key} = {json.dumps(value)}\n" for key, value in table.items())

    daemon.write_config = write_config
    return daemon.start()


@pytest.fixture
def two_callers(make_daemon, tmp_path):
    """Named callers shop (TOKEN_A) and blog (TOKEN_B), and TOKEN_C unnamed."""
    return start(make_daemon, tokens=[TOKEN_C], callers={
        "shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A)},
        "blog": {"token_file": token_file(tmp_path, "blog", TOKEN_B)},
    })


# -- ownership ---------------------------------------------------------------

def test_another_callers_message_is_not_found_exactly_like_an_unknown_id(two_callers, upstream):
    with Line(two_callers.tcp, TOKEN_A) as shop, Line(two_callers.tcp, TOKEN_B) as blog, \
            Line(two_callers.tcp, TOKEN_C) as unnamed:
        msg_id = shop.sent_id(message("for shop only"))
        made_up = msg_id[:10] + "0" * 16
        for other in (blog, unnamed):
            for verb in ("STATUS {}", "WAIT {} 0", "WAIT {} 1"):
                theirs = other.ask(verb.format(msg_id))
                unknown = other.ask(verb.format(made_up))
                assert theirs.startswith("ERR NOT_FOUND ")
                assert theirs.replace(msg_id, "ID") == unknown.replace(made_up, "ID")
        assert json.loads(shop.ask(f"WAIT {msg_id} 20")[3:])["state"] == "sent"
    [received] = upstream.wait_for(1)
    assert received.message["Subject"] == "for shop only"


def test_idempotency_keys_are_each_callers_own(two_callers, upstream):
    with Line(two_callers.tcp, TOKEN_A) as shop, Line(two_callers.tcp, TOKEN_B) as blog:
        first = shop.sent_id(message("shop's order", idempotency_key="order-4711"))
        assert shop.sent_id(message("shop's order", idempotency_key="order-4711")) == first
        other = blog.sent_id(message("blog's order", idempotency_key="order-4711"))
        assert other != first
        assert blog.sent_id(message("blog's order", idempotency_key="order-4711")) == other
        assert json.loads(blog.ask(f"WAIT {other} 20")[3:])["state"] == "sent"
        assert shop.stats()["counters"]["accepted"] == 2
    received = upstream.wait_for(2)
    assert sorted(m.message["Subject"] for m in received) == ["blog's order", "shop's order"]


# -- a Unix peer by its uid ----------------------------------------------------

NOBODY_CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(20)
sock.connect(sys.argv[1])
replies = []
for line in sys.argv[2:]:
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    replies.append(data.decode().rstrip("\r\n"))
print(json.dumps(replies))
"""


def as_nobody(socket_path: str, *lines: str) -> list[str]:
    """Run a client as uid/gid 65534 (the system's Python, readable by all)
    against the Unix socket; its replies, one per line."""
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-I", "-c",
         NOBODY_CLIENT, socket_path, *lines],
        capture_output=True, text=True, timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def public_dir():
    """A folder any user may enter (pytest's tmp_path is root's alone)."""
    folder = tempfile.mkdtemp(prefix="smtpgate-callers-")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_unix_peer_is_a_caller_by_its_uid_with_its_policy(make_daemon, upstream, tmp_path, public_dir):
    assert os.geteuid() == 0, "the tests run as root, to run a client as another user"
    path = os.path.join(public_dir, "smtpgate.sock")
    start(make_daemon, socket=path, socket_mode=0o666, callers={
        "pool": {"uid": NOBODY, "allowed_senders": ["@pool.example"]},
        "cron": {"token_file": token_file(tmp_path, "cron", TOKEN_A)},
    })
    allowed = message("from the pool", **{"from": "Pool <web@pool.example>"})
    replies = as_nobody(path, "PING", send_line(allowed), send_line(message("forged")), "STATS")
    assert replies[0] == "OK PONG"
    assert replies[1].startswith("OK ")
    pool_id = replies[1][3:]
    assert replies[2] == "ERR DENIED sender app@shop.example is not allowed"
    callers = json.loads(replies[3][3:])["callers"]
    assert set(callers) == {"pool", "cron"}  # bounded by the configuration
    assert callers["pool"]["accepted"] == 1 and callers["pool"]["refused"] == {"DENIED": 1}
    assert as_nobody(path, f"WAIT {pool_id} 20")[0].startswith('OK {"id":"' + pool_id + '","state":"sent"')

    # Root's uid is no caller here: on the same socket it must AUTH, and as
    # cron it does not see the pool's message.
    with Line(path) as root:
        assert root.send(message()) == "ERR AUTH_REQUIRED send AUTH <token> first"
        assert root.ask(f"AUTH {TOKEN_A}") == "OK"
        assert root.ask(f"STATUS {pool_id}") == f"ERR NOT_FOUND no message {pool_id}"
    [received] = upstream.wait_for(1)
    assert received.mail_from == "web@pool.example"


def test_an_open_daemon_serves_every_unix_peer_as_the_anonymous_caller(make_daemon, public_dir):
    path = os.path.join(public_dir, "smtpgate.sock")
    make_daemon(socket=path, socket_mode=0o666)
    [sent] = as_nobody(path, send_line(message()))
    with Line(path) as root:
        assert root.ask(f"STATUS {sent[3:]}").startswith("OK ")  # the same (anonymous) caller
        assert set(root.stats()["callers"]) == {"anonymous"}


# -- policy --------------------------------------------------------------------

def test_a_forged_header_sender_is_denied_and_nothing_queued(make_daemon, upstream, tmp_path):
    daemon = start(make_daemon, tokens=[TOKEN_C], allowed_senders=["@example.net"], callers={
        "shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A), "allowed_senders": ["@shop.example"]},
    })
    forged = [
        {"raw": "From: CEO <ceo@bank.example>\r\nTo: kelly@example.org\r\nSubject: wire\r\n\r\nPay.\r\n"},
        {"raw": "From: Shop <app@shop.example>\r\nSender: ceo@bank.example\r\n\r\nPay.\r\n"},
        {"raw": "From: \"ceo@bank.example\" <app@shop.example>\r\n\r\nPay.\r\n"},
        {"raw": "From: app@shop.example <ceo@bank.example>\r\n\r\nPay.\r\n"},  # read two ways: refused
        {"raw": "Resent-From: ceo@bank.example\r\nFrom: app@shop.example\r\n\r\nPay.\r\n"},
        {"raw": "From: app@shop.example <ceo@intranet>\r\n\r\nPay.\r\n"},  # no dot: only the parser sees it
        {"subject": "wire", "text": "Pay.", "headers": {"Sender": "CEO <ceo@bank.example>"}},
    ]
    with Line(daemon.tcp, TOKEN_A) as shop:
        for fields in forged:
            msg = {"from": "app@shop.example", "to": "kelly@example.org", **fields}
            reply = shop.send(msg)
            assert reply.startswith("ERR DENIED "), (fields, reply)
        assert shop.send(message("envelope", **{"from": "ceo@bank.example"})) == \
            "ERR DENIED sender ceo@bank.example is not allowed"
        good = shop.sent_id({"from": "app@shop.example", "to": "kelly@example.org",
                             "raw": "From: Shop <APP@Shop.Example>\r\nSubject: ok\r\n\r\nHi.\r\n"})
        stats = shop.stats()
    assert stats["counters"]["accepted"] == 1
    assert stats["callers"]["shop"]["refused"] == {"DENIED": len(forged) + 1}
    # The unnamed token has the top-level policy: @example.net only.
    with Line(daemon.tcp, TOKEN_C) as unnamed:
        assert unnamed.send(message()) == "ERR DENIED sender app@shop.example is not allowed"
        assert unnamed.send(message(**{"from": "x@example.net"})).startswith("OK ")
    received = upstream.wait_for(2)
    assert sorted(m.mail_from for m in received) == ["app@shop.example", "x@example.net"]
    assert [m for m in received if m.mail_from == "app@shop.example"][0].message["Subject"] == "ok"
    with Line(daemon.tcp, TOKEN_A) as shop:
        assert json.loads(shop.ask(f"STATUS {good}")[3:])["id"] == good


def test_hostile_sender_fields_are_refused_within_a_bound(make_daemon, tmp_path):
    """Python's address parser is slow on some shapes and fails on others:
    such fields are refused (DENIED), never an INTERNAL error, and never
    read past a few hundred characters."""
    daemon = start(make_daemon, hold=True, callers={
        "shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A), "allowed_senders": ["@shop.example"]},
    })
    nested = "\r\n ".join(["(" * 90] * 4) + "x" + "\r\n ".join([")" * 90] * 4)
    hostile = {
        "From: " + nested + " app@shop.example\r\n": "header From: too long to check",
        "From: app" + " ." * 300 + "@shop.example\r\n": "header From: too long to check",
        "From: g:app@shop.example;h:app@shop.example;\r\n": "header From: cannot be read",
        "From: app@shop.example\r\n" * 17: "more than 16 From, Sender",
    }
    with Line(daemon.tcp, TOKEN_A) as shop:
        for head, refusal in hostile.items():
            reply = shop.send({"from": "app@shop.example", "to": "kelly@example.org", "raw": head + "\r\nPay.\r\n"})
            assert reply.startswith(f"ERR DENIED {refusal}"), reply
        # Nested comments within the bound are read, and what they hold is checked.
        assert shop.send({"from": "app@shop.example", "to": "kelly@example.org",
                          "raw": "From: " + "(" * 50 + "ceo@bank.example" + ")" * 50 + " app@shop.example\r\n\r\nx"}) \
            == "ERR DENIED header sender ceo@bank.example is not allowed"
        assert shop.send({"from": "app@shop.example", "to": "kelly@example.org",
                          "raw": "From: J. R. Smith (orders) <app@shop.example>\r\n\r\nx"}).startswith("OK ")
    assert not [line for line in daemon.log_lines() if line.get("event") == "request_failed"]


def test_allowed_recipients_per_caller(make_daemon, tmp_path):
    daemon = start(make_daemon, callers={
        "alerts": {"token_file": token_file(tmp_path, "alerts", TOKEN_A), "allowed_recipients": ["ops@example.org"]},
    })
    with Line(daemon.tcp, TOKEN_A) as alerts:
        assert alerts.send(message(to=["ops@example.org", "kelly@example.org"])) == \
            "ERR DENIED recipient kelly@example.org is not allowed"
        assert alerts.send(message(to="OPS@EXAMPLE.ORG")).startswith("OK ")


def test_the_rate_limit_answers_busy_with_the_time_to_wait_and_stores_nothing(make_daemon, tmp_path):
    daemon = start(make_daemon, hold=True, callers={
        "burst": {"token_file": token_file(tmp_path, "burst", TOKEN_A), "sends_per_minute": 3},
        "daily": {"token_file": token_file(tmp_path, "daily", TOKEN_B), "sends_per_day": 2},
    })
    with Line(daemon.tcp, TOKEN_A) as burst, Line(daemon.tcp, TOKEN_B) as daily:
        # A refused SEND takes no share of the rate.
        assert burst.send(message(to="not an address")).startswith("ERR BAD_ADDRESS")
        ids = [burst.sent_id(message(f"n{i}")) for i in range(3)]
        busy = [burst.send(message("over")) for _ in range(2)]
        for reply in busy:
            head, _, wait = reply.rpartition(" retry in ")
            assert head == "ERR BUSY rate limit 3/min reached,", reply
            assert wait.endswith(" s") and 1 <= int(wait[:-2]) <= 61, reply
        # A repeat of an idempotency key stores nothing: it does not count.
        assert daily.sent_id(message("d", idempotency_key="k1")) == daily.sent_id(message("d", idempotency_key="k1"))
        daily.sent_id(message("d2"))
        reply = daily.send(message("d3"))
        head, _, wait = reply.rpartition(" retry in ")
        assert head == "ERR BUSY rate limit 2/day reached,", reply
        assert 86400 - 120 < int(wait[:-2]) <= 86400 + 1440, reply
        stats = burst.stats()
    assert stats["counters"]["accepted"] == 5 and stats["states"]["queued"] == 5
    assert stats["callers"]["burst"] == {"accepted": 3, "refused": {"BAD_ADDRESS": 1, "BUSY": 2}, "pending": 3,
                                         "delivered": 0, "failed": 0, "deferred": 0}
    assert len(set(ids)) == 3
    limited = [line for line in daemon.log_lines() if line.get("event") == "caller_rate_limited"]
    assert [line["caller"] for line in limited] == ["burst", "daily"]  # one line per episode


def test_max_pending_counts_from_the_spool_across_a_restart(make_daemon, upstream, tmp_path):
    callers = {"shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A), "max_pending": 2},
               "blog": {"token_file": token_file(tmp_path, "blog", TOKEN_B)}}
    daemon = start(make_daemon, hold=True, callers=callers)
    cap = "ERR BUSY nothing stored: caller shop has 2 messages not yet final (max_pending); " \
          "retry once some are delivered"
    with Line(daemon.tcp, TOKEN_A) as shop, Line(daemon.tcp, TOKEN_B) as blog:
        first = shop.sent_id(message("one", idempotency_key="k-one"))
        # Pipelined SENDs share one commit: the cap holds exactly within it.
        shop.sock.sendall(b"".join(send_line(message(f"p{i}")).encode() + b"\n" for i in range(3)))
        replies = read_lines(shop.sock, 3)
        assert replies[0].startswith("OK ") and replies[1:] == [cap] * 2
        assert shop.sent_id(message("one", idempotency_key="k-one")) == first  # a repeat stores nothing
        assert blog.send(message("blog")).startswith("OK ")  # another caller is not held back
        assert shop.stats()["callers"]["shop"]["pending"] == 2
    daemon.stop()
    daemon.start()
    with Line(daemon.tcp, TOKEN_A) as shop:
        assert shop.send(message("three")) == cap
        assert shop.stats()["callers"]["shop"] == {"accepted": 0, "refused": {"BUSY": 1}, "pending": 2,
                                                   "delivered": 0, "failed": 0, "deferred": 0}
    daemon.settings["hold"] = False
    daemon.reload()
    upstream.wait_for(3)
    with Line(daemon.tcp, TOKEN_A) as shop:
        assert json.loads(shop.ask(f"WAIT {first} 20")[3:])["state"] == "sent"
        deadline = time.monotonic() + 20
        while shop.stats()["callers"]["shop"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shop.send(message("three")).startswith("OK ")


def test_a_send_refused_at_commit_keeps_its_place_before_a_repeat(make_daemon, tmp_path):
    """The spool's writer answers a connection's SENDs itself (spool/lent.py)
    but not the ones it refuses: a SEND over max_pending, pipelined before
    the repeat of a stored one (which the writer could answer at once),
    still gets its ERR first."""
    callers = {"shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A), "max_pending": 1}}
    daemon = start(make_daemon, hold=True, callers=callers)
    cap = "ERR BUSY nothing stored: caller shop has 1 messages not yet final (max_pending); " \
          "retry once some are delivered"
    with Line(daemon.tcp, TOKEN_A) as shop:
        first = shop.sent_id(message("one", idempotency_key="k-one"))
        for _ in range(3):
            shop.sock.sendall((send_line(message("two")) + "\n"
                               + send_line(message("one", idempotency_key="k-one")) + "\n").encode())
            assert read_lines(shop.sock, 2) == [cap, f"OK {first}"]


def test_a_reload_applies_to_open_connections(make_daemon, tmp_path):
    callers = {"shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A)},
               "blog": {"token_file": token_file(tmp_path, "blog", TOKEN_B)}}
    daemon = start(make_daemon, hold=True, callers=callers)
    with Line(daemon.tcp, TOKEN_A) as shop, Line(daemon.tcp, TOKEN_B) as blog:
        assert shop.send(message()).startswith("OK ")
        callers["shop"]["allowed_recipients"] = ["@example.net"]
        del callers["blog"]
        daemon.reload()
        assert shop.send(message()) == "ERR DENIED recipient kelly@example.org is not allowed"
        assert blog.send(message()) == "ERR AUTH_REQUIRED send AUTH <token> first"
        assert blog.ask(f"AUTH {TOKEN_B}") == "ERR AUTH_FAILED wrong token"
        assert set(shop.stats()["callers"]) == {"shop"}
    # Every line about a request names its caller: here nobody yet.
    [failed] = [line for line in daemon.log_lines() if line.get("event") == "auth_failed"]
    assert "caller" in failed and failed["caller"] is None


def test_a_token_taken_away_by_a_reload_is_no_good_on_connections_that_showed_it(make_daemon, tmp_path):
    """A leaked token is rotated out and the daemon reloaded: a connection
    that AUTHed with it must AUTH again, at both doors, while one whose
    token is still the caller's goes on as that caller (its counts too)."""
    port = _free_port()
    callers = {"shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A, TOKEN_C)}}
    daemon = start(make_daemon, hold=True, callers=callers, smtp_listen=f"127.0.0.1:{port}")
    with Line(daemon.tcp, TOKEN_A) as leaked, Line(daemon.tcp, TOKEN_C) as kept, \
            smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.login("shop", TOKEN_A)
        assert leaked.send(message()).startswith("OK ") and kept.send(message()).startswith("OK ")
        callers["shop"]["token_file"] = token_file(tmp_path, "shop", TOKEN_C)
        daemon.reload()
        assert leaked.send(message()) == "ERR AUTH_REQUIRED send AUTH <token> first"
        assert leaked.ask(f"AUTH {TOKEN_A}") == "ERR AUTH_FAILED wrong token"
        assert kept.send(message()).startswith("OK ")
        assert kept.stats()["callers"]["shop"]["accepted"] == 3
        assert smtp.mail("app@example.com")[0] == 530  # a new session, a new AUTH
    # A WAIT that runs through such a reload does not answer the message's state.
    with Line(daemon.tcp, TOKEN_C) as waiting:
        msg_id = waiting.send(message())[3:]
        waiting.sock.sendall(f"WAIT {msg_id} 4\n".encode())  # longer than a reload takes
        callers["shop"]["token_file"] = token_file(tmp_path, "shop", TOKEN_A)
        daemon.reload()
        assert read_line(waiting.sock) == "ERR AUTH_REQUIRED send AUTH <token> first"


# -- the SMTP door ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_smtp_door_authenticates_named_callers_and_applies_their_policy(make_daemon, upstream, tmp_path):
    port = _free_port()
    daemon = start(make_daemon, smtp_listen=f"127.0.0.1:{port}", tokens=[TOKEN_C], callers={
        "shop": {"token_file": token_file(tmp_path, "shop", TOKEN_A), "allowed_senders": ["@shop.example"],
                 "allowed_recipients": ["@example.org"], "sends_per_minute": 2},
        "blog": {"token_file": token_file(tmp_path, "blog", TOKEN_B)},
    })
    body = b"From: Shop <app@shop.example>\r\nTo: kelly@example.org\r\nSubject: via smtp\r\n\r\nHi.\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("blog", TOKEN_A)  # shop's token under another caller's name
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login("shop", TOKEN_A)
        assert client.mail("ceo@bank.example") == (550, b"5.7.1 sender ceo@bank.example is not allowed")
        client.rset()
        client.mail("app@shop.example")
        assert client.rcpt("x@elsewhere.test") == (550, b"5.7.1 recipient x@elsewhere.test is not allowed")
        client.rset()
        with pytest.raises(smtplib.SMTPDataError) as forged:
            client.sendmail("app@shop.example", ["kelly@example.org"],
                            body.replace(b"Shop <app@shop.example>", b"CEO <ceo@bank.example>"))
        assert forged.value.smtp_code == 550
        client.sendmail("app@shop.example", ["kelly@example.org"], body)
        client.sendmail("app@shop.example", ["kelly@example.org"], body)
        with pytest.raises(smtplib.SMTPDataError) as busy:
            client.sendmail("app@shop.example", ["kelly@example.org"], body)
        assert busy.value.smtp_code == 451
        assert busy.value.smtp_error.decode().startswith("4.7.1 rate limit 2/min reached, retry in ")
    received = upstream.wait_for(2)
    assert [m.mail_from for m in received] == ["app@shop.example"] * 2
    accepted = [line for line in daemon.log_lines() if line.get("event") == "smtp_accepted"]
    assert [line["caller"] for line in accepted] == ["shop", "shop"]
    ids = [line["message_id"] for line in accepted]
    # What came in by SMTP is shop's over the line protocol too, and no one else's.
    with Line(daemon.tcp, TOKEN_A) as shop, Line(daemon.tcp, TOKEN_B) as blog:
        assert shop.ask(f"STATUS {ids[0]}").startswith("OK ")
        assert blog.ask(f"STATUS {ids[0]}") == f"ERR NOT_FOUND no message {ids[0]}"
    # An unnamed token logs in under any user name.
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login("whoever", TOKEN_C)
        client.sendmail("app@shop.example", ["kelly@example.org"], body)
    assert upstream.wait_for(3)[2].mail_from == "app@shop.example"


# -- ids -------------------------------------------------------------------------

_FROM_CROCKFORD = str.maketrans("0123456789ABCDEFGHJKMNPQRSTVWXYZ", "0123456789abcdefghijklmnopqrstuv")


def test_ids_of_one_caller_in_one_millisecond_are_not_adjacent(make_daemon):
    daemon = make_daemon(hold=True)
    groups: dict[str, list[int]] = {}
    for _ in range(5):  # bounded: 300 SENDs a round share milliseconds on any machine
        with Line(daemon.tcp) as line:
            line.sock.sendall(b"".join(send_line(message(f"n{i}")).encode() + b"\n" for i in range(300)))
            ids = [reply[3:] for reply in read_lines(line.sock, 300)]
        for msg_id in ids:
            groups.setdefault(msg_id[:10], []).append(int(msg_id[10:].translate(_FROM_CROCKFORD), 32))
        if any(len(g) > 1 for g in groups.values()):
            break
    shared = [sorted(g) for g in groups.values() if len(g) > 1]
    assert shared, "no two SENDs in one millisecond"
    # Drawn afresh, two 80-bit parts are within 2**40 once in ~2**40 pairs.
    assert min(b - a for g in shared for a, b in pairwise(g)) > 1 << 40


# -- a spool of schema version 1 ------------------------------------------------------

def test_a_spool_of_schema_1_is_upgraded_and_keeps_its_messages(make_daemon, upstream, tmp_path):
    """Rows as smtpgate 0.1 (schema 1) wrote them: a queued message with an
    idempotency key, and a sent one."""
    daemon = make_daemon(start=False)
    os.makedirs(daemon.spool, mode=0o700)
    spec = validate_send(message("from before"), max_message_bytes=1 << 20).to_json()
    now = time.time()
    db = sqlite3.connect(os.path.join(daemon.spool, "spool.sqlite3"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_V1)
    queued, sent = "01JD3Q7Z8K4W6X2V9N5B0C1T00", "01JD3Q7Z8K4W6X2V9N5B0C1T01"
    db.execute("INSERT INTO messages (id, state, envelope_from, spec, idempotency_key, created, updated,"
               " next_attempt) VALUES (?, 'queued', 'app@shop.example', ?, 'old-key', ?, ?, ?)",
               (queued, spec, now, now, now))
    db.execute("INSERT INTO messages (id, state, envelope_from, spec, attempts, created, updated, next_attempt)"
               " VALUES (?, 'sent', 'app@shop.example', ?, 1, ?, ?, ?)", (sent, spec, now, now, now))
    db.executemany("INSERT INTO recipients VALUES (?, 'kelly@example.org', 0, ?, ?)",
                   [(queued, "queued", None), (sent, "sent", "250 2.0.0 Ok")])
    db.execute("INSERT INTO idempotency VALUES ('old-key', ?, ?)", (queued, now))
    db.close()
    # The queue tool reads only the tables it knows; the daemon upgrades them.
    early = subprocess.run([sys.executable, "-m", "smtpgate", "queue", "--spool", daemon.spool, "list"],
                           capture_output=True, text=True, timeout=30)
    assert early.returncode != 0 and f"has schema 1, this smtpgate reads {SCHEMA_VERSION}: start the daemon once" in early.stderr

    daemon.start()
    [upgraded] = [line for line in daemon.log_lines() if line.get("event") == "spool_upgraded"]
    assert (upgraded["schema_from"], upgraded["schema_to"]) == (1, SCHEMA_VERSION)
    [received] = upstream.wait_for(1)
    assert received.message["Subject"] == "from before"
    with Line(daemon.tcp) as anonymous:  # the owner of what schema 1 stored
        assert json.loads(anonymous.ask(f"WAIT {queued} 20")[3:])["state"] == "sent"
        assert json.loads(anonymous.ask(f"STATUS {sent}")[3:])["recipients"][0]["reply"] == "250 2.0.0 Ok"
        assert anonymous.sent_id(message("again", idempotency_key="old-key")) == queued
    listing = subprocess.run([sys.executable, "-m", "smtpgate", "queue", "--spool", daemon.spool, "list", "--all",
                              "--json"],
                             capture_output=True, text=True, timeout=30, check=True)
    assert {m["id"]: m["caller"] for m in json.loads(listing.stdout)} == {queued: "anonymous", sent: "anonymous"}
    daemon.stop()
    daemon.start()  # opened again: nothing more to upgrade
    assert len([line for line in daemon.log_lines() if line.get("event") == "spool_upgraded"]) == 1


# -- the parts, without a daemon ----------------------------------------------------

def test_the_configuration_refuses_what_would_make_two_callers_one(tmp_path, monkeypatch):
    shared = token_file(tmp_path, "shared", TOKEN_A)
    short = token_file(tmp_path, "short", "only-15-chars-x")
    open_file = token_file(tmp_path, "open", TOKEN_B)
    os.chmod(open_file, 0o644)

    def load(text: str):
        path = tmp_path / "smtpgate.toml"
        path.write_text('upstream = ["127.0.0.1:25"]\nupstream_tls = "none"\n' + text)
        return load_config(str(path))

    errors = {
        f'tokens = ["{TOKEN_A}"]\n[callers.a]\ntoken_file = "{shared}"\n': "callers.a.token_file: a token in it",
        f'[callers.a]\ntoken_file = "{shared}"\n[callers.b]\ntoken_file = "{shared}"\n': "callers.b.token_file",
        '[callers.a]\nuid = 33\n[callers.b]\nunix_user = "www-data"\n': "callers.b: callers.a has the same",
        '[callers.a]\nuid = 33\nunix_user = "www-data"\n': "callers.a.uid: give unix_user or uid",
        '[callers.a]\nunix_user = "no-such-user-here"\n': "callers.a.unix_user: no user",
        '[callers.a]\nsends_per_minute = 60\n': "callers.a: nothing identifies",
        '[callers.a]\nuid = 33\ntokens = ["x"]\n': "callers.a.tokens: unknown key",
        '[callers.anonymous]\nuid = 33\n': "callers.anonymous: a caller's name",
        '[callers.token-1]\nuid = 33\n': "callers.token-1: a caller's name",
        '[callers.a]\nuid = 33\nmax_pending = -1\n': "callers.a.max_pending: must not be negative",
        '[callers.a]\nuid = 33\nallowed_senders = 5\n': "callers.a.allowed_senders: expected a string or a list",
        'callers = 5\n': "callers: expected tables",
        f'[callers.a]\ntoken_file = "{short}"\n': "callers.a.token_file: a token has 15 characters",
        f'[callers.a]\ntoken_file = "{open_file}"\n': "callers.a.token_file:",
    }
    for text, start_of_error in errors.items():
        with pytest.raises(ConfigError) as refused:
            load(text)
        assert str(refused.value).startswith(start_of_error), (text, str(refused.value))
    config = load(f'sends_per_minute = 10\n[callers.a]\ntoken_file = "{shared}"\nunix_group = "root"\n'
                  '[callers.b]\nuid = 33\ngid = 33\nsends_per_minute = 0\n')
    assert (config.callers["a"].tokens, config.callers["a"].gid) == ([TOKEN_A], 0)
    assert TOKEN_A not in repr(config)
    # In a user namespace that maps only some ids (systemd's PrivateUsers=yes),
    # every other user's connection shows as nobody: no caller by uid then.
    namespace = tmp_path / "uid_map"
    namespace.write_text("         0      61184          1\n     65534      65534          1\n")
    monkeypatch.setattr("smtpgate.config.UID_MAP", str(namespace))
    with pytest.raises(ConfigError, match=r"^callers\.b\.unix_user: this daemon runs in a user namespace"):
        load('[callers.b]\nuid = 33\n')
    monkeypatch.undo()
    callers = Callers(config, b"k")
    assert callers.by_name["a"].policy.sends_per_minute == 10  # the top-level key's
    assert callers.by_name["b"].policy.sends_per_minute == 0  # its own


def test_callers_by_peer_token_and_login():
    from smtpgate.config import CallerConfig, Config

    config = Config(tokens=[TOKEN_C], callers={
        "www": CallerConfig("www", uid=33),
        "www-shop": CallerConfig("www-shop", uid=33, gid=1001),
        "staff": CallerConfig("staff", gid=50),
        "cron": CallerConfig("cron", tokens=[TOKEN_A, TOKEN_B]),
    })
    callers = Callers(config, b"spool key")

    def unix(uid, gid):
        return Peer("unix", "/run/smtpgate.sock", uid, gid, 4242)

    def name(caller):
        return caller.name if caller is not None else None

    assert name(callers.for_peer(unix(33, 33))) == "www"
    assert name(callers.for_peer(unix(33, 1001))) == "www-shop"
    assert name(callers.for_peer(unix(1000, 50))) == "staff"
    assert name(callers.for_peer(unix(1000, 1000))) is None  # must AUTH
    assert name(callers.for_peer(Peer("tcp", "127.0.0.1:5000", None, None, None))) is None
    assert name(callers.for_token(TOKEN_B.encode())) == "cron"
    assert name(callers.for_token(TOKEN_B[:-1].encode())) is None
    unnamed = callers.token_name(TOKEN_C)
    assert name(callers.for_token(TOKEN_C.encode())) == unnamed
    assert unnamed.startswith("token-") and len(unnamed) == 18
    assert Callers(config, b"another key").token_name(TOKEN_C) != unnamed  # keyed
    assert name(callers.for_login("cron", TOKEN_A.encode())) == "cron"
    assert name(callers.for_login("www", TOKEN_A.encode())) is None
    assert name(callers.for_login("anyone", TOKEN_C.encode())) == unnamed
    open_daemon = Callers(Config(), b"k")
    assert name(open_daemon.for_peer(unix(1000, 1000))) == "anonymous"
    assert not open_daemon.has_tokens


_NAME_CHARS = st.sampled_from(list("abcXYZ09 \t!#$%&'*+/^_`{|}~-.\"()@,;:<>=?[]\\") + ["张", "é", "\u00a0"])
_ATOMS = st.text(alphabet=st.sampled_from(list("az09!#$%&'*+/=?^_`{|}~-")), min_size=1, max_size=6)
_LOCAL = st.lists(_ATOMS, min_size=1, max_size=3).map(".".join)
_DOMAIN = st.lists(st.text(alphabet=st.sampled_from(list("az09-")), min_size=1, max_size=6),
                   min_size=2, max_size=3).map(".".join)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_NAME_CHARS, max_size=12), _LOCAL, _DOMAIN, st.booleans(), st.sampled_from(["", " ", "\t "]))
def test_plain_fields_are_read_as_the_full_parser_reads_them(name, local, domain, angle, pad):
    """The shortcut for `addr` and `Name <addr>` (originators.py) reads
    what Python's full address parser reads, where it applies."""
    address = f"{local}@{domain}"
    value = f"{pad}{name}<{address}>{pad}" if angle else f"{pad}{address}{pad}"
    plain = _PLAIN_FIELD.fullmatch(value)
    if plain is None:
        return
    header = email_policy.header_factory("from", value)
    assert [a.addr_spec for a in header.addresses] == [address]
    assert not [d for d in header.defects if not isinstance(d, (NonASCIILocalPartDefect, ObsoleteHeaderDefect))]
    assert _field_addresses("from", value, [0]) == [address]  # no budget needed


def test_the_sliding_count_never_lets_more_than_its_limit_into_any_window():
    window = SlidingCount(5, 60.0)
    accepted, now = [], 1000.0
    while now < 1400.0:
        if not window.wait(now):
            window.add(now)
            accepted.append(now)
        now += 0.7
    assert all(sum(t <= s < t + 60 for s in accepted) <= 5 for t in accepted)
    assert len(accepted) >= 5 * (400 // 61)  # and it does let them in
    # The time to wait is when the oldest counted step runs out.
    window = SlidingCount(2, 60.0)
    window.add(10.5)
    window.add(30.2)
    assert window.wait(31.0) == pytest.approx(71.0 - 31.0)  # step [10, 11) counts until 71
    window.remove_newest()
    assert window.wait(31.0) == 0.0
