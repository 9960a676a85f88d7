"""The `smtpgate` command's habits: global options before or after the
subcommand, help for every flag, `sendmail --help`, `queue list` with a
header and totals, `stats` against a running daemon, and the man pages and
shell completion made from the same parsers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_daemon import SIMPLE, ok_payload, send_line
from test_queuetool import smtpgate, wait_state

from smtpgate.tools.cli import build_parser, send_parser
from smtpgate.tools.sendmail import help_parser

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "docs" / "man"


def test_global_options_go_before_or_after_the_subcommand(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0, retry_max=600.0)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    wait_state(daemon, msg_id, "deferred")
    for args in (["--spool", daemon.spool, "queue", "list"],
                 ["queue", "--spool", daemon.spool, "list"],
                 ["queue", "list", "--spool", daemon.spool]):
        done = smtpgate(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert msg_id in done.stdout
    before = smtpgate("--server", daemon.uri, "stats", "--json")
    after = smtpgate("stats", "--json", "--server", daemon.uri)
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout)["counters"]["accepted"] == 1
    # An option that means nothing to the command is a usage error, not ignored.
    misplaced = smtpgate("--server", daemon.uri, "queue", "list", "--spool", daemon.spool)
    assert misplaced.returncode == 64 and "--server means nothing to `smtpgate queue`" in misplaced.stderr


def test_queue_list_has_a_header_and_totals_by_state(make_daemon):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0, retry_max=600.0)
    ids = [ok_payload(daemon.request(send_line(dict(SIMPLE, subject=str(n))))) for n in range(3)]
    for msg_id in ids:
        wait_state(daemon, msg_id, "deferred")
    lines = smtpgate("queue", "list", "--spool", daemon.spool).stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("ID ")))
    assert lines[header].split()[:3] == ["ID", "STATE", "TRIES"]
    assert lines[header + 1].startswith(ids[0])  # oldest first, under the header
    assert lines[-1] == "-- 3 messages: 3 deferred"
    assert smtpgate("queue", "list", "--spool", daemon.spool, "--json").stdout.startswith("[")


def test_queue_tools_print_an_upstreams_control_characters_escaped(make_daemon, upstream):
    """A reply is another server's text: an escape sequence in it must not
    reach the operator's terminal (it could clear the screen or retitle the
    window), and the JSON stays the same value."""
    reply = "450 4.2.0 \x1b]0;owned\x07busy \x1b[2J\x9b2J, try later"
    upstream.script_rcpt("kelly@example.org", *[reply] * 3)
    daemon = make_daemon(upstream=[upstream.hostport], retry_base=600.0, retry_max=600.0)
    msg_id = ok_payload(daemon.request(send_line(SIMPLE)))
    assert wait_state(daemon, msg_id, "deferred")["state"] == "deferred"
    listed = smtpgate("queue", "list", "--spool", daemon.spool).stdout
    assert "450 4.2.0 \\x1b]0;owned\\x07busy \\x1b[2J\\x9b2J, try later" in listed, listed
    for how in (["list", "--json"], ["show", msg_id]):
        text = smtpgate("queue", *how, "--spool", daemon.spool).stdout
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), text
        found = json.loads(text)
        assert (found[0] if isinstance(found, list) else found)["recipients"][0]["reply"] == reply


def test_stats_is_readable_and_names_the_daemon_it_cannot_reach(daemon, upstream, tmp_path):
    ok_payload(daemon.request(send_line(SIMPLE)))
    upstream.wait_for(1)
    shown = smtpgate("stats", "--server", daemon.uri)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("smtpgate ") and " up " in lines[0]
    assert any(line.startswith("since start:") and "accepted 1" in line for line in lines), shown.stdout
    gone = f"unix://{tmp_path / 'no.sock'}"
    down = smtpgate("stats", "--server", gone)
    assert down.returncode == 75
    assert f"daemon unreachable at {gone}: No such file or directory" in down.stderr


def test_send_waits_longer_than_its_io_timeout(make_daemon):
    """--timeout bounds each read, but a WAIT is answered after its seconds."""
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0, retry_max=600.0)
    done = smtpgate("send", "--server", daemon.uri, "-f", "a@example.com", "-t", "b@example.org", "-s", "s",
                    "--wait", "3", "--timeout", "1", stdin="x")
    assert done.returncode == 75, done.stderr
    msg_id, state = done.stdout.splitlines()
    assert json.loads(state)["state"] == "deferred" and "waiting failed" not in done.stderr


@contextlib.contextmanager
def stalled(daemon):
    """The daemon frozen (SIGSTOP): the kernel still completes connects and
    takes the request's bytes, but no reply comes until it is thawed."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


def accepted(daemon) -> int:
    return json.loads(ok_payload(daemon.request("STATS")))["counters"]["accepted"]


