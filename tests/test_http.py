"""The HTTP side (docs/http.md): /metrics parsed with prometheus_client's
own parser while real SENDs are stored and delivered to a real aiosmtpd
upstream; who may see and change what; the limits a hostile client meets.
The queue page in a real browser: test_http_page.py."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_support import csrf_of, http_daemon, request, wait_until
from support import free_port, read_line
from test_callers import start, token_file

from smtpgate.config import ConfigError, load_config
from smtpgate.tools.lineclient import RemoteError

ADMIN = "admin-token-0123456789abcdef"
METRICS = "metrics-token-0123456789abcd"
SHOP = "shop-token-0123456789abcdefgh"
BLOG = "blog-token-0123456789abcdefgh"


def scrape(daemon, token=None) -> dict:
    """{(name, frozenset(labels)): value} of every sample on /metrics."""
    reply = request(daemon.http, "GET", "/metrics", token=token)
    assert reply.status == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def value_or_0(samples: dict, name: str, **labels) -> float:
    """A counter's value; 0 for one not (yet) shown."""
    return samples.get((name, frozenset(labels.items())), 0)


def message(to: str, subject: str = "hello") -> dict:
    return {"from": "app@example.com", "to": [to], "subject": subject, "text": "hi"}


# -- /metrics -----------------------------------------------------------------


def test_metrics_move_with_real_sends_and_deliveries(make_daemon, upstream):
    daemon = http_daemon(make_daemon, retry_base=60.0, retry_max=60.0)
    before = scrape(daemon)
    assert value(before, "smtpgate_messages_accepted_total", caller="anonymous") == 0
    assert value(before, "smtpgate_handoff_seconds_count") == 0
    upstream.script_rcpt("later@example.org", "451 4.3.0 try again later")
    with daemon.client() as client:
        for n in range(5):
            client.send(message(f"rcpt{n}@example.org"))
        deferred = client.send(message("later@example.org"))
    upstream.wait_for(5)
    wait_until(lambda: daemon.client().status(deferred)["state"] == "deferred", what="the deferral")
    # The delivery figures come from the delivery process, once a second at most.
    samples = wait_until(lambda: (s := scrape(daemon)) and value(s, "smtpgate_messages_delivered_total") == 5
                         and value(s, "smtpgate_delivery_seconds_count") == 5
                         and value(s, "smtpgate_recipient_attempts_total", result="deferred", reply="4xx") == 1
                         and s, what="5 delivered, 1 deferred")

    assert value(samples, "smtpgate_messages_accepted_total", caller="anonymous") == 6
    assert value(samples, "smtpgate_handoff_seconds_count") == 6
    assert value(samples, "smtpgate_handoff_seconds_bucket", le="+Inf") == 6
    assert value(samples, "smtpgate_delivery_seconds_count") == 5
    assert value(samples, "smtpgate_messages_deferred_total") == 1
    assert value(samples, "smtpgate_recipient_attempts_total", result="sent", reply="2xx") == 5
    assert value(samples, "smtpgate_recipient_attempts_total", result="deferred", reply="4xx") == 1
    assert value(samples, "smtpgate_queue_messages", state="sent") == 5
    assert value(samples, "smtpgate_queue_messages", state="deferred") == 1
    assert value(samples, "smtpgate_queue_oldest_age_seconds") > 0
    assert value(samples, "smtpgate_upstream_up", upstream=upstream.hostport) == 1
    assert value(samples, "smtpgate_spool_operations_total") >= value(samples, "smtpgate_spool_commits_total") > 0
    assert value(samples, "smtpgate_connections", door="http") == 1  # this scrape's own


def test_delivery_figures_counted_just_before_delivery_stops_are_not_lost(make_daemon, upstream):
    """The delivery process sends its counts once a second; a reload to
    `hold = true` that stops it right after three deliveries still gets
    them to /metrics (sent before the end of its output)."""
    daemon = http_daemon(make_daemon)
    with daemon.client() as client:
        ids = [client.send(message(f"rcpt{n}@example.org")) for n in range(3)]
        for msg_id in ids:
            assert client.wait(msg_id, 20)["state"] == "sent"
    daemon.settings["hold"] = True
    daemon.reload()  # returns once delivery has stopped
    samples = scrape(daemon)
    assert value(samples, "smtpgate_delivery_seconds_count") == 3
    assert value(samples, "smtpgate_recipient_attempts_total", result="sent", reply="2xx") == 3


