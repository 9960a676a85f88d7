"""The hand-off: what happens to a message between a front door and the
spool, whichever door it came in by (line_door.py: SEND; smtp_door.py:
DATA).

    identify the caller (a token) -> validate (in a thread past LARGE_REQUEST)
    -> apply the policy (allowed senders and recipients) -> enqueue, durable
    -> wake delivery -> the door answers `OK <id>` or `250 ... queued as <id>`

A refusal is a RequestError with the protocol's code (PROTOCOL.md): what
validation or the policy refuses, BUSY when the spool is full, INTERNAL
when the spool failed; nothing is stored then. For the line door this is
the hot path: no task, no future of its own, no turn of the event loop
between the spool's commit and the call of `done`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Callable, Sequence

from smtpgate.config import Config
from smtpgate.message.spec import MessageSpec, RequestError, raw_send
from smtpgate.message.validate import validate_send
from smtpgate.protocol import codes
from smtpgate.spool.errors import SpoolFull
from smtpgate.spool.ops import Enqueued

# Requests (a SEND's argument, an SMTP message) of more characters than this
# are validated in a thread: decoding and checking megabytes of attachments
# takes tens of milliseconds, which on the loop would stall every connection.
LARGE_REQUEST = 256 * 1024

_SPOOL_FAILED = "nothing stored: the spool failed; see the daemon's log"

# What `done` receives: the stored message, or why nothing was stored.
Done = Callable[[Enqueued | RequestError], None]


def token_matches(secret: bytes, tokens: Sequence[str]) -> bool:
    """True if `secret` equals one of `tokens`, compared in constant time.

    Every token is compared (no early exit), so the time taken does not
    tell which token, or how much of one, matched.
    """
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(secret, token.encode("utf-8"))
    return matched


def _address_allowed(address: str, patterns: list[str]) -> bool:
    """`patterns` holds full addresses or "@domain"; empty means everything."""
    if not patterns:
        return True
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p.lower() in (address, domain) for p in patterns)


def check_policy(config: Config, spec: MessageSpec) -> None:
    """Raise RequestError(DENIED) for a sender or a recipient the configuration does not allow."""
    if not _address_allowed(spec.envelope_from, config.allowed_senders):
        raise RequestError(codes.DENIED, f"sender {spec.envelope_from} is not allowed")
    for rcpt in spec.recipients:
        if not _address_allowed(rcpt, config.allowed_recipients):
            raise RequestError(codes.DENIED, f"recipient {rcpt} is not allowed")


class Handoff:
    """The hand-off of the daemon's doors to its spool and delivery. `config`
    is read at each request, so a reload applies at once."""

    def __init__(self, config: Config, spool, delivery, log):
        self.config = config
        self.spool = spool
        self.delivery = delivery
        self.log = log

    # -- the caller ----------------------------------------------------------

    def authenticate(self, secret: bytes) -> bool:
        """Whether `secret` is one of the client tokens."""
        return token_matches(secret, self.config.tokens)

    # -- a message -----------------------------------------------------------

    def take_send(self, arg: str | None, done: Done) -> None:
        """A SEND's argument (PROTOCOL.md): check it and store it. Raises
        RequestError at once for what is refused before anything is stored
        (`done` is not called then); otherwise `done` gets the Enqueued once
        it is durable, or the RequestError that refused it."""
        self._take(len(arg or ""), done, self.check_send, arg)

    async def take_raw(self, envelope_from: str, recipients: list[str], data: bytes) -> str:
        """A message as SMTP carries it (the SMTP door's enqueue): the id once
        it is durable; raises RequestError when it is refused."""
        stored = asyncio.get_running_loop().create_future()

        def done(result: Enqueued | RequestError) -> None:
            if not stored.done():  # else the SMTP session ended while we stored
                stored.set_result(result)

        self._take(len(data), done, self.check_raw, envelope_from, recipients, data)
        result = await stored
        if isinstance(result, RequestError):
            raise result
        return result.id

    def check_send(self, arg: str | None) -> MessageSpec:
        """A SEND's JSON argument, validated and allowed; or RequestError."""
        try:
            obj = json.loads(arg or "")
        except ValueError as exc:
            raise RequestError(codes.BAD_REQUEST, f"SEND needs one JSON object: {exc}") from None
        except RecursionError:  # "[[[[..." thousands deep: hostile, not a message
            raise RequestError(codes.BAD_REQUEST, "SEND JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise RequestError(codes.BAD_REQUEST, "SEND needs one JSON object")
        return self._check(obj)

    def check_raw(self, envelope_from: str, recipients: list[str], data: bytes) -> MessageSpec:
        """A raw message and its envelope, validated as a raw SEND and allowed; or RequestError."""
        return self._check(raw_send(envelope_from, recipients, data))

    def _check(self, obj: dict) -> MessageSpec:
        config = self.config
        spec = validate_send(obj, max_message_bytes=config.max_message_size,
                             message_id_domain=config.message_id_domain or None)
        check_policy(config, spec)
        return spec

    def _take(self, size: int, done: Done, check: Callable[..., MessageSpec], *args) -> None:
        if size > LARGE_REQUEST:
            checked = asyncio.ensure_future(asyncio.to_thread(check, *args))
            checked.add_done_callback(lambda fut: self._checked(fut, done))
        else:
            self._store(check(*args), done)

    def _checked(self, fut: asyncio.Future, done: Done) -> None:
        """A large request came back from its thread: store it, or say why not."""
        exc = fut.exception()
        if exc is None:
            try:
                self._store(fut.result(), done)
            except RequestError as refused:
                done(refused)
        elif isinstance(exc, RequestError):
            done(exc)
        else:
            self.log.error("validation_failed", error=repr(exc))
            done(RequestError(codes.INTERNAL, "nothing stored: the daemon failed; see its log"))

    def _store(self, spec: MessageSpec, done: Done) -> None:
        """Enqueue; `done` follows the commit. Raises RequestError when the spool refuses at once."""
        try:
            fut = self.spool.enqueue(spec.to_json(), spec.envelope_from, spec.recipients, spec.idempotency_key)
        except SpoolFull as exc:
            raise RequestError(codes.BUSY, f"nothing stored: {exc}") from None
        except Exception:
            self.log.exception("enqueue_failed")
            raise RequestError(codes.INTERNAL, _SPOOL_FAILED) from None
        fut.add_done_callback(lambda stored: self._stored(stored, done))

    def _stored(self, fut: asyncio.Future, done: Done) -> None:
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is None:
            enqueued = fut.result()
            if not enqueued.existing:
                self.delivery.wake()
            done(enqueued)
        elif isinstance(exc, SpoolFull):
            done(RequestError(codes.BUSY, f"nothing stored: {exc}"))
        else:
            self.log.error("enqueue_failed", error=repr(exc))
            done(RequestError(codes.INTERNAL, _SPOOL_FAILED))
