"""A dead upstream costs nothing (issue 11): upstream health, the outage
drain, the timeouts a user can set, what a restart knows, stopping with a
stuck upstream.

Real parts: the daemon as a subprocess (conftest's `make_daemon`), aiosmtpd
upstreams in-process (conftest's `upstream`, stopped and started again on
the same port), and, where no real server misbehaves on cue, `Scripted`: a
real socket server speaking SMTP bytes that refuses every session at the
greeting, stalls at a chosen stage, or takes every message, and counts its
connections. Pure parts (the backoff, the dot record) without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from test_daemon import SIMPLE, ok_payload, send_line, wait_final
from test_queuetool import epoch, smtpgate

from support import read_lines, stuck_listener
from smtpgate.config import ConfigError, load_config
from smtpgate.delivery.health import DOWN, UP, Health
from smtpgate.smtp import SmtpConnectError
from smtpgate.spool import dots as dotlog
from smtpgate.spool.schema import DB_FILE, SCHEMA_V1, SCHEMA_VERSION
from smtpgate.spool.store import Spool

# Probes every few tens of milliseconds: an outage's rounds within a test.
QUICK_PROBES = {"upstream_probe_base": 0.05, "upstream_probe_max": 0.2}
# Probes far apart: after the first failure nothing connects for 15 s or
# more (equal jitter: at least half of 30 s) unless something asks for it.
RARE_PROBES = {"upstream_probe_base": 30.0, "upstream_probe_max": 30.0}
BOUND = 20.0  # seconds any wait of these tests may take at most


# --- real parts ------------------------------------------------------------------


class Scripted:
    """A real socket server on 127.0.0.1 speaking SMTP bytes. `mode`, which
    may change while it runs, decides each new session:
    "421": refused at the greeting ("421 4.3.2 ...");
    "stall-greeting", "stall-ehlo", "stall-data", "stall-dot": silent at that
    stage (no greeting; no reply to EHLO; none to DATA; none to the final
    dot, once the whole message arrived) until the server closes;
    "ok": a plain server taking every message.
    Counts `connections`, keeps `bodies` (every message whose dot arrived)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.bodies: list[bytes] = []
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait(self, predicate, timeout: float = BOUND) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        self.closed.set()
        # shutdown wakes the accept() blocked in the other thread, so that
        # thread ends now; close() alone leaves it waiting on the socket,
        # to pick up a later test's connections if the number is reused.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.cond:
                self.connections += 1
                self._sockets.append(sock)
                self.cond.notify_all()
            threading.Thread(target=self._serve, args=(sock, self.mode), daemon=True).start()

    def _serve(self, sock: socket.socket, mode: str) -> None:
        try:
            if mode == "421":
                sock.sendall(b"421 4.3.2 Service not available\r\n")
                return
            if mode == "stall-greeting":
                self.closed.wait(BOUND * 3)
                return
            sock.sendall(b"220 scripted ESMTP\r\n")
            lines = sock.makefile("rb")
            while line := lines.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    if mode == "stall-ehlo":
                        self.closed.wait(BOUND * 3)
                        return
                    reply = b"250-scripted\r\n250 8BITMIME\r\n"
                elif verb == b"DATA":
                    if mode == "stall-data":
                        self.closed.wait(BOUND * 3)
                        return
                    sock.sendall(b"354 go ahead\r\n")
                    body = b"".join(iter(lines.readline, b".\r\n"))
                    with self.cond:
                        self.bodies.append(body)
                        self.cond.notify_all()
                    if mode == "stall-dot":
                        self.closed.wait(BOUND * 3)
                        return
                    reply = b"250 2.0.0 Ok: queued\r\n"
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:  # MAIL, RCPT, RSET, NOOP
                    reply = b"250 2.0.0 Ok\r\n"
                sock.sendall(reply)
        except OSError:
            return
        finally:
            sock.close()


@pytest.fixture
def scripted():
    """scripted(mode) -> a running Scripted server, closed after the test."""
    servers: list[Scripted] = []

    def make(mode: str) -> Scripted:
        servers.append(Scripted(mode))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@contextlib.contextmanager
