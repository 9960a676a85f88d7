#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine:
# the Python package with its test and dev extras in a virtual environment
# (.venv: Debian 12 and Ubuntu 24.04 refuse pip outside one, PEP 668; their
# python3-venv package provides it), php-cli, PHPUnit and Composer (the
# PHP client's tests and its README's Composer example), a C and C++
# toolchain, valgrind and strace (the C client's tests, the
# one-write-per-request checks, the fsync witness), swaks (the SMTP front
# door's tests), Postfix's smtp-sink (a PIPELINING server), systemd for
# systemd-analyze (the unit files' checks; nothing is started), chromium
# and chromium-driver (the queue page's browser tests), promtool (below),
# and the linters .ci/run uses: phpcs (php-codesniffer), cppcheck and ruff
# (a dev extra, with the man page and completion generators). The fast
# extra (uvloop) too: the suite runs the daemon as it runs where uvloop is
# installed. Run as root
# (or with sudo for the apt part).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# Debian's python3 lacks venv's ensurepip without python3-venv.
for python in python3 /usr/bin/python3; do
  if command -v "$python" >/dev/null && ! "$python" -c 'import ensurepip' 2>/dev/null; then
    need+=(python3-venv); break
  fi
done
command -v php >/dev/null || need+=(php-cli)
command -v phpunit >/dev/null || need+=(phpunit)
command -v composer >/dev/null || need+=(composer)
command -v phpcs >/dev/null || need+=(php-codesniffer)
command -v cppcheck >/dev/null || need+=(cppcheck)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v make >/dev/null || need+=(make)
command -v valgrind >/dev/null || need+=(valgrind)
command -v swaks >/dev/null || need+=(swaks)
command -v strace >/dev/null || need+=(strace)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v g++ >/dev/null || need+=(g++)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The man pages are rendered with man -l, the zsh completion checked with zsh -n.
command -v man >/dev/null || need+=(man-db)
command -v zsh >/dev/null || need+=(zsh)
# Postfix's smtp-sink: the real server that offers PIPELINING in the SMTP
# core's tests (aiosmtpd does not). "No configuration": nothing is set up
# or started, only the programs are installed.
command -v smtp-sink >/dev/null || need+=(postfix)
# The queue page's tests drive Debian's Chromium headless through its
# ChromeDriver (selenium, from the test extras).
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,dev,fast]'
# promtool (tests/test_prometheus.py: the alert rules of docs/prometheus/
# and a scrape of /metrics) from Debian's prometheus package: 19 MB to
# download, and only the program (48 MB) is unpacked, into the venv.
# Installing the package would add 8 packages of web assets (96 MB) and,
# where systemd runs, enable and start a Prometheus server.
if ! command -v promtool >/dev/null && [ ! -x .venv/bin/promtool ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  deb_dir="$(mktemp -d)"
  (cd "$deb_dir" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" prometheus)
  dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -xO ./usr/bin/promtool > .venv/bin/promtool
  chmod 755 .venv/bin/promtool
  rm -r "$deb_dir"
fi
