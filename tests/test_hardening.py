"""Files and commands (issue 10): what a local user, a web page or an
application's input can do through smtpgate's files and command lines.

Spool and credential file modes, token length, `smtpgate sendmail`'s
argument parsing under real `php` mail() with an injected fifth parameter,
`smtpgate send --token-file`, the queue tool without a daemon, the replies
owed before a foreign-protocol line, and BAD_HEADER for attachment fields.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate.config import ConfigError, load_config
from smtpgate.tools.sendmail import EX_USAGE, UsageError, parse_args
from support import read_line, read_lines

SMTPGATE = Path(sys.executable).parent / "smtpgate"
TOKEN = "hardening-token-3c5e7a9b1d"
SIMPLE = {"from": "app@example.com", "to": "kelly@example.org", "subject": "hi", "text": "hello"}
php = pytest.mark.skipif(shutil.which("php") is None, reason="php not installed")


def send_line(message: dict) -> bytes:
    return ("SEND " + json.dumps(message) + "\n").encode()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def accepted(daemon) -> int:
    reply = daemon.request("STATS")
    return json.loads(reply[3:])["counters"]["accepted"]


# -- the spool: nothing in it for other users ------------------------------------

def test_spool_files_are_0600_under_umask_022(make_daemon):
    daemon = make_daemon(start=False)
    daemon.start(preexec_fn=lambda: os.umask(0o022))
    assert daemon.request(send_line(SIMPLE).decode().rstrip("\n")).startswith("OK ")
    names = sorted(os.listdir(daemon.spool))
    assert {"spool.sqlite3", "spool.sqlite3-wal", "spool.sqlite3-shm", "lock"} <= set(names), names
    assert mode(daemon.spool) == 0o700
    assert {name: mode(os.path.join(daemon.spool, name)) for name in names} == {name: 0o600 for name in names}


def test_a_spool_open_to_others_is_made_private_at_start(make_daemon):
    daemon = make_daemon()
    assert daemon.request(send_line(SIMPLE).decode().rstrip("\n")).startswith("OK ")
    daemon.stop()
    os.chmod(daemon.spool, 0o755)
    os.chmod(os.path.join(daemon.spool, "spool.sqlite3"), 0o644)
    daemon.start()
    assert mode(daemon.spool) == 0o700
    assert mode(os.path.join(daemon.spool, "spool.sqlite3")) == 0o600
    fixed = [l for l in daemon.log_lines() if l["event"] == "spool_mode_fixed"]
    assert sorted((Path(l["path"]).name, l["was"]) for l in fixed) == [
        ("spool", "0755"), ("spool.sqlite3", "0644")]


# -- secrets ------------------------------------------------------------------------

def test_a_password_file_readable_by_others_stops_the_start(make_daemon, tmp_path):
    secret = tmp_path / "upstream-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    daemon = make_daemon(start=False, upstream_user="me", upstream_password_file=str(secret),
                         upstream_allow_plaintext_auth=True)
    daemon.write_config()
    result = subprocess.run([sys.executable, "-m", "smtpgate", "serve", "--config", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        f"smtpgate: configuration error: upstream_password_file: {secret} is open to group or others "
        "(mode 0644); chmod 600 it, or pass it with systemd's LoadCredential="]
    secret.chmod(0o600)
    daemon.start()  # the same file, private: fine
    assert daemon.request("PING") == "OK PONG"


def write(tmp_path, text: str) -> str:
    path = tmp_path / "smtpgate.toml"
    path.write_text('upstream = ["h:25"]\n' + text)
    return str(path)


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o620])
def test_a_tokens_file_open_to_group_or_others_is_refused(tmp_path, file_mode):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(file_mode)
    with pytest.raises(ConfigError, match=f"^tokens_file: .* \\(mode {file_mode:04o}\\)"):
        load_config(write(tmp_path, f'tokens_file = "{tokens}"\n'))


def test_systemd_credentials_are_accepted_as_systemd_makes_them(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "upstream-password").write_text("from-systemd\n")
    (creds / "upstream-password").chmod(0o440)  # the directory is the service's alone
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(write(tmp_path, 'upstream_user = "me"\n'))
    assert config.upstream_password == "from-systemd"


@pytest.mark.parametrize("token", ["x", "fifteen-chars-1"])
def test_a_token_shorter_than_16_characters_is_a_configuration_error(tmp_path, token):
    with pytest.raises(ConfigError, match=f"^tokens: a token has {len(token)} characters; at least 16"):
        load_config(write(tmp_path, f'tokens = ["{token}"]\n'))
    assert load_config(write(tmp_path, 'tokens = ["sixteen-chars-12"]\n')).tokens == ["sixteen-chars-12"]


def test_a_budget_below_one_request_line_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match="^max_inflight_bytes: must hold one request line"):
        load_config(write(tmp_path, "max_inflight_bytes = 1000000\n"))
    assert load_config(write(tmp_path, "")).inflight_budget == 4 * 25 * 1024 * 1024


# -- smtpgate sendmail: the command line is input ---------------------------------

@pytest.mark.parametrize("argv, why", [
    (["-t", "--server=tcp://127.0.0.1:9"], "--server is not taken from the command line"),
    (["--server", "tcp://127.0.0.1:9", "-t"], "--server is not taken from the command line"),
    (["-t", "--config=/tmp/evil.toml"], "--config is not taken from the command line"),
    (["-f", "-oi", "a@example.org"], "-f needs a value, not the option-like '-oi'"),
    (["-r", "--server=x", "a@example.org"], "-r needs a value"),
    (["-F", "Evil\nX-Injected: yes", "a@example.org"], "-F: the name contains a control character"),
    (["-FEvil\rBcc: x@evil.test", "a@example.org"], "-F: the name contains a control character"),
    (["a@example.org", "-fx@evil.test"], "'-fx@evil.test' where a recipient is expected"),
    (["a@example.org", "--server=tcp://127.0.0.1:9"], "'--server=tcp://127.0.0.1:9' where a recipient"),
    (["--", "-x@example.org"], "'-x@example.org' where a recipient is expected"),
])
def test_sendmail_refuses_options_where_values_belong(argv, why):
    with pytest.raises(UsageError, match="^" + why.replace("(", r"\(")[:40]):
        parse_args(argv)


def test_sendmail_options_end_at_the_first_recipient():
    opts = parse_args(["-t", "-i", "-fapp@example.com", "-F", "Shop", "a@example.org", "b@example.org"])
    assert (opts.sender, opts.full_name, opts.recipients) == ("app@example.com", "Shop",
                                                              ["a@example.org", "b@example.org"])


class Listener:
    """A TCP listener of the test's: did anybody connect to it?"""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.uri = "tcp://127.0.0.1:%d" % self.sock.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


