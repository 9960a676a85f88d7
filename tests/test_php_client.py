"""The PHP client (clients/php) under real `php`.

Each test runs a small PHP snippet that uses the client and prints one JSON
document (clients/php/tests/harness.php); pytest asserts on it and on what
the other side saw. Two kinds of peer:
- the real daemon (`daemon` / `make_daemon` from conftest.py) relaying to the
  real aiosmtpd `upstream`: every method, the error codes the daemon can be
  made to give, UTF-8, a 10 MB attachment, pipelining, Unix socket, failover;
- `ScriptedPeer`, a throwaway server on a real socket speaking the protocol's
  bytes, for what the real daemon cannot be made to do on demand: INTERNAL,
  an unknown code, a malformed reply, a close racing with a request, a reply
  that never comes.
A snippet must not print PHP warnings or notices: stderr has to stay empty.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import stuck_listener

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    assert all(r["text"] == f"text of {c}: 配额" and r["is_smtpgate"] for r, c in zip(result, codes))
    assert [c for r, c in zip(result, codes) if r["retryable"]] == ["BUSY", "INTERNAL"]
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


# -- against the real daemon and upstream -------------------------------------

def test_daemon_that_is_down_is_a_connection_exception(tmp_path):
    result = run_php("""
        report([outcome(fn () => (new Client("tcp://127.0.0.1:{$args['port']}"))->send(['from' => 'a@example.com', 'to' => 'b@example.org'])),
                outcome(fn () => (new Client("unix://{$args['path']}"))->ping()),
                outcome(fn () => (new Client(["tcp://127.0.0.1:{$args['port']}", "unix://{$args['path']}"]))->ping()),
                outcome(fn () => (new Client("tcp://127.0.0.1:{$args['port']}"))->sendMany([['from' => 'a@example.com', 'to' => 'b@example.org']]))]);
    """, {"port": free_port(), "path": str(tmp_path / "no-daemon.sock")})
    assert [r["class"] for r in result] == ["ConnectionException"] * 4
    assert all(r["is_smtpgate"] for r in result)
    assert "tcp://127.0.0.1:" in result[2]["message"] and "no-daemon.sock" in result[2]["message"]


def test_connect_timeout_then_failover_to_the_next_daemon(daemon):
    # A listener whose accept queue is full: the kernel drops further SYNs,
    # so a connect there hangs until the client's connect_timeout.
    with stuck_listener() as stuck:
        result = run_php("""
            $options = ['connect_timeout' => 0.3];
            $failover = new Client([$args['stuck'], $args['daemon']], $options);
            report([outcome(fn () => (new Client($args['stuck'], $options))->ping()),
                    outcome(fn () => $failover->ping()), $failover->endpoint()]);
        """, {"stuck": stuck, "daemon": daemon.uri})
    assert result[0]["class"] == "TimeoutException" and stuck in result[0]["message"]
    assert result[1:] == [{"value": True}, daemon.uri]


def test_send_status_wait_ping_hello_stats_against_the_daemon(daemon, upstream):
    result = run_php("""
        $gate = new Client($args['uri']);
        $id = $gate->send($args['message']);
        report(['ping' => $gate->ping(), 'hello' => $gate->hello(), 'id' => $id,
                'status' => $gate->status($id), 'final' => $gate->wait($id, 15), 'stats' => $gate->stats()]);
    """, {"uri": daemon.uri, "message": dict(MESSAGE, cc="cc@example.org", bcc=["hidden@example.org"],
                                              html="<p>今天我不回家</p>")})
    assert result["ping"] is True
    assert result["hello"].startswith("smtpgate ")
    assert result["status"]["id"] == result["id"] and result["status"]["state"] in ("queued", "sending", "sent")
    assert result["final"]["state"] == "sent"
    assert {r["address"]: r["state"] for r in result["final"]["recipients"]} == {
        "kelly@example.org": "sent", "cc@example.org": "sent", "hidden@example.org": "sent"}
    assert "version" in result["stats"]
    [received] = upstream.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert sorted(received.rcpt_tos) == ["cc@example.org", "hidden@example.org", "kelly@example.org"]
    message = received.message
    assert message["Subject"] == "记得收衣服"
    assert "hidden@example.org" not in received.data.decode("ascii", "replace")
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n").rstrip("\n") == MESSAGE["text"]
    assert "今天我不回家" in message.get_body(("html",)).get_content()


def test_raw_send_and_unix_socket_and_failover(daemon, upstream, tmp_path):
    raw = ("From: App <app@example.com>\r\nTo: kelly@example.org\r\nSubject: =?UTF-8?B?"
           + base64.b64encode("原样".encode()).decode() + "?=\r\n\r\nraw body line\r\n")
    result = run_php("""
        $unix = new Client($args['unix']);
        $failover = new Client(["tcp://127.0.0.1:{$args['down_port']}", $args['tcp']]);
        $id = $unix->sendRaw($args['raw'], 'bounce@example.com', ['kelly@example.org']);
        $id2 = $failover->send(['from' => 'app@example.com', 'to' => 'second@example.org', 'text' => 'via failover']);
        report(['raw' => $unix->wait($id, 15)['state'], 'endpoint' => $failover->endpoint(),
                'failover' => $failover->wait($id2, 15)['state']]);
    """, {"unix": daemon.unix_uri, "tcp": daemon.uri, "down_port": free_port(), "raw": raw})
    assert result == {"raw": "sent", "endpoint": daemon.uri, "failover": "sent"}
    messages = upstream.wait_for(2)
    by_rcpt = {m.rcpt_tos[0]: m for m in messages}
    raw_received = by_rcpt["kelly@example.org"]
    assert raw_received.mail_from == "bounce@example.com"
    assert raw_received.message["Subject"] == "原样"
    assert raw_received.message.get_content().strip() == "raw body line"
    assert by_rcpt["second@example.org"].message.get_content().strip() == "via failover"


def test_ten_megabyte_attachment_arrives_intact(daemon, upstream, tmp_path):
    payload = os.urandom(10 * 1024 * 1024)
    path = tmp_path / "报表.bin"
    path.write_bytes(payload)
    result = run_php("""
        $gate = new Client($args['uri'], ['read_timeout' => 30]);
        $id = $gate->send(['from' => 'app@example.com', 'to' => 'kelly@example.org', 'subject' => '附件',
                           'text' => '见附件', 'attachments' => [Attachment::fromFile($args['path'], 'application/octet-stream')]]);
        report($gate->wait($id, 30)['state']);
    """, {"uri": daemon.uri, "path": str(path)}, timeout=60)
    assert result == "sent"
    [received] = upstream.wait_for(1)
    [attachment] = list(received.message.iter_attachments())
    assert attachment.get_filename() == "报表.bin"
    assert attachment.get_content() == payload


def test_send_many_pipelines_to_the_daemon(daemon, upstream):
    count = 40
    result = run_php("""
        $gate = new Client($args['uri']);
        $messages = [];
        for ($i = 0; $i < $args['count']; $i++) {
            $messages["m{$i}"] = ['from' => 'app@example.com', 'to' => "r{$i}@example.org", 'subject' => "第{$i}封", 'text' => "正文 {$i}"];
        }
        $messages['bad'] = ['from' => 'app@example.com', 'to' => 'not an address'];
        $r = $gate->sendMany($messages);
        report(['ids' => $r->ids, 'errors' => array_map('describe', $r->errors),
                'states' => array_map(fn ($id) => $gate->wait($id, 15)['state'], $r->ids)]);
    """, {"uri": daemon.uri, "count": count})
    assert sorted(result["ids"]) == sorted(f"m{i}" for i in range(count))
    assert len(set(result["ids"].values())) == count
    assert list(result["errors"]) == ["bad"] and result["errors"]["bad"]["class"] == "BadAddressException"
    assert set(result["states"].values()) == {"sent"}
    received = upstream.wait_for(count)
    assert sorted(m.message["Subject"] for m in received) == sorted(f"第{i}封" for i in range(count))


def test_send_many_across_many_pipeline_windows(make_daemon):
    # 1500 SENDs: six windows of 256 on one connection, every reply matched
    # to its message (1500 distinct ids, all stored).
    daemon = make_daemon(hold=True)  # stored, not relayed: only the hand-off is under test
    result = run_php("""
        $gate = new Client($args['uri']);
        $messages = array_fill(0, 1500, ['from' => 'app@example.com', 'to' => 'kelly@example.org', 'text' => '批量']);
        $r = $gate->sendMany($messages);
        report(['ids' => count(array_unique($r->ids)), 'errors' => count($r->errors), 'queued' => $gate->stats()['states']['queued']]);
    """, {"uri": daemon.uri}, timeout=60)
    assert result == {"ids": 1500, "errors": 0, "queued": 1500}


def test_errors_the_daemon_gives_arrive_as_their_classes(make_daemon):
    daemon = make_daemon(max_message_size=200_000, allowed_recipients=["@example.org"])
    ok = {"from": "app@example.com", "to": "kelly@example.org"}
    result = run_php("""
        $gate = new Client($args['uri']);
        $send = fn (array $extra) => outcome(fn () => $gate->send($extra + $args['ok']));
        report([
            'BAD_REQUEST' => $send(['to' => 42]),
            'BAD_ADDRESS' => $send(['to' => 'kelly@@example.org']),
            'BAD_HEADER' => $send(['headers' => ['X-Order' => "1\\r\\nBcc: victim@example.org"]]),
            'TOO_LARGE' => $send(['text' => str_repeat('大', 120000)]),
            'DENIED' => $send(['to' => 'someone@elsewhere.test']),
            'NOT_FOUND' => outcome(fn () => $gate->status('01NOSUCHMESSAGE000000000')),
            'still usable' => outcome(fn () => $gate->ping()),
        ]);
    """, {"uri": daemon.uri, "ok": ok})
    usable = result.pop("still usable")
    assert usable == {"value": True}
    for code, outcome in result.items():
        assert outcome.get("code") == code, (code, outcome)
        assert outcome["class"] == "".join(p.capitalize() for p in code.split("_")) + "Exception"


def test_busy_daemon_refuses_with_busy_exception(make_daemon):
    daemon = make_daemon(min_free_space=10**18)  # "disk low": the spool refuses every SEND
    result = run_php("""
        report(outcome(fn () => (new Client($args['uri']))->send(['from' => 'a@example.com', 'to' => 'b@example.org'])));
    """, {"uri": daemon.uri})
    assert (result["class"], result["code"], result["retryable"]) == ("BusyException", "BUSY", True)


def test_connection_closed_by_the_daemons_idle_timeout_is_reopened(make_daemon, upstream):
    daemon = make_daemon(idle_timeout=0.3)
    result = run_php("""
        $gate = new Client($args['uri']);
        $gate->ping();
        usleep(1200000); // the daemon (idle_timeout 0.3 s) closes the connection meanwhile
        $id = $gate->send(['from' => 'app@example.com', 'to' => 'kelly@example.org', 'subject' => '空闲后']);
        report(['state' => $gate->wait($id, 15)['state'], 'connections' => $gate->stats()['intake']['connections']]);
    """, {"uri": daemon.uri})
    assert result == {"state": "sent", "connections": 2}
    assert [m.message["Subject"] for m in upstream.wait_for(1)] == ["空闲后"]


def test_token_daemon_requires_auth(make_daemon):
    daemon = make_daemon(tokens=["php-client-token"])
    result = run_php("""
        report([
            'none' => outcome(fn () => (new Client($args['uri']))->send(['from' => 'a@example.com', 'to' => 'b@example.org'])),
            'wrong' => outcome(fn () => (new Client($args['uri'], ['token' => 'wrong']))->ping()),
            'wrong_auth' => outcome(fn () => (new Client($args['uri']))->auth('wrong')),
            'right' => outcome(fn () => (new Client($args['uri'], ['token' => 'php-client-token']))->stats()['version']),
            'auth' => outcome(function () use ($args) { $c = new Client($args['unix']); $c->auth('php-client-token'); return $c->ping(); }),
        ]);
    """, {"uri": daemon.uri, "unix": daemon.unix_uri})
    assert result["none"]["class"] == "AuthRequiredException"
    assert result["wrong"]["class"] == "AuthFailedException"
    assert result["wrong_auth"]["class"] == "AuthFailedException"
    assert "wrong" not in result["wrong"]["message"].replace("wrong token", "")
    assert isinstance(result["right"]["value"], str)
    assert result["auth"] == {"value": True}


def test_the_example_script_sends_a_chinese_mail(daemon, upstream):
    example = PHP_CLIENT / "examples" / "send_email.php"
    proc = subprocess.run([PHP, "-d", "error_reporting=-1", "-d", "display_errors=stderr", str(example)],
                          capture_output=True, timeout=30, env=dict(os.environ, SMTPGATE_SERVER=daemon.uri))
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
    [received] = upstream.wait_for(1)
    assert re.search(r"[\u4e00-\u9fff]", received.message["Subject"])
    assert re.search(r"[\u4e00-\u9fff]", received.message.get_content())
    message_id = proc.stdout.decode().split()[-1]
    assert daemon.request(f"STATUS {message_id}").startswith("OK {")
