"""Command-line entry point: parse and check the configuration, bind, then serve.

Errors in the configuration (or a port that cannot be bound) end the process with
exit code 2 and one line on stderr, before any client can connect. This module and
what it imports before serving use the stdlib only (no gevent): the sockets are bound
here, and :mod:`anycable_gevent.worker` patches and serves them.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence

from anycable_gevent.errors import EXIT_CONFIG


def raise_open_file_limit() -> None:
    """Each connection holds a file descriptor: use all the system allows (soft limit = hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def main(argv: Sequence[str] | None = None) -> None:
    from anycable_gevent import config, listeners, log
    from anycable_gevent.errors import ConfigError

    try:
        cfg = config.load(argv)
    except ConfigError as exc:
        print(f"anycable-gevent: error: {exc} (see anycable-gevent --help)", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    log.setup(cfg.level, cfg.log_format, cfg.node_id)
    raise_open_file_limit()
    ports = listeners.plan(cfg)
    try:
        sockets = listeners.bind(cfg, ports)
    except ConfigError as exc:
        print(f"anycable-gevent: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    if cfg.workers > 1:
        from anycable_gevent import arbiter

        sys.exit(arbiter.run(cfg, sockets, ports, lambda: config.load(argv)))

    from anycable_gevent import worker

    sys.exit(worker.main(cfg, sockets, ports))
