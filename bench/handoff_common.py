"""Helpers for the client hand-off benches (bench/c_handoff.py; bench/php_handoff.py may use them too)."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def replace_section(path: Path, heading: str, text: str) -> None:
    """Put `text` in place of the `heading` section of the markdown file at `path` (up to the
    next `## `), or append it; every other section is kept as it is."""
    old = path.read_text() if path.exists() else "# Client hand-off latency\n\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


def rotated_rounds(keys: list[str], rounds: int, run: Callable[[str], dict], label: str = "") -> dict[str, list[dict]]:
    """Runs `run(key)` for every key, `rounds` times, starting each round one key later so no
    mode always runs first or after the same neighbour; returns {key: [result per round]}."""
    results: dict[str, list[dict]] = {key: [] for key in keys}
    for round_number in range(rounds):
        shift = round_number % len(keys)
        for key in keys[shift:] + keys[:shift]:
            result = run(key)
            results[key].append(result)
            print(f"{label}round={round_number} mode={key} p50_us={result['p50']} p99_us={result['p99']}", flush=True)
    return results


def medians(runs: list[dict]) -> tuple[float, float, float, float]:
    """(median p50, median p99, lowest p50, highest p50) over the rounds of one mode."""
    p50s = [r["p50"] for r in runs]
    return statistics.median(p50s), statistics.median(r["p99"] for r in runs), min(p50s), max(p50s)


@contextlib.contextmanager
def daemon_and_upstream(start_upstream: Callable, prefix: str) -> Iterator[tuple[object, dict[str, str]]]:
    """Starts an upstream (`start_upstream() -> (process, port)`) and `smtpgate serve` relaying to
    it in a fresh directory; yields (daemon, targets): targets["tcp"] and ["unix"] are the
    daemon's URIs, ["smtp"] the upstream's host:port. Stops both and removes the directory."""
    from daemon_bench import Daemon  # the main bench's daemon runner

    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("SCRATCH")))
    upstream, port = start_upstream()
    unix_path = workdir / "smtpgate.sock"
    daemon = None
    try:
        daemon = Daemon(workdir, upstream=[f"127.0.0.1:{port}"], socket=str(unix_path), helo_name="bench.test")
        yield daemon, {"tcp": f"tcp://127.0.0.1:{daemon.port}", "unix": f"unix://{unix_path}",
                       "smtp": f"127.0.0.1:{port}"}
    finally:
        if daemon is not None:
            daemon.stop()
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
