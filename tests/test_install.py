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


# The parts of an operating system the units refer to, copied into the
# scratch root so that `systemd-analyze verify --root` resolves every path
# inside it: the targets they order against and /bin/kill of ExecReload.
_HOST_UNITS = Path("/usr/lib/systemd/system")


def _give_root_a_system(root: Path) -> None:
    shutil.copytree(_HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    for merged in ("bin", "lib"):  # /usr-merged, as Debian 12 is
        if not (root / merged).exists():
            (root / merged).symlink_to(f"usr/{merged}")
    shutil.copy2(shutil.which("kill", path="/bin:/usr/bin"), root / "usr/bin/kill")


def install(root: Path, *args: str, python: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "systemd/install.sh"), "--root", str(root),
                           "--python", python or distribution_python(), *args],
                          capture_output=True, text=True, timeout=170)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not _HOST_UNITS.is_dir(),
                    reason="systemd-analyze not installed")
def test_install_script_into_a_root_passes_systemd_analyze_verify_and_uninstalls(tmp_path):
    root = tmp_path / "root"
    done = install(root)
    assert done.returncode == 0, done.stdout + done.stderr
    link = root / "usr/local/bin/smtpgate"
    assert os.readlink(link) == "/opt/smtpgate/bin/smtpgate"
    # Staged under --root, run from /: the entry point names the final venv.
    assert (root / "opt/smtpgate/bin/smtpgate").read_text().splitlines()[0] == "#!/opt/smtpgate/bin/python"
    version = subprocess.run([str(root / "opt/smtpgate/bin/python"), "-m", "smtpgate", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("smtpgate "), version.stderr
    config = root / "etc/smtpgate/smtpgate.toml"
    assert config.read_text() == (REPO / "systemd/smtpgate.toml").read_text()
    for path in ("usr/local/share/man/man8/smtpgate.8", "usr/local/share/man/man8/smtpgate-sendmail.8",
                 "usr/local/share/man/man5/smtpgate.toml.5",
                 "usr/local/share/bash-completion/completions/smtpgate",
                 "usr/local/share/zsh/site-functions/_smtpgate"):
        assert (root / path).is_file(), path
    units = ["smtpgate.service", "smtpgate.socket", "smtpgate-tcp.socket"]
    service = (root / "usr/local/lib/systemd/system/smtpgate.service").read_text()
    assert "ExecStart=/usr/local/bin/smtpgate serve --config /etc/smtpgate/smtpgate.toml" in service
    # A user of its own, not DynamicUser= (whose preserved runtime directory
    # systemd keeps under /run/private, 0700: no caller could reach the socket).
    assert "\nUser=smtpgate\n" in service
    assert not any(line.startswith("DynamicUser=") for line in service.splitlines())
    assert (root / "usr/local/lib/sysusers.d/smtpgate.conf").is_file()
    if shutil.which("systemd-sysusers") or shutil.which("useradd"):
        [entry] = [line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("smtpgate:")]
        assert entry.split(":")[5:] == ["/var/lib/smtpgate", "/usr/sbin/nologin"]

    _give_root_a_system(root)
    verified = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *units], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    # A second install (an upgrade) keeps the operator's configuration.
    config.write_text('upstream = ["relay.example.com:25"]\n')
    again = install(root)
    assert again.returncode == 0, again.stderr
    assert config.read_text() == 'upstream = ["relay.example.com:25"]\n'
    assert "kept" in again.stdout

    removed = install(root, "--uninstall")
    assert "the user smtpgate" in removed.stdout
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt/smtpgate").exists() and not link.is_symlink()
    assert not (root / "usr/local/lib/systemd/system/smtpgate.service").exists()
    assert not (root / "usr/local/share/man/man8/smtpgate.8").exists()
    assert config.exists(), "the configuration (and its secrets) is the operator's: kept"


def test_install_script_refuses_a_python_the_service_cannot_reach(tmp_path):
    """A venv's python links to the one that made it: under /root or /home
    (pyenv, say) the unit's ProtectHome=yes and its user could not run it."""
    base = subprocess.run([sys.executable, "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True).stdout.strip()
    if not base.startswith(("/root/", "/home/")):
        pytest.skip(f"the tests' python lives in {base}")
    done = install(tmp_path / "root", python=sys.executable)
    assert done.returncode == 64
    assert f"lives in {base}, which the service cannot reach" in done.stderr
    assert not (tmp_path / "root" / "opt").exists()