def gone(upstream):
    """The conftest Upstream stopped (connections refused) for the block,
    then started again on the same port with the same handler (aiosmtpd's
    Controller cannot be started twice)."""
    upstream.stop()
    try:
        yield
    finally:
        upstream.controller = Controller(
            upstream.handler, hostname="127.0.0.1", port=upstream.port, ready_timeout=10,
            data_size_limit=64 * 1024 * 1024, decode_data=False, enable_SMTPUTF8=True)
        upstream.controller.start()


def stats(daemon) -> dict:
    return json.loads(ok_payload(daemon.request("STATS")))


def status(daemon, msg_id: str) -> dict:
    return json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))


def until(condition, what: str, timeout: float = BOUND):
    """Poll `condition()` every 20 ms until it returns something true (returned)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.02)
    return result


def upstream_state(daemon, index: int = 0) -> dict:
    return stats(daemon)["upstreams"][index]


def send(daemon, count: int, **fields) -> list[str]:
    with daemon.connect() as sock:
        sock.sendall(b"".join(f"{send_line(dict(SIMPLE, subject=f'm{i}', **fields))}\n".encode()
                              for i in range(count)))
        return [ok_payload(reply) for reply in read_lines(sock, count)]


def held(daemon, ids: list[str]) -> list[dict]:
    """Every message's STATUS once all of them show held for a down upstream."""
    def all_held():
        states = [status(daemon, i) for i in ids]
        return states if all(s["state"] == "deferred" and "down since" in s["recipients"][0]["reply"]
                             for s in states) else None
    return until(all_held, "every message held")


def events(daemon, name: str, **match) -> list[dict]:
    return [line for line in daemon.log_lines()
            if line.get("event") == name and all(line.get(k) == v for k, v in match.items())]


# --- an upstream that goes away and comes back ---------------------------------------


def test_an_upstream_that_goes_away_holds_messages_untried_and_its_return_sends_them(make_daemon, upstream):
    daemon = make_daemon(**QUICK_PROBES)
    assert wait_final(daemon, send(daemon, 1)[0])["state"] == "sent"  # up, a pooled connection open
    with gone(upstream):
        ids = send(daemon, 20)
        states = held(daemon, ids)
        assert all(s["attempts"] == 0 and "next_attempt" in s for s in states)
        assert all("127.0.0.1:%d down since" % upstream.port in s["recipients"][0]["reply"] for s in states)
        outage = stats(daemon)
        assert outage["states"]["deferred"] == 20 and outage["states"]["queued"] == 0
        [down] = outage["upstreams"]
        assert down["state"] == "down" and down["waiting"] == 20 and "Connection refused" in down["reason"]
        probes = down["failures"]
        until(lambda: upstream_state(daemon)["failures"] > probes, "a probe")  # still probing
    # Back on the same port: no `queue retry`, a probe finds it.
    finals = [wait_final(daemon, i) for i in ids]
    assert [s["state"] for s in finals] == ["sent"] * 20 and {s["attempts"] for s in finals} == {1}
    assert len(upstream.wait_for(21)) == 21
    assert upstream_state(daemon)["state"] == "up"
    # Quiet: one line down, one line back with the count, no line per held message.
    assert len(events(daemon, "upstream_down")) == 1
    [back] = events(daemon, "upstream_up")
    assert back["released"] == 20
    # The line of an attempt is written once its record is committed: it
    # may follow the final state that STATUS shows by a moment.
    attempts = until(lambda: (lines := events(daemon, "delivery_attempt")) and len(lines) >= 21 and lines,
                     "a line per attempt")
    assert len(attempts) == 21 and {line["attempt"] for line in attempts} == {1}
    assert len(events(daemon, "upstream_probe_failed")) <= 1  # at most one a minute


