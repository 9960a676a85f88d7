"""Run a command under the system-call filter of systemd/smtpgate.service,
and, as root, under its view of /proc:

    python tests/unit_filter.py [--unit UNIT_FILE] COMMAND [ARG...]

The unit's `SystemCallFilter=` lines are read from the unit file and their
groups expanded by `systemd-analyze syscall-filter`, as systemd does: the
first line's groups are allowed, a later `~` line's taken away again, and
every other call fails with the unit's `SystemCallErrorNumber=` (EPERM).
The filter is installed with libseccomp (which systemd links too) and the
command is exec'd under it, so the daemon and its children meet the very
refusals they meet as a service, without a service manager here.

As root, the unit's `ProcSubset=pid` and `ProtectProc=invisible` are
applied first, as systemd applies them: in a mount namespace of its own,
/proc is mounted again with `subset=pid,hidepid=invisible` (the process's
own files stay; /proc/stat, /proc/pressure and the like are gone).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "smtpgate.service"
SCMP_ACT_ALLOW = 0x7FFF0000


def _scmp_act_errno(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def expand(names: list[str], seen: set[str] | None = None) -> set[str]:
    """The system calls of `names` (calls and @groups), groups expanded."""
    seen = set() if seen is None else seen
    calls: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            calls.add(name)
        elif name not in seen:
            seen.add(name)
            listed = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                                    text=True, check=True, timeout=30).stdout.splitlines()[1:]
            calls |= expand([line.strip() for line in listed if line.strip() and not line.strip().startswith("#")],
                            seen)
    return calls


def unit_filter(unit: Path = UNIT) -> tuple[set[str], int]:
    """The calls the unit allows, and the errno of the others."""
    allowed: set[str] | None = None
    error = errno.EPERM
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "SystemCallFilter":
            deny = value.startswith("~")
            calls = expand(value.lstrip("~").split())
            if allowed is None:
                assert not deny, "the unit's first SystemCallFilter= is an allow list"
                allowed = calls
            elif deny:
                allowed -= calls
            else:
                allowed |= calls
        elif key == "SystemCallErrorNumber":
            error = getattr(errno, value.strip())
    assert allowed, f"no SystemCallFilter= in {unit}"
    return allowed, error


def proc_options(unit: Path = UNIT) -> str | None:
    """The mount options of the unit's /proc (None: the host's)."""
    settings = dict(line.partition("=")[::2] for line in unit.read_text().splitlines() if "=" in line)
    options = []
    if settings.get("ProcSubset") == "pid":
        options.append("subset=pid")
    if settings.get("ProtectProc") in ("invisible", "noaccess", "ptraceable"):
        options.append(f"hidepid={settings['ProtectProc']}")
    return ",".join(options) or None


def mount_proc(options: str) -> None:
    """/proc mounted again with `options`, in a mount namespace of this process's own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # Nothing of this namespace's mounts may reach the host's.
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"proc", b"/proc", b"proc", 0, options.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount -t proc -o {options}")


def install(allowed: set[str], error: int) -> None:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_scmp_act_errno(error))
    assert ctx, "seccomp_init failed"
    for name in sorted(allowed):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number != -1:  # __NR_SCMP_ERROR: not a call of this architecture
            lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0)
    rc = lib.seccomp_load(ctx)
    assert rc == 0, f"seccomp_load: {os.strerror(-rc)}"


def main(argv: list[str]) -> int:
    unit = UNIT
    if argv[:1] == ["--unit"]:
        unit, argv = Path(argv[1]), argv[2:]
    allowed, error = unit_filter(unit)
    options = proc_options(unit)
    if options and os.geteuid() == 0:
        mount_proc(options)
    install(allowed, error)
    os.execvp(argv[0], argv)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
