"""The SMTP front door on a real aiosmtpd listener, driven by smtplib, swaks
and raw sockets. Most tests stand a recording `enqueue` in for the spool:
what matters there is what the door answers and what it hands over. The
last tests run the same door inside the real daemon, to a real upstream."""

from __future__ import annotations

import asyncio
import base64
import shutil
import smtplib
import socket
import subprocess
import threading

import pytest

from smtpgate.config import Config
from smtpgate.intake.callers import Callers
from smtpgate.intake.handoff import LARGE_REQUEST
from smtpgate.intake.smtp_door import start_smtp_intake
from smtpgate.spool.errors import SpoolFull
from smtpgate.tools.lineclient import RemoteError
from support import RawSmtp

TOKEN = "tok-3f9a1c2e7b-5d0c8a"
MESSAGE = (b"From: App <app@example.com>\r\n"
           b"To: kelly@example.org\r\n"
           b"Subject: =?utf-8?b?6K6w5b6X5pS26KGj5pyN?=\r\n"
           b"X-Order: 42\r\n"
           b"\r\n"
           b"Hello.\r\n"
           b".leading dot\r\n")


class RecordingLog:
    """Collects (level, event, fields) so tests can check what was logged."""

    def __init__(self):
        self.records = []

    def __getattr__(self, level):
        return lambda event, **fields: self.records.append((level, event, fields))


class RefusedRequest(Exception):
    """Shaped like message.RequestError: a protocol code and a text."""

    def __init__(self, code, text):
        super().__init__(code, text)
        self.code, self.text = code, text


class Door:
    """An SMTP front door on its own event loop thread, with a recording
    enqueue; `tokens` are the callers' (each its own unnamed caller)."""

    def __init__(self, tokens=(), **options):
        self.received: list[tuple[str, list[str], bytes]] = []
        self.callers_seen = []  # the caller of each enqueue
        self.failure: Exception | None = None
        self.log = RecordingLog()
        self.entered = threading.Event()  # enqueue was called
        self.loop = asyncio.new_event_loop()
        self.gate: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options.setdefault("max_message_bytes", 64 * 1024)
        self.callers = Callers(Config(tokens=list(tokens)), b"test key")
        self.server = self.call(start_smtp_intake(
            "127.0.0.1", 0, enqueue=self.enqueue, callers=self.callers, log=self.log, hostname="door.test",
            **options))
        self.port = self.server.sockets[0].getsockname()[1]

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def reload(self, **config):
        """What a SIGHUP does: the callers of a new configuration, on the door's loop."""
        async def load():
            self.callers.load(Config(**config))
        self.call(load())

    async def enqueue(self, caller, envelope_from, recipients, data):
        self.callers_seen.append(caller.name)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        self.received.append((envelope_from, recipients, data))
        return f"01TESTID{len(self.received):04d}"

    def hold_enqueue(self):
        async def make():
            self.gate = asyncio.Event()
        self.call(make())

    def release_enqueue(self):
        self.loop.call_soon_threadsafe(self.gate.set)

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def door_factory():
    doors = []

    def make(**options):
        doors.append(Door(**options))
        return doors[-1]

    yield make
    for door in doors:
        door.close()


def test_smtplib_hands_the_message_over_with_headers_intact(door_factory):
    door = door_factory()
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert not client.has_extn("auth"), "no tokens: AUTH is not offered"
        refused = client.sendmail("app@example.com", ["kelly@example.org", "ops@example.org"], MESSAGE)
        assert refused == {}
    [(sender, recipients, data)] = door.received
    assert sender == "app@example.com"
    assert recipients == ["kelly@example.org", "ops@example.org"]
    # One Received trace field (RFC 5321 4.4) first, then the message as sent,
    # with the transparency dot removed (RFC 5321 4.5.2).
    trace, rest = data.split(b"\r\n\tby door.test (smtpgate) with ESMTP;\r\n\t", 1)
    assert trace == b"Received: from client.test ([127.0.0.1])"
    assert rest.split(b"\r\n", 1)[1] == MESSAGE
    [(_, event, fields)] = [r for r in door.log.records if r[1] == "smtp_accepted"]
    assert fields["message_id"] == "01TESTID0001"


