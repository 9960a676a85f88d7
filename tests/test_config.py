"""Configuration: the file, the flags over it, and what reaches the delivery layer."""

from __future__ import annotations

import sys

import pytest

from smtpgate.config import Config, ConfigError, load_config
from smtpgate.daemon import delivery_settings


def write(tmp_path, text: str) -> str:
    path = tmp_path / "smtpgate.toml"
    path.write_text(text)
    return str(path)


def test_flags_override_the_file_and_upstreams_keep_their_order(tmp_path):
    path = write(tmp_path, 'upstream = ["a.example:25"]\nlisten = ["127.0.0.1:2600"]\n')
    config = load_config(path, {"upstream": ["b.example:587", "c.example:25"], "listen": None})
    assert config.listen == ["127.0.0.1:2600"]
    settings = delivery_settings(config)
    assert [(u.host, u.port) for u in settings.upstreams] == [("b.example", 587), ("c.example", 25)]
    assert settings.upstreams[0].tls == "starttls"  # the safe default


def test_password_from_a_file_or_the_environment_never_from_the_file_itself(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = load_config(write(tmp_path, f'upstream = ["smtp.163.com:465"]\nupstream_tls = "tls"\n'
                                         f'upstream_user = "me@163.com"\nupstream_password_file = "{secret}"\n'))
    assert config.upstream_password == "s3cret"
    assert "s3cret" not in repr(config) and "s3cret" not in repr(delivery_settings(config).upstreams[0])
    monkeypatch.setenv("SMTPGATE_PW", "from-env")
    config = load_config(write(tmp_path, 'upstream = ["h:25"]\nupstream_user = "u"\n'
                                         'upstream_password_env = "SMTPGATE_PW"\n'))
    assert config.upstream_password == "from-env"
    with pytest.raises(ConfigError, match="^upstream_password: unknown key"):
        load_config(write(tmp_path, 'upstream = ["h:25"]\nupstream_password = "inline"\n'))


def test_systemd_credential_is_the_password_when_nothing_else_is_set(tmp_path, monkeypatch):
    (tmp_path / "upstream-password").write_text("cred\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    config = load_config(write(tmp_path, 'upstream = ["h:587"]\nupstream_user = "u"\n'))
    assert config.upstream_password == "cred"


def test_xoauth2_token_reaches_the_upstream_settings(tmp_path):
    token = tmp_path / "token"
    token.write_text("ya29.token\n")
    token.chmod(0o600)
    config = load_config(write(tmp_path, f'upstream = ["smtp.gmail.com:587"]\nupstream_user = "me@gmail.com"\n'
                                         f'upstream_oauth2_token_file = "{token}"\n'))
    upstream = delivery_settings(config).upstreams[0]
    assert (upstream.username, upstream.xoauth2_token, upstream.password) == ("me@gmail.com", "ya29.token", None)
    assert "ya29" not in repr(upstream)


@pytest.mark.parametrize("text, key", [
    ('upstream = ["h:25"]\nupstream_user = "u"\n', "upstream_password_file"),
    ('upstream = ["h:25"]\nupstream_user = "u"\nupstream_password_env = "NOPE_NOT_SET"\n', "upstream_password_env"),
    ('upstream = ["h:25"]\nupstream_tls = "none"\nupstream_user = "u"\nupstream_password_env = "HOME"\n',
     "upstream_tls"),
    ('upstream = ["h:25"]\nmax_connections = "many"\n', "max_connections"),
    ('upstream = ["h:25"]\nmax_connections = -1\n', "max_connections"),
    ('upstream = ["h:25"]\nlisten = ["10.0.0.1:2526"]\n', "listen"),
    ('upstream = ["h:25"]\nsmtp_listen = "0.0.0.0:25"\n', "smtp_listen"),  # the key at fault, not listen
    ('listen = ["127.0.0.1:2526"]\n', "upstream"),
    ('upstream = ["h:25"]\ndelivery_nice = 20\n', "delivery_nice"),
    ('upstream = ["h:25"]\ndelivery_nice = -5\n', "delivery_nice"),
    ('upstream = ["h:25"]\nevent_loop = "trio"\n', "event_loop"),
])
def test_mistakes_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert str(exc.value).startswith(f"{key}:"), str(exc.value)


def test_uvloop_asked_for_but_not_installed_is_refused_and_auto_falls_back(tmp_path, monkeypatch):
    from smtpgate.eventloop import resolve

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with pytest.raises(ConfigError, match=r"^event_loop: uvloop is not installed \(pip install smtpgate\[fast\]\)"):
        load_config(write(tmp_path, 'upstream = ["h:25"]\nevent_loop = "uvloop"\n'))
    assert load_config(write(tmp_path, 'upstream = ["h:25"]\n')).event_loop == "auto"
    assert (resolve("auto"), resolve("asyncio")) == ("asyncio", "asyncio")


def test_tokens_allow_a_network_listener_and_a_bare_smtp_port_means_loopback(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-1-0123456789ab\n\ntok-2-0123456789ab\n")
    tokens.chmod(0o600)
    config = load_config(write(tmp_path, f'upstream = ["h:25"]\nlisten = ["0.0.0.0:2526"]\n'
                                         f'tokens_file = "{tokens}"\nsmtp_listen = "2525"\n'))
    assert config.tokens == ["tok-1-0123456789ab", "tok-2-0123456789ab"]
    assert config.smtp_listen == "127.0.0.1:2525"


def test_the_default_inflight_budget_holds_one_line_of_the_largest_size():
    # Below it an overlong line would be answered BUSY (the budget) or
    # TOO_LARGE (the line) depending on how the kernel split the reads.
    small = Config(max_message_size=4096)
    assert small.inflight_budget == small.max_line
    assert Config().inflight_budget == 4 * Config().max_message_size
    assert Config(max_inflight_bytes=10 ** 9).inflight_budget == 10 ** 9
