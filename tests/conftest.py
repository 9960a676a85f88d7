"""Fixtures that start real parts: an aiosmtpd upstream and the smtpgate daemon.

`upstream`: aiosmtpd on 127.0.0.1 in a thread, recording every message and
answering scripted replies when a test asks for them; `make_upstream(**kw)`
starts more, with aiosmtpd's own settings (a STARTTLS server: tls_context,
require_starttls).
`daemon`: `smtpgate serve` as a subprocess (TCP on a free port and a Unix
socket), relaying to `upstream` in plaintext; `make_daemon(**config)` starts
one with other settings (tokens, limits, retry timings, upstream_tls and
upstream_ca_file for a TLS upstream).

With --strict-skips (CI), a skip whose reason is not in ALLOWED_SKIPS fails
the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller


from support import children_of, free_port, process_name, read_line

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0

# The only skips CI accepts (`.ci/run` runs pytest with --strict-skips): facts
# of a machine that tests/setup.sh cannot change. Any other skip fails the
# run, so a test that quietly stopped running (a tool setup.sh no longer
# installs, a fixture that always skips) cannot hide behind a green CI.
ALLOWED_SKIPS = {
    "no IPv6 loopback on this machine",  # a kernel or container without ::1
}


def pytest_addoption(parser):
    parser.addoption("--strict-skips", action="store_true",
                     help="fail the run on any skip whose reason is not in ALLOWED_SKIPS (tests/conftest.py)")


def _skip_reason(report) -> str | None:
    """The reason of a skipped test or module, None if it was not skipped."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


_unlisted_skips: list[str] = []


def _note_skip(report) -> None:
    reason = _skip_reason(report)
    if reason is not None and reason not in ALLOWED_SKIPS:
        _unlisted_skips.append(f"{report.nodeid}: {reason}")


pytest_runtest_logreport = _note_skip
pytest_collectreport = _note_skip


def pytest_sessionfinish(session, exitstatus):
    if _unlisted_skips and session.config.getoption("--strict-skips") and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unlisted_skips and config.getoption("--strict-skips"):
        terminalreporter.section("skips not in ALLOWED_SKIPS (tests/conftest.py): the run fails")
        for line in _unlisted_skips:
            terminalreporter.line(line)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self):
        return message_from_bytes(self.data, policy=policy.default)


class RecordingHandler:
    """Accepts everything unless a reply was scripted for a recipient or for DATA."""

    def __init__(self):
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, list[str]] = {}
        self.data_replies: list[str] = []
        self.max_rcpts: int | None = None  # like Postfix's smtpd_recipient_limit
        self.sessions = 0
        self.cond = threading.Condition()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self.cond:
            self.sessions += 1
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.cond:
            scripted = self.rcpt_replies.get(address)
            if scripted:
                return scripted.pop(0)
            if self.max_rcpts is not None and len(envelope.rcpt_tos) >= self.max_rcpts:
                return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.cond:
            if self.data_replies:
                return self.data_replies.pop(0)
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content))
            n = len(self.messages)
            self.cond.notify_all()
        return f"250 2.0.0 Ok: queued as M{n}"


