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
  reason of those that did not send every recipient. The delivery child
  counts them from its own records once the spool has each, and sends
  what it counted at most once a second (delivery/figures.py,
  DeliveryProcess.figures): the records pass through the daemon unread.
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

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector

from smtpgate.delivery.figures import RESULTS, DeliveryFigures, Histogram
from smtpgate.spool.schema import STATES

# Seconds. A hand-off is an fsync away (0.5 to 20 ms on the disks of
# anchors/); a delivery from a second (a near upstream) to days (retries).
HANDOFF_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def histogram(name: str, doc: str, counts: Histogram) -> HistogramMetricFamily:
    buckets, total = [], 0
    for bound, count in zip((*map(str, counts.bounds), "+Inf"), counts.counts, strict=True):
        total += count
        buckets.append((bound, total))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=counts.sum)


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

    out.append(histogram("smtpgate_handoff_seconds",
                         "A stored SEND's time from its request line to its OK, on the line door.", handoff))
    out.append(histogram("smtpgate_delivery_seconds",
                         "A sent message's time from its acceptance to the attempt that sent it.", delivery.seconds))

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
