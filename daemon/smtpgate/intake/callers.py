"""Callers: who is on the other end of a connection, and what it may do
(PROTOCOL.md, "Authentication and callers"; docs/callers.md).

A caller is one of:
- a token of `tokens`/`tokens_file`: each is a caller of its own, named
  "token-" and 12 hex digits of HMAC-SHA256(the spool's caller_key, token).
  Not by its position in the list: removing one line would hand the
  messages of every later token to the token before it. Not a plain hash:
  the name is in logs and STATS, and a hash of a weak token could be
  guessed back offline; the key lives in the spool (0600), with the mail.
- a named caller, a [callers.NAME] table: by a token of its token_file
  (either door), or on the Unix socket by the peer's uid and/or gid, which
  the kernel vouches for (SO_PEERCRED, intake/peer.py), so a PHP-FPM pool
  running as www-data needs no token.
- the anonymous caller, when no token and no caller is configured: every
  connection of such a daemon (loopback only, config.py) is it.
Once a token or a caller is configured, a connection that is none of
these must AUTH: a Unix peer whose uid and gid match no caller too.

Each caller has a policy (its own keys, else the top-level ones): allowed
senders (the envelope and the originator fields of the header,
message/originators.py), allowed recipients, sends per minute and per day
(answered BUSY with the time to wait; counted here, in memory, so a
restart forgets them), and max_pending, its messages not yet final
(counted by the spool's writer from the spool itself, so it survives a
restart; spool/writer.py).

A connection keeps its Caller object. A reload (`load`) updates the
policies of the callers that remain in place and revokes the others, so
open connections follow the new configuration at their next request.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math

from smtpgate.config import CallerConfig, Config
from smtpgate.intake.peer import Peer
from smtpgate.message.originators import originators
from smtpgate.message.spec import MessageSpec, RequestError
from smtpgate.protocol import codes
from smtpgate.spool.schema import ANONYMOUS_CALLER

ANONYMOUS = ANONYMOUS_CALLER


class CallerBusy(RequestError):
    """BUSY for one caller's own limit (its rate or its max_pending): the
    others may still send. The SMTP door answers it 451 4.7.1."""

    def __init__(self, text: str):
        super().__init__(codes.BUSY, text)


def _domain_key(domain: str) -> str:
    """A domain as compared: lower case, and in its ASCII form (validation
    gives an IDN as xn--, or as U-labels when the local part is UTF-8)."""
    domain = domain.lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _address_key(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local.lower(), _domain_key(domain)


class AddressList:
    """Allowed addresses: full addresses or "@domain", case-insensitive."""

    __slots__ = ("addresses", "domains")

    def __init__(self, patterns: list[str]):
        self.addresses = {_address_key(p) for p in patterns if not p.startswith("@")}
        self.domains = {_domain_key(p[1:]) for p in patterns if p.startswith("@")}

    def allows(self, address: str) -> bool:
        key = _address_key(address)
        return key[1] in self.domains or key in self.addresses


class Policy:
    """What one caller may do: its own keys, else the configuration's."""

    __slots__ = ("senders", "recipients", "restricts", "sends_per_minute", "sends_per_day", "max_pending")

    def __init__(self, config: Config, own: CallerConfig | None = None):
        def pick(key):
            value = getattr(own, key) if own is not None else None
            return getattr(config, key) if value is None else value

        # None: every address is allowed (an empty list in the configuration).
        self.senders = AddressList(pick("allowed_senders")) if pick("allowed_senders") else None
        self.recipients = AddressList(pick("allowed_recipients")) if pick("allowed_recipients") else None
        self.restricts = self.senders is not None or self.recipients is not None
        self.sends_per_minute = pick("sends_per_minute")
        self.sends_per_day = pick("sends_per_day")
        self.max_pending = pick("max_pending")

    def sender_allowed(self, address: str) -> bool:
        """The envelope sender alone (the SMTP door's MAIL FROM)."""
        return self.senders is None or self.senders.allows(address)

    def recipient_allowed(self, address: str) -> bool:
        return self.recipients is None or self.recipients.allows(address)

    def check(self, spec: MessageSpec) -> None:
        """Raise RequestError(DENIED) for a sender (envelope, or in the
        header's originator fields) or a recipient the policy does not allow."""
        senders = self.senders
        if senders is not None:
            if not senders.allows(spec.envelope_from):
                raise RequestError(codes.DENIED, f"sender {spec.envelope_from} is not allowed")
            for address in originators(spec):
                if not senders.allows(address):
                    raise RequestError(codes.DENIED, f"header sender {address[:254]} is not allowed")
        if self.recipients is not None:
            for rcpt in spec.recipients:
                if not self.recipients.allows(rcpt):
                    raise RequestError(codes.DENIED, f"recipient {rcpt} is not allowed")


