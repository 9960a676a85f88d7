"""Which event loop runs the daemon and its delivery process.

uvloop (libuv, in C) when it is installed (`pip install smtpgate[fast]`)
and the configuration does not say otherwise (`event_loop`): asyncio's
own loop runs Python code for every socket and pipe event (a read, a
write, a timer per awaited reply), which uvloop runs in C. Measured
(bench/results.md, "Relay throughput"): the daemon's CPU per relayed
message about a fifth lower, the delivery process's about the same. The
standard loop stays where uvloop is not installed, and
`event_loop = "asyncio"` chooses it anyway.

The daemon resolves the choice once and starts its delivery process with
the same loop (its command line names it); the spool writer has no loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

CHOICES = ("auto", "asyncio", "uvloop")


class LoopUnavailable(Exception):
    """`event_loop = "uvloop"` without uvloop installed."""


def resolve(choice: str) -> str:
    """The loop `choice` names: "uvloop" or "asyncio" ("auto": uvloop if importable)."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise LoopUnavailable("event_loop: uvloop is not installed (pip install smtpgate[fast])") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, Any], loop: str) -> Any:
    """asyncio.run(main) on a new loop of the kind `loop` ("uvloop" or "asyncio")."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
