"""The retry policy: what an attempt's replies mean for each recipient, when
to try again, and when to give up. Pure functions, no I/O.

A 2xx sends a recipient, a 5xx fails it, a 4xx (or a lost connection)
defers it; retries back off exponentially with jitter until `max_age`
after the message was accepted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpgate.delivery.settings import DeliverySettings
from smtpgate.spool.ops import RecipientOutcome
from smtpgate.spool.schema import State

if TYPE_CHECKING:
    from smtpgate.smtp import DeliveryResult


def retry_delay(attempts: int, base: float, cap: float, rand: float) -> float:
    """Seconds before the next attempt after `attempts` (>= 1) failed ones:
    base * 2**(attempts-1), capped, with "equal jitter" (rand in [0, 1) picks
    a point in the upper half) so retries of many messages spread out but
    never come sooner than half the nominal interval."""
    nominal = min(cap, base * 2 ** min(attempts - 1, 62))
    return nominal / 2 + rand * nominal / 2


def next_attempt_at(now: float, created: float, attempts: int, settings: DeliverySettings, rand: float) -> float | None:
    """When to try again after `attempts` attempts, or None to give up
    (max_age reached). The last retry is placed at the max age itself, so a
    message gets its final chance rather than failing early."""
    deadline = created + settings.max_age
    if now >= deadline:
        return None
    return min(now + retry_delay(attempts, settings.retry_base, settings.retry_max, rand), deadline)


def outcomes_from_result(result: DeliveryResult) -> list[RecipientOutcome]:
    """Per-recipient outcomes of one transaction: 2xx sent, 5xx failed, 4xx deferred."""
    return [RecipientOutcome(r.address, _STATES[r.status], str(r.reply)) for r in result.recipients]


_STATES = {"accepted": State.SENT, "permanent": State.FAILED, "temporary": State.DEFERRED}


def gave_up(reply: str | None, max_age: float) -> str:
    """The reply of a recipient failed at its max age: the last reply, and why."""
    return f"{reply or 'no reply'} (smtpgate: gave up after max_age {max_age:g} s)"


def give_up(outcomes: list[RecipientOutcome], max_age: float) -> list[RecipientOutcome]:
    """Fail the still-deferred recipients of a message past its max age,
    keeping the upstream's last reply in the text."""
    return [
        RecipientOutcome(o.address, State.FAILED, gave_up(o.reply, max_age)) if o.state == State.DEFERRED else o
        for o in outcomes
    ]
