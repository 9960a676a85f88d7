"""STARTTLS end to end through the daemon: `smtpgate serve` relaying to an
aiosmtpd upstream that requires STARTTLS and AUTH, with a throwaway CA made
by trustme and given to the daemon as `upstream_ca_file`.

What the upstream saw is read from aiosmtpd's own log of every command line
it received (logger "mail.log", "%r >> %r"): a command the daemon sent is
there whether aiosmtpd accepted it or refused it.
"""

from __future__ import annotations

import json
import logging
import ssl
import time

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from test_daemon import SIMPLE, ok_payload, send_line

USER, PASSWORD = "relay-user", "relay-Pa55word"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def check_password(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def tls_upstream(make_upstream):
    """make_tls(cert): an upstream presenting `cert`, requiring STARTTLS
    before anything else and AUTH before MAIL."""

    def make(cert: trustme.LeafCert):
        return make_upstream(tls_context=server_context(cert), require_starttls=True,
                             authenticator=check_password, auth_required=True)

    return make


@pytest.fixture
def commands_seen(caplog):
    """The command lines every aiosmtpd upstream of the test received, as bytes."""
    caplog.set_level(logging.INFO, logger="mail.log")

    def seen() -> list[bytes]:
        return [r.args[1] for r in caplog.records
                if r.name == "mail.log" and r.msg == "%r >> %r" and isinstance(r.args[1], bytes)]

    return seen


def tls_daemon(make_daemon, upstream, ca_file: str, tmp_path):
    password = tmp_path / "upstream-password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    return make_daemon(upstream=[upstream.hostport], upstream_tls="starttls", upstream_ca_file=ca_file,
                       upstream_user=USER, upstream_password_file=str(password), retry_base=60.0)


def test_a_verified_upstream_gets_the_message_over_starttls_with_auth(
        make_daemon, tls_upstream, ca, ca_file, commands_seen, tmp_path):
    upstream = tls_upstream(ca.issue_cert("127.0.0.1"))
    daemon = tls_daemon(make_daemon, upstream, ca_file, tmp_path)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    state = json.loads(ok_payload(daemon.request(f"WAIT {msg_id} 20", timeout=30)))
    assert state["state"] == "sent", state
    [received] = upstream.wait_for(1)
    assert received.message["Subject"] == SIMPLE["subject"]
    verbs = [line.split(b" ", 1)[0].upper() for line in commands_seen()]
    # STARTTLS first (require_starttls refuses anything else before it),
    # then AUTH, then the mail: the password only ever went over TLS.
    assert verbs[:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"], verbs
    assert b"MAIL" in verbs


@pytest.mark.parametrize("who", ["unknown CA", "wrong host name"])
def test_an_unverified_upstream_gets_no_auth_and_no_mail(
        make_daemon, tls_upstream, ca, ca_file, commands_seen, tmp_path, who):
    cert = trustme.CA().issue_cert("127.0.0.1") if who == "unknown CA" else ca.issue_cert("mx.example.org")
    upstream = tls_upstream(cert)
    daemon = tls_daemon(make_daemon, upstream, ca_file, tmp_path)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    deadline = time.monotonic() + 20  # no WAIT for "deferred" (WAIT ends at final states): poll, bounded
    state = json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))
    while state["state"] != "deferred" and time.monotonic() < deadline:
        time.sleep(0.05)
        state = json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))
    assert state["state"] == "deferred", state
    reply = state["recipients"][0]["reply"]
    assert "TLS" in reply and "certificate verify failed" in reply, reply
    verbs = [line.split(b" ", 1)[0].upper() for line in commands_seen()]
    assert b"STARTTLS" in verbs  # the daemon did come, and asked for TLS
    assert b"AUTH" not in verbs and b"MAIL" not in verbs, verbs
    assert upstream.messages == []
