"""The PHP client (clients/php) under real `php`.

- PHPUnit (clients/php/tests/*Test.php): the client against real daemons
  relaying to a real SMTP server: every method, the error codes the daemon
  can be made to give, UTF-8, a 10 MB attachment, pipelining, Unix socket,
  failover, timeouts, reconnects, tokens. One test here runs that suite and
  prints its report.
- `ScriptedPeer`, a throwaway server on a real socket speaking the protocol's
  bytes, for what the real daemon cannot be made to do on demand: INTERNAL,
  an unknown code, a malformed reply, a close racing with a request, a reply
  that never comes. Each of these tests runs a small PHP snippet that uses
  the client and prints one JSON document (clients/php/tests/harness.php);
  pytest asserts on it and on the bytes the peer received.
- The example and the README's install snippets (plain require, Composer
  path repository) run as a user would, against the real daemon.
A PHP warning or notice fails every one of them: stderr has to stay empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from email import message_from_bytes, policy
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHP_CLIENT = ROOT / "clients" / "php"
HARNESS = PHP_CLIENT / "tests" / "harness.php"
PHP = shutil.which("php")

pytestmark = pytest.mark.skipif(PHP is None, reason="php-cli is not installed (tests/setup.sh installs it)")

MESSAGE = {"from": "app@example.com", "to": "kelly@example.org",
           "subject": "记得收衣服", "text": "今天我不回家\n晚饭自己吃。"}


def run_php(body: str, args: dict | None = None, timeout: float = 30.0, tmp_path: Path | None = None,
            argv: tuple = (), env: dict | None = None) -> object:
    """Run `body` (PHP statements; `$args` holds `args`) and return what it report()s."""
    script = ("<?php\ndeclare(strict_types=1);\n"
              f"require {json.dumps(str(HARNESS))};\n"
              "use SmtpGate\\Client; use SmtpGate\\Attachment;\n"
              "$args = json_decode(getenv('PHPT_ARGS'), true, 512, JSON_THROW_ON_ERROR);\n"
              + body)
    proc = subprocess.run(
        [PHP, "-d", "error_reporting=-1", "-d", "display_errors=stderr", "-d", "memory_limit=512M",
         "-r", script.removeprefix("<?php\n"), *argv],
        capture_output=True, timeout=timeout,
        env=dict(os.environ, PHPT_ARGS=json.dumps(args or {}), **(env or {})))
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"php exited {proc.returncode}\nstdout: {stdout}\nstderr: {stderr}"
    assert stderr == "", f"php printed warnings: {stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


# -- a throwaway peer on a real socket ---------------------------------------

CLOSE = object()  # a responder's answer: close the connection without a reply


def standard_reply(line: bytes) -> bytes:
    verb = line.split(b" ", 1)[0].upper()
    return {b"PING": b"OK PONG\r\n", b"SEND": b"OK 01SCRIPTED\r\n", b"AUTH": b"OK\r\n",
            b"STATUS": b'OK {"id":"01SCRIPTED","state":"queued","attempts":0,"recipients":[]}\r\n',
            b"QUIT": b"OK BYE\r\n"}.get(verb, b"ERR BAD_REQUEST unknown verb\r\n")


class ScriptedPeer:
    """A server on 127.0.0.1 (or a Unix socket) that records every byte it receives,
    per connection, and answers each request line with
    `respond(line, connection_number, request_number)`: bytes to send, a list
    of byte strings to send one by one with a pause between them, CLOSE, or
    (bytes, CLOSE) to reply and then close."""

    def __init__(self, respond=None, unix_path: str | None = None):
        self.respond = respond or (lambda line, conn, req: standard_reply(line))
        family = socket.AF_UNIX if unix_path else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(unix_path or ("127.0.0.1", 0))
        self.listener.listen(16)
        self.uri = f"unix://{unix_path}" if unix_path else f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.received: list[bytearray] = []
        self.lines: list[list[bytes]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                number = len(self.received)
                self.received.append(bytearray())
                self.lines.append([])
            thread = threading.Thread(target=self._serve, args=(conn, number), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        with conn:
            conn.settimeout(10)
            while True:
                try:
                    data = conn.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received[number] += data
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    with self.lock:
                        self.lines[number].append(line)
                        request_number = len(self.lines[number]) - 1
                    answer = self.respond(line, number, request_number)
                    if isinstance(answer, list):
                        for piece in answer:
                            conn.sendall(piece)
                            time.sleep(0.002)
                        continue
                    reply, close = (answer, False) if isinstance(answer, bytes) else \
                        (b"", True) if answer is CLOSE else (answer[0], True)
                    if reply:
                        conn.sendall(reply)
                    if close:
                        conn.shutdown(socket.SHUT_RDWR)
                        return

    def wait_lines(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """All request lines once `count` have arrived (bounded): for requests without a reply."""
        deadline = time.monotonic() + timeout
        while len(self.all_lines()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.all_lines()

    def all_lines(self) -> list[bytes]:
        with self.lock:
            return [line for lines in self.lines for line in lines]

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the other thread, so that
        # thread ends now; close() alone leaves it waiting on the socket,
        # to pick up a later test's connections if the number is reused.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def scripted():
    peers: list[ScriptedPeer] = []

    def make(respond=None, unix_path=None) -> ScriptedPeer:
        peers.append(ScriptedPeer(respond, unix_path))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


# -- against the scripted peer: encoding, error mapping, connection rules -----

ALL_CODES = ["BAD_REQUEST", "BAD_ADDRESS", "BAD_HEADER", "TOO_LARGE", "AUTH_REQUIRED", "AUTH_FAILED",
             "NOT_FOUND", "DENIED", "BUSY", "INTERNAL"]


def test_every_error_code_has_its_exception_class_and_the_connection_stays_usable(scripted):
    codes = ALL_CODES + ["SOMETHING_NEW"]
    peer = scripted(lambda line, conn, req: (
        b"OK PONG\r\n" if line == b"PING" else f"ERR {codes[req // 2]} text of {codes[req // 2]}: 配额\r\n".encode()))
    result = run_php("""
        $gate = new Client($args['uri']);
        $seen = [];
        foreach ($args['codes'] as $_) {
            $seen[] = outcome(fn () => $gate->send(['from' => 'a@example.com', 'to' => 'b@example.org']));
            $gate->ping();
        }
        report($seen);
    """, {"uri": peer.uri, "codes": codes})
    expected_class = {"BAD_REQUEST": "BadRequestException", "BAD_ADDRESS": "BadAddressException",
                      "BAD_HEADER": "BadHeaderException", "TOO_LARGE": "TooLargeException",
                      "AUTH_REQUIRED": "AuthRequiredException", "AUTH_FAILED": "AuthFailedException",
                      "NOT_FOUND": "NotFoundException", "DENIED": "DeniedException", "BUSY": "BusyException",
                      "INTERNAL": "InternalException", "SOMETHING_NEW": "ServerException"}
    assert [r["class"] for r in result] == [expected_class[c] for c in codes]
    assert [r["code"] for r in result] == codes
    assert all(r["text"] == f"text of {c}: 配额" and r["is_smtpgate"] for r, c in zip(result, codes, strict=True))
    assert [c for r, c in zip(result, codes, strict=True) if r["retryable"]] == ["BUSY", "INTERNAL"]
    assert len(peer.received) == 1, "an ERR reply must not cost the connection"


def test_send_encodes_one_json_line_with_raw_utf8_and_escaped_newlines(scripted):
    peer = scripted()
    message = dict(MESSAGE, cc=["a@example.org", "b@example.org"], headers={},
                   text="line one\r\nline two\u2028end", html="<p>a/b</p>")
    result = run_php("""
        $gate = new Client($args['uri']);
        report([$gate->send($args['message']), $gate->send(['from' => 'x@example.com', 'to' => 'y@example.org', 'headers' => []])]);
    """, {"uri": peer.uri, "message": message})
    assert result == ["01SCRIPTED", "01SCRIPTED"]
    first, second = peer.all_lines()
    assert first.startswith(b"SEND {") and b"\r" not in first
    assert "记得收衣服".encode() in first, "CJK text travels as raw UTF-8, not \\u escapes"
    assert b"a/b" in first and b"\\u2028" in first
    assert json.loads(first[5:]) == message
    assert json.loads(second[5:])["headers"] == {}, "an empty PHP array must still be a JSON object"


def test_lists_with_gaps_in_their_keys_travel_as_json_arrays_and_the_daemon_takes_them(daemon, upstream):
    """array_filter(), array_unique() or unset() leave a PHP list with gaps in its keys, which
    json_encode() turns into an object {"1":...}: the daemon refuses that (BAD_REQUEST "must be a
    string or an array of strings"), so to, cc, bcc, reply_to and attachments go as arrays."""
    result = run_php("""
        $gate = new Client($args['uri']);
        $message = [
            'from' => 'app@example.com', 'subject' => 'gaps', 'text' => 'body',
            'to' => array_filter(['', 'kelly@example.org', '', 'lee@example.org']),
            'cc' => array_unique(['cc@example.org', 'cc@example.org', 'dd@example.org']),
            'bcc' => ['hidden' => 'hidden@example.org'],
            'reply_to' => [3 => 'orders@example.com'],
            'attachments' => [2 => Attachment::fromString('note.txt', 'attached', 'text/plain')],
        ];
        $raw = "From: app@example.com\r\nSubject: raw gaps\r\n\r\nraw body\r\n";
        $many = $gate->sendMany(['gaps' => $message]);
        report([
            outcome(fn () => $gate->send($message)),
            outcome(fn () => $gate->sendRaw($raw, 'app@example.com', array_filter(['', 'raw@example.org']),
                                            ['cc' => [1 => 'rawcc@example.org']])),
            $many->ok() ? $many->ids : array_map(fn ($e) => $e->getMessage(), $many->errors),
        ]);
    """, {"uri": daemon.uri})
    assert [sorted(r) for r in result] == [["value"], ["value"], ["gaps"]], result
    mails = upstream.wait_for(3)
    assert sorted(m.message["Subject"] for m in mails) == ["gaps", "gaps", "raw gaps"]
    for mail in mails:
        if mail.message["Subject"] == "raw gaps":
            assert sorted(mail.rcpt_tos) == ["raw@example.org", "rawcc@example.org"]
            continue
        assert sorted(mail.rcpt_tos) == ["cc@example.org", "dd@example.org", "hidden@example.org",
                                         "kelly@example.org", "lee@example.org"]
        assert mail.message["Reply-To"] == "orders@example.com"
        assert [part.get_filename() for part in mail.message.iter_attachments()] == ["note.txt"]


def test_request_lines_cannot_be_smuggled_and_bad_utf8_is_refused_before_writing(scripted):
    peer = scripted()
    result = run_php("""
        $gate = new Client($args['uri']);
        report([
            outcome(fn () => $gate->status("01ABC\\nSEND {}")),
            outcome(fn () => $gate->status('01 ABC')),
            outcome(fn () => $gate->send(['from' => "a@example.com", 'to' => 'b@example.org', 'subject' => "\\xff\\xfe"])),
            outcome(fn () => $gate->sendMany([['from' => 'a@example.com', 'to' => 'b@example.org'], ['subject' => "\\xc3"]])),
            outcome(fn () => new Client('http://127.0.0.1:80')),
            outcome(fn () => new Client($args['uri'], ['timeout' => 3])),
        ]);
    """, {"uri": peer.uri})
    assert [r["class"] for r in result] == ["InvalidArgumentException"] * 6
    assert not any(r["is_smtpgate"] for r in result), "misuse is not a run-time failure"
    assert peer.all_lines() == [], "nothing may reach the daemon from a refused request"


def test_status_and_wait_decode_the_state_and_wait_sends_its_seconds(scripted):
    state = {"id": "01X", "state": "sent", "attempts": 1,
             "recipients": [{"address": "kelly@example.org", "state": "sent", "reply": "250 2.0.0 Ok"}]}
    peer = scripted(lambda line, conn, req: b"OK " + json.dumps(state).encode() + b"\r\n")
    result = run_php("""
        $gate = new Client($args['uri']);
        report([$gate->status('01X'), $gate->wait('01X'), $gate->wait('01X', 5), $gate->wait('01X', 0.25)]);
    """, {"uri": peer.uri})
    assert result == [state] * 4
    assert peer.all_lines() == [b"STATUS 01X", b"WAIT 01X", b"WAIT 01X 5", b"WAIT 01X 0.25"]


@pytest.mark.parametrize("reply, why", [
    (b"OK PONG\n", "no CR before LF"),
    (b"HTTP/1.1 200 OK\r\n", "not OK or ERR"),
    (b"ERR\r\n", "ERR without a code"),
    (b"OKAY\r\n", "not OK or ERR"),
    (b"OK not-json\r\n", "STATUS payload is not JSON"),
    (b"OK [1,2]\r\n", "STATUS payload is not an object"),
])
def test_a_malformed_reply_is_a_protocol_exception_and_drops_the_connection(scripted, reply, why):
    peer = scripted(lambda line, conn, req: reply if conn == 0 else standard_reply(line))
    result = run_php("""
        $gate = new Client($args['uri']);
        report([outcome(fn () => $gate->status('01X')), outcome(fn () => $gate->ping())]);
    """, {"uri": peer.uri})
    assert result[0]["class"] == "ProtocolException", why
    assert result[0]["is_smtpgate"] and peer.uri in result[0]["message"]
    assert result[1] == {"value": True}
    assert len(peer.received) == 2, "the next request must use a new connection"


def test_replies_split_into_single_bytes_or_coalesced_are_read_whole_and_in_order(scripted):
    state = b'OK {"id":"01X","state":"queued","subject":"\xe8\xae\xb0"}\r\n'

    def respond(line, conn, req):
        if line.startswith(b"STATUS"):
            return [state[i:i + 1] for i in range(len(state))]  # one byte per segment
        if req < 3:
            return b""  # hold the replies of the first three SENDs ...
        return [b"OK 01A\r\nERR DENIED no\r\nOK 01C\r\nOK 01D\r\n"]  # ... and send four at once

    peer = scripted(respond)
    result = run_php("""
        $gate = new Client($args['uri']);
        $m = ['from' => 'a@example.com', 'to' => 'b@example.org'];
        $batch = $gate->sendMany([$m, $m, $m, $m]);
        report([$gate->status('01X'), $batch->ids, array_map(fn ($e) => $e->getErrorCode(), $batch->errors)]);
    """, {"uri": peer.uri})
    assert result == [{"id": "01X", "state": "queued", "subject": "记"}, {"0": "01A", "2": "01C", "3": "01D"},
                      {"1": "DENIED"}]
    assert len(peer.received) == 1


def test_idle_connection_closed_by_the_daemon_is_reopened_before_writing(scripted):
    # The daemon answers the first request of each connection, then closes it
    # (as its idle timeout would): the client must notice before writing the
    # SEND, so the SEND goes out exactly once, on the new connection.
    peer = scripted(lambda line, conn, req: (standard_reply(line), CLOSE))
    result = run_php("""
        $gate = new Client($args['uri']);
        $gate->ping();
        usleep(100000);
        report($gate->send(['from' => 'a@example.com', 'to' => 'b@example.org', 'text' => 'x']));
    """, {"uri": peer.uri})
    assert result == "01SCRIPTED"
    assert [lines for lines in peer.lines] == [[b"PING"], [peer.lines[1][0]]]
    assert peer.lines[1][0].startswith(b"SEND ")


def test_a_close_racing_with_a_request_repeats_only_requests_safe_to_repeat(scripted):
    # Connection 0 answers its first request, then reads the second and closes
    # without answering: the close was seen only after the request went out.
    def respond(line, conn, req):
        return CLOSE if conn % 2 == 0 and req == 1 else standard_reply(line)

    cases = {
        "ping": "$gate->ping()",
        "send": "$gate->send(['from' => 'a@example.com', 'to' => 'b@example.org'])",
        "send_with_key": "$gate->send(['from' => 'a@example.com', 'to' => 'b@example.org', 'idempotency_key' => 'order-42'])",
    }
    seen = {}
    for name, call in cases.items():
        peer = scripted(respond)
        result = run_php(f"""
            $gate = new Client($args['uri']);
            $gate->ping();
            report(outcome(fn () => {call}));
        """, {"uri": peer.uri})
        seen[name] = (result, [line.split(b" ")[0] for line in peer.all_lines()])
    assert seen["ping"] == ({"value": True}, [b"PING", b"PING", b"PING"])
    assert seen["send"][0]["class"] == "ConnectionException", "a plain SEND may have been stored: never repeat it"
    assert seen["send"][1] == [b"PING", b"SEND"]
    assert seen["send_with_key"] == ({"value": "01SCRIPTED"}, [b"PING", b"SEND", b"SEND"])


def test_close_says_quit_and_the_next_request_reconnects(scripted):
    peer = scripted()
    result = run_php("""
        $gate = new Client($args['uri']);
        $before = [$gate->endpoint(), $gate->ping(), $gate->endpoint()];
        $gate->close();
        report([...$before, $gate->endpoint(), $gate->ping()]);
    """, {"uri": peer.uri})
    assert result == ["", True, peer.uri, "", True]
    peer.wait_lines(3)  # QUIT has no reply to wait for
    assert [bytes(r) for r in peer.received] == [b"PING\nQUIT\n", b"PING\n"]


def test_a_reply_that_never_comes_is_a_timeout(scripted):
    peer = scripted(lambda line, conn, req: b"")  # reads, never answers
    result = run_php("""
        $gate = new Client($args['uri'], ['read_timeout' => 0.3]);
        report(outcome(fn () => $gate->ping()));
    """, {"uri": peer.uri})
    assert result["class"] == "TimeoutException" and result["is_smtpgate"]
    assert peer.uri in result["message"]


def test_token_is_pipelined_as_auth_and_a_refusal_never_shows_the_token(scripted):
    secret = "s3cr3t-token-value"
    peer = scripted(lambda line, conn, req: (
        (b"OK\r\n" if line == f"AUTH {secret}".encode() else b"ERR AUTH_FAILED wrong token\r\n")
        if line.startswith(b"AUTH ") else standard_reply(line)))
    result = run_php("""
        $good = new Client($args['uri'], ['token' => $args['secret']]);
        $bad = new Client($args['uri'], ['token' => 'wrong-' . $args['secret']]);
        $later = new Client($args['uri']);
        report([outcome(fn () => $good->ping()), outcome(fn () => $good->ping()),
                outcome(fn () => $bad->ping()), outcome(fn () => $later->auth($args['secret'])),
                outcome(fn () => $later->ping())]);
    """, {"uri": peer.uri, "secret": secret})
    assert result[:2] == [{"value": True}, {"value": True}]
    assert result[2]["class"] == "AuthFailedException" and secret not in json.dumps(result[2])
    assert result[3:] == [{"value": None}, {"value": True}]
    assert bytes(peer.received[0]) == f"AUTH {secret}\nPING\nPING\n".encode(), \
        "AUTH goes out once per connection, in the same write as the first request"


def test_send_many_pipelines_and_reports_each_message(scripted):
    verdicts = [b"OK 01A\r\n", b"ERR BAD_ADDRESS not an address: nobody\r\n", b"OK 01C\r\n"]
    peer = scripted(lambda line, conn, req: verdicts[req % 3])
    result = run_php("""
        $gate = new Client($args['uri']);
        $r = $gate->sendMany(['first' => ['from' => 'a@example.com', 'to' => 'b@example.org'],
                              'second' => ['from' => 'a@example.com', 'to' => 'nobody'],
                              'third' => ['from' => 'a@example.com', 'to' => 'c@example.org']]);
        report(['ids' => $r->ids, 'errors' => array_map('describe', $r->errors), 'ok' => $r->ok()]);
    """, {"uri": peer.uri})
    assert result["ids"] == {"first": "01A", "third": "01C"}
    assert result["errors"]["second"]["class"] == "BadAddressException"
    assert result["ok"] is False
    assert len(peer.received) == 1 and peer.received[0].count(b"\n") == 3


def test_send_many_reports_messages_behind_a_broken_connection_as_unknown(scripted):
    # 300 messages span two pipeline windows; the peer dies after 100 replies.
    peer = scripted(lambda line, conn, req: f"OK 01M{req}\r\n".encode() if req < 100 else CLOSE)
    result = run_php("""
        $gate = new Client($args['uri']);
        $messages = [];
        for ($i = 0; $i < 300; $i++) { $messages[] = ['from' => 'a@example.com', 'to' => "r{$i}@example.org"]; }
        $r = $gate->sendMany($messages);
        report(['ids' => $r->ids, 'errors' => array_map(fn ($e) => get_class($e), $r->errors)]);
    """, {"uri": peer.uri})
    assert result["ids"] == [f"01M{i}" for i in range(100)]  # keys 0..99: a JSON list
    assert set(result["errors"].values()) == {"SmtpGate\\Exception\\ConnectionException"}
    assert sorted(int(k) for k in result["errors"]) == list(range(100, 300))


def test_each_request_is_one_write_syscall(scripted, tmp_path):
    """PROTOCOL hand-off without a delayed-ACK stall: one request, one write."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    peer = scripted()
    trace = tmp_path / "trace.txt"
    script = tmp_path / "one_write.php"
    script.write_text(f"""<?php
        require {json.dumps(str(HARNESS))};
        $gate = new SmtpGate\\Client({json.dumps(peer.uri)}, ['token' => 'tok']);
        $gate->send(['from' => 'a@example.com', 'to' => 'b@example.org', 'text' => str_repeat('x', 20000)]);
        $gate->ping();
        $gate->status('01SCRIPTED');
    """)
    subprocess.run([strace, "-f", "-qq", "-e", "trace=write,sendto,sendmsg,writev", "-e", "signal=none",
                    "-s", "8", "-o", str(trace), PHP, str(script)], check=True, timeout=30,
                   capture_output=True)
    writes = [line for line in trace.read_text().splitlines() if re.search(r"(write|sendto|sendmsg|writev)\(", line)]
    socket_writes = [line for line in writes if re.search(r'"(AUTH|SEND|PING|STAT)', line)]
    received = bytes(peer.received[0])
    assert received.count(b"\n") == 4
    assert len(socket_writes) == 3, "\n".join(writes)
    fd = re.search(r"\((\d+),", socket_writes[0]).group(1)
    assert [w for w in writes if re.search(rf"\({fd},", w)] == socket_writes, "no other write on the socket"
    sizes = [int(re.search(r"= (\d+)$", w).group(1)) for w in socket_writes]
    assert sum(sizes) == len(received)


# -- PHPUnit: the client against real daemons ---------------------------------

def test_phpunit_suite_passes_against_real_daemons(tmp_path, capsys):
    """clients/php/tests/*Test.php under PHPUnit (clients/php/phpunit.xml.dist): each test
    starts a real daemon from this repository, relaying to its embedded aiosmtpd, and
    checks what the calls return and what arrived. PHPUnit's own report is printed, so the
    pytest output (and CI's) lists every PHP test."""
    phpunit = shutil.which("phpunit")
    if phpunit is None:
        pytest.skip("phpunit is not installed (tests/setup.sh installs it)")
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([phpunit, "--configuration", str(PHP_CLIENT / "phpunit.xml.dist"), "--testdox",
                           "--log-junit", str(junit)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, SMTPGATE_TEST_PYTHON=sys.executable))
    with capsys.disabled():
        print(f"\n{proc.stdout.rstrip()}")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr
    declared = {name for path in (PHP_CLIENT / "tests").glob("*Test.php")
                for name in re.findall(r"public function (test\w+)\(", path.read_text())}
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert {case.get("name") for case in suite.iter("testcase")} == declared, "every declared test ran"
    assert {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped", "warnings")} == {
        "tests": len(declared), "failures": 0, "errors": 0, "skipped": 0, "warnings": 0}


# -- the example and the README's snippets, run as a user would ---------------

README = PHP_CLIENT / "README.md"
EXAMPLE = PHP_CLIENT / "examples" / "send_email.php"
SEND = """
$gate = new SmtpGate\\Client($argv[1]);
echo $gate->send(['from' => 'app@example.com', 'to' => 'kelly@example.org', 'subject' => 'README']), "\\n";
"""


def run_script(args: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run a PHP script under real `php` (no SMTPGATE_* from our environment); its stdout.
    It must exit 0 without printing a warning or notice."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    proc = subprocess.run([PHP, "-d", "error_reporting=-1", "-d", "display_errors=stderr", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stdout + proc.stderr
    return proc.stdout


def readme_block(language: str, containing: str) -> str:
    """The one ```language block of clients/php/README.md that contains `containing`."""
    [block] = [b for b in re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)
               if containing in b]
    return block


def app_beside_a_checkout(tmp_path: Path) -> Path:
    """tmp/smtpgate (this checkout) and tmp/app: the layout the README's paths assume."""
    (tmp_path / "smtpgate").symlink_to(ROOT)
    (tmp_path / "app").mkdir()
    return tmp_path / "app"


def test_the_example_sends_over_the_unix_socket_and_tcp_as_the_readme_says(make_daemon, tmp_path):
    readme = README.read_text()
    assert f"```php\n{EXAMPLE.read_text()}```" in readme, "the README shows examples/send_email.php as it is"
    serve = re.search(r"^smtpgate serve --dev .*--socket (\S+)$", readme, re.M)
    run = re.search(r"^php examples/send_email\.php (unix://\S+)", readme, re.M)
    assert run.group(1) == f"unix://{serve.group(1)}", "the README's example uses the socket of its daemon"
    daemon = make_daemon(upstream=None, dev=True)  # `smtpgate serve --dev --socket PATH`, in a test folder
    outputs = [run_script([str(EXAMPLE), daemon.unix_uri], cwd=tmp_path),
               run_script([str(EXAMPLE)], cwd=tmp_path, env={"SMTPGATE_SERVER": daemon.uri})]
    for output in outputs:
        message_id = re.fullmatch(r"queued as (\S+)\n", output).group(1)
        assert json.loads(daemon.request(f"WAIT {message_id} 20").removeprefix("OK "))["state"] == "sent"
    mails = sorted((Path(daemon.spool) / "dev-mail").glob("*.eml"))
    assert len(mails) == 2
    for path in mails:
        mail = message_from_bytes(path.read_bytes(), policy=policy.default)
        assert (mail["Subject"], mail["From"]) == ("您的订单已发货", "小店 <shop@example.com>")
        assert "您的订单今天已经发出" in mail.get_content()


def test_the_readme_require_without_composer_works_from_any_directory(daemon, tmp_path):
    app = app_beside_a_checkout(tmp_path)
    (app / "mail.php").write_text("<?php\n" + readme_block("php", "/smtpgate/clients/php/autoload.php") + SEND)
    message_id = run_script([str(app / "mail.php"), daemon.uri], cwd=tmp_path).strip()
    assert daemon.request(f"STATUS {message_id}").startswith("OK {")


def test_the_readme_composer_path_repository_installs_the_client(daemon, tmp_path):
    composer = shutil.which("composer")
    if composer is None:
        pytest.skip("composer is not installed (tests/setup.sh installs it)")
    app = app_beside_a_checkout(tmp_path)
    manifest = json.loads(readme_block("json", '"type": "path"'))
    manifest["repositories"].append({"packagist.org": False})  # offline: the path repository is all it needs
    (app / "composer.json").write_text(json.dumps(manifest))
    require = re.search(r"`(composer require \S+)`", README.read_text()).group(1).split()
    proc = subprocess.run([composer, *require[1:], "--no-interaction"], cwd=app, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, COMPOSER_HOME=str(tmp_path / "composer-home"),
                                                COMPOSER_ALLOW_SUPERUSER="1", COMPOSER_DISABLE_NETWORK="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (app / "mail.php").write_text("<?php\n" + readme_block("php", "/vendor/autoload.php") + SEND)
    message_id = run_script([str(app / "mail.php"), daemon.uri], cwd=tmp_path).strip()
    assert daemon.request(f"STATUS {message_id}").startswith("OK {")
