"""The `smtpgate` command: serve, send, stats, queue, sendmail, demo."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys

from smtpgate import __version__
from smtpgate.config import DEFAULT_CONFIG_PATH
from smtpgate.tools.exits import (
    EX_CANTCREAT, EX_CONFIG, EX_DATAERR, EX_NOHOST, EX_NOINPUT, EX_NOPERM, EX_NOUSER, EX_OK,
    EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, HelpFormatter, epilog)

# Options accepted before or after the subcommand (`smtpgate --spool DIR
# queue list` and `smtpgate queue list --spool DIR`), by the commands they
# mean something to. Inside a subcommand their default is SUPPRESS, so a
# value given before it is not overwritten by the subcommand's default.
_GLOBALS = {
    "config": (("--config",), dict(
        metavar="FILE", help=f"TOML configuration file (default {DEFAULT_CONFIG_PATH}, if it exists; "
                             "none for serve --dev)")),
    "spool": (("--spool",), dict(
        metavar="DIR", help="spool directory (overrides the configuration; default /var/lib/smtpgate)")),
    "server": (("--server",), dict(
        metavar="URI", action="append",
        help="the daemon: tcp://HOST:PORT or unix:///PATH; repeat it to fail over to the next one "
             "when a daemon is down or busy (default $SMTPGATE_SERVER, else tcp://127.0.0.1:2526)")),
    "token_file": (("--token-file",), dict(
        metavar="FILE", help="file holding the client token for AUTH (default: $SMTPGATE_TOKEN); "
                             "never on the command line, where ps shows it to every user")),
}
_USES = {"serve": ("config", "spool"), "queue": ("config", "spool"),
         "send": ("server", "token_file"), "stats": ("server", "token_file")}


class _Parser(argparse.ArgumentParser):
    """A usage error exits EX_USAGE (64), as the exit-code tables say, not 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_globals(p, names, default) -> None:
    for name in names:
        flags, kwargs = _GLOBALS[name]
        p.add_argument(*flags, default=default, **kwargs)


def _command(sub, name: str, help: str, exits: str, description: str | None = None):
    p = sub.add_parser(name, help=help, description=description or help, epilog=exits,
                       formatter_class=HelpFormatter)
    _add_globals(p, _USES.get(name, ()), argparse.SUPPRESS)
    return p