def test_outcomes_count_per_upstream_and_caller_and_failures_by_reason(make_daemon, make_upstream, tmp_path):
    """Three real upstreams in order: one not listening, one that refuses
    with a 4xx and a 5xx (then stops), one that takes mail; two callers."""
    dead = f"127.0.0.1:{free_port()}"
    refusing, good = make_upstream(), make_upstream()
    refusing.script_rcpt("later@example.org", "451 4.3.0 try again later")
    refusing.script_rcpt("bad@example.org", "550 5.1.1 no such user")
    port = free_port()
    daemon = start(make_daemon, callers={
        "shop": {"token_file": token_file(tmp_path, "shop", SHOP)},
        "blog": {"token_file": token_file(tmp_path, "blog", BLOG)},
    }, http_listen=f"127.0.0.1:{port}", http_admin_token_file=token_file(tmp_path, "admin", ADMIN),
        upstream=[dead, refusing.hostport, good.hostport], retry_base=60.0, retry_max=60.0)
    daemon.http = ("127.0.0.1", port)
    with daemon.client(token=SHOP) as shop, daemon.client(token=BLOG) as blog:
        later = shop.send(message("later@example.org"))
        bad = blog.send(message("bad@example.org"))
        wait_until(lambda: shop.status(later)["state"] == "deferred", what="the deferral")
        wait_until(lambda: blog.status(bad)["state"] == "failed", what="the failure")
        # The delivery process's first count of sessions arrives; those after
        # come in later ones (each counted once: no total sent twice).
        wait_until(lambda: value_or_0(scrape(daemon, ADMIN), "smtpgate_upstream_sessions_total",
                                      upstream=refusing.hostport) == refusing.handler.sessions >= 1,
                   what="the first sessions counted")
        refusing.stop()  # its pooled connection drops, a new one is refused: good takes the rest
        for n in range(2):
            shop.send(message(f"shop{n}@example.org"))
        blog.send(message("blog@example.org"))
    good.wait_for(3)
    samples = wait_until(lambda: (s := scrape(daemon, ADMIN))
                         and value_or_0(s, "smtpgate_upstream_messages_total", upstream=good.hostport,
                                        result="delivered") == 3
                         and value_or_0(s, "smtpgate_delivery_failures_total", upstream=refusing.hostport,
                                        reason="connect") >= 1 and s, what="3 delivered by the good upstream")

    def upstream_results(name):
        return [value(samples, "smtpgate_upstream_messages_total", upstream=name, result=r)
                for r in ("delivered", "deferred", "failed")]

    assert upstream_results(dead) == [0, 0, 0]
    assert upstream_results(refusing.hostport) == [0, 1, 1]
    assert upstream_results(good.hostport) == [3, 0, 0]

    def caller_results(name):
        return [value(samples, "smtpgate_caller_messages_total", caller=name, result=r)
                for r in ("delivered", "deferred", "failed")]

    assert caller_results("shop") == [2, 1, 0]
    assert caller_results("blog") == [1, 0, 1]
    # The callers' counts add up to the daemon's, which the spool's writer counts too.
    assert value(samples, "smtpgate_messages_delivered_total") == 3
    assert value(samples, "smtpgate_messages_deferred_total") == 1
    assert value(samples, "smtpgate_messages_failed_total") == 1

    failures = {dict(labels)["reason"]: n for (name, labels), n in samples.items()
                if name == "smtpgate_delivery_failures_total" and dict(labels)["upstream"] == refusing.hostport}
    assert failures.pop("connect") >= 1  # after stop(): its probes are refused too
    assert failures == {"reply_4xx": 1, "reply_5xx": 1}
    assert {dict(labels)["reason"] for (name, labels), _ in samples.items()
            if name == "smtpgate_delivery_failures_total" and dict(labels)["upstream"] == dead} == {"connect"}
    assert value(samples, "smtpgate_delivery_failures_total", upstream=dead, reason="connect") >= 1
    assert not any(name == "smtpgate_delivery_failures_total" and dict(labels)["upstream"] == good.hostport
                   for name, labels in samples)

    assert value(samples, "smtpgate_upstream_sessions_total", upstream=dead) == 0
    assert value(samples, "smtpgate_upstream_sessions_total", upstream=refusing.hostport) == refusing.handler.sessions
    assert value(samples, "smtpgate_upstream_sessions_total", upstream=good.hostport) == good.handler.sessions >= 1
    # The same counts in STATS, per caller (new keys beside accepted, refused, pending).
    with daemon.client(token=SHOP) as shop:
        stats = shop.stats()
    assert {k: stats["callers"]["shop"][k] for k in ("delivered", "deferred", "failed")} == \
        {"delivered": 2, "deferred": 1, "failed": 0}