def test_while_every_upstream_is_down_a_new_message_is_held_not_claimed_at_enqueue(make_daemon, upstream):
    """Delivery offers room for messages claimed by their own SEND's commit
    (issue 15); during an outage intake takes none of it: a new message is
    held with the rest at once, and delivery never sees it."""
    daemon = make_daemon(**RARE_PROBES)
    assert wait_final(daemon, send(daemon, 1)[0])["state"] == "sent"
    with gone(upstream):
        held(daemon, send(daemon, 1))  # the outage is known
        before = stats(daemon)["spool"]["operations"]
        ids = send(daemon, 5)
        assert [status(daemon, i)["state"] for i in ids] == ["deferred"] * 5
        outage = stats(daemon)
        assert outage["states"]["sending"] == 0 and outage["upstreams"][0]["waiting"] == 6
        assert outage["spool"]["operations"] - before == 5  # the enqueues: no claim, no release


def test_every_pooled_connection_failing_at_once_is_one_step_of_backoff(make_daemon, upstream):
    daemon = make_daemon(**RARE_PROBES)
    assert {wait_final(daemon, i)["state"] for i in send(daemon, 40)} == {"sent"}  # several pooled
    with gone(upstream):
        held(daemon, send(daemon, 40))  # ten workers find their connections dead and open new ones at once
        down = upstream_state(daemon)
    assert down["failures"] == 1 and epoch(down["next_probe"]) > time.time() + 10  # the first step: 15-30 s


def test_while_down_only_probes_connect_and_queue_retry_probes_at_once(make_daemon, scripted):
    server = scripted("421")
    daemon = make_daemon(upstream=[server.hostport], **RARE_PROBES)
    ids = send(daemon, 20)
    states = held(daemon, ids)
    assert {s["attempts"] for s in states} == {0}
    assert "421 4.3.2 Service not available" in states[0]["recipients"][0]["reply"]
    # One session was tried for twenty messages, and no probe is due for 15 s.
    down = upstream_state(daemon)
    assert server.connections == 1 and down["failures"] == 1
    listing = smtpgate("queue", "--spool", daemon.spool, "list")
    assert f"upstream {server.hostport}: down since" in listing.stdout and "20 messages waiting" in listing.stdout
    shown = json.loads(smtpgate("queue", "--spool", daemon.spool, "show", ids[0]).stdout)
    assert shown["state"] == "deferred" and shown["attempts"] == 0

    retried = smtpgate("queue", "--spool", daemon.spool, "retry", "--all")
    assert retried.returncode == 0 and "20 messages due now" in retried.stdout
    until(lambda: upstream_state(daemon)["failures"] == 2, "the probe queue retry asked for")
    assert server.connections == 2  # that probe, and nothing per message

    server.mode = "ok"
    smtpgate("queue", "--spool", daemon.spool, "retry", "--all")
    assert [wait_final(daemon, i)["state"] for i in ids] == ["sent"] * 20
    assert len(server.bodies) == 20
    assert server.connections <= 2 + 10  # the probe's connection joined the pool


def test_a_refused_login_is_one_login_per_probe(make_daemon, make_upstream, tmp_path):
    logins = []

    def refuse(server, session, envelope, mechanism, auth_data):
        logins.append(mechanism)
        return AuthResult(success=False, handled=False)

    server = make_upstream(auth_require_tls=False, authenticator=refuse)
    password = tmp_path / "pw"
    password.write_text("wrong-password\n")
    password.chmod(0o600)  # a secret open to others stops the start (docs/security.md)
    daemon = make_daemon(upstream=[server.hostport], upstream_user="app@example.com",
                         upstream_password_file=str(password), upstream_allow_plaintext_auth=True,
                         **RARE_PROBES)
    ids = send(daemon, 10)
    states = held(daemon, ids)
    assert {s["attempts"] for s in states} == {0}
    down = upstream_state(daemon)
    assert down["reason"].startswith("535") and down["failures"] == 1
    assert len(logins) == 1  # not one per message, nor one per worker
    smtpgate("queue", "--spool", daemon.spool, "retry", "--all")
    until(lambda: upstream_state(daemon)["failures"] == 2, "the probe")
    assert len(logins) == 2
    assert [line["kind"] for line in events(daemon, "upstream_down")] == ["auth"]


