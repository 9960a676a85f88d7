"""Delivery in a child process ('smtpgate-relay' in ps).

Why: the daemon's event loop is one Python thread. Running delivery on it
(building each message, the SMTP exchange) cost about 175 us of its CPU
per message, twice what the intake of that message costs, so while the
daemon relayed, every SEND waited behind deliveries and end-to-end
throughput stopped where that one thread did. In a process of its own,
delivery runs on whatever core is free, and the loop keeps only the
intake and the spool's bookkeeping.

    daemon (intake, spool) <-- pipes --> smtpgate-relay (scheduler.Delivery)
                                         claims, attempt records, releases,
                                         next_due go back as calls

The child runs the very same `Delivery` (scheduler, workers, pools, rate
limits) as a daemon without this process would; only its spool is a
stand-in (`SpoolCalls`) whose operations the daemon answers with the real
spool. Messages on the pipe:
- daemon -> child: ("start", settings, log_format, log_level), ("wake",),
  ("reload", settings), ("stop", grace), ("answer", token, value, error).
- child -> daemon: ("started",), ("call", token, op, args); after "stop",
  the end of its output says its Delivery has stopped.
The child ignores signals (the daemon decides), and exits when its stdin
ends: a daemon killed with -9 takes its deliveries with it, and the
messages they had claimed are 'sending' until the next start puts them
back to 'queued' (at-least-once).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
from typing import Callable

from smtpgate.proc.child import become_child, spawn
from smtpgate.proc.pipe import FramedPipe
from smtpgate.spool.errors import SpoolError
from smtpgate.spool.store import Claimed, Spool

# Beyond the grace period, what a stopping child may take: its QUITs
# (pool.QUIT_TIMEOUT) and the last records.
STOP_MARGIN = 15.0  # seconds

# What the child may ask of the spool: the part of Spool that Delivery uses.
SPOOL_CALLS = ("claim_due", "record_attempt", "release", "next_due")


class DeliveryProcess:
    """The daemon's handle on delivery in a child process: the interface of
    scheduler.Delivery (start, wake, reload, stop)."""

    def __init__(self, spool: Spool, settings, log, *, log_format: str, log_level: str,
                 on_lost: Callable[[str], None] | None = None):
        self._spool = spool
        self._settings = settings
        self._log = log
        self._log_setup = (log_format, log_level)
        self._on_lost = on_lost
        self._process: subprocess.Popen | None = None
        self._pipe: FramedPipe | None = None
        self._started: asyncio.Future | None = None
        self._stopping = False
        self._woken = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._process = await loop.run_in_executor(None, spawn, "delivery.process")
        self._started = loop.create_future()
        self._pipe = FramedPipe(self._on_message, self._on_eof)
        await self._pipe.open(self._process.stdout, self._process.stdin)
        self._pipe.send(("start", self._settings, *self._log_setup))
        await self._started

    def wake(self) -> None:
        """Something was enqueued: one wake-up per turn of the loop is enough."""
        if self._pipe is None or self._stopping or self._woken:
            return
        self._woken = True
        self._pipe.send(("wake",))
        asyncio.get_running_loop().call_soon(self._rearm)

    def _rearm(self) -> None:
        self._woken = False

    def reload(self, settings) -> None:
        self._settings = settings
        if self._pipe is not None and not self._stopping:
            self._pipe.send(("reload", settings))

    async def stop(self, grace: float) -> None:
        """The child stops its Delivery (in-flight messages get `grace`
        seconds, the rest goes back to 'queued' through our spool) and exits."""
        process, pipe = self._process, self._pipe
        if process is None:
            return
        self._stopping = True
        pipe.send(("stop", grace))
        try:
            # The child ends its output once its Delivery stopped: in-flight
            # messages within `grace`, then QUIT to the pooled connections.
            await asyncio.wait_for(asyncio.shield(pipe.closed), grace + STOP_MARGIN)
        except asyncio.TimeoutError:
            self._log.error("delivery_process_stuck", note="killed; its claimed messages stay queued")
            process.kill()
        pipe.close_write()  # not before: its last releases and records need our answers
        await asyncio.get_running_loop().run_in_executor(None, process.wait)
        process.stdout.close()
        self._process = self._pipe = None

    # --- the child's messages -------------------------------------------------

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "call":
            _, token, op, args = message
            self._call(token, op, args)
        elif kind == "started":
            if not self._started.done():
                self._started.set_result(None)

    def _call(self, token: int, op: str, args: tuple) -> None:
        if op not in SPOOL_CALLS:
            self._answer(token, None, SpoolError(f"not a spool call: {op}"))
            return
        try:
            if op == "record_attempt":
                msg_id, outcomes, next_attempt, duplicate = args
                result = self._spool.record_attempt(msg_id, outcomes, next_attempt=next_attempt,
                                                    possible_duplicate=duplicate)
            else:
                result = asyncio.ensure_future(getattr(self._spool, op)(*args))
        except Exception as exc:
            self._answer(token, None, exc)
            return
        result.add_done_callback(lambda done: self._answer_from(token, done))

    def _answer_from(self, token: int, done: asyncio.Future) -> None:
        if done.cancelled():
            self._answer(token, None, SpoolError("cancelled"))
        else:
            self._answer(token, None if done.exception() else done.result(), done.exception())

    def _answer(self, token: int, value, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, SpoolError):
            error = SpoolError(repr(error))  # only our own errors cross the pipe
        if self._pipe is not None:
            self._pipe.send(("answer", token, value, error))

    def _on_eof(self) -> None:
        if not self._started.done():
            # An OSError: the daemon's start fails with EX_OSERR, as for a
            # process or socket the system would not give us.
            self._started.set_exception(ChildProcessError("the delivery process did not start; see the log"))
        if self._stopping:
            return
        code = self._process.poll() if self._process is not None else None
        why = f"the delivery process exited unexpectedly (status {code})"
        self._log.error("delivery_process_lost", error=why)
        if self._on_lost is not None:
            self._on_lost(why)


# --- the child -----------------------------------------------------------------


class SpoolCalls:
    """The child's spool: the operations Delivery uses, answered by the daemon."""

    def __init__(self, pipe_send: Callable[[tuple], None]):
        self._send = pipe_send
        self._tokens = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}

    def _call(self, op: str, *args) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        token = next(self._tokens)
        self._pending[token] = fut
        self._send(("call", token, op, args))
        return fut

    async def claim_due(self, now: float, limit: int) -> list[Claimed]:
        return await self._call("claim_due", now, limit)

    def record_attempt(self, msg_id, outcomes, *, next_attempt=None, possible_duplicate=False) -> asyncio.Future:
        return self._call("record_attempt", msg_id, [tuple(o) for o in outcomes], next_attempt, possible_duplicate)

    async def release(self, msg_ids, possible_duplicate: bool = False) -> int:
        return await self._call("release", list(msg_ids), possible_duplicate)

    async def next_due(self) -> float | None:
        return await self._call("next_due")

    def answer(self, token: int, value, error) -> None:
        fut = self._pending.pop(token, None)
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)


