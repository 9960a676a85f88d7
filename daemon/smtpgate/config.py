"""Configuration: one TOML file, overridden by command-line flags.

`load_config(path, overrides)` returns a validated `Config` or raises
`ConfigError` whose text starts with the offending key, so that a bad start
ends with one line that says what to fix. Every key is documented in
docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import re
import socket
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass, field

DEFAULT_LISTEN = "127.0.0.1:2526"
DEFAULT_CONFIG_PATH = "/etc/smtpgate/smtpgate.toml"
# systemd's LoadCredential= name for the upstream password (smtpgate.service).
CREDENTIAL_NAME = "upstream-password"
# ... and for the client tokens: the unit's user (smtpgate) can read no file
# of root's that others cannot, and a tokens file others can read is refused.
TOKENS_CREDENTIAL = "tokens"
# 16 characters of a random token (base64: 96 bits) are beyond guessing
# through a socket that closes after 3 wrong AUTHs; a short one is a mistake.
MIN_TOKEN_CHARS = 16
# ... and for the webhook secret (webhook_secret_file).
WEBHOOK_SECRET_CREDENTIAL = "webhook-secret"


class ConfigError(Exception):
    """A configuration mistake; str() is one line that starts with the key."""


@dataclass
class Config:
    listen: list[str] = field(default_factory=lambda: [DEFAULT_LISTEN])
    socket: str | None = None
    socket_mode: int = 0o660
    spool: str = "/var/lib/smtpgate"
    upstream: list[str] = field(default_factory=list)
    upstream_tls: str = "starttls"
    upstream_user: str | None = None
    upstream_password_file: str | None = None
    upstream_password_env: str | None = None
    upstream_oauth2_token_file: str | None = None
    upstream_ca_file: str | None = None
    upstream_verify: bool = True
    upstream_allow_plaintext_auth: bool = False
    helo_name: str = ""
    dev: bool = False
    hold: bool = False
    dev_maildir: str | None = None
    tokens: list[str] = field(default_factory=list, repr=False)
    tokens_file: str | None = None
    allowed_senders: list[str] = field(default_factory=list)
    allowed_recipients: list[str] = field(default_factory=list)
    max_message_size: int = 25 * 1024 * 1024
    max_connections: int = 1024
    idle_timeout: float = 300.0
    request_timeout: float = 30.0
    max_queued: int = 1_000_000
    min_free_space: int = 100 * 1024 * 1024
    idempotency_window: float = 24 * 3600.0
    keep_final: float = 7 * 24 * 3600.0
    max_age: float = 5 * 24 * 3600.0
    retry_base: float = 60.0
    retry_max: float = 3600.0
    connections_per_upstream: int = 10
    rate_per_minute: int = 0
    smtp_listen: str | None = None
    # Limits before trust (docs/security.md); max_connections, idle_timeout
    # and request_timeout above apply to each door too.
    max_connections_per_peer: int = 512
    max_inflight_bytes: int = 0  # 0: 4 x max_message_size (inflight_budget)
    stress_idle_timeout: float = 10.0
    stress_request_timeout: float = 5.0
    message_id_domain: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    # Callers (docs/configuration.md, "Callers"): the policy of every caller
    # that does not set its own, and the named callers ([callers.NAME]).
    sends_per_minute: int = 0
    sends_per_day: int = 0
    max_pending: int = 0
    callers: dict[str, CallerConfig] = field(default_factory=dict)
    # Upstream health and timeouts (docs/configuration.md, "Upstream health and timeouts").
    # Probes of a down upstream: probe_base doubling to probe_max, with jitter.
    upstream_probe_base: float = 1.0
    upstream_probe_max: float = 300.0
    # RFC 5321 4.5.3.2 minimums; connecting and TLS are not SMTP commands.
    upstream_connect_timeout: float = 30.0
    upstream_tls_timeout: float = 60.0
    upstream_greeting_timeout: float = 300.0
    upstream_command_timeout: float = 300.0
    upstream_data_timeout: float = 120.0
    upstream_data_block_timeout: float = 180.0
    upstream_data_end_timeout: float = 600.0
    upstream_idle_timeout: float = 60.0
    # The HTTP side (docs/http.md): off unless http_listen is set; its
    # connections count against max_connections and max_connections_per_peer
    # like each door's. An admin token may do everything (the queue tool's
    # retry and delete included); a metrics token may read /metrics only.
    http_listen: str | None = None
    http_admin_token_file: str | None = None
    http_metrics_token_file: str | None = None
    # Delivery webhooks (docs/configuration.md, "Webhooks"; docs/webhooks.md):
    # the URL of every caller without its own, the whsec_ secret signing
    # them, how long an event is retried, how long one try may take.
    webhook_url: str = ""
    webhook_secret_file: str | None = None
    webhook_retry_for: float = 24 * 3600.0
    webhook_timeout: float = 15.0
    # While the CPU is contended, events wait this long for it to be free
    # (0: never): the hand-offs and the mail go first (webhooks/sender.py).
    webhook_yield_for: float = 10.0
    # Delivery's CPU priority (docs/configuration.md, "Delivery priority"):
    # the delivery process runs this much nicer than intake.
    delivery_nice: int = 10
    # The event loop of the daemon and its delivery process (docs/configuration.md,
    # "Event loop"): uvloop when installed (smtpgate[fast]), or the standard one.
    event_loop: str = "auto"
    # Filled in by load_config, never read from the file.
    upstream_password: str | None = field(default=None, repr=False)
    upstream_oauth2_token: str | None = field(default=None, repr=False)
    http_admin_tokens: list[str] = field(default_factory=list, repr=False)
    http_metrics_tokens: list[str] = field(default_factory=list, repr=False)
    webhook_secret: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def max_line(self) -> int:
        """Longest request line accepted.

        A SEND line carries the message as JSON: attachments are base64
        (4/3 of their size) and JSON escaping can at worst double text
        (a "\\n" per newline), so 2x the message limit plus 64 KiB of envelope
        bounds every acceptable request without letting one line pin memory.
        """
        return 2 * self.max_message_size + 64 * 1024

    @property
    def inflight_budget(self) -> int:
        """Request bytes both doors may hold at once (`max_inflight_bytes`).

        The default, 4 x max_message_size (100 MiB), lets two requests of
        the largest size be received at once and many small ones besides;
        the daemon's memory for them is a small multiple of it (the JSON
        parsed, the stored form). It is never less than one request line of
        the largest size (max_line): with a small max_message_size, 4 x it
        would answer an overlong line BUSY instead of TOO_LARGE.
        """
        return self.max_inflight_bytes or max(4 * self.max_message_size, self.max_line)


@dataclass
class CallerConfig:
    """One [callers.NAME] table. Identified by a token of `token_file`
    (over either door), or on the Unix socket by its uid and/or gid. A
    policy key left out (None) takes the top-level key of the same name."""

    name: str
    token_file: str | None = None
    unix_user: str | None = None
    uid: int | None = None
    unix_group: str | None = None
    gid: int | None = None
    allowed_senders: list[str] | None = None
    allowed_recipients: list[str] | None = None
    sends_per_minute: int | None = None
    sends_per_day: int | None = None
    max_pending: int | None = None
    webhook_url: str | None = None  # None: the top-level webhook_url
    webhook_secret_file: str | None = None  # None: the top-level secret
    tokens: list[str] = field(default_factory=list, repr=False)  # read from token_file
    webhook_secret: tuple[bytes, ...] = field(default=(), repr=False)  # read from webhook_secret_file


# Caller names go into logs, STATS and the spool: short and plain. Reserved:
# "anonymous" (the caller of a daemon without callers) and "token-..." (the
# names of the tokens in `tokens`, intake/callers.py).
_CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CALLER_POLICY = {"allowed_senders": [], "allowed_recipients": [], "sends_per_minute": 0,
                  "sends_per_day": 0, "max_pending": 0}
_CALLER_IDS = {"token_file": "", "unix_user": "", "uid": 0, "unix_group": "", "gid": 0}
_CALLER_WEBHOOK = {"webhook_url": "", "webhook_secret_file": ""}


_CHOICES = {
    "upstream_tls": ("none", "starttls", "tls"),
    "log_format": ("auto", "json", "console"),
    "log_level": ("debug", "info", "warning", "error"),
    "event_loop": ("auto", "asyncio", "uvloop"),
}


def parse_hostport(value: str, key: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[v6]:PORT"; raise ConfigError naming `key`."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_type(key: str, value, default):
    expected = type(default) if default is not None else None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        value = expected(value)
    elif isinstance(default, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a string or a list of strings")
    elif not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _read_secret_file(path: str, key: str) -> str:
    """A password or token file's text. Like OpenSSH with a private key, a
    file that group or others may read or write stops the start (systemd's
    credentials are exempt: their directory is the service's alone)."""
    try:
        with open(path, "rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if mode & 0o077 and not _is_credential(path):
        raise ConfigError(f"{key}: {path} is open to group or others (mode {mode:04o}); "
                          "chmod 600 it, or pass it with systemd's LoadCredential=")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None


def _is_credential(path: str) -> bool:
    """Whether `path` is in systemd's $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        return False
    real = os.path.realpath(path)
    return os.path.commonpath([real, os.path.realpath(creds)]) == os.path.realpath(creds)


def load_config(path: str | None, overrides: dict | None = None) -> Config:
    """Read the TOML file at `path` (if any), apply `overrides`, validate."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value

    defaults = Config()
    known = {f.name for f in dataclasses.fields(Config)} - {
        "upstream_password", "upstream_oauth2_token", "http_admin_tokens", "http_metrics_tokens",
        "webhook_secret"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{key}: unknown key")
    config = Config()
    config.callers = _load_callers(values.pop("callers", {}))
    for key, value in values.items():
        value = _check_type(key, value, getattr(defaults, key))
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{key}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        setattr(config, key, value)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    if config.dev and not config.upstream:
        config.upstream_tls = "none"
    if not config.dev and not config.upstream:
        raise ConfigError("upstream: no upstream server configured (give --upstream HOST:PORT, or --dev)")
    for value in config.upstream:
        parse_hostport(value, "upstream")
    if config.smtp_listen:
        if config.smtp_listen.isdigit():  # a bare port: loopback, the safe default
            config.smtp_listen = f"127.0.0.1:{config.smtp_listen}"
        parse_hostport(config.smtp_listen, "smtp_listen")

    tokens_file = config.tokens_file or _credential(TOKENS_CREDENTIAL)
    if tokens_file:
        config.tokens = config.tokens + _read_tokens(tokens_file, "tokens_file")
    _check_tokens("tokens", config.tokens)
    _check_callers(config)
    _read_http_tokens(config)
    if config.http_listen and config.http_listen.isdigit():
        config.http_listen = f"127.0.0.1:{config.http_listen}"
    doors = [("listen", v) for v in config.listen] + [("smtp_listen", config.smtp_listen)] * bool(config.smtp_listen)
    if config.http_listen:
        doors.append(("http_listen", config.http_listen))
    check_doors(config, [(key, value, parse_hostport(value, key)[0]) for key, value in doors])

    if config.upstream_oauth2_token_file:
        # XOAUTH2 (Gmail, Outlook): an outside tool refreshes the token file,
        # then reloads the daemon (SIGHUP) to pick the new token up.
        if not config.upstream_user:
            raise ConfigError("upstream_user: XOAUTH2 needs the account's address as user")
        config.upstream_oauth2_token = _read_secret_file(
            config.upstream_oauth2_token_file, "upstream_oauth2_token_file")
    config.upstream_password = _find_password(config)
    if config.upstream_user and config.upstream_password is None and config.upstream_oauth2_token is None:
        raise ConfigError(
            "upstream_password_file: upstream_user is set but no password was given "
            "(upstream_password_file, upstream_password_env, or the systemd credential "
            f"{CREDENTIAL_NAME})")
    if config.upstream_password is not None and not config.upstream_user:
        raise ConfigError("upstream_user: a password is configured but no user")
    if (config.upstream_user and config.upstream_tls == "none"
            and not config.upstream_allow_plaintext_auth):
        raise ConfigError(
            "upstream_tls: AUTH over a plaintext connection would expose the password; use "
            "starttls or tls, or set upstream_allow_plaintext_auth = true")
    if config.upstream_ca_file and not os.access(config.upstream_ca_file, os.R_OK):
        raise ConfigError(f"upstream_ca_file: cannot read {config.upstream_ca_file}")
    if config.max_message_size < 1024:
        raise ConfigError("max_message_size: must be at least 1024 bytes")
    if config.connections_per_upstream < 1:
        raise ConfigError("connections_per_upstream: must be at least 1")
    if not 0 <= config.delivery_nice <= 19:
        raise ConfigError("delivery_nice: must be 0 (as intake) to 19 (the lowest priority)")
    if config.event_loop == "uvloop":
        from smtpgate.eventloop import LoopUnavailable, resolve
        try:
            resolve(config.event_loop)
        except LoopUnavailable as exc:
            raise ConfigError(str(exc)) from None
    if config.retry_max < config.retry_base:
        raise ConfigError(f"retry_max: {config.retry_max:g} is less than retry_base ({config.retry_base:g})")
    _validate_upstream_health(config)
    if not config.helo_name:
        config.helo_name = socket.getfqdn() or "localhost"
    if config.socket_mode > 0o777:
        raise ConfigError("socket_mode: must be a file mode such as 0o660 (432)")
    _validate_limits(config)
    _validate_webhooks(config)


def _validate_limits(config: Config) -> None:
    for key in ("max_connections", "max_connections_per_peer"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if config.max_inflight_bytes and config.max_inflight_bytes < config.max_line:
        raise ConfigError(
            f"max_inflight_bytes: must hold one request line of the largest size "
            f"({config.max_line} bytes: 2 x max_message_size + 64 KiB), got {config.max_inflight_bytes}")
    for key in ("idle_timeout", "request_timeout", "stress_idle_timeout", "stress_request_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be more than 0 seconds")


def check_doors(config: Config, doors: list[tuple[str, str, str]]) -> None:
    """Refuse a door, (key, address as shown, host), on a non-loopback host
    while no token closes it: the daemon would take anyone's mail (and the
    HTTP side would be anyone's admin). Checked for the configured addresses
    when a file is read, and for the sockets bound (systemd's too) at start
    and at each reload, which cannot move them."""
    callers_have_tokens = bool(config.tokens or any(caller.tokens for caller in config.callers.values()))
    for key, value, host in doors:
        # The HTTP side is closed by its own tokens too (docs/http.md).
        closed = callers_have_tokens or (key == "http_listen" and has_tokens(config))
        if not closed and not is_loopback(host):
            raise ConfigError(
                f"{key}: {value} is not a loopback address; set tokens (tokens_file, or a "
                "caller's token_file) before listening on a network")


def has_tokens(config: Config) -> bool:
    """Whether any token is configured (the callers', or the HTTP side's):
    without one the daemon is open, and listens on loopback only."""
    return bool(config.tokens or config.http_admin_tokens or config.http_metrics_tokens
                or any(caller.tokens for caller in config.callers.values()))


def _read_http_tokens(config: Config) -> None:
    """The HTTP side's own tokens: each one of a kind, none a caller's."""
    seen = set(config.tokens) | {t for caller in config.callers.values() for t in caller.tokens}
    for key in ("http_admin_token_file", "http_metrics_token_file"):
        path = getattr(config, key)
        if path is None:
            continue
        tokens = _read_tokens(path, key)
        if not tokens:
            raise ConfigError(f"{key}: {path} holds no token")
        _check_tokens(key, tokens)
        if seen & set(tokens):
            raise ConfigError(f"{key}: a token in it is also a caller's or another HTTP token's")
        seen.update(tokens)
        setattr(config, key.removesuffix("_file") + "s", tokens)


def _read_tokens(path: str, key: str) -> list[str]:
    """A file of tokens, one a line; blank lines are skipped."""
    return [t.strip() for t in _read_secret_file(path, key).splitlines() if t.strip()]


def _unix_id(where: str, name_key: str, name: str | None, id_key: str, number: int | None, lookup) -> int | None:
    """A caller's uid or gid: given as a number, or as a name looked up on this system."""
    if name is None:
        return number
    if number is not None:
        raise ConfigError(f"{where}.{id_key}: give {name_key} or {id_key}, not both")
    try:
        return lookup(name)
    except KeyError:
        raise ConfigError(f"{where}.{name_key}: no {name_key.removeprefix('unix_')} {name!r} "
                          "on this system") from None


def _check_tokens(key: str, tokens: list[str]) -> None:
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise ConfigError(f"{key}: a token must be non-empty and contain no white space")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{key}: a token has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                              "are required (make one with: openssl rand -base64 24)")


def _load_callers(tables) -> dict[str, CallerConfig]:
    """The [callers.NAME] tables, checked key by key; token files are read
    later (_check_callers), with the rest of the secrets."""
    if not isinstance(tables, dict):
        raise ConfigError("callers: expected tables such as [callers.shop]")
    callers = {}
    for name, table in tables.items():
        where = f"callers.{name}"
        if not _CALLER_NAME.fullmatch(name) or name == "anonymous" or name.startswith("token-"):
            raise ConfigError(f"{where}: a caller's name is 1 to 64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit; 'anonymous' and 'token-...' are reserved")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of keys")
        caller = CallerConfig(name)
        for key, value in table.items():
            default = {**_CALLER_POLICY, **_CALLER_IDS, **_CALLER_WEBHOOK}.get(key)
            if default is None:
                raise ConfigError(f"{where}.{key}: unknown key")
            setattr(caller, key, _check_type(f"{where}.{key}", value, default))
        callers[name] = caller
    return callers


def _check_callers(config: Config) -> None:
    """Resolve the callers' users and groups, read their tokens, and refuse
    what would make two callers one: a shared token, the same uid and gid."""
    seen_tokens = set(config.tokens)
    seen_ids: dict[tuple, str] = {}
    for name, caller in config.callers.items():
        where = f"callers.{name}"
        caller.uid = _unix_id(where, "unix_user", caller.unix_user, "uid", caller.uid,
                              lambda user: pwd.getpwnam(user).pw_uid)
        caller.gid = _unix_id(where, "unix_group", caller.unix_group, "gid", caller.gid,
                              lambda group: grp.getgrnam(group).gr_gid)
        if caller.token_file is not None:
            caller.tokens = _read_tokens(caller.token_file, f"{where}.token_file")
            if not caller.tokens:
                raise ConfigError(f"{where}.token_file: {caller.token_file} holds no token")
            _check_tokens(f"{where}.token_file", caller.tokens)
            if seen_tokens & set(caller.tokens):
                raise ConfigError(f"{where}.token_file: a token in it is also another caller's "
                                  "(in tokens, tokens_file or another token_file)")
            seen_tokens.update(caller.tokens)
        if caller.uid is None and caller.gid is None:
            if caller.token_file is None:
                raise ConfigError(f"{where}: nothing identifies this caller: give token_file, "
                                  "unix_user (or uid), unix_group (or gid)")
            continue
        for key, value, id_map in (("unix_user", caller.uid, UID_MAP), ("unix_group", caller.gid, GID_MAP)):
            if value is not None and not _sees_every_id(id_map):
                raise ConfigError(
                    f"{where}.{key}: this daemon runs in a user namespace (systemd's PrivateUsers=yes) "
                    "where other users' connections all show as nobody; set PrivateUsers=no for "
                    "smtpgate.service (systemctl edit smtpgate), or give the caller a token_file")
        other = seen_ids.setdefault((caller.uid, caller.gid), name)
        if other != name:
            raise ConfigError(f"{where}: callers.{other} has the same unix_user/uid and unix_group/gid")


# Where the kernel says which user and group ids this process's user
# namespace maps (user_namespaces(7)); identity over the whole range is the
# initial namespace. In another, SO_PEERCRED shows an unmapped peer as the
# overflow id (nobody): by uid, every outsider would be one caller.
UID_MAP = "/proc/self/uid_map"
GID_MAP = "/proc/self/gid_map"


def _sees_every_id(id_map: str) -> bool:
    try:
        with open(id_map) as fh:
            return fh.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _validate_upstream_health(config: Config) -> None:
    for key in ("upstream_probe_base", "upstream_connect_timeout", "upstream_tls_timeout",
                "upstream_greeting_timeout", "upstream_command_timeout", "upstream_data_timeout",
                "upstream_data_block_timeout", "upstream_data_end_timeout", "upstream_idle_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be more than 0 seconds")
    if config.upstream_probe_max < config.upstream_probe_base:
        raise ConfigError(f"upstream_probe_max: {config.upstream_probe_max:g} is less than "
                          f"upstream_probe_base ({config.upstream_probe_base:g})")
    if len(set(config.upstream)) != len(config.upstream):
        raise ConfigError("upstream: an upstream is listed twice")


def _validate_webhooks(config: Config) -> None:
    """Check the webhook URLs, and read the secrets of those in use: every
    URL is signed, so a URL without a secret stops the start."""
    from smtpgate.webhooks.signing import parse_secrets

    for key in ("webhook_retry_for", "webhook_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key}: must be more than 0 seconds")
    secret_file = config.webhook_secret_file or _credential(WEBHOOK_SECRET_CREDENTIAL)
    for key, url, path, owner in [("webhook_url", config.webhook_url, secret_file, config)] + [
            (f"callers.{name}.webhook_url", caller.webhook_url, caller.webhook_secret_file, caller)
            for name, caller in config.callers.items()]:
        if url:
            _check_webhook_url(key, url)
        if path:
            secret_key = key.replace("webhook_url", "webhook_secret_file")
            try:
                owner.webhook_secret = parse_secrets(_read_secret_file(path, secret_key))
            except ValueError as exc:
                raise ConfigError(f"{secret_key}: {path}: {exc}") from None
    for name, caller in config.callers.items():
        if (caller.webhook_url or caller.webhook_secret_file) and not (caller.webhook_secret or config.webhook_secret):
            raise ConfigError(f"callers.{name}.webhook_secret_file: a webhook is signed; give this caller "
                              "a webhook_secret_file, or a top-level one")
    if config.webhook_url and not config.webhook_secret:
        raise ConfigError("webhook_secret_file: a webhook is signed; give webhook_secret_file "
                          f"(or the systemd credential {WEBHOOK_SECRET_CREDENTIAL})")


def _check_webhook_url(key: str, url: str) -> None:
    # The error names the URL without its query and fragment, which may hold
    # a token (the log, and the journal, keep what a reload refused).
    shown = repr(url.partition("?")[0].partition("#")[0] + ("?..." if "?" in url else ""))
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{key}: {shown} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {shown}")
    if not url.isascii() or not url.isprintable() or " " in url:
        # It goes into the request line and Host header as it is (webhooks/client.py).
        raise ConfigError(f"{key}: {shown} holds a space, a control or a non-ASCII character "
                          "(percent-encode it; an international domain name in its xn-- form)")
    if parts.username is not None or parts.password is not None:
        # It would be logged with every failed try; the signature is the authentication.
        raise ConfigError(f"{key}: a webhook URL carries no user or password (the signature "
                          "authenticates each request)")


def _find_password(config: Config) -> str | None:
    if config.upstream_password_file:
        return _read_secret_file(config.upstream_password_file, "upstream_password_file")
    if config.upstream_password_env:
        value = os.environ.get(config.upstream_password_env)
        if value is None:
            raise ConfigError(
                f"upstream_password_env: the environment variable {config.upstream_password_env} is not set")
        return value
    if path := _credential(CREDENTIAL_NAME):
        return _read_secret_file(path, "upstream_password_file")
    return None


def _credential(name: str) -> str | None:
    """The path of systemd credential `name` (LoadCredential=), if it was passed."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.exists(os.path.join(creds, name)):
        return os.path.join(creds, name)
    return None
