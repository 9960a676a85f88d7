"""ULIDs (github.com/ulid/spec): 48 bits of milliseconds then 80 random
bits, 26 characters of Crockford's base32, so ids sort by creation time to
the millisecond and never collide. Message ids in the spool, and the left
part of the Message-ID header of a composed message.

Every id draws its 80 bits afresh, also within one millisecond: the spec's
"monotonic" variant (the random part plus one) would make the next id of
another caller one guess away from one's own. So ids made in the same
millisecond are in no particular order; nothing orders by id within a
millisecond (claims go by next_attempt, `queue list` by created time).
"""

from __future__ import annotations

import os

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two characters per 10 bits: 13 lookups for 26 characters (130 bits, the
# top two always 0) instead of 26, which halves the cost of an id (one is
# made per SEND in the daemon, for its Message-ID, and one in the writer).
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = tuple(range(120, -1, -10))


def _encode(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def new_ulid(now: float) -> str:
    """A ULID for `now` (unix seconds) with 80 fresh random bits from the
    kernel's CSPRNG; no state, so any thread may call it."""
    return _encode(int(now * 1000), int.from_bytes(os.urandom(10), "big"))


_TO_BASE32 = str.maketrans(_CROCKFORD, "0123456789ABCDEFGHIJKLMNOPQRSTUV")  # int()'s base-32 digits


def ulid_seconds(ulid: str) -> float:
    """The creation time (unix seconds, to the millisecond) of `ulid`, an
    id this package made: /metrics reads it from the record of every sent
    message (0.6 us by translate() and int() against 1.5 by a loop of
    index() here)."""
    # 50 bits, the top two 0: the 48 of the milliseconds
    return int(ulid[:10].translate(_TO_BASE32), 32) / 1000
