"""Command-line entry point: parse and check the configuration, then serve.

Errors in the configuration (or a port that cannot be bound) end the process with
exit code 2 and one line on stderr, before any client can connect.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> None:
    # Patch first, before anything imports socket, ssl or threading users.
    from gevent import monkey

    monkey.patch_all()

    from anycable_gevent import config, log
    from anycable_gevent.errors import ConfigError

    try:
        cfg = config.load(argv)
    except ConfigError as exc:
        print(f"anycable-gevent: error: {exc} (see anycable-gevent --help)", file=sys.stderr)
        sys.exit(EXIT_CONFIG)

    log.setup(cfg.level, cfg.log_format, cfg.node_id)

    from anycable_gevent.server import Server

    try:
        server = Server(cfg)
        server.bind()
    except ConfigError as exc:
        print(f"anycable-gevent: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    server.serve()
