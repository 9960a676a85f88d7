"""The Prometheus side checked with Prometheus' own tool: the alert rules of
docs/prometheus/ (`promtool check rules`, and `promtool test rules` with
their unit tests, each alert shown firing and not), the copy of them that
docs/operations.md shows, and a real scrape of /metrics after real
deliveries (`promtool check metrics`, its lint of names, types and help)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from http_support import http_daemon, request, wait_until
from test_http import message

RULES = Path(__file__).resolve().parent.parent / "docs" / "prometheus"
OPERATIONS = RULES.parent / "operations.md"


def promtool() -> str:
    """Debian's promtool: on PATH, or unpacked into the venv by tests/setup.sh."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    assert found, "promtool is missing: run tests/setup.sh"
    return found


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, cwd=RULES, timeout=60)


def test_the_alert_rules_pass_promtool_and_their_unit_tests():
    checked = run("check", "rules", "smtpgate-alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert b"SUCCESS: 3 rules found" in checked.stdout
    tested = run("test", "rules", "smtpgate-alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_operations_md_shows_the_rules_file_as_it_is():
    rules = (RULES / "smtpgate-alerts.yml").read_text()
    shown = OPERATIONS.read_text().split("```yaml\n# Alert rules for smtpgate", 1)[1].split("```", 1)[0]
    assert "# Alert rules for smtpgate" + shown == rules


def test_a_real_scrape_passes_promtool_check_metrics(make_daemon, upstream):
    daemon = http_daemon(make_daemon)
    upstream.script_rcpt("later@example.org", "451 4.3.0 try again later")
    with daemon.client() as client:
        client.send(message("now@example.org"))
        client.send(message("later@example.org"))
    upstream.wait_for(1)
    scrape = wait_until(lambda: (r := request(daemon.http, "GET", "/metrics"))
                        and b'smtpgate_upstream_messages_total{result="deferred"' in r.body and r.body,
                        what="the deferral on /metrics")
    linted = run("check", "metrics", stdin=scrape)
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, b"")


def test_process_figures_are_reported_where_proc_stat_is_hidden(tmp_path):
    """The unit's ProcSubset=pid leaves /proc/self and hides /proc/stat,
    whose boot time prometheus-client's process collector needs: a /proc of
    the process's own files alone still gives every process_* family, its
    start time the same as with the whole /proc."""
    from prometheus_client.process_collector import ProcessCollector

    from smtpgate.http.metrics import _ProcessCollector

    (tmp_path / "self").symlink_to("/proc/self")
    assert not (tmp_path / "stat").exists()
    hidden = {f.name: f for f in _ProcessCollector(proc=str(tmp_path), registry=None).collect()}
    whole = {f.name: f for f in ProcessCollector(registry=None).collect()}
    assert set(hidden) == set(whole) >= {"process_cpu_seconds", "process_resident_memory_bytes",
                                         "process_start_time_seconds", "process_open_fds"}
    started = [f.samples[0].value for f in (hidden["process_start_time_seconds"], whole["process_start_time_seconds"])]
    assert abs(started[0] - started[1]) < 1.0
