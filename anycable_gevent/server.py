"""One worker's server: the graph of components, the HTTP servers on its sockets, signals.

Runs in a gevent-patched process (see :mod:`anycable_gevent.worker`). :meth:`Server.boot`
starts the components in dependency order, then the HTTP servers; :meth:`Server.run`
serves until a signal, then stops accepting, closes every client and stops the
components in reverse, within ``--shutdown_timeout`` (it ends as soon as the clients are
gone and the pending Disconnect calls are sent):

* SIGTERM (and SIGINT without a master): clients get ``server_restart`` and close code
  1001 (with ``--restorable_shutdown`` only the close frame, so they restore their
  sessions elsewhere); a second signal exits at once;
* SIGUSR2 (from the master: this worker retires while the others serve): close frames
  only, so its clients restore their sessions on the other workers;
* SIGQUIT: exit at once;
* SIGHUP without a master (one worker): logged and ignored (a reload must not kill it).

A forked worker stamps its heartbeat every second from its event loop and stops when
its master is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from anycable_gevent import banner, graph, listeners
from anycable_gevent.config import Config
from anycable_gevent.heartbeat import Heartbeat
from anycable_gevent.listeners import Listen
from anycable_gevent.metrics import DIR_ENV as METRICS_DIR_ENV
from anycable_gevent.metrics import Metrics
from anycable_gevent.ticker import every
from anycable_gevent.transport import CableHandler, CableServer, ConnectionGate, HTTPLimits

log = logging.getLogger("anycable_gevent.main")


class _ErrorLog:
    """pywsgi's error log: handler exceptions go to our logger, not to stderr."""

    def write(self, data: str) -> None:
        data = data.strip()
        if data:
            log.debug("wsgi: %s", data)

    def flush(self) -> None:
        pass


#: Seconds between heartbeats of a forked worker.
HEARTBEAT_INTERVAL = 1.0
#: Seconds a booting worker waits for its Redis connections before it serves anyway.
READY_WAIT = 5.0