def test_the_250_waits_for_the_durable_enqueue(door_factory):
    door = door_factory()
    door.hold_enqueue()
    smtp = RawSmtp(door.port)
    try:
        smtp.cmd("EHLO client.test")
        assert smtp.cmd("MAIL FROM:<app@example.com>").startswith("250")
        assert smtp.cmd("RCPT TO:<kelly@example.org>").startswith("250")
        assert smtp.cmd("DATA").startswith("354")
        smtp.sock.sendall(MESSAGE + b".\r\n")
        assert door.entered.wait(10)
        # enqueue has the message but has not returned: no reply may be out.
        smtp.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            smtp.sock.recv(1)
        smtp.sock.setblocking(True)
        smtp.sock.settimeout(10)
        door.release_enqueue()
        assert smtp.reply() == "250 2.0.0 OK queued as 01TESTID0001"
    finally:
        smtp.close()


def test_auth_is_required_and_checks_the_token(door_factory):
    door = door_factory(tokens=["other-token-6b1e0f", TOKEN])
    smtp = RawSmtp(door.port)
    try:
        ehlo = smtp.cmd("EHLO client.test")
        assert "250-AUTH LOGIN PLAIN" in ehlo.splitlines()
        assert smtp.cmd("MAIL FROM:<app@example.com>") == "530 5.7.0 Authentication required"
        wrong = base64.b64encode(b"\0app\0" + TOKEN.encode() + b"x").decode()
        assert smtp.cmd(f"AUTH PLAIN {wrong}").startswith("535 5.7.8")
        right = base64.b64encode(b"\0any user\0" + TOKEN.encode()).decode()
        assert smtp.cmd(f"AUTH PLAIN {right}").startswith("235 2.7.0")
        assert smtp.cmd("MAIL FROM:<app@example.com>").startswith("250")
    finally:
        smtp.close()
    failures = [r for r in door.log.records if r[1] == "auth_failed"]
    assert len(failures) == 1 and failures[0][2]["door"] == "smtp"
    assert TOKEN not in repr(door.log.records)


def test_tokens_follow_a_reload(door_factory):
    door = door_factory()
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
    door.reload(tokens=[TOKEN])  # what a SIGHUP with a new tokens_file does
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
        client.login("app", TOKEN)
        client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
    assert len(door.received) == 2
    assert door.callers_seen == ["anonymous", door.callers.token_name(TOKEN)]


def test_smtplib_login_with_a_token(door_factory):
    door = door_factory(tokens=[TOKEN])
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        client.login("whoever", TOKEN)  # smtplib picks PLAIN, then LOGIN
        client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        client.ehlo("client.test")
        client.user, client.password = "whoever", TOKEN
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
    assert len(door.received) == 2
    assert b"with ESMTPA;" in door.received[0][2], "RFC 3848: authenticated submission"


@pytest.mark.parametrize("failure, reply", [
    (SpoolFull("spool full"), "452 4.3.1 Mail system full, try again later"),
    (RefusedRequest("DENIED", "recipient kelly@example.org is not allowed"),
     "550 5.7.1 recipient kelly@example.org is not allowed"),
    (RefusedRequest("BAD_HEADER", "header X-Bad: contains a bare CR"),
     "554 5.6.0 header X-Bad: contains a bare CR"),
    (RuntimeError("disk I/O error at /var/lib/smtpgate/secret-path"),
     "451 4.3.0 Local error, try again later"),
])
def test_enqueue_failures_become_smtp_replies(door_factory, failure, reply):
    door = door_factory()
    door.failure = failure
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
    code, text = refused.value.smtp_code, refused.value.smtp_error.decode()
    assert f"{code} {text}" == reply
    assert door.received == []


