"""The `smtpgate` command: serve, send, queue, sendmail."""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys

from smtpgate import __version__
from smtpgate.config import DEFAULT_CONFIG_PATH
from smtpgate.spool.schema import State

# sysexits.h, as sendmail and postqueue use them.
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = (
    0, 64, 65, 66, 69, 70, 75, 78)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="TCP address for the line protocol (repeatable; default 127.0.0.1:2526)")
    p.add_argument("--socket", metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--spool", metavar="DIR", help="spool directory (default /var/lib/smtpgate)")
    p.add_argument("--upstream", action="append", metavar="HOST:PORT",
                   help="upstream SMTP server; repeat for failover, tried in order")
    p.add_argument("--upstream-tls", choices=("none", "starttls", "tls"))
    p.add_argument("--upstream-user", metavar="USER")
    p.add_argument("--upstream-password-file", metavar="FILE")
    p.add_argument("--upstream-password-env", metavar="VAR",
                   help="name of the environment variable holding the upstream password")
    p.add_argument("--upstream-oauth2-token-file", metavar="FILE",
                   help="XOAUTH2 access token (refreshed by another tool; reload to pick it up)")
    p.add_argument("--upstream-ca-file", metavar="FILE")
    p.add_argument("--smtp-listen", metavar="HOST:PORT", help="also accept mail over SMTP here")
    p.add_argument("--tokens-file", metavar="FILE", help="file of client tokens, one a line")
    p.add_argument("--dev", action="store_true", default=None,
                   help="relay to an embedded SMTP server that writes .eml files (no real mail leaves)")
    p.add_argument("--dev-maildir", metavar="DIR", help="where --dev writes .eml files (default SPOOL/dev-mail)")
    p.add_argument("--log-format", choices=("auto", "json", "console"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def _serve(args) -> int:
    from smtpgate.daemon import serve

    keys = ("listen", "socket", "spool", "upstream", "upstream_tls", "upstream_user",
            "upstream_password_file", "upstream_password_env", "upstream_oauth2_token_file",
            "upstream_ca_file",
            "smtp_listen", "tokens_file", "dev", "dev_maildir", "log_format", "log_level")
    overrides = {key: getattr(args, key) for key in keys}
    return serve(args.config, overrides)


def _add_server_args(p) -> None:
    p.add_argument("--server", metavar="URI",
                   help="tcp://HOST:PORT or unix:///PATH (default $SMTPGATE_SERVER or tcp://127.0.0.1:2526)")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the client token (default: the token in $SMTPGATE_TOKEN)")
    # Refused with a pointer to the two above: ps and shell histories show argv.
    p.add_argument("--token", help=argparse.SUPPRESS)


class _CommandError(Exception):
    """A command line we will not run: (exit code, message)."""


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


def _connect(args, token: str | None):
    from smtpgate.tools.lineclient import DEFAULT_URI, LineClient

    uri = args.server or os.environ.get("SMTPGATE_SERVER") or DEFAULT_URI
    return LineClient(uri, token=token)


def _send_parser(sub) -> None:
    p = sub.add_parser("send", help="hand one message to the daemon; the body is read from stdin")
    _add_server_args(p)
    p.add_argument("-f", "--from", dest="sender", required=True)
    p.add_argument("-t", "--to", action="append", default=[])
    p.add_argument("-c", "--cc", action="append", default=[])
    p.add_argument("-b", "--bcc", action="append", default=[])
    p.add_argument("-s", "--subject", default="")
    p.add_argument("-a", "--attach", action="append", default=[], metavar="FILE")
    p.add_argument("--html", action="store_true", help="the body is HTML")
    p.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the final state and print it")


def _send(args) -> int:
    from smtpgate.tools.lineclient import RemoteError

    try:
        token = _token(args)
    except _CommandError as exc:
        code, text = exc.args
        print(f"smtpgate send: {text}", file=sys.stderr)
        return code
    body = sys.stdin.buffer.read().decode("utf-8", "replace")
    message: dict = {"from": args.sender, "to": args.to, "subject": args.subject,
                     ("html" if args.html else "text"): body}
    if args.cc:
        message["cc"] = args.cc
    if args.bcc:
        message["bcc"] = args.bcc
    if args.idempotency_key:
        message["idempotency_key"] = args.idempotency_key
    if args.header:
        if not all(":" in h for h in args.header):
            print("smtpgate send: --header takes NAME:VALUE", file=sys.stderr)
            return EX_USAGE
        message["headers"] = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in args.header)}
    attachments = []
    for path in args.attach:
        try:
            with open(path, "rb") as fh:
                content = fh.read()
        except OSError as exc:
            print(f"smtpgate send: {path}: {exc.strerror}", file=sys.stderr)
            return EX_DATAERR
        attachments.append({"filename": os.path.basename(path),
                            "content_type": mimetypes.guess_type(path)[0] or "application/octet-stream",
                            "content_base64": base64.b64encode(content).decode()})
    if attachments:
        message["attachments"] = attachments
    try:
        with _connect(args, token) as client:
            msg_id = client.send(message)
            print(msg_id)
            if args.wait is not None:
                state = client.wait(msg_id, args.wait)
                print(json.dumps(state, ensure_ascii=False))
                if state["state"] == State.FAILED:
                    return EX_UNAVAILABLE
                if state["state"] != State.SENT:
                    return EX_TEMPFAIL
    except RemoteError as exc:
        print(f"smtpgate send: refused: {exc.code} {exc.text}", file=sys.stderr)
        return EX_TEMPFAIL if exc.code in ("BUSY", "INTERNAL") else EX_DATAERR
    except (OSError, ValueError) as exc:
        print(f"smtpgate send: daemon unreachable: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


def _queue_parser(sub) -> None:
    p = sub.add_parser("queue", help="inspect and manage the queue (like mailq/postqueue)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"configuration file naming the spool (default {DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--spool", metavar="DIR", help="spool directory (overrides the config)")
    qsub = p.add_subparsers(dest="queue_command", required=True)
    ls = qsub.add_parser("list", help="messages not yet final (--all: every message kept)")
    ls.add_argument("--all", action="store_true")
    ls.add_argument("--json", action="store_true")
    show = qsub.add_parser("show", help="one message: state, recipients, replies")
    show.add_argument("id")
    retry = qsub.add_parser("retry", help="make deferred messages due now (and probe a down upstream at once)")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("id", nargs="?")
    group.add_argument("--all", action="store_true")
    delete = qsub.add_parser("delete", help="remove a message from the queue")
    delete.add_argument("id")
    upstreams = qsub.add_parser("upstreams", help="each upstream's state as the running daemon sees it")
    upstreams.add_argument("--json", action="store_true")


def _queue(args) -> int:
    from smtpgate.tools.queue import run_queue_command

    return run_queue_command(args)


def _demo(args) -> int:
    from smtpgate.tools.demo import run_demo

    return run_demo()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sendmail"]:
        # sendmail's flags (-t -i -oi -f ...) are not argparse's: hand them over untouched.
        from smtpgate.tools.sendmail import main as sendmail_main

        return sendmail_main(argv[1:])
    parser = argparse.ArgumentParser(prog="smtpgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _send_parser(sub)
    _queue_parser(sub)
    sub.add_parser("demo", help="run the daemon with --dev, send one message through it, show it")
    sub.add_parser("sendmail", help="sendmail-compatible command for PHP's mail() (see docs/operations.md)")
    args = parser.parse_args(argv)
    return {"serve": _serve, "send": _send, "queue": _queue, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