def test_a_second_upstream_takes_over_at_once_and_the_first_is_preferred_once_back(make_daemon, upstream, scripted):
    first = scripted("421")
    daemon = make_daemon(upstream=[first.hostport, upstream.hostport], **QUICK_PROBES)
    ids = send(daemon, 5)
    finals = [wait_final(daemon, i) for i in ids]
    assert [s["state"] for s in finals] == ["sent"] * 5 and {s["attempts"] for s in finals} == {1}
    assert len(upstream.wait_for(5)) == 5
    down, up = stats(daemon)["upstreams"]
    assert down["state"] == "down" and down["waiting"] == 0 and up["state"] == "up"

    first.mode = "ok"  # a probe finds it: it is first in the list again
    until(lambda: upstream_state(daemon)["state"] == "up", "the first upstream back")
    assert wait_final(daemon, send(daemon, 1)[0])["state"] == "sent"
    assert len(first.bodies) == 1 and len(upstream.messages) == 5


def test_a_message_level_4xx_keeps_its_own_backoff_and_the_upstream_stays_up(make_daemon, upstream):
    upstream.script_rcpt("kelly@example.org", "451 4.7.1 greylisted, try later")
    daemon = make_daemon(retry_base=30.0, retry_max=60.0, **QUICK_PROBES)
    [msg_id] = send(daemon, 1)
    state = until(lambda: (s := status(daemon, msg_id))["state"] == "deferred" and s, "the deferral")
    assert state["attempts"] == 1 and state["recipients"][0]["reply"] == "451 4.7.1 greylisted, try later"
    assert epoch(state["next_attempt"]) >= time.time() + 10  # its own retry_base: 30 s, jitter in the upper half
    assert upstream_state(daemon)["state"] == "up" and not events(daemon, "upstream_down")
    smtpgate("queue", "--spool", daemon.spool, "retry", msg_id)
    final = wait_final(daemon, msg_id)
    assert final["state"] == "sent" and final["attempts"] == 2


def test_a_421_in_a_transaction_downs_the_upstream_showing_only_its_codes_to_others(make_daemon, upstream):
    """The 421's text may name the message's recipient: the upstream's reason
    (STATS, and the reply of every caller's held messages) keeps only the
    codes; the text is in the log."""
    upstream.script_rcpt("ceo@bank.example", "421 4.7.0 <ceo@bank.example> rate limited, closing")
    daemon = make_daemon(retry_base=60.0, retry_max=60.0, upstream_probe_base=30.0, upstream_probe_max=30.0)
    [msg_id] = send(daemon, 1, to="ceo@bank.example")
    down = until(lambda: (u := upstream_state(daemon))["state"] == "down" and u, "the upstream down")
    assert down["reason"] == "421 4.7.0 (in a message's transaction: its text is in the log)"
    own = until(lambda: (s := status(daemon, msg_id))["attempts"] == 1 and s, "the attempt recorded")
    assert own["recipients"][0]["reply"].endswith(": " + down["reason"])  # the outage it met
    [other] = send(daemon, 1)  # held while the upstream is down: it shows the upstream's reason
    reply = status(daemon, other)["recipients"][0]["reply"]
    assert "421 4.7.0" in reply and "ceo@bank.example" not in reply
    assert any("ceo@bank.example" in line.get("error", "") for line in events(daemon, "upstream_session_failed"))


def test_held_messages_fail_at_max_age_untried_with_the_upstreams_reason(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], max_age=1.0, **QUICK_PROBES)
    [msg_id] = send(daemon, 1)
    final = wait_final(daemon, msg_id)
    assert final["state"] == "failed" and final["attempts"] == 0
    reply = final["recipients"][0]["reply"]
    assert "upstream 127.0.0.1:9 down since" in reply and "gave up after max_age 1 s" in reply
    assert not events(daemon, "delivery_attempt")


# --- the timeouts, each at its stage --------------------------------------------------