def _serve_parser(sub) -> None:
    p = _command(sub, "serve", "run the daemon", epilog(
        (EX_OK, "stopped cleanly (SIGTERM, SIGINT)"),
        (EX_USAGE, "a command-line mistake"),
        (EX_SOFTWARE, "the delivery process died (restart it: nothing is lost)"),
        (EX_OSERR, "could not listen: an address in use, a socket path it may not create"),
        (EX_CANTCREAT, "the spool is locked by another daemon, of a newer schema, or unusable"),
        (EX_CONFIG, "the configuration (file, options, secret files) is invalid or unreadable")),
        description="Run the daemon in the foreground: intake, spool writer and delivery. Options "
                    "override the configuration file's keys (docs/configuration.md).")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="TCP address for the line protocol (repeatable; default 127.0.0.1:2526)")
    p.add_argument("--socket", metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--upstream", action="append", metavar="HOST:PORT",
                   help="upstream SMTP server; repeat for failover, tried in order")
    p.add_argument("--upstream-tls", choices=("none", "starttls", "tls"),
                   help="how to secure the upstream session: tls (port 465), starttls (587, 25) "
                        "or none; certificates are verified")
    p.add_argument("--upstream-user", metavar="USER", help="user name for the upstream's AUTH")
    p.add_argument("--upstream-password-file", metavar="FILE",
                   help="file holding the upstream password (one line; mode 0600)")
    p.add_argument("--upstream-password-env", metavar="VAR",
                   help="name of the environment variable holding the upstream password")
    p.add_argument("--upstream-oauth2-token-file", metavar="FILE",
                   help="XOAUTH2 access token (refreshed by another tool; reload to pick it up)")
    p.add_argument("--upstream-ca-file", metavar="FILE",
                   help="CA certificates to verify the upstream with (default: the system's)")
    p.add_argument("--smtp-listen", metavar="HOST:PORT", help="also accept mail over SMTP here")
    p.add_argument("--tokens-file", metavar="FILE", help="file of client tokens, one a line")
    p.add_argument("--dev", action="store_true", default=None,
                   help="relay to an embedded SMTP server that writes .eml files (no real mail leaves)")
    p.add_argument("--dev-maildir", metavar="DIR", help="where --dev writes .eml files (default SPOOL/dev-mail)")
    p.add_argument("--log-format", choices=("auto", "json", "console"),
                   help="log lines as JSON or for people (auto: JSON unless stderr is a terminal)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="the least important level logged (default info)")


def _serve(args) -> int:
    from smtpgate.daemon import serve

    keys = ("listen", "socket", "spool", "upstream", "upstream_tls", "upstream_user",
            "upstream_password_file", "upstream_password_env", "upstream_oauth2_token_file",
            "upstream_ca_file",
            "smtp_listen", "tokens_file", "dev", "dev_maildir", "log_format", "log_level")
    overrides = {key: getattr(args, key) for key in keys}
    return serve(_serve_config(args), overrides)


def _serve_config(args) -> str | None:
    """The configuration file `serve` reads: --config, else the installed
    one where it exists; never that one for --dev, whose daemon would then
    relay the installed service's configuration to its embedded server."""
    if args.config or args.dev:
        return args.config
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def _add_client_args(p) -> None:
    """The options of the commands that talk to the daemon, beside --server
    and --token-file. --token is hidden, and refused with a pointer to
    --token-file: ps and shell histories show the command line."""
    p.add_argument("--timeout", type=_seconds(1), default=10.0, metavar="SECONDS",
                   help="connect, read and write timeout (default 10)")
    p.add_argument("--token", help=argparse.SUPPRESS)


def _seconds(least: float):
    """An argparse type: seconds from `least` to a day, as smtpgate-send takes them."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not least <= value <= 86400:
            raise argparse.ArgumentTypeError(f"needs seconds ({least:g}..86400), got {text!r}")
        return value
    return parse


class _CommandError(Exception):
    """A command we will not or cannot finish: (exit code, message)."""


def _token(args) -> str | None:
    if args.token is not None:
        raise _CommandError(EX_USAGE, "--token is not accepted (ps shows the command line to every "
                                      "user); use --token-file FILE or $SMTPGATE_TOKEN")
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                return fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise _CommandError(EX_NOINPUT, f"cannot read the token file {args.token_file}: "
                                            f"{getattr(exc, 'strerror', None) or exc}") from None
    return os.environ.get("SMTPGATE_TOKEN")


def _servers(args) -> list[str]:
    from smtpgate.tools.lineclient import DEFAULT_URI

    return args.server or [os.environ.get("SMTPGATE_SERVER") or DEFAULT_URI]


def _request(args, token: str | None, do):
    """Run `do(client)` on the first server that takes it, failing over past
    one that is down, busy or not speaking the protocol; its result, or
    _CommandError with the code of the last failure. A refusal for good
    (a bad address, a wrong token) is not tried elsewhere."""
    import socket

    from smtpgate.protocol.codes import RETRYABLE_CODES
    from smtpgate.tools.exits import exit_for_error
    from smtpgate.tools.lineclient import LineClient, ProtocolError, RemoteError

    failure = None
    servers = _servers(args)
    again = getattr(args, "idempotency_key", None) is not None  # one repeat to the same daemon
    while servers:
        uri = servers[0]
        if failure:  # passed over; the last failure is the command's error
            print(f"smtpgate {args.command}: {failure[1]}", file=sys.stderr)
        client = None
        try:
            client = LineClient(uri, token=token, timeout=args.timeout)
            with client:
                return do(client)
        except ValueError as exc:
            raise _CommandError(EX_USAGE, str(exc)) from None
        except RemoteError as exc:
            failure = (exit_for_error(exc.code), f"{uri} refused: {exc.code} {exc.text}")
            if exc.code not in RETRYABLE_CODES:
                break
        except socket.gaierror as exc:
            failure = (EX_NOHOST, f"cannot resolve the daemon's host in {uri}: {exc.strerror}")
        except (ProtocolError, OSError) as exc:
            text = str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)
            code = EX_SOFTWARE if isinstance(exc, ProtocolError) else EX_TEMPFAIL
            if client is not None and client.unanswered == "SEND":
                # The daemon may have stored it without getting to answer: the
                # next one would deliver it twice. With its key, the same
                # daemon answers a repeat with the first id.
                if again:
                    again = False
                    print(f"smtpgate {args.command}: {uri}: no reply to the SEND ({text}); "
                          "sending it again with its idempotency key", file=sys.stderr)
                    continue
                raise _CommandError(code, f"{uri}: the SEND went out and no reply came ({text}): outcome "
                                          "unknown, the daemon may have stored it; sending it again may deliver "
                                          "it twice, unless with the same -k KEY to the same daemon") from None
            failure = (code, f"{uri} does not speak the line protocol: {text}" if code == EX_SOFTWARE
                       else f"daemon unreachable at {uri}: {text or type(exc).__name__}")
        servers = servers[1:]
    raise _CommandError(*failure)


_SEND_EXITS = epilog(
    (EX_OK, "the daemon has the message (with --wait: sent); its id is on stdout"),
    (EX_USAGE, "the command line: an unknown option, no -f, -t or -s, a bad --server"),
    (EX_DATAERR, "the message: the body is not UTF-8, or BAD_REQUEST, BAD_HEADER, TOO_LARGE"),
    (EX_NOINPUT, "an attachment or the token file cannot be read"),
    (EX_NOUSER, "an address was refused: BAD_ADDRESS, DENIED"),
    (EX_NOHOST, "the daemon's host name does not resolve"),
    (EX_UNAVAILABLE, "with --wait: the message failed; or refused for another reason"),
    (EX_SOFTWARE, "the peer does not speak the line protocol (a wrong port?)"),
    (EX_TEMPFAIL, "nothing stored: every daemon down, BUSY or INTERNAL (try again later); "
                  "or the SEND went out and no reply came: maybe stored, never sent to another "
                  "--server (again only with the same -k to the same daemon, which this command "
                  "does once itself); with --wait: stored, but not final when the time ran out"),
    (EX_NOPERM, "AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong"))


_SEND_DESCRIPTION = ("Hand one message to the daemon and print the id it gave. The body is read "
                     "from stdin (UTF-8). `smtpgate send` and the C `smtpgate-send` (clients/c) "
                     "take the same flags and exit with the same codes.")


def _send_parser(sub) -> None:
    p = _command(sub, "send", "hand one message to the daemon; the body is read from stdin", _SEND_EXITS,
                 description=_SEND_DESCRIPTION)
    _send_arguments(p)


def send_parser() -> argparse.ArgumentParser:
    """`smtpgate send` on its own, as the man page smtpgate-send(1) of the C
    command documents it (tests/test_exit_codes.py holds both to it)."""
    p = _Parser(prog="smtpgate-send", description=_SEND_DESCRIPTION, epilog=_SEND_EXITS,
                formatter_class=HelpFormatter)
    _add_globals(p, _USES["send"], None)
    _send_arguments(p)
    return p


def _send_arguments(p) -> None:
    p.add_argument("-f", "--from", dest="sender", required=True, metavar="ADDRESS",
                   help="sender address ('Name <a@example.com>' or a@example.com)")
    p.add_argument("-t", "--to", action="append", default=[], metavar="ADDRESS",
                   help="recipient (repeatable)")
    p.add_argument("-c", "--cc", action="append", default=[], metavar="ADDRESS",
                   help="Cc recipient (repeatable)")
    p.add_argument("-b", "--bcc", action="append", default=[], metavar="ADDRESS",
                   help="Bcc recipient (repeatable; not shown in the message)")
    p.add_argument("-r", "--reply-to", action="append", default=[], metavar="ADDRESS",
                   help="Reply-To address (repeatable)")
    p.add_argument("-s", "--subject", required=True, help="subject (UTF-8; '' for none)")
    p.add_argument("-a", "--attach", action="append", default=[], metavar="FILE",
                   help="attach a file (repeatable; its type guessed from the name)")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra header field (repeatable)")
    p.add_argument("-k", "--idempotency-key", metavar="KEY",
                   help="a repeat with the same key queues nothing new and answers the first id")
    p.add_argument("--html", action="store_true", help="the body on stdin is HTML, not plain text")
    p.add_argument("--wait", type=_seconds(0), metavar="SECONDS",
                   help="wait up to SECONDS (0 to 86400; 0: do not wait) for the message to be sent "
                        "or to fail, and print its state")
    _add_client_args(p)


def _read_message(args) -> dict:
    """The SEND object from the options and stdin; _CommandError for what cannot be sent."""
    if not (args.to or args.cc or args.bcc):
        raise _CommandError(EX_USAGE, "at least one -t, -c or -b is required")
    data = sys.stdin.buffer.read()
    try:
        body = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _CommandError(EX_DATAERR, f"the body on stdin is not UTF-8 (at byte {exc.start})") from None
    message: dict = {"from": args.sender, "to": args.to, "subject": args.subject,
                     ("html" if args.html else "text"): body}
    for key, values in (("cc", args.cc), ("bcc", args.bcc), ("reply_to", args.reply_to)):
        if values:
            message[key] = values
    if args.idempotency_key:
        message["idempotency_key"] = args.idempotency_key
    if args.header:
        bad = [h for h in args.header if ":" not in h]
        if bad:
            raise _CommandError(EX_USAGE, f"header {bad[0]!r} is not 'Name: value'")
        message["headers"] = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in args.header)}
    attachments = []
    for path in args.attach:
        try:
            with open(path, "rb") as fh:
                content = fh.read()
        except OSError as exc:
            raise _CommandError(EX_NOINPUT, f"cannot read the attachment {path}: {exc.strerror}") from None
        attachments.append({"filename": os.path.basename(path),
                            "content_type": mimetypes.guess_type(path)[0] or "application/octet-stream",
                            "content_base64": base64.b64encode(content).decode()})
    if attachments:
        message["attachments"] = attachments
    return message


# The daemon answers one WAIT for at most this long (docs/protocol.md).
_MAX_WAIT_PER_REQUEST = 3600


def _send(args) -> int:
    from smtpgate.spool.schema import State
    from smtpgate.tools.lineclient import RemoteError

    token = _token(args)
    message = _read_message(args)

    def hand_off(client) -> int:
        msg_id = client.send(message)
        print(msg_id, flush=True)
        if not args.wait:
            return EX_OK
        try:
            state = _wait(client, msg_id, args.wait, args.timeout)
        except (OSError, RemoteError) as exc:
            # Stored: it must not fail over to another daemon (a duplicate).
            raise _CommandError(EX_TEMPFAIL, f"message {msg_id} queued, but waiting failed: {exc}") from None
        print(json.dumps(state, ensure_ascii=False))
        if state["state"] == State.SENT:
            return EX_OK
        print(f"smtpgate send: message {msg_id} is {state['state']}", file=sys.stderr)
        return EX_UNAVAILABLE if state["state"] == State.FAILED else EX_TEMPFAIL

    return _request(args, token, hand_off)


def _wait(client, msg_id: str, seconds: float, timeout: float) -> dict:
    """WAIT until the message is final or `seconds` passed (several WAITs
    past the daemon's cap); its last state."""
    import time

    from smtpgate.spool.schema import FINAL_STATES

    until = time.monotonic() + seconds
    while True:
        left = min(max(0.0, until - time.monotonic()), _MAX_WAIT_PER_REQUEST)
        client.sock.settimeout(left + timeout)  # the daemon answers a WAIT after `left`
        state = client.wait(msg_id, left)
        if state["state"] in FINAL_STATES or time.monotonic() >= until:
            return state


def _stats_parser(sub) -> None:
    p = _command(sub, "stats", "the running daemon's counters (STATS), readable", epilog(
        (EX_OK, "printed"),
        (EX_USAGE, "the command line"),
        (EX_NOHOST, "the daemon's host name does not resolve"),
        (EX_SOFTWARE, "the peer does not speak the line protocol (a wrong port?)"),
        (EX_TEMPFAIL, "the daemon is not reachable"),
        (EX_NOPERM, "AUTH_REQUIRED, AUTH_FAILED: the token is missing or wrong")),
        description="Ask the running daemon for STATS over the line protocol and print it for "
                    "people: messages by state, counters since start, intake, spool commits, "
                    "callers and upstreams.")
    p.add_argument("--json", action="store_true", help="print STATS as the daemon sent it (one JSON line)")
    _add_client_args(p)


def _stats(args) -> int:
    from smtpgate.tools.stats import format_stats

    stats = _request(args, _token(args), lambda client: client.stats())
    print(json.dumps(stats, ensure_ascii=False) if args.json else format_stats(stats))
    return EX_OK


def _queue_parser(sub) -> None:
    p = _command(sub, "queue", "inspect and manage the queue (like mailq/postqueue)", epilog(
        (EX_OK, "done"),
        (1, "no such message (show, delete, retry ID)"),
        (EX_USAGE, "the command line"),
        (EX_NOINPUT, "the spool cannot be opened (give --spool DIR or --config FILE)"),
        (EX_CONFIG, "the configuration file cannot be read")),
        description="Inspect and manage the spool, whether or not the daemon runs (the spool "
                    "named by --spool, else by the configuration file, else /var/lib/smtpgate). "
                    "After a change the running daemon is told with SIGUSR1.")
    qsub = p.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    leaf = {"formatter_class": HelpFormatter, "epilog": p.epilog}
    ls = qsub.add_parser("list", help="messages not yet final, with totals by state", **leaf)
    ls.add_argument("--all", action="store_true", help="every message kept, final ones too")
    ls.add_argument("--json", action="store_true", help="one JSON array of the messages")
    show = qsub.add_parser("show", help="one message: state, recipients, replies, attempts", **leaf)
    show.add_argument("id", help="the message id (as SEND answered it)")
    retry = qsub.add_parser("retry", help="make deferred messages due now (and probe a down upstream at once)",
                            **leaf)
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?", help="the message id")
    group.add_argument("--all", action="store_true", help="every deferred message")
    delete = qsub.add_parser("delete", help="remove a message from the queue", **leaf)
    delete.add_argument("id", help="the message id")
    upstreams = qsub.add_parser("upstreams", help="each upstream's state as the running daemon sees it",
                                **leaf)
    upstreams.add_argument("--json", action="store_true", help="one JSON array")
    for q in (ls, show, retry, delete, upstreams):
        _add_globals(q, _USES["queue"], argparse.SUPPRESS)


def _queue(args) -> int:
    from smtpgate.tools.queue import run_queue_command

    return run_queue_command(args)


def _demo(args) -> int:
    from smtpgate.tools.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: --help, the man page smtpgate(8) and the
    shell completion are made from it."""
    parser = _Parser(
        prog="smtpgate", formatter_class=HelpFormatter,
        description="smtpgate: a mail relay daemon. Programs hand a message over in one line; "
                    "smtpgate stores it durably and relays it over SMTP.",
        epilog="Each command's own exit codes: smtpgate COMMAND --help. "
               "Options such as --config, --spool and --server go before or after the command.")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    _add_globals(parser, _GLOBALS, None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _send_parser(sub)
    _stats_parser(sub)
    _queue_parser(sub)
    _command(sub, "demo", "run the daemon with --dev, send one message through it, show it",
             epilog((EX_OK, "the message was delivered to the embedded server"),
                    (EX_SOFTWARE, "the daemon did not start or the message was not delivered")))
    sub.add_parser("sendmail", help="sendmail-compatible command for PHP's mail(), cron, ... "
                                    "(smtpgate sendmail --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        # sendmail's flags (-t -i -oi -f ...) are not argparse's: hand them over untouched.
        from smtpgate.tools.sendmail import main as sendmail_main

        return sendmail_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    unused = [_GLOBALS[name][0][0] for name in _GLOBALS
              if getattr(args, name, None) is not None and name not in _USES.get(args.command, ())]
    if unused:
        parser.error(f"{unused[0]} means nothing to `smtpgate {args.command}`")
    run = {"serve": _serve, "send": _send, "stats": _stats, "queue": _queue, "demo": _demo}[args.command]
    try:
        return run(args)
    except _CommandError as exc:
        code, text = exc.args
        print(f"smtpgate {args.command}: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
