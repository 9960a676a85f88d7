"""Standard Webhooks signatures (https://www.standardwebhooks.com, "Signature
scheme" and "Webhook headers"), symmetric: HMAC-SHA256 under a secret
shown as `whsec_` and its base64, over `{webhook-id}.{webhook-timestamp}.{body}`,
sent as `webhook-signature: v1,<base64 of the MAC>`. While a secret is
being changed, a request is signed with each of two (the header holds both
signatures, space-separated) and a receiver accepts it with either.

The timestamp is that of the attempt, not of the event: a receiver rejects
one outside its tolerance (5 minutes in the reference libraries), so a
captured request cannot be replayed later. The id stays the same at every
try: it is the receiver's idempotency key.
"""

from __future__ import annotations

import base64
import binascii
import hmac

PREFIX = "whsec_"
# The spec: "Random. At least 24 bytes (192 bits, 512 maximum)".
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64


def parse_secret(text: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError says what is wrong
    (never showing the secret)."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise ValueError("a webhook secret starts with whsec_ (make one with: "
                         "echo whsec_$(openssl rand -base64 32))")
    try:
        key = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ and base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"a webhook secret holds {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes, "
                         f"this one {len(key)}")
    return key


def parse_secrets(text: str) -> tuple[bytes, ...]:
    """The keys of a secret file: one secret a line, two while it is being
    changed (the new one and the old one); ValueError as parse_secret."""
    keys = tuple(parse_secret(line) for line in text.splitlines() if line.strip())
    if not keys:
        raise ValueError("holds no secret")
    return keys


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """One signature: v1, and the base64 of the MAC."""
    mac = hmac.digest(key, f"{event_id}.{timestamp}.".encode() + body, "sha256")  # one C call, no HMAC object
    return "v1," + base64.b64encode(mac).decode()


def headers(keys: tuple[bytes, ...], event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt, signed with each key."""
    return {"webhook-id": event_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(signature(key, event_id, timestamp, body) for key in keys)}