@pytest.mark.parametrize("key, mode, reason", [
    ("upstream_greeting_timeout", "stall-greeting", "to GREETING within 0.3 s"),
    ("upstream_command_timeout", "stall-ehlo", "to EHLO within 0.3 s"),
])
def test_a_session_timeout_marks_the_upstream_down(make_daemon, scripted, key, mode, reason):
    server = scripted(mode)
    daemon = make_daemon(upstream=[server.hostport], **{key: 0.3}, **RARE_PROBES)
    [msg_id] = send(daemon, 1)
    down = until(lambda: (u := upstream_state(daemon))["state"] == "down" and u, "the upstream down")
    assert reason in down["reason"]
    assert [line["kind"] for line in events(daemon, "upstream_down")] == ["timeout"]
    assert held(daemon, [msg_id])[0]["attempts"] == 0


def test_the_connect_timeout_marks_the_upstream_down(make_daemon):
    with stuck_listener() as uri:
        daemon = make_daemon(upstream=[uri.removeprefix("tcp://")], upstream_connect_timeout=0.3,
                             **RARE_PROBES)
        send(daemon, 1)
        down = until(lambda: (u := upstream_state(daemon))["state"] == "down" and u, "the upstream down")
    assert "timed out" in down["reason"]
    assert [line["kind"] for line in events(daemon, "upstream_down")] == ["timeout"]


def test_the_tls_timeout_marks_the_upstream_down(make_daemon, scripted):
    server = scripted("stall-greeting")  # takes the connection, never answers the TLS hello
    daemon = make_daemon(upstream=[server.hostport], upstream_tls="tls", upstream_tls_timeout=0.3,
                         **RARE_PROBES)
    send(daemon, 1)
    down = until(lambda: (u := upstream_state(daemon))["state"] == "down" and u, "the upstream down")
    assert "TLS handshake" in down["reason"]
    assert [line["kind"] for line in events(daemon, "upstream_down")] == ["tls"]


@pytest.mark.parametrize("key, mode, reason, duplicate", [
    ("upstream_data_timeout", "stall-data", "to DATA within 0.3 s", False),
    ("upstream_data_end_timeout", "stall-dot", "to DATA_END within 0.3 s", True),
])
def test_a_transaction_timeout_defers_the_message_and_leaves_the_upstream_up(
        make_daemon, scripted, key, mode, reason, duplicate):
    server = scripted(mode)
    daemon = make_daemon(upstream=[server.hostport], retry_base=30.0, **{key: 0.3}, **RARE_PROBES)
    [msg_id] = send(daemon, 1)
    state = until(lambda: (s := status(daemon, msg_id))["state"] == "deferred" and s, "the deferral")
    assert state["attempts"] == 1 and reason in state["recipients"][0]["reply"]
    assert state.get("possible_duplicate", False) is duplicate
    assert len(server.bodies) == int(duplicate)
    assert upstream_state(daemon)["state"] == "up"


def test_a_timeout_changed_by_a_reload_applies(make_daemon, scripted):
    server = scripted("stall-dot")
    daemon = make_daemon(upstream=[server.hostport], retry_base=30.0, **RARE_PROBES)
    daemon.settings["upstream_data_end_timeout"] = 0.3
    daemon.reload()
    [msg_id] = send(daemon, 1)
    state = until(lambda: (s := status(daemon, msg_id))["state"] == "deferred" and s, "the deferral")
    assert "to DATA_END within 0.3 s" in state["recipients"][0]["reply"]


def test_an_idle_pooled_connection_gets_quit_after_the_idle_timeout(make_daemon, upstream):
    quits = threading.Event()

    async def handle_QUIT(server, session, envelope):
        quits.set()
        return "221 2.0.0 Bye"

    upstream.handler.handle_QUIT = handle_QUIT
    daemon = make_daemon(upstream_idle_timeout=0.3)
    assert wait_final(daemon, send(daemon, 1)[0])["state"] == "sent"
    assert quits.wait(BOUND)


# --- what a restart knows, and stopping ------------------------------------------------


def test_a_message_whose_final_dot_went_out_before_a_kill_9_is_flagged_after_the_restart(
        make_daemon, upstream, scripted):
    server = scripted("stall-dot")  # has the message, never says so
    daemon = make_daemon(upstream=[server.hostport], connections_per_upstream=1, start=False)
    daemon.start(start_new_session=True)
    first, second = send(daemon, 2)  # one connection: the second waits, claimed
    assert server.wait(lambda s: len(s.bodies) == 1)
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(BOUND)
    daemon.stop()
    daemon.settings["upstream"] = [upstream.hostport]
    daemon.start()
    flagged, plain = wait_final(daemon, first), wait_final(daemon, second)
    assert flagged["state"] == "sent" and flagged["possible_duplicate"] is True
    assert flagged["attempts"] == 2  # the one the kill cut short counts
    assert plain["state"] == "sent" and plain["attempts"] == 1 and "possible_duplicate" not in plain