def php_mail(daemon, fifth: str) -> subprocess.CompletedProcess:
    code = ('echo mail("kelly@example.org", "Order 42", "Hello", ["From" => "Shop <shop@example.com>"], '
            + json.dumps(fifth) + ') ? "sent" : "failed";')
    return subprocess.run(["php", "-n", "-d", f"sendmail_path={SMTPGATE} sendmail -t -i", "-r", code],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, SMTPGATE_SERVER=daemon.unix_uri))


@php
@pytest.mark.parametrize("fifth", [
    "-fx@example.com --server={uri}",       # the PHPMailer CVE-2016-10033 shape
    "--server={uri} -fx@example.com",
    "-f --server={uri}",
    "-fx@example.com victim@example.org --config=/tmp/evil.toml --server={uri}",
])
def test_php_mail_with_an_injected_fifth_parameter_sends_nothing_anywhere(daemon, upstream, fifth):
    listener = Listener()
    result = php_mail(daemon, fifth.format(uri=listener.uri))
    assert result.stdout == "failed", result
    assert "smtpgate sendmail: " in result.stderr  # refused by us (exit 64), not lost on the way
    assert listener.connections() == 0
    assert accepted(daemon) == 0 and upstream.messages == []


@php
def test_php_mail_with_a_line_break_in_the_name_adds_no_header(daemon, upstream):
    result = php_mail(daemon, "-fshop@example.com -F'Evil\nX-Injected: yes'")
    assert result.stdout == "failed", result
    assert "smtpgate sendmail: -F: the name contains a control character" in result.stderr
    direct = subprocess.run([str(SMTPGATE), "sendmail", "-t", "-F", "Evil\nX-Injected: yes"],
                            input=b"To: kelly@example.org\n\nhi\n", capture_output=True, timeout=30,
                            env=dict(os.environ, SMTPGATE_SERVER=daemon.unix_uri))
    assert direct.returncode == EX_USAGE and b"control character" in direct.stderr
    assert accepted(daemon) == 0 and upstream.messages == []
    # the same call with a plain name goes through, with that name
    result = php_mail(daemon, "-fshop@example.com -F'Shop Team'")
    assert result.stdout == "sent", result
    [received] = upstream.wait_for(1)
    assert received.mail_from == "shop@example.com" and received.message["X-Injected"] is None


