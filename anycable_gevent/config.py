"""Settings: declared once (the :class:`Config` fields), parsed with configargparse.

Every field of :class:`Config` is one option. Its metadata gives the section (for
``--help`` grouping and the generated sample config), the help text, extra flag
spellings and extra environment variables. The parser, the environment names
(``ANYCABLE_<NAME>``), ``conf/anycable.conf`` and the README option table are all
derived from this table, so they cannot drift apart.

Precedence: command-line flags > ``ANYCABLE_*`` environment > config file > defaults.
Validation happens here, before anything binds a socket: a bad value raises
:class:`~anycable_gevent.errors.ConfigError` with a one-line message naming the option.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import configargparse

from anycable_gevent import __version__
from anycable_gevent import broadcast as broadcast_backends
from anycable_gevent import broker as broker_backends
from anycable_gevent import pubsub as pubsub_backends
from anycable_gevent.errors import ConfigError
from anycable_gevent.history import HistoryPolicy, HistorySettings
from anycable_gevent.keys import derive_key as derive_key  # re-exported: tools and tests import it from here

#: Option sections, in ``--help`` order.
SECTIONS: dict[str, str] = {
    "server": "Server: listening sockets and WebSocket endpoint",
    "ws": "Connections: pings, limits and slow clients",
    "auth": "Authentication: secrets, JWT, signed and public streams",
    "broadcast": "Broadcasting: how the application publishes messages",
    "broker": "Broker: streams history and resumable sessions",
    "pubsub": "Pub/sub and Redis",
    "rpc": "RPC backend (AnyCable HTTP RPC)",
    "process": "Process: workers and shutdown",
    "log": "Logging",
    "metrics": "Metrics",
}

#: Names accepted by the backend options come from each family's registry; these are
#: recognised too, so that the error message can say they are not available.
BROKERS = tuple(broker_backends.BACKENDS)
BROADCAST_ADAPTERS = tuple(broadcast_backends.BACKENDS)
PUBSUB_ADAPTERS = tuple(pubsub_backends.BACKENDS)
LATER = {
    "broker": tuple(n for n in ("redis", "nats") if n not in BROKERS),
    "broadcast_adapter": tuple(n for n in ("redis", "redisx", "nats") if n not in BROADCAST_ADAPTERS),
    "pubsub": tuple(n for n in ("redis", "nats") if n not in PUBSUB_ADAPTERS),
}

DEFAULT_BROADCAST_PORT = 8090


def _opt(
    default: Any,
    section: str,
    help: str,
    *,
    flags: Sequence[str] = (),
    env: Sequence[str] = (),
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare one option (a dataclass field with its metadata)."""
    meta = {
        "section": section,
        "help": help,
        "flags": tuple(flags),
        "env": tuple(env),
        "metavar": metavar,
        "choices": tuple(choices) if choices is not None else None,
    }
    if isinstance(default, list):
        items: list[str] = list(default)
        return field(default_factory=items.copy, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """The effective settings. Instances are immutable; build them with :func:`load`."""

    # -- server
    host: str = _opt("localhost", "server", "Host to bind the server to")
    port: int = _opt(8080, "server", "Port to listen on", env=["PORT"])
    path: list[str] = _opt(["/cable"], "server", "WebSocket endpoint path(s), comma-separated")
    health_path: str = _opt("/health", "server", "Health check endpoint path")
    allowed_origins: list[str] = _opt(
        [], "server", "Accepted Origin hosts, comma-separated (*.example.com wildcards); empty = any"
    )
    max_conn: int = _opt(0, "server", "Maximum simultaneous connections per worker (0 = unlimited)")
    handshake_timeout: float = _opt(
        5.0,
        "server",
        "Seconds a connection has to send its request line and headers, also between keep-alive requests (else 408)",
    )
    http_body_timeout: float = _opt(
        10.0, "server", "Seconds a request body may take to arrive, on every HTTP route (else 408)"
    )
    handshake_concurrency: int = _opt(
        256,
        "server",
        "Connections a worker handshakes at once; more wait in the kernel's accept queue (a reconnect storm)",
    )
    http_max_header_size: int = _opt(65536, "server", "Largest request header block in bytes (else 431)")
    http_max_headers: int = _opt(100, "server", "Most request header lines (else 431)")
    ssl_cert: str = _opt("", "server", "TLS certificate file (PEM)")
    ssl_key: str = _opt("", "server", "TLS private key file (PEM)")

    # -- connections
    ping_interval: float = _opt(3.0, "ws", "Seconds between server pings")
    ping_timestamp_precision: str = _opt("s", "ws", "Precision of ping timestamps", choices=["s", "ms", "ns"])
    pong_timeout: float = _opt(
        0.0, "ws", "Disconnect extended-protocol clients that send nothing this many seconds after a ping (0 = off)"
    )
    enable_native_pings: bool = _opt(False, "ws", "Also send WebSocket PING control frames")
    max_message_size: int = _opt(65536, "ws", "Largest client message in bytes (larger ones close with 1009)")
    ws_max_fragments: int = _opt(
        128, "ws", "Most frames one fragmented client message may have (else close 1008; 0 = unlimited)"
    )
    ws_frame_timeout: float = _opt(
        30.0,
        "ws",
        "Seconds a client may take to finish a frame or fragmented message it has begun (else close 1008; 0 = no limit)",
    )
    max_subscriptions: int = _opt(
        1024,
        "ws",
        "Channel subscriptions one connection may hold; more get reject_subscription (0 = unlimited)",
    )
    max_subscription_streams: int = _opt(
        1024, "ws", "Streams one subscription may follow; more are not started and are logged (0 = unlimited)"
    )
    max_history_messages: int = _opt(
        10000, "ws", "Most messages in one history reply; a larger one gets reject_history (0 = unlimited)"
    )
    ws_write_timeout: float = _opt(2.0, "ws", "Seconds a write to a client may block before it is dropped")
    ws_max_pending_size: int = _opt(
        1048576,
        "ws",
        "Bytes that may wait in a client's send buffer before it is disconnected as too slow (0 = unlimited)",
    )
    enable_ws_compression: bool = _opt(False, "ws", "Per-message deflate (not supported; must stay off)")

    # -- auth
    secret: str = _opt("", "auth", "Application secret: derives the broadcast key, RPC secret, JWT and streams secrets")
    noauth: bool = _opt(False, "auth", "Accept every connection without authentication (identifiers = sid)")
    public: bool = _opt(
        False, "auth", "Public mode: --noauth, --public_streams and an unauthenticated broadcast endpoint"
    )
    jwt_secret: str = _opt(
        "",
        "auth",
        "Secret for JWT identification (default: --secret)",
        flags=["--jwt_id_key"],
        env=["ANYCABLE_JWT_ID_KEY"],
    )
    jwt_param: str = _opt(
        "jid", "auth", "Query parameter (and x-<param> header) carrying the JWT", flags=["--jwt_id_param"]
    )
    enforce_jwt: bool = _opt(False, "auth", "Reject connections without a valid JWT", flags=["--jwt_id_enforce"])
    streams_secret: str = _opt("", "auth", "Secret for signed stream names (default: --secret)")
    public_streams: bool = _opt(False, "auth", "Allow unsigned $pubsub stream names")
    streams_whisper: bool = _opt(False, "auth", "Allow whispers on signed $pubsub streams")
    streams_presence: bool = _opt(True, "auth", "Allow presence on $pubsub streams")
    turbo_streams: bool = _opt(
        False, "auth", "Serve Turbo::StreamsChannel without RPC (needs a secret)", flags=["--turbo_rails"]
    )
    turbo_streams_secret: str = _opt(
        "", "auth", "Secret for Turbo signed stream names (default: streams secret)", flags=["--turbo_rails_key"]
    )
    cable_ready: bool = _opt(False, "auth", "Serve CableReady::Stream without RPC (needs a secret)")
    cable_ready_secret: str = _opt(
        "", "auth", "Secret for CableReady signed stream names (default: streams secret)", flags=["--cable_ready_key"]
    )

    # -- broadcasting
    broadcast_adapter: list[str] = _opt(
        ["http"],
        "broadcast",
        "Broadcast adapters, comma-separated: " + ", ".join(BROADCAST_ADAPTERS),
        flags=["--broadcast_adapters"],
    )
    broadcast_key: str = _opt(
        "",
        "broadcast",
        "Bearer key for the HTTP broadcast endpoint (default: derived from --secret; 'none' = no auth)",
        flags=["--http_broadcast_secret"],
        env=["ANYCABLE_HTTP_BROADCAST_SECRET"],
    )
    http_broadcast_port: int = _opt(
        0,
        "broadcast",
        f"Port of the HTTP broadcast endpoint (0 = main port when a key is set, else {DEFAULT_BROADCAST_PORT})",
    )
    http_broadcast_path: str = _opt("/_broadcast", "broadcast", "Path of the HTTP broadcast endpoint")
    http_broadcast_max_body: int = _opt(1048576, "broadcast", "Largest accepted broadcast request body in bytes")
    redis_channel: str = _opt(
        "__anycable__", "broadcast", "Redis channel of the legacy redis broadcast adapter (PUBLISH, fan-out)"
    )
    redisx_stream: str = _opt(
        "__anycable__", "broadcast", "Redis stream of the redisx broadcast adapter (XADD, consumer group bx)"
    )

    # -- broker
    broker: str = _opt("memory", "broker", "Broker: " + ", ".join(BROKERS), choices=BROKERS)
    history_limit: int = _opt(100, "broker", "Messages kept per stream (0 = none)")
    history_ttl: int = _opt(300, "broker", "Seconds a message stays in a stream's history")
    history_overrides: list[str] = _opt(
        [],
        "broker",
        "History per stream-name pattern, first match wins: PATTERN=LIMIT[/TTL], comma-separated "
        "(e.g. chat/*=1000/3600,cursor/*=0)",
    )
    sessions_ttl: int = _opt(
        300, "broker", "Seconds a session stays restorable after disconnect (0 = no resumable sessions)"
    )
    presence_ttl: int = _opt(15, "broker", "Seconds presence survives a disconnect")
    restore_hold: float = _opt(
        1.0, "broker", "Seconds live messages of a restored session wait for the client's history request"
    )

    # -- pub/sub and redis
    pubsub: str = _opt(
        "",
        "pubsub",
        "Pub/sub between workers and nodes: " + " or ".join(PUBSUB_ADAPTERS) + " (default: redis with "
        "--broker=redis, the redisx adapter or --workers > 1, else none)",
        choices=["", *PUBSUB_ADAPTERS],
    )
    redis_url: str = _opt(
        "redis://localhost:6379", "pubsub", "Redis URL (redis://, rediss:// or unix://)", env=["REDIS_URL"]
    )
    redis_sentinels: list[str] = _opt(
        [],
        "pubsub",
        "Redis Sentinel addresses, comma-separated [[user]:password@]host[:port] (port 26379); "
        "--redis_url then names the master: redis://mymaster (credentials given here are the master's)",
    )
    redis_sentinel_discovery_interval: int = _opt(
        30,
        "pubsub",
        "Accepted for anycable-go compatibility (each new connection asks the sentinels for the "
        "master: nothing to poll)",
    )
    redis_tls_verify: bool = _opt(
        False,
        "pubsub",
        "Verify the certificate of a rediss:// server (off by default, as in anycable-go; "
        "on when --redis_tls_ca_cert_path is given)",
    )
    redis_tls_ca_cert_path: str = _opt("", "pubsub", "CA certificate (PEM) that signed the Redis server's")
    redis_tls_client_cert_path: str = _opt("", "pubsub", "Client certificate (PEM) for mutual TLS with Redis")
    redis_tls_client_key_path: str = _opt("", "pubsub", "Client private key (PEM) for mutual TLS with Redis")
    redis_prefix: str = _opt("anycable:", "pubsub", "Prefix of every Redis key and channel of this server")
    redis_keepalive_interval: float = _opt(
        15.0,
        "pubsub",
        "Seconds of silence on a Redis pub/sub connection (--pubsub=redis, the redis broadcast adapter) "
        "before a probe checks it still hears (deaf: reconnect)",
    )
    node_id: str = _opt("", "pubsub", "Node name in logs and metrics (default: random)")

    # -- rpc
    rpc_host: str = _opt("", "rpc", "RPC backend URL, e.g. http://localhost:3000/_anycable (empty = no RPC)")
    rpc_impl: str = _opt(
        "", "rpc", "RPC implementation (http or none; default: from --rpc_host)", choices=["", "http", "none", "grpc"]
    )
    norpc: bool = _opt(False, "rpc", "Never call an RPC backend")
    http_rpc_secret: str = _opt("", "rpc", "Bearer secret for the RPC backend (default: derived from --secret)")
    http_rpc_timeout: int = _opt(0, "rpc", "HTTP RPC request timeout in ms (0 = --rpc_request_timeout or 3000)")
    rpc_request_timeout: int = _opt(0, "rpc", "RPC request timeout in ms (0 = 3000)")
    rpc_concurrency: int = _opt(28, "rpc", "Maximum concurrent RPC calls")
    headers: list[str] = _opt(["cookie"], "rpc", "Request headers passed to the backend, comma-separated")
    proxy_cookies: list[str] = _opt(
        [], "rpc", "Cookies passed to the backend, comma-separated (empty = all)", flags=["--proxy-cookies"]
    )
    disconnect_mode: str = _opt("auto", "rpc", "When to call Disconnect", choices=["auto", "always", "never"])
    disconnect_rate: int = _opt(100, "rpc", "Disconnect calls per second")
    disconnect_backlog_size: int = _opt(4096, "rpc", "Queued Disconnect calls before new ones are dropped")

    # -- process
    workers: int = _opt(1, "process", "Worker processes (more than 1 needs --broker=redis, or none, and Redis pub/sub)")
    reuseport: bool = _opt(
        False,
        "process",
        "With --workers > 1: a listening socket per worker (SO_REUSEPORT) instead of one shared socket, "
        "connections hashed evenly over them; set net.ipv4.tcp_migrate_req=1 so a worker that stops hands its queue on",
    )
    worker_timeout: float = _opt(
        30.0, "process", "Seconds a worker's event loop may be blocked before the master kills and replaces it"
    )
    shutdown_timeout: float = _opt(30.0, "process", "Seconds a graceful shutdown may take")
    restorable_shutdown: bool = _opt(
        False,
        "process",
        "On SIGTERM close connections with a close frame only, so that clients restore their sessions "
        "elsewhere (default: a server_restart message, after which the JS client starts a new session)",
    )
    shutdown_delay: float = _opt(0.0, "process", "Seconds to wait before starting a graceful shutdown")

    # -- logging
    log_level: str = _opt("info", "log", "Log level", choices=["debug", "info", "warn", "warning", "error"])
    log_format: str = _opt("text", "log", "Log format", choices=["text", "json"])
    debug: bool = _opt(False, "log", "Debug mode: level debug, log every frame")

    # -- metrics
    metrics_http: str = _opt("", "metrics", "Path of the Prometheus endpoint, e.g. /metrics (empty = off)")
    metrics_port: int = _opt(0, "metrics", "Port of the Prometheus endpoint (0 = main port)")
    metrics_host: str = _opt("", "metrics", "Host of the Prometheus endpoint (default: --host)")
    metrics_log: bool = _opt(False, "metrics", "Log metrics periodically")
    metrics_rotate_interval: int = _opt(
        15, "metrics", "Seconds between metrics log lines", flags=["--metrics_log_interval"]
    )
    metrics_log_filter: list[str] = _opt(
        [], "metrics", "Metrics to include in the log line, comma-separated (empty = all)"
    )
    metrics_tags: list[str] = _opt([], "metrics", "Labels added to every metric, k:v comma-separated")
    stats_refresh_interval: int = _opt(5, "metrics", "Seconds between gauge refreshes")

    # ------------------------------------------------------------------ derived values
    @property
    def streams_key(self) -> str:
        """Secret for ``$pubsub`` signed stream names."""
        return _fallback(self.streams_secret, _none(self.secret))

    @property
    def turbo_key(self) -> str:
        return _fallback(self.turbo_streams_secret, self.streams_key)

    @property
    def cable_ready_key(self) -> str:
        return _fallback(self.cable_ready_secret, self.streams_key)

    @property
    def jwt_key(self) -> str:
        return _fallback(self.jwt_secret, _none(self.secret))

    @property
    def allow_public_streams(self) -> bool:
        return self.public_streams or self.public

    @property
    def accept_unauthenticated(self) -> bool:
        return self.noauth or self.public

    @property
    def broadcast_auth_key(self) -> str:
        """The Bearer key the broadcast endpoint requires ('' = no authentication)."""
        if self.public or self.broadcast_key == "none":
            return ""
        if self.broadcast_key:
            return self.broadcast_key
        return derive_key(self.secret, "broadcast-cable") if _none(self.secret) else ""

    @property
    def rpc_secret(self) -> str:
        if self.http_rpc_secret == "none":
            return ""
        if self.http_rpc_secret:
            return self.http_rpc_secret
        return derive_key(self.secret, "rpc-cable") if _none(self.secret) else ""

    @property
    def broadcast_port(self) -> int:
        """Port of the HTTP broadcast endpoint (SPEC §6.2: decided before 'none'/public handling)."""
        if self.http_broadcast_port:
            return self.http_broadcast_port
        if self.broadcast_key == "none":
            return DEFAULT_BROADCAST_PORT  # 'none' also stops the --secret fallback
        secured = bool(self.broadcast_key) or bool(_none(self.secret))
        return self.port if secured else DEFAULT_BROADCAST_PORT

    @property
    def rpc_timeout(self) -> float:
        """Per-request RPC timeout in seconds."""
        return (self.http_rpc_timeout or self.rpc_request_timeout or 3000) / 1000.0

    @property
    def pubsub_adapter(self) -> str:
        """The pub/sub in use: ``--pubsub``, or chosen from the broker and broadcasters."""
        if self.pubsub:
            return self.pubsub
        if self.broker == "redis" or "redisx" in self.broadcast_adapter or self.workers > 1:
            return "redis"
        return "none"

    @property
    def history_policy(self) -> HistoryPolicy:
        """History settings per stream (``--history_limit``/``--history_ttl`` and the overrides)."""
        return HistoryPolicy.parse(self.history_overrides, HistorySettings(self.history_limit, self.history_ttl))

    @property
    def uses_redis(self) -> bool:
        """Some backend of this configuration talks to Redis (``--redis_url``)."""
        return (
            broker_backends.BACKENDS[self.broker].redis
            or pubsub_backends.BACKENDS[self.pubsub_adapter].redis
            or any(broadcast_backends.BACKENDS[a].redis for a in self.broadcast_adapter)
        )

    @property
    def redis_sentinel_spec(self) -> SentinelSpec | None:
        """``--redis_sentinels`` parsed (None without sentinels); validated by :func:`load`."""
        return parse_sentinels(self.redis_sentinels)

    @property
    def redis_tls_verified(self) -> bool:
        """The Redis server's certificate is checked (asked for, or a CA is given)."""
        return self.redis_tls_verify or bool(self.redis_tls_ca_cert_path)

    @property
    def rpc_enabled(self) -> bool:
        return bool(self.rpc_host) and not self.norpc and self.rpc_impl != "none"

    @property
    def level(self) -> str:
        if self.debug:
            return "debug"
        return "warning" if self.log_level == "warn" else self.log_level

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def safe_url(url: str) -> str:
    """The URL without user and password (for logs, the banner and errors).

    Also for text that is not a valid URL (``redis://u:p@[bad``) and for a password
    that was not percent-encoded and so ends the authority early (``redis://u:pa/ss@h``):
    everything up to the last ``@`` is hidden then.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if sep else "***@" + url.rsplit("@", 1)[1]


def _check_url(option: str, url: str, schemes: tuple[str, ...], hint: str) -> None:
    """A URL option parses, has one of ``schemes`` and a valid port (errors never show credentials)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        # not the parser's message: it quotes the port text, which may be a password
        # that ended the authority early (redis://user:pa/ss@host)
        raise ConfigError(f"--{option}: invalid URL {safe_url(url)!r} (check its host and port)") from None
    if parts.scheme not in schemes:
        raise ConfigError(f"--{option}: unsupported scheme in {safe_url(url)!r} ({hint})")


def _none(value: str) -> str:
    """The literal ``none`` means 'no secret'."""
    return "" if value == "none" else value


def _fallback(value: str, default: str) -> str:
    """A specific secret: unset inherits ``default``; ``none`` disables it (anycable-go)."""
    if value == "none":
        return ""
    return value or default


# ---------------------------------------------------------------------- parsing helpers

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def parse_bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_list(value: str) -> list[str]:
    if isinstance(value, list):
        items = value
    else:
        items = str(value).split(",")
    return [s.strip() for s in items if str(s).strip()]


def _kind(f: dataclasses.Field[Any]) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return "list"
    return type(f.default).__name__


def env_name(name: str) -> str:
    return "ANYCABLE_" + name.upper().replace("-", "_")


def flag_names(f: dataclasses.Field[Any]) -> list[str]:
    """All spellings of an option: --name, --name-with-dashes, plus declared aliases."""
    names = ["--" + f.name]
    dashed = "--" + f.name.replace("_", "-")
    if dashed not in names:
        names.append(dashed)
    for extra in f.metadata["flags"]:
        for n in (extra, extra.replace("_", "-")):
            if n not in names:
                names.append(n)
    return names


def fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Config)


