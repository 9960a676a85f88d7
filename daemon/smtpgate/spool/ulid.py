"""ULIDs (github.com/ulid/spec): 48 bits of milliseconds then 80 random
bits, 26 characters of Crockford's base32, so ids sort by creation time and
never collide. Message ids in the spool, and the left part of the
Message-ID header of a composed message."""

from __future__ import annotations

import os

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_MASK = (1 << 80) - 1
# Two characters per 10 bits: 13 lookups for 26 characters (130 bits, the
# top two always 0) instead of 26, which halves the cost of an id (one is
# made per SEND in the daemon, for its Message-ID, and one in the writer).
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = tuple(range(120, -1, -10))


def _encode(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def new_ulid(now: float) -> str:
    """A ULID for `now` (unix seconds) with fresh random bits; no state, so
    any thread may call it."""
    return _encode(int(now * 1000), int.from_bytes(os.urandom(10), "big"))


class UlidGenerator:
    """Monotonic ULIDs (the spec's "monotonicity"): within one millisecond
    (or when the clock steps back) the random part is incremented, so ids
    sort in creation order. For one thread (the spool writer's)."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now: float) -> str:
        ms = int(now * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_rand = (self._last_rand + 1) & _RANDOM_MASK
        else:
            self._last_ms = ms
            self._last_rand = int.from_bytes(os.urandom(10), "big")
        return _encode(ms, self._last_rand)
