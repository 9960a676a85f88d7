"""Delivery webhooks (docs/webhooks.md): a real daemon and upstream, and a
real aiohttp receiver that verifies every request with the Standard
Webhooks reference library (`standardwebhooks`); the sender's HTTP client
against receivers on real sockets that misbehave.

Events sent, failed, deferred the first time, in order per message; a
receiver down for a while (every event arrives once it is back), a daemon
killed with -9 after the state change and before the webhook, a wrong
secret, a redirect, per-caller URLs, the configuration's refusals.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone

import httptools
import pytest
import trustme
from aiohttp import web
from http_support import http_daemon, request
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until
from test_upstream_health import Scripted
from test_webhooks_outbox import Spool as OutboxSpool
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from smtpgate.config import ConfigError, load_config
from smtpgate.webhooks import sender as sender_module
from smtpgate.webhooks import signing
from smtpgate.webhooks.client import MAX_BODY, MAX_HEAD, Client, ProtocolError
from smtpgate.spool.ops import WebhookDone, WebhookRetry
from smtpgate.spool.schema import DB_FILE
from smtpgate.webhooks.sender import (
    CONNECTIONS, PIPELINE, UNTIMED_DEPTH, WINDOW, CpuPressure, OutboxReader, Target, WebhookSender, WebhookSettings,
)

SECRET = "whsec_" + base64.b64encode(b"smtpgate webhook test secret, 32B").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"another secret of at least 24 bytes").decode()
TOKEN_SHOP = "tok-shop-51f0c3e98d2b7a46"
TOKEN_BLOG = "tok-blog-0e7c2d19a8f4b635"
WAIT = 60.0  # seconds: the bound of every wait for an event


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Receiver:
    """An aiohttp server on 127.0.0.1 in a thread of its own. Each POST is
    verified with standardwebhooks under `secret`: a good one is kept in
    `events` and answered `answer` (204), a bad one in `rejected` (401)."""

    def __init__(self, secret: str, port: int | None = None):
        self.verifier = Webhook(secret)
        self.port = port or free_port()
        self.events: list[tuple[dict, dict]] = []  # (headers, payload)
        self.rejected: list[str] = []
        self.answer = 204
        self.headers: dict[str, str] = {}  # added to the answer (Location, ...)
        self.delay = 0.0  # seconds each answer takes
        self.handling: set[str] = set()  # message ids of the requests being answered
        self.overlaps: list[str] = []  # a message's event that came before the one before it was answered
        self.peers: list[int] = []  # the port of each event's connection, beside `events`
        self.close_every = 0  # the connection closed after every n-th answer (0: kept)
        self.fail_once: set[str] = set()  # message ids whose event's first try is answered 500
        self.serving: Counter[int] = Counter()  # requests being answered, by the port of their connection
        self.most_connections = 0  # connections with a request being answered at once, at most
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/smtpgate?source=test"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            payload = self.verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            with self.cond:
                self.rejected.append(str(exc))
                self.cond.notify_all()
            return web.Response(status=401, text="bad signature")
        msg_id = payload["data"]["message_id"]
        peer = request.transport.get_extra_info("peername")[1]
        with self.cond:
            self.serving[peer] += 1
            self.most_connections = max(self.most_connections, len(+self.serving))
            if msg_id in self.handling:
                self.overlaps.append(msg_id)
            self.handling.add(msg_id)
            self.events.append((dict(request.headers), payload))
            self.peers.append(request.transport.get_extra_info("peername")[1])
            # Decided as the request is recorded: a test that changes the
            # answer once it saw a request does not change that one's.
            answer, headers = self.answer, self.headers
            if msg_id in self.fail_once:
                self.fail_once.discard(msg_id)
                answer = 500
            closing = self.close_every and len(self.events) % self.close_every == 0
            self.cond.notify_all()
        await asyncio.sleep(self.delay)
        with self.cond:
            self.handling.discard(msg_id)
            self.serving[peer] -= 1
        response = web.Response(status=answer, headers=headers)
        if closing:
            response.force_close()  # the requests read behind this one are never answered
        return response

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> Receiver:
        async def start():
            app = web.Application()
            app.router.add_post("/hooks/smtpgate", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._run(start())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self._run(self.runner.cleanup())
            self.runner = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait(self, predicate, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), WAIT), f"{what}; got {self.payloads()}"

    def payloads(self) -> list[dict]:
        with self.cond:
            return [payload for _, payload in self.events]

    def by_message(self) -> dict[str, list[str]]:
        """Each message's event types in arrival order, a repeated event id once."""
        seen, types = set(), defaultdict(list)
        with self.cond:
            for headers, payload in self.events:
                if headers["webhook-id"] not in seen:
                    seen.add(headers["webhook-id"])
                    types[payload["data"]["message_id"]].append(payload["type"])
        return types


@pytest.fixture
def receiver():
    server = Receiver(SECRET).start()
    yield server
    server.close()