class _Parser(configargparse.ArgParser):
    """Raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        if message.startswith("Unable to open config file"):
            message = f"--config: {message}"
        raise ConfigError(message)

    def convert_item_to_command_line_arg(self, action: Any, key: str, value: Any) -> list[str]:
        # `key = [a, b]` in a config file (the syntax --help advertises): our list
        # options take one comma-separated value
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        return super().convert_item_to_command_line_arg(action, key, value)  # type: ignore[no-any-return]


def build_parser() -> configargparse.ArgParser:
    parser = _Parser(
        prog="anycable-gevent",
        description="AnyCable-compatible real-time server on gevent.",
        args_for_setting_config_path=["-c", "--config", "--config-path"],
        config_arg_help_message="Config file (key = value lines, option names as below)",
        default_config_files=[],
        formatter_class=configargparse.HelpFormatter,
        add_env_var_help=True,
        auto_env_var_prefix=None,
    )
    parser.add_argument("-v", "--version", action="version", version=f"anycable-gevent {__version__}")
    groups = {key: parser.add_argument_group(title) for key, title in SECTIONS.items()}
    for f in fields():
        meta = f.metadata
        kind = _kind(f)
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": _help_text(f),
            "env_var": env_name(f.name),
            "default": None,  # None = not given; defaults are applied in load()
        }
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = meta["metavar"] or f.name.upper()
        groups[meta["section"]].add_argument(*flag_names(f), **kwargs)
    return parser


def _help_text(f: dataclasses.Field[Any]) -> str:
    """Help line with the real default (argparse only sees None: 'not given')."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    text = str(f.metadata["help"])
    shown = format_default(default)
    if shown:
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")