def test_a_killed_daemons_outage_is_not_shown_by_the_next_start(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], start=False, **RARE_PROBES)
    daemon.start(start_new_session=True)
    [msg_id] = send(daemon, 1)
    held(daemon, [msg_id])
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(BOUND)
    daemon.stop()
    assert "no daemon is running" in smtpgate("queue", "--spool", daemon.spool, "upstreams").stdout
    daemon.settings["hold"] = True  # nothing tries the upstream: nothing is held for it
    daemon.start()
    assert status(daemon, msg_id)["state"] == "queued" and stats(daemon)["upstreams"] == []


def test_a_stuck_upstream_is_named_at_stop_and_a_second_sigterm_stops_at_once(make_daemon, upstream, scripted):
    server = scripted("stall-dot")
    daemon = make_daemon(upstream=[server.hostport])
    [msg_id] = send(daemon, 1)
    assert server.wait(lambda s: len(s.bodies) == 1)
    daemon.proc.send_signal(signal.SIGTERM)
    [waiting] = until(lambda: events(daemon, "stop_waiting"), "the stop's report")
    [delivery] = waiting["deliveries"]
    assert delivery["message_id"] == msg_id and delivery["upstream"] == server.hostport
    assert delivery["waiting_for"] == "the reply to the final dot"
    daemon.proc.send_signal(signal.SIGTERM)
    # The grace period is 20 s: a daemon that ends well before it was not waiting for it.
    assert daemon.proc.wait(10) == 0
    daemon.stop()
    assert events(daemon, "stopping_now")
    daemon.settings["upstream"] = [upstream.hostport]
    daemon.start()
    final = wait_final(daemon, msg_id)
    assert final["state"] == "sent" and final["possible_duplicate"] is True and final["attempts"] == 2


def test_an_address_in_use_stops_the_start_with_one_line_before_any_delivery(tmp_path, upstream):
    async def queue_some():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        for _ in range(50):
            await spool.enqueue(b"{}", "app@example.com", ["kelly@example.org"])
        await spool.close()

    asyncio.run(queue_some())
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "smtpgate", "serve", "--config", os.devnull, "--upstream", upstream.hostport,
             "--upstream-tls", "none",
             "--spool", str(tmp_path / "spool"), "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            capture_output=True, text=True, timeout=60)
    assert run.returncode == 71
    [line] = [json.loads(text) for text in run.stderr.splitlines()]
    assert line["event"] == "start_failed" and "address already in use" in line["error"]
    assert upstream.messages == []


# --- configuration ---------------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    ("retry_base = 60\nretry_max = 30\n", "retry_max"),
    ("upstream_probe_base = 10\nupstream_probe_max = 5\n", "upstream_probe_max"),
    ("upstream_data_end_timeout = 0\n", "upstream_data_end_timeout"),
    ('upstream = ["a.example:25", "a.example:25"]\n', "upstream"),
])
def test_inconsistent_retry_probe_and_timeout_keys_are_refused(tmp_path, text, key):
    path = tmp_path / "smtpgate.toml"
    path.write_text('upstream = ["smtp.example:587"]\n' * ("upstream =" not in text) + text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value).startswith(f"{key}: ")


