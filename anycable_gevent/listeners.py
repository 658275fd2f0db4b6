"""Listening sockets: which ports serve what (a plan, as data) and binding them.

The plan is derived from the configuration alone, so a master process can bind every
socket before it forks (a busy port fails before anything starts) and the workers build
the same routes on the sockets they inherit. Stdlib only: no gevent here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from anycable_gevent.config import Config
from anycable_gevent.errors import ConfigError

#: Asked of listen(): Linux caps it at net.core.somaxconn, so the accept queue is as deep as the
#: system allows (what Go's listeners, and so anycable-go's, get too).
LISTEN_BACKLOG = 65535

# What a path of a port serves.
HEALTH = "health"
BROADCAST = "broadcast"
METRICS = "metrics"


@dataclass
class Listen:
    """One listening port: its bind host, WebSocket paths and other routes (path -> kind)."""

    port: int
    host: str = ""
    ws_paths: tuple[str, ...] = ()
    routes: dict[str, str] = field(default_factory=dict)

    @property
    def metrics_only(self) -> bool:
        return not self.ws_paths and set(self.routes.values()) == {METRICS}


def plan(cfg: Config) -> dict[int, Listen]:
    """Every port this configuration listens on, by port number."""
    ports: dict[int, Listen] = {}

    def at(port: int) -> Listen:
        listen = ports.get(port)
        if listen is None:
            listen = ports[port] = Listen(port)
        return listen

    main = at(cfg.port)
    main.ws_paths = tuple(cfg.path)
    main.routes[cfg.health_path] = HEALTH
    if "http" in cfg.broadcast_adapter:
        at(cfg.broadcast_port).routes[cfg.http_broadcast_path] = BROADCAST
    if cfg.metrics_http:
        at(cfg.metrics_port or cfg.port).routes[cfg.metrics_http] = METRICS
    for listen in ports.values():
        # --metrics_host only applies to a port that serves nothing but metrics
        use_metrics_host = cfg.metrics_http and cfg.metrics_host and listen.metrics_only
        listen.host = cfg.metrics_host if use_metrics_host else cfg.host
    return dict(sorted(ports.items()))


def bind_socket(host: str, port: int, reuseport: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` (a plain stdlib one: a gevent worker wraps it).

    It listens, unless ``reuseport``: then it only reserves the address (SO_REUSEPORT, not
    listening, so the kernel hands it no connections) and each worker binds a listening
    socket of its own beside it (:func:`reuse_socket`).
    """
    if host == "localhost":
        host = "127.0.0.1"
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not reuseport:
        sock.listen(LISTEN_BACKLOG)
    return sock


def reuse_socket(reserved: socket.socket) -> socket.socket:
    """A listening socket of this worker on the address ``reserved`` holds (SO_REUSEPORT:
    the kernel spreads new connections over the workers' sockets)."""
    sock = socket.socket(reserved.family, reserved.type, reserved.proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(reserved.getsockname())
    sock.listen(LISTEN_BACKLOG)
    return sock


def bind(cfg: Config, ports: dict[int, Listen]) -> dict[int, socket.socket]:
    """Bind every planned port (with ``--reuseport`` and several workers, only reserve them).

    Raises:
        ConfigError: a port cannot be bound; the message names the options to change.
            Nothing stays bound.
    """
    reuseport = cfg.reuseport and cfg.workers > 1
    socks: dict[int, socket.socket] = {}
    for port, listen in ports.items():
        try:
            socks[port] = bind_socket(listen.host, port, reuseport)
        except ConfigError as exc:
            for sock in socks.values():
                sock.close()
            raise ConfigError(f"{exc}; stop what uses it or choose another {port_options(cfg, port)}") from None
    return socks


def port_options(cfg: Config, port: int) -> str:
    """The options that put something on ``port`` (for an error message)."""
    names = []
    if port == cfg.port:
        names.append("--port")
    if "http" in cfg.broadcast_adapter and port == cfg.broadcast_port and cfg.http_broadcast_port:
        names.append("--http_broadcast_port")
    elif "http" in cfg.broadcast_adapter and port == cfg.broadcast_port and port != cfg.port:
        names.append("--http_broadcast_port (default 8090 without a broadcast key)")
    if cfg.metrics_http and port == cfg.metrics_port:
        names.append("--metrics_port")
    return " / ".join(names) or "port"
