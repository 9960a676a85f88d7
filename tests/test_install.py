"""Installing smtpgate as a newcomer and an operator would: the README's
first command with the distribution's own Python, and systemd/install.sh
into a scratch root checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What the demo copies: the package and what its build reads, not .git,
# .venv or build output.
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".hypothesis", "out")


def readme_first_command() -> str:
    """The first command line of the README's first sh block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    return next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))


def distribution_python() -> str:
    """The distribution's own python3 (what a newcomer on Debian or Ubuntu
    has), else the one running the tests."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def test_the_readme_first_command_runs_the_demo_in_a_venv(tmp_path):
    command = readme_first_command()
    assert "venv" in command, command  # PEP 668: a distribution's python3 refuses a bare pip install
    checkout = tmp_path / "smtpgate"
    shutil.copytree(REPO, checkout, ignore=_NOT_COPIED)
    # `python3` in the command is the distribution's, as on a fresh machine.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(distribution_python())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    done = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert (checkout / ".venv" / "bin" / "smtpgate").exists()
    assert '"state": "sent"' in out, out
    # Decoded as a mail reader shows it: not =?utf-8?b?...?= and not base64.
    assert "Subject: 记得收衣服" in out, out
    assert "今天我不回家。" in out, out
    assert "=?utf-8?" not in out and "5LuK5aSp" not in out, out
