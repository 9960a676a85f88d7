"""SmtpConnection against a real aiosmtpd upstream: plain, STARTTLS, implicit TLS, AUTH, SIZE."""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trustme
from smtp_helpers import PASSWORD, USER, RecordingHandler, check_password, run

from smtpgate.smtp import (
    SmtpAuthError,
    SmtpConnection,
    SmtpMessageError,
    SmtpTlsError,
    UpstreamSettings,
)

MESSAGE = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nHello.\r\n.leading dot\r\n"


def settings(port: int, **overrides) -> UpstreamSettings:
    values = dict(host="127.0.0.1", port=port, tls="none", helo_name="client.example")
    values.update(overrides)
    return UpstreamSettings(**values)


def test_plain_session_several_recipients_one_refused_then_reuse(aiosmtpd_server):
    handler = RecordingHandler(rcpt_replies={"nobody@example.org": "550 5.1.1 no such user"})
    port, handler = aiosmtpd_server(handler)

    async def scenario():
        conn = await SmtpConnection.open(settings(port))
        assert conn.usable and "SIZE" in conn.extensions
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        first = await conn.send("a@example.org", ["b@example.org", "nobody@example.org", "c@example.org"], MESSAGE)
        await conn.reset()
        second = await conn.send("a@example.org", ["d@example.org"], b"Subject: 2\n\nsecond\n")
        assert await conn.noop()
        await conn.quit()
        assert not conn.usable
        return first, second

    first, second = run(scenario())
    assert [(r.address, r.status) for r in first.recipients] == [
        ("b@example.org", "accepted"), ("nobody@example.org", "permanent"), ("c@example.org", "accepted"),
    ]
    assert str(first.recipients[1].reply) == "550 5.1.1 no such user"
    assert str(first.data_reply) == "250 2.0.0 Ok: queued as Q1"
    assert second.recipients[0].status == "accepted"
    assert handler.ehlo_names == ["client.example"]
    one, two = handler.messages
    assert one.rcpt_tos == ["b@example.org", "c@example.org"]
    assert one.data == MESSAGE  # dot-stuffed on the wire, un-stuffed by the server
    assert f"SIZE={len(MESSAGE)}" in one.mail_options
    assert two.data == b"Subject: 2\r\n\r\nsecond\r\n"


def test_size_refusal(aiosmtpd_server):
    port, handler = aiosmtpd_server(data_size_limit=1000)

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            result = await conn.send("a@example.org", ["b@example.org", "c@example.org"], b"x" * 900 + b"\r\n" + b"y" * 900)
            assert conn.usable
            return result

    result = run(scenario())
    assert result.mail_reply.code == 552 and result.data_reply is None
    assert {r.status for r in result.recipients} == {"permanent"}
    assert handler.messages == []


def test_8bit_body_and_smtputf8_address(aiosmtpd_server):
    port, handler = aiosmtpd_server(enable_SMTPUTF8=True)
    body = "Subject: café\r\n\r\nnaïve\r\n".encode()

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            return await conn.send("josé@example.org", ["zoë@example.org"], body)

    assert run(scenario()).recipients[0].status == "accepted"
    (received,) = handler.messages
    assert received.mail_from == "josé@example.org" and received.rcpt_tos == ["zoë@example.org"]
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(received.mail_options)
    assert received.data == body


def test_long_line_refused_and_connection_still_usable(aiosmtpd_server):
    port, handler = aiosmtpd_server()

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            with pytest.raises(SmtpMessageError):
                await conn.send("a@example.org", ["b@example.org"], b"a" * 999)
            assert conn.usable
            return await conn.send("a@example.org", ["b@example.org"], b"a" * 998)

    assert run(scenario()).recipients[0].status == "accepted"
    assert [m.data for m in handler.messages] == [b"a" * 998 + b"\r\n"]


def test_starttls_with_verified_certificate_and_auth_plain(aiosmtpd_server, tls_files):
    port, handler = aiosmtpd_server(
        tls_context=tls_files.server_context, require_starttls=True,
        authenticator=check_password, auth_required=True,
    )

    async def scenario():
        upstream = settings(port, tls="starttls", ca_file=tls_files.ca_file, username=USER, password=PASSWORD)
        async with await SmtpConnection.open(upstream) as conn:
            assert conn._transport.get_extra_info("ssl_object") is not None
            assert "STARTTLS" not in conn.extensions  # the EHLO after TLS
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(scenario()).recipients[0].status == "accepted"
    assert handler.ehlo_names == ["client.example", "client.example"]
    assert handler.messages[0].data == MESSAGE


def test_auth_login_when_plain_is_not_offered(aiosmtpd_server, tls_files):
    port, handler = aiosmtpd_server(
        tls_context=tls_files.server_context, authenticator=check_password,
        auth_required=True, auth_exclude_mechanism=["PLAIN"],
    )

    async def scenario():
        upstream = settings(port, tls="starttls", ca_file=tls_files.ca_file, username=USER, password=PASSWORD)
        async with await SmtpConnection.open(upstream) as conn:
            assert conn.extensions["AUTH"].split() == ["LOGIN", "XOAUTH2"]  # no PLAIN: LOGIN is used
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(scenario()).recipients[0].status == "accepted"


@pytest.mark.parametrize("exclude", [[], ["PLAIN"]], ids=["plain", "login"])
def test_auth_refused_is_final_and_hides_the_password(aiosmtpd_server, tls_files, exclude):
    port, handler = aiosmtpd_server(
        tls_context=tls_files.server_context, authenticator=check_password,
        auth_required=True, auth_exclude_mechanism=exclude,
    )
    wrong = "wrong-" + PASSWORD
    upstream = settings(port, tls="starttls", ca_file=tls_files.ca_file, username=USER, password=wrong)
    with pytest.raises(SmtpAuthError) as caught:
        run(SmtpConnection.open(upstream))
    assert caught.value.reply.code == 535 and caught.value.retryable is False
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    assert wrong not in repr(upstream)
    assert handler.messages == []


