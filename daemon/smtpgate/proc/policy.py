"""Background work at SCHED_IDLE while intake is light (issue 15).

A lone caller's SEND wakes the daemon and the spool writer; in its slow
ones they waited for a CPU behind the writer's checkpoint thread and the
delivery process (bench/results.md). A thread at SCHED_IDLE is preempted
at once by any other runnable one, so while intake is light that work is
put there: the writer's checkpoints (spool/writer.py) and the delivery
process (delivery/process.py). Always there, a saturated machine starves
it (end to end -17 to -19 %), so each is set back to the normal policy as
soon as the load is heavier, by a process that is not itself starved.

Setting a thread back from SCHED_IDLE needs CAP_SYS_NICE or an
RLIMIT_NICE that allows its nice value (20 for nice 0: the unit's
LimitNICE=20); a system call filter may refuse the calls altogether.
Without that right, nothing is ever set to SCHED_IDLE. Its nice value
stays what it was through both changes.
"""

from __future__ import annotations

import os
import threading
from typing import Callable


def can_leave_idle() -> bool:
    """Whether this process may set a thread to SCHED_IDLE and back: tried
    on a thread of its own, which ends either way."""
    done = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            done.append(True)
        except (OSError, AttributeError):  # AttributeError: a platform without the calls
            pass

    thread = threading.Thread(target=attempt, name="policy-probe")
    thread.start()
    thread.join()
    return bool(done)


def set_idle(tids: list[int], idle: bool) -> bool:
    """Set the threads `tids` to SCHED_IDLE, or back to SCHED_OTHER; False
    if one was refused (those before it are changed)."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError:
            return False
    return True


def threads_of(pid: int) -> list[int]:
    """The thread ids of process `pid` (threads it starts later take the
    policy of the thread that starts them)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


class IdleSwitch:
    """The threads `tids()` at SCHED_IDLE or back, where this process may
    set them back (else never idle). Set again on every thread at most
    every `again` seconds while asked for the same (a thread started just
    as they changed keeps the policy it started with); one refusal after
    all sets them back and ends it."""

    def __init__(self, tids: Callable[[], list[int]], again: float = float("inf")):
        self._tids = tids
        self._again = again
        self.allowed = can_leave_idle()
        self.idle = False
        self._set_at = float("-inf")

    def set(self, idle: bool, now: float) -> None:
        if not self.allowed or (idle == self.idle and now < self._set_at + self._again):
            return
        if set_idle(self._tids(), idle):
            self.idle, self._set_at = idle, now
        else:
            set_idle(self._tids(), False)
            self.allowed = self.idle = False
