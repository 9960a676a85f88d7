"""Helpers of the HTTP side's tests: where a daemon's HTTP side listens, and
one request at a time over http.client (no redirect followed, no cookie
kept: the tests look at each)."""

from __future__ import annotations

import http.client
import re
from urllib.parse import urlencode

from support import free_port, wait_until  # noqa: F401 (for the HTTP tests)

HTTP_TIMEOUT = 10.0


def http_daemon(make_daemon, **settings):
    """A daemon with its HTTP side on a free loopback port; `.http` is (host, port)."""
    port = free_port()
    daemon = make_daemon(http_listen=f"127.0.0.1:{port}", **settings)
    daemon.http = ("127.0.0.1", port)
    return daemon


class Reply:
    def __init__(self, response: http.client.HTTPResponse):
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    @property
    def text(self) -> str:
        return self.body.decode()

    def cookie(self, name: str) -> str | None:
        for value in self.headers.get_all("Set-Cookie") or []:
            if value.startswith(name + "="):
                return value.split(";", 1)[0].split("=", 1)[1]
        return None


def request(address, method: str, path: str, *, token: str | None = None, cookie: str | None = None,
            form: dict | None = None, headers: dict | None = None, body: bytes | None = None) -> Reply:
    conn = http.client.HTTPConnection(*address, timeout=HTTP_TIMEOUT)
    try:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if cookie is not None:
            sent["Cookie"] = f"smtpgate_session={cookie}"
        if form is not None:
            body = urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def csrf_of(html: str) -> str:
    match = re.search(r'name=csrf value="([^"]+)"', html)
    assert match, html
    return match.group(1)


