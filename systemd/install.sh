#!/usr/bin/env bash
# Install smtpgate as a system service, or remove it (docs/operations.md).
#
#   systemd/install.sh [--root DIR] [--prefix DIR] [--venv DIR] [--python PYTHON]
#   systemd/install.sh --uninstall [--root DIR] [--prefix DIR] [--venv DIR]
#
# What it installs (every path under --root, default /):
#   VENV (/opt/smtpgate)          a virtual environment holding smtpgate and its
#                                 dependencies: Debian 12 and Ubuntu 24.04 refuse a
#                                 system-wide pip install (PEP 668), and a venv keeps
#                                 smtpgate's libraries apart from the distribution's
#   PREFIX/bin/smtpgate           a link to VENV/bin/smtpgate: the path in ExecStart
#   PREFIX/lib/systemd/system/    smtpgate.service, smtpgate.socket, smtpgate-tcp.socket
#                                 (ExecStart pointed at PREFIX/bin/smtpgate)
#   /etc/smtpgate/smtpgate.toml   from systemd/smtpgate.toml, never over an existing one
#   PREFIX/share/man/man{5,8}/    smtpgate(8), smtpgate-sendmail(8), smtpgate.toml(5)
#   PREFIX/share/bash-completion/completions/smtpgate, PREFIX/share/zsh/site-functions/_smtpgate
#   PREFIX/lib/sysusers.d/smtpgate.conf
#                                 the system user smtpgate, which the unit runs as,
#                                 created now by systemd-sysusers (useradd without it)
# Nothing is enabled or started; the script prints the commands that do.
#
# --uninstall removes all of that but /etc/smtpgate (your configuration and
# secrets), /var/lib/smtpgate (the spool: mail not yet delivered) and the
# user that owns it; the script says where they are. The C client and smtpgate-send(1) are installed
# by `make -C clients/c install`.
set -euo pipefail

root=/ prefix=/usr/local venv=/opt/smtpgate python=python3 uninstall=0
[ -x /usr/bin/python3 ] && python=/usr/bin/python3  # the distribution's: outside /root and /home
usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
    --python) python=${2:?--python needs a program}; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 64 ;;
  esac
done
for dir in "$prefix" "$venv"; do
  case "$dir" in /*) ;; *) echo "install.sh: $dir is not an absolute path" >&2; exit 64 ;; esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
R=${root%/}                      # "" for /, so "$R/etc" is /etc
units=(smtpgate.service smtpgate.socket smtpgate-tcp.socket)
unitdir=$prefix/lib/systemd/system
mandir=$prefix/share/man
pages=(man8/smtpgate.8 man8/smtpgate-sendmail.8 man5/smtpgate.toml.5)
bashcomp=$prefix/share/bash-completion/completions/smtpgate
zshcomp=$prefix/share/zsh/site-functions/_smtpgate
sysusers=$prefix/lib/sysusers.d/smtpgate.conf
live_systemd() { [ -z "$R" ] && [ -d /run/systemd/system ]; }

if [ "$uninstall" = 1 ]; then
  if live_systemd; then
    systemctl disable --now "${units[@]}" 2>/dev/null || true
  fi
  rm -f "$R$prefix/bin/smtpgate" "$R$bashcomp" "$R$zshcomp" "$R$sysusers"
  for unit in "${units[@]}"; do rm -f "$R$unitdir/$unit"; done
  for page in "${pages[@]}"; do rm -f "$R$mandir/$page"; done
  rm -rf "$R$venv"
  if live_systemd; then systemctl daemon-reload; fi
  echo "smtpgate removed. Kept: $R/etc/smtpgate (configuration, secrets),"
  echo "$R/var/lib/smtpgate (the spool; any mail not yet delivered is in it) and"
  echo "the user smtpgate that owns it (userdel smtpgate once the spool is gone)."
  exit 0
fi

# 1. The program, in its own virtual environment. Its python is a link to
# PYTHON's: one under /root or /home (pyenv, say) the service may not run
# (ProtectHome=yes, and its user cannot enter those directories).
base=$("$python" -c 'import sys; print(sys.base_prefix)')
case "$base" in
  /root|/root/*|/home|/home/*)
    echo "install.sh: $python lives in $base, which the service cannot reach;" >&2
    echo "give --python /usr/bin/python3 (or another Python outside /root and /home)" >&2
    exit 64 ;;
esac
"$python" -m venv "$R$venv"
"$R$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$repo"
if [ -n "$R" ]; then
  # Built under --root, run from /: the scripts' #! lines and activate name
  # the final path, not the staging one.
  grep -rlF "$R$venv" "$R$venv/bin" | xargs -r sed -i "s|$R$venv|$venv|g"
fi
install -d "$R$prefix/bin"
ln -sfn "$venv/bin/smtpgate" "$R$prefix/bin/smtpgate"

# 2. The units, started from PREFIX/bin/smtpgate.
install -d "$R$unitdir"
for unit in "${units[@]}"; do
  sed "s|^ExecStart=/usr/local/bin/smtpgate |ExecStart=$prefix/bin/smtpgate |" \
    "$repo/systemd/$unit" > "$R$unitdir/$unit"
  chmod 0644 "$R$unitdir/$unit"
done

# 3. The configuration: the example on a first install, the operator's own after.
install -d -m 0755 "$R/etc/smtpgate"
if [ -e "$R/etc/smtpgate/smtpgate.toml" ]; then
  echo "kept $R/etc/smtpgate/smtpgate.toml (the new example: $repo/systemd/smtpgate.toml)"
else
  install -m 0644 "$repo/systemd/smtpgate.toml" "$R/etc/smtpgate/smtpgate.toml"
fi

# 4. The user the service runs as.
install -D -m 0644 "$repo/systemd/smtpgate.sysusers" "$R$sysusers"
if command -v systemd-sysusers >/dev/null; then
  systemd-sysusers --root="${R:-/}" "$R$sysusers"
elif ! grep -q '^smtpgate:' "$R/etc/passwd" 2>/dev/null; then
  useradd ${R:+--root "$R"} --system --user-group --home-dir /var/lib/smtpgate --no-create-home \
    --shell /usr/sbin/nologin --comment "smtpgate mail relay" smtpgate
fi

# 5. Man pages and shell completion.
for page in "${pages[@]}"; do
  install -D -m 0644 "$repo/docs/man/${page#*/}" "$R$mandir/$page"
done
install -D -m 0644 "$repo/docs/completion/smtpgate.bash" "$R$bashcomp"
install -D -m 0644 "$repo/docs/completion/_smtpgate" "$R$zshcomp"

if live_systemd; then systemctl daemon-reload; fi
cat <<EOF
smtpgate installed in $R$venv, linked as $R$prefix/bin/smtpgate.
Next: set the upstream in /etc/smtpgate/smtpgate.toml (and its password in
/etc/credstore/smtpgate.upstream-password, mode 0600, where systemd's
LoadCredential= finds it), then
  systemctl enable --now smtpgate.service
or, with socket activation,
  systemctl enable --now smtpgate.socket smtpgate-tcp.socket smtpgate.service
EOF
