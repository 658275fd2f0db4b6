"""The composition root: builds the object graph from a Config, serves, shuts down.

Runs in a gevent-patched process (see :mod:`anycable_gevent.cli`). Constructors do
no I/O; :meth:`Server.bind` opens the listening sockets and :meth:`Server.serve`
starts the components in dependency order and stops them in reverse on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import signal
import socket
import time
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from anycable_gevent import __version__, config
from anycable_gevent.broker import build_broker
from anycable_gevent.config import Config
from anycable_gevent.controllers import build_controller
from anycable_gevent.errors import ConfigError
from anycable_gevent.hub import Hub
from anycable_gevent.metrics import DIR_ENV as METRICS_DIR_ENV
from anycable_gevent.metrics import Metrics, parse_tags
from anycable_gevent.node import Node
from anycable_gevent.pubsub import LocalPubSub
from anycable_gevent.transport import CableHandler, CableServer, ConnectionGate, HTTPLimits
from anycable_gevent.web import Dispatcher, create_broadcast_app, health_app, metrics_app
from anycable_gevent.ws import CableEndpoint

log = logging.getLogger("anycable_gevent.main")

LISTEN_BACKLOG = 4096

#: Below this many open files the banner warns (each connection holds one).
LOW_FILE_LIMIT = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (gevent-cooperative once patched)."""
    if host == "localhost":
        host = "127.0.0.1"
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


