"""Child processes of the daemon: how the daemon starts one (`spawn`) and
how the child sets itself up (`become_child`). A child has a pipe from the
daemon on its stdin and one to the daemon on its stdout, carrying frames
(framing.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def spawn(module: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `python -c 'from smtpgate.<module> import main; main()'` with
    pipes on its stdin and stdout, from this very package whatever the
    current directory or PYTHONPATH."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            f"from smtpgate.{module} import main; sys.exit(main())")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, pass_fds=pass_fds)


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