async def _child(in_fd: int, out_fd: int) -> None:
    from smtpgate.delivery.scheduler import Delivery
    from smtpgate.log import get_logger, setup_logging

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state: dict = {"delivery": None}
    spool = SpoolCalls(lambda message: pipe.send(message))  # pipe: set before anything is read

    async def start(settings, log_format, log_level):
        setup_logging(log_format, log_level)
        try:
            state["delivery"] = Delivery(spool, settings, get_logger())
            await state["delivery"].start()
        except Exception:
            get_logger().exception("delivery_start_failed")
            done.set_result(None)  # the daemon sees our end and does not start
            return
        pipe.send(("started",))

    async def stop(grace):
        try:
            if state["delivery"] is not None:
                await state["delivery"].stop(grace)
        except Exception:  # e.g. the spool failed: what is unrecorded stays 'sending' until restart
            get_logger().exception("delivery_stop_failed")
        finally:
            pipe.close_write()
            if not done.done():
                done.set_result(None)

    def on_message(message: tuple) -> None:
        kind = message[0]
        if kind == "answer":
            spool.answer(*message[1:])
        elif kind == "wake":
            if state["delivery"] is not None:
                state["delivery"].wake()
        elif kind == "start":
            asyncio.ensure_future(start(*message[1:]))
        elif kind == "reload":
            if state["delivery"] is not None:
                state["delivery"].reload(message[1])
        elif kind == "stop":
            asyncio.ensure_future(stop(message[1]))

    def on_eof() -> None:
        # The daemon closes its end only after ours (stop), so it died: no
        # outcome can be recorded any more, and a cancelled delivery would
        # wait for the daemon to answer its release. Leave at once; the
        # messages in flight stay 'sending' until the next start puts them
        # back to 'queued' (at-least-once).
        os._exit(0)

    pipe = FramedPipe(on_message, on_eof)
    await pipe.open(os.fdopen(in_fd, "rb", buffering=0), os.fdopen(out_fd, "wb", buffering=0))
    await done


def main() -> int:
    pipe_in, pipe_out = become_child("smtpgate-relay")
    asyncio.run(_child(pipe_in, pipe_out))
    return 0