def test_the_timeout_keys_reach_every_upstream(tmp_path):
    from smtpgate.daemon import delivery_settings

    path = tmp_path / "smtpgate.toml"
    path.write_text('upstream = ["a.example:587", "b.example:587"]\nupstream_connect_timeout = 5\n'
                    "upstream_greeting_timeout = 6\nupstream_command_timeout = 7\nupstream_data_timeout = 8\n"
                    "upstream_data_block_timeout = 9\nupstream_data_end_timeout = 10\nupstream_tls_timeout = 11\n"
                    "upstream_idle_timeout = 12\nupstream_probe_base = 2\nupstream_probe_max = 20\n")
    settings = delivery_settings(load_config(str(path)))
    for upstream in settings.upstreams:
        t = upstream.timeouts
        assert (t.connect, t.greeting, t.command, t.mail, t.rcpt, t.data_init, t.data_block, t.data_end,
                t.tls_handshake) == (5, 6, 7, 7, 7, 8, 9, 10, 11)
    assert (settings.idle_timeout, settings.probe_base, settings.probe_max) == (12, 2, 20)


# --- the spool: a migration, the dot record -------------------------------------------------


def test_a_spool_of_the_first_schema_opens_with_its_messages_and_a_newer_one_is_refused(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    old = sqlite3.connect(folder / DB_FILE)
    old.executescript(SCHEMA_V1)
    old.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt)"
                " VALUES ('01OLD', 'deferred', 'a@x.org', x'7b7d', 1, 2, 3)")
    old.execute("INSERT INTO recipients VALUES ('01OLD', 'b@y.org', 0, 'deferred', '451 later')")
    old.commit()
    old.close()

    async def open_it():
        spool = Spool(folder, min_free_bytes=0)
        await spool.open()
        try:
            return await spool.status("01OLD"), await spool.stats()
        finally:
            await spool.close()

    state, counts = asyncio.run(open_it())
    assert state["state"] == "deferred" and state["recipients"][0]["reply"] == "451 later"
    assert counts["states"]["deferred"] == 1 and counts["upstreams"] == []
    db = sqlite3.connect(folder / DB_FILE)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="newer than this smtpgate"):
        asyncio.run(open_it())


def test_the_dot_record_moves_to_the_other_file_only_once_its_ids_are_settled(tmp_path, monkeypatch):
    monkeypatch.setattr(dotlog, "ROTATE_AT", 100)  # four ids of 27 bytes fill a file
    log = dotlog.DotLog(str(tmp_path))
    ids = [f"01ID{i:022d}" for i in range(12)]
    for msg_id in ids[:4]:
        log.record(msg_id)  # the fourth fills the first file: the record moves to the (empty) second
    for msg_id in ids[4:9]:
        log.record(msg_id)  # the second is full too, but the first holds unsettled ids: it stays
    assert dotlog.read_dots(str(tmp_path)) == set(ids[:9])
    for msg_id in ids[:4]:
        log.settled(msg_id)
    log.record(ids[9])  # then the first file is emptied and written again
    log.record(ids[10])
    assert dotlog.read_dots(str(tmp_path)) == set(ids[4:11])
    assert (tmp_path / "dots.0").read_bytes() == f"{ids[10]}\n".encode()
    log.close()
    with open(tmp_path / "dots.0", "ab") as fh:
        fh.write(b"01CUT")  # a line a power cut left half-written names no message
    assert dotlog.read_dots(str(tmp_path)) == set(ids[4:11])
    dotlog.clear_dots(str(tmp_path))
    assert dotlog.read_dots(str(tmp_path)) == set()


# --- the backoff of probes ------------------------------------------------------------------


def test_probes_back_off_from_the_base_doubling_to_the_cap_with_jitter_and_reset_once_up():
    health = Health("smtp.example:587")
    failure = SmtpConnectError("cannot connect to smtp.example:587: Connection refused")
    delays = []
    for _ in range(12):
        health.failed(1000.0, failure, 1.0, 300.0, 0.0)  # rand 0: the lower bound, half the step
        delays.append(health.next_probe - 1000.0)
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and delays[-1] == 150.0
    assert health.state == DOWN and health.since == 1000.0 and health.failures == 12
    assert health.kind == "connect" and health.reply.startswith("smtpgate: upstream smtp.example:587 down since")
    health.failed(1000.0, failure, 1.0, 300.0, 0.999)
    assert 299 < health.next_probe - 1000.0 <= 300.0
    health.succeeded(2000.0)
    assert (health.state, health.since, health.failures, health.reason) == (UP, 2000.0, 0, "")