def test_refusals_are_counted_by_caller_and_code_with_no_address_in_a_label(make_daemon, upstream):
    daemon = http_daemon(make_daemon)
    with daemon.client() as client:
        for _ in range(2):
            with pytest.raises(RemoteError, match="^BAD_ADDRESS"):
                client.send({"from": "not an address", "to": ["x@example.org"], "text": "hi"})
    samples = scrape(daemon)
    assert value(samples, "smtpgate_sends_refused_total", caller="anonymous", code="BAD_ADDRESS") == 2
    labels = {v for (_, pairs) in samples for _, v in pairs}
    assert not any("@" in label for label in labels)


def test_webhook_figures_follow_stats_and_are_absent_without_the_key(make_daemon):
    from smtpgate.http.metrics import HANDOFF_BOUNDS, DeliveryFigures, Histogram, Snapshot, families
    from prometheus_client import generate_latest

    daemon = http_daemon(make_daemon)
    with daemon.client() as client:
        stats = client.stats()
    # The spool reports its outbox (0 events: no webhook configured).
    assert "smtpgate_webhook_pending 0.0" in request(daemon.http, "GET", "/metrics").text
    del stats["webhooks"]  # a STATS without the key (an older daemon's shape)

    def text(stats):
        made = families(stats, oldest_due=None, now=1e9, handoff=Histogram(HANDOFF_BOUNDS),
                        delivery=DeliveryFigures(), sessions={})
        return generate_latest(Snapshot(made)).decode()

    assert "smtpgate_webhook" not in text(stats)
    stats["webhooks"] = {"delivered": 7, "failed": 2, "retried": 5, "pending": 3}
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(text(stats)) for s in f.samples}
    assert value(samples, "smtpgate_webhook_deliveries_total", result="delivered") == 7
    assert value(samples, "smtpgate_webhook_deliveries_total", result="failed") == 2
    assert value(samples, "smtpgate_webhook_retries_total") == 5
    assert value(samples, "smtpgate_webhook_pending") == 3


# -- /healthz ---------------------------------------------------------------------


def test_healthz_says_ok_without_a_token_while_everything_runs(make_daemon, tmp_path):
    daemon = http_daemon(make_daemon, tokens=[SHOP])
    reply = request(daemon.http, "GET", "/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")


def test_healthz_is_503_with_the_part_that_is_down(tmp_path):
    """The handler on a real spool and a delivery process that is not running."""
    from smtpgate.config import Config
    from smtpgate.delivery.process import DeliveryProcess
    from smtpgate.http.server import HttpSide
    from smtpgate.intake.callers import Callers
    from smtpgate.intake.limits import Limits
    from smtpgate.log import get_logger
    from smtpgate.spool.store import Spool

    async def run():
        config = Config(upstream=["127.0.0.1:25"])
        spool = Spool(tmp_path / "spool")
        await spool.open()
        log = get_logger()
        delivery = DeliveryProcess(spool, None, log, log_format="json", log_level="info")
        side = HttpSide(config, door=None, spool=spool, delivery=delivery, limits=Limits(config, log),
                        callers=Callers(config, spool.caller_key), queue_changed=lambda: None, log=log)
        down = await side.healthz(None)
        await spool.close()
        both = await side.healthz(None)
        config.hold = True
        held = await side.healthz(None)
        return [(r.status, r.text) for r in (down, both, held)]

    assert asyncio.run(run()) == [(503, "delivery down\n"), (503, "spool writer down; delivery down\n"),
                                  (503, "spool writer down\n")]


