"""Limits before trust: what a peer may cost the daemon before it is known,
shared by both doors (docs/security.md has the table of limits).

- Connections (`Gate`, one per door): at most `max_connections` open on the
  door, at most `max_connections_per_peer` from one peer (peer.py), checked
  by acceptor.py on the accepted socket, before a protocol exists.
- Stress (Postfix's stress-dependent timeouts): a door at STRESS_ON of its
  `max_connections` uses `stress_idle_timeout` and `stress_request_timeout`
  until it falls under STRESS_OFF, so that a flood of idle or slow sockets
  is cut within seconds and real clients get in. One log line each way.
- Bytes in flight (`Limits.inflight`): the request bytes both doors hold
  (partial request lines, SENDs until their reply, SMTP DATA until its
  reply), against `Config.inflight_budget`. Past it a new SEND gets `ERR
  BUSY`; the doors add and subtract plain integers on this attribute.
- Failed AUTHs: MAX_AUTH_FAILURES on one connection close it; they are
  logged at most once per peer a minute, with the count.
"""

from __future__ import annotations

import time

from smtpgate.intake.peer import Peer

STRESS_ON = 0.8    # of max_connections: stress mode begins
STRESS_OFF = 0.7   # and ends below this (a gap, so that it does not flap)
MAX_AUTH_FAILURES = 3
LOG_INTERVAL = 60.0  # seconds: one line per peer (or door) and reason at most
# A line door connection that has not authenticated holds at most this much
# of a request line: `AUTH` and a token fit many times over. A partial line
# this short is also never dropped for the budget (it is at most this times
# max_connections in all), so that PING and STATUS go on under a full budget.
SMALL_LINE = 4096


class Refused(Exception):
    """A connection the gate does not admit; str() is the reason for the peer."""


class Throttle:
    """Rate-limits log lines: at most one per key per `interval` seconds,
    with the count of events since the previous line."""

    def __init__(self, interval: float = LOG_INTERVAL, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._seen: dict = {}  # key -> [time of the last line, events since]

    def __call__(self, key) -> int:
        """0: stay quiet; n > 0: log now, n events since the last line (this one included)."""
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None:
            if len(self._seen) >= 10_000:  # many peers: forget the quiet ones
                self._seen = {k: e for k, e in self._seen.items() if now - e[0] < self.interval}
            self._seen[key] = [now, 0]
            return 1
        entry[1] += 1
        if now - entry[0] < self.interval:
            return 0
        count, entry[0], entry[1] = entry[1], now, 0
        return count


class Limits:
    """The limits both doors share; `config` is read at each use, so a reload applies."""

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.inflight = 0  # request bytes held by both doors now
        self.counters = {"refused_connections": 0, "refused_out_of_descriptors": 0,
                         "auth_failures": 0, "auth_closed": 0, "busy_budget": 0,
                         "preauth_too_long": 0, "request_timeouts": 0}
        self.gates: dict[str, Gate] = {}
        self.throttle = Throttle()

    def gate(self, door: str) -> Gate:
        """The connection gate of `door` ("line" or "smtp"), made on first use."""
        if door not in self.gates:
            self.gates[door] = Gate(self, door)
        return self.gates[door]

    def budget_allows(self, size: int) -> bool:
        """Whether `size` more request bytes fit in the budget now."""
        return self.inflight + size <= self.config.inflight_budget

    def refuse_over_budget(self) -> None:
        self.counters["busy_budget"] += 1
        if count := self.throttle("budget"):
            self.log.warning("inflight_budget_full", inflight=self.inflight,
                             budget=self.config.inflight_budget, refused=count)

    def auth_failed(self, door: str, peer: Peer, caller: str | None = None) -> None:
        """A wrong token; `caller`: who the connection was before it (None: nobody yet)."""
        self.counters["auth_failures"] += 1
        if count := self.throttle(("auth", door, peer.key)):
            self.log.warning("auth_failed", door=door, peer=str(peer), failures=count, caller=caller)

    def stats(self) -> dict:
        """STATS `limits`: the figures of this module (new keys only, never reshaped)."""
        return {"inflight_bytes": self.inflight, "inflight_budget": self.config.inflight_budget,
                "connections": {name: g.count for name, g in self.gates.items()},
                "stressed": sorted(name for name, g in self.gates.items() if g.stressed),
                **self.counters}


class Slot:
    """One admitted connection; release() gives its place back (once)."""

    __slots__ = ("gate", "peer")

    def __init__(self, gate: Gate, peer: Peer):
        self.gate, self.peer = gate, peer

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.release(self.peer)


class Gate:
    """The connections of one door: how many, from whom, and whether it is under stress."""

    def __init__(self, limits: Limits, door: str):
        self.limits = limits
        self.door = door
        self.count = 0
        self.per_peer: dict[tuple, int] = {}
        self.stressed = False
        self.on_stress = None  # the door's callback to shorten its open connections' timers

    def admit(self, peer: Peer) -> Slot:
        """Take a place for a connection from `peer`, or raise Refused."""
        config = self.limits.config
        key = peer.key
        if self.count >= config.max_connections:
            self._refused(peer, "too many connections")
        if self.per_peer.get(key, 0) >= config.max_connections_per_peer:
            self._refused(peer, "too many connections from this peer")
        self.per_peer[key] = self.per_peer.get(key, 0) + 1
        self.count += 1
        if not self.stressed and self.count >= STRESS_ON * config.max_connections:
            self._set_stress(True)
        return Slot(self, peer)

    def release(self, peer: Peer) -> None:
        key = peer.key
        left = self.per_peer[key] - 1
        if left:
            self.per_peer[key] = left
        else:
            del self.per_peer[key]
        self.count -= 1
        if self.stressed and self.count < STRESS_OFF * self.limits.config.max_connections:
            self._set_stress(False)

    def _refused(self, peer: Peer, why: str):
        self.limits.counters["refused_connections"] += 1
        if count := self.limits.throttle(("refused", self.door, peer.key, why)):
            self.limits.log.warning("connection_refused", door=self.door, peer=str(peer),
                                    reason=why, refused=count)
        raise Refused(why)

    def _set_stress(self, on: bool) -> None:
        config = self.limits.config
        self.stressed = on
        self.limits.log.warning("stress_mode_on" if on else "stress_mode_off", door=self.door,
                                connections=self.count, max_connections=config.max_connections,
                                idle_timeout=self.idle_timeout, request_timeout=self.request_timeout)
        if on and self.on_stress is not None:
            self.on_stress()

    @property
    def idle_timeout(self) -> float:
        return self._timeout("idle_timeout", "stress_idle_timeout")

    @property
    def request_timeout(self) -> float:
        return self._timeout("request_timeout", "stress_request_timeout")

    def _timeout(self, key: str, stress_key: str) -> float:
        config = self.limits.config
        if self.stressed:
            return min(getattr(config, key), getattr(config, stress_key))
        return getattr(config, key)
