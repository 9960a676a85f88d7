"""End to end: the daemon as a subprocess, a real aiosmtpd upstream, real sockets.

Every verb and error code of PROTOCOL.md, what arrives at the upstream, what
STATUS says, pipelining, hostile input, a restart after SIGTERM.
test_durability.py kills the daemon's processes and watches its fsyncs.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

import pytest

from support import read_line, read_lines

SIMPLE = {"from": "App <app@example.com>", "to": "kelly@example.org", "subject": "hi", "text": "hello"}


def send_line(message: dict) -> str:
    return "SEND " + json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def ok_payload(reply: str) -> str:
    assert reply.startswith("OK"), reply
    return reply[3:]


def err_code(reply: str) -> str:
    assert reply.startswith("ERR "), reply
    return reply.split(" ")[1]


def wait_final(daemon, msg_id: str, seconds: float = 20.0) -> dict:
    state = json.loads(ok_payload(daemon.request(f"WAIT {msg_id} {seconds}", timeout=seconds + 10)))
    return state


# -- verbs -----------------------------------------------------------------

def test_simple_verbs(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"PING\nping\nNOOP\nHELLO 1\nHELP\nAUTH anything\n")
        replies = read_lines(sock, 6)
    assert replies[0] == "OK PONG"
    assert replies[1] == "OK PONG"  # verbs are case-insensitive
    assert replies[2] == "OK"
    assert replies[3].startswith("OK smtpgate 1 ")
    assert replies[4].split()[1:] == ["PING", "HELLO", "AUTH", "SEND", "STATUS", "WAIT",
                                      "STATS", "NOOP", "HELP", "QUIT"]
    assert replies[5] == "OK"  # no tokens configured: AUTH has nothing to check


def test_quit_says_bye_then_closes(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"QUIT\r\nPING\n")
        assert read_line(sock) == "OK BYE"
        assert sock.recv(100) == b""  # nothing after QUIT is answered


def test_crlf_requests_and_unknown_verb(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"PING\r\nFROB x\r\nSTATUS\n")
        replies = read_lines(sock, 3)
    assert replies[0] == "OK PONG"
    assert err_code(replies[1]) == "BAD_REQUEST"
    assert err_code(replies[2]) == "BAD_REQUEST"


def test_send_arrives_at_upstream_with_headers_and_body(daemon, upstream):
    message = {"from": "应用 <app@example.com>", "to": ["kelly@example.org"], "cc": "cc@example.org",
               "bcc": ["hidden@example.org"], "subject": "记得收衣服", "text": "今天我不回家",
               "headers": {"X-Campaign": "spring"}}
    msg_id = ok_payload(daemon.request(send_line(message)))
    assert len(msg_id) >= 20
    state = wait_final(daemon, msg_id)
    assert state["state"] == "sent", state
    assert state["attempts"] == 1
    assert {r["address"]: r["state"] for r in state["recipients"]} == {
        "kelly@example.org": "sent", "cc@example.org": "sent", "hidden@example.org": "sent"}
    assert all(r["reply"].startswith("250") for r in state["recipients"])
    [received] = upstream.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert sorted(received.rcpt_tos) == ["cc@example.org", "hidden@example.org", "kelly@example.org"]
    parsed = received.message
    assert parsed["Subject"] == "记得收衣服"
    assert parsed["From"].addresses[0].display_name == "应用"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["Bcc"] is None and b"hidden@example.org" not in received.data
    assert parsed["Message-ID"] and parsed["Date"]
    assert parsed.get_content().strip() == "今天我不回家"
    assert b"\r\n" in received.data and b"\n" not in received.data.replace(b"\r\n", b"")


def test_html_alternative_and_attachment_arrive(daemon, upstream):
    blob = os.urandom(200_000)
    message = dict(SIMPLE, html="<p>hello</p>", attachments=[{
        "filename": "报告.pdf", "content_type": "application/pdf",
        "content_base64": base64.b64encode(blob).decode()}])
    msg_id = ok_payload(daemon.request(send_line(message)))
    assert wait_final(daemon, msg_id)["state"] == "sent"
    parsed = upstream.wait_for(1)[0].message
    assert parsed.get_content_type() == "multipart/mixed"
    assert parsed.get_body(("plain",)).get_content().strip() == "hello"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>hello</p>"
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_filename() == "报告.pdf"
    assert attachment.get_content() == blob


def test_raw_message_passes_through_with_normalised_line_endings(daemon, upstream):
    raw = "Subject: raw one\nFrom: app@example.com\nTo: kelly@example.org\n\nline one\n.dot line\nlast"
    msg_id = ok_payload(daemon.request(send_line(
        {"from": "bounce@example.com", "to": "kelly@example.org", "raw": raw})))
    assert wait_final(daemon, msg_id)["state"] == "sent"
    received = upstream.wait_for(1)[0]
    assert received.mail_from == "bounce@example.com"
    assert b"Subject: raw one\r\n" in received.data
    assert b"\r\n.dot line\r\n" in received.data  # dot-stuffing undone by the upstream
    assert received.message["Message-ID"] and received.message["Date"]


# -- error codes -----------------------------------------------------------

@pytest.mark.parametrize("line, code", [
    ("SEND", "BAD_REQUEST"),
    ("SEND {not json", "BAD_REQUEST"),
    ("SEND [1,2]", "BAD_REQUEST"),
    ('SEND {"from":' + "[" * 100_000, "BAD_REQUEST"),  # found by the soak fuzzer: RecursionError
    (send_line({"to": "a@example.org", "text": "x"}), "BAD_REQUEST"),
    (send_line({"from": "app@example.com", "text": "x"}), "BAD_REQUEST"),
    (send_line(dict(SIMPLE, to="not an address")), "BAD_ADDRESS"),
    (send_line(dict(SIMPLE, to="kelly@example.org\r\nBcc: victim@example.org")), "BAD_ADDRESS"),
    (send_line(dict(SIMPLE, subject="hi\r\nBcc: victim@example.org")), "BAD_HEADER"),
    (send_line(dict(SIMPLE, headers={"X-A": "b\nBcc: victim@example.org"})), "BAD_HEADER"),
    (send_line(dict(SIMPLE, headers={"X A": "b"})), "BAD_HEADER"),
    (send_line(dict(SIMPLE, subject="nul\u0000byte")), "BAD_HEADER"),
    ("STATUS 01JD3Q7Z8K4W6X2V9N5B0C1TXX", "NOT_FOUND"),
    ("WAIT 01JD3Q7Z8K4W6X2V9N5B0C1TXX 0", "NOT_FOUND"),
    ("WAIT x notanumber", "BAD_REQUEST"),
])
def test_bad_requests_get_their_code_and_nothing_is_queued(daemon, upstream, line, code):
    with daemon.connect() as sock:
        sock.sendall(line.encode() + b"\nPING\n")
        reply, after = read_lines(sock, 2)
    assert err_code(reply) == code, reply
    assert after == "OK PONG"  # the connection stays usable
    stats = json.loads(ok_payload(daemon.request("STATS")))
    assert stats["counters"]["accepted"] == 0


def test_message_over_the_limit_is_too_large(make_daemon):
    daemon = make_daemon(max_message_size=64 * 1024)
    reply = daemon.request(send_line(dict(SIMPLE, text="x" * 100_000)))
    assert err_code(reply) == "TOO_LARGE"


def test_overlong_line_is_drained_and_connection_stays_usable(make_daemon):
    daemon = make_daemon(max_message_size=4096)  # line limit 2*4096 + 64 KiB
    line_limit = 2 * 4096 + 64 * 1024
    with daemon.connect() as sock:
        sock.sendall(b"SEND " + b"x" * (line_limit * 20) + b"\nPING\n")
        replies = read_lines(sock, 2)
    assert err_code(replies[0]) == "TOO_LARGE"
    assert replies[1] == "OK PONG"


def test_tokens_required_and_checked(make_daemon):
    daemon = make_daemon(tokens=["s3cret-token-4f9a2c"])
    with daemon.connect() as sock:
        sock.sendall(b"PING\nSTATS\n" + send_line(SIMPLE).encode() + b"\nAUTH wrong\nAUTH s3cret-token-4f9a2c\nSTATS\n")
        replies = read_lines(sock, 6)
    assert replies[0] == "OK PONG"
    assert err_code(replies[1]) == "AUTH_REQUIRED"
    assert err_code(replies[2]) == "AUTH_REQUIRED"
    assert err_code(replies[3]) == "AUTH_FAILED"
    assert replies[4] == "OK"
    assert json.loads(ok_payload(replies[5]))["version"]
    assert "s3cret-token-4f9a2c" not in daemon.log_path.read_text()


def test_policy_denies_senders_and_recipients(make_daemon):
    daemon = make_daemon(allowed_senders=["@example.com"], allowed_recipients=["@example.org"])
    assert daemon.request(send_line(SIMPLE)).startswith("OK ")
    assert err_code(daemon.request(send_line(dict(SIMPLE, **{"from": "x@evil.test"})))) == "DENIED"
    assert err_code(daemon.request(send_line(dict(SIMPLE, to="x@other.test")))) == "DENIED"


def test_spool_full_is_busy_and_stores_nothing(make_daemon, upstream):
    daemon = make_daemon(max_queued=1, upstream=["127.0.0.1:9"], retry_base=60.0)
    first = ok_payload(daemon.request(send_line(SIMPLE)))
    assert err_code(daemon.request(send_line(dict(SIMPLE, subject="refused")))) == "BUSY"
    stats = json.loads(ok_payload(daemon.request("STATS")))
    assert stats["counters"]["accepted"] == 1 and sum(stats["states"].values()) == 1
    # and on disk, as the queue tool reads the spool: the first message only
    listing = subprocess.run([sys.executable, "-m", "smtpgate", "queue", "--spool", daemon.spool,
                              "list", "--json"], capture_output=True, text=True, timeout=60)
    assert [m["id"] for m in json.loads(listing.stdout)] == [first], listing.stderr


def test_a_reload_applies_the_spool_limits(make_daemon):
    daemon = make_daemon(max_queued=3, upstream=["127.0.0.1:9"], retry_base=60.0)
    for _ in range(2):
        assert daemon.request(send_line(SIMPLE)).startswith("OK ")
    daemon.settings["max_queued"] = 2
    daemon.reload()
    assert err_code(daemon.request(send_line(SIMPLE))) == "BUSY"  # 2 queued: the new limit


def test_browser_request_is_closed_at_once(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:2526\r\n\r\n")
        assert sock.recv(100) == b""
    assert any(l.get("event") == "foreign_protocol_closed" for l in daemon.log_lines())


def test_stalled_half_request_is_closed(make_daemon):
    daemon = make_daemon(request_timeout=0.5, idle_timeout=60.0)
    with daemon.connect() as sock:
        sock.sendall(b"SEND {\"from\":")
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the daemon, not by our timeout
    # and the daemon still serves
    assert daemon.request("PING") == "OK PONG"


def test_idle_connection_is_closed(make_daemon):
    daemon = make_daemon(idle_timeout=0.5)
    with daemon.connect() as sock:
        sock.settimeout(10)
        assert sock.recv(100) == b""


def test_slow_client_byte_by_byte(daemon, upstream):
    line = send_line(SIMPLE).encode() + b"\n"
    with daemon.connect() as sock:
        for i in range(len(line)):
            sock.send(line[i:i + 1])
        msg_id = ok_payload(read_line(sock))
    assert wait_final(daemon, msg_id)["state"] == "sent"


# -- pipelining, idempotency, unix socket ------------------------------------

def test_pipelining_1000_sends_on_one_connection(daemon, upstream):
    count = 1000
    payload = b"".join(send_line(dict(SIMPLE, subject=f"n{i}")).encode() + b"\n" for i in range(count))
    with daemon.connect(timeout=60) as sock:
        sock.sendall(payload + b"PING\n")
        replies = read_lines(sock, count + 1)
    ids = [ok_payload(r) for r in replies[:count]]
    assert len(set(ids)) == count
    # Replies come back in request order: ids are time-ordered to the
    # millisecond (their first 10 characters; the rest is random).
    assert [i[:10] for i in ids] == sorted(i[:10] for i in ids)
    assert replies[-1] == "OK PONG"
    received = upstream.wait_for(count, timeout=120)
    assert sorted(m.message["Subject"] for m in received) == sorted(f"n{i}" for i in range(count))


def test_idempotency_key_returns_the_first_id(daemon, upstream):
    message = dict(SIMPLE, idempotency_key="order-4711")
    first = ok_payload(daemon.request(send_line(message)))
    second = ok_payload(daemon.request(send_line(message)))
    assert first == second
    wait_final(daemon, first)
    stats = json.loads(ok_payload(daemon.request("STATS")))
    assert stats["counters"]["accepted"] == 1
    assert len(upstream.messages) == 1


def test_unix_socket(daemon, upstream):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(daemon.unix)
        sock.sendall(b"PING\n" + send_line(SIMPLE).encode() + b"\n")
        replies = read_lines(sock, 2)
    assert replies[0] == "OK PONG"
    assert wait_final(daemon, ok_payload(replies[1]))["state"] == "sent"


# -- delivery outcomes -------------------------------------------------------

def test_temporary_failure_is_retried_then_sent(daemon, upstream):
    upstream.script_rcpt("kelly@example.org", "450 4.2.1 Mailbox busy, try later")
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    state = wait_final(daemon, msg_id)
    assert state["state"] == "sent"
    assert state["attempts"] == 2
    assert len(upstream.wait_for(1)) == 1


def test_permanent_failure_reported_per_recipient(daemon, upstream):
    upstream.script_rcpt("nobody@example.org", "550 5.1.1 No such user here")
    msg_id = ok_payload(daemon.request(send_line(dict(SIMPLE, to=["kelly@example.org", "nobody@example.org"]))))
    state = wait_final(daemon, msg_id)
    by_addr = {r["address"]: r for r in state["recipients"]}
    assert by_addr["nobody@example.org"]["state"] == "failed"
    assert by_addr["nobody@example.org"]["reply"] == "550 5.1.1 No such user here"
    assert by_addr["kelly@example.org"]["state"] == "sent"
    assert upstream.wait_for(1)[0].rcpt_tos == ["kelly@example.org"]


def test_more_recipients_than_a_transaction_takes_go_in_several(daemon, upstream):
    upstream.handler.max_rcpts = 100  # RFC 5321's minimum; Postfix's default limit is 1000
    recipients = [f"r{i}@example.org" for i in range(150)]
    msg_id = ok_payload(daemon.request(send_line(dict(SIMPLE, to=recipients[:1], bcc=recipients[1:]))))
    state = wait_final(daemon, msg_id)
    assert state["state"] == "sent" and state["attempts"] == 1
    received = upstream.wait_for(2)
    assert [len(m.rcpt_tos) for m in received] == [100, 50]
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(recipients)


def test_all_recipients_refused_means_failed(daemon, upstream):
    upstream.script_rcpt("kelly@example.org", "550 5.1.1 No such user")
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    state = wait_final(daemon, msg_id)
    assert state["state"] == "failed"
    assert state["recipients"][0]["reply"].startswith("550 5.1.1")


def test_status_while_upstream_is_down_is_deferred(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=30.0)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    state = json.loads(ok_payload(daemon.request(f"WAIT {msg_id} 0.5")))
    deadline = time.monotonic() + 20
    while state["state"] != "deferred" and time.monotonic() < deadline:
        time.sleep(0.05)
        state = json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))
    assert state["state"] == "deferred"
    assert state["next_attempt"] and state["attempts"] == 0  # held for the upstream, not tried
    assert state["recipients"][0]["state"] == "deferred"
    assert "upstream 127.0.0.1:9 down since" in state["recipients"][0]["reply"]


# -- restart -----------------------------------------------------------------

def test_sigterm_keeps_queue_and_restart_delivers(make_daemon, upstream):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=60.0)
    ids = [ok_payload(daemon.request(send_line(SIMPLE))) for _ in range(5)]
    assert daemon.stop() == 0
    daemon.settings["upstream"] = [upstream.hostport]
    daemon.start()
    assert len(upstream.wait_for(5)) == 5
    assert all(wait_final(daemon, i)["state"] == "sent" for i in ids)


# -- configuration -----------------------------------------------------------

@pytest.mark.parametrize("content, key", [
    ("bogus_key = 1\n", "bogus_key"),
    ('listen = ["0.0.0.0:2526"]\nupstream = ["127.0.0.1:25"]\n', "listen"),
    ('upstream = ["127.0.0.1:25"]\nupstream_user = "u"\nupstream_password_file = "/nonexistent/pw"\n',
     "upstream_password_file"),
    ('upstream = ["nocolon"]\n', "upstream"),
    ('upstream = ["127.0.0.1:25"]\nupstream_tls = "maybe"\n', "upstream_tls"),
])
def test_bad_configuration_stops_with_one_line_naming_the_key(tmp_path, content, key):
    path = tmp_path / "bad.toml"
    path.write_text(f'spool = "{tmp_path / "spool"}"\n' + content)
    proc = subprocess.run([sys.executable, "-m", "smtpgate", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"smtpgate: configuration error: {key}:"), proc.stderr


def test_password_never_logged(make_daemon, tmp_path):
    # A real socket speaking SMTP that offers AUTH and refuses it: the
    # password crosses the wire and the refusal is logged and shown in
    # STATUS, and neither may carry it (nor its base64).
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    secret.chmod(0o600)
    seen = []

    class RefusingServer(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 test ESMTP\r\n")
            for line in self.rfile:
                seen.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    self.wfile.write(b"250-test\r\n250 AUTH PLAIN LOGIN\r\n")
                elif verb == b"AUTH":
                    self.wfile.write(b"535 5.7.8 Authentication credentials invalid\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:
                    self.wfile.write(b"503 5.5.1 no\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), RefusingServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        daemon = make_daemon(upstream=[f"127.0.0.1:{server.server_address[1]}"], upstream_user="me",
                             upstream_tls="none", upstream_allow_plaintext_auth=True,
                             upstream_password_file=str(secret), log_level="debug", retry_base=60.0)
        msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
        deadline = time.monotonic() + 20
        state = {}
        while state.get("state") != "deferred" and time.monotonic() < deadline:
            state = json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))
            time.sleep(0.05)
        assert state["state"] == "deferred" and "535" in state["recipients"][0]["reply"]
        assert any(line.upper().startswith(b"AUTH") for line in seen)  # the password did go out
        daemon.stop()
    finally:
        server.shutdown()
    text = daemon.log_path.read_text() + json.dumps(state)
    plain = base64.b64encode(b"\0me\0hunter2-very-secret").decode()
    assert "hunter2" not in text and plain not in text and base64.b64encode(b"hunter2").decode() not in text


def test_client_that_never_reads_its_replies_is_cut_off(make_daemon):
    daemon = make_daemon(request_timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    sock.connect(daemon.tcp)
    sock.settimeout(20)
    try:
        # Pipeline far more HELP replies than the socket buffers hold, never reading.
        try:
            sock.sendall(b"HELP\n" * 200_000)
        except OSError:
            pass  # the daemon cut us off while we were still writing: what we want
        deadline = time.monotonic() + 20
        while not any(l.get("event") == "connection_cut" for l in daemon.log_lines()):
            assert time.monotonic() < deadline, "the daemon kept the connection"
            time.sleep(0.05)
        with pytest.raises(ConnectionResetError):  # aborted, replies thrown away
            while sock.recv(1 << 20):
                pass
    finally:
        sock.close()
    assert daemon.request("PING") == "OK PONG"


def test_second_daemon_on_the_same_spool_or_port_stops_with_one_clear_line(daemon, tmp_path):
    base = ["serve", "--config", os.devnull, "--upstream", "127.0.0.1:9", "--upstream-tls", "none",
            "--log-format", "json"]
    same_spool = subprocess.run(
        [sys.executable, "-m", "smtpgate", *base, "--spool", daemon.spool, "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30)
    assert same_spool.returncode == 73
    [line] = [json.loads(l) for l in same_spool.stderr.splitlines() if '"start_failed"' in l]
    assert "in use by another smtpgate" in line["error"] and "Traceback" not in same_spool.stderr
    same_port = subprocess.run(
        [sys.executable, "-m", "smtpgate", *base, "--spool", str(tmp_path / "other"),
         "--listen", f"{daemon.tcp[0]}:{daemon.tcp[1]}"], capture_output=True, text=True, timeout=30)
    assert same_port.returncode == 71 and "address already in use" in same_port.stderr
    assert daemon.request("PING") == "OK PONG"  # the first one is unharmed


def test_stats_pipelined_after_a_send_counts_it(daemon):
    with daemon.connect() as sock:
        sock.sendall(send_line(SIMPLE).encode() + b"\nSTATS\n")
        sent, stats = read_lines(sock, 2)
    msg_id = ok_payload(sent)
    assert json.loads(ok_payload(stats))["counters"]["accepted"] == 1
    with daemon.connect() as sock:  # and a STATUS pipelined after a WAIT sees the final state
        sock.sendall(f"WAIT {msg_id} 20\nSTATUS {msg_id}\n".encode())
        waited, status = read_lines(sock, 2)
    assert json.loads(ok_payload(waited))["state"] == json.loads(ok_payload(status))["state"] == "sent"


def test_a_wait_abandoned_by_its_client_is_dropped(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    for _ in range(20):
        with daemon.connect() as sock:
            sock.sendall(f"WAIT {msg_id} 3600\n".encode())
            # An abortive close (RST), as when the caller's connection is
            # reset. A plain FIN is a half-close that may still want the
            # reply (printf 'WAIT ...' | nc -N), so that WAIT runs on, within
            # max_connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Every reset WAIT is gone, not left running for its hour (bounded wait
    # for the daemon to see the resets; no timing assertion).
    deadline = time.monotonic() + 20
    while True:
        stats = json.loads(ok_payload(daemon.request("STATS")))["intake"]
        if (stats["open_connections"], stats["waits"]) == (1, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (stats["open_connections"], stats["waits"]) == (1, 0)
