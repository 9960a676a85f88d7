"""`smtpgate queue list|show|retry|delete` beside a running daemon and without one;
`smtpgate send`; SIGHUP reload."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from datetime import datetime

from test_daemon import SIMPLE, ok_payload, send_line

from smtpgate.spool.ops import RecipientOutcome
from smtpgate.spool.store import Spool


def smtpgate(*args, stdin: str | None = None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env)


def wait_state(daemon, msg_id: str, wanted: str, seconds: float = 20.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        state = json.loads(ok_payload(daemon.request(f"STATUS {msg_id}")))
        if state["state"] == wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_queue_list_show_delete_retry_and_reload(make_daemon, upstream):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0, retry_max=600.0)
    first = ok_payload(daemon.request(send_line(dict(SIMPLE, subject="first"))))
    second = ok_payload(daemon.request(send_line(dict(SIMPLE, to="other@example.org"))))
    assert wait_state(daemon, first, "deferred")["state"] == "deferred"
    assert wait_state(daemon, second, "deferred")["state"] == "deferred"

    listing = smtpgate("queue", "--spool", daemon.spool, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {m["id"]: m for m in json.loads(listing.stdout)}
    assert set(rows) == {first, second}
    assert rows[second]["recipients"][0]["address"] == "other@example.org"
    text = smtpgate("queue", "--spool", daemon.spool, "list").stdout
    assert first in text and "-- 2 messages" in text

    shown = smtpgate("queue", "--spool", daemon.spool, "show", first)
    assert json.loads(shown.stdout)["state"] == "deferred"
    assert smtpgate("queue", "--spool", daemon.spool, "show", "NOSUCHID").returncode == 1

    deleted = smtpgate("queue", "--spool", daemon.spool, "delete", second)
    assert deleted.returncode == 0, deleted.stderr
    assert daemon.request(f"STATUS {second}").startswith("ERR NOT_FOUND")

    # Held for the down upstream, the message is due already (and the retry
    # probes the upstream at once); pointing the running daemon at the real
    # upstream (SIGHUP) tries the changed upstream at once.
    retried = smtpgate("queue", "--spool", daemon.spool, "retry", first)
    assert retried.returncode == 0 and "1 message due now" in retried.stdout
    daemon.settings["upstream"] = [upstream.hostport]
    daemon.reload()
    assert wait_state(daemon, first, "sent")["state"] == "sent"
    assert [m.message["Subject"] for m in upstream.wait_for(1)] == ["first"]
    stats = json.loads(ok_payload(daemon.request("STATS")))
    assert stats["states"]["deferred"] == 0 and stats["states"]["sent"] == 1


def test_smtpgate_send_reads_body_from_stdin_and_waits(daemon, upstream, tmp_path):
    attachment = tmp_path / "report.txt"
    attachment.write_bytes(b"numbers\n")
    done = smtpgate("send", "--server", daemon.uri, "-f", "app@example.com", "-t", "kelly@example.org",
                    "-s", "日报", "-a", str(attachment), "--wait", "20", stdin="正文\n")
    assert done.returncode == 0, done.stderr
    msg_id, state = done.stdout.splitlines()
    assert json.loads(state)["state"] == "sent"
    parsed = upstream.wait_for(1)[0].message
    assert parsed["Subject"] == "日报"
    assert parsed.get_body(("plain",)).get_content().strip() == "正文"
    assert next(parsed.iter_attachments()).get_payload(decode=True) == b"numbers\n"


def test_queue_tool_finds_the_spool_in_the_config_without_reading_secrets(daemon, tmp_path):
    # The config names a password file the tool's user cannot read; only `spool` matters.
    config = tmp_path / "smtpgate.toml"
    config.write_text(f'spool = "{daemon.spool}"\nupstream = ["h:25"]\nupstream_user = "u"\n'
                      f'upstream_password_file = "{tmp_path / "unreadable"}"\n')
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    shown = smtpgate("queue", "--config", str(config), "show", msg_id)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == msg_id


def test_smtpgate_send_refuses_a_header_without_a_colon(daemon):
    bad = smtpgate("send", "--server", daemon.uri, "-f", "a@example.com", "-t", "b@example.org",
                   "-s", "hi", "--header", "X-No-Colon", stdin="x")
    assert bad.returncode == 64 and "'X-No-Colon' is not 'Name: value'" in bad.stderr


def stopped_daemons_spool(folder, deferred_for: float | None = None) -> str:
    """A spool left by a daemon that has stopped: one message, queued (or
    deferred for `deferred_for` seconds), and the lock file still naming the
    pid the daemon had (here: ours)."""
    async def main():
        spool = Spool(folder, min_free_bytes=0)
        await spool.open()
        msg_id, *_ = await spool.enqueue(b"{}", "app@example.com", ["kelly@example.org"])
        if deferred_for is not None:
            await spool.claim_due(time.time(), 1)
            await spool.record_attempt(msg_id, [RecipientOutcome("kelly@example.org", "deferred", "451 later")],
                                       next_attempt=time.time() + deferred_for)
        await spool.close()
        return msg_id

    return asyncio.run(main())


def test_queue_tool_signals_no_process_that_merely_has_a_stopped_daemons_pid(tmp_path):
    msg_id = stopped_daemons_spool(tmp_path)
    # The pid in the lock file now belongs to a bystander, whom SIGUSR1 would kill.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "lock").write_text(f"{bystander.pid}\n")
        deleted = smtpgate("queue", "--spool", str(tmp_path), "delete", msg_id)
        assert deleted.returncode == 0, deleted.stderr
    finally:
        # A SIGUSR1 from the tool, if it sent one, is pending or delivered by
        # now, and lower signals are delivered first: it would win over this.
        bystander.terminate()
        bystander.wait(10)
    assert bystander.returncode == -signal.SIGTERM


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def test_queue_retry_makes_a_message_due_now_without_a_daemon(tmp_path):
    msg_id = stopped_daemons_spool(tmp_path, deferred_for=3600)
    shown = json.loads(smtpgate("queue", "--spool", str(tmp_path), "show", msg_id).stdout)
    assert shown["state"] == "deferred" and epoch(shown["next_attempt"]) > time.time() + 3000
    before = time.time()
    retried = smtpgate("queue", "--spool", str(tmp_path), "retry", msg_id)
    after = time.time()
    assert retried.returncode == 0 and "1 message due now" in retried.stdout
    shown = json.loads(smtpgate("queue", "--spool", str(tmp_path), "show", msg_id).stdout)
    # Due now, as the spool's own retry makes it: not at 1970 (STATUS and
    # `queue show` print it, and due times order the claims).
    assert before - 0.001 <= epoch(shown["next_attempt"]) <= after + 0.001


def test_queue_list_prints_what_the_spool_lists(tmp_path):
    msg_id = stopped_daemons_spool(tmp_path, deferred_for=3600)
    listing = smtpgate("queue", "--spool", str(tmp_path), "list", "--json")
    assert listing.returncode == 0, listing.stderr

    async def spool_listing():
        spool = Spool(tmp_path, min_free_bytes=0)
        await spool.open()
        try:
            return await spool.list_messages()
        finally:
            await spool.close()

    # One entry format, one name for the envelope sender: `from`.
    entries = json.loads(listing.stdout)
    assert entries == asyncio.run(spool_listing())
    assert [(m["id"], m["from"], m["recipients"][0]["reply"]) for m in entries] == [
        (msg_id, "app@example.com", "451 later")]