# -- who may see and change what ---------------------------------------------------


@pytest.fixture
def closed_daemon(make_daemon, tmp_path):
    """Callers shop and blog, an admin token and a metrics token."""
    port = free_port()
    daemon = start(make_daemon, callers={
        "shop": {"token_file": token_file(tmp_path, "shop", SHOP)},
        "blog": {"token_file": token_file(tmp_path, "blog", BLOG)},
    }, http_listen=f"127.0.0.1:{port}", http_admin_token_file=token_file(tmp_path, "admin", ADMIN),
        http_metrics_token_file=token_file(tmp_path, "metrics", METRICS), retry_base=60.0, retry_max=60.0)
    daemon.http = ("127.0.0.1", port)
    return daemon


def test_metrics_need_an_admin_or_metrics_token_and_a_wrong_one_is_counted(closed_daemon):
    daemon = closed_daemon
    assert request(daemon.http, "GET", "/metrics").status == 401
    refused = request(daemon.http, "GET", "/metrics", token="wrong-token-0123456789abcdef")
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert request(daemon.http, "GET", "/metrics", token=SHOP).status == 403  # a caller's: it names the others
    samples = scrape(daemon, token=METRICS)
    assert value(samples, "smtpgate_auth_failures_total") == 1
    assert scrape(daemon, token=ADMIN)
    assert request(daemon.http, "GET", "/", token=METRICS).status == 403


def test_the_pages_oldest_waiting_are_the_queued_and_deferred_not_those_being_sent(make_daemon):
    # An upstream that takes the connection and never greets (a listening
    # socket never accepted): the first messages stay claimed, 'sending',
    # and those past delivery's room wait 'queued'. The page's list, read
    # oldest first through the index of waiting messages, shows the latter.
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(64)
    try:
        daemon = http_daemon(make_daemon, upstream=[f"127.0.0.1:{tarpit.getsockname()[1]}"],
                             connections_per_upstream=1)
        with daemon.client() as client:
            ids = [client.send(message(f"rcpt{n}@example.org")) for n in range(40)]
            states = wait_until(lambda: (s := [client.status(m)["state"] for m in ids])
                                and "sending" in s and "queued" in s and s, what="some sending, some queued")
        listed = request(daemon.http, "GET", "/").text.split("<h2>Oldest waiting", 1)[1]
        shown = [m for m in ids if m in listed]
        assert shown == [m for m, state in zip(ids, states, strict=True) if state == "queued"][:len(shown)] and shown
        assert not any(m in listed for m, state in zip(ids, states, strict=True) if state == "sending")
    finally:
        tarpit.close()


def test_a_caller_sees_its_own_messages_only_and_may_not_change_them(closed_daemon, upstream):
    daemon = closed_daemon
    upstream.script_rcpt("shop-customer@example.org", "451 4.3.0 greylisted")
    upstream.script_rcpt("blog-reader@example.org", "451 4.3.0 greylisted")
    with daemon.client(token=SHOP) as shop, daemon.client(token=BLOG) as blog:
        shop_id = shop.send(message("shop-customer@example.org"))
        blog_id = blog.send(message("blog-reader@example.org"))
        for client, msg_id in ((shop, shop_id), (blog, blog_id)):
            wait_until(lambda c=client, m=msg_id: c.status(m)["state"] == "deferred", what="deferred")

    page = request(daemon.http, "GET", "/", token=SHOP)
    assert page.status == 200 and shop_id in page.text and blog_id not in page.text
    assert "caller shop" in page.text and "not final <b>1</b>" in page.text
    assert request(daemon.http, "GET", f"/message/{shop_id}", token=SHOP).status == 200
    # Another caller's message is not found, like an unknown id (STATUS says the same).
    theirs = request(daemon.http, "GET", f"/message/{blog_id}", token=SHOP)
    unknown = request(daemon.http, "GET", "/message/01ZZZZZZZZZZZZZZZZZZZZZZZZ", token=SHOP)
    assert theirs.status == unknown.status == 404
    assert blog_id not in request(daemon.http, "GET", "/?q=blog-reader", token=SHOP).text
    assert request(daemon.http, "POST", f"/message/{shop_id}/delete", token=SHOP).status == 403
    assert daemon.client(token=SHOP).status(shop_id)["state"] == "deferred"

    everything = request(daemon.http, "GET", "/", token=ADMIN).text
    assert shop_id in everything and blog_id in everything
    assert request(daemon.http, "POST", f"/message/{blog_id}/delete", token=ADMIN).status == 303
    assert request(daemon.http, "GET", f"/message/{blog_id}", token=ADMIN).status == 404


