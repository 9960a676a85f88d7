"""/metrics: the daemon's figures in the Prometheus text format.

Nothing is counted for Prometheus on the way of a message: at each scrape
the figures the daemon keeps anyway (the STATS payload, PROTOCOL.md, with
each caller's messages delivered, failed and deferred as the spool's
writer counts them) are turned into metric families by `families`, and
prometheus_client writes them out. The only additions are two histograms
and a few counts, kept only while the HTTP side runs:
- hand-off latency: a SEND's request line to its `OK <id>` (the line
  door observes it: two clock reads and a bisect over 14 bounds, 0.8 us
  a SEND beside the daemon's ~175-205 us, bench/results.md);
- delivery latency: a message's creation (its ULID's time) to the attempt
  that sent it, and each recipient's outcome of every attempt by the
  class of its reply (2xx, 4xx, 5xx, or none: no SMTP reply, such as a
  refused connection), and each attempt's result per upstream and the
  reason of those that did not send every recipient. They come from the
  delivery child's own records, which carry the upstream and the reason
  and pass through the daemon on their way to the spool, packed; the
  daemon unpacks them only while the HTTP side runs
  (DeliveryProcess.on_record), and counts each once, after its commit: a
  dict increment or two per attempt.
SMTP sessions set up per upstream, and those that could not be by
reason, come from the child's `Sessions` messages, which the daemon adds up
whether the HTTP side runs or not (DeliveryProcess.sessions: at most one
message a second, a count per session, not per message).

Labels are bounded by the configuration: callers (configured), upstreams
(configured), states, protocol codes, reply classes, results, reasons
(delivery.health.REASONS); never an id or an address.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from smtpgate.spool.ops import RecordAttempt
from smtpgate.spool.schema import STATES, State
from smtpgate.spool.ulid import ulid_seconds

# Seconds. A hand-off is an fsync away (0.5 to 20 ms on the disks of
# anchors/); a delivery from a second (a near upstream) to days (retries).
HANDOFF_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
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

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def reply_class(reply: str | None) -> str:
    """2xx, 4xx, 5xx for an SMTP reply; none for what is not one."""
    if reply and len(reply) >= 3 and reply[:3].isdigit() and reply[0] in "245":
        return reply[0] + "xx"
    return "none"


class DeliveryFigures:
    """What the delivery child's records tell, counted as they pass."""

    def __init__(self) -> None:
        self.seconds = Histogram(DELIVERY_BOUNDS)
        self.outcomes = {(state, cls): 0 for state in (State.SENT, State.DEFERRED, State.FAILED)
                         for cls in REPLY_CLASSES}
        self.upstream_results: dict[tuple[str, str], int] = {}  # (upstream, RESULTS value) -> attempts
        self.failures: dict[tuple[str, str], int] = {}  # (upstream, health.REASONS word) -> attempts

    def record(self, op: RecordAttempt, state: str | None) -> None:
        """One attempt, once the spool has it, and the message's new state
        (DeliveryProcess.on_record)."""
        for outcome in op.outcomes:
            key = (outcome.state, reply_class(outcome.reply))
            if key in self.outcomes:
                self.outcomes[key] += 1
        if state == State.SENT:
            self.seconds.observe(max(0.0, op.now - ulid_seconds(op.msg_id)))
        upstream = op.upstream
        if upstream is not None and state is not None:  # None: deleted meanwhile
            key = (upstream, RESULTS[state])
            self.upstream_results[key] = self.upstream_results.get(key, 0) + 1
            if op.reason is not None:
                key = (upstream, op.reason)
                self.failures[key] = self.failures.get(key, 0) + 1


class Snapshot:
    """A collector of families made beforehand (generate_latest takes any
    object with collect())."""

    def __init__(self, families: list):
        self._families = families

    def collect(self):
        return self._families


class _ProcessCollector(ProcessCollector):
    """prometheus-client's, with the boot time from CLOCK_BOOTTIME where
    /proc/stat cannot be read: without one it reports nothing, and the
    unit's ProcSubset=pid hides /proc/stat (the process's own files stay)."""

    def _boot_time(self):
        try:
            return super()._boot_time()
        except OSError:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


_process = _ProcessCollector(registry=None)  # process_cpu_seconds_total, process_resident_memory_bytes, ...


