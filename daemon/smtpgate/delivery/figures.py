"""What delivery's attempts tell /metrics (http/metrics.py), counted in the
delivery process as each attempt's record comes back from the spool.

The daemon's loop runs every SEND, so it counts nothing per relayed
message: the delivery process counts, and sends what it counted since the
last time at most once a second (process.Figures), which the daemon adds
to its own DeliveryFigures. Unpacking each frame of attempt records in the
daemon to count them cost its loop about 7-8 us per relayed message while
the HTTP side ran (bench/results.md, "What the HTTP side itself costs the
daemon per relayed message"), and the records now pass through it unread.

Free of prometheus_client: the delivery process does not import it.
"""

from __future__ import annotations

from bisect import bisect_left

from smtpgate.spool.ops import RecordAttempt
from smtpgate.spool.schema import State
from smtpgate.spool.ulid import ulid_seconds

# Seconds: a delivery from a second (a near upstream) to days (retries).
DELIVERY_BOUNDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
REPLY_CLASSES = ("2xx", "4xx", "5xx", "none")
RESULTS = {State.SENT: "delivered", State.DEFERRED: "deferred", State.FAILED: "failed"}  # a message's state after an attempt


class Histogram:
    """Counts per bucket and a sum: observe() is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: Prometheus' le
        self.sum += value

    def add(self, other: Histogram) -> None:
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum


def reply_class(reply: str | None) -> str:
    """2xx, 4xx, 5xx for an SMTP reply; none for what is not one."""
    if reply and len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "245":
        return reply[0] + "xx"
    return "none"


class DeliveryFigures:
    """What delivery's records tell, counted as they pass."""

    def __init__(self) -> None:
        self.attempts = 0  # recorded here (not added from another)
        self.seconds = Histogram(DELIVERY_BOUNDS)
        self.outcomes = {(state, cls): 0 for state in (State.SENT, State.DEFERRED, State.FAILED)
                         for cls in REPLY_CLASSES}
        self.upstream_results: dict[tuple[str, str], int] = {}  # (upstream, RESULTS value) -> attempts
        self.failures: dict[tuple[str, str], int] = {}  # (upstream, health.REASONS word) -> attempts

    def record(self, op: RecordAttempt, state: str | None) -> None:
        """One attempt, once the spool has it, and the message's new state
        (None: the message was deleted meanwhile)."""
        self.attempts += 1
        for outcome in op.outcomes:
            key = (outcome.state, reply_class(outcome.reply))
            if key in self.outcomes:
                self.outcomes[key] += 1
        if state == State.SENT:
            self.seconds.observe(max(0.0, op.now - ulid_seconds(op.msg_id)))
        upstream = op.upstream
        if upstream is not None and state is not None:
            key = (upstream, RESULTS[state])
            self.upstream_results[key] = self.upstream_results.get(key, 0) + 1
            if op.reason is not None:
                key = (upstream, op.reason)
                self.failures[key] = self.failures.get(key, 0) + 1

    def add(self, other: DeliveryFigures) -> None:
        """Add what `other` counted (the delivery process's, process.Figures)."""
        self.seconds.add(other.seconds)
        for key, n in other.outcomes.items():
            self.outcomes[key] += n
        for mine, theirs in ((self.upstream_results, other.upstream_results), (self.failures, other.failures)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