def test_a_form_without_its_session_csrf_token_changes_nothing(closed_daemon, upstream):
    daemon = closed_daemon
    upstream.script_rcpt("csrf@example.org", "451 4.3.0 greylisted")
    with daemon.client(token=SHOP) as shop:
        msg_id = shop.send(message("csrf@example.org"))
        wait_until(lambda: shop.status(msg_id)["state"] == "deferred", what="deferred")
    assert request(daemon.http, "GET", "/").status == 401  # the login form
    assert request(daemon.http, "POST", "/login", form={"token": "wrong-token-0123456789abcdef"}).status == 401
    login = request(daemon.http, "POST", "/login", form={"token": ADMIN})
    assert login.status == 303
    session = login.cookie("smtpgate_session")
    assert "HttpOnly" in login.headers["Set-Cookie"] and "SameSite=Strict" in login.headers["Set-Cookie"]
    csrf = csrf_of(request(daemon.http, "GET", f"/message/{msg_id}", cookie=session).text)

    for form in ({}, {"csrf": "forged"}, {"csrf": csrf[:-1]}):
        refused = request(daemon.http, "POST", f"/message/{msg_id}/delete", cookie=session, form=form)
        assert refused.status == 403, form
    assert daemon.client(token=SHOP).status(msg_id)["state"] == "deferred"
    # Another session's token is not this one's.
    other = request(daemon.http, "POST", "/login", form={"token": ADMIN}).cookie("smtpgate_session")
    assert request(daemon.http, "POST", f"/message/{msg_id}/delete", cookie=other,
                   form={"csrf": csrf}).status == 403

    done = request(daemon.http, "POST", f"/message/{msg_id}/retry", cookie=session, form={"csrf": csrf})
    assert (done.status, done.headers["Location"]) == (303, f"/message/{msg_id}?done=retried")
    done = request(daemon.http, "POST", f"/message/{msg_id}/delete", cookie=session, form={"csrf": csrf})
    assert (done.status, done.headers["Location"]) == (303, "/?done=deleted")
    assert request(daemon.http, "GET", f"/message/{msg_id}", cookie=session).status == 404


def test_an_open_daemon_refuses_other_sites_forms_and_names(make_daemon, upstream):
    """No token: loopback only, but a browser on this machine visits other
    sites too. Their forms have no session; their names (DNS rebinding) are not ours."""
    daemon = http_daemon(make_daemon, retry_base=60.0, retry_max=60.0)
    upstream.script_rcpt("open@example.org", "451 4.3.0 greylisted")
    with daemon.client() as client:
        msg_id = client.send(message("open@example.org"))
        wait_until(lambda c=client, m=msg_id: c.status(m)["state"] == "deferred", what="deferred")
    assert request(daemon.http, "POST", f"/message/{msg_id}/delete").status == 403
    assert request(daemon.http, "GET", "/", headers={"Host": "evil.example:8080"}).status == 403
    assert request(daemon.http, "GET", "/metrics", headers={"Host": "rebind.evil.example"}).status == 403
    page = request(daemon.http, "GET", f"/message/{msg_id}")
    session, csrf = page.cookie("smtpgate_session"), csrf_of(page.text)
    assert request(daemon.http, "POST", f"/message/{msg_id}/delete", cookie=session, form={}).status == 403
    assert request(daemon.http, "POST", f"/message/{msg_id}/delete", cookie=session,
                   form={"csrf": csrf}).status == 303


