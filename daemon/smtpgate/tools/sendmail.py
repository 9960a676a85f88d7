"""`smtpgate sendmail`: a sendmail-compatible command in front of the daemon.

With `sendmail_path = "smtpgate sendmail -t -i"` in php.ini, PHP's mail()
(and anything else that pipes a message into /usr/sbin/sendmail: cron,
mdadm, logwatch, git send-email) hands its message to smtpgate as a raw
SEND. The command returns once the daemon has the message on disk; delivery
happens in the daemon, with its retries.

Flags follow sendmail(8) and Postfix's sendmail(1) where they matter for
submission: -t, -i/-oi, -f, -F, -bm, and -bs (an SMTP session on
stdin/stdout, the mode of Symfony Mailer, Laravel and SwiftMailer's sendmail
transports); the many flags that tune a local MTA
(-odi, -oem, -B, -N, -v ...) are accepted and ignored, so existing command
lines keep working. Exit codes are sendmail's (sysexits.h).

The command line is often built from untrusted input: PHP appends mail()'s
fifth parameter to `sendmail_path`, and applications put a user's address
after `-f` (the PHPMailer hole, CVE-2016-10033). So, as sendmail does,
options end at the first recipient; an argument starting with `-` where a
recipient or an option's value is expected is refused (exit 64); a `-F` name
with a control character is refused; and where the message and the token go
is never taken from the command line: only from $SMTPGATE_SERVER,
$SMTPGATE_CONFIG and the configuration file, which the caller's environment
and the administrator set, not the input it passes on.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import sys
import tomllib

from smtpgate.config import DEFAULT_CONFIG_PATH, Config
from smtpgate.message.spec import raw_send
from smtpgate.tools.lineclient import DEFAULT_URI, LineClient, ProtocolError, RemoteError

from smtpgate.tools.exits import (
    EX_CONFIG, EX_DATAERR, EX_IOERR, EX_NOHOST, EX_NOPERM, EX_NOUSER, EX_OK, EX_SOFTWARE,
    EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, HelpFormatter, epilog, exit_for_error)

# Stop reading stdin past the daemon's limit rather than hold a runaway
# pipe in memory.
DEFAULT_MAX_MESSAGE = Config.max_message_size

# sendmail flags that take a value, either attached (-fbob) or as the next
# word (-f bob). Of these only -f/-r and -F are used; the rest are ignored.
_WITH_VALUE = set("BCFLNORVXfhpr")
# Flags without a value that change nothing for a hand-off to smtpgate.
_IGNORED = set("AGUimnvx")

USAGE = """\
usage: smtpgate sendmail [-t] [-i] [-f sender] [-F name] [recipient ...] < message
       smtpgate sendmail -bs   (SMTP on stdin/stdout)
