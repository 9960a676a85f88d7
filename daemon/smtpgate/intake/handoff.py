"""The hand-off: what happens to a message between a front door and the
spool, whichever door it came in by (line_door.py: SEND; smtp_door.py:
DATA), for the caller the door identified (callers.py).

    validate (in a thread past LARGE_REQUEST) -> the caller's policy
    (allowed senders and recipients) -> its rate -> enqueue for the caller,
    durable (the spool's writer checks its max_pending) -> hand it to
    delivery (claimed by that same commit, while delivery has room for it
    and an upstream is not down), or else wake delivery -> the door
    answers `OK <id>` or `250 ... queued as <id>`

A refusal is a RequestError with the protocol's code (PROTOCOL.md): what
validation or the policy refuses, BUSY when the spool is full or the
caller over its rate or max_pending (CallerBusy), INTERNAL when the spool
failed; nothing is stored then. For the line door this is the hot path:
no task, no future of its own, no turn of the event loop between the
spool's commit and the call of `done`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

from smtpgate.config import Config
from smtpgate.intake.callers import Caller, CallerBusy, Callers
from smtpgate.message.spec import MessageSpec, RequestError, raw_send
from smtpgate.message.validate import validate_send
from smtpgate.protocol import codes
from smtpgate.spool.errors import CallerFull, SpoolFull
from smtpgate.spool.ops import Claimed, Enqueued, ReplyTo

# Requests (a SEND's argument, an SMTP message) of more characters than this
# are validated in a thread: decoding and checking megabytes of attachments
# takes tens of milliseconds, which on the loop would stall every connection.
LARGE_REQUEST = 256 * 1024

_SPOOL_FAILED = "nothing stored: the spool failed; see the daemon's log"

# What `done` receives: the stored message, or why nothing was stored.
Done = Callable[[Enqueued | RequestError], None]


class Handoff:
    """The hand-off of the daemon's doors to its spool and delivery. `config`
    is read at each request, so a reload applies at once; so are the
    callers, once the daemon calls `callers.load` with it."""

    def __init__(self, config: Config, spool, delivery, log):
        self.config = config
        self.spool = spool
        self.delivery = delivery
        self.log = log
        self.callers = Callers(config, spool.caller_key)

    # -- a message -----------------------------------------------------------

    def take_send(self, caller: Caller, arg: str | None, done: Done, reply_to: ReplyTo | None = None) -> None:
        """A SEND's argument (PROTOCOL.md) from `caller`: check it and store
        it. Raises RequestError at once for what is refused before anything
        is stored (`done` is not called then); otherwise `done` gets the
        Enqueued once it is durable, or the RequestError that refused it.
        `reply_to`: where the spool's writer writes the OK itself (spool/lent.py)."""
        self._take(caller, len(arg or ""), done, self.check_send, arg, reply_to=reply_to)

    async def take_raw(self, caller: Caller, envelope_from: str, recipients: list[str], data: bytes) -> str:
        """A message as SMTP carries it (the SMTP door's enqueue): the id once
        it is durable; raises RequestError when it is refused."""
        stored = asyncio.get_running_loop().create_future()

        def done(result: Enqueued | RequestError) -> None:
            if not stored.done():  # else the SMTP session ended while we stored
                stored.set_result(result)

        self._take(caller, len(data), done, self.check_raw, envelope_from, recipients, data)
        result = await stored
        if isinstance(result, RequestError):
            raise result
        return result.id

    def check_send(self, caller: Caller, arg: str | None) -> MessageSpec:
        """A SEND's JSON argument, validated and allowed for `caller`; or RequestError."""
        try:
            obj = json.loads(arg or "")
        except ValueError as exc:
            raise RequestError(codes.BAD_REQUEST, f"SEND needs one JSON object: {exc}") from None
        except RecursionError:  # "[[[[..." thousands deep: hostile, not a message
            raise RequestError(codes.BAD_REQUEST, "SEND JSON is nested too deeply") from None
        if not isinstance(obj, dict):
            raise RequestError(codes.BAD_REQUEST, "SEND needs one JSON object")
        return self._check(caller, obj)

    def check_raw(self, caller: Caller, envelope_from: str, recipients: list[str], data: bytes) -> MessageSpec:
        """A raw message and its envelope, validated as a raw SEND and allowed; or RequestError."""
        return self._check(caller, raw_send(envelope_from, recipients, data))

    def _check(self, caller: Caller, obj: dict) -> MessageSpec:
        config = self.config
        spec = validate_send(obj, max_message_bytes=config.max_message_size,
                             message_id_domain=config.message_id_domain or None)
        policy = caller.policy
        if policy.restricts:
            policy.check(spec)
        return spec

    def _take(self, caller: Caller, size: int, done: Done, check: Callable[..., MessageSpec], *args,
              reply_to: ReplyTo | None = None) -> None:
        try:
            if size > LARGE_REQUEST:
                checked = asyncio.ensure_future(asyncio.to_thread(check, caller, *args))
                checked.add_done_callback(lambda fut: self._checked(caller, fut, done, reply_to))
            else:
                self._store(caller, check(caller, *args), done, reply_to)
        except RequestError as exc:
            self._refused(caller, exc)
            raise

    def _checked(self, caller: Caller, fut: asyncio.Future, done: Done, reply_to: ReplyTo | None) -> None:
        """A large request came back from its thread: store it, or say why not."""
        exc = fut.exception()
        if exc is None:
            try:
                self._store(caller, fut.result(), done, reply_to)
                return
            except RequestError as refused:
                exc = refused
        elif not isinstance(exc, RequestError):
            self.log.error("validation_failed", caller=caller.name, error=repr(exc))
            exc = RequestError(codes.INTERNAL, "nothing stored: the daemon failed; see its log")
        self._refused(caller, exc)
        done(exc)

    def _store(self, caller: Caller, spec: MessageSpec, done: Done, reply_to: ReplyTo | None = None) -> None:
        """Count the SEND against the caller's rate and enqueue it; `done`
        follows the commit. Raises RequestError when refused at once."""
        if caller.per_minute is not None or caller.per_day is not None:
            try:
                caller.take_send(time.monotonic())
            except CallerBusy:
                if not caller.limited:  # one line per episode, not one per refused SEND
                    caller.limited = True
                    self.log.warning("caller_rate_limited", caller=caller.name,
                                     per_minute=caller.policy.sends_per_minute,
                                     per_day=caller.policy.sends_per_day)
                raise
        spec_json = spec.to_json()
        claim = self.delivery.reserve()
        try:
            fut = self.spool.enqueue(spec_json, spec.envelope_from, spec.recipients, spec.idempotency_key,
                                     caller.name, caller.policy.max_pending, claim=claim, reply_to=reply_to)
        except Exception as exc:
            caller.give_back_send()
            if claim:
                self.delivery.give_back()
            if isinstance(exc, SpoolFull):
                raise RequestError(codes.BUSY, f"nothing stored: {exc}") from None
            self.log.exception("enqueue_failed", caller=caller.name)
            raise RequestError(codes.INTERNAL, _SPOOL_FAILED) from None
        fut.add_done_callback(lambda stored: self._stored(caller, stored, done, spec, spec_json if claim else None))

    def _stored(self, caller: Caller, fut: asyncio.Future, done: Done, spec: MessageSpec,
                claimed_spec: bytes | None) -> None:
        """The enqueue committed or failed: count it, pass the message on, answer.
        `claimed_spec`: the spec's JSON of a message stored claimed, which
        goes to delivery with the id its commit gave it."""
        exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is None:
            enqueued = fut.result()
            if enqueued.existing:
                caller.give_back_send()
                if claimed_spec is not None:
                    self.delivery.give_back()  # a repeat: nothing new was claimed
            else:
                if caller.revoked:
                    # The caller has had its OK from the spool's writer and a
                    # reload gave it a new identity since: count it there.
                    caller = self.callers.by_name.get(caller.name, caller)
                caller.accepted += 1
                caller.limited = False
                if claimed_spec is not None:
                    self.delivery.hand_over(Claimed(enqueued.id, claimed_spec, spec.envelope_from,
                                                    list(dict.fromkeys(spec.recipients)), 0, time.time(), False))
                else:
                    self.delivery.wake()
            done(enqueued)
            return
        caller.give_back_send()
        if claimed_spec is not None:
            self.delivery.give_back()
        if isinstance(exc, CallerFull):
            refused = CallerBusy(f"nothing stored: {exc}")
        elif isinstance(exc, SpoolFull):
            refused = RequestError(codes.BUSY, f"nothing stored: {exc}")
        else:
            self.log.error("enqueue_failed", caller=caller.name, error=repr(exc))
            refused = RequestError(codes.INTERNAL, _SPOOL_FAILED)
        self._refused(caller, refused)
        done(refused)

    @staticmethod
    def _refused(caller: Caller, exc: RequestError) -> None:
        caller.refused[exc.code] = caller.refused.get(exc.code, 0) + 1