def test_callers_known_by_unix_user_alone_close_the_http_side(make_daemon):
    """No token anywhere, a caller known by its uid: the line door refuses
    whoever is not that uid, and the HTTP side, which cannot tell who is on
    the other end of a TCP connection, must not let them in as admin."""
    port = free_port()
    daemon = start(make_daemon, callers={"pool": {"uid": 65534}}, http_listen=f"127.0.0.1:{port}")
    daemon.http = ("127.0.0.1", port)
    assert request(daemon.http, "GET", "/").status == 401
    assert request(daemon.http, "GET", "/message/01JF0000000000000000000000").status == 401
    assert request(daemon.http, "GET", "/metrics").status == 401
    assert request(daemon.http, "POST", "/login", form={"token": "anything-at-all-0123456789"}).status == 401
    assert request(daemon.http, "GET", "/healthz").status == 200


def test_http_listen_off_loopback_needs_a_token(tmp_path):
    base = {"upstream": ["127.0.0.1:25"], "spool": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^http_listen: 0\.0\.0\.0:8080 is not a loopback address"):
        load_config(None, dict(base, http_listen="0.0.0.0:8080"))
    admin = token_file(tmp_path, "admin", ADMIN)
    assert load_config(None, dict(base, http_listen="0.0.0.0:8080", http_admin_token_file=admin)).http_listen
    # The HTTP side's token does not close the line door.
    with pytest.raises(ConfigError, match="^listen: "):
        load_config(None, dict(base, listen=["0.0.0.0:2526"], http_admin_token_file=admin))
    assert load_config(None, dict(base, http_listen="8080")).http_listen == "127.0.0.1:8080"
    with pytest.raises(ConfigError, match="^http_metrics_token_file: a token in it is also"):
        load_config(None, dict(base, http_admin_token_file=admin,
                               http_metrics_token_file=token_file(tmp_path, "m", ADMIN)))


# -- limits a hostile client meets ------------------------------------------------------


def test_connections_past_the_cap_get_a_503_line_and_the_close(make_daemon):
    daemon = http_daemon(make_daemon, max_connections=4, max_connections_per_peer=4)
    held = [socket.create_connection(daemon.http, timeout=10) for _ in range(4)]
    try:
        wait_until(lambda: daemon.client().stats()["limits"]["connections"].get("http") == 4, what="4 held")
        with socket.create_connection(daemon.http, timeout=10) as extra:
            assert read_line(extra).startswith("HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: daemon.client().stats()["limits"]["connections"]["http"] == 0, what="the places back")
    assert request(daemon.http, "GET", "/healthz").status == 200


def test_a_slow_client_is_cut_after_request_timeout(make_daemon):
    """A form's body trickled a byte at a time never ends by itself (aiohttp
    has no timeout for a body): the connection's life does (request_timeout
    1 s; the loop gives up after 40 s)."""
    daemon = http_daemon(make_daemon, request_timeout=1.0)
    with socket.create_connection(daemon.http, timeout=10) as slow:
        slow.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 10000\r\n\r\ntoken=")
        cut = False
        for _ in range(200):
            try:
                slow.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            time.sleep(0.2)
        assert cut
    assert request(daemon.http, "GET", "/healthz").status == 200


def test_a_large_body_and_a_long_header_are_refused(closed_daemon):
    daemon = closed_daemon
    big = request(daemon.http, "POST", "/login", body=b"token=" + b"x" * 20000,
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status == 413
    long_header = request(daemon.http, "GET", "/healthz", headers={"X-Long": "y" * 9000})
    assert long_header.status in (400, 431)
    assert request(daemon.http, "GET", "/healthz").status == 200


def found_ids(page: str) -> list[str]:
    """The ids a queue page lists under "Found for" (its other lists left out)."""
    assert "<h2>Found for" in page, page
    return re.findall(r"/message/([0-9A-Z]{26})", page.split("<h2>Found for", 1)[1].split("<h2>Upstreams", 1)[0])


def test_a_search_by_recipient_is_bounded_in_length_wildcards_results_and_rate(make_daemon):
    from smtpgate.http.server import MIN_QUERY, OLDEST_SHOWN, SEARCHES_PER_MINUTE

    daemon = http_daemon(make_daemon, hold=True)  # everything stays queued, to be found
    with daemon.client() as client:
        ids = [client.send(message(f"many{n}@example.org")) for n in range(OLDEST_SHOWN + 5)]
        odd = client.send(message("odd_one%x@example.org"))

    def search(q: str):
        return request(daemon.http, "GET", "/?" + urlencode({"q": q}))

    # Too short: no search at all (every address holds "a" or "or").
    short = search("or")
    assert short.status == 200 and f"needs at least {MIN_QUERY} characters" in short.text
    assert "<h2>Found for" not in short.text
    # Wildcards are themselves: % and _ match only a % and a _ (no scan that
    # finds the whole queue), and a search shows OLDEST_SHOWN at most.
    assert found_ids(search("%%%").text) == []
    assert found_ids(search("___").text) == []
    assert found_ids(search("_one%").text) == [odd]
    many = found_ids(search("MANY").text)  # in the order of their ids (the same millisecond: any)
    assert len(many) == OLDEST_SHOWN and set(many) < set(ids)
    # An address may search SEARCHES_PER_MINUTE times a minute (4 done), then 429.
    for n in range(SEARCHES_PER_MINUTE - 4):
        assert search(f"nobody{n}").status == 200
    for q in ("nobody", "%%%%%%", "many"):
        refused = search(q)
        assert refused.status == 429, refused.text
        assert 1 <= int(refused.headers["Retry-After"]) <= 61  # a minute, counted in steps of a second
        assert "<h2>Found for" not in refused.text
    # The rest goes on: the page, a search by id (an index read), a too short
    # one (nothing read), /metrics and the line protocol.
    assert request(daemon.http, "GET", "/").status == 200
    assert found_ids(search(odd).text) == [odd]
    assert search("xy").status == 200
    assert request(daemon.http, "GET", "/metrics").status == 200
    assert daemon.client().status(odd)["state"] == "queued"


def test_a_reload_that_removes_a_token_ends_its_sessions(closed_daemon, tmp_path):
    daemon = closed_daemon
    session = request(daemon.http, "POST", "/login", form={"token": ADMIN}).cookie("smtpgate_session")
    assert request(daemon.http, "GET", "/", cookie=session).status == 200
    token_file(tmp_path, "admin", "another-admin-token-0123456789")
    daemon.reload()
    assert request(daemon.http, "GET", "/", cookie=session).status == 401
    assert request(daemon.http, "GET", "/metrics", token=ADMIN).status == 401
    assert request(daemon.http, "GET", "/metrics", token="another-admin-token-0123456789").status == 200


def test_wrong_tokens_are_limited_per_address_and_then_not_even_checked(closed_daemon):
    """Tokens may be guessed at HTTP's pace (hundreds of thousands a second
    on keep-alive connections): past 10 wrong ones a minute an address gets
    429 for any token, the right one too; another address is not held up."""
    import http.client

    daemon = closed_daemon
    for n in range(10):
        assert request(daemon.http, "GET", "/metrics", token=f"guess-{n:02d}-0123456789abcdef").status == 401
    assert request(daemon.http, "POST", "/login", form={"token": "guess-login-0123456789"}).status == 429
    held = request(daemon.http, "GET", "/metrics", token=METRICS)
    assert held.status == 429 and 1 <= int(held.headers["Retry-After"]) <= 61
    other = http.client.HTTPConnection(*daemon.http, timeout=10, source_address=("127.0.0.2", 0))
    try:
        other.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS}"})
        assert other.getresponse().status == 200
    finally:
        other.close()


def test_a_token_logging_in_again_and_again_ends_its_own_oldest_sessions_not_others(closed_daemon):
    """Sessions are bounded (the oldest goes first); a caller's token that
    logs in over and over must not push the admin's session out."""
    daemon = closed_daemon

    def login(token: str) -> str:
        reply = request(daemon.http, "POST", "/login", form={"token": token})
        assert reply.status == 303
        return reply.cookie("smtpgate_session")

    from smtpgate.http.auth import MAX_SESSIONS

    admin = login(ADMIN)
    shop = [login(SHOP) for _ in range(MAX_SESSIONS + 1)]  # enough to push any first session out
    assert request(daemon.http, "GET", "/", cookie=admin).status == 200
    assert request(daemon.http, "GET", "/", cookie=shop[-1]).status == 200
    assert request(daemon.http, "GET", "/", cookie=shop[0]).status != 200  # its own oldest went


def test_the_session_cookie_is_secure_behind_a_local_tls_proxy(closed_daemon):
    """Without Secure, a browser that logged in through https sends the
    session to any plain-http service of the same host name. A TLS proxy on
    this machine says https in X-Forwarded-Proto."""
    daemon = closed_daemon
    plain = request(daemon.http, "POST", "/login", form={"token": ADMIN})
    proxied = request(daemon.http, "POST", "/login", form={"token": ADMIN}, headers={"X-Forwarded-Proto": "https"})
    cookies = [[c for c in reply.headers.get_all("Set-Cookie") if c.startswith("smtpgate_session=")][0]
               for reply in (plain, proxied)]
    assert plain.status == proxied.status == 303
    assert "; Secure" not in cookies[0] and "; Secure" in cookies[1]
    assert all("HttpOnly" in c and "SameSite=Strict" in c for c in cookies)


def test_a_form_aiohttp_cannot_read_is_a_400_and_no_error_in_the_log(closed_daemon):
    """Before any login: a charset aiohttp does not know, bytes that are not
    UTF-8, a multipart without its boundary, a gzip body that is not gzip.
    Each was a handler exception whose logging itself failed (no 500 sent,
    a traceback a stranger could repeat); each is the client's 400 now."""
    daemon = closed_daemon
    urlencoded = "application/x-www-form-urlencoded"
    for content_type, extra, body in (
            (urlencoded + "; charset=bogus", {}, b"token=x"),
            (urlencoded, {}, b"token=\xff\xfe"),
            ("multipart/form-data", {}, b"--x\r\n\r\n"),
            (urlencoded, {"Content-Encoding": "gzip"}, b"token=not-gzip")):
        reply = request(daemon.http, "POST", "/login", headers={"Content-Type": content_type, **extra}, body=body)
        assert reply.status == 400, (content_type, extra, reply.status, reply.text)
    # A file where the token's text belongs is no token: a wrong one.
    multipart = (b"--b\r\nContent-Disposition: form-data; name=token; filename=t.txt\r\n\r\n"
                 + ADMIN.encode() + b"\r\n--b--\r\n")
    assert request(daemon.http, "POST", "/login", body=multipart,
                   headers={"Content-Type": "multipart/form-data; boundary=b"}).status == 401
    assert request(daemon.http, "GET", "/healthz").status == 200
    loud = [line for line in daemon.log_lines() if (line.get("level") not in ("debug", "info") or "exception" in line)
            and line.get("event") != "auth_failed"]  # the wrong token's one line a minute
    assert not loud, loud


def test_a_client_cut_mid_request_or_malformed_is_no_error_in_the_log(make_daemon):
    """What any client can do at will (close or reset its connection in the
    middle of a request's head or body, send a header over the limit) is no
    error of the daemon's: aiohttp logs each as an error with a traceback,
    which a hostile client could repeat to fill the log. The daemon logs it
    at debug, in one line without a traceback, and serves the next request."""
    daemon = http_daemon(make_daemon, log_level="debug")
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: "
    body = (b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1000\r\n\r\ntoken=")
    for sent, reset in ((head, False), (head, True), (body, False), (body, True)):
        with socket.create_connection(daemon.http, timeout=10) as cut:
            if reset:  # SO_LINGER 0: close() sends an RST
                cut.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            cut.sendall(sent)
            time.sleep(0.2)  # read, and the handler waiting for the body, before the cut
    long_header = request(daemon.http, "GET", "/healthz", headers={"X-Long": "y" * 9000})
    assert long_header.status in (400, 431)
    assert request(daemon.http, "GET", "/healthz").status == 200
    lines = daemon.log_lines()
    assert any(line.get("event") == "listening" for line in lines)  # the log is the daemon's
    loud = [line for line in lines if line.get("level") not in ("debug", "info") or "exception" in line]
    assert not loud, loud
    faults = [line["error"] for line in lines if line.get("event") == "http_client_fault"]
    assert any("LineTooLong" in fault for fault in faults) and any("Connection" in fault for fault in faults), faults