@pytest.mark.parametrize("token, accepted", [("good-token", True), ("bad-token", False)])
def test_xoauth2(aiosmtpd_server, tls_files, token, accepted):
    port, handler = aiosmtpd_server(tls_context=tls_files.server_context, auth_required=True)
    upstream = settings(port, tls="starttls", ca_file=tls_files.ca_file, username=USER, xoauth2_token=token)

    async def scenario():
        async with await SmtpConnection.open(upstream) as conn:
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    if accepted:
        assert run(scenario()).recipients[0].status == "accepted"
    else:
        with pytest.raises(SmtpAuthError) as caught:
            run(scenario())
        assert caught.value.reply.code == 535 and token not in str(caught.value)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # on purpose here
def test_plaintext_auth_refused_unless_allowed(aiosmtpd_server):
    port, handler = aiosmtpd_server(authenticator=check_password, auth_require_tls=False, auth_required=True)
    with pytest.raises(SmtpAuthError, match="plaintext"):
        run(SmtpConnection.open(settings(port, username=USER, password=PASSWORD)))

    async def allowed():
        upstream = settings(port, username=USER, password=PASSWORD, allow_plaintext_auth=True)
        async with await SmtpConnection.open(upstream) as conn:
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(allowed()).recipients[0].status == "accepted"
    assert len(handler.messages) == 1


def test_implicit_tls(aiosmtpd_server, tls_files):
    port, handler = aiosmtpd_server(ssl_context=tls_files.server_context)

    async def scenario():
        async with await SmtpConnection.open(settings(port, tls="tls", ca_file=tls_files.ca_file)) as conn:
            assert conn._transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(scenario()).recipients[0].status == "accepted"
    assert handler.messages[0].data == MESSAGE


@pytest.mark.parametrize("tls", ["tls", "starttls"])
def test_certificate_from_an_unknown_ca_is_refused_before_any_mail(aiosmtpd_server, tls_files, tls):
    kwargs = {"ssl_context": tls_files.server_context} if tls == "tls" else {"tls_context": tls_files.server_context}
    port, handler = aiosmtpd_server(**kwargs)
    other_ca = trustme.CA()
    client_context = ssl.create_default_context()
    other_ca.configure_trust(client_context)
    upstream = settings(port, tls=tls, ssl_context=client_context, username=USER, password=PASSWORD)
    with pytest.raises(SmtpTlsError) as caught:
        run(SmtpConnection.open(upstream))
    assert "certificate verify failed" in str(caught.value)
    assert handler.messages == []


def test_hostname_is_checked(aiosmtpd_server, tls_files):
    # A certificate from the trusted CA, but for another name than the host
    # we connect to (127.0.0.1): refused.
    cert = tls_files.ca.issue_cert("other.example")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    port, handler = aiosmtpd_server(ssl_context=server_context)
    with pytest.raises(SmtpTlsError, match="mismatch"):
        run(SmtpConnection.open(settings(port, tls="tls", ca_file=tls_files.ca_file)))


def test_verify_off_accepts_any_certificate(aiosmtpd_server, tls_files):
    # No ca_file: the system store does not know the test CA, so the same
    # server is refused with verification on and served with it off.
    port, handler = aiosmtpd_server(ssl_context=tls_files.server_context)
    with pytest.raises(SmtpTlsError, match="certificate verify failed"):
        run(SmtpConnection.open(settings(port, tls="tls")))

    async def scenario():
        async with await SmtpConnection.open(settings(port, tls="tls", verify=False)) as conn:
            assert conn._transport.get_extra_info("ssl_object") is not None
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(scenario()).recipients[0].status == "accepted"
    assert handler.messages[0].data == MESSAGE


def test_large_body_goes_out_through_flow_control(aiosmtpd_server):
    # 4 MiB is far above asyncio's 64 KiB write buffer high-water mark, so the
    # driver has to wait for the socket to drain (pause/resume_writing).
    port, handler = aiosmtpd_server()
    body = b"Subject: big\r\n\r\n" + b"".join(b"%08d " % i + b"z" * 90 + b"\r\n" for i in range(42000))

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            return await conn.send("a@example.org", ["b@example.org"], body)

    assert run(scenario()).recipients[0].status == "accepted"
    assert handler.messages[0].data == body


def test_tls_context_is_built_once_per_ca_file_version(aiosmtpd_server, tls_files, tmp_path):
    # Loading a CA store costs ~25 ms on the event loop: once, not per connection.
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(open(tls_files.ca_file, "rb").read())
    first = settings(1, tls="tls", ca_file=str(ca_file)).make_ssl_context()
    assert settings(2, tls="tls", ca_file=str(ca_file)).make_ssl_context() is first
    # A replaced CA file (a new mtime) is read again, and still verifies.
    stamp = ca_file.stat().st_mtime_ns + 10**9
    os.utime(ca_file, ns=(stamp, stamp))
    assert settings(1, tls="tls", ca_file=str(ca_file)).make_ssl_context() is not first
    port, handler = aiosmtpd_server(ssl_context=tls_files.server_context)

    async def scenario():
        async with await SmtpConnection.open(settings(port, tls="tls", ca_file=str(ca_file))) as conn:
            return await conn.send("a@example.org", ["b@example.org"], MESSAGE)

    assert run(scenario()).recipients[0].status == "accepted"
