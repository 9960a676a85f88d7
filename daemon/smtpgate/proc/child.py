"""Child processes of the daemon: how the daemon starts one (`spawn`) and
how the child sets itself up (`become_child`).

A child is `python -P -m smtpgate.<package>` with a pipe on its stdin (from
the daemon) and one on its stdout (to the daemon), carrying frames
(framing.py). It runs this very package whatever the current directory:
-P keeps the current directory off sys.path, and the package's parent
folder leads PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# The folder holding the smtpgate package (site-packages, or daemon/ in a
# checkout installed editable).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn(package: str, pass_fds: tuple[int, ...] = (), args: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `python -P -m <package> [args]` (e.g. "smtpgate.spool") with
    pipes on its stdin and stdout."""
    path = [PACKAGE_PARENT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.Popen([sys.executable, "-P", "-m", package, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, pass_fds=pass_fds, env=env)


def become_child(name: str) -> tuple[int, int]:
    """Set up a child process of the daemon: named `name` in ps, top and
    pgrep; deaf to signals (a Ctrl-C or a SIGTERM to the whole group must
    not end it before the daemon is done with it: it leaves when its pipe
    from the daemon ends). Returns the pipe's file descriptors (in, out);
    stdout then goes to stderr, so a stray print lands in the log and never
    in the frames."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    with open("/proc/self/comm", "w") as comm:
        comm.write(name)
    pipe_in, pipe_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    return pipe_in, pipe_out
