"""Configuration parsing: sources and their precedence, value forms, derived values, errors.

Pure parsing through ``config.load(argv, environ)``; the real process is covered by
``tests/integration/test_cli.py``.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from anycable_gevent import config
from anycable_gevent.config import Config, load
from anycable_gevent.errors import ConfigError


@pytest.fixture
def conf_file(tmp_path: Path):
    """Write a config file (``key = value`` lines) and return its path."""

    def write(text: str) -> str:
        path = tmp_path / "anycable.conf"
        path.write_text(text)
        return str(path)

    return write


def expected_key(secret: str, phrase: str) -> str:
    return hmac.new(secret.encode(), phrase.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------- defaults


def test_defaults_follow_the_spec() -> None:
    cfg = load([], {})
    assert cfg.host == "localhost"
    assert cfg.port == 8080
    assert cfg.path == ["/cable"]
    assert cfg.health_path == "/health"
    assert cfg.allowed_origins == []
    assert cfg.headers == ["cookie"]
    assert cfg.broadcast_adapter == ["http"]
    assert cfg.http_broadcast_path == "/_broadcast"
    assert cfg.broker == "memory"
    assert (cfg.history_limit, cfg.history_ttl, cfg.sessions_ttl, cfg.presence_ttl) == (100, 300, 300, 15)
    assert cfg.ping_interval == 3
    assert cfg.ping_timestamp_precision == "s"
    assert cfg.pong_timeout == 0
    assert cfg.max_message_size == 65536
    assert cfg.ws_max_pending_size == 1048576
    assert cfg.jwt_param == "jid"
    assert cfg.shutdown_timeout == 30
    assert not (cfg.noauth or cfg.public or cfg.public_streams or cfg.enforce_jwt)
    assert cfg.streams_presence is True
    assert cfg.broadcast_auth_key == ""
    assert cfg.broadcast_port == 8090


def test_load_returns_an_immutable_config() -> None:
    cfg = load([], {})
    assert isinstance(cfg, Config)
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


# ---------------------------------------------------------------------- precedence


def test_config_file_overrides_defaults(conf_file) -> None:
    path = conf_file("port = 9001\nhealth_path = /up\n")
    cfg = load(["--config", path], {})
    assert (cfg.port, cfg.health_path) == (9001, "/up")


def test_env_overrides_config_file(conf_file) -> None:
    path = conf_file("port = 9001\nhealth_path = /up\n")
    cfg = load(["--config", path], {"ANYCABLE_PORT": "9002"})
    assert cfg.port == 9002
    assert cfg.health_path == "/up"  # what the environment does not set still comes from the file


def test_cli_overrides_env_and_config_file(conf_file) -> None:
    path = conf_file("port = 9001\n")
    cfg = load(["--config", path, "--port=9003"], {"ANYCABLE_PORT": "9002"})
    assert cfg.port == 9003


def test_config_file_via_environment(conf_file) -> None:
    # ANYCABLE_* only holds options; the file itself is given on the command line
    path = conf_file("port = 9001\n")
    assert load(["-c", path], {}).port == 9001
    assert load(["--config-path", path], {}).port == 9001


def test_config_file_accepts_colon_and_dashed_keys_and_comments(conf_file) -> None:
    path = conf_file("# a comment\nport: 9005\nhealth-path = /hc\n\nnoauth = true\n")
    cfg = load(["--config", path], {})
    assert (cfg.port, cfg.health_path, cfg.noauth) == (9005, "/hc", True)


@pytest.mark.parametrize(
    ("environ", "port"),
    [
        ({"PORT": "9004"}, 9004),
        ({"PORT": "9004", "ANYCABLE_PORT": "9005"}, 9005),  # the specific name wins over the alias
    ],
)
def test_port_alias(environ: dict[str, str], port: int) -> None:
    assert load([], environ).port == port


def test_port_alias_loses_to_cli() -> None:
    assert load(["--port=9006"], {"PORT": "9004"}).port == 9006


def test_port_alias_beats_config_file(conf_file) -> None:
    path = conf_file("port = 9001\n")
    assert load(["--config", path], {"PORT": "9004"}).port == 9004


def test_redis_broker_selects_the_redis_pubsub_unless_told_otherwise() -> None:
    assert load(["--broker=redis"], {}).pubsub_adapter == "redis"
    assert load(["--broker=redis", "--pubsub=none"], {}).pubsub_adapter == "none"  # one process on its own
    cfg = load(["--broker=redis", "--workers=2"], {})
    assert (cfg.broker, cfg.pubsub_adapter, cfg.workers) == ("redis", "redis", 2)


def test_redis_url_alias() -> None:
    assert load([], {"REDIS_URL": "redis://127.0.0.1:6390/2"}).redis_url == "redis://127.0.0.1:6390/2"
    env = {"REDIS_URL": "redis://a:1", "ANYCABLE_REDIS_URL": "redis://b:2"}
    assert load([], env).redis_url == "redis://b:2"


def test_unrelated_environment_is_ignored() -> None:
    assert load([], {"NOAUTH": "true", "ANYCABLE": "x", "HOST": "0.0.0.0"}).noauth is False


# ---------------------------------------------------------------------- value forms


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (["--noauth"], True),
        (["--noauth=true"], True),
        (["--noauth=false"], False),
        (["--noauth=0"], False),
        (["--noauth=1"], True),
        (["--noauth", "false"], False),
        (["--noauth", "--public_streams"], True),  # a bare flag does not swallow the next option
    ],
)
def test_boolean_flags(argv: list[str], value: bool) -> None:
    assert load(argv, {}).noauth is value


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("false", False), ("1", True), ("0", False)])
def test_boolean_env(raw: str, value: bool) -> None:
    assert load([], {"ANYCABLE_NOAUTH": raw}).noauth is value


def test_boolean_cli_false_overrides_env_true() -> None:
    assert load(["--noauth=false"], {"ANYCABLE_NOAUTH": "true"}).noauth is False


def test_boolean_env_false_overrides_file_true(conf_file) -> None:
    path = conf_file("noauth = true\n")
    assert load(["--config", path], {"ANYCABLE_NOAUTH": "false"}).noauth is False


def test_config_file_booleans(conf_file) -> None:
    # a bare key means true (configargparse), and the usual words are understood
    cfg = load(["--config", conf_file("noauth\npublic_streams = on\nstreams_presence = no\n")], {})
    assert (cfg.noauth, cfg.public_streams, cfg.streams_presence) == (True, True, False)


def test_default_true_boolean_can_be_turned_off() -> None:
    assert load(["--streams_presence=false"], {}).streams_presence is False
    assert load([], {"ANYCABLE_STREAMS_PRESENCE": "0"}).streams_presence is False


def test_bare_boolean_flag_leaves_the_next_option_alone() -> None:
    cfg = load(["--noauth", "--port=9010"], {})
    assert cfg.noauth is True and cfg.port == 9010


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--headers=cookie,x-api-token"], {}),
        (["--headers", " cookie , x-api-token ,"], {}),
        ([], {"ANYCABLE_HEADERS": "cookie,x-api-token"}),
    ],
)
def test_list_options(argv: list[str], environ: dict[str, str]) -> None:
    assert load(argv, environ).headers == ["cookie", "x-api-token"]


def test_list_option_in_config_file(conf_file) -> None:
    assert load(["--config", conf_file("headers = cookie,x-api-token\n")], {}).headers == ["cookie", "x-api-token"]


def test_bracketed_list_in_config_file(conf_file) -> None:
    # --help advertises `stuff=[a,b,c]` as the config file syntax for lists
    path = conf_file("headers = [cookie, x-api-token]\npath = [/cable, /ws]\n")
    cfg = load(["--config", path], {})
    assert cfg.headers == ["cookie", "x-api-token"]
    assert cfg.path == ["/cable", "/ws"]


def test_empty_list_option() -> None:
    assert load(["--headers="], {}).headers == []


def test_multiple_paths() -> None:
    assert load(["--path=/cable,/ws"], {}).path == ["/cable", "/ws"]


@pytest.mark.parametrize(
    ("argv", "environ", "attr", "value"),
    [
        (["--health-path=/h"], {}, "health_path", "/h"),
        (["--health_path=/h"], {}, "health_path", "/h"),
        ([], {"ANYCABLE_HEALTH_PATH": "/h"}, "health_path", "/h"),
        (["--max-conn=5"], {}, "max_conn", 5),
        (["--max_conn=5"], {}, "max_conn", 5),
        (["--proxy-cookies=a,b"], {}, "proxy_cookies", ["a", "b"]),
        (["--proxy_cookies=a,b"], {}, "proxy_cookies", ["a", "b"]),
        (["--allowed-origins=a.com"], {}, "allowed_origins", ["a.com"]),
        (["--ws-max-pending-size=10"], {}, "ws_max_pending_size", 10),
    ],
)
def test_dashed_and_underscored_spellings(argv, environ, attr, value) -> None:
    assert getattr(load(argv, environ), attr) == value


@pytest.mark.parametrize(
    ("argv", "environ", "attr", "value"),
    [
        (["--http_broadcast_secret=k"], {}, "broadcast_key", "k"),
        ([], {"ANYCABLE_HTTP_BROADCAST_SECRET": "k"}, "broadcast_key", "k"),
        (["--jwt_id_key=k"], {}, "jwt_key", "k"),
        ([], {"ANYCABLE_JWT_ID_KEY": "k"}, "jwt_key", "k"),
        (["--jwt_id_param=token"], {}, "jwt_param", "token"),
        (["--turbo_rails_key=k"], {}, "turbo_key", "k"),
        (["--broadcast_adapters=http"], {}, "broadcast_adapter", ["http"]),
    ],
)
def test_legacy_names(argv, environ, attr, value) -> None:
    assert getattr(load(argv, environ), attr) == value


def test_numbers() -> None:
    cfg = load(["--ping_interval=0.5", "--ws_max_pending_size=4096", "--shutdown_timeout=2"], {})
    assert cfg.ping_interval == 0.5
    assert cfg.ws_max_pending_size == 4096
    assert cfg.shutdown_timeout == 2.0


# ---------------------------------------------------------------------- derived values


def test_broadcast_key_derived_from_secret() -> None:
    cfg = load(["--secret=s3Krit"], {})
    assert cfg.broadcast_auth_key == expected_key("s3Krit", "broadcast-cable")
    assert len(cfg.broadcast_auth_key) == 64 and cfg.broadcast_auth_key == cfg.broadcast_auth_key.lower()


def test_explicit_broadcast_key_beats_secret() -> None:
    assert load(["--secret=s", "--broadcast_key=k"], {}).broadcast_auth_key == "k"


@pytest.mark.parametrize(
    "argv",
    [
        ["--broadcast_key=none"],
        ["--broadcast_key=none", "--secret=s"],
        ["--public"],
        ["--public", "--secret=s"],
        ["--public", "--broadcast_key=k"],
        ["--secret=none"],
    ],
)
def test_broadcast_without_key(argv: list[str]) -> None:
    assert load(argv, {}).broadcast_auth_key == ""


def test_rpc_secret_derived_from_secret() -> None:
    assert load(["--secret=s"], {}).rpc_secret == expected_key("s", "rpc-cable")
    assert load(["--secret=s", "--http_rpc_secret=r"], {}).rpc_secret == "r"
    assert load(["--secret=s", "--http_rpc_secret=none"], {}).rpc_secret == ""


def test_secret_is_the_fallback_for_jwt_and_streams() -> None:
    cfg = load(["--secret=s"], {})
    assert (cfg.jwt_key, cfg.streams_key, cfg.turbo_key, cfg.cable_ready_key) == ("s", "s", "s", "s")
    cfg = load(["--secret=s", "--streams_secret=st", "--jwt_secret=j"], {})
    assert (cfg.jwt_key, cfg.streams_key, cfg.turbo_key) == ("j", "st", "st")
    assert load(["--secret=s", "--turbo_streams_secret=t"], {}).turbo_key == "t"


@pytest.mark.parametrize(
    ("flag", "attr"),
    [
        ("--jwt_secret=none", "jwt_key"),
        ("--streams_secret=none", "streams_key"),
    ],
)
def test_none_disables_a_specific_secret_instead_of_falling_back(flag: str, attr: str) -> None:
    # anycable-go: a specific secret set to "none" does not inherit --secret
    assert getattr(load(["--secret=s", flag], {}), attr) == ""


def test_secret_none_means_no_secret() -> None:
    cfg = load(["--secret=none"], {})
    assert (cfg.jwt_key, cfg.streams_key, cfg.broadcast_auth_key, cfg.rpc_secret) == ("", "", "", "")


@pytest.mark.parametrize(
    ("argv", "port"),
    [
        ([], 8090),
        (["--http_broadcast_port=9100"], 9100),
        (["--http_broadcast_port=9100", "--secret=s"], 9100),
        (["--broadcast_key=k"], 8080),
        (["--secret=s"], 8080),
        (["--port=9200", "--secret=s"], 9200),
        (["--port=9200", "--broadcast_key=k"], 9200),
        (["--port=9200"], 8090),
        # 'none' is not a key: the endpoint is not secured, so it stays off the main port
        (["--broadcast_key=none"], 8090),
        (["--broadcast_key=none", "--secret=s"], 8090),
        (["--secret=none"], 8090),
        # the port is decided before --public removes the key (SPEC §6.2)
        (["--public"], 8090),
        (["--public", "--secret=s"], 8080),
    ],
)
def test_broadcast_port_rule(argv: list[str], port: int) -> None:
    assert load(argv, {}).broadcast_port == port


def test_broadcast_port_from_env_key() -> None:
    assert load(["--port=9300"], {"ANYCABLE_BROADCAST_KEY": "k"}).broadcast_port == 9300


# ---------------------------------------------------------------------- errors


def test_redis_broadcast_adapters_in_one_process() -> None:
    cfg = load(["--broadcast_adapter=http,redisx,redis", "--pubsub=none"])
    assert cfg.broadcast_adapter == ["http", "redisx", "redis"]
    assert cfg.pubsub_adapter == "none"
    # the legacy adapter is fan-out: it needs no pub/sub of its own
    assert load(["--broadcast_adapter=redis"]).pubsub_adapter == "none"


@pytest.mark.parametrize(
    ("argv", "environ", "names"),
    [
        (["--port=abc"], {}, ["--port"]),
        (["--port="], {}, ["--port"]),
        (["--port=0"], {}, ["--port"]),
        (["--port=70000"], {}, ["--port"]),
        ([], {"PORT": "abc"}, ["--port"]),
        ([], {"ANYCABLE_PORT": "-1"}, ["--port"]),
        (["--http_broadcast_port=70000"], {}, ["--http_broadcast_port"]),
        (["--broker=foo"], {}, ["--broker"]),
        (["--broadcast_adapter=foo"], {}, ["--broadcast_adapter"]),
        (["--broadcast_adapter=http,nats"], {}, ["--broadcast_adapter", "nats"]),
        # redisx picks the Redis pub/sub, which the memory broker (one process) cannot use
        (["--broadcast_adapter=redisx"], {}, ["--broadcast_adapter=redisx", "--pubsub=none", "--broker=redis"]),
        (["--pubsub=redis"], {}, ["--pubsub"]),
        (["--workers=2"], {}, ["--workers"]),
        (["--workers=0"], {}, ["--workers"]),
        (["--rpc_host=localhost:50051"], {}, ["--rpc_host"]),
        (["--rpc_impl=grpc"], {}, ["--rpc_impl"]),
        (["--rpc_impl=http"], {}, ["--rpc_impl", "--rpc_host"]),
        (["--http_broadcast_max_body=0"], {}, ["--http_broadcast_max_body"]),
        (["--max_message_size=0"], {}, ["--max_message_size"]),
        (["--ws_max_pending_size=-1"], {}, ["--ws_max_pending_size"]),
        (["--shutdown_timeout=0"], {}, ["--shutdown_timeout"]),
        (["--metrics_tags=novalue"], {}, ["--metrics_tags"]),
        (["--disconnect_mode=sometimes"], {}, ["--disconnect_mode"]),
        (["--ssl_cert=/etc/hostname"], {}, ["--ssl_cert", "--ssl_key"]),
        (["--ssl_key=/etc/hostname"], {}, ["--ssl_cert", "--ssl_key"]),
        (["--ssl_cert=/nonexistent.pem", "--ssl_key=/nonexistent.key"], {}, ["--ssl_cert"]),
        (["--noauth=maybe"], {}, ["--noauth"]),
        ([], {"ANYCABLE_NOAUTH": "maybe"}, ["--noauth"]),
        (["--ping_interval=abc"], {}, ["--ping_interval"]),
        (["--ping_interval=0"], {}, ["--ping_interval"]),
        (["--ping_timestamp_precision=us"], {}, ["--ping_timestamp_precision"]),
        (["--log_level=verbose"], {}, ["--log_level"]),
        (["--path=cable"], {}, ["--path"]),
        (["--path=/health"], {}, ["--path"]),
        (["--host="], {}, ["--host"]),
        (["--enforce_jwt"], {}, ["--enforce_jwt"]),
        (["--redis_url=http://x"], {}, ["--redis_url"]),
        (["--enable_ws_compression"], {}, ["--enable_ws_compression"]),
        (["--unknown_option=1"], {}, ["--unknown_option"]),
        (["--handshake_concurrency=0"], {}, ["--handshake_concurrency"]),
        (["--handshake_timeout=0"], {}, ["--handshake_timeout"]),
        (["--http_body_timeout=-1"], {}, ["--http_body_timeout"]),
        (["--workers=0"], {}, ["--workers"]),
        (["--worker_timeout=0"], {}, ["--worker_timeout"]),
        (["--workers=2"], {}, ["--workers", "--broker"]),
        (["--redis_keepalive_interval=0", "--broker=redis"], {}, ["--redis_keepalive_interval"]),
    ],
)
def test_bad_values_name_the_option(argv: list[str], environ: dict[str, str], names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv, environ)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_missing_config_file_names_the_option() -> None:
    with pytest.raises(ConfigError) as info:
        load(["--config", "/nonexistent/anycable.conf"], {})
    message = str(info.value)
    assert "--config" in message and "/nonexistent/anycable.conf" in message
    assert "\n" not in message


def test_unknown_key_in_config_file(conf_file) -> None:
    path = conf_file("port = 9001\nbogus_key = 1\n")
    with pytest.raises(ConfigError) as info:
        load(["--config", path], {})
    assert "bogus_key" in str(info.value)


def test_bad_value_in_config_file(conf_file) -> None:
    with pytest.raises(ConfigError, match="--port"):
        load(["--config", conf_file("port = abc\n")], {})


# ---------------------------------------------------------------------- help


def test_help_groups_options_by_section() -> None:
    text = config.build_parser().format_help()
    positions = [text.index(title + ":") for title in config.SECTIONS.values()]
    assert positions == sorted(positions)
    server, ws = positions[0], positions[1]
    assert server < text.index("  --port PORT") < ws
    auth = text.index(config.SECTIONS["auth"] + ":")
    broadcast = text.index(config.SECTIONS["broadcast"] + ":")
    assert auth < text.index("  --noauth") < broadcast


def test_help_shows_real_defaults() -> None:
    text = " ".join(config.build_parser().format_help().split())
    assert "default: None" not in text
    assert "[env var: ANYCABLE_PORT]" in text
    port_help = text[text.index("--port PORT Port") :][:200]
    assert "8080" in port_help


# ---------------------------------------------------------------------- Redis connections


def test_sentinel_entries_parse_with_default_port_credentials_and_scheme() -> None:
    spec = config.parse_sentinels(["10.0.0.1", " :p%40ss@10.0.0.2:26380 ", ""])
    assert spec is not None
    assert spec.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (spec.username, spec.password, spec.tls) == (None, "p@ss", False)
    tls = config.parse_sentinels(["rediss://u:pw@h1:1"])
    assert tls is not None and (tls.username, tls.password, tls.tls) == ("u", "pw", True)
    assert config.parse_sentinels([]) is None and config.parse_sentinels([" "]) is None


@pytest.mark.parametrize("entry", ["h:notaport", "h:99999", "http://h:1", "h:1/2", "redis://:pw@"])
def test_bad_sentinel_entries_are_refused_without_showing_credentials(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid sentinel address") as err:
        config.parse_sentinels([entry])
    assert "pw" not in str(err.value)


def test_redis_tls_is_unverified_unless_asked_or_given_a_ca(tmp_path: Path) -> None:
    from anycable_gevent.redis_client import tls_options

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert tls_options(load([], {})) == {"ssl_cert_reqs": "none", "ssl_check_hostname": False}
    assert tls_options(load(["--redis_tls_verify"], {}))["ssl_cert_reqs"] == "required"
    with_ca = tls_options(load([f"--redis_tls_ca_cert_path={ca}"], {}))
    assert with_ca == {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": str(ca)}
    cfg = load(["--redis_url=rediss://h:6380", "--broker=redis"], {})
    assert any("TLS to Redis without a certificate check" in w for w in config.warnings(cfg))
    assert not any("TLS to Redis" in w for w in config.warnings(load(["--broker=redis"], {})))