class _ErrorLog:
    """pywsgi's error log: handler exceptions go to our logger, not to stderr."""

    def write(self, data: str) -> None:
        data = data.strip()
        if data:
            log.debug("wsgi: %s", data)

    def flush(self) -> None:
        pass


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics(directory=os.environ.get(METRICS_DIR_ENV, ""))
        self.hub = Hub()
        self.broker = build_broker(cfg)
        self.controller = build_controller(cfg, self.metrics)
        self.node = Node(cfg, self.controller, self.broker, self.hub, self.metrics, LocalPubSub)
        self.endpoint = CableEndpoint(cfg, self.node, self.metrics)
        self.dispatchers: dict[int, Dispatcher] = {}
        self._build_routes()
        self.listeners: dict[int, socket.socket] = {}
        self.servers: list[WSGIServer] = []
        self.stopped = Event()
        self._signals = 0
        # both walk something big (the heap, /proc): refreshed every --stats_refresh_interval
        self.metrics.gauge("goroutines_num", self._greenlets, slow=True)
        self.metrics.gauge("mem_sys_bytes", _rss_bytes, slow=True)

    def _greenlets(self) -> int:
        """Greenlets at work: one per connection, writers of backlogged ones, the services.

        Counted, not found by walking the heap (``gc.get_objects()`` costs tens of
        milliseconds with ten thousand connections).
        """
        node = self.node
        writers = sum(1 for s in node.sessions if s.pending)
        return len(node.sessions) + writers + len(node.pinger.buckets) + node.background + len(self.servers)

    def _dispatcher(self, port: int) -> Dispatcher:
        d = self.dispatchers.get(port)
        if d is None:
            d = self.dispatchers[port] = Dispatcher()
        return d

    def _build_routes(self) -> None:
        cfg = self.cfg
        main = self._dispatcher(cfg.port)
        main.ws_paths = set(cfg.path)
        main.websocket = self.endpoint
        main.routes[cfg.health_path] = health_app
        if "http" in cfg.broadcast_adapter:
            app = create_broadcast_app(cfg, self.node.handle_publication, self.metrics)
            self._dispatcher(cfg.broadcast_port).routes[cfg.http_broadcast_path] = app
        if cfg.metrics_http:
            tags = parse_tags(cfg.metrics_tags)
            self._dispatcher(cfg.metrics_port or cfg.port).routes[cfg.metrics_http] = metrics_app(self.metrics, tags)

    @property
    def ports(self) -> list[int]:
        return sorted(self.dispatchers)

    def bind(self) -> None:
        for port in self.ports:
            try:
                self.listeners[port] = bind_socket(self._host(port), port)
            except ConfigError as exc:
                for listener in self.listeners.values():
                    listener.close()
                raise ConfigError(f"{exc}; stop what uses it or choose another {self._port_options(port)}") from None

    def _port_options(self, port: int) -> str:
        """The options that put something on ``port`` (for an error message)."""
        cfg = self.cfg
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

    def _host(self, port: int) -> str:
        """Bind host of a port: --metrics_host only applies to a port that serves nothing but metrics."""
        cfg = self.cfg
        if cfg.metrics_http and cfg.metrics_host and port == cfg.metrics_port and self._metrics_only(port):
            return cfg.metrics_host
        return cfg.host

    def _metrics_only(self, port: int) -> bool:
        d = self.dispatchers.get(port)
        return d is not None and not d.ws_paths and set(d.routes) == {self.cfg.metrics_http}

    # ------------------------------------------------------------------ running
    def serve(self) -> None:
        """Start everything, block until a signal, then shut down gracefully."""
        cfg = self.cfg
        self.announce()
        self.node.start()
        self.metrics.start(
            cfg.stats_refresh_interval,
            cfg.metrics_rotate_interval if cfg.metrics_log else 0,
            cfg.metrics_log_filter,
        )
        ssl: dict[str, Any] = {}
        if cfg.ssl_cert:
            ssl = {"certfile": cfg.ssl_cert, "keyfile": cfg.ssl_key}
        limits = HTTPLimits(
            handshake_timeout=cfg.handshake_timeout,
            body_timeout=cfg.http_body_timeout,
            max_header_bytes=cfg.http_max_header_size,
            max_headers=cfg.http_max_headers,
            max_conn=cfg.max_conn,
        )
        # one count for every WebSocket port: --max_conn is per worker
        gate = ConnectionGate(cfg.max_conn)
        for port, listener in self.listeners.items():
            dispatcher = self.dispatchers[port]
            server: Any = CableServer(
                listener,
                dispatcher,
                handler_class=CableHandler,
                # plain greenlets for requests: nothing joins or links them, and a
                # WebSocket hands its socket to a greenlet of its own at once
                spawn=gevent.spawn_raw,
                log=None,
                error_log=_ErrorLog(),
                ws_paths=dispatcher.ws_paths,
                allowed_origins=cfg.allowed_origins,
                limits=limits,
                metrics=self.metrics,
                gate=gate if dispatcher.ws_paths else None,
                **ssl,
            )
            server.start()
            self.servers.append(server)
        gevent.signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, self._on_signal, signal.SIGINT)
        self.stopped.wait()
        self.shutdown()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s received: shutting down gracefully", signal.Signals(signum).name)
        self.stopped.set()

    def stop(self) -> None:
        self.stopped.set()

    def shutdown(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.shutdown_timeout
        if cfg.shutdown_delay:
            gevent.sleep(min(cfg.shutdown_delay, cfg.shutdown_timeout))
        for server in self.servers:
            server.close()  # stop accepting; open connections carry on
        clients = len(self.node.sessions)
        self.node.shutdown(deadline)
        self.metrics.shutdown()
        for server in self.servers:
            server.stop(timeout=max(min(deadline - time.monotonic(), 1.0), 0.0))
        log.info("shutdown complete clients=%d", clients)

    # ------------------------------------------------------------------ banner
    def announce(self) -> None:
        """The startup banner: what runs, where it listens, and what is risky (never a secret)."""
        cfg = self.cfg
        nofile = _open_file_limit()
        log.info(
            "Starting anycable-gevent %s (pid: %d, workers: %d, open file limit: %s, python: %s, gevent: %s)",
            __version__,
            os.getpid(),
            cfg.workers,
            nofile if nofile >= 0 else "unlimited",
            platform.python_version(),
            gevent.__version__,
        )
        log.info("%s", self.broker.announce())
        log.info("%s", self.node.pubsub.announce())
        log.info("controller: %s", self.controller.announce())
        scheme = "https" if cfg.ssl_cert else "http"
        ws_scheme = "wss" if cfg.ssl_cert else "ws"
        for path in cfg.path:
            log.info("Handle WebSocket connections at %s://%s:%d%s", ws_scheme, cfg.host, cfg.port, path)
        log.info(
            "Connections: ping every %gs, pong timeout: %s, max message: %d bytes, "
            "max pending: %s per client, max connections: %s",
            cfg.ping_interval,
            f"{cfg.pong_timeout:g}s" if cfg.pong_timeout else "off",
            cfg.max_message_size,
            f"{cfg.ws_max_pending_size} bytes" if cfg.ws_max_pending_size else "unlimited",
            cfg.max_conn or "unlimited",
        )
        log.info(
            "Limits: handshake %gs, headers %d bytes / %d lines, body %gs, subscriptions per client %s, "
            "fragments per message %s, frame %s",
            cfg.handshake_timeout,
            cfg.http_max_header_size,
            cfg.http_max_headers,
            cfg.http_body_timeout,
            cfg.max_subscriptions or "unlimited",
            cfg.ws_max_fragments or "unlimited",
            f"{cfg.ws_frame_timeout:g}s" if cfg.ws_frame_timeout else "no deadline",
        )
        if "http" in cfg.broadcast_adapter:
            log.info(
                "Accept broadcasts at %s://%s:%d%s (%s)",
                scheme,
                self._host(cfg.broadcast_port),
                cfg.broadcast_port,
                cfg.http_broadcast_path,
                "requires Authorization: Bearer <broadcast key>" if cfg.broadcast_auth_key else "no key required",
            )
        log.info("Handle health checks at %s://%s:%d%s", scheme, cfg.host, cfg.port, cfg.health_path)
        if cfg.metrics_http:
            port = cfg.metrics_port or cfg.port
            log.info("Serve metrics at %s://%s:%d%s", scheme, self._host(port), port, cfg.metrics_http)
        if self.metrics.directory:
            log.info("Metrics of all workers are summed through %s", self.metrics.directory)
        if cfg.metrics_log:
            log.info("Log metrics every %ds", cfg.metrics_rotate_interval)
        for warning in self.warnings(nofile):
            log.warning("%s", warning)

    def warnings(self, nofile: int) -> list[str]:
        """Risky settings: config.warnings() plus what only the running process can see."""
        cfg = self.cfg
        out = config.warnings(cfg)
        if cfg.metrics_host and cfg.metrics_http and not self._metrics_only(cfg.metrics_port):
            out.append(
                "--metrics_host applies only with a --metrics_port of its own; "
                f"metrics are served on {cfg.host}:{cfg.metrics_port or cfg.port}"
            )
        if 0 <= nofile < LOW_FILE_LIMIT:
            out.append(
                f"open file limit is {nofile}: each connection uses one, so at most ~{nofile} clients; "
                "raise it (ulimit -n, or LimitNOFILE= in the systemd unit)"
            )
        return out


def _open_file_limit() -> int:
    """The soft RLIMIT_NOFILE (-1 = unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