class Upstream:
    """aiosmtpd on 127.0.0.1; `smtp_kwargs` go to aiosmtpd's SMTP (for
    example tls_context and require_starttls for a STARTTLS server)."""

    def __init__(self, **smtp_kwargs):
        self.handler = RecordingHandler()
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=free_port(), ready_timeout=10,
            data_size_limit=64 * 1024 * 1024, decode_data=False, enable_SMTPUTF8=True, **smtp_kwargs)

    def start(self):
        self.controller.start()
        self.host = "127.0.0.1"
        self.port = self.controller.port
        return self

    def stop(self):
        """Stop it (a test may do so before its fixture does)."""
        if self.controller.loop.is_running():
            self.controller.stop()

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def script_rcpt(self, address: str, *replies: str) -> None:
        """The next RCPT TO of `address` gets these replies, one per attempt, then 250."""
        with self.handler.cond:
            self.handler.rcpt_replies.setdefault(address, []).extend(replies)

    def script_data(self, *replies: str) -> None:
        with self.handler.cond:
            self.handler.data_replies.extend(replies)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Block until `count` messages arrived (bounded); return them."""
        with self.handler.cond:
            self.handler.cond.wait_for(lambda: len(self.handler.messages) >= count, timeout)
            return list(self.handler.messages)


@pytest.fixture
def upstream():
    server = Upstream().start()
    yield server
    server.stop()


@pytest.fixture
def make_upstream():
    """Start more upstreams: make_upstream(**aiosmtpd SMTP kwargs) -> Upstream."""
    started: list[Upstream] = []

    def make(**smtp_kwargs) -> Upstream:
        started.append(Upstream(**smtp_kwargs).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


class Daemon:
    """A running `smtpgate serve` subprocess."""

    def __init__(self, workdir: Path, settings: dict, env: dict | None = None):
        self.workdir = workdir
        self.settings = settings
        self.config_path = workdir / "smtpgate.toml"
        self.log_path = workdir / "daemon.log"
        self.unix = str(workdir / "smtpgate.sock")
        self.spool = settings["spool"]
        self.env = env or {}
        self.proc = None

    def write_config(self) -> None:
        self.config_path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in self.settings.items()))

    def start(self, extra_args=(), wait_ready: bool = True, prefix=(), **popen):
        """Start `smtpgate serve` (under `prefix`, a wrapper such as strace,
        if given); popen: more subprocess.Popen arguments."""
        self.write_config()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "smtpgate", "serve", "--config", str(self.config_path),
             "--log-format", "json", *extra_args],
            stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, **popen)
        if wait_ready:
            self.wait_listening()
        return self

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                lines.append({"event": "raw", "text": raw})
        return lines

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            text = self.log_path.read_bytes()[self.log_offset:].decode(errors="replace")
            addresses = []
            started = False
            for raw in text.splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if line.get("event") == "listening":
                    addresses.append(line["address"])
                started |= line.get("event") == "started"
            if started:
                tcp = [a for a in addresses if not a.startswith("/")]
                if tcp:
                    host, _, port = tcp[0].rpartition(":")
                    self.tcp = (host, int(port))
                return
            time.sleep(0.02)
        raise RuntimeError(f"daemon did not start:\n{self.log_path.read_text()}")

    @property
    def uri(self) -> str:
        return f"tcp://{self.tcp[0]}:{self.tcp[1]}"

    @property
    def unix_uri(self) -> str:
        return f"unix://{self.unix}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(self.tcp, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(self, **kwargs):
        from smtpgate.tools.lineclient import LineClient

        return LineClient(self.uri, **kwargs)

    def request(self, line: str | bytes, timeout: float = 10.0) -> str:
        """Send one request on a fresh connection; return the reply line without CRLF."""
        data = line if isinstance(line, bytes) else line.encode()
        with self.connect(timeout) as sock:
            sock.sendall(data + b"\n")
            return read_line(sock)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log_file", None):
            self.log_file.close()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def child_pid(self, name: str) -> int:
        """The pid of the daemon's child process called `name` (smtpgate-spool,
        smtpgate-relay)."""
        pids = [pid for pid in children_of(self.proc.pid) if process_name(pid) == name]
        assert len(pids) == 1, f"{len(pids)} children called {name}"
        return pids[0]

    def reload(self, timeout: float = 20.0) -> None:
        """Write the settings, SIGHUP, wait for the daemon's 'reloaded' line."""
        reloads = sum(1 for line in self.log_lines() if line.get("event") == "reloaded")
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.log_lines() if line.get("event") == "reloaded") == reloads:
            assert time.monotonic() < deadline, "no reload"
            time.sleep(0.05)


FAST_RETRIES = {"retry_base": 0.2, "retry_max": 1.0, "max_age": 60.0}


@pytest.fixture
def make_daemon(tmp_path, upstream):
    """Start a daemon relaying to `upstream`; keyword arguments are config keys."""
    started: list[Daemon] = []

    def make(env: dict | None = None, start: bool = True, **settings) -> Daemon:
        workdir = tmp_path / f"daemon{len(started)}"
        workdir.mkdir()
        config = {"listen": ["127.0.0.1:0"], "socket": str(workdir / "smtpgate.sock"),
                  "spool": str(workdir / "spool"), "upstream": [upstream.hostport],
                  "upstream_tls": "none", "helo_name": "smtpgate.test", **FAST_RETRIES,
                  # The suite's own load must not hold webhook events back (a test
                  # that wants it sets this).
                  "webhook_yield_for": 0}
        config.update(settings)
        if "retry_base" in settings and "retry_max" not in settings:
            # retry_max below retry_base is a configuration error
            config["retry_max"] = max(config["retry_max"], config["retry_base"])
        daemon = Daemon(workdir, {k: v for k, v in config.items() if v is not None}, env)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()