The daemon: $SMTPGATE_SERVER (tcp://HOST:PORT, unix:///PATH), else the configuration
file ($SMTPGATE_CONFIG, default /etc/smtpgate/smtpgate.toml); the token: $SMTPGATE_TOKEN,
else the file's tokens.
"""

# A display name for -F: no control characters (a line break would start a
# header of the caller's choosing), as message/validate.py refuses in names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def help_parser():
    """`smtpgate sendmail --help` and the man page smtpgate-sendmail(8).

    Only documentation: the command line itself is read by parse_args,
    whose rules (module docstring) argparse cannot express.
    """
    import argparse

    p = argparse.ArgumentParser(
        prog="smtpgate-sendmail", usage=USAGE.split("\n")[0][len("usage: "):], add_help=False,
        formatter_class=HelpFormatter,
        description="A sendmail-compatible command in front of the smtpgate daemon, for PHP's "
                    "mail() (sendmail_path = \"smtpgate sendmail -t -i\"), cron and anything else "
                    "that pipes a message into /usr/sbin/sendmail. It returns once the daemon has "
                    "the message on disk. Options end at the first recipient; an argument starting "
                    "with '-' where a recipient or a value is expected is refused. The daemon is "
                    "$SMTPGATE_SERVER (tcp://HOST:PORT, unix:///PATH), else the one the "
                    "configuration file names ($SMTPGATE_CONFIG, default "
                    f"{DEFAULT_CONFIG_PATH}); the token is $SMTPGATE_TOKEN, else the file's first; "
                    "never from the command line.",
        epilog=epilog(
            (EX_OK, "the daemon has the message (-bs: always; failures are SMTP replies)"),
            (EX_USAGE, "the command line, or no recipients"),
            (EX_DATAERR, "the message: over max_message_size, BAD_REQUEST, BAD_HEADER, TOO_LARGE"),
            (EX_NOUSER, "an address was refused: BAD_ADDRESS, DENIED"),
            (EX_NOHOST, "the daemon's host name does not resolve"),
            (EX_UNAVAILABLE, "refused for good for another reason"),
            (EX_SOFTWARE, "the peer does not speak the line protocol (a wrong port?)"),
            (EX_IOERR, "-bs: stdin or stdout failed"),
            (EX_TEMPFAIL, "nothing stored: the daemon is unreachable, BUSY or INTERNAL; "
                          "keep the message and try again"),
            (EX_NOPERM, "AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong"),
            (EX_CONFIG, "the file named by $SMTPGATE_CONFIG cannot be read")))
    p.add_argument("-t", action="store_true",
                   help="take the recipients from To, Cc and Bcc (added to those given), remove Bcc")
    p.add_argument("-i", "-oi", action="store_true",
                   help="a line of a single '.' does not end the message")
    p.add_argument("-f", "-r", metavar="SENDER", help="the envelope sender (and From, if the message has none)")
    p.add_argument("-F", metavar="NAME", help="the sender's full name, for a From the message lacks")
    p.add_argument("-bm", action="store_true", help="read the message from stdin (the default)")
    p.add_argument("-bs", action="store_true",
                   help="speak SMTP on stdin and stdout (Symfony Mailer, Laravel, SwiftMailer); only as the "
                        "first argument, with at most -i, -oi or -v after it")
    p.add_argument("-v", action="store_true", help="print the id the daemon gave on stderr")
    p.add_argument("recipient", nargs="*", help="recipient addresses (with -t: in addition to the header's)")
    p.add_argument("--help", action="store_true", help="this text (only as the sole argument)")
    return p


class UsageError(Exception):
    """A command line we cannot act on (exit EX_USAGE)."""


class Options:
    def __init__(self):
        self.extract_recipients = False   # -t
        self.dot_ends_input = True        # cleared by -i / -oi
        self.sender: str | None = None    # -f / -r
        self.full_name: str | None = None  # -F
        self.verbose = False              # -v: say the id on stderr
        self.smtp_session = False         # -bs: SMTP on stdin/stdout
        self.recipients: list[str] = []


_WITH_BS = ("-i", "-oi", "-v")  # what may follow -bs (parse_args)


def parse_args(argv: list[str]) -> Options:
    """Parse a sendmail command line; raise UsageError for what we cannot do
    or will not do (module docstring)."""
    opts = Options()
    args = list(argv)
    if "-bs" in args[1:] or (args[:1] == ["-bs"] and any(arg not in _WITH_BS for arg in args[1:])):
        # PHP appends mail()'s fifth parameter to sendmail_path, split at
        # spaces: "x@example.com -bs" there would make the message on stdin,
        # a contact form's text, SMTP commands naming their own recipients.
        # A mailer that speaks SMTP names -bs first (Symfony "-bs", Laravel
        # "-bs -i"), and nothing that takes a value comes with it.
        raise UsageError("-bs is taken only as the first argument, with at most -i, -oi or -v after it")
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.recipients = args
            break
        if not arg.startswith("-"):  # the first recipient: no option after it
            opts.recipients = [arg, *args]
            break
        if arg.startswith("--"):
            name = arg.partition("=")[0]
            if name in ("--server", "--config"):
                raise UsageError(
                    f"{name} is not taken from the command line (a mail() parameter could "
                    "send the message and the token elsewhere); set $SMTPGATE_SERVER or "
                    "$SMTPGATE_CONFIG, or the configuration file")
            raise UsageError(f"unknown option {name}")
        if arg == "-":
            raise UsageError("'-' where an option or a recipient is expected")
        flag, rest = arg[1], arg[2:]
        if flag == "o":
            # -oi is -i; -odi, -oem, -oQ/var/spool and friends tune a local MTA.
            if rest == "i":
                opts.dot_ends_input = False
            continue
        if flag == "q":
            continue  # -q, -q30m: run the local queue; the daemon runs its own
        if flag == "b":
            # -bm (deliver mail) is the default mode, -bs an SMTP session on
            # stdin/stdout (Symfony Mailer, Laravel, SwiftMailer use it);
            # -bp (list the queue), -bd (daemon) and others are other programs.
            if rest == "s":
                opts.smtp_session = True
            elif rest not in ("m", ""):
                raise UsageError(f"-b{rest} is not supported (only -bm and -bs; "
                                 "use `smtpgate queue` for the queue)")
            continue
        if flag in _WITH_VALUE:
            if not rest:
                if not args:
                    raise UsageError(f"-{flag} needs a value")
                rest = args.pop(0)
            if rest.startswith("-"):
                raise UsageError(f"-{flag} needs a value, not the option-like {rest[:40]!r}")
            if flag in "fr":
                opts.sender = rest
            elif flag == "F":
                if _CONTROL.search(rest):
                    raise UsageError("-F: the name contains a control character or line break")
                opts.full_name = rest
            continue
        for letter in arg[1:]:
            if letter == "t":
                opts.extract_recipients = True
            elif letter == "i":
                opts.dot_ends_input = False
            elif letter == "v":
                opts.verbose = True
            elif letter not in _IGNORED:
                raise UsageError(f"unknown option -{letter}")
    for recipient in opts.recipients:
        if recipient.startswith("-"):
            raise UsageError(f"{recipient[:40]!r} where a recipient is expected (options come first)")
    return opts


def read_message(stream, dot_ends_input: bool, limit: int) -> bytes | None:
    """The message from stdin, or None past `limit` bytes (read no further).

    Without -i a line of a single "." ends the message.
    """
    if not dot_ends_input:
        data = stream.read(limit + 1)
        return data if len(data) <= limit else None
    lines, size = [], 0
    while (line := stream.readline(limit + 1 - size)):
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
        size += len(line)
        if size > limit:
            return None
    return b"".join(lines)


def sendmail_send(opts: Options, data: bytes) -> dict:
    """The SEND for a message and its command line: the daemon applies -t,
    -f and -F to the message (the `sendmail` field, docs/protocol.md), as
    for `smtpgate-sendmail`. Legacy 8-bit mail (GBK, ISO-8859-1 bodies from
    old PHP code) goes as raw_base64, octet for octet."""
    send = raw_send("", [], data)
    del send["from"], send["to"]
    send["sendmail"] = {"extract_recipients": opts.extract_recipients, "recipients": opts.recipients,
                        "sender": opts.sender, "full_name": opts.full_name,
                        "default_sender": _local_sender()}
    return send


def _local_sender() -> str:
    """user@host, what sendmail uses when neither -f nor From names a sender."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no name (DynamicUser=, containers)
        user = "nobody"
    return f"{user}@{socket.gethostname()}"


def find_server(settings: dict, env=os.environ) -> tuple[str, str | None]:
    """(server URI, token): $SMTPGATE_SERVER, the config file, the default."""
    token = env.get("SMTPGATE_TOKEN") or _first_token(settings)
    uri = env.get("SMTPGATE_SERVER")
    if uri:
        return uri, token
    if settings.get("socket"):
        return "unix://" + settings["socket"], token
    listen = settings.get("listen")
    if isinstance(listen, str):
        listen = [listen]
    if listen:
        host, _, port = listen[0].rpartition(":")
        # A wildcard listener is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
        return f"tcp://{host}:{port}", token
    return DEFAULT_URI, token


def read_config(path: str | None) -> dict:
    """The config file's keys, read with tomllib; {} when the default file is absent.

    Not load_config: that opens the secrets the file names (the upstream
    password file), which the user calling sendmail cannot and need not read.
    Raises ConfigUnreadable when a file named by $SMTPGATE_CONFIG cannot be read.
    """
    try:
        with open(path or DEFAULT_CONFIG_PATH, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if path:
            raise ConfigUnreadable(f"{path}: no such file") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        if path:
            raise ConfigUnreadable(f"{path}: {exc}") from None
        return {}  # the default file is only a hint; the default URI may still work


class ConfigUnreadable(Exception):
    """The file named by $SMTPGATE_CONFIG cannot be read (exit EX_CONFIG)."""


def _first_token(settings: dict) -> str | None:
    tokens = settings.get("tokens")
    if isinstance(tokens, list) and tokens:
        return str(tokens[0])
    if isinstance(tokens, str) and tokens:
        return tokens
    if settings.get("tokens_file"):
        try:
            with open(settings["tokens_file"], encoding="utf-8") as fh:
                return next((line.strip() for line in fh if line.strip()), None)
        except OSError:
            return None  # not ours to read; the daemon will say AUTH_REQUIRED
    return None


def main(argv: list[str], stdin=None, stderr=None, stdin_fd: int = 0, stdout_fd: int = 1,
         env=None) -> int:
    """Run the command; return a sysexits.h exit code (0 once the daemon has the message).

    `stdin`/`stderr` are the streams of the plain mode; -bs speaks SMTP on
    the descriptors `stdin_fd`/`stdout_fd`; `env` is os.environ unless given.
    """
    stdin = stdin or sys.stdin.buffer
    stderr = stderr or sys.stderr
    env = os.environ if env is None else env

    def fail(code: int, text: str) -> int:
        print(f"smtpgate sendmail: {text}", file=stderr)
        return code

    if argv == ["--help"]:
        # Only alone: in a sendmail command line built from a mail() call,
        # "--help" among other words stays an unknown option (exit 64).
        print(help_parser().format_help(), end="")
        return EX_OK
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        return fail(EX_USAGE, f"{exc}\n{USAGE}")
    if not opts.recipients and not opts.extract_recipients and not opts.smtp_session:
        return fail(EX_USAGE, "no recipients: give them as arguments, or use -t with To/Cc/Bcc")
    try:
        settings = read_config(env.get("SMTPGATE_CONFIG"))
    except ConfigUnreadable as exc:
        return fail(EX_CONFIG, f"cannot read the configuration {exc}")
    uri, token = find_server(settings, env)
    limit = settings.get("max_message_size", DEFAULT_MAX_MESSAGE)
    if not isinstance(limit, int) or isinstance(limit, bool):
        limit = DEFAULT_MAX_MESSAGE
    if opts.smtp_session:
        return smtp_session_on_stdio(uri, token, limit, stdin_fd, stdout_fd)
    data = read_message(stdin, opts.dot_ends_input, limit)
    if data is None:
        return fail(EX_DATAERR, f"the message is over max_message_size ({limit} bytes)")
    try:
        with LineClient(uri, token=token, timeout=30) as client:
            msg_id = client.send(sendmail_send(opts, data))
    except ValueError as exc:
        return fail(EX_USAGE, str(exc))
    except RemoteError as exc:
        return fail(exit_for_error(exc.code), f"{exc.code} {exc.text}")
    except ProtocolError as exc:
        return fail(EX_SOFTWARE, f"{uri} does not speak the line protocol: {exc}")
    except socket.gaierror as exc:
        return fail(EX_NOHOST, f"cannot resolve the daemon's host in {uri}: {exc.strerror}")
    except OSError as exc:
        # Refused, no socket file, timed out, closed mid-reply: nothing is
        # known to be stored, so the caller should keep the mail and retry.
        return fail(EX_TEMPFAIL, f"cannot reach the daemon at {uri}: "
                                 f"{exc.strerror or str(exc) or type(exc).__name__}")
    if opts.verbose:
        print(f"smtpgate sendmail: queued as {msg_id}", file=stderr)
    return EX_OK


# --- sendmail -bs: an SMTP session on stdin/stdout ----------------------------

class _Silent:
    """A logger that drops everything: -bs reports through SMTP replies."""

    def __getattr__(self, level):
        return lambda event, **fields: None


def hand_over(uri: str, token: str | None, message: dict) -> str:
    """One raw SEND on a fresh connection; the id, or RemoteError/OSError."""
    with LineClient(uri, token=token, timeout=30) as client:
        return client.send(message)


def smtp_session_on_stdio(uri: str, token: str | None, limit: int,
                          stdin_fd: int, stdout_fd: int) -> int:
    """Serve one SMTP session on stdin/stdout (sendmail -bs); each message
    becomes a raw SEND. Failures are SMTP replies; the exit code is 0.

    aiosmtpd needs a duplex transport, so the session runs on one end of a
    socket pair and two threads copy stdin into the other end and its
    output to stdout. The session is the SMTP door's own handler (the same
    replies, the same Received field), without AUTH: the caller is local and
    the daemon's token, if any, comes from the environment or the config.
    """
    import asyncio
    import threading

    from smtpgate.config import Config
    from smtpgate.intake.callers import Callers
    from smtpgate.intake.limits import Limits
    from smtpgate.intake.peer import peer_of_socket
    from smtpgate.intake.smtp_door import IntakeHandler, session_factory

    async def enqueue(caller, envelope_from: str, recipients: list[str], data: bytes) -> str:
        message = raw_send(envelope_from, recipients, data)
        # LineClient blocks; the event loop must keep serving the session.
        return await asyncio.to_thread(hand_over, uri, token, message)

    def copy_stdin(peer: socket.socket) -> None:
        # EOF on stdin must not reach the session as EOF: aiosmtpd cancels
        # the session at once, dropping commands still buffered (a script
        # may write its whole dialogue and close stdin). A QUIT is sent
        # instead: ignored after the client's own QUIT, a clean end between
        # transactions, and inside an unfinished DATA mere text, so that a
        # truncated message is never accepted (the idle timeout ends that
        # session without a 250).
        last = b"\n"
        try:
            while data := os.read(stdin_fd, 65536):
                peer.sendall(data)
                last = data[-1:]
            peer.sendall((b"" if last == b"\n" else b"\r\n") + b"QUIT\r\n")
        except OSError:
            pass  # the session is over (QUIT, timeout): the rest is not read

    def copy_stdout(peer: socket.socket, done) -> None:
        failure = None
        try:
            while data := peer.recv(65536):
                view = memoryview(data)
                while view:
                    view = view[os.write(stdout_fd, view):]
        except OSError as error:
            failure = error  # the client stopped reading: replies were lost, so not EX_OK
        finally:
            done(failure)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        session_end = loop.create_future()
        ours, theirs = socket.socketpair()
        with theirs:
            # Callers with none configured: this session is the anonymous
            # caller; the daemon knows us by the token of `hand_over`.
            handler = IntakeHandler(enqueue=enqueue, callers=Callers(Config(), b""), log=_Silent(),
                                    hostname=socket.gethostname())
            gate = Limits(Config(), _Silent()).gate("smtp")  # one session: the defaults
            make_session = session_factory(handler, max_message_bytes=limit, gate=gate, loop=loop)
            peer = peer_of_socket(ours)
            session = make_session(peer, gate.admit(peer))
            await loop.connect_accepted_socket(lambda: session, sock=ours)
            threading.Thread(target=copy_stdin, args=(theirs,), daemon=True).start()
            def end(failure: OSError | None) -> None:
                if failure is None:
                    session_end.set_result(None)
                else:
                    session_end.set_exception(failure)

            threading.Thread(target=copy_stdout, daemon=True, args=(
                theirs, lambda failure: loop.call_soon_threadsafe(end, failure))).start()
            await session_end

    try:
        asyncio.run(run())
    except OSError:
        return EX_IOERR  # stdin/stdout went away under us
    return EX_OK
