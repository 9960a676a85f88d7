"""Calls across a pipe: a request answered later, matched by a token.

Both pipes carry calls: the daemon's spool calls the writer process
(spool/store.py -> spool/writer.py), and the delivery process calls the
daemon's spool (delivery/process.py). The caller keeps one future per
token in `PendingCalls`; the answer with that token resolves it: an
`Answer` from the daemon, or the results and errors by token of the
writer's `Committed` batch.

Every message on a pipe is a named type (a NamedTuple marked @message,
proc/framing.py), made and read by name. A receiver dispatches on the type with a table
{type: handler}, the one dispatch style of the package.

Free of asyncio, like framing.py: the spool writer imports this module and
starts faster without it (importing asyncio takes 20-40 ms here).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from smtpgate.proc.framing import message

if TYPE_CHECKING:
    import asyncio


@message
class Call(NamedTuple):
    """Run `op` (a named operation, e.g. spool.ops.Enqueue) and answer `token`."""

    token: int
    op: Any


@message
class Answer(NamedTuple):
    """The outcome of the call `token`: its value, or the error it raised."""

    token: int
    value: Any
    error: BaseException | None


class PendingCalls:
    """The calls sent and not yet answered: token -> future of `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tokens = itertools.count(1)
        self._futures: dict[int, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def new(self, op: Any) -> tuple[Call, asyncio.Future]:
        """A call of `op` to send, and the future its answer will resolve."""
        token = next(self._tokens)
        fut = self._loop.create_future()
        self._futures[token] = fut
        return Call(token, op), fut

    def resolve(self, token: int, value: Any = None, error: BaseException | None = None) -> None:
        """Resolve the future of the call `token` with its value or its
        error (unless its caller cancelled it)."""
        fut = self._futures.pop(token, None)
        if fut is None or fut.done():
            return
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)

    def waiting(self) -> list[asyncio.Future]:
        """The futures of the calls not answered yet."""
        return list(self._futures.values())

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """The other end is gone: every call still waiting fails with a new
        `error()` (one exception object per waiter: a raised exception
        collects the traceback of where it is raised)."""
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(error())
