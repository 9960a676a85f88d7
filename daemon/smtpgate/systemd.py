"""systemd integration without libsystemd: sd_notify and socket activation.

The two interfaces are small and stable (sd_notify(3), sd_listen_fds(3)), so
they are written here by hand rather than adding a dependency:

- notify: one datagram of newline-separated "KEY=VALUE" assignments sent to
  the AF_UNIX socket named by $NOTIFY_SOCKET. A name starting with "@" is in
  the abstract namespace (the "@" stands for a leading NUL byte).
- listen_fds: the service manager passes listening sockets as file
  descriptors 3, 4, ... with LISTEN_FDS=<count>, LISTEN_PID=<our pid> and
  LISTEN_FDNAMES=<name>:<name>... (FileDescriptorName= of each socket unit).

Every function is harmless outside systemd: notify() returns False and
listen_fds() returns {} when the variables are not set.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

# sd_listen_fds(3): passed descriptors start right after stdin/out/err.
SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(env: Mapping[str, str]) -> str | bytes | None:
    """The AF_UNIX address in $NOTIFY_SOCKET, or None when unset or unusable."""
    name = env.get("NOTIFY_SOCKET", "")
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    # Unset, empty, or a transport we do not speak (systemd 254+ "vsock:").
    return None


def notify(*assignments: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send "KEY=VALUE" assignments in one datagram; True if it was sent.

    Never blocks (MSG_DONTWAIT) and never raises for a missing or gone
    service manager: the daemon must run the same with or without systemd.
    """
    address = _notify_address(env)
    if address is None or not assignments:
        return False
    # A newline would start a new assignment (a STATUS= text could forge
    # READY=1 or MAINPID=), so values are kept to one line.
    lines = [a.replace("\r", " ").replace("\n", " ") for a in assignments]
    payload = "\n".join(lines).encode("utf-8")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(payload, socket.MSG_DONTWAIT, address)
        except OSError:
            # Queue full (EAGAIN), socket gone (ENOENT/ECONNREFUSED): the
            # notification is lost, which systemd tolerates for STATUS= and
            # the next WATCHDOG=1 makes up for a lost ping.
            return False
    return True


def ready(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """READY=1 (with an optional STATUS=): start-up is finished, we listen."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []), env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """STATUS=<text>: the one line `systemctl status` shows."""
    return notify(f"STATUS={text}", env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """STOPPING=1: shutdown has begun (systemd stops counting the watchdog)."""
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []), env=env)


def reloading(*, env: Mapping[str, str] = os.environ) -> bool:
    """RELOADING=1: a reload (SIGHUP) is in progress; send ready() after it."""
    return notify("RELOADING=1", env=env)


def watchdog(*, env: Mapping[str, str] = os.environ) -> bool:
    """WATCHDOG=1: the keep-alive ping that WatchdogSec= waits for."""
    return notify("WATCHDOG=1", env=env)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is wanted.

    WATCHDOG_USEC is the timeout systemd enforces; sd_watchdog_enabled(3)
    advises pinging at half of it so that one late wake-up of the event loop
    does not get the daemon killed. WATCHDOG_PID, when set, names the process
    the watchdog is meant for (a child must not answer for its parent).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


def listen_fds(env: MutableMapping[str, str] = os.environ,
               *, unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, grouped by FileDescriptorName.

    Returns {} when nothing was passed or LISTEN_PID names another process
    (the variables were inherited from a parent). Descriptors without a name
    are listed under "unknown", as sd_listen_fds_with_names(3) does. The
    descriptors are marked close-on-exec. The LISTEN_* variables are removed
    (by default) so that a child process cannot take the sockets for its own.
    Raises ValueError when LISTEN_FDS or LISTEN_FDNAMES are malformed: a
    socket we cannot name is an operator mistake to report, not to guess.
    """
    try:
        pid, count, names = (env.get(name, "") for name in _LISTEN_VARIABLES)
        if not pid or not count:
            return {}
        if not pid.isdigit() or int(pid) != os.getpid():
            return {}
        if not count.isdigit():
            raise ValueError(f"LISTEN_FDS: expected a number, got {count!r}")
        fd_names = names.split(":") if names else ["unknown"] * int(count)
        if len(fd_names) != int(count):
            raise ValueError(
                f"LISTEN_FDNAMES: {len(fd_names)} names for {int(count)} descriptors")
        sockets: dict[str, list[socket.socket]] = {}
        for offset, name in enumerate(fd_names):
            fd = SD_LISTEN_FDS_START + offset
            try:
                os.set_inheritable(fd, False)
            except OSError:
                raise ValueError(f"LISTEN_FDS: descriptor {fd} is not open") from None
            # fileno= makes Python ask the kernel for family, type and protocol.
            sockets.setdefault(name or "unknown", []).append(socket.socket(fileno=fd))
        return sockets
    finally:
        if unset_environment:
            for name in _LISTEN_VARIABLES:
                env.pop(name, None)