class Server:
    def __init__(
        self,
        cfg: Config,
        sockets: dict[int, socket.socket],
        ports: dict[int, Listen],
        forked: bool = False,
        heartbeat: Heartbeat | None = None,
        index: int = 0,
        ppid: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.ports = ports
        self.forked = forked
        self.heartbeat = heartbeat
        self.index = index
        self.ppid = ppid
        #: how the clients are told when this worker stops: restorable = close frames only
        self.restorable = cfg.restorable_shutdown
        if forked and cfg.reuseport:
            # a listening socket of this worker's own beside the master's reservation
            sockets = {port: listeners.reuse_socket(s) for port, s in sockets.items()}
        # the stdlib sockets, as gevent sockets on the same file descriptors
        self.listeners = {
            port: gsocket.socket(s.family, s.type, s.proto, fileno=s.detach()) for port, s in sockets.items()
        }
        self.metrics = Metrics(directory=os.environ.get(METRICS_DIR_ENV, ""))
        self.graph = graph.build(cfg, ports, self.metrics)
        self.servers: list[CableServer] = []
        self.stopped = Event()
        self._signals = 0
        self._pulse: gevent.Greenlet | None = None
        # both walk something big (the heap, /proc): refreshed every --stats_refresh_interval
        self.metrics.gauge("goroutines_num", self._greenlets, slow=True)
        self.metrics.gauge("mem_sys_bytes", _rss_bytes, slow=True)

    def _greenlets(self) -> int:
        """Greenlets at work: one per connection, writers of backlogged ones, the services.

        Counted, not found by walking the heap (``gc.get_objects()`` costs tens of
        milliseconds with ten thousand connections).
        """
        node = self.graph.node
        writers = sum(1 for s in node.sessions if s.pending)
        return len(node.sessions) + writers + len(node.pinger.buckets) + node.background + len(self.servers)

    def boot(self) -> None:
        """Start every component and the HTTP servers (an error here is a boot failure)."""
        cfg = self.cfg
        if not self.forked:
            banner.print_process(cfg, self.ports, f"gevent: {gevent.__version__}")
        gevent.signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        if self.forked:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master decides (a terminal's ^C)
            gevent.signal_handler(signal.SIGUSR2, self._on_signal, signal.SIGUSR2)
            gevent.signal_handler(signal.SIGQUIT, self._on_quit)
            for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
                signal.signal(sig, signal.SIG_IGN)
        else:
            gevent.signal_handler(signal.SIGINT, self._on_signal, signal.SIGINT)
            # `systemctl reload` (HUP) must not kill a lone process; QUIT stops it fast as it
            # stops a master
            gevent.signal_handler(signal.SIGHUP, self._on_reload)
            gevent.signal_handler(signal.SIGQUIT, self._on_quit)
        self.graph.start()
        self._await_ready()
        level = logging.INFO if self.index == 0 else logging.DEBUG
        for line in self.graph.announce():
            log.log(level, "%s", line)
        if self.metrics.directory and self.index == 0:
            log.info("Metrics of all workers are summed through %s", self.metrics.directory)
        self.metrics.start(
            cfg.stats_refresh_interval,
            cfg.metrics_rotate_interval if cfg.metrics_log else 0,
            cfg.metrics_log_filter,
        )
        self._serve()
        if self.heartbeat is not None:
            self.heartbeat.notify()  # booted: the master may retire the worker this one replaces
            self._pulse = every(HEARTBEAT_INTERVAL, self._beat, "heartbeat")
        if self.forked:
            log.info("worker serving index=%d", self.index)

    def _await_ready(self) -> None:
        """Give Redis a moment: a worker that accepts before its pub/sub listens answers
        /health with 503 (and, in a rolling restart, would replace a healthy worker).
        A Redis that stays away does not stop the boot: the worker serves and says so."""
        deadline = time.monotonic() + READY_WAIT
        while self.graph.problems() and time.monotonic() < deadline:
            gevent.sleep(0.02)
        for problem in self.graph.problems():
            log.warning("serving without: %s", problem)

    def _beat(self) -> None:
        assert self.heartbeat is not None
        if self.ppid is not None and os.getppid() != self.ppid:
            log.warning("master is gone: stopping")
            self.stopped.set()
            return
        self.heartbeat.notify()

    def run(self) -> int:
        """Block until a signal, then shut down gracefully (the exit code)."""
        self.stopped.wait()
        self.shutdown()
        return 0

    def _serve(self) -> None:
        cfg = self.cfg
        ssl: dict[str, Any] = {}
        if cfg.ssl_cert:
            ssl = {"certfile": cfg.ssl_cert, "keyfile": cfg.ssl_key}
        limits = HTTPLimits(
            handshake_timeout=cfg.handshake_timeout,
            body_timeout=cfg.http_body_timeout,
            max_header_bytes=cfg.http_max_header_size,
            max_headers=cfg.http_max_headers,
            max_conn=cfg.max_conn,
            handshake_concurrency=cfg.handshake_concurrency,
        )
        # one count for every WebSocket port: --max_conn is per worker
        gate = ConnectionGate(cfg.max_conn)
        for port, listener in self.listeners.items():
            dispatcher = self.graph.dispatchers[port]
            server = CableServer(
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

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        if signum == signal.SIGUSR2:
            self.restorable = True
            log.info("retiring: closing connections so that they restore on the other workers")
        else:
            log.info("%s received: shutting down gracefully", signal.Signals(signum).name)
        self.stopped.set()

    def _on_reload(self) -> None:
        log.warning(
            "SIGHUP ignored: a rolling restart needs --workers > 1; restart the server to apply a new configuration"
        )

    def _on_quit(self) -> None:
        log.warning("SIGQUIT: exiting now")
        os._exit(0)

    def stop(self) -> None:
        self.stopped.set()

    def shutdown(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.shutdown_timeout
        if cfg.shutdown_delay:
            gevent.sleep(min(cfg.shutdown_delay, cfg.shutdown_timeout))
        for server in self.servers:
            server.close()  # stop accepting; open connections carry on
        self._answer_accepted(deadline)
        clients = len(self.graph.node.sessions)
        if self._pulse is not None:
            self._pulse.kill(block=False)
        self.graph.shutdown(deadline, self.restorable)
        self.metrics.shutdown()
        for server in self.servers:
            server.stop(timeout=max(min(deadline - time.monotonic(), 1.0), 0.0))
        log.info("shutdown complete clients=%d", clients)

    def _answer_accepted(self, deadline: float) -> None:
        """Requests and handshakes accepted before the listeners closed are answered (and
        the upgrades among them become sessions that the drain then closes properly): a
        worker that exited now would reset them, e.g. a health check or a publication in
        the middle of a rolling restart. Bounded by the handshake deadline."""
        until = min(deadline, time.monotonic() + self.cfg.handshake_timeout + 1.0)
        while any(server.in_flight for server in self.servers) and time.monotonic() < until:
            gevent.sleep(0.01)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
