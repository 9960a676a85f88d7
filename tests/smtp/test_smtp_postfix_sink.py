"""SmtpConnection against Postfix's smtp-sink: a real server that offers PIPELINING.

aiosmtpd does not offer PIPELINING, so this is where the pipelined path meets
a real implementation; smtp-sink's -f/-r/-q/-Q options make it refuse or drop
at a given command.  Skipped where Postfix is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from smtp_helpers import run

from smtpgate.smtp import SmtpConnection, SmtpConnectionLost, SmtpServerRefused, UpstreamSettings

pytestmark = pytest.mark.skipif(not shutil.which("smtp-sink"), reason="smtp-sink (postfix) not installed")


@pytest.fixture
def smtp_sink():
    """Factory: smtp_sink(*options) -> (port, dump folder); each transaction dumped to a file."""
    sinks = []
    # Run as root, smtp-sink drops to nobody, who cannot reach pytest's
    # private tmp_path: dump into a folder of its own directly under /tmp.
    dump = Path(tempfile.mkdtemp(prefix="smtpgate-sink-"))
    dump.chmod(0o777)

    def start(*options: str):
        for _ in range(5):  # the port is free when chosen, but may be taken before smtp-sink binds
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            sink = subprocess.Popen(
                ["smtp-sink", *user, "-d", f"{dump}/%M.", *options, f"127.0.0.1:{port}", "100"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            sinks.append(sink)
            for _ in range(100):
                if sink.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return port, dump
                except OSError:
                    time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start")

    yield start
    for sink in sinks:
        sink.terminate()
        sink.wait(timeout=5)
    shutil.rmtree(dump)


def dumps(folder) -> list[list[str]]:
    """The dumped transactions, as lines (smtp-sink writes LF and removes the stuffing)."""
    return [path.read_text().split("\n") for path in folder.iterdir()]


def settings(port: int) -> UpstreamSettings:
    return UpstreamSettings("127.0.0.1", port, tls="none", helo_name="client.example")


BODY = b"Subject: pipelined\r\n\r\n.starts with a dot\r\nlone LF\nend\r\n"


def test_pipelined_messages_on_one_connection(smtp_sink):
    port, dump = smtp_sink()

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            assert "PIPELINING" in conn.extensions
            results = []
            for n in range(3):
                results.append(await conn.send(f"a{n}@example.org", ["b@example.org", "c@example.org"], BODY))
                await conn.reset()
            return results

    results = run(scenario())
    assert all(r.status == "accepted" for result in results for r in result.recipients)
    transactions = dumps(dump)
    assert sorted(line for t in transactions for line in t if line.startswith("X-Mail-Args")) == [
        "X-Mail-Args: <a0@example.org>", "X-Mail-Args: <a1@example.org>", "X-Mail-Args: <a2@example.org>",
    ]
    first = transactions[0]
    assert [line for line in first if line.startswith("X-Rcpt-Args")] == [
        "X-Rcpt-Args: <b@example.org>", "X-Rcpt-Args: <c@example.org>",
    ]
    body = first[first.index("Subject: pipelined"):]
    assert body[:5] == ["Subject: pipelined", "", ".starts with a dot", "lone LF", "end"]


@pytest.mark.parametrize("option, status", [("-f", "permanent"), ("-r", "temporary")])
def test_end_of_data_refused(smtp_sink, option, status):
    port, dump = smtp_sink(option, ".")

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            result = await conn.send("a@example.org", ["b@example.org", "c@example.org"], BODY)
            return result, conn.usable

    result, usable = run(scenario())
    assert [r.status for r in result.recipients] == [status, status]
    assert result.recipients[0].reply == result.data_reply
    assert usable


def test_mail_refused(smtp_sink):
    port, dump = smtp_sink("-f", "MAIL")

    async def scenario():
        async with await SmtpConnection.open(settings(port)) as conn:
            return await conn.send("a@example.org", ["b@example.org", "c@example.org"], BODY)

    result = run(scenario())
    assert result.mail_reply.code // 100 == 5 and result.data_reply is None
    assert {(r.status, r.reply) for r in result.recipients} == {("permanent", result.mail_reply)}


@pytest.mark.parametrize(
    "option, command, error_type, after_data_end",
    [
        ("-q", ".", SmtpConnectionLost, True),  # drops after the final dot: may have the message
        ("-Q", "RCPT", SmtpServerRefused, False),  # 421 and drops after RCPT
    ],
)
def test_session_ended_by_the_server(smtp_sink, option, command, error_type, after_data_end):
    port, dump = smtp_sink(option, command)

    async def scenario():
        conn = await SmtpConnection.open(settings(port))
        with pytest.raises(error_type) as caught:
            await conn.send("a@example.org", ["b@example.org"], BODY)
        return caught.value, conn.usable

    error, usable = run(scenario())
    assert error.after_data_end is after_data_end and error.retryable and not usable
    if error_type is SmtpServerRefused:
        assert error.reply.code == 421
