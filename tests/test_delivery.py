"""Delivery against real upstreams: aiosmtpd in-process (the `upstream`
fixture of conftest.py) and, where a real server cannot misbehave on cue, a
real socket server that speaks SMTP bytes and drops the line. The spool is
the real one on tmp_path. Pure parts (backoff, token bucket) are tested
without sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from support import wait_until

from smtpgate.delivery.pool import TokenBucket
from smtpgate.delivery.retry import next_attempt_at, outcomes_from_result, retry_delay
from smtpgate.delivery.scheduler import Delivery
from smtpgate.delivery.settings import DeliverySettings
from smtpgate.message.build import build_message
from smtpgate.message.validate import validate_send
from smtpgate.smtp import UpstreamSettings
from smtpgate.smtp.core import DeliveryResult, RecipientResult
from smtpgate.smtp.replies import Reply
from smtpgate.proc.calls import Answer
from smtpgate.spool import dots as dotlog
from smtpgate.spool.ops import RecipientOutcome
from smtpgate.spool.store import Spool

FOREVER = 3600.0  # WAIT bound a test never reaches when the code works


def upstream_settings(host: str, port: int, **kwargs) -> UpstreamSettings:
    return UpstreamSettings(host=host, port=port, tls="none", helo_name="smtpgate.test", **kwargs)


def fast(*upstreams: UpstreamSettings, **kwargs) -> DeliverySettings:
    """Settings with retries in tens of milliseconds instead of minutes."""
    values = dict(retry_base=0.02, retry_max=0.1, max_age=60.0, connections_per_upstream=4)
    values.update(kwargs)
    return DeliverySettings(upstreams=list(upstreams), **values)


async def send(spool: Spool, delivery: Delivery, **fields) -> str:
    """Validate and store a SEND, then wake delivery, as the intake does."""
    fields.setdefault("from", "app@example.com")
    fields.setdefault("to", "kelly@example.org")
    fields.setdefault("subject", "hello")
    fields.setdefault("text", "body")
    spec = validate_send(fields, max_message_bytes=1 << 20)
    msg_id, *_ = await spool.enqueue(spec.to_json(), spec.envelope_from, spec.recipients, None)
    delivery.wake()
    return msg_id


async def until_deferred(spool: Spool, msg_id: str, seconds: float = 20.0) -> dict:
    """The message's state once it is deferred, or after `seconds`
    (WAIT wakes only at final states, so this looks every 50 ms)."""
    deadline = time.monotonic() + seconds
    state = await spool.status(msg_id)
    while state["state"] != "deferred" and time.monotonic() < deadline:
        state = await spool.wait_final(msg_id, 0.05)
    return state


def run_with_delivery(tmp_path, settings: DeliverySettings, body, stop_grace: float = 5.0, log=None):
    """Run `body(spool, delivery)` with a started Delivery on a fresh spool."""

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, log or structlog.get_logger())
        await delivery.start()
        try:
            return await body(spool, delivery)
        finally:
            await delivery.stop(stop_grace)
            await spool.close()

    return asyncio.run(main())


def free_port_with_nothing_listening() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: connecting is refused


class DroppingServer:
    """A real SMTP-speaking socket server whose first `drops` connections
    drop the line at `drop_at`: "DATA" (the DATA command arrives, no 354) or
    "DOT" (the whole message and its final dot arrive, no reply), at the
    connection's `nth` message. With `pipelining`, it offers PIPELINING,
    and `pipelined` keeps the commands that followed a dropped dot."""

    def __init__(self, drop_at: str, drops: int = 1, nth: int = 1, pipelining: bool = False):
        self.drop_at = drop_at
        self.drops = drops
        self.nth = nth
        self.ehlo = b"250-dropper\r\n250 PIPELINING\r\n" if pipelining else b"250-dropper\r\n250 8BITMIME\r\n"
        self.connections = 0
        self.bodies: list[bytes] = []  # every message body that fully arrived
        self.pipelined: list[bytes] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        drop = self.connections <= self.drops
        messages = 0
        writer.write(b"220 dropper ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(self.ehlo)
                elif verb == b"DATA":
                    messages += 1
                    drop_here = drop and messages == self.nth
                    if drop_here and self.drop_at == "DATA":
                        return
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    self.bodies.append(await reader.readuntil(b"\r\n.\r\n"))
                    if drop_here:
                        # Commands pipelined behind the dot are here already
                        # (bounded: there may be none).
                        with contextlib.suppress(asyncio.TimeoutError):
                            self.pipelined.append(await asyncio.wait_for(reader.readuntil(b"DATA\r\n"), 5))
                        return
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 Ok\r\n")
                await writer.drain()
        finally:
            writer.transport.abort()


# --- pure parts ----------------------------------------------------------


def test_retry_delay_doubles_with_jitter_in_the_upper_half_and_is_capped():
    assert [retry_delay(n, 60, 3600, 0.0) for n in (1, 2, 3)] == [30, 60, 120]
    assert retry_delay(1, 60, 3600, 0.999) == pytest.approx(60, abs=0.1)
    assert retry_delay(20, 60, 3600, 0.999) == pytest.approx(3600, abs=2)
    assert retry_delay(10_000, 60, 3600, 0.5) == 2700  # no overflow for huge counts


def test_next_attempt_stops_at_max_age():
    settings = DeliverySettings(upstreams=[], retry_base=60, retry_max=3600, max_age=100)
    assert next_attempt_at(1000, 1000, 1, settings, 0.0) == 1030
    assert next_attempt_at(1080, 1000, 3, settings, 0.0) == 1100  # clipped: one last try at max age
    assert next_attempt_at(1100, 1000, 4, settings, 0.0) is None


def test_token_bucket_spaces_reservations_and_allows_a_burst():
    bucket = TokenBucket(rate_per_minute=60, burst=2, now=0)  # one token a second
    assert [bucket.reserve(0) for _ in range(4)] == [0, 0, 1, 2]
    assert bucket.reserve(1.5) == 1.5  # queued behind the reservations at 1 and 2
    assert TokenBucket(60, burst=1, now=0).reserve(100) == 0
    idle = TokenBucket(60, burst=2, now=0)
    assert [idle.reserve(100) for _ in range(3)] == [0, 0, 1]  # no more than the burst saved


@given(
    rate=st.floats(min_value=1, max_value=6000),
    burst=st.integers(min_value=1, max_value=5),
    gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=60),
)
def test_token_bucket_never_exceeds_rate_plus_burst_in_any_window(rate, burst, gaps):
    bucket = TokenBucket(rate, burst=burst, now=0)
    now, uses = 0.0, []
    for gap in gaps:
        now += gap
        uses.append(now + bucket.reserve(now))
    assert uses == sorted(uses)  # served in the order asked
    interval = 60.0 / rate
    for i, start in enumerate(uses):
        for j in range(i, len(uses)):  # uses[i..j] fall in a window of this length
            assert j - i + 1 <= burst + (uses[j] - start) / interval + 1e-6


def test_outcomes_follow_the_reply_class():
    result = DeliveryResult(
        recipients=[
            RecipientResult("a@x.org", "accepted", Reply(250, ("2.0.0 Ok: queued as 4F2",))),
            RecipientResult("b@x.org", "permanent", Reply(550, ("5.1.1 no such user",))),
            RecipientResult("c@x.org", "temporary", Reply(451, ("4.3.0 try later",))),
        ],
        mail_reply=Reply(250, ("Ok",)),
        data_reply=Reply(250, ("2.0.0 Ok: queued as 4F2",)),
    )
    assert outcomes_from_result(result) == [
        RecipientOutcome("a@x.org", "sent", "250 2.0.0 Ok: queued as 4F2"),
        RecipientOutcome("b@x.org", "failed", "550 5.1.1 no such user"),
        RecipientOutcome("c@x.org", "deferred", "451 4.3.0 try later"),
    ]


# --- against real upstreams ------------------------------------------------


def test_message_arrives_with_its_envelope_and_bytes(tmp_path, upstream):
    fields = {
        "from": "App <app@example.com>",
        "to": ["kelly@example.org", "li@example.org"],
        "cc": "boss@example.org",
        "bcc": "archive@example.net",
        "subject": "记得收衣服",
        "text": "今天我不回家",
    }

    async def body(spool, delivery):
        msg_id = await send(spool, delivery, **fields)
        return await spool.wait_final(msg_id, FOREVER), await spool.spec(msg_id)

    state, spec_json = run_with_delivery(tmp_path, fast(upstream_settings(upstream.host, upstream.port)), body)
    assert state["state"] == "sent" and state["attempts"] == 1
    assert all(r["state"] == "sent" and r["reply"].startswith("250 2.0.0 Ok: queued as M1") for r in state["recipients"])
    (received,) = upstream.messages
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ["kelly@example.org", "li@example.org", "boss@example.org", "archive@example.net"]
    expected = build_message(validate_send(fields, max_message_bytes=1 << 20).__class__.from_json(spec_json))
    assert received.data.rstrip(b"\r\n") == expected.rstrip(b"\r\n")
    assert received.message["Subject"] == "记得收衣服"
    assert "archive@example.net" not in received.data.decode()


def test_temporary_failure_is_retried_then_sent(tmp_path, upstream):
    upstream.script_rcpt("kelly@example.org", "451 4.7.1 greylisted, try later")

    async def body(spool, delivery):
        return await spool.wait_final(await send(spool, delivery), FOREVER)

    state = run_with_delivery(tmp_path, fast(upstream_settings(upstream.host, upstream.port)), body)
    assert state["state"] == "sent" and state["attempts"] == 2
    assert state["recipients"][0]["reply"].startswith("250 ")
    assert len(upstream.messages) == 1


def test_permanent_failure_fails_only_that_recipient(tmp_path, upstream):
    upstream.script_rcpt("nobody@example.org", "550 5.1.1 no such user")

    async def body(spool, delivery):
        return await spool.wait_final(await send(spool, delivery, to=["kelly@example.org", "nobody@example.org"]), FOREVER)

    state = run_with_delivery(tmp_path, fast(upstream_settings(upstream.host, upstream.port)), body)
    assert state["attempts"] == 1 and state["state"] == "failed"
    good, bad = state["recipients"]
    assert good["state"] == "sent" and good["reply"].startswith("250 ")
    assert bad == {"address": "nobody@example.org", "state": "failed", "reply": "550 5.1.1 no such user"}
    (received,) = upstream.messages
    assert received.rcpt_tos == ["kelly@example.org"]


def test_only_pending_recipients_are_retried(tmp_path, upstream):
    upstream.script_rcpt("li@example.org", "452 4.2.2 mailbox full")

    async def body(spool, delivery):
        return await spool.wait_final(await send(spool, delivery, to=["kelly@example.org", "li@example.org"]), FOREVER)

    state = run_with_delivery(tmp_path, fast(upstream_settings(upstream.host, upstream.port)), body)
    assert state["state"] == "sent" and state["attempts"] == 2
    assert [m.rcpt_tos for m in upstream.messages] == [["kelly@example.org"], ["li@example.org"]]


@pytest.mark.parametrize("drop_at, duplicate", [("DATA", False), ("DOT", True)])
def test_lost_connection_defers_and_retries(tmp_path, drop_at, duplicate):
    dropper = DroppingServer(drop_at)

    async def body(spool, delivery):
        msg_id = await send(spool, delivery)
        return await spool.wait_final(msg_id, FOREVER)

    async def main():
        port = await dropper.start()
        settings = fast(upstream_settings("127.0.0.1", port))
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, structlog.get_logger())
        await delivery.start()
        try:
            return await body(spool, delivery)
        finally:
            await delivery.stop(5)
            await spool.close()
            dropper.server.close()

    state = asyncio.run(main())
    assert state["state"] == "sent" and state["attempts"] == 2
    assert dropper.connections == 2
    assert len(dropper.bodies) == (2 if duplicate else 1)  # after the dot the upstream had it
    assert state.get("possible_duplicate", False) is duplicate


def test_line_dropped_after_a_dot_with_a_message_pipelined_behind(tmp_path):
    # One connection, two messages on it at once: the line drops after the
    # first one's final dot. That one may have been delivered (a possible
    # duplicate, sent again); the one behind it never got past DATA: sent
    # once, on a fresh connection, not flagged.
    dropper = DroppingServer("DOT", nth=2, pipelining=True)

    async def main():
        port = await dropper.start()
        settings = fast(upstream_settings("127.0.0.1", port), connections_per_upstream=1)
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, structlog.get_logger())
        await delivery.start()
        try:
            warm = await spool.wait_final(await send(spool, delivery, subject="warm"), FOREVER)  # pools it
            ids = []
            for subject in ("dropped", "behind"):  # claimed together: one wake-up for both
                spec = validate_send({"from": "app@example.com", "to": "kelly@example.org", "subject": subject,
                                      "text": "body"}, max_message_bytes=1 << 20)
                ids.append((await spool.enqueue(spec.to_json(), spec.envelope_from, spec.recipients, None))[0])
            delivery.wake()
            return [warm] + [await spool.wait_final(msg_id, FOREVER) for msg_id in ids]
        finally:
            await delivery.stop(5)
            await spool.close()
            dropper.server.close()

    warm, dropped, behind = asyncio.run(main())
    assert [warm["state"], dropped["state"], behind["state"]] == ["sent"] * 3
    assert dropped.get("possible_duplicate") is True and dropped["attempts"] == 2
    assert behind.get("possible_duplicate", False) is False and behind["attempts"] == 1
    assert sum(b"Subject: dropped" in body for body in dropper.bodies) == 2
    assert sum(b"Subject: behind" in body for body in dropper.bodies) == 1
    # The second was pipelined: its commands followed the dot on the first connection.
    assert len(dropper.pipelined) == 1 and dropper.pipelined[0].startswith(b"MAIL FROM:<app@example.com>")


def test_failover_to_the_second_upstream_when_the_first_refuses(tmp_path, upstream):
    dead = upstream_settings("127.0.0.1", free_port_with_nothing_listening())
    settings = fast(dead, upstream_settings(upstream.host, upstream.port), probe_base=60)

    async def body(spool, delivery):
        first = await spool.wait_final(await send(spool, delivery), FOREVER)
        second = await spool.wait_final(await send(spool, delivery), FOREVER)
        dead_pool, live_pool = delivery.pools
        return first, second, dead_pool.health.state == "down", dead_pool.opened, live_pool.opened

    first, second, marked_down, dead_opened, live_opened = run_with_delivery(tmp_path, settings, body)
    assert first["state"] == second["state"] == "sent"
    assert first["attempts"] == 1
    assert len(upstream.messages) == 2
    assert marked_down and dead_opened == 0 and live_opened == 1


def test_all_upstreams_unreachable_defers_with_the_reason(tmp_path):
    dead = upstream_settings("127.0.0.1", free_port_with_nothing_listening())

    async def body(spool, delivery):
        msg_id = await send(spool, delivery)
        return await until_deferred(spool, msg_id)

    state = run_with_delivery(tmp_path, fast(dead, retry_base=30), body)
    assert state["state"] == "deferred" and state["attempts"] == 0 and "next_attempt" in state  # held, untried
    assert "cannot connect" in state["recipients"][0]["reply"]


def test_max_age_exceeded_fails_the_pending_recipients(tmp_path, upstream):
    upstream.script_rcpt("kelly@example.org", *["450 4.2.0 mailbox busy"] * 100)

    async def body(spool, delivery):
        return await spool.wait_final(await send(spool, delivery), FOREVER)

    settings = fast(upstream_settings(upstream.host, upstream.port), max_age=0.3, retry_base=0.05)
    state = run_with_delivery(tmp_path, settings, body)
    assert state["state"] == "failed" and state["attempts"] >= 1
    reply = state["recipients"][0]["reply"]
    assert reply.startswith("450 4.2.0 mailbox busy") and "max_age" in reply
    assert upstream.messages == []


def test_rate_limit_holds_messages_beyond_the_burst(tmp_path, upstream):
    # 1 message a minute, 2 at once: within the test only the burst may go.
    settings = fast(upstream_settings(upstream.host, upstream.port), rate_per_minute=1, rate_burst=2)

    async def body(spool, delivery):
        ids = [await send(spool, delivery, subject=f"m{i}") for i in range(4)]
        delivery.wake()
        await asyncio.to_thread(upstream.wait_for, 2)
        await asyncio.sleep(0.3)  # ample time for a broken limiter to send the rest
        return ids, len(upstream.messages)

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, structlog.get_logger())
        await delivery.start()
        ids, received = await body(spool, delivery)
        await delivery.stop(0.1)  # the held messages are waiting for a token
        states = [await spool.status(i) for i in ids]
        await spool.close()
        return received, states

    received, states = asyncio.run(main())
    assert received == 2
    assert sorted(s["state"] for s in states) == ["queued", "queued", "sent", "sent"]
    held = [s for s in states if s["state"] == "queued"]
    assert all(s["attempts"] == 0 and "possible_duplicate" not in s for s in held)


def test_connections_are_reused_with_noop_after_idle(tmp_path, upstream):
    noops = []

    async def handle_NOOP(server, session, envelope, arg):
        noops.append(session.peer)
        return "250 2.0.0 Ok"

    upstream.handler.handle_NOOP = handle_NOOP
    settings = fast(upstream_settings(upstream.host, upstream.port), connections_per_upstream=1, idle_noop_after=0)

    async def body(spool, delivery):
        states = [await spool.wait_final(await send(spool, delivery, subject=f"m{i}"), FOREVER) for i in range(5)]
        return states, delivery.pools[0].opened

    states, opened = run_with_delivery(tmp_path, settings, body)
    assert [s["state"] for s in states] == ["sent"] * 5
    assert len(upstream.messages) == 5
    assert upstream.handler.sessions == 1 and opened == 1
    assert len(noops) == 4  # before each reuse, since idle_noop_after is 0


def test_stop_lets_an_in_flight_delivery_finish(tmp_path, upstream):
    original = upstream.handler.handle_DATA
    in_data = threading.Event()

    async def slow_data(server, session, envelope):
        in_data.set()
        await asyncio.sleep(0.3)
        return await original(server, session, envelope)

    upstream.handler.handle_DATA = slow_data

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, fast(upstream_settings(upstream.host, upstream.port)), structlog.get_logger())
        await delivery.start()
        msg_id = await send(spool, delivery)
        assert await asyncio.to_thread(in_data.wait, 10)  # in flight
        await delivery.stop(FOREVER)
        state = await spool.status(msg_id)
        await spool.close()
        return state

    state = asyncio.run(main())
    assert state["state"] == "sent"
    assert len(upstream.messages) == 1


def test_stop_waits_for_the_record_of_an_attempt_that_finished(tmp_path, upstream):
    """A worker goes on once its attempt's record is on its way to the
    spool; stop still returns only once that record is committed, so a
    message the upstream took is 'sent' after a clean stop, not left
    'sending' to be sent again at the next start."""

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        committing = spool.record_attempt

        def slow_record(*args, **kwargs):
            async def later():
                await asyncio.sleep(0.3)  # the commit outlasts the rest of the stop
                return await committing(*args, **kwargs)
            return asyncio.ensure_future(later())

        spool.record_attempt = slow_record
        delivery = Delivery(spool, fast(upstream_settings(upstream.host, upstream.port)), structlog.get_logger())
        await delivery.start()
        msg_id = await send(spool, delivery)
        await asyncio.to_thread(upstream.wait_for, 1)
        await delivery.stop(FOREVER)
        state = await spool.status(msg_id)
        await spool.close()
        return state

    assert asyncio.run(main())["state"] == "sent"


def test_stop_after_grace_keeps_the_message_queued_for_the_next_start(tmp_path, upstream):
    original = upstream.handler.handle_DATA
    slow = {"on": True}
    in_data = threading.Event()

    async def slow_data(server, session, envelope):
        if slow["on"]:
            in_data.set()
            await asyncio.sleep(1.0)
            return "451 4.3.0 too late"
        return await original(server, session, envelope)

    upstream.handler.handle_DATA = slow_data
    settings = fast(upstream_settings(upstream.host, upstream.port))

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, structlog.get_logger())
        await delivery.start()
        msg_id = await send(spool, delivery)
        assert await asyncio.to_thread(in_data.wait, 10)  # the final dot went out
        await delivery.stop(0.05)
        stopped = await spool.status(msg_id)
        slow["on"] = False
        delivery = Delivery(spool, settings, structlog.get_logger())
        await delivery.start()
        final = await spool.wait_final(msg_id, FOREVER)
        await delivery.stop(5)
        await spool.close()
        return stopped, final

    stopped, final = asyncio.run(main())
    assert stopped["state"] == "queued" and stopped["attempts"] == 1  # the final dot went out
    assert stopped["possible_duplicate"] is True
    assert final["state"] == "sent"


def test_log_lines_carry_the_message_id_and_never_the_password(tmp_path, upstream):
    # AUTH is refused locally (plaintext, not allowed): the upstream is unreachable
    # until a reload drops the credentials.
    with_secret = upstream_settings(upstream.host, upstream.port, username="app", password="s3cret-pw")
    plain = upstream_settings(upstream.host, upstream.port)

    async def body(spool, delivery):
        msg_id = await send(spool, delivery)
        state = await until_deferred(spool, msg_id)
        delivery.reload(fast(plain))
        await spool.retry(msg_id)
        delivery.wake()
        return msg_id, state, await spool.wait_final(msg_id, FOREVER)

    with structlog.testing.capture_logs() as logs:
        msg_id, deferred, final = run_with_delivery(
            tmp_path, fast(with_secret, retry_base=30), body, log=structlog.get_logger()
        )
    assert deferred["state"] == "deferred" and final["state"] == "sent"
    about_message = [e for e in logs if e["event"] == "delivery_attempt"]
    assert about_message and all(e.get("message_id") == msg_id for e in about_message)
    assert any(e["event"] == "upstream_down" and e["kind"] == "auth" for e in logs)
    assert any(e.get("replies", {}).get("kelly@example.org", "").startswith("250 ") for e in about_message)
    assert "s3cret-pw" not in repr(logs) and "s3cret-pw" not in repr(deferred)


def test_the_dot_record_lets_go_of_the_attempts_committed(tmp_path, upstream, monkeypatch):
    """Each attempt's id leaves the record of final dots (spool/dots.py)
    once its outcome is committed: the record's files are emptied in turn
    and hold only the latest ids, not every message ever relayed."""
    monkeypatch.setattr(dotlog, "ROTATE_AT", 100)  # four ids fill a file
    settings = fast(upstream_settings(upstream.host, upstream.port))
    folder = tmp_path / "spool"

    async def main():
        spool = Spool(folder, min_free_bytes=0)
        await spool.open()
        delivery = Delivery(spool, settings, structlog.get_logger(), dots=dotlog.DotLog(str(folder)))
        await delivery.start()
        ids = []
        try:
            for _ in range(12):
                ids.append(await send(spool, delivery))
                assert (await spool.wait_final(ids[-1], FOREVER))["state"] == "sent"
        finally:
            await delivery.stop(5)
            await spool.close()
        return ids

    ids = asyncio.run(main())
    recorded = dotlog.read_dots(str(folder))
    assert recorded and recorded <= set(ids[4:])  # the first file was emptied and written again


def test_rset_after_an_unfinished_transaction_on_a_reused_connection(tmp_path, upstream):
    resets = []

    async def handle_RSET(server, session, envelope):
        resets.append(session.peer)
        return "250 2.0.0 Ok"

    upstream.handler.handle_RSET = handle_RSET
    upstream.script_rcpt("nobody@example.org", "550 5.1.1 no such user")
    settings = fast(upstream_settings(upstream.host, upstream.port), connections_per_upstream=1)

    async def body(spool, delivery):
        refused = await spool.wait_final(await send(spool, delivery, to="nobody@example.org"), FOREVER)
        sent = await spool.wait_final(await send(spool, delivery), FOREVER)
        return refused, sent

    refused, sent = run_with_delivery(tmp_path, settings, body)
    assert refused["state"] == "failed" and sent["state"] == "sent"
    assert upstream.handler.sessions == 1
    assert len(resets) == 1  # MAIL was accepted, no RCPT: the transaction had to be reset


def test_a_delivery_process_that_dies_at_start_fails_the_start(monkeypatch, tmp_path):
    import subprocess
    import sys

    from smtpgate.delivery import process

    def broken(module, **_):  # a child that exits before it reads its first message
        return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    monkeypatch.setattr(process, "spawn", broken)
    lost = []

    async def main():
        handle = process.DeliveryProcess(Spool(tmp_path / "spool"), None, structlog.get_logger(),
                                         log_format="json", log_level="info", on_lost=lost.append)
        with pytest.raises(ChildProcessError, match="did not start"):
            await handle.start()

    asyncio.run(main())
    # (the status is None when the pipe's end is seen before the exit is)
    assert len(lost) == 1 and lost[0].startswith("the delivery process exited unexpectedly")


@pytest.mark.parametrize("nice", [None, 0, 3])
def test_delivery_runs_nicer_than_intake_and_the_spool_writer(make_daemon, upstream, nice):
    """A caller waits for its SEND's reply; nobody waits for a relay by the
    millisecond: the delivery process yields the CPU to the daemon and its
    writer, by `delivery_nice` steps (default 10; issue 15)."""
    daemon = make_daemon(**({} if nice is None else {"delivery_nice": nice}))
    with daemon.client() as client:  # it delivers
        msg_id = client.send({"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "t"})
        assert client.wait(msg_id, 20)["state"] == "sent"
    intake = os.getpriority(os.PRIO_PROCESS, daemon.proc.pid)
    steps = 10 if nice is None else nice
    assert os.getpriority(os.PRIO_PROCESS, daemon.child_pid("smtpgate-relay")) == min(intake + steps, 19)
    assert os.getpriority(os.PRIO_PROCESS, daemon.child_pid("smtpgate-spool")) == intake


def _may_leave_idle() -> bool:
    from smtpgate.proc.policy import can_leave_idle

    return can_leave_idle()


@pytest.mark.skipif(not _may_leave_idle(), reason="this process may not set a thread to SCHED_IDLE and back")
def test_delivery_runs_at_sched_idle_while_intake_is_light_and_as_before_when_not(make_daemon, upstream):
    """While at most LIGHT_CLAIMS messages claimed at enqueue are in flight
    (a lone caller's), every thread of the relay runs at SCHED_IDLE, at its
    nice value still; with one more, the daemon sets them back (issue 15)."""
    from smtpgate.delivery.process import LIGHT_CLAIMS
    from smtpgate.proc.policy import threads_of

    def policies(daemon) -> set[int]:
        return {os.sched_getscheduler(tid) for tid in threads_of(daemon.child_pid("smtpgate-relay"))}

    light = make_daemon()

    def lone_caller_idle() -> bool:
        # Each message's record brings room back (Want): a thread started
        # as the policy changed is set too, at most POLICY_AGAIN later.
        with light.client() as client:
            msg_id = client.send({"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "t"})
            assert client.wait(msg_id, 20)["state"] == "sent"
        return policies(light) == {os.SCHED_IDLE}

    wait_until(lone_caller_idle, what="the relay at SCHED_IDLE")
    relay = light.child_pid("smtpgate-relay")
    assert os.getpriority(os.PRIO_PROCESS, relay) == os.getpriority(os.PRIO_PROCESS, light.proc.pid) + 10

    # An upstream that never greets: the messages stay in flight.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        held = make_daemon(upstream=[f"127.0.0.1:{silent.getsockname()[1]}"])
        with held.client() as client:
            for n in range(LIGHT_CLAIMS):
                client.send({"from": "a@example.com", "to": f"b{n}@example.org", "subject": "s", "text": "t"})
            relay = held.child_pid("smtpgate-relay")
            wait_until(lambda: os.sched_getscheduler(relay) == os.SCHED_IDLE, what="the relay's loop at SCHED_IDLE")
            client.send({"from": "a@example.com", "to": "one-more@example.org", "subject": "s", "text": "t"})
            assert policies(held) == {os.SCHED_OTHER}


def test_intake_is_light_for_delivery_with_few_claims_in_flight_and_no_recent_wake():
    """A Wake means messages were stored 'queued' (intake outran the room,
    or an upstream is down): those the child claims itself are not counted
    in flight, so it stays at the normal policy HEAVY_FOR after one."""
    from smtpgate.delivery.process import HEAVY_FOR, LIGHT_CLAIMS, light

    assert light(0, float("inf")) and light(LIGHT_CLAIMS, HEAVY_FOR + 0.01)
    assert not light(LIGHT_CLAIMS + 1, float("inf"))
    assert not light(0, HEAVY_FOR - 0.01)


@pytest.mark.skipif(not _may_leave_idle(), reason="this process may not set a thread to SCHED_IDLE and back")
def test_every_thread_of_a_process_is_set_to_sched_idle_and_back_at_its_nice():
    """proc/policy.py: another process's threads, all of them, and their nice value kept."""
    import subprocess
    import sys

    from smtpgate.proc.policy import set_idle, threads_of

    child = subprocess.Popen([sys.executable, "-c", "import os, threading, time; os.nice(5); "
                              "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]; "
                              "print(flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its threads are started
        tids = threads_of(child.pid)
        assert len(tids) == 4
        assert set_idle(tids, True) and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
        assert set_idle(tids, False) and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_OTHER}
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {os.getpriority(os.PRIO_PROCESS, 0) + 5}
    finally:
        child.kill()
        child.wait()


def _loads_uvloop(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "uvloop" in maps.read()


@pytest.mark.parametrize("choice", [None, "asyncio", "uvloop"])
def test_the_daemon_and_its_delivery_run_the_event_loop_configured(make_daemon, upstream, choice):
    """uvloop when installed (smtpgate[fast]) unless `event_loop = "asyncio"`;
    the delivery process runs the daemon's kind of loop."""
    from smtpgate.eventloop import resolve

    if choice == "uvloop":
        pytest.importorskip("uvloop")
    daemon = make_daemon(**({} if choice is None else {"event_loop": choice}))
    with daemon.client() as client:
        msg_id = client.send({"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "t"})
        assert client.wait(msg_id, 20)["state"] == "sent"
    expected = resolve("auto") if choice is None else choice
    assert [line["event_loop"] for line in daemon.log_lines() if line["event"] == "started"] == [expected]
    for pid in (daemon.proc.pid, daemon.child_pid("smtpgate-relay")):
        assert _loads_uvloop(pid) == (expected == "uvloop")
    assert upstream.messages[-1].rcpt_tos == ["b@example.org"]


def test_a_lone_send_is_claimed_by_its_own_commit(daemon, upstream):
    """With room in delivery, the SEND's transaction stores the message
    'sending' and the daemon hands it over: the writer sees the enqueue and
    the attempt's record, no wake-up and claim in between (issue 15)."""
    message = {"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "t"}
    with daemon.client() as client:
        assert client.wait(client.send(message), 20)["state"] == "sent"  # the upstream is known up
        before = client.stats()["spool"]["operations"]
        msg_id = client.send(message)
        assert client.wait(msg_id, 20)["state"] == "sent"
        assert client.stats()["spool"]["operations"] - before == 2


def test_sends_are_claimed_at_enqueue_while_delivery_lags_and_the_scheduler_claims_the_rest(
        make_daemon, upstream):
    """Both workers held by the upstream (one connection: one message in
    DATA, the other's pipelined behind it; a delivery process behind a
    lone caller): the next 10 SENDs are still stored 'sending' by their own
    commits (5 of room per worker: no wake-up and claim each); the SEND
    past that room is stored 'queued' and the scheduler claims it. All are
    delivered once the upstream answers (issue 15)."""
    holding, gate = threading.Event(), threading.Event()
    accept_data = upstream.handler.handle_DATA

    async def held_data(server, session, envelope):
        if holding.is_set():
            await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        return await accept_data(server, session, envelope)

    upstream.handler.handle_DATA = held_data  # aiosmtpd takes a connection's hooks when it opens
    daemon = make_daemon(connections_per_upstream=1)  # two workers
    message = {"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "t"}
    try:
        with daemon.client() as client:
            # The upstream known up and the scheduler's first claim made; the room is back.
            assert client.wait(client.send(message), 20)["state"] == "sent"
            holding.set()
            before = client.stats()["spool"]["operations"]
            claimed = [client.send(message) for _ in range(10)]
            wait_until(lambda: upstream.handler.sessions == 1, what="the workers' session")
            assert [client.status(msg_id)["state"] for msg_id in claimed] == ["sending"] * 10
            assert client.stats()["spool"]["operations"] - before == 10  # ten Enqueues, no claim
            past_room = client.send(message)
            wait_until(lambda: client.status(past_room)["state"] == "sending", what="the scheduler's claim")
            assert client.stats()["spool"]["operations"] - before == 12  # and one ClaimDue
            gate.set()
            for msg_id in [*claimed, past_room]:
                assert client.wait(msg_id, 20)["state"] == "sent"
    finally:
        gate.set()
    assert len(upstream.messages) == 12


def test_a_message_claimed_at_enqueue_and_deferred_is_retried_on_time(daemon, upstream):
    """Nothing else wakes the scheduler here (the upstream is known up,
    nothing else is queued): the deferred attempt's own record must make it
    look at the next due time, not its 30-second sleep (WAIT gives up at 20)."""
    message = {"from": "a@example.com", "to": "kelly@example.org", "subject": "s", "text": "t"}
    with daemon.client() as client:
        assert client.wait(client.send(dict(message, to="warm@example.org")), 20)["state"] == "sent"
        upstream.script_rcpt("kelly@example.org", "451 4.7.1 greylisted, try later")
        state = client.wait(client.send(message), 20)
        assert (state["state"], state["attempts"]) == ("sent", 2)


def test_the_delivery_process_sends_its_attempt_records_together():
    """Records made within RECORD_EVERY leave the child as one operation
    (one Call, one writer operation); each record's future gets its own
    answer, or the operation's error (issue 15)."""
    from smtpgate.delivery.process import SpoolCalls
    from smtpgate.proc.framing import unpack
    from smtpgate.spool.errors import SpoolError
    from smtpgate.spool.ops import RecordAttempts

    async def main():
        calls = []
        spool = SpoolCalls(calls.append, asyncio.get_running_loop())
        outcome = [RecipientOutcome("a@example.org", "sent", "250 ok")]
        first = [spool.record_attempt(f"m{i}", outcome) for i in range(3)]
        await asyncio.sleep(0.05)
        second = [spool.record_attempt("m3", outcome)]
        await asyncio.sleep(0.05)
        assert [type(call.op) for call in calls] == [RecordAttempts, RecordAttempts]
        assert [[r.msg_id for r in unpack(call.op.records)] for call in calls] == [["m0", "m1", "m2"], ["m3"]]
        spool.answer(Answer(calls[0].token, ["sent", "deferred", None], None))
        spool.answer(Answer(calls[1].token, None, SpoolError("the spool failed")))
        assert await asyncio.gather(*first) == ["sent", "deferred", None]
        with pytest.raises(SpoolError):
            await second[0]

    asyncio.run(main())


def test_the_daemon_passes_the_childs_attempt_records_to_the_writer_unread(tmp_path, monkeypatch):
    """The records come packed (RecordAttempts) and go to the writer as they
    came (issue 15): the daemon never unpacks them, not even for /metrics,
    whose figures the child counts and sends as `Figures` (once a second at
    most). The child gets each record's new state. Real pipes and a real
    spool; the child's end of the pipe is played here."""
    from smtpgate.delivery import process
    from smtpgate.delivery.figures import DeliveryFigures
    from smtpgate.proc import framing
    from smtpgate.proc.calls import Answer, Call
    from smtpgate.proc.pipe import FramedPipe
    from smtpgate.spool.ops import RecordAttempt, RecordAttempts

    unpacked = []
    unpack = framing.unpack
    monkeypatch.setattr(framing, "unpack", lambda data: unpacked.append(data) or unpack(data))

    async def main():
        spool = Spool(tmp_path / "spool", min_free_bytes=0)
        await spool.open()
        handle = process.DeliveryProcess(spool, None, structlog.get_logger(), log_format="json", log_level="info")
        added: asyncio.Queue = asyncio.Queue()  # a Figures added up
        on_figures = handle._handlers[process.Figures]
        handle._handlers[process.Figures] = lambda figures: (on_figures(figures), added.put_nowait(None))
        answers: asyncio.Queue = asyncio.Queue()
        to_daemon, from_child = os.pipe()
        to_child, from_daemon = os.pipe()
        handle._pipe = FramedPipe(handle._on_message, lambda: None)
        await handle._pipe.open(os.fdopen(to_daemon, "rb", buffering=0), os.fdopen(from_daemon, "wb", buffering=0))
        child = FramedPipe(answers.put_nowait, lambda: None)
        await child.open(os.fdopen(to_child, "rb", buffering=0), os.fdopen(from_child, "wb", buffering=0))
        ids = [(await spool.enqueue(b"{}", "s@x.org", ["a@y.org", "b@y.org"], claim=True)).id for _ in range(2)]
        records = [RecordAttempt(time.time(), ids[0], [RecipientOutcome("a@y.org", "sent", "250 ok"),
                                                       RecipientOutcome("b@y.org", "sent", "250 ok")], None, False,
                                 "up.example:25"),
                   RecordAttempt(time.time(), ids[1], [RecipientOutcome("a@y.org", "sent", "250 ok"),
                                                       RecipientOutcome("b@y.org", "deferred", "451 later")],
                                 time.time() + 60, False, "up.example:25", "reply_4xx")]
        child.send(Call(1, RecordAttempts(framing.pack(records))))
        answer = await asyncio.wait_for(answers.get(), 10)
        states = [(await spool.status(msg_id))["state"] for msg_id in ids]
        before = handle.figures.upstream_results.copy()
        counted = DeliveryFigures()  # what the child counts from the states it got back
        for record, state in zip(records, answer.value, strict=True):
            counted.record(record, state)
        child.send(process.Figures(counted))
        child.send(process.Figures(counted))  # two of them: added up
        for _ in range(2):
            await asyncio.wait_for(added.get(), 10)
        child.close_write()
        handle._pipe.close_write()
        await spool.close()
        return answer, states, before, handle.figures

    answer, states, before, figures = asyncio.run(main())
    assert answer == Answer(1, ["sent", "deferred"], None) and states == ["sent", "deferred"]
    assert unpacked == []
    assert before == {}  # the records alone counted nothing in the daemon
    assert figures.upstream_results == {("up.example:25", "delivered"): 2, ("up.example:25", "deferred"): 2}
    assert figures.failures == {("up.example:25", "reply_4xx"): 2}
    assert figures.outcomes[("sent", "2xx")] == 6 and figures.outcomes[("deferred", "4xx")] == 2
    assert sum(figures.seconds.counts) == 2


def test_a_message_claimed_at_enqueue_goes_to_the_child_as_its_claimed_row(tmp_path):
    """hand_over writes the `Claimed` itself in the frame, no message around
    it (one object less to pickle per relayed message, issue 15). That the
    child takes it to its Delivery, every relayed test shows."""
    from smtpgate.delivery import process
    from smtpgate.proc.framing import take_messages
    from smtpgate.proc.pipe import FramedPipe
    from smtpgate.spool.ops import Claimed

    claimed = Claimed("01JD3Q7Z8K4W6X2V9N5B0C1T00", b"{}", "s@x.org", ["a@y.org"], 0, 1.5, False)

    async def main():
        handle = process.DeliveryProcess(Spool(tmp_path / "spool"), None, structlog.get_logger(),
                                         log_format="json", log_level="info")
        to_daemon, _ = os.pipe()
        from_daemon_r, from_daemon_w = os.pipe()
        handle._pipe = FramedPipe(handle._on_message, lambda: None)
        await handle._pipe.open(os.fdopen(to_daemon, "rb", buffering=0), os.fdopen(from_daemon_w, "wb", buffering=0))
        os.set_blocking(from_daemon_r, False)  # a frame not written fails the read, not the loop
        handle.hand_over(claimed)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return take_messages(bytearray(os.read(from_daemon_r, 65536)))

    frame = asyncio.run(main())
    assert frame == [claimed] and type(frame[0]) is Claimed


def test_room_given_back_goes_in_the_frame_of_its_attempt_record():
    """The delivery process's pipe to the daemon: room offered with no record
    waiting goes at once; room an attempt gives back waits for that
    attempt's record and goes just before it, in one frame (a wake-up of
    the daemon per frame of records, not per message), so the daemon has
    the room by the time the outcome is committed."""
    from smtpgate.delivery.process import RECORD_EVERY, Want, _Relay
    from smtpgate.proc.calls import Call
    from smtpgate.proc.framing import take_messages, unpack
    from smtpgate.spool.ops import RecordAttempts

    def frames(fd: int) -> list[list]:
        os.set_blocking(fd, False)
        data = bytearray()
        try:
            while chunk := os.read(fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        found = []
        while data:
            size = 4 + int.from_bytes(data[:4], "big")
            found.append(take_messages(data[:size]))
            del data[:size]
        return found

    async def main():
        to_child, from_daemon = os.pipe()
        from_child, to_daemon = os.pipe()
        relay = _Relay()
        await relay.pipe.open(os.fdopen(to_child, "rb", buffering=0), os.fdopen(to_daemon, "wb", buffering=0))
        relay.offer(20)  # delivery's start: nothing recorded yet
        await asyncio.sleep(0)
        first = frames(from_child)
        outcome = [RecipientOutcome("b@example.org", "sent", "250 ok")]
        for msg_id in ("m1", "m2"):
            relay.spool.record_attempt(msg_id, outcome)
            relay.offer(1)
        await asyncio.sleep(RECORD_EVERY / 3)
        early = frames(from_child)
        await asyncio.sleep(RECORD_EVERY * 3)
        later = frames(from_child)
        relay.pipe.close_write()
        os.close(from_child)
        return first, early, later, from_daemon

    first, early, later, from_daemon = asyncio.run(main())
    os.close(from_daemon)  # not before: at the end of its input the child leaves at once (os._exit)
    assert first == [[Want(20)]]
    assert early == []
    assert len(later) == 1 and [type(m) for m in later[0]] == [Want, Call]
    want, call = later[0]
    assert want == Want(2) and type(call.op) is RecordAttempts
    assert [record.msg_id for record in unpack(call.op.records)] == ["m1", "m2"]
