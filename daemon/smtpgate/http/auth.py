"""Who an HTTP request is, and what it may do (docs/http.md, "Access").

- admin: a token of `http_admin_token_file`. Sees every message, may retry
  and delete (as the queue tool may), reads /metrics.
- metrics: a token of `http_metrics_token_file`. Reads /metrics only, so a
  Prometheus server holds no token that can touch mail.
- caller: a caller's token (intake/callers.py). Sees its own messages on
  the queue page, read-only: another caller's message is "not found", as
  STATUS says. Its figures are not its own to read in /metrics (they name
  every caller), so no /metrics.
- an open daemon (no token configured anywhere, so it listens on loopback
  only, config.py): every request is admin, as every connection of its
  line door may send and read everything. A page served on a loopback
  address must still refuse another site's hands: the Host must be a
  loopback name (DNS rebinding), and a change carries the session's CSRF
  token.

A token comes as `Authorization: Bearer` (curl, Prometheus), or once
through the login form, which makes a session: a random id in a cookie
(HttpOnly, SameSite=Strict) and a CSRF token of its own that every form of
the page carries (the synchronizer-token pattern). A session holds the
token it was made with and is resolved again at every request, so a
reload that removes a token ends its sessions too.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from typing import NamedTuple

from smtpgate.config import Config, has_tokens, is_loopback

ADMIN, METRICS, CALLER = "admin", "metrics", "caller"
SESSION_COOKIE = "smtpgate_session"
MAX_SESSIONS = 1000  # the oldest goes first: a flood of logins costs memory for this many
# Sessions of one token at most, its oldest going first: a caller's token
# logging in again and again ends its own sessions, not the admin's.
SESSIONS_PER_TOKEN = 16
SESSION_LIFETIME = 8 * 3600.0  # seconds: a working day, then log in again


class Access(NamedTuple):
    role: str
    caller: str | None = None  # a caller's name: the messages it may see

    @property
    def sees_all(self) -> bool:
        return self.role == ADMIN

    @property
    def may_view(self) -> bool:
        return self.role in (ADMIN, CALLER)

    @property
    def may_change(self) -> bool:
        return self.role == ADMIN

    @property
    def may_scrape(self) -> bool:
        return self.role in (ADMIN, METRICS)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Keys:
    """Tokens to Access; `config` and `callers` are read at each request,
    so a reload applies at once."""

    def __init__(self, config: Config, callers):
        self.config = config
        self.callers = callers

    @property
    def open(self) -> bool:
        """No token and no caller configured: the daemon's every door is
        loopback only and every connection of its line door is the
        anonymous caller, which may send and read everything. Callers known
        by their Unix user alone close it too: their line door refuses a
        connection that is none of them, and this side cannot tell who is
        on the other end of a TCP connection."""
        return not has_tokens(self.config) and not self.config.callers

    def resolve(self, token: str | None) -> Access | None:
        if self.open:
            return Access(ADMIN)
        if not token:
            return None
        digest, found = _digest(token), None
        # Every token compared in constant time: the time tells no prefix.
        for role, tokens in ((ADMIN, self.config.http_admin_tokens), (METRICS, self.config.http_metrics_tokens)):
            for known in tokens:
                if hmac.compare_digest(digest, _digest(known)):
                    found = Access(role)
        caller = self.callers.for_token(token.encode())  # a token is in one place only (config.py)
        return Access(CALLER, caller.name) if caller is not None else found


def host_is_loopback(host: str | None) -> bool:
    """Whether a Host header names this machine by a loopback name:
    localhost, 127.x, [::1], with or without a port."""
    if not host:
        return False
    if host.startswith("["):
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return is_loopback(name)


class Session(NamedTuple):
    id: str
    token: str | None  # None on an open daemon
    csrf: str
    expires: float  # time.monotonic()

    def csrf_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.csrf.encode())


class Sessions:
    """Logged-in browsers, in memory (a restart logs everyone out)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._by_id: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def new(self, token: str | None) -> Session:
        if token is not None:  # an open daemon's sessions are everyone's alike
            mine = [s.id for s in self._by_id.values() if s.token == token]  # oldest first
            for session_id in mine[:max(0, len(mine) - SESSIONS_PER_TOKEN + 1)]:
                del self._by_id[session_id]
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), token, secrets.token_urlsafe(32),
                          self.clock() + SESSION_LIFETIME)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id) if session_id else None
        if session is not None and session.expires < self.clock():
            del self._by_id[session.id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)
