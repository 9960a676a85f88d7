"""Exit codes of the commands (sysexits.h), as sendmail and postqueue use
them: one table for `smtpgate send`, the C `smtpgate-send` and `smtpgate
sendmail`, documented once in docs/exit-codes.md."""

from __future__ import annotations

import argparse
import textwrap

from smtpgate.protocol import codes

EX_OK = 0
EX_USAGE = 64        # the command line: unknown option, missing -f/-t/-s, a bad --server URI
EX_DATAERR = 65      # the message: body not UTF-8, BAD_REQUEST, BAD_HEADER, TOO_LARGE
EX_NOINPUT = 66      # an attachment or the token file cannot be read
EX_NOUSER = 67       # an address refused: BAD_ADDRESS, DENIED
EX_NOHOST = 68       # the daemon's host name does not resolve
EX_UNAVAILABLE = 69  # refused for good for another reason; --wait: the message failed
EX_SOFTWARE = 70     # the peer does not speak the line protocol (a wrong port?)
EX_OSERR = 71        # serve: an address in use, a socket path it may not create
EX_CANTCREAT = 73    # serve: the spool is locked by another daemon or unusable
EX_IOERR = 74        # sendmail -bs: stdin or stdout failed
EX_TEMPFAIL = 75     # nothing stored (daemon down, BUSY, INTERNAL); --wait: not final in time
EX_NOPERM = 77       # AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong
EX_CONFIG = 78       # the configuration file cannot be read or is invalid

# The daemon's `ERR CODE` -> exit code. A code not listed (one a newer
# daemon may add) is EX_UNAVAILABLE: refused, and retrying will not help.
_FOR_ERROR = {
    codes.BUSY: EX_TEMPFAIL,
    codes.INTERNAL: EX_TEMPFAIL,
    codes.BAD_ADDRESS: EX_NOUSER,
    codes.DENIED: EX_NOUSER,
    codes.BAD_HEADER: EX_DATAERR,
    codes.TOO_LARGE: EX_DATAERR,
    codes.BAD_REQUEST: EX_DATAERR,
    codes.AUTH_REQUIRED: EX_NOPERM,
    codes.AUTH_FAILED: EX_NOPERM,
}


def exit_for_error(code: str) -> int:
    return _FOR_ERROR.get(code, EX_UNAVAILABLE)


def epilog(*rows: tuple[int, str]) -> str:
    """The "exit codes" paragraph of a command's --help (and man page)."""
    lines = ["exit codes (sysexits.h; the full table: docs/exit-codes.md):"]
    lines += [textwrap.fill(text, 78, initial_indent=f"  {code:<3} ", subsequent_indent=" " * 6)
              for code, text in rows]
    return "\n".join(lines)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, keeping the lines of the exit-code table (epilog above)."""

    def _fill_text(self, text, width, indent):
        if text.startswith("exit codes"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