def test_a_message_over_the_limit_is_refused_before_enqueue(door_factory):
    door = door_factory(max_message_bytes=4096)
    with smtplib.SMTP("127.0.0.1", door.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "4096"
        # smtplib declares SIZE= in MAIL (RFC 1870), refused at once.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE + b"x" * 5000 + b"\r\n")
        assert refused.value.smtp_code == 552
    # A careless client that declares nothing is caught while the data comes in.
    smtp = RawSmtp(door.port)
    try:
        smtp.cmd("EHLO client.test")
        smtp.cmd("MAIL FROM:<app@example.com>")
        smtp.cmd("RCPT TO:<kelly@example.org>")
        assert smtp.cmd("DATA").startswith("354")
        smtp.sock.sendall(MESSAGE + (b"x" * 70 + b"\r\n") * 100 + b".\r\n")
        assert smtp.reply().startswith("552")
    finally:
        smtp.close()
    assert not door.entered.is_set()


def test_recipients_are_capped_as_rfc_5321_allows(door_factory):
    from smtpgate.intake.smtp_door import MAX_RECIPIENTS

    door = door_factory()
    smtp = RawSmtp(door.port)
    try:
        smtp.cmd("EHLO client.test")
        smtp.cmd("MAIL FROM:<app@example.com>")
        batch = b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(MAX_RECIPIENTS + 1))
        smtp.sock.sendall(batch)
        replies = [smtp.reply() for _ in range(MAX_RECIPIENTS + 1)]
        assert all(r.startswith("250") for r in replies[:MAX_RECIPIENTS])
        assert replies[-1] == "452 4.5.3 Too many recipients"
    finally:
        smtp.close()


def test_no_tokens_means_loopback_only():
    async def attempt():
        await start_smtp_intake("0.0.0.0", 0, enqueue=None, callers=Callers(Config(), b""),
                                max_message_bytes=1024, log=RecordingLog())
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(attempt())


swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")


def run_swaks(port, *extra):
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--helo", "swaks.test",
         "--from", "app@example.com", "--to", "kelly@example.org",
         "--header", "Subject: from swaks", "--header", "X-Order: 42",
         "--body", "Hello from swaks.", *extra],
        capture_output=True, text=True, timeout=30)


@swaks
def test_swaks_sends_through_the_door(door_factory):
    door = door_factory()
    result = run_swaks(door.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 OK queued as 01TESTID0001" in result.stdout
    [(sender, recipients, data)] = door.received
    assert (sender, recipients) == ("app@example.com", ["kelly@example.org"])
    assert b"\r\nSubject: from swaks\r\n" in data
    assert b"\r\nX-Order: 42\r\n" in data
    assert b"\r\n\r\nHello from swaks.\r\n" in data


@swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_authenticates_with_a_token(door_factory, mechanism):
    door = door_factory(tokens=[TOKEN])
    bad = run_swaks(door.port, "--auth", mechanism, "--auth-user", "app",
                    "--auth-password", "not-the-token")
    assert bad.returncode != 0
    assert "535 5.7.8" in bad.stdout
    good = run_swaks(door.port, "--auth", mechanism, "--auth-user", "app",
                     "--auth-password", TOKEN)
    assert good.returncode == 0, good.stdout + good.stderr
    assert len(door.received) == 1


# --- end to end: smtplib / swaks -> the daemon's SMTP door -> upstream ------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _smtp_door(daemon) -> int:
    [line] = [line for line in daemon.log_lines() if line.get("event") == "smtp_listening"]
    return int(line["address"][0].rpartition(":")[2])


def test_smtplib_through_the_daemon_to_the_upstream(make_daemon, upstream):
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}", tokens=[TOKEN])
    port = _smtp_door(daemon)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.test")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("app@example.com", ["kelly@example.org"], MESSAGE)
        assert refused.value.smtp_code == 530
        client.login("app", TOKEN)
        client.sendmail("app@example.com", ["kelly@example.org", "ops@example.org"], MESSAGE)
        reply = client.noop()
    [received] = upstream.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["kelly@example.org", "ops@example.org"]
    headers, body = received.data.split(b"\r\n\r\n", 1)
    assert b"\r\nReceived: from app.test ([127.0.0.1])\r\n\tby " in b"\r\n" + headers
    assert b"with ESMTPA;" in headers
    for line in MESSAGE.split(b"\r\n\r\n")[0].split(b"\r\n"):
        assert line in headers.split(b"\r\n")
    assert body == b"Hello.\r\n.leading dot\r\n"
    assert reply[0] == 250