def families(stats: dict, *, oldest_due: float | None, now: float, handoff: Histogram,
             delivery: DeliveryFigures, sessions: dict[tuple[str, str | None], int]) -> list:
    """The metric families of the STATS payload `stats`, the HTTP side's own
    figures, and the delivery child's `sessions` (DeliveryProcess.sessions)."""
    out = [*_process.collect()]

    def gauge(name, doc, value=None, labels=(), samples=()):
        family = GaugeMetricFamily(name, doc, value=value, labels=labels or None)
        for label_values, v in samples:
            family.add_metric(label_values, v)
        out.append(family)

    def counter(name, doc, value=None, labels=(), samples=()):
        family = CounterMetricFamily(name, doc, value=value, labels=labels or None)
        for label_values, v in samples:
            family.add_metric(label_values, v)
        out.append(family)

    gauge("smtpgate_build_info", "The running version (always 1).", labels=("version", "protocol"),
          samples=[((stats["version"], stats["protocol"]), 1)])
    gauge("smtpgate_start_time_seconds", "When the daemon started, unix seconds.",
          value=now - stats["uptime"])

    callers = stats["callers"]
    counter("smtpgate_messages_accepted", "Messages stored since start, per caller.", labels=("caller",),
            samples=[((name, ), c["accepted"]) for name, c in callers.items()])
    counter("smtpgate_sends_refused", "SENDs (and SMTP messages) refused since start, per caller and code.",
            labels=("caller", "code"),
            samples=[((name, code), n) for name, c in callers.items() for code, n in c["refused"].items()])
    gauge("smtpgate_caller_pending_messages", "Messages not yet final, per caller.", labels=("caller",),
          samples=[((name, ), c["pending"]) for name, c in callers.items()])
    counter("smtpgate_caller_messages", "Messages delivered and failed, and attempts that left a message "
            "deferred, since start, per caller.", labels=("caller", "result"),
            samples=[((name, result), c[result]) for name, c in callers.items() for result in RESULTS.values()])

    counters = stats["counters"]
    counter("smtpgate_messages_delivered", "Messages sent to every recipient since start.",
            value=counters["delivered"])
    counter("smtpgate_messages_failed", "Messages that failed (a recipient refused, or too old) since start.",
            value=counters["failed"])
    counter("smtpgate_messages_deferred", "Delivery attempts that left a message deferred since start.",
            value=counters["deferred"])
    counter("smtpgate_recipient_attempts",
            "Each recipient's outcome of each delivery attempt since start, by the class of its reply "
            "(none: no SMTP reply, such as a refused connection or a timeout).",
            labels=("result", "reply"), samples=[(key, n) for key, n in delivery.outcomes.items()])

    gauge("smtpgate_queue_messages", "Messages in the spool, per state.", labels=("state",),
          samples=[((state, ), stats["states"].get(state, 0)) for state in STATES])
    gauge("smtpgate_queue_oldest_age_seconds", "Age of the oldest message waiting (queued or deferred); "
          "0 when none waits.", value=0.0 if oldest_due is None else max(0.0, now - oldest_due))

    out.append(handoff.family("smtpgate_handoff_seconds",
                              "A stored SEND's time from its request line to its OK, on the line door."))
    out.append(delivery.seconds.family("smtpgate_delivery_seconds",
                                       "A sent message's time from its acceptance to the attempt that sent it."))

    upstreams = stats["upstreams"]
    gauge("smtpgate_upstream_up", "1 while the upstream takes mail, 0 while it is down "
          "(not shown before its first connection).", labels=("upstream",),
          samples=[((u["name"], ), 1 if u["state"] == "up" else 0) for u in upstreams if u["state"] != "unknown"])
    gauge("smtpgate_upstream_failures", "Failed tries in a row of a down upstream (0 while up).",
          labels=("upstream",), samples=[((u["name"], ), u.get("failures", 0)) for u in upstreams])
    # Every upstream delivery knows has its series from 0 (rate() needs the start).
    known = [u["name"] for u in upstreams]
    results = {(name, result): 0 for name in known for result in RESULTS.values()}
    results.update(delivery.upstream_results)
    counter("smtpgate_upstream_messages", "Delivery attempts since start, per upstream that took them, by the "
            "message's state after each: delivered, deferred or failed.", labels=("upstream", "result"),
            samples=sorted(results.items()))
    opened = dict.fromkeys(known, 0)
    failures = dict(delivery.failures)
    for (name, reason), n in sessions.items():
        if reason is None:
            opened[name] = opened.get(name, 0) + n
        else:
            failures[name, reason] = failures.get((name, reason), 0) + n
    counter("smtpgate_upstream_sessions", "SMTP sessions set up (through EHLO, STARTTLS and AUTH) since start, "
            "per upstream.", labels=("upstream",), samples=[((name, ), n) for name, n in sorted(opened.items())])
    counter("smtpgate_delivery_failures", "Failures since start, per upstream and reason: sessions that could "
            "not be set up (probes included), and attempts that did not send every recipient.",
            labels=("upstream", "reason"), samples=sorted(failures.items()))

    spool = stats["spool"]
    counter("smtpgate_spool_commits", "Spool transactions committed since start.", value=spool["commits"])
    counter("smtpgate_spool_operations", "Spool writes committed since start (operations / commits: "
            "how many writes share an fsync).", value=spool["operations"])

    intake, limits = stats["intake"], stats["limits"]
    gauge("smtpgate_connections", "Open connections, per door.", labels=("door",),
          samples=[((door, ), n) for door, n in limits["connections"].items()])
    counter("smtpgate_connections_refused", "Connections refused by a connection cap since start.",
            value=limits["refused_connections"])
    counter("smtpgate_auth_failures", "Wrong tokens since start (every door and the HTTP side).",
            value=limits["auth_failures"])
    counter("smtpgate_requests", "Line protocol requests since start.", value=intake["requests"])
    gauge("smtpgate_inflight_bytes", "Request bytes held by the doors now.", value=limits["inflight_bytes"])

    webhooks = stats.get("webhooks")
    if webhooks is not None:
        counter("smtpgate_webhook_deliveries", "Webhook events since start, by result.", labels=("result",),
                samples=[(("delivered", ), webhooks["delivered"]), (("failed", ), webhooks["failed"])])
        counter("smtpgate_webhook_retries", "Webhook tries that failed (an answer other than 2xx, or none) and"
                " are made again, since start.", value=webhooks["retried"])
        gauge("smtpgate_webhook_pending", "Webhook events waiting in the outbox.", value=webhooks["pending"])
    return out
