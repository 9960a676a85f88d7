"""Configuration: one TOML file, overridden by command-line flags.

`load_config(path, overrides)` returns a validated `Config` or raises
`ConfigError` whose text starts with the offending key, so that a bad start
ends with one line that says what to fix. Every key is documented in
docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:2526"
DEFAULT_CONFIG_PATH = "/etc/smtpgate/smtpgate.toml"
# systemd's LoadCredential= name for the upstream password (smtpgate.service).
CREDENTIAL_NAME = "upstream-password"


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
    message_id_domain: str = ""
    log_format: str = "auto"
    log_level: str = "info"
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
    # Filled in by load_config, never read from the file.
    upstream_password: str | None = field(default=None, repr=False)
    upstream_oauth2_token: str | None = field(default=None, repr=False)

    @property
    def max_line(self) -> int:
        """Longest request line accepted.

        A SEND line carries the message as JSON: attachments are base64
        (4/3 of their size) and JSON escaping can at worst double text
        (a "\\n" per newline), so 2x the message limit plus 64 KiB of envelope
        bounds every acceptable request without letting one line pin memory.
        """
        return 2 * self.max_message_size + 64 * 1024


_CHOICES = {
    "upstream_tls": ("none", "starttls", "tls"),
    "log_format": ("auto", "json", "console"),
    "log_level": ("debug", "info", "warning", "error"),
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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return text.rstrip("\r\n")


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
    known = {f.name for f in dataclasses.fields(Config)} - {"upstream_password", "upstream_oauth2_token"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{key}: unknown key")
    config = Config()
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

    if config.tokens_file:
        text = _read_secret_file(config.tokens_file, "tokens_file")
        config.tokens = config.tokens + [t.strip() for t in text.splitlines() if t.strip()]
    for token in config.tokens:
        if not token or any(c.isspace() for c in token):
            raise ConfigError("tokens: a token must be non-empty and contain no white space")
    if not config.tokens:
        for value in config.listen + ([config.smtp_listen] if config.smtp_listen else []):
            host, _ = parse_hostport(value, "listen")
            if not is_loopback(host):
                raise ConfigError(
                    f"listen: {value} is not a loopback address; set tokens (or tokens_file) "
                    "before listening on a network")
    else:
        for value in config.listen:
            parse_hostport(value, "listen")

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
    if config.retry_max < config.retry_base:
        raise ConfigError(f"retry_max: {config.retry_max:g} is less than retry_base ({config.retry_base:g})")
    _validate_upstream_health(config)
    if not config.helo_name:
        config.helo_name = socket.getfqdn() or "localhost"
    if config.socket_mode > 0o777:
        raise ConfigError("socket_mode: must be a file mode such as 0o660 (432)")


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


def _find_password(config: Config) -> str | None:
    if config.upstream_password_file:
        return _read_secret_file(config.upstream_password_file, "upstream_password_file")
    if config.upstream_password_env:
        value = os.environ.get(config.upstream_password_env)
        if value is None:
            raise ConfigError(
                f"upstream_password_env: the environment variable {config.upstream_password_env} is not set")
        return value
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.exists(os.path.join(creds, CREDENTIAL_NAME)):
        return _read_secret_file(os.path.join(creds, CREDENTIAL_NAME), "upstream_password_file")
    return None