def test_an_address_a_send_would_refuse_is_refused_at_its_rcpt_not_with_the_whole_message(make_daemon, upstream):
    """A quoted local part (RFC 5321 allows it; a SEND does not take it) got
    250 at RCPT and then failed the whole message, the good recipients too,
    with a 553 after DATA. It is refused at its RCPT; the others go."""
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}", tokens=[TOKEN])
    port = _smtp_door(daemon)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login("app", TOKEN)
        assert client.mail('"a b"@example.com')[0] == 553
        assert client.mail("app@example.com")[0] == 250
        code, text = client.rcpt('"a b&c"@example.com')
        assert code == 553 and text.startswith(b"5.1.3 RCPT TO: not an address")
        assert client.rcpt("kelly@example.org")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 250, text
    [received] = upstream.wait_for(1)
    assert received.rcpt_tos == ["kelly@example.org"]


def test_aiosmtpd_warnings_a_stranger_causes_are_one_line_a_minute(make_daemon):
    """Unknown commands before AUTH: aiosmtpd warns about each (five a
    connection), and connections can follow one another without end."""
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}", tokens=[TOKEN])
    port = _smtp_door(daemon)
    for _ in range(4):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for n in range(5):
                assert client.docmd(f"XFOO{n}")[0] in (500, 502)  # unrecognised, unimplemented
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.noop()[0] == 250  # and it serves
    lines = [line for line in daemon.log_lines() if "unrecognised" in str(line.get("event"))]
    assert len(lines) == 1, lines


@swaks
def test_swaks_through_the_daemon_to_the_upstream(make_daemon, upstream):
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}")
    result = run_swaks(_smtp_door(daemon))
    assert result.returncode == 0, result.stdout + result.stderr
    queued = [line for line in result.stdout.splitlines() if "OK queued as" in line]
    msg_id = queued[0].rsplit(" ", 1)[1]
    with daemon.client() as client:
        state = client.wait(msg_id, 20)
    assert state["state"] == "sent"
    assert state["recipients"][0]["reply"].startswith("250 2.0.0 Ok: queued as M1")
    [received] = upstream.wait_for(1)
    assert received.message["Subject"] == "from swaks"
    assert received.message["X-Order"] == "42"
    assert received.message.get_content().strip() == "Hello from swaks."


def test_the_smtp_door_applies_the_same_policy(make_daemon, upstream):
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}",
                         allowed_recipients=["@example.org"])
    with smtplib.SMTP("127.0.0.1", _smtp_door(daemon), timeout=10) as client:
        with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused)) as refused:
            client.sendmail("app@example.com", ["someone@elsewhere.test"], MESSAGE)
    error = refused.value
    codes = ([error.smtp_code] if isinstance(error, smtplib.SMTPDataError)
             else [code for code, _ in error.recipients.values()])
    assert codes == [550]
    with daemon.client() as client:
        assert client.stats()["states"].get("queued", 0) == 0


def test_both_doors_hand_large_messages_through_the_same_checks(make_daemon, upstream):
    """Past LARGE_REQUEST the hand-off validates in a thread, for either door:
    the policy still refuses (here a header From that the envelope does not
    show, which only the whole message can tell), and what passes arrives whole."""
    daemon = make_daemon(smtp_listen=f"127.0.0.1:{_free_port()}", allowed_senders=["@example.com"])
    body = b"".join(b"line %06d of a long report\r\n" % i for i in range(LARGE_REQUEST // 24))
    large = MESSAGE + body
    forged = large.replace(b"From: App <app@example.com>", b"From: CEO <ceo@bank.example>")
    assert len(large) > LARGE_REQUEST and forged != large
    with smtplib.SMTP("127.0.0.1", _smtp_door(daemon), timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("app@example.com", ["kelly@example.org"], forged)
        assert refused.value.smtp_code == 550
        client.sendmail("app@example.com", ["kelly@example.org"], large)
    with daemon.client() as client:
        with pytest.raises(RemoteError) as denied:
            client.send({"from": "app@example.com", "to": "kelly@example.org", "raw": forged.decode()})
        assert denied.value.code == "DENIED"
        client.send({"from": "app@example.com", "to": "kelly@example.org", "raw": large.decode()})
    received = upstream.wait_for(2)
    assert [m.rcpt_tos for m in received] == [["kelly@example.org"]] * 2
    assert all(body in m.data for m in received)