def test_send_that_went_out_unanswered_is_not_failed_over(make_daemon, upstream):
    """The first daemon may have stored a SEND it did not answer in time:
    handing it to the second too would deliver it twice (as smtpgate-send)."""
    first, second = make_daemon(), make_daemon()
    with stalled(first):
        done = smtpgate("send", "--server", first.uri, "--server", second.uri, "--timeout", "1",
                        "-f", "a@example.com", "-t", "b@example.org", "-s", "stalled", stdin="x")
    assert (done.returncode, done.stdout) == (75, ""), done.stderr
    assert "outcome unknown" in done.stderr and "may deliver it twice" in done.stderr
    assert accepted(second) == 0
    assert [m.message["subject"] for m in upstream.wait_for(1)] == ["stalled"]  # thawed: once
    # With a key, one repeat to the same daemon, which answers it with the first id.
    with stalled(first):
        keyed = subprocess.Popen([sys.executable, "-m", "smtpgate", "send", "--server", first.uri,
                                  "--server", second.uri, "--timeout", "2", "-k", "order-42", "-f",
                                  "a@example.com", "-t", "b@example.org", "-s", "keyed"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        keyed.stdin.write("x")
        keyed.stdin.close()
        while "sending it again" not in (line := keyed.stderr.readline()):
            assert line, "the command ended without sending again"
    assert keyed.wait(timeout=60) == 0, keyed.stderr.read()
    assert keyed.stdout.read().strip()
    assert accepted(first) == 2 and accepted(second) == 0
    assert [m.message["subject"] for m in upstream.wait_for(2)] == ["stalled", "keyed"]


def test_serve_reads_the_installed_configuration_unless_told_or_dev(tmp_path, monkeypatch):
    """`--config`'s help promises /etc/smtpgate/smtpgate.toml when it
    exists; a development daemon must not pick the installed service's up."""
    import smtpgate.daemon
    from smtpgate.tools import cli

    read = []
    monkeypatch.setattr(smtpgate.daemon, "serve", lambda path, overrides: read.append(path) or 0)
    installed = tmp_path / "smtpgate.toml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", str(installed))
    assert cli.main(["serve"]) == 0  # not installed: no file
    installed.write_text('upstream = ["127.0.0.1:25"]\n')
    assert cli.main(["serve"]) == 0
    assert cli.main(["serve", "--dev"]) == 0
    assert cli.main(["serve", "--dev", "--config", str(tmp_path / "dev.toml")]) == 0
    assert read == [None, str(installed), None, str(tmp_path / "dev.toml")]


def test_sendmail_help_only_as_the_sole_argument():
    helped = smtpgate("sendmail", "--help")
    assert helped.returncode == 0 and "usage: smtpgate sendmail" in helped.stdout
    assert "exit codes" in helped.stdout and "-bs" in helped.stdout
    # Anywhere else it is an option sendmail does not know: refused, nothing sent.
    for args in (["--help", "kelly@example.org"], ["-t", "--help"]):
        refused = smtpgate("sendmail", *args, stdin="Subject: x\n\nx\n")
        assert refused.returncode == 64 and "unknown option --help" in refused.stderr


def _parsers():
    main = build_parser()
    yield main
    for action in main._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                for inner in sub._actions:
                    if isinstance(inner, argparse._SubParsersAction):
                        yield from inner.choices.values()
    yield send_parser()
    yield help_parser()


def test_every_flag_has_help_and_every_command_lists_exit_codes():
    for parser in _parsers():
        if parser.prog == "smtpgate sendmail" and parser.add_help is False and not parser._actions:
            continue  # the placeholder of the main parser: sendmail parses its own command line
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
        if parser.prog != "smtpgate":
            assert parser.epilog and parser.epilog.startswith("exit codes"), parser.prog


# -- man pages and completion -------------------------------------------------------

def test_man_pages_and_completion_are_up_to_date():
    done = subprocess.run([sys.executable, str(MAN / "generate.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + " (run python docs/man/generate.py)"


@pytest.mark.parametrize("page, heading", [
    ("smtpgate.8", "SMTPGATE(8)"), ("smtpgate-send.1", "SMTPGATE-SEND(1)"),
    ("smtpgate-sendmail.8", "SMTPGATE-SENDMAIL(8)"), ("smtpgate.toml.5", "SMTPGATE.TOML(5)")])
def test_man_renders_each_page(page, heading):
    done = subprocess.run(["man", "--warnings", "-l", str(MAN / page)], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, MANWIDTH="80"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = re.sub(".\x08", "", done.stdout)  # bold and underline as overstrikes, when piped
    assert text.startswith(heading)
    words = {"smtpgate.8": "--spool DIR", "smtpgate-send.1": "--token-file FILE",
             "smtpgate-sendmail.8": "-bs", "smtpgate.toml.5": "max_message_size"}
    assert words[page] in text


def test_bash_completion_completes_subcommands_and_options():
    script = REPO / "docs" / "completion" / "smtpgate.bash"
    probe = (f"source {script}\n"
             "COMP_WORDS=(smtpgate queue l); COMP_CWORD=2; _shtab_smtpgate; echo \"${COMPREPLY[@]}\"\n"
             "COMP_WORDS=(smtpgate send --idem); COMP_CWORD=2; _shtab_smtpgate; echo \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["list", "--idempotency-key"], done.stdout


def test_zsh_completion_is_valid_zsh():
    done = subprocess.run(["zsh", "-n", str(REPO / "docs" / "completion" / "_smtpgate")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
