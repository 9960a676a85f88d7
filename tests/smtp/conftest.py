"""Real parts for the SMTP client tests.

- `aiosmtpd_server(**smtp_kwargs)`: a real aiosmtpd upstream on 127.0.0.1 and
  a kernel-chosen port, recording what it received (envelope, MAIL options,
  the DATA bytes after un-stuffing).
- `tls_files`: a throwaway CA and a server certificate for 127.0.0.1 made with
  trustme; the client trusts it through a real `ca_file`.

The scripted misbehaving server and `run` live in smtp_helpers.py (a
conftest cannot be imported by name: tests/conftest.py is "conftest" too).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest
import trustme
from smtp_helpers import FreePortController, RecordingHandler


@pytest.fixture
def aiosmtpd_server():
    """Factory: aiosmtpd_server(**SMTP kwargs) -> (port, handler); stopped after the test."""
    controllers = []

    def start(handler: RecordingHandler | None = None, **smtp_kwargs):
        handler = handler or RecordingHandler()
        controller = FreePortController(
            handler, hostname="127.0.0.1", port=0, ready_timeout=10, **smtp_kwargs
        )
        controller.start()
        controllers.append(controller)
        return controller.port, handler

    yield start
    for controller in controllers:
        controller.stop()


@dataclass
class TlsFiles:
    ca: trustme.CA
    ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TlsFiles:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_context)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TlsFiles(ca, str(ca_file), server_context)