# -- smtpgate send: no token on the command line ----------------------------------

def smtpgate(*args, stdin: str = "", env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


def test_smtpgate_send_takes_the_token_from_a_file_or_the_environment_only(make_daemon, tmp_path):
    daemon = make_daemon(tokens=[TOKEN])
    base = ["send", "--server", daemon.uri, "-f", "app@example.com", "-t", "kelly@example.org", "-s", "hi"]
    env = {k: v for k, v in os.environ.items() if k != "SMTPGATE_TOKEN"}
    refused = smtpgate(*base, "--token", TOKEN, env=env)
    assert refused.returncode == 64
    assert "--token is not accepted" in refused.stderr and "--token-file" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    by_file = smtpgate(*base, "--token-file", str(token_file), stdin="hi", env=env)
    assert by_file.returncode == 0, by_file.stderr
    by_env = smtpgate(*base, stdin="hi", env=dict(env, SMTPGATE_TOKEN=TOKEN))
    assert by_env.returncode == 0, by_env.stderr
    missing = smtpgate(*base, "--token-file", str(tmp_path / "absent"), env=env)
    assert missing.returncode == 66 and "cannot read the token file" in missing.stderr


def test_queue_tool_says_when_no_daemon_holds_the_spool(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0)
    msg_id = daemon.request(send_line(SIMPLE).decode().rstrip("\n"))[3:]
    daemon.stop()
    deleted = smtpgate("queue", "--spool", daemon.spool, "delete", msg_id)
    assert deleted.returncode == 0
    assert "the daemon is not running" in deleted.stderr


# -- the wire: foreign protocols, attachment fields ---------------------------------

def test_requests_before_a_foreign_line_are_answered_then_the_connection_closes(daemon, upstream):
    with daemon.connect() as sock:
        sock.sendall(b"PING\n" + send_line(SIMPLE) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                     + send_line(dict(SIMPLE, subject="after the GET")))
        pong, sent = read_lines(sock, 2)
        sock.settimeout(10)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert pong == "OK PONG" and sent.startswith("OK ") and rest == b""
    status = daemon.request(f"STATUS {sent[3:]}")
    assert status.startswith("OK "), status
    assert accepted(daemon) == 1  # the SEND after the GET was never read
    assert [m.message["Subject"] for m in upstream.wait_for(1)] == ["hi"]


@pytest.mark.parametrize("field, value", [
    ("content_type", "text/plain\r\nX-Injected: yes"),
    ("content_type", "text/plain\x00"),
    ("filename", "a\nb.txt"),
    ("content_id", "logo\r\nX-Injected: yes"),
])
def test_a_line_break_in_an_attachment_field_is_bad_header(daemon, field, value):
    attachment = {"filename": "a.txt", "content_type": "text/plain", "content_base64": "aGk=", field: value}
    with daemon.connect() as sock:
        sock.sendall(send_line(dict(SIMPLE, attachments=[attachment])))
        reply = read_line(sock)
    assert reply.startswith("ERR BAD_HEADER "), reply


def test_the_tokens_credential_is_used_without_a_tokens_file(tmp_path, monkeypatch):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "tokens").write_text(TOKEN + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_config(write(tmp_path, "")).tokens == [TOKEN]
