"""Delivery's settings, built from the configuration by daemon.delivery_settings()."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from smtpgate.smtp import UpstreamSettings
    from smtpgate.webhooks.sender import WebhookSettings


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    """What delivery needs from the configuration."""

    upstreams: Sequence[UpstreamSettings]
    connections_per_upstream: int = 10
    workers: int | None = None  # concurrent deliveries; None: twice connections_per_upstream
    max_age: float = 5 * 86400.0  # seconds after acceptance before pending recipients fail
    retry_base: float = 60.0  # first retry after about this long, doubling each time
    retry_max: float = 3600.0  # cap of the retry interval
    rate_per_minute: float = 0  # messages per minute per upstream; 0: no limit
    rate_burst: int = 1  # messages that may go at once after a quiet spell
    idle_noop_after: float = 5.0  # NOOP a pooled connection idle longer than this
    idle_timeout: float = 60.0  # QUIT a pooled connection idle this long
    probe_base: float = 1.0  # first probe of a down upstream after about this long, doubling
    probe_max: float = 300.0  # cap of the probe interval
    nice: int = 10  # the delivery process's priority below intake's (os.nice), set when it starts
    webhooks: WebhookSettings | None = None  # the webhook sender's, which runs beside delivery
    figures: bool = False  # count what the attempts tell /metrics (the HTTP side runs): process.Figures

    @property
    def worker_count(self) -> int:
        # Twice the connections: with every connection busy, a worker's
        # message is pipelined behind another's final dot (delivery/pool.py).
        return self.workers if self.workers is not None else 2 * self.connections_per_upstream