def secret_file(tmp_path, text: str = SECRET, name: str = "webhook.secret", mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def stats(daemon, token: str | None = None) -> dict:
    with daemon.client(token=token) as client:
        return client.stats()




def mail(to, subject: str = "hi", **fields) -> dict:
    return {"from": "app@shop.example", "to": to, "subject": subject, "text": "hello", **fields}


def final(client, msg_id: str) -> dict:
    state = client.wait(msg_id, 30)
    assert state["state"] in ("sent", "failed"), state
    return state


# -- the events and their payload -------------------------------------------


def test_events_are_signed_and_carry_each_recipients_result(make_daemon, upstream, receiver, tmp_path):
    upstream.script_rcpt("gone@example.org", "550 5.1.1 no such user")
    upstream.script_rcpt("later@example.org", "451 4.7.1 greylisted, try again")
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path), log_level="debug")
    with daemon.client(timeout=40) as client:
        failed = client.send(mail(["kelly@example.org", "gone@example.org"], idempotency_key="order-17"))
        deferred = client.send(mail("later@example.org"))
        final(client, failed), final(client, deferred)

    receiver.wait(lambda r: len(r.by_message()[failed]) >= 1 and len(r.by_message()[deferred]) >= 2,
                  "the failed message's event and the deferred one's two")
    assert receiver.rejected == []
    events = receiver.by_message()
    assert events[failed] == ["message.failed"]
    assert events[deferred] == ["message.deferred", "message.sent"]

    (headers, payload), = [(h, p) for h, p in receiver.events if p["data"]["message_id"] == failed]
    assert headers["webhook-id"].startswith("evt_") and headers["Content-Type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300  # what the receiver's verify checked
    data = payload["data"]
    assert data["caller"] == "anonymous" and data["state"] == "failed" and data["from"] == "app@shop.example"
    assert data["idempotency_key"] == "order-17" and data["attempts"] == 1 and data["possible_duplicate"] is False
    assert data["next_attempt"] is None
    assert [(r["address"], r["state"]) for r in data["recipients"]] == [
        ("kelly@example.org", "sent"), ("gone@example.org", "failed")]
    assert data["recipients"][0]["reply"].startswith("250") and "no such user" in data["recipients"][1]["reply"]
    when = datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00"))
    assert when.tzinfo == timezone.utc and abs(when.timestamp() - time.time()) < 300

    first = next(p for p in receiver.payloads() if p["data"]["message_id"] == deferred)
    assert first["data"]["state"] == "deferred" and first["data"]["next_attempt"] is not None
    assert first["data"]["recipients"] == [
        {"address": "later@example.org", "state": "deferred", "reply": "451 4.7.1 greylisted, try again"}]

    wait_until(lambda: stats(daemon)["webhooks"]["pending"] == 0, WAIT, "the outbox empties")
    assert stats(daemon)["webhooks"] == {"delivered": 3, "failed": 0, "retried": 0, "pending": 0}
    sent = [line for line in daemon.log_lines() if line.get("event") == "webhook_sent"]
    assert sent and all("source=test" not in line["url"] for line in sent)  # the query may hold a token


def test_a_deferral_is_told_once_however_many_attempts_it_takes(make_daemon, upstream, receiver, tmp_path):
    upstream.script_rcpt("slow@example.org", "451 4.3.0 busy", "452 4.3.1 still busy", "451 4.3.0 busy")
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    with daemon.client(timeout=40) as client:
        msg_id = client.send(mail("slow@example.org"))
        assert final(client, msg_id)["state"] == "sent"
    receiver.wait(lambda r: "message.sent" in r.by_message()[msg_id], "the sent event")
    assert receiver.by_message()[msg_id] == ["message.deferred", "message.sent"]
    last = [p for p in receiver.payloads() if p["type"] == "message.sent"][-1]
    assert last["data"]["attempts"] == 4


def test_a_message_held_past_max_age_by_an_outage_is_told_failed(make_daemon, receiver, tmp_path):
    daemon = make_daemon(upstream=["127.0.0.1:9"], max_age=1.0, upstream_probe_base=0.05, upstream_probe_max=0.2,
                         webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    with daemon.client(timeout=40) as client:
        msg_id = client.send(mail("kelly@example.org"))
        assert final(client, msg_id)["state"] == "failed"
    receiver.wait(lambda r: r.by_message()[msg_id] == ["message.failed"], "the failed event")
    [recipient] = receiver.payloads()[0]["data"]["recipients"]
    assert recipient["state"] == "failed" and "gave up after max_age 1 s" in recipient["reply"]


def test_no_webhook_configured_writes_no_event(make_daemon, upstream):
    daemon = make_daemon()
    with daemon.client(timeout=40) as client:
        final(client, client.send(mail("kelly@example.org")))
    assert stats(daemon)["webhooks"] == {"delivered": 0, "failed": 0, "retried": 0, "pending": 0}


@pytest.mark.parametrize("nice", [None, 3])
def test_the_outbox_reader_runs_nicer_than_the_relay(make_daemon, upstream, receiver, tmp_path, nice):
    """Making the events' payloads is most of their CPU, and nobody waits for
    an event by the millisecond: the reader's thread yields the CPU to the
    relay's loop, which yields it to intake (issue 12). Linux keeps a nice
    value per thread; the relay's main thread keeps delivery_nice."""
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path),
                         **({} if nice is None else {"delivery_nice": nice}))
    with daemon.client(timeout=40) as client:
        msg_id = client.send(mail("kelly@example.org"))
        final(client, msg_id)
    receiver.wait(lambda r: r.by_message()[msg_id] == ["message.sent"], "the event")  # the reader has read
    intake = os.getpriority(os.PRIO_PROCESS, daemon.proc.pid)
    relay = daemon.child_pid("smtpgate-relay")
    steps = 10 if nice is None else nice
    threads = {int(tid): os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{relay}/task")}
    assert threads.pop(relay) == min(intake + steps, 19)
    # the reader, nicer by 9; any other thread (a resolver's, say) keeps the relay's
    assert sorted(threads.values()).count(min(intake + steps + 9, 19)) == 1
    assert set(threads.values()) <= {min(intake + steps, 19), min(intake + steps + 9, 19)}


# -- at least once, in order --------------------------------------------------


def test_a_receiver_down_for_a_while_gets_every_event_in_order_once_back(make_daemon, upstream, tmp_path):
    receiver = Receiver(SECRET)  # not started: connections are refused
    try:
        for n in range(0, 12, 2):
            upstream.script_rcpt(f"r{n}@example.org", "451 4.7.1 greylisted")
        daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        ids = []
        with daemon.client(timeout=40) as client:
            for n in range(12):  # one after the other: a message's events are side by side in the outbox
                ids.append(client.send(mail(f"r{n}@example.org", subject=f"n{n}")))
                final(client, ids[-1])
        wait_until(lambda: any(line.get("event") == "webhook_failed" for line in daemon.log_lines()),
                   WAIT, "a failed try while the receiver is down")
        assert stats(daemon)["webhooks"]["pending"] == 12 + 6  # six were deferred first
        assert receiver.events == []

        receiver.delay = 0.2  # a message's next event must wait for this answer
        receiver.start()
        receiver.wait(lambda r: sum(len(types) for types in r.by_message().values()) == 18, "every event")
        assert receiver.overlaps == []
        events = receiver.by_message()
        assert {msg_id: events[msg_id] for msg_id in ids} == {
            msg_id: (["message.deferred", "message.sent"] if n % 2 == 0 else ["message.sent"])
            for n, msg_id in enumerate(ids)}
        wait_until(lambda: stats(daemon)["webhooks"]["pending"] == 0, WAIT, "the outbox empties")
        assert stats(daemon)["webhooks"]["delivered"] == 18
    finally:
        receiver.close()


def test_events_due_together_are_pipelined_and_none_is_lost_when_the_receiver_closes_or_fails_one(
        make_daemon, upstream, tmp_path):
    """Events of several messages due at once go pipelined on a connection
    (docs/webhooks.md, "Pipelining"). The receiver closes every connection
    after its 3rd answer (the requests read behind it are never answered)
    and answers 500 to one message's first try: each event still arrives,
    the 500'd one again later with its id, in order per message, none lost."""
    receiver = Receiver(SECRET)  # down first: the events pile up, and are due together once it is back
    try:
        daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        with daemon.client(timeout=40) as client:
            ids = [client.send(mail(f"r{n}@example.org", subject=f"n{n}")) for n in range(10)]
            for msg_id in ids:
                assert final(client, msg_id)["state"] == "sent"
        wait_until(lambda: any(line.get("event") == "webhook_failed" for line in daemon.log_lines()),
                   WAIT, "a failed try while the receiver is down")
        receiver.close_every = 3
        receiver.fail_once = {ids[4]}
        receiver.start()
        wait_until(lambda: {k: n for k, n in stats(daemon)["webhooks"].items() if k != "retried"}
                   == {"delivered": 10, "failed": 0, "pending": 0}, WAIT, "every event answered 2xx")
        assert stats(daemon)["webhooks"]["retried"] >= 2  # tried while down, and the one answered 500
        assert receiver.rejected == [] and receiver.overlaps == []
        assert receiver.by_message() == {msg_id: ["message.sent"] for msg_id in ids}
        with receiver.cond:
            tries = Counter(payload["data"]["message_id"] for _, payload in receiver.events)
            ids_of_4 = {headers["webhook-id"] for headers, payload in receiver.events
                        if payload["data"]["message_id"] == ids[4]}
            per_connection = max(receiver.peers.count(port) for port in receiver.peers)
        # Each answered once (those behind a close were read, never handled,
        # and sent again), but the 500'd one: again later, with its id.
        assert tries == {msg_id: 1 if msg_id != ids[4] else tries[ids[4]] for msg_id in ids}
        assert tries[ids[4]] >= 2 and len(ids_of_4) == 1
        assert per_connection > 1  # several events on a connection
    finally:
        receiver.close()


def test_an_event_survives_a_kill_9_between_the_state_change_and_the_webhook(make_daemon, upstream, tmp_path):
    receiver = Receiver(SECRET)  # down while the message is delivered
    try:
        daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        with daemon.client(timeout=40) as client:
            msg_id = client.send(mail("kelly@example.org"))
            assert final(client, msg_id)["state"] == "sent"
        assert stats(daemon)["webhooks"]["pending"] == 1
        daemon.kill()

        receiver.start()
        daemon.start()
        receiver.wait(lambda r: r.by_message()[msg_id] == ["message.sent"], "the event after the restart")
        wait_until(lambda: stats(daemon)["webhooks"] == {"delivered": 1, "failed": 0, "retried": 0, "pending": 0},
                   WAIT, "the outbox empties")
    finally:
        receiver.close()


@pytest.mark.parametrize("child, status, logged", [("smtpgate-relay", 70, "delivery_process_lost"),
                                                   ("smtpgate-spool", 73, "spool_failed")])
def test_a_child_killed_with_9_while_events_are_sent_loses_none(make_daemon, upstream, receiver, tmp_path,
                                                                  child, status, logged):
    """The sender runs in the delivery process: a kill -9 of it stops the
    daemon as a lost delivery does (70, delivery_process_lost, for the
    service manager to restart it), one of the spool writer as a lost
    writer does (73); either way the events whose answers were awaited are
    sent again after the restart, with the same webhook-id."""
    receiver.delay = 5.0  # the first answers are still on their way at the kill
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    with daemon.client(timeout=40) as client:
        ids = [client.send(mail(f"r{n}@example.org", subject=f"n{n}")) for n in range(4)]
        for msg_id in ids:
            assert final(client, msg_id)["state"] == "sent"
    receiver.wait(lambda r: len(r.events) >= 1, "a request in flight")
    lines = len(daemon.log_lines())
    os.kill(daemon.child_pid(child), signal.SIGKILL)
    assert daemon.proc.wait(60) == status
    assert any(line.get("event") == logged for line in daemon.log_lines()[lines:])
    daemon.stop()

    receiver.delay = 0.0
    with receiver.cond:
        seen = len(receiver.events)  # those sent before the kill, never answered
    daemon.start()
    receiver.wait(lambda r: {p["data"]["message_id"] for _, p in r.events[seen:]} == set(ids),
                  "every message's event after the restart")
    with receiver.cond:
        in_flight = {headers["webhook-id"] for headers, _ in receiver.events[:seen]}
        again = {headers["webhook-id"] for headers, _ in receiver.events[seen:]}
    assert in_flight <= again, "an event in flight at the kill was not sent again with its id"
    assert all(receiver.by_message()[msg_id] == ["message.sent"] for msg_id in ids)
    wait_until(lambda: stats(daemon)["webhooks"]["pending"] == 0, WAIT, "the outbox empties")


def test_a_possible_duplicate_is_told_before_the_deferral_and_the_delivery(make_daemon, receiver, tmp_path):
    server = Scripted("stall-dot")  # takes the message, never answers its final dot
    try:
        daemon = make_daemon(upstream=[server.hostport], upstream_data_end_timeout=0.5,
                             webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        with daemon.client(timeout=40) as client:
            msg_id = client.send(mail("kelly@example.org"))
            assert server.wait(lambda s: len(s.bodies) == 1)
            server.mode = "ok"
            assert final(client, msg_id)["state"] == "sent"
        receiver.wait(lambda r: "message.sent" in r.by_message()[msg_id], "the sent event")
        assert receiver.by_message()[msg_id] == ["message.possible_duplicate", "message.deferred", "message.sent"]
        flagged = receiver.payloads()[0]["data"]
        assert flagged["possible_duplicate"] is True and flagged["state"] == "deferred"
    finally:
        server.close()


def test_a_final_dot_cut_short_by_a_kill_9_is_told_a_possible_duplicate(make_daemon, upstream, receiver, tmp_path):
    server = Scripted("stall-dot")
    try:
        daemon = make_daemon(upstream=[server.hostport], webhook_url=receiver.url,
                             webhook_secret_file=secret_file(tmp_path), start=False)
        daemon.start(start_new_session=True)
        with daemon.client(timeout=40) as client:
            msg_id = client.send(mail("kelly@example.org"))
        assert server.wait(lambda s: len(s.bodies) == 1)
        os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(30)
        daemon.stop()
        daemon.settings["upstream"] = [upstream.hostport]
        daemon.start()  # the spool's recovery flags it, in the transaction that writes the event
        receiver.wait(lambda r: "message.sent" in r.by_message()[msg_id], "the sent event")
        assert receiver.by_message()[msg_id] == ["message.possible_duplicate", "message.sent"]
    finally:
        server.close()


def test_an_event_is_retried_until_answered_2xx_and_kept_its_id(make_daemon, upstream, receiver, tmp_path):
    receiver.answer = 503
    receiver.headers = {"Retry-After": "1"}
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    with daemon.client(timeout=40) as client:
        final(client, client.send(mail("kelly@example.org")))
    receiver.wait(lambda r: len(r.events) >= 1, "a try answered 503")
    # The receiver reads its answer after it records the event: wait for the
    # daemon to have seen the 503 before the receiver starts saying 200.
    wait_until(lambda: any(line.get("event") == "webhook_failed" for line in daemon.log_lines()),
               WAIT, "the 503 seen by the daemon")
    receiver.answer, receiver.headers = 200, {}
    wait_until(lambda: stats(daemon)["webhooks"]["delivered"] == 1, WAIT, "delivered once answered 200")
    ids = {headers["webhook-id"] for headers, _ in receiver.events}
    stamps = [int(headers["webhook-timestamp"]) for headers, _ in receiver.events]
    assert len(ids) == 1 and len(receiver.events) >= 2 and stamps == sorted(stamps)
    failed = [line for line in daemon.log_lines() if line.get("event") == "webhook_failed"]
    assert failed and "HTTP 503" in failed[0]["error"]


def test_a_410_gone_gives_the_event_up_at_once(make_daemon, upstream, receiver, tmp_path):
    receiver.answer = 410
    daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    with daemon.client(timeout=40) as client:
        msg_id = client.send(mail("kelly@example.org"))
        assert final(client, msg_id)["state"] == "sent"
    wait_until(lambda: stats(daemon)["webhooks"] == {"delivered": 0, "failed": 1, "retried": 0, "pending": 0},
               WAIT, "the event given up")
    assert [payload["data"]["message_id"] for payload in receiver.payloads()] == [msg_id]  # tried once
    given_up = [line for line in daemon.log_lines() if line.get("event") == "webhook_given_up"]
    assert [line["message_id"] for line in given_up] == [msg_id]


def test_events_a_receiver_never_answers_are_retried_then_given_up_after_retry_for(make_daemon, upstream, tmp_path):
    """webhook_retry_for bounds how long an event is tried: with the
    receiver's port closed, the first try fails, the retry (2.5-5 s later,
    backoff) fails too, and the next would come past the 6 s: the events
    are given up then (those that came while it was marked down were held,
    then tried with it). STATS, /metrics (from real events) and the log say so."""
    down = Receiver(SECRET)  # never started: connections are refused
    daemon = http_daemon(make_daemon, webhook_url=down.url, webhook_secret_file=secret_file(tmp_path),
                         webhook_retry_for=6.0)
    try:
        with daemon.client(timeout=40) as client:
            ids = [client.send(mail(f"r{n}@example.org")) for n in range(3)]
            for msg_id in ids:
                assert final(client, msg_id)["state"] == "sent"
        wait_until(lambda: stats(daemon)["webhooks"]["failed"] == 3, WAIT, "every event given up")
        webhooks = stats(daemon)["webhooks"]
        assert webhooks["delivered"] == 0 and webhooks["pending"] == 0
        assert webhooks["retried"] >= 1  # the first event's first try, at least, was made again
        given_up = [line for line in daemon.log_lines() if line.get("event") == "webhook_given_up"]
        assert sorted(line["message_id"] for line in given_up) == sorted(ids)
        assert all("given up after webhook_retry_for (6 s)" in line["error"] and line["attempts"] >= 1
                   for line in given_up), given_up
        assert max(line["attempts"] for line in given_up) >= 2, given_up  # the tries counted, the last included
        metrics = {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(
            request(daemon.http, "GET", "/metrics").text) for s in family.samples}
        assert metrics[("smtpgate_webhook_deliveries_total", frozenset({("result", "failed")}))] == 3
        assert metrics[("smtpgate_webhook_deliveries_total", frozenset({("result", "delivered")}))] == 0
        assert metrics[("smtpgate_webhook_retries_total", frozenset())] == webhooks["retried"]
        assert metrics[("smtpgate_webhook_pending", frozenset())] == 0
    finally:
        down.close()


def test_metrics_count_the_events_answered_and_the_tries_that_failed(make_daemon, upstream, receiver, tmp_path):
    """/metrics from real events: the first event's first try is answered
    500 (a try that failed, made again), the second comes while the
    receiver is marked down (held unsent: not a try), then both are answered."""
    daemon = http_daemon(make_daemon, webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
    receiver.answer = 500
    with daemon.client(timeout=40) as client:
        first = client.send(mail("kelly@example.org"))
        final(client, first)
        wait_until(lambda: any(line.get("event") == "webhook_failed" for line in daemon.log_lines()),
                   WAIT, "the first try answered 500")
        receiver.answer = 204
        final(client, client.send(mail("lee@example.org")))
    wait_until(lambda: stats(daemon)["webhooks"] == {"delivered": 2, "failed": 0, "retried": 1, "pending": 0},
               WAIT, "both answered 2xx, the first after a retry")
    metrics = {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(
        request(daemon.http, "GET", "/metrics").text) for s in family.samples}
    assert metrics[("smtpgate_webhook_deliveries_total", frozenset({("result", "delivered")}))] == 2
    assert metrics[("smtpgate_webhook_deliveries_total", frozenset({("result", "failed")}))] == 0
    assert metrics[("smtpgate_webhook_retries_total", frozenset())] == 1


def test_a_redirect_is_not_followed(make_daemon, upstream, receiver, tmp_path):
    elsewhere = Receiver(SECRET).start()
    try:
        receiver.answer = 307
        receiver.headers = {"Location": elsewhere.url}
        daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        with daemon.client(timeout=40) as client:
            final(client, client.send(mail("kelly@example.org")))
        wait_until(lambda: any(line.get("event") == "webhook_failed" for line in daemon.log_lines()),
                   WAIT, "the 307 is a failed try")
        failed = next(line for line in daemon.log_lines() if line.get("event") == "webhook_failed")
        assert "HTTP 307" in failed["error"] and "redirects are not followed" in failed["error"]
        assert elsewhere.events == [] and stats(daemon)["webhooks"]["pending"] == 1
    finally:
        elsewhere.close()


# -- secrets ------------------------------------------------------------------


def test_a_receiver_with_another_secret_rejects_every_request(make_daemon, upstream, tmp_path):
    receiver = Receiver(OTHER_SECRET).start()
    try:
        daemon = make_daemon(webhook_url=receiver.url, webhook_secret_file=secret_file(tmp_path))
        with daemon.client(timeout=40) as client:
            final(client, client.send(mail("kelly@example.org")))
        receiver.wait(lambda r: r.rejected, "a rejected request")
        assert receiver.events == [] and receiver.rejected[0] == "No matching signature found"
        assert stats(daemon)["webhooks"]["pending"] == 1  # kept, to be retried
    finally:
        receiver.close()


def test_the_signer_matches_the_reference_library():
    key = signing.parse_secrets(SECRET)
    body = '{"type":"message.sent","data":{"subject":"记得收衣服"}}'.encode()
    headers = signing.headers(key, "evt_01JEXAMPLE", 1765000000, body)
    reference = Webhook(SECRET).sign("evt_01JEXAMPLE", datetime.fromtimestamp(1765000000, timezone.utc), body)
    assert headers["webhook-signature"] == reference
    with pytest.raises(WebhookVerificationError):  # 1765000000 is long past the tolerance
        Webhook(SECRET).verify(body, headers)
    now = int(time.time())
    assert Webhook(SECRET).verify(body, signing.headers(key, "evt_1", now, body))["data"]["subject"] == "记得收衣服"
    for wrong in (signing.headers(signing.parse_secrets(OTHER_SECRET), "evt_1", now, body),
                  signing.headers(key, "evt_2", now, body) | {"webhook-id": "evt_1"},
                  signing.headers(key, "evt_1", now, body + b" ")):
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(body, wrong)


def test_while_a_secret_changes_each_request_is_signed_with_both(make_daemon, upstream, tmp_path):
    old, new = Receiver(SECRET).start(), Receiver(OTHER_SECRET).start()
    try:
        both = secret_file(tmp_path, f"{OTHER_SECRET}\n{SECRET}")  # the new one, then the old one
        daemon = make_daemon(webhook_url=old.url, webhook_secret_file=both)
        with daemon.client(timeout=40) as client:
            first = client.send(mail("kelly@example.org"))
            final(client, first)
        old.wait(lambda r: r.by_message()[first] == ["message.sent"], "verified with the old secret")
        daemon.settings["webhook_url"] = new.url
        daemon.reload()
        with daemon.client(timeout=40) as client:
            second = client.send(mail("kelly@example.org"))
            final(client, second)
        new.wait(lambda r: r.by_message()[second] == ["message.sent"], "verified with the new secret")
        assert old.rejected == [] and new.rejected == []
        assert len(new.events[0][0]["webhook-signature"].split(" ")) == 2
    finally:
        old.close()
        new.close()


# -- callers ------------------------------------------------------------------


def start_with_callers(daemon, tables: dict[str, dict]) -> None:
    """Start `daemon` (made with start=False) with these [callers.NAME] tables."""
    write_plain = daemon.write_config

    def write_config():
        write_plain()
        with open(daemon.config_path, "a") as fh:
            for name, table in tables.items():
                fh.write(f"\n[callers.{name}]\n")
                fh.writelines(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
    daemon.write_config = write_config
    daemon.start()


def test_each_caller_gets_its_own_url_and_secret_and_others_none(make_daemon, upstream, tmp_path):
    shop_hooks = Receiver(OTHER_SECRET).start()
    try:
        daemon = make_daemon(start=False)
        tables = {
            "shop": {"token_file": secret_file(tmp_path, TOKEN_SHOP, "shop.token"),
                     "webhook_url": shop_hooks.url,
                     "webhook_secret_file": secret_file(tmp_path, OTHER_SECRET, "shop.secret")},
            "blog": {"token_file": secret_file(tmp_path, TOKEN_BLOG, "blog.token")},
        }
        start_with_callers(daemon, tables)

        with daemon.client(token=TOKEN_BLOG, timeout=40) as blog, daemon.client(token=TOKEN_SHOP, timeout=40) as shop:
            blog_id = blog.send(mail("kelly@example.org"))
            shop_id = shop.send(mail("kelly@example.org"))
            final(blog, blog_id), final(shop, shop_id)
        shop_hooks.wait(lambda r: r.by_message()[shop_id] == ["message.sent"], "the shop's event")
        wait_until(lambda: stats(daemon, TOKEN_SHOP)["webhooks"]["pending"] == 0, WAIT, "the outbox empties")
        assert [p["data"]["caller"] for p in shop_hooks.payloads()] == ["shop"]
        # Nothing was written for the blog (not even an event given up).
        assert stats(daemon, TOKEN_SHOP)["webhooks"] == {"delivered": 1, "failed": 0, "retried": 0, "pending": 0}
    finally:
        shop_hooks.close()


def test_a_slow_receiver_does_not_hold_up_another_callers_events(make_daemon, upstream, tmp_path):
    """Shop's receiver answers 2xx, two seconds an event; blog's at once.
    The outbox is read in next_attempt order: without a bound, shop's
    backlog filled the sender's window for minutes and blog's events waited
    behind it. A receiver that holds half the window and has answered
    nothing for SLOW_AFTER seconds no longer counts against the window, and
    its other events wait in the outbox meanwhile; all of them arrive."""
    slow, fast = Receiver(OTHER_SECRET).start(), Receiver(SECRET).start()
    slow.delay = 2.0
    try:
        daemon = make_daemon(start=False)
        tables = {
            "shop": {"token_file": secret_file(tmp_path, TOKEN_SHOP, "shop.token"), "webhook_url": slow.url,
                     "webhook_secret_file": secret_file(tmp_path, OTHER_SECRET, "shop.secret")},
            "blog": {"token_file": secret_file(tmp_path, TOKEN_BLOG, "blog.token"), "webhook_url": fast.url,
                     "webhook_secret_file": secret_file(tmp_path, SECRET, "blog.secret")},
        }
        start_with_callers(daemon, tables)
        with daemon.client(token=TOKEN_SHOP, timeout=40) as shop:
            shop_ids = [shop.send(mail("kelly@example.org", f"shop {n}")) for n in range(200)]
        wait_until(lambda: stats(daemon, TOKEN_SHOP)["webhooks"]["pending"] >= 200, WAIT, "shop's events written")
        with daemon.client(token=TOKEN_BLOG, timeout=40) as blog:
            blog_ids = [blog.send(mail("kelly@example.org", f"blog {n}")) for n in range(5)]
        fast.wait(lambda r: set(r.by_message()) >= set(blog_ids), "blog's events")
        assert len(slow.payloads()) < 100  # shop's backlog is still being answered
        assert any(line.get("event") == "webhook_receiver_slow" for line in daemon.log_lines())
        slow.delay = 0.0
        slow.wait(lambda r: set(r.by_message()) >= set(shop_ids), "every shop event, once its receiver is fast")
        assert all(types == ["message.sent"] for types in slow.by_message().values())
    finally:
        slow.close()
        fast.close()


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize("settings, error", [
    ({"webhook_url": "http://127.0.0.1:9/h"}, "webhook_secret_file: a webhook is signed"),
    ({"webhook_url": "ftp://127.0.0.1/h", "secret": SECRET}, "webhook_url: expected an http:// or https:// URL"),
    ({"webhook_url": "https://user:pw@hooks.example/h", "secret": SECRET}, "webhook_url: a webhook URL carries no user"),
    ({"webhook_url": "http://127.0.0.1:9/h\r\nX-Injected: 1", "secret": SECRET}, "holds a space, a control"),
    ({"webhook_url": "http://127.0.0.1:9/a b", "secret": SECRET}, "holds a space, a control"),
    # The query may hold a token: not in the error (a refused reload logs it).
    ({"webhook_url": "http://127.0.0.1:9/h?token=hunter2 x", "secret": SECRET},
     "'http://127.0.0.1:9/h?...' holds a space"),
    ({"webhook_url": "https://bücher.example/h", "secret": SECRET}, "in its xn-- form"),
    ({"webhook_url": "http://127.0.0.1:9/h", "secret": "s3cret-not-whsec"}, "webhook_secret_file: "),
    ({"webhook_url": "http://127.0.0.1:9/h", "secret": "whsec_" + base64.b64encode(b"short").decode()},
     "holds 24 to 64 random bytes, this one 5"),
    ({"webhook_url": "http://127.0.0.1:9/h", "secret": SECRET, "mode": 0o644}, "is open to group or others"),
    ({"webhook_url": "http://127.0.0.1:9/h", "secret": SECRET, "webhook_timeout": 0}, "webhook_timeout: must be more"),
    ({"webhook_url": "http://127.0.0.1:9/h", "secret": SECRET, "webhook_yield_for": -1}, "webhook_yield_for: must not be negative"),
])
def test_the_configuration_refuses_an_unsigned_or_unclear_webhook(tmp_path, settings, error):
    settings = dict(settings, upstream=["127.0.0.1:25"])
    if "secret" in settings:
        settings["webhook_secret_file"] = secret_file(tmp_path, settings.pop("secret"), mode=settings.pop("mode", 0o600))
    with pytest.raises(ConfigError) as refused:
        load_config(None, settings)
    assert error in str(refused.value)
    assert "whsec_" + "x" not in str(refused.value) and SECRET not in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_callers_webhook_needs_a_secret_of_its_own_or_the_top_level_one(tmp_path):
    config = tmp_path / "smtpgate.toml"
    token = secret_file(tmp_path, TOKEN_SHOP, "shop.token")
    config.write_text(f'upstream = "127.0.0.1:25"\n[callers.shop]\ntoken_file = "{token}"\n'
                      'webhook_url = "https://hooks.example/smtpgate"\n')
    with pytest.raises(ConfigError, match="callers.shop.webhook_secret_file: a webhook is signed"):
        load_config(str(config))
    loaded = load_config(str(config), {"webhook_secret_file": secret_file(tmp_path)})
    assert loaded.callers["shop"].webhook_secret == () and loaded.webhook_secret == signing.parse_secrets(SECRET)


# -- the HTTP client (webhooks/client.py) against receivers that misbehave -----


class RawReceiver:
    """An asyncio server on 127.0.0.1 that reads each request (httptools)
    and calls `answer(writer, nth request on this connection, its body)`;
    counts the connections, how many were closed by the client, and the
    requests that each read completed (several: they came pipelined)."""

    def __init__(self, answer):
        self.answer = answer
        self.connections = 0
        self.closed_by_client = 0
        self.per_read: list[int] = []
        self.behind = 0  # requests read behind the one being answered

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook?token=x"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.connections += 1
        done, body = [], []
        parser = httptools.HttpRequestParser(type("On", (), {
            "on_body": lambda _, data: body.append(data),
            "on_message_complete": lambda _: (done.append(b"".join(body)), body.clear())})())
        nth = 0
        try:
            while data := await reader.read(65536):
                parser.feed_data(data)
                self.per_read.append(len(done) - nth)
                while nth < len(done):
                    nth += 1
                    self.behind = len(done) - nth
                    if not await self.answer(writer, nth, done[nth - 1]):
                        writer.close()
                        return
            self.closed_by_client += 1
        except ConnectionError:
            self.closed_by_client += 1
        writer.close()


async def post(client, url: str):
    """One event's POST: its answer, or the exception that left it unanswered, raised."""
    (answer,) = await client.post(url, [([("Content-Type", "application/json")], b'{"type":"message.sent"}')], 10)
    if isinstance(answer, Exception):
        raise answer
    return answer


def test_the_client_keeps_connections_alive_unless_told_to_close():
    async def keep(writer, nth, body):
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    async def close(writer, nth, body):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        return True

    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(keep) as kept, RawReceiver(close) as closing:
            assert [(await post(client, kept.url)).status for _ in range(3)] == [204] * 3
            assert [(await post(client, closing.url)).body for _ in range(3)] == [b"ok"] * 3
            client.close()
            await asyncio.sleep(0.1)
        return kept, closing

    kept, closing = asyncio.run(main())
    assert kept.connections == 1 and closing.connections == 3


def test_the_client_reads_a_bounded_head_and_body_and_then_drops_the_connection():
    async def endless_head(writer, nth, body):
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(MAX_HEAD // 1000 + 100):  # bounded: the client stops reading long before
            writer.write(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            await writer.drain()
        return False

    async def long_body(writer, nth, body):
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 1000000\r\n\r\n" + b"e" * 100_000)
        return True

    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(endless_head) as heads, RawReceiver(long_body) as bodies:
            with pytest.raises(ProtocolError, match="head over"):
                await post(client, heads.url)
            answers = [await post(client, bodies.url) for _ in range(2)]
            await asyncio.sleep(0.1)
        client.close()
        return bodies, answers

    bodies, answers = asyncio.run(main())
    assert [(a.status, a.reason, a.body) for a in answers] == [(500, "Oops", b"e" * MAX_BODY)] * 2
    assert bodies.connections == 2 and bodies.closed_by_client == 2  # the rest of each body never read


def test_a_kept_connection_the_receiver_drops_is_replaced_and_the_event_sent():
    async def once_per_connection(writer, nth, body):
        if nth > 1:
            return False  # closed on the second request, unanswered: a receiver's idle timeout racing it
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    async def mute(writer, nth, body):
        return False

    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(once_per_connection) as racing, RawReceiver(mute) as silent:
            statuses = [(await post(client, racing.url)).status for _ in range(3)]
            with pytest.raises(ProtocolError, match="closed without an answer"):
                await post(client, silent.url)
        client.close()
        return racing, statuses

    racing, statuses = asyncio.run(main())
    assert statuses == [204] * 3 and racing.connections == 3


def posts(n: int) -> list[tuple[list[tuple[str, str]], bytes]]:
    """`n` requests whose bodies say which they are."""
    return [([("Content-Type", "application/json")], b'{"n":%d}' % i) for i in range(n)]


def echo(status: int = 200, close_after: int = 0, notice: bool = True):
    """An answer that carries its request's body (so each answer shows which
    request it answers), `status`, but 500 to the request {"n":2}; after the `close_after`-th request of a connection,
    the connection is closed, said in that answer (`notice`) or not."""
    async def answer(writer, nth, body):
        closing = nth == close_after
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status if body != b'{"n":2}' else 500, len(body), b"Connection: close\r\n" if closing and notice else b"",
            body))
        await writer.drain()
        return not closing
    return answer


def test_the_client_pipelines_requests_on_one_connection_and_reads_the_answers_in_order():
    """RFC 9112 section 9.3.2: the requests go in one write, and each answer
    is its request's (in order), a 500 among them too; the connection is
    kept for the next ones."""
    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(echo()) as receiver:
            first = await client.post(receiver.url, posts(5), 10)
            again = await client.post(receiver.url, posts(3), 10)
        client.close()
        return receiver, first, again

    receiver, first, again = asyncio.run(main())
    assert [(a.status, a.body) for a in first] == [(200 if i != 2 else 500, b'{"n":%d}' % i) for i in range(5)]
    assert [a.status for a in again] == [200, 200, 500]
    assert receiver.connections == 1 and max(receiver.per_read) > 1  # several requests in one read


@pytest.mark.parametrize("pace, depth", [(None, UNTIMED_DEPTH), (0.0, PIPELINE), (0.002, 10), (0.005, 4), (0.05, 2)],
                         ids=["not-yet-timed", "answers-at-once", "busy-machine", "5ms", "slow"])
def test_a_pipeline_holds_what_the_receiver_answers_in_about_20_ms_and_2_at_least(pace, depth):
    """A receiver answers one connection's requests in turn: a slow one gets
    2 per connection, not 32 (32 x 50 ms for the last); a fast one slowed to
    answers 2 ms apart by a busy CPU keeps 10 (20 ms of its answers), where
    pipelining saves the most. One not yet timed gets 8: the pipeline's one
    timestamp must not grow older than a verifier's 5 minutes."""
    sender = WebhookSender(None, None, WebhookSettings({}, None, 60.0, 5.0, 0.0), log=None)
    url = "http://127.0.0.1:1/hook"
    if pace is not None:
        sender._pace[url] = pace
    assert sender._depth(url) == depth


class SenderSpool(OutboxSpool):
    """The sender alone on a real spool: a Writer whose outbox holds `count`
    sent messages' events, and the relay's spool calls the sender makes
    (webhook_done, webhook_retry) run by it at once."""

    def __init__(self, folder, count: int):
        super().__init__(folder)
        self.path = str(folder / DB_FILE)
        self.changed: asyncio.Event | None = None  # set at each outcome written
        now = time.time()
        for _ in range(count):
            self.attempt(now, self.send(now, ["kelly@example.org"]), ("kelly@example.org", "sent", "250 ok"))

    def _done(self, op) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.run(op))
        self.changed.set()
        return future

    def webhook_done(self, events):
        return self._done(WebhookDone(list(events)))

    def webhook_retry(self, next_attempt, events, error):
        return self._done(WebhookRetry(next_attempt, list(events), error))

    def outbox(self) -> list[tuple[int, float]]:
        """(attempts, next_attempt) of each event left."""
        return self.writer.conn.execute("SELECT attempts, next_attempt FROM webhook_outbox ORDER BY seq").fetchall()


class Quiet:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def send_outbox(spool: SenderSpool, receiver: Receiver, until) -> None:
    """Run a WebhookSender on `spool` to `receiver`, timed already as one
    answering a request every 50 ms (2 per pipeline), until `until()`."""
    async def main():
        key = signing.parse_secret(SECRET)
        sender = WebhookSender(spool, OutboxReader(spool.path),
                               WebhookSettings({}, Target(receiver.url, (key,)), 3600.0, 10.0, 0.0), Quiet())
        sender._pace[receiver.url] = 0.05
        spool.changed = asyncio.Event()
        sender.start()
        while not until():  # checked at each outcome the sender writes
            spool.changed.clear()
            await asyncio.wait_for(spool.changed.wait(), WAIT)
        await sender.stop()

    asyncio.run(main())


def test_a_slow_receiver_gets_at_most_connections_at_once_and_every_event_once(tmp_path):
    """40 events due at once to a receiver answering one request per 50 ms
    (a pipeline of 2 each): 20 pipelines, of which CONNECTIONS at once; the
    others wait in memory for a connection, none is lost or sent twice."""
    spool = SenderSpool(tmp_path, 40)
    receiver = Receiver(SECRET).start()
    receiver.delay = 0.05
    try:
        send_outbox(spool, receiver, lambda: not spool.outbox())
        assert spool.outbox() == []
        with receiver.cond:
            assert Counter(payload["data"]["message_id"] for _, payload in receiver.events).most_common(1)[0][1] == 1
            assert len(receiver.events) == 40 and receiver.rejected == []
            assert receiver.most_connections == CONNECTIONS
    finally:
        receiver.close()
        spool.close()


def test_events_waiting_for_a_connection_when_their_receiver_fails_are_held_unsent(tmp_path):
    """The same 40 events to a receiver that answers 500: the 16 on the
    CONNECTIONS connections fail and mark it down; the 24 waiting are not
    sent to it then, but left in the outbox and held to its next try."""
    spool = SenderSpool(tmp_path, 40)
    receiver = Receiver(SECRET).start()
    receiver.answer, receiver.delay = 500, 0.05
    try:
        send_outbox(spool, receiver, lambda: all(next_attempt > time.time() for _, next_attempt in spool.outbox()))
        left = spool.outbox()
        assert len(left) == 40 and all(next_attempt > time.time() for _, next_attempt in left)
        assert sorted(attempts for attempts, _ in left) == [0] * 24 + [1] * 16
        assert len(receiver.events) == 2 * CONNECTIONS
    finally:
        receiver.close()
        spool.close()


def test_a_receiver_that_is_down_costs_rows_on_disk_not_memory(tmp_path):
    """1,000 events due to a receiver whose port is closed: the sender reads
    them a page at a time and never holds more than WINDOW of them; the
    first ones tried fail and mark it down, and every other one is held in
    the outbox, unsent, for its next try."""
    spool = SenderSpool(tmp_path, 1000)
    down = Receiver(SECRET)  # never started: connections are refused
    held: list[int] = []  # events in memory as each outcome is written
    pages: list[int] = []

    async def main():
        reader = OutboxReader(spool.path)
        read = reader.due

        async def due(now, limit, exclude):
            events = await read(now, limit, exclude)
            pages.append(len(events))
            return events

        reader.due = due
        sender = WebhookSender(spool, reader, WebhookSettings(
            {}, Target(down.url, (signing.parse_secret(SECRET),)), 3600.0, 10.0, 0.0), Quiet())
        retry = spool.webhook_retry

        def sampled(next_attempt, events, error):
            held.append(len(sender._inflight))  # being sent, or read and waiting for a connection
            return retry(next_attempt, events, error)

        spool.webhook_retry = sampled
        spool.changed = asyncio.Event()
        sender.start()
        while not all(next_attempt > time.time() for _, next_attempt in spool.outbox()):
            spool.changed.clear()
            await asyncio.wait_for(spool.changed.wait(), WAIT)
        await sender.stop()

    try:
        asyncio.run(main())
        left = spool.outbox()
        assert len(left) == 1000 and all(next_attempt > time.time() for _, next_attempt in left)
        tried = sum(attempts for attempts, _ in left)
        assert 1 <= tried <= WINDOW  # one page was tried; the rest were held without a request
        assert max(pages) <= WINDOW and sum(pages) >= 1000
        assert 1 <= max(held) <= WINDOW
    finally:
        down.close()
        spool.close()


def send_and_watch_reads(spool: SenderSpool, receiver: Receiver, more: int = 0) -> list[tuple[float, int]]:
    """Run a WebhookSender on `spool` to a `receiver` answering at once
    until the outbox is empty; `more` events are added as the first read
    returns (mail that goes on arriving). Returns each read's
    (time.monotonic() as it began, events found) up to then."""
    reads: list[tuple[float, int]] = []

    class Reader(OutboxReader):
        async def due(self, now, limit, exclude):
            began = time.monotonic()
            events = await super().due(now, limit, exclude)
            reads.append((began, len(events)))
            if len(reads) == 1:
                stamp = time.time()
                for _ in range(more):
                    spool.attempt(stamp, spool.send(stamp, ["kelly@example.org"]),
                                  ("kelly@example.org", "sent", "250 ok"))
            return events

    async def main():
        sender = WebhookSender(spool, Reader(spool.path), WebhookSettings(
            {}, Target(receiver.url, (signing.parse_secret(SECRET),)), 3600.0, 10.0, 0.0), Quiet())
        spool.changed = asyncio.Event()
        sender.start()
        while spool.outbox():  # checked at each outcome the sender writes
            spool.changed.clear()
            await asyncio.wait_for(spool.changed.wait(), WAIT)
        await sender.stop()

    asyncio.run(main())
    return reads


def test_after_a_read_that_found_every_due_event_the_next_waits_read_pause(tmp_path, monkeypatch):
    """Mail that goes on arriving: 3 events, then 3 more as they are read.
    The first read finds the 3 (less than a page), and the sender, woken by
    their answers and their settle, waits READ_PAUSE after that read before
    the next, which finds the 3 new ones together: a steady stream is sent
    in pages, not an event or two per read."""
    monkeypatch.setattr(sender_module, "READ_PAUSE", 0.5)
    spool = SenderSpool(tmp_path, 3)
    receiver = Receiver(SECRET).start()
    try:
        reads = send_and_watch_reads(spool, receiver, more=3)
        assert [found for _, found in reads[:2]] == [3, 3]
        # The pause runs from just before the first read began (a sleep is
        # never shorter); without it the next read came within milliseconds.
        assert reads[1][0] - reads[0][0] >= 0.45
        assert len(receiver.events) == 6 and receiver.rejected == []
    finally:
        receiver.close()
        spool.close()


def test_a_backlog_is_read_as_the_window_frees_without_a_pause(tmp_path, monkeypatch):
    """300 events due at once (a receiver back after an outage): every read
    but the last fills the window's free half or more, and the next waits
    for no READ_PAUSE (an hour here: the events would still be waiting)."""
    monkeypatch.setattr(sender_module, "READ_PAUSE", 3600.0)
    spool = SenderSpool(tmp_path, 300)
    receiver = Receiver(SECRET).start()
    try:
        reads = send_and_watch_reads(spool, receiver)
        assert sum(found for _, found in reads) >= 300 and len(reads) >= 300 // WINDOW
        assert len(receiver.events) == 300 and receiver.rejected == []
    finally:
        receiver.close()
        spool.close()


def test_the_cpu_is_contended_when_some_task_waited_for_one_more_than_a_quarter_of_the_time(tmp_path):
    """/proc/pressure/cpu's "some" total (microseconds some runnable task
    waited) read at each look, 0.1 s apart at least; no file, never."""
    stall, now = tmp_path / "cpu", [100.0]
    pressure = CpuPressure(str(stall), clock=lambda: now[0])

    def look(after: float, total: int) -> bool:
        now[0] += after
        stall.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
                         "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
        return pressure.contended()

    assert look(0, 5_000_000) is False  # a first look: nothing to compare with
    assert look(1.0, 5_300_000) is True  # 0.3 s of 1 s
    assert look(0.05, 5_300_000) is True  # too soon to look again: as said before, not read
    assert look(1.0, 5_500_000) is False  # 0.2 s of the 1.05 s since the last look read
    assert CpuPressure(str(tmp_path / "none")).contended() is False


def test_the_pressure_is_read_from_the_services_own_cgroup_where_it_has_one(tmp_path):
    """Under systemd (cgroup v2) the unit's cgroup's cpu.pressure: the unit's
    ProcSubset=pid hides /proc/pressure. Elsewhere (the root cgroup, v1
    hierarchies only, no such file) the machine's."""
    from smtpgate.webhooks.sender import pressure_file

    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    service = cgroups / "system.slice" / "smtpgate.service"
    service.mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("1:cpu:/\n0::/system.slice/smtpgate.service\n")
    machine = f"{proc}/pressure/cpu"
    assert pressure_file(str(proc), str(cgroups)) == machine  # a kernel without PSI for cgroups
    (service / "cpu.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert pressure_file(str(proc), str(cgroups)) == str(service / "cpu.pressure")
    # The hybrid layout: v2 mounted at unified/, beside the v1 hierarchies.
    (service / "cpu.pressure").unlink()
    hybrid = cgroups / "unified" / "system.slice" / "smtpgate.service"
    hybrid.mkdir(parents=True)
    (hybrid / "cpu.pressure").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert pressure_file(str(proc), str(cgroups)) == str(hybrid / "cpu.pressure")
    (proc / "self" / "cgroup").write_text("1:cpu:/\n0::/\n")
    assert pressure_file(str(proc), str(cgroups)) == machine
    (proc / "self" / "cgroup").unlink()
    assert pressure_file(str(proc), str(cgroups)) == machine


class Pressure:
    def __init__(self, contended: bool):
        self.said = contended

    def contended(self) -> bool:
        return self.said


YIELD_FOR = 10.0  # webhook_yield_for's default


def test_while_the_cpu_is_contended_only_events_older_than_yield_for_are_sent(tmp_path):
    """A burst's events wait for it to end (the hand-offs and the mail go
    first), webhook_yield_for at most: read while the CPU is contended, none
    of 40 fresh events is sent; YIELD_FOR later they all are."""
    spool = SenderSpool(tmp_path, 40)
    receiver = Receiver(SECRET).start()
    clock, reads = [time.time() + 1], []

    class Reader(OutboxReader):
        async def due(self, now, limit, exclude):
            events = await super().due(now, limit, exclude)
            reads.append((clock[0], len(events)))
            spool.changed.set()
            return events

    async def main():
        sender = WebhookSender(spool, Reader(spool.path), WebhookSettings(
            {}, Target(receiver.url, (signing.parse_secret(SECRET),)), 3600.0, 10.0, YIELD_FOR), Quiet(),
            clock=lambda: clock[0], pressure=Pressure(True))
        spool.changed = asyncio.Event()
        sender.start()
        while not reads:
            await asyncio.wait_for(spool.changed.wait(), WAIT)
        assert reads == [(clock[0], 0)] and receiver.events == []
        clock[0] += YIELD_FOR
        while spool.outbox():  # read again at the next poll
            spool.changed.clear()
            await asyncio.wait_for(spool.changed.wait(), WAIT)
        await sender.stop()

    try:
        asyncio.run(main())
        assert len(receiver.events) == 40 and receiver.rejected == []
    finally:
        receiver.close()
        spool.close()


@pytest.mark.parametrize("notice", [True, False], ids=["connection-close", "closed-without-notice"])
def test_a_receiver_that_closes_after_k_answers_gets_the_rest_on_a_new_connection(notice):
    """A receiver's limit of requests per connection (nginx's
    keepalive_requests), said in the k-th answer or not: the requests
    after it were read but never answered; they go again on a new
    connection, each answered once, in order."""
    receiver, answers = five_posted_to_one_that_closes_after_2(notice)
    assert [a.body for a in answers] == [b'{"n":%d}' % i for i in range(5)]
    assert [a.status for a in answers] == [200, 200, 500, 200, 200]
    assert receiver.connections == 3  # 2 answered on each


def five_posted_to_one_that_closes_after_2(notice: bool):
    """Five requests posted at once to a receiver that closes each
    connection after its second answer (`notice`: saying so in it)."""
    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(echo(200, close_after=2, notice=notice)) as receiver:
            answers = await client.post(receiver.url, posts(5), 10)
        client.close()
        return receiver, answers

    return asyncio.run(main())


def test_a_receiver_that_breaks_on_pipelining_gets_one_request_at_a_time():
    """A server (or a middlebox before it) that drops a connection on which
    requests came pipelined, unanswered: they go again one at a time, and
    so do the next ones to that receiver."""
    async def one_at_a_time_only(writer, nth, body):
        if breaker.behind:
            return False
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        return True

    breaker = RawReceiver(one_at_a_time_only)

    async def main():
        client = Client("smtpgate/test")
        async with breaker:
            first = await client.post(breaker.url, posts(3), 10)
            again = await client.post(breaker.url, posts(2), 10)
        client.close()
        return first, again

    first, again = asyncio.run(main())
    assert [a.status for a in first + again] == [204] * 5
    assert breaker.connections == 2  # the one dropped, then one kept for every request after


def test_after_a_connection_cut_without_notice_the_next_starts_with_one_request():
    """RFC 9112 section 9.3.2: retrying after a connection that failed, the
    client does not pipeline at once on the new one (the first request's
    answer could be lost again in a reset)."""
    receiver, answers = five_posted_to_one_that_closes_after_2(notice=False)
    assert [a.body for a in answers] == [b'{"n":%d}' % i for i in range(5)]
    # 5 pipelined (2 answered, cut); {"n":2} alone, then 3 and 4 pipelined
    # (3 answered, cut); {"n":4} alone.
    assert receiver.per_read == [5, 1, 2, 1]


def test_a_pipeline_left_unanswered_times_out_per_answer_and_keeps_what_was_answered():
    """webhook_timeout bounds each answer from the one before: three answers
    0.4 s apart all count (1.2 s in all, past the 1 s bound), the two that
    never come time out."""
    async def three_slowly_then_silence(writer, nth, body):
        if nth <= 3:
            await asyncio.sleep(0.4)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        return True

    async def main():
        client = Client("smtpgate/test")
        async with RawReceiver(three_slowly_then_silence) as receiver:
            answers = await client.post(receiver.url, posts(5), 1.0)
        client.close()
        return answers

    answers = asyncio.run(main())
    assert [a.status for a in answers[:3]] == [204, 204, 204]
    assert [type(a) for a in answers[3:]] == [TimeoutError, TimeoutError]


@pytest.mark.parametrize("name, verified", [("localhost", True), ("hooks.example", False)])
def test_https_checks_the_receivers_certificate_and_name(tmp_path, monkeypatch, name, verified):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the "system's" CAs: ours
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(server_tls)

    async def answer(reader, writer):
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read(65536)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        client = Client("smtpgate/test")
        try:
            return (await post(client, f"https://localhost:{port}/hook")).status
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message
        finally:
            client.close()
            server.close()

    assert asyncio.run(main()) == (204 if verified else "Hostname mismatch, certificate is not valid for 'localhost'.")



def test_retry_after_is_ascii_seconds_or_an_http_date():
    """RFC 9110 10.2.3. "²" passed str.isdigit() and then failed float():
    the error skipped the backoff, and the receiver was tried again at once,
    over and over."""
    from smtpgate.webhooks.sender import retry_after_seconds

    now = 1445412470.0  # 2015-10-21T07:27:50Z
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(" 7 ", now) == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # past: at once, within the backoff
    for odd in ("²", "1.5", "-3", "", "soon", "Wed, 21 Oct 2015 07:28:00", "9" * 11):
        assert retry_after_seconds(odd, now) is None, odd