def _convert(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind = _kind(f)
    name = f.name
    try:
        if kind == "bool":
            value: Any = raw if isinstance(raw, bool) else parse_bool(raw)
        elif kind == "int":
            value = int(str(raw).strip())
        elif kind == "float":
            value = float(str(raw).strip())
        elif kind == "list":
            value = parse_list(raw)
        else:
            value = str(raw)
    except ValueError as exc:
        raise ConfigError(f"--{name}: invalid value {raw!r} ({exc})") from None
    # Bytes of argv or the environment that are not UTF-8 arrive as lone surrogates; such
    # a value (a secret, a path, a stream pattern) would fail far from here, when encoded.
    # Not echoed: it may be a secret.
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise ConfigError(f"--{name}: the value is not valid UTF-8 text") from None
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        later = LATER.get(name, ())
        if value in later:
            raise ConfigError(
                f"--{name}={value} is not available in this version (available: {', '.join(c for c in choices if c)})"
            )
        raise ConfigError(
            f"--{name}: invalid choice {value!r} (choose from {', '.join(repr(c) for c in choices if c)})"
        )
    return value


def load(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Parse flags, environment and config file into a validated :class:`Config`.

    Raises:
        ConfigError: a bad value or combination (one line, naming the option).
    """
    env = dict(os.environ if environ is None else environ)
    parser = build_parser()
    # Extra environment aliases (PORT, REDIS_URL, legacy names) are lower priority than
    # ANYCABLE_<NAME>; configargparse only knows one variable per option, so fold them in.
    for f in fields():
        for alias in f.metadata["env"]:
            if alias in env and env_name(f.name) not in env:
                env[env_name(f.name)] = env[alias]
    try:
        ns = parser.parse_args(args=list(sys.argv[1:] if argv is None else argv), env_vars=env)
    except ConfigError:
        raise
    except configargparse.ConfigFileParserException as exc:
        raise ConfigError(f"--config: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--config: {exc}") from None
    values: dict[str, Any] = {}
    for f in fields():
        raw = getattr(ns, f.name)
        if raw is not None:
            values[f.name] = _convert(f, raw)
    cfg = Config(**values)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-option checks; raises ConfigError with a one-line message naming the option."""
    for name in ("port",):
        _check(1 <= cfg.port <= 65535, f"--{name}: must be between 1 and 65535, got {cfg.port}")
    for name in ("http_broadcast_port", "metrics_port"):
        v = getattr(cfg, name)
        _check(0 <= v <= 65535, f"--{name}: must be between 0 and 65535, got {v}")
    _check(bool(cfg.host.strip()), "--host: must not be empty")
    _check(bool(cfg.path), "--path: at least one path is required")
    for p in cfg.path:
        _check(p.startswith("/"), f"--path: {p!r} must start with '/'")
    for name in ("health_path", "http_broadcast_path"):
        v = getattr(cfg, name)
        _check(v.startswith("/"), f"--{name}: {v!r} must start with '/'")
    if cfg.metrics_http:
        _check(cfg.metrics_http.startswith("/"), f"--metrics_http: {cfg.metrics_http!r} must start with '/'")
    reserved = {cfg.health_path: "health_path", cfg.http_broadcast_path: "http_broadcast_path"}
    if cfg.metrics_http:
        reserved[cfg.metrics_http] = "metrics_http"
    for p in cfg.path:
        _check(p not in reserved, f"--path: {p!r} is already used by --{reserved.get(p)}")
    _check(cfg.max_conn >= 0, f"--max_conn: must be >= 0, got {cfg.max_conn}")
    _check(cfg.handshake_concurrency >= 1, f"--handshake_concurrency: must be >= 1, got {cfg.handshake_concurrency}")
    _check(cfg.handshake_timeout > 0, f"--handshake_timeout: must be > 0 seconds, got {cfg.handshake_timeout:g}")
    _check(cfg.http_body_timeout > 0, f"--http_body_timeout: must be > 0 seconds, got {cfg.http_body_timeout:g}")
    _check(
        cfg.http_max_header_size >= 1024,
        f"--http_max_header_size: must be >= 1024 bytes, got {cfg.http_max_header_size}",
    )
    _check(cfg.http_max_headers >= 8, f"--http_max_headers: must be >= 8, got {cfg.http_max_headers}")
    _check(bool(cfg.ssl_cert) == bool(cfg.ssl_key), "--ssl_cert and --ssl_key must be given together")
    for name in ("ssl_cert", "ssl_key"):
        v = getattr(cfg, name)
        _check(not v or os.path.isfile(v), f"--{name}: file not found: {v}")

    _validate_runtime(cfg)


#: Port of a sentinel given without one.
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelSpec:
    """What ``--redis_sentinels`` says: where the sentinels are, and the credentials given
    with them (anycable-go reads those as the master's; they are used when ``--redis_url``
    has none). ``tls``: the entries are ``rediss://``."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_sentinels(entries: Sequence[str]) -> SentinelSpec | None:
    """``["[redis[s]://][[user]:password@]host[:port]", ...]`` → a :class:`SentinelSpec`
    (None when empty); credentials and scheme come from the first entry that has them.

    Raises:
        ValueError: an entry that is not ``host[:port]``, a bad port, mixed schemes.
    """
    nodes: list[tuple[str, int]] = []
    username = password = None
    schemes: set[str] = set()
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        text = entry if "://" in entry else f"redis://{entry}"
        try:
            parts = urlsplit(text)
            port = parts.port or SENTINEL_PORT
        except ValueError:
            raise ValueError(f"invalid sentinel address {safe_url(text)!r} (use host:port)") from None
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.path.strip("/"):
            raise ValueError(f"invalid sentinel address {safe_url(text)!r} (use host:port)")
        schemes.add(parts.scheme)
        if password is None and parts.password is not None:
            username, password = unquote(parts.username) if parts.username else None, unquote(parts.password)
        nodes.append((parts.hostname, port))
    if not nodes:
        return None
    if len(schemes) > 1:
        raise ValueError("mix of redis:// and rediss:// sentinels")
    return SentinelSpec(tuple(nodes), username, password, schemes == {"rediss"})


def _validate_redis_connection(cfg: Config) -> None:
    """Sentinels and TLS files (checked whatever the backends: a typo fails before anything runs)."""
    try:
        parse_sentinels(cfg.redis_sentinels)
    except ValueError as exc:
        raise ConfigError(f"--redis_sentinels: {exc}") from None
    if cfg.redis_sentinels:
        parts = urlsplit(cfg.redis_url)
        _check(
            parts.scheme in ("redis", "rediss") and bool(parts.hostname),
            f"--redis_url: with --redis_sentinels it names the master, e.g. redis://mymaster, "
            f"got {safe_url(cfg.redis_url)!r}",
        )
    _check(
        cfg.redis_sentinel_discovery_interval > 0,
        f"--redis_sentinel_discovery_interval: must be > 0 seconds, got {cfg.redis_sentinel_discovery_interval}",
    )
    for name in ("redis_tls_ca_cert_path", "redis_tls_client_cert_path", "redis_tls_client_key_path"):
        v = getattr(cfg, name)
        _check(not v or os.path.isfile(v), f"--{name}: file not found: {v}")
    pair = [cfg.redis_tls_client_cert_path, cfg.redis_tls_client_key_path]
    _check(
        all(pair) or not any(pair),
        "--redis_tls_client_cert_path and --redis_tls_client_key_path must be given together",
    )


def _validate_runtime(cfg: Config) -> None:
    _check(cfg.ping_interval > 0, f"--ping_interval: must be > 0 seconds, got {cfg.ping_interval:g}")
    _check(cfg.pong_timeout >= 0, f"--pong_timeout: must be >= 0, got {cfg.pong_timeout:g}")
    _check(cfg.max_message_size > 0, f"--max_message_size: must be > 0, got {cfg.max_message_size}")
    _check(cfg.ws_max_fragments >= 0, f"--ws_max_fragments: must be >= 0, got {cfg.ws_max_fragments}")
    _check(cfg.ws_frame_timeout >= 0, f"--ws_frame_timeout: must be >= 0, got {cfg.ws_frame_timeout:g}")
    _check(cfg.max_subscriptions >= 0, f"--max_subscriptions: must be >= 0, got {cfg.max_subscriptions}")
    for name in ("max_subscription_streams", "max_history_messages"):
        _check(getattr(cfg, name) >= 0, f"--{name}: must be >= 0, got {getattr(cfg, name)}")
    _check(cfg.ws_write_timeout > 0, f"--ws_write_timeout: must be > 0 seconds, got {cfg.ws_write_timeout:g}")
    _check(cfg.ws_max_pending_size >= 0, f"--ws_max_pending_size: must be >= 0, got {cfg.ws_max_pending_size}")
    _check(not cfg.enable_ws_compression, "--enable_ws_compression: per-message deflate is not supported")

    _check(bool(cfg.jwt_param.strip()), "--jwt_param: must not be empty")
    _check(not (cfg.enforce_jwt and not cfg.jwt_key), "--enforce_jwt needs --jwt_secret or --secret")

    _validate_backends(cfg)


def _validate_backends(cfg: Config) -> None:
    for a in cfg.broadcast_adapter:
        if a not in BROADCAST_ADAPTERS:
            if a in LATER["broadcast_adapter"]:
                raise ConfigError(
                    f"--broadcast_adapter={a} is not available in this version "
                    f"(available: {', '.join(BROADCAST_ADAPTERS)})"
                )
            raise ConfigError(
                f"--broadcast_adapter: unknown adapter {a!r} (choose from {', '.join(BROADCAST_ADAPTERS)})"
            )
    _check(
        cfg.http_broadcast_max_body > 0, f"--http_broadcast_max_body: must be > 0, got {cfg.http_broadcast_max_body}"
    )

    _check(cfg.history_limit >= 0, f"--history_limit: must be >= 0, got {cfg.history_limit}")
    _check(cfg.history_ttl > 0, f"--history_ttl: must be > 0 seconds, got {cfg.history_ttl}")
    _check(cfg.sessions_ttl >= 0, f"--sessions_ttl: must be >= 0, got {cfg.sessions_ttl}")
    _check(cfg.presence_ttl > 0, f"--presence_ttl: must be > 0 seconds, got {cfg.presence_ttl}")
    _check(cfg.restore_hold >= 0, f"--restore_hold: must be >= 0, got {cfg.restore_hold:g}")
    try:
        _ = cfg.history_policy
    except ValueError as exc:
        raise ConfigError(f"--history_overrides: {exc}") from None
    if cfg.pubsub_adapter == "redis" and cfg.broker == "memory" and cfg.workers == 1:
        if not cfg.pubsub and "redisx" in cfg.broadcast_adapter:
            raise ConfigError(
                "--broadcast_adapter=redisx selects --pubsub=redis (each entry reaches one node, which "
                "fans it out to the others), and --broker=memory keeps offsets in this process only: "
                "use --broker=redis, or --pubsub=none for a single process"
            )
        raise ConfigError(
            "--broker=memory keeps offsets and history in this process only; "
            "with --pubsub=redis (several processes or nodes) use --broker=redis"
        )
    _check(
        cfg.redis_keepalive_interval > 0,
        f"--redis_keepalive_interval: must be > 0 seconds, got {cfg.redis_keepalive_interval:g}",
    )
    _check(
        "{" not in cfg.redis_prefix and "}" not in cfg.redis_prefix,
        "--redis_prefix: must not contain { or } (they make Redis Cluster hash tags)",
    )

    _check_url("redis_url", cfg.redis_url, ("redis", "rediss", "unix"), "use redis://, rediss:// or unix://")
    _validate_redis_connection(cfg)
    if cfg.rpc_host:
        _check_url(
            "rpc_host",
            cfg.rpc_host,
            ("http", "https"),
            "not an HTTP URL; gRPC is not supported, use AnyCable HTTP RPC "
            "(e.g. --rpc_host=http://localhost:3000/_anycable)",
        )
    _check(cfg.rpc_impl != "grpc", "--rpc_impl=grpc is not supported; use http")
    _check(not (cfg.rpc_impl == "http" and not cfg.rpc_host), "--rpc_impl=http needs --rpc_host")
    _check(cfg.rpc_concurrency >= 0, f"--rpc_concurrency: must be >= 0, got {cfg.rpc_concurrency}")
    for name in ("http_rpc_timeout", "rpc_request_timeout"):
        _check(getattr(cfg, name) >= 0, f"--{name}: must be >= 0 ms")
    _check(cfg.disconnect_rate > 0, f"--disconnect_rate: must be > 0, got {cfg.disconnect_rate}")
    _check(
        cfg.disconnect_backlog_size > 0, f"--disconnect_backlog_size: must be > 0, got {cfg.disconnect_backlog_size}"
    )

    _check(cfg.workers >= 1, f"--workers: must be >= 1, got {cfg.workers}")
    if cfg.workers > 1:
        _check(
            cfg.broker != "memory",
            "--workers > 1 cannot use --broker=memory (each worker would have its own epoch, offsets and "
            "sessions): use --broker=redis",
        )
        _check(
            cfg.pubsub_adapter == "redis",
            "--workers > 1 needs --pubsub=redis (workers hand each other's broadcasts through Redis)",
        )
    _check(cfg.worker_timeout > 0, f"--worker_timeout: must be > 0 seconds, got {cfg.worker_timeout:g}")
    _check(cfg.shutdown_timeout > 0, f"--shutdown_timeout: must be > 0, got {cfg.shutdown_timeout:g}")
    _check(cfg.shutdown_delay >= 0, f"--shutdown_delay: must be >= 0, got {cfg.shutdown_delay:g}")

    _check(cfg.metrics_rotate_interval > 0, "--metrics_rotate_interval: must be > 0")
    _check(cfg.stats_refresh_interval > 0, "--stats_refresh_interval: must be > 0")
    for tag in cfg.metrics_tags:
        _check(":" in tag and tag.split(":", 1)[0].strip() != "", f"--metrics_tags: {tag!r} is not k:v")


def warnings(cfg: Config) -> list[str]:
    """Risky or ineffective settings, for the startup banner (the server still starts)."""
    out = []
    if cfg.turbo_streams and not cfg.turbo_key:
        out.append("--turbo_streams has no effect without --turbo_streams_secret, --streams_secret or --secret")
    if cfg.cable_ready and not cfg.cable_ready_key:
        out.append("--cable_ready has no effect without --cable_ready_secret, --streams_secret or --secret")
    if cfg.public:
        out.append("--public: every connection is accepted, every stream is public, broadcasts need no key")
    elif cfg.noauth:
        out.append("--noauth: every connection is accepted without authentication")
    if "http" in cfg.broadcast_adapter and not cfg.broadcast_auth_key and not is_loopback(cfg.host):
        out.append(
            f"the broadcast endpoint on {cfg.host}:{cfg.broadcast_port}{cfg.http_broadcast_path} accepts "
            "publications without a key; set --broadcast_key or --secret, or bind to a loopback host"
        )
    if cfg.jwt_key and len(cfg.jwt_key.encode()) < 32:
        out.append("the JWT secret is shorter than 32 bytes (RFC 7518 recommends at least 32 for HS256)")
    if cfg.metrics_port and not cfg.metrics_http:
        out.append("--metrics_port has no effect without --metrics_http")
    sentinels = cfg.redis_sentinel_spec
    tls = cfg.redis_url.startswith("rediss://") or (sentinels is not None and sentinels.tls)
    if cfg.uses_redis and tls and not cfg.redis_tls_verified:
        out.append(
            "TLS to Redis without a certificate check (as anycable-go does by default); "
            "set --redis_tls_verify or --redis_tls_ca_cert_path"
        )
    return out


def is_loopback(host: str) -> bool:
    """True for a host only this machine can reach: ``localhost``, 127.0.0.0/8, ``::1``."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def settings_table() -> list[dict[str, Any]]:
    """One row per option: for the README table and the sample config."""
    rows = []
    for f in fields():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(
            {
                "name": f.name,
                "section": f.metadata["section"],
                "flags": flag_names(f),
                "env": [env_name(f.name), *f.metadata["env"]],
                "default": default,
                "help": f.metadata["help"],
                "choices": f.metadata["choices"],
            }
        )
    return rows


def format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
