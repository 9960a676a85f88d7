"""The HTTP side (docs/http.md): /healthz, /metrics and the queue page,
served by aiohttp on the daemon's own event loop.

Off unless `http_listen` is set. Limits before trust, as on the doors:
- connections are accepted by intake/acceptor.py through a gate of their
  own ("http"): max_connections and max_connections_per_peer apply, a
  refused one gets a one-line 503 before any parsing;
- a connection lives at most request_timeout seconds (stress_request_timeout
  while the gate is stressed) whatever it sends: a slow or idle client
  (slowloris) holds its place that long, then is closed; aiohttp closes an
  idle keep-alive connection after KEEPALIVE seconds before that;
- a request line or header field is at most 8 KiB, 64 headers, and a
  body (only the login and the buttons' forms have one) MAX_BODY.
Who may do what: auth.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from email.parser import HeaderParser
from email.policy import default as default_policy

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client.exposition import generate_latest

from smtpgate.config import Config, is_loopback, parse_hostport
from smtpgate.http import page
from smtpgate.http.auth import SESSION_COOKIE, Access, Keys, Session, Sessions, host_is_loopback
from smtpgate.http.metrics import HANDOFF_BOUNDS, Histogram, Snapshot, families
from smtpgate.intake.acceptor import Acceptor, listening_sockets
from smtpgate.intake.callers import SlidingCount
from smtpgate.intake.peer import Peer
from smtpgate.message.spec import MessageSpec

KEEPALIVE = 5.0  # seconds an idle keep-alive connection stays open
SHUTDOWN_GRACE = 2.0  # seconds
MAX_BODY = 16 * 1024  # a form with a token and a CSRF token fits many times
OLDEST_SHOWN = 50  # messages on the list, and found by a search
MAX_QUERY = 320  # characters of a search: an address is at most 254 (RFC 5321 4.5.3.1.3)
# A search by recipient reads every recipient row of the spool (0.13 s a
# million, in the reader thread STATUS also waits for): it needs MIN_QUERY
# characters (fewer match most addresses), and one address may start
# SEARCHES_PER_MINUTE of them a minute, which keeps that thread under a
# third busy per address with a million recipients. Past SEARCH_PEERS
# addresses the counts start again (a bound on memory).
MIN_QUERY = 3
SEARCHES_PER_MINUTE = 20
SEARCH_PEERS = 10_000
# Wrong tokens (a bearer header, the login form) one address may show a
# minute; past it every token it shows gets 429 unchecked until the minute
# has room (the line and SMTP doors close a connection after 3). Counted
# like the searches, with the same bound on addresses.
WRONG_TOKENS_PER_MINUTE = 10
# Every page: no script may run, nothing may frame it, no URL leaks on.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# generate_latest writes the classic text format (names escaped to
# underscores), which every Prometheus reads; newer prometheus-clients name
# a 1.0.0 in CONTENT_TYPE_LATEST that Prometheus 2 does not know.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NOTICES = {"retried": "Retried: due now.", "not-due": "Not retried: it is not deferred (queued, "
           "held by an outage or being sent).", "deleted": "Deleted."}

_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s\n")


def _refusal(why: str) -> bytes:
    text = why.encode()
    return _REFUSAL % (len(text) + 1, text)


class _Bounded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with its gate slot given back
    when it ends and a bound on its life (see the module docstring)."""

    def __init__(self, inner: asyncio.Protocol, slot, lifetime: float):
        self.inner, self.slot, self.lifetime = inner, slot, lifetime
        self.timer = None

    def connection_made(self, transport) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.lifetime, transport.close)
        self.inner.connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.slot.release()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server log, less what any client can cause at will: a
    request that breaks HTTP/1.1 or over a limit (HttpProcessingError, the
    client has its 400), a body that is not what its headers say
    (RequestPayloadError: a gzip that is not) and a connection cut or reset in the middle of a
    request (ConnectionError: the handler's read of the body) are one line
    at debug, not an error with a traceback that a hostile client could
    repeat to fill the log. Anything else a handler raises is a fault of
    ours and stays an error."""

    def __init__(self, log):
        super().__init__(logging.getLogger("aiohttp.server"))
        # Not `self.log`: that would hide LoggerAdapter.log, which
        # exception() calls, and every handler error became a TypeError
        # with no 500 sent (a review found it, 2026-12-07).
        self.smtpgate_log = log

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        if isinstance(exc_info, (HttpProcessingError, RequestPayloadError, ConnectionError)):
            self.smtpgate_log.debug("http_client_fault", peer=args[0] if args else None,
                                    error=f"{type(exc_info).__name__}: {exc_info}".strip())
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


async def _form(request: web.Request) -> dict[str, str]:
    """A form's text fields. What a client sends that aiohttp cannot parse
    (a charset it does not know, bytes that are not UTF-8, a multipart
    without its boundary, a body whose Content-Encoding is a lie) is the
    client's 400, not an error of ours in the log; a file where text is
    expected is left out."""
    try:
        form = await request.post()
    except web.HTTPException:  # aiohttp's own answer (413 past client_max_size)
        raise
    except (ValueError, LookupError, HttpProcessingError, RequestPayloadError):
        raise web.HTTPBadRequest(text="the form cannot be read\n") from None
    return {name: value for name, value in form.items() if isinstance(value, str)}


class HttpSide:
    """The HTTP side of a running daemon. `door`: the line door (its STATS
    and the hand-off histogram); `callers`: the hand-off's (a reload
    updates them in place); `queue_changed`: what to do after a retry or
    delete (wake delivery, probe a down upstream)."""

    def __init__(self, config: Config, *, door, spool, delivery, limits, callers, queue_changed, log):
        self.config = config
        self.door = door
        self.spool = spool
        self.delivery = delivery
        self.limits = limits
        self.queue_changed = queue_changed
        self.log = log
        self.keys = Keys(config, callers)
        self.sessions = Sessions()
        self.gate = limits.gate("http")
        self.handoff = Histogram(HANDOFF_BOUNDS)
        self.searches: dict[str, SlidingCount] = {}  # peer address -> its searches by recipient of the last minute
        self.wrong_tokens: dict[str, SlidingCount] = {}  # peer address -> its wrong tokens of the last minute
        self.acceptor: Acceptor | None = None
        self.runner: web.AppRunner | None = None

    # --- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Bind and set up (serving begins with start_serving)."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._headers])
        app.add_routes([
            web.get("/healthz", self.healthz), web.get("/metrics", self.metrics),
            web.get("/", self.index), web.get("/message/{id}", self.message),
            web.post("/message/{id}/{action:retry|delete}", self.change),
            web.get("/login", self.login_form), web.post("/login", self.login), web.post("/logout", self.logout),
        ])
        # A stop waits SHUTDOWN_GRACE for requests in flight: with aiohttp's
        # default (60 s) a form body that never came held a SIGTERM 10.6 s
        # instead of 2.6 s.
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=KEEPALIVE,
                                    shutdown_timeout=SHUTDOWN_GRACE, max_line_size=8190, max_field_size=8190,
                                    max_headers=64, logger=_ServerLog(self.log))
        await self.runner.setup()
        socks = listening_sockets(*parse_hostport(self.config.http_listen, "http_listen"))
        server = self.runner.server
        self.acceptor = Acceptor(socks, self.gate,
                                 lambda peer, slot: _Bounded(server(), slot, self.gate.request_timeout),
                                 _refusal, self.log)
        for sock in socks:
            host, port = sock.getsockname()[:2]
            self.log.info("listening", address=f"{host}:{port}", side="http")
        self.door.handoff_seconds = self.handoff

    async def start_serving(self) -> None:
        await self.acceptor.start_serving()

    async def close(self) -> None:
        self.door.handoff_seconds = None
        if self.acceptor is not None:
            self.acceptor.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def addresses(self) -> list:
        return [sock.getsockname() for sock in self.acceptor.sockets]

    # --- who is asking -----------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler):
        if self.keys.open and not host_is_loopback(request.headers.get("Host")):
            # DNS rebinding: another site's name pointed at 127.0.0.1 would
            # make this open page its own origin.
            return web.Response(status=403, text="Host is not a loopback name\n", headers=SECURITY_HEADERS)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(SECURITY_HEADERS)
        return response

    def _peer(self, request: web.Request) -> Peer:
        return Peer("tcp", request.remote, None, None, None)

    def _who(self, request: web.Request) -> tuple[Access | None, Session | None]:
        """The request's access (None: none), and its session if it came by one.
        A wrong bearer token is counted, and refused with 401."""
        header = request.headers.get("Authorization")
        if header is not None:
            self._per_minute(self.wrong_tokens, WRONG_TOKENS_PER_MINUTE, request, "Too many wrong tokens", count=False)
            scheme, _, token = header.partition(" ")
            access = self.keys.resolve(token.strip()) if scheme.lower() == "bearer" else None
            if access is None:
                self._wrong_token(request)
                raise web.HTTPUnauthorized(text="wrong token\n", headers={"WWW-Authenticate": "Bearer"})
            return access, None
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            access = self.keys.resolve(session.token)
            if access is None:  # its token was removed by a reload
                self.sessions.drop(session.id)
                return None, None
            return access, session
        return self.keys.resolve(None), None

    def _set_cookie(self, response: web.StreamResponse, request: web.Request, session: Session) -> None:
        # Secure when the browser's request came by https: ours (never: plain
        # HTTP), or a TLS reverse proxy's on this machine (docs/http.md),
        # which says so in X-Forwarded-Proto. Without the flag the browser
        # would send the session to any plain-http service of this host name
        # (cookies are not kept apart by port).
        proxied = is_loopback(request.remote or "") and \
            request.headers.get("X-Forwarded-Proto", "").strip().lower() == "https"
        response.set_cookie(SESSION_COOKIE, session.id, httponly=True, samesite="Strict", path="/",
                            secure=request.secure or proxied)

    def _viewer(self, request: web.Request) -> tuple[Access, Session | None, Session | None]:
        """For the pages: (access, session, a session just made). No access:
        the login form (401). On an open daemon a browser gets a session at
        its first page, for the CSRF token of its forms."""
        access, session = self._who(request)
        if access is None:
            raise web.HTTPUnauthorized(text=page.login(None), content_type="text/html")
        if not access.may_view:
            raise web.HTTPForbidden(text="this token may read /metrics only\n")
        made = None
        if session is None and request.headers.get("Authorization") is None:
            session = made = self.sessions.new(None)
        return access, session, made

    def _html(self, request, text: str, made: Session | None, status: int = 200) -> web.Response:
        response = web.Response(text=text, content_type="text/html", status=status)
        if made is not None:
            self._set_cookie(response, request, made)
        return response

    @staticmethod
    def _label(access: Access) -> str:
        return f"caller {access.caller}" if access.caller else access.role

    # --- /healthz and /metrics ------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while the spool writer and delivery run (delivery is not
        expected to with `hold`), 503 with what is wrong otherwise."""
        wrong = []
        if not self.spool.alive:
            wrong.append("spool writer down")
        if not self.config.hold and not self.delivery.alive:
            wrong.append("delivery down")
        return web.Response(status=503 if wrong else 200, text=("; ".join(wrong) or "ok") + "\n")

    async def metrics(self, request: web.Request) -> web.Response:
        access, _ = self._who(request)
        if access is None:
            raise web.HTTPUnauthorized(text="a bearer token is needed\n", headers={"WWW-Authenticate": "Bearer"})
        if not access.may_scrape:
            raise web.HTTPForbidden(text="an admin or metrics token is needed\n")
        stats = await self.door.stats()
        oldest = await self.spool.oldest_due()
        body = generate_latest(Snapshot(families(stats, oldest_due=oldest, now=time.time(),
                                                 handoff=self.handoff, delivery=self.delivery.figures,
                                                 sessions=self.delivery.sessions)))
        return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})

    # --- the queue page ---------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        access, session, made = self._viewer(request)
        mine = None if access.sees_all else access.caller
        query = request.query.get("q", "").strip()[:MAX_QUERY] or None
        found = None
        notice = NOTICES.get(request.query.get("done", ""))
        if query is not None:
            found = await self.spool.list_messages(OLDEST_SHOWN, msg_id=query, caller=mine)
            if not found and len(query) < MIN_QUERY:
                found, notice = None, f"A search by recipient needs at least {MIN_QUERY} characters."
            elif not found:
                self._count_search(request)
                found = await self.spool.list_messages(OLDEST_SHOWN, include_final=True,
                                                       recipient=query, caller=mine)
        stats = await self.spool.stats()
        states = stats["states"]
        if mine is not None:  # a caller sees its own queue only: the count the spool keeps
            states = {"not final": self.spool.pending.get(mine, 0)}
        oldest = await self.spool.list_messages(OLDEST_SHOWN, caller=mine, waiting=True)
        return self._html(request, page.index(
            who=self._label(access), csrf=session.csrf if session else None, logout=bool(session and session.token),
            states=states, upstreams=stats["upstreams"], oldest=oldest, query=query, found=found,
            notice=notice), made)

    def _count_search(self, request: web.Request) -> None:
        """Count a search by recipient against its peer's SEARCHES_PER_MINUTE;
        past it, 429 with the seconds until one more fits."""
        self._per_minute(self.searches, SEARCHES_PER_MINUTE, request, "Too many searches",
                         f"At most {SEARCHES_PER_MINUTE} searches by recipient a minute from one address")

    def _wrong_token(self, request: web.Request) -> None:
        self.limits.auth_failed("http", self._peer(request))
        self.wrong_tokens[request.remote].add(time.monotonic())  # made by the check before it

    def _per_minute(self, windows: dict[str, SlidingCount], limit: int, request: web.Request, title: str,
                    what: str | None = None, count: bool = True) -> None:
        """429, with the seconds until one more fits, once the peer's window
        of `limit` a minute is full; else count this one (unless not `count`:
        a wrong token is counted only once it is known to be wrong)."""
        now = time.monotonic()
        window = windows.get(request.remote)
        if window is None:
            if len(windows) >= SEARCH_PEERS:
                windows.clear()
            window = windows[request.remote] = SlidingCount(limit, 60.0)
        wait = window.wait(now)
        if wait > 0:
            what = what or f"At most {limit} wrong tokens a minute from one address"
            raise web.HTTPTooManyRequests(
                text=page.message_page(title, f"{what}; try again in {math.ceil(wait)} s."),
                content_type="text/html", headers={"Retry-After": str(math.ceil(wait))})
        if count:
            window.add(now)

    async def message(self, request: web.Request) -> web.Response:
        access, session, made = self._viewer(request)
        entry = await self._entry(request.match_info["id"], access)
        spec = await self.spool.spec(entry["id"])
        route = self.config.upstream or (["the embedded dev upstream"] if self.config.dev else [])
        return self._html(request, page.detail(
            who=self._label(access), csrf=session.csrf if session else None, logout=bool(session and session.token),
            entry=entry, subject=_subject(spec), route=route, may_change=access.may_change,
            notice=NOTICES.get(request.query.get("done", ""))), made)

    async def _entry(self, msg_id: str, access: Access) -> dict:
        """The message, if it is there and the access may see it; else 404 (the same for both)."""
        found = await self.spool.list_messages(1, include_final=True, msg_id=msg_id[:64],
                                               caller=None if access.sees_all else access.caller)
        if not found:
            raise web.HTTPNotFound(text=page.message_page("Not found", f"No message {msg_id[:64]}."),
                                   content_type="text/html")
        return found[0]

    async def change(self, request: web.Request) -> web.Response:
        """Retry or delete one message: the queue tool's operations, through the spool's writer."""
        access, session = self._who(request)
        if access is None or not access.may_change:
            raise web.HTTPForbidden(text="only an admin may retry or delete\n")
        form = await _form(request)
        if session is not None and not session.csrf_ok(form.get("csrf")):
            raise web.HTTPForbidden(text="stale or missing form token: reload the page and try again\n")
        if session is None and request.headers.get("Authorization") is None:
            # An open daemon's request without a session: not from our page.
            raise web.HTTPForbidden(text="stale or missing form token: reload the page and try again\n")
        entry = await self._entry(request.match_info["id"], access)
        msg_id = entry["id"]
        if request.match_info["action"] == "retry":
            done = "retried" if await self.spool.retry(msg_id) else "not-due"
            where = f"/message/{msg_id}?done={done}"
        else:
            await self.spool.delete(msg_id)
            where = "/?done=deleted"
        self.log.info("queue_changed_over_http", action=request.match_info["action"], id=msg_id,
                      by=self._label(access), peer=request.remote)
        self.queue_changed()
        raise web.HTTPSeeOther(where)

    # --- logging in and out ---------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        return web.Response(text=page.login(None), content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        form = await _form(request)
        token = str(form.get("token", "")).strip()
        if self.keys.open:
            raise web.HTTPSeeOther("/")
        self._per_minute(self.wrong_tokens, WRONG_TOKENS_PER_MINUTE, request, "Too many wrong tokens", count=False)
        access = self.keys.resolve(token)
        if access is None:
            self._wrong_token(request)
            return web.Response(text=page.login("Wrong token."), content_type="text/html", status=401)
        response = web.HTTPSeeOther("/" if access.may_view else "/metrics")
        self._set_cookie(response, request, self.sessions.new(token))
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        form = await _form(request)
        if session is not None:
            if not session.csrf_ok(form.get("csrf")):
                raise web.HTTPForbidden(text="stale or missing form token\n")
            self.sessions.drop(session.id)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response


def _subject(spec_json: bytes | None) -> str | None:
    """A stored message's subject: its spec's, or a raw message's Subject header."""
    if spec_json is None:
        return None
    try:
        spec = MessageSpec.from_json(spec_json)
    except (ValueError, TypeError, KeyError):
        return None
    if spec.subject is not None:
        return spec.subject
    if spec.raw is not None:
        head = spec.raw.split("\n\n", 1)[0]
        return HeaderParser(policy=default_policy).parsestr(head).get("subject")
    return None