class SlidingCount:
    """At most `limit` events in any `span` seconds, counted in 60 steps of
    span/60 (1 s for a minute, 24 min for a day), so memory stays a few
    dozen pairs whatever the limit. An event counts for at least `span` and less than
    span + step: the limit holds in every window of `span`, at the price of
    freeing a slot up to one step late."""

    STEPS = 60
    __slots__ = ("limit", "span", "step", "buckets", "total")

    def __init__(self, limit: int, span: float):
        self.limit = limit
        self.span = span
        self.step = span / self.STEPS
        self.buckets: collections.deque[list[int]] = collections.deque()  # [step index, count], oldest first
        self.total = 0

    def wait(self, now: float) -> float:
        """Seconds until one more event fits (0.0: it fits now)."""
        if self.total < self.limit:  # (the total may still hold expired steps: never fewer)
            return 0.0
        self._expire(int(now // self.step))
        if self.total < self.limit:
            return 0.0
        buckets = self.buckets
        excess, freed = self.total - self.limit + 1, 0
        for i, n in buckets:
            freed += n
            if freed >= excess:
                return (i + self.STEPS + 1) * self.step - now
        return self.span  # not reached: the buckets hold the total

    def add(self, now: float) -> None:
        index = int(now // self.step)
        buckets = self.buckets
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += 1
        else:
            self._expire(index)  # once a step: the deque never holds more than STEPS + 2
            buckets.append([index, 1])
        self.total += 1

    def _expire(self, index: int) -> None:
        # Step i counts while index <= i + STEPS (the event may have come
        # at the very end of step i, which is span ago only at i + STEPS + 1).
        buckets = self.buckets
        while buckets and buckets[0][0] < index - self.STEPS:
            self.total -= buckets.popleft()[1]

    def remove_newest(self) -> None:
        """Take back the latest event (a SEND that stored nothing after all)."""
        if self.buckets:
            self.buckets[-1][1] -= 1
            self.total -= 1
            if not self.buckets[-1][1]:
                self.buckets.pop()


def _window(current: SlidingCount | None, limit: int, span: float) -> SlidingCount | None:
    """The window for a (new) limit, keeping what was counted."""
    if not limit:
        return None
    if current is None:
        return SlidingCount(limit, span)
    current.limit = limit
    return current


class Caller:
    """One caller: its name, its policy, its rate windows and its counts."""

    __slots__ = ("name", "policy", "revoked", "per_minute", "per_day", "accepted", "refused", "limited")

    def __init__(self, name: str):
        self.name = name
        self.policy: Policy | None = None
        self.revoked = False  # removed from the configuration by a reload
        self.per_minute: SlidingCount | None = None
        self.per_day: SlidingCount | None = None
        self.accepted = 0  # messages stored since start
        self.refused: dict[str, int] = {}  # SENDs refused since start, by code
        self.limited = False  # refused for its rate since its last accepted SEND

    def __repr__(self) -> str:
        return f"Caller({self.name!r})"

    def successor(self) -> "Caller":
        """The same caller under credentials a reload changed: its counts and
        rate windows go on, while this object, which the open connections
        hold, is revoked (they must show the new credentials)."""
        fresh = Caller(self.name)
        fresh.per_minute, fresh.per_day = self.per_minute, self.per_day
        fresh.accepted, fresh.refused, fresh.limited = self.accepted, self.refused, self.limited
        self.revoked = True
        return fresh

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.per_minute = _window(self.per_minute, policy.sends_per_minute, 60.0)
        self.per_day = _window(self.per_day, policy.sends_per_day, 86400.0)

    def take_send(self, now: float) -> None:
        """Count one SEND against the caller's rates (`now`: monotonic
        seconds), or raise CallerBusy with the time to wait."""
        for window, unit in ((self.per_minute, "min"), (self.per_day, "day")):
            if window is not None:
                wait = window.wait(now)
                if wait:
                    raise CallerBusy(f"rate limit {window.limit}/{unit} reached, retry in {math.ceil(wait)} s")
        for window in (self.per_minute, self.per_day):
            if window is not None:
                window.add(now)

    def give_back_send(self) -> None:
        """A SEND counted by take_send stored nothing (refused, or a repeat
        of an idempotency key): it does not count. The newest step is
        nearly always the one it was counted in, a few milliseconds ago."""
        for window in (self.per_minute, self.per_day):
            if window is not None:
                window.remove_newest()


class Callers:
    """The callers of the configuration, and how a connection finds its own.
    `key`: the spool's secret that names the unnamed tokens."""

    def __init__(self, config: Config, key: bytes):
        self.key = key
        self.by_name: dict[str, Caller] = {}
        self.anonymous: Caller | None = None
        self._tokens: list[tuple[bytes, Caller, bool]] = []  # (keyed digest of the token, caller, named)
        self._unix: dict[tuple[int | None, int | None], Caller] = {}
        self._credentials: dict[str, tuple] = {}  # by name: what identifies the caller (load)
        self.load(config)

    def _digest(self, token: bytes) -> bytes:
        return hmac.new(self.key, token, hashlib.sha256).digest()

    def token_name(self, token: str) -> str:
        """The name of an unnamed token's caller."""
        return "token-" + self._digest(token.encode()).hex()[:12]

    def load(self, config: Config) -> None:
        """Take the callers of `config` (at start, and at every reload): a
        caller still there keeps its object (and with it its connections,
        rate windows and counts) with the new policy; one gone is revoked,
        and so is the object of one whose tokens or uid and gid changed (a
        token taken away must not stay good on the connections that showed
        it: they find their caller again by what they showed, line_door.py).
        Raises ValueError if two unnamed tokens would get one name (a
        48-bit collision: not expected in this universe)."""
        default = Policy(config)
        wanted: dict[str, Policy] = {}
        tokens: list[tuple[bytes, str, bool]] = []
        unix: dict[tuple[int | None, int | None], str] = {}
        for token in config.tokens:
            name = self.token_name(token)
            if name in wanted:
                raise ValueError(f"tokens: two tokens have the name {name}; replace one")
            wanted[name] = default
            tokens.append((self._digest(token.encode()), name, False))
        for name, own in config.callers.items():
            wanted[name] = Policy(config, own)
            tokens += [(self._digest(token.encode()), name, True) for token in own.tokens]
            if own.uid is not None or own.gid is not None:
                unix[(own.uid, own.gid)] = name
        if not wanted:
            wanted[ANONYMOUS] = default
        credentials = {name: (frozenset(digest for digest, owner, _ in tokens if owner == name),
                              next((ids for ids, owner in unix.items() if owner == name), None))
                       for name in wanted}
        for name, caller in self.by_name.items():
            caller.revoked = name not in wanted
        by_name = {}
        for name, policy in wanted.items():
            caller = self.by_name.get(name) or Caller(name)
            if name in self._credentials and self._credentials[name] != credentials[name]:
                caller = caller.successor()
            caller.set_policy(policy)
            by_name[name] = caller
        self._credentials = credentials
        self.by_name = by_name
        self.anonymous = by_name.get(ANONYMOUS)
        self._tokens = [(digest, by_name[name], named) for digest, name, named in tokens]
        self._unix = {ids: by_name[name] for ids, name in unix.items()}

    @property
    def has_tokens(self) -> bool:
        """Whether AUTH can succeed at all."""
        return bool(self._tokens)

    def for_peer(self, peer: Peer) -> Caller | None:
        """The caller a new connection is before any AUTH: the anonymous
        caller of an open daemon, a Unix peer's caller by its uid and gid
        (exactly, then by uid alone, then by gid alone); None: it must AUTH."""
        if self.anonymous is not None:
            return self.anonymous
        if peer.uid is None or not self._unix:
            return None
        unix = self._unix
        return unix.get((peer.uid, peer.gid)) or unix.get((peer.uid, None)) or unix.get((None, peer.gid))

    def for_token(self, secret: bytes) -> Caller | None:
        """The caller whose token `secret` is, or None. Every token is
        compared, each as a keyed digest of the same length in constant
        time, so the time taken tells neither which token matched nor how
        long any is."""
        return self.for_digest(self._digest(secret))

    def digest(self, token: bytes) -> bytes:
        """What a connection keeps of the token it showed (for_digest)."""
        return self._digest(token)

    def for_digest(self, digest: bytes) -> Caller | None:
        """The caller whose token has this `digest`, or None (for_token)."""
        found = None
        for token_digest, caller, _ in self._tokens:
            if hmac.compare_digest(digest, token_digest):
                found = caller
        return found

    def for_login(self, user: str | None, secret: bytes) -> Caller | None:
        """SMTP AUTH (RFC 4954): the password is a token; the user is the
        caller's name for a named caller, and not checked for a token of
        `tokens` (whose name is derived, not chosen)."""
        digest = self._digest(secret)
        found = None
        for token_digest, caller, named in self._tokens:
            if hmac.compare_digest(digest, token_digest) and (not named or user == caller.name):
                found = caller
        return found

    def stats(self, pending: dict[str, int], counters: dict[str, dict[str, int]]) -> dict:
        """STATS `callers`: per configured caller (so its size is bounded by
        the configuration), messages stored and SENDs refused (by code)
        since start, its messages not yet final (`pending`: the spool's),
        and its messages delivered and failed and attempts deferred since
        start (`counters`: the spool's)."""
        none = {"delivered": 0, "failed": 0, "deferred": 0}
        return {name: {"accepted": caller.accepted, "refused": dict(caller.refused),
                       "pending": pending.get(name, 0), **counters.get(name, none)}
                for name, caller in self.by_name.items()}
