"""The startup banner: what runs, where it listens, and what is risky (never a secret).

The process lines come from the configuration and the listening plan alone, so a master
process prints them once, before it forks; each worker's components (broker, pub/sub,
controller, broadcasters) announce themselves once they have started. Stdlib only.
"""

from __future__ import annotations

import logging
import os
import platform
import resource

from anycable_gevent import __version__, config
from anycable_gevent.config import Config
from anycable_gevent.listeners import Listen

log = logging.getLogger("anycable_gevent.main")

#: Below this many open files the banner warns (each connection holds one).
LOW_FILE_LIMIT = 4096


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE (-1 = unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def process_lines(cfg: Config, ports: dict[int, Listen], runtime: str = "") -> list[str]:
    """Version, process, URLs and limits."""
    nofile = open_file_limit()
    scheme = "https" if cfg.ssl_cert else "http"
    ws_scheme = "wss" if cfg.ssl_cert else "ws"
    lines = [
        f"Starting anycable-gevent {__version__} (pid: {os.getpid()}, workers: {cfg.workers}, "
        f"open file limit: {nofile if nofile >= 0 else 'unlimited'}, python: {platform.python_version()}"
        f"{', ' + runtime if runtime else ''})"
    ]
    for path in cfg.path:
        lines.append(f"Handle WebSocket connections at {ws_scheme}://{cfg.host}:{cfg.port}{path}")
    lines.append(
        f"Connections: ping every {cfg.ping_interval:g}s, pong timeout: "
        f"{f'{cfg.pong_timeout:g}s' if cfg.pong_timeout else 'off'}, max message: {cfg.max_message_size} bytes, "
        f"max pending: {f'{cfg.ws_max_pending_size} bytes' if cfg.ws_max_pending_size else 'unlimited'} "
        f"per client, max connections: {cfg.max_conn or 'unlimited'}"
    )
    lines.append(
        f"Limits: handshake {cfg.handshake_timeout:g}s, headers {cfg.http_max_header_size} bytes / "
        f"{cfg.http_max_headers} lines, body {cfg.http_body_timeout:g}s, subscriptions per client "
        f"{cfg.max_subscriptions or 'unlimited'}, fragments per message {cfg.ws_max_fragments or 'unlimited'}, "
        f"frame {f'{cfg.ws_frame_timeout:g}s' if cfg.ws_frame_timeout else 'no deadline'}"
    )
    lines.append(f"Handle health checks at {scheme}://{cfg.host}:{cfg.port}{cfg.health_path}")
    if cfg.metrics_http:
        port = cfg.metrics_port or cfg.port
        lines.append(f"Serve metrics at {scheme}://{ports[port].host}:{port}{cfg.metrics_http}")
    if cfg.metrics_log:
        lines.append(f"Log metrics every {cfg.metrics_rotate_interval}s")
    return lines


def warnings(cfg: Config, ports: dict[int, Listen]) -> list[str]:
    """Risky settings: config.warnings() plus what only the running process can see."""
    out = config.warnings(cfg)
    if cfg.metrics_http:
        port = cfg.metrics_port or cfg.port
        host = ports[port].host
        if not config.is_loopback(host):
            # Metrics have no key: anyone who reaches the port reads them.
            out.append(
                f"the metrics endpoint on {host}:{port}{cfg.metrics_http} answers anyone without a key; "
                "give it a --metrics_port of its own on a private or loopback --metrics_host, "
                "or keep the port off the public network"
            )
    if cfg.metrics_host and cfg.metrics_http and not ports[cfg.metrics_port or cfg.port].metrics_only:
        out.append(
            "--metrics_host applies only with a --metrics_port of its own; "
            f"metrics are served on {cfg.host}:{cfg.metrics_port or cfg.port}"
        )
    nofile = open_file_limit()
    if 0 <= nofile < cfg.max_conn:
        out.append(
            f"open file limit is {nofile}, below --max_conn={cfg.max_conn}: connections will fail before "
            "the limit; raise it (ulimit -n, or LimitNOFILE= in the systemd unit)"
        )
    elif 0 <= nofile < LOW_FILE_LIMIT:
        out.append(
            f"open file limit is {nofile}: each connection uses one, so at most ~{nofile} clients; "
            "raise it (ulimit -n, or LimitNOFILE= in the systemd unit)"
        )
    return out


def print_process(cfg: Config, ports: dict[int, Listen], runtime: str = "") -> None:
    for line in process_lines(cfg, ports, runtime):
        log.info("%s", line)
    for warning in warnings(cfg, ports):
        log.warning("%s", warning)
