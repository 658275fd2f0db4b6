"""The composition root: builds the object graph from a Config, serves, shuts down.

Runs in a gevent-patched process (see :mod:`anycable_gevent.cli`). Constructors do
no I/O; :meth:`Server.bind` opens the listening sockets and :meth:`Server.serve`
starts the components in dependency order and stops them in reverse on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
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
from anycable_gevent.metrics import Metrics
from anycable_gevent.node import Node
from anycable_gevent.pubsub import LocalPubSub
from anycable_gevent.web import Dispatcher, create_broadcast_app, health_app, metrics_app
from anycable_gevent.ws import CableEndpoint, CableHandler

log = logging.getLogger("anycable_gevent.main")

LISTEN_BACKLOG = 4096


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
        self.metrics = Metrics()
        self.hub = Hub()
        self.broker = build_broker(cfg)
        self.controller = build_controller(cfg)
        self.node = Node(cfg, self.controller, self.broker, self.hub, self.metrics, LocalPubSub)
        self.endpoint = CableEndpoint(cfg, self.node, self.metrics)
        self.dispatchers: dict[int, Dispatcher] = {}
        self._build_routes()
        self.listeners: dict[int, socket.socket] = {}
        self.servers: list[WSGIServer] = []
        self.stopped = Event()
        self._signals = 0
        self.metrics.gauge("goroutines_num", _greenlets)
        self.metrics.gauge("mem_sys_bytes", _rss_bytes)

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
            tags = dict(t.split(":", 1) for t in cfg.metrics_tags)
            self._dispatcher(cfg.metrics_port or cfg.port).routes[cfg.metrics_http] = metrics_app(self.metrics, tags)

    @property
    def ports(self) -> list[int]:
        return sorted(self.dispatchers)

    def bind(self) -> None:
        for port in self.ports:
            host = self.cfg.metrics_host if (port == self.cfg.metrics_port and self.cfg.metrics_host) else self.cfg.host
            self.listeners[port] = bind_socket(host, port)

    # ------------------------------------------------------------------ running
    def serve(self) -> None:
        """Start everything, block until a signal, then shut down gracefully."""
        cfg = self.cfg
        self.announce()
        self.node.start()
        ssl: dict[str, Any] = {}
        if cfg.ssl_cert:
            ssl = {"certfile": cfg.ssl_cert, "keyfile": cfg.ssl_key}
        for port, listener in self.listeners.items():
            server: Any = WSGIServer(  # type: ignore[call-overload]
                listener,
                self.dispatchers[port],
                handler_class=CableHandler,
                log=None,
                error_log=_ErrorLog(),
                **ssl,
            )
            server.cable = self.endpoint
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
        for server in self.servers:
            server.stop(timeout=max(min(deadline - time.monotonic(), 1.0), 0.0))
        log.info("shutdown complete clients=%d", clients)

    # ------------------------------------------------------------------ banner
    def announce(self) -> None:
        cfg = self.cfg
        log.info("Starting anycable-gevent %s (pid: %d, workers: %d)", __version__, os.getpid(), cfg.workers)
        log.info("%s", self.broker.announce())
        log.info("%s", self.node.pubsub.announce())
        log.info("controller: %s", self.controller.announce())
        scheme = "https" if cfg.ssl_cert else "http"
        host = cfg.host
        for path in cfg.path:
            log.info("Handle WebSocket connections at %s://%s:%d%s", scheme, host, cfg.port, path)
        if "http" in cfg.broadcast_adapter:
            auth = "with a key" if cfg.broadcast_auth_key else "without a key"
            log.info(
                "Accept broadcasts at %s://%s:%d%s (%s)",
                scheme,
                host,
                cfg.broadcast_port,
                cfg.http_broadcast_path,
                auth,
            )
        log.info("Handle health checks at %s://%s:%d%s", scheme, host, cfg.port, cfg.health_path)
        if cfg.metrics_http:
            port = cfg.metrics_port or cfg.port
            log.info("Serve metrics at %s://%s:%d%s", scheme, cfg.metrics_host or host, port, cfg.metrics_http)
        for warning in config.warnings(cfg):
            log.warning("%s", warning)


def _greenlets() -> int:
    import gc

    from greenlet import greenlet

    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
