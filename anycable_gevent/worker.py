"""A worker process: gevent's monkey-patching, then the server on the given sockets.

The only module that patches. ``main`` runs in the process itself with ``--workers 1``
and in each forked child otherwise; the listening sockets were bound before (by the CLI
or the master) as plain stdlib sockets and are wrapped here. Nothing gevent-related may
be imported before :func:`main` patches.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from anycable_gevent.errors import EXIT_BOOT

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.heartbeat import Heartbeat
    from anycable_gevent.listeners import Listen

log = logging.getLogger("anycable_gevent.main")


def main(
    cfg: Config,
    sockets: dict[int, socket.socket],
    ports: dict[int, Listen],
    forked: bool = False,
    heartbeat: Heartbeat | None = None,
    index: int = 0,
    ppid: int | None = None,
) -> int:
    """Serve until told to stop; returns the process exit code (3: failed before serving)."""
    from gevent import monkey

    monkey.patch_all()
    try:
        from anycable_gevent.server import Server

        server = Server(cfg, sockets, ports, forked=forked, heartbeat=heartbeat, index=index, ppid=ppid)
        server.boot()
    except Exception:
        log.exception("worker failed to boot")
        return EXIT_BOOT
    return server.run()
