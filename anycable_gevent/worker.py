"""A worker process: gevent's monkey-patching, then the server on the given sockets.

The only module that patches. ``main`` runs in the process itself with ``--workers 1``
and in each forked child otherwise; the listening sockets were bound before (by the CLI
or the master) as plain stdlib sockets and are wrapped here. Nothing gevent-related may
be imported before :func:`main` patches.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.listeners import Listen


def main(cfg: Config, sockets: dict[int, socket.socket], ports: dict[int, Listen], forked: bool = False) -> int:
    """Serve until told to stop; returns the process exit code."""
    from gevent import monkey

    monkey.patch_all()
    if forked:
        import gevent

        gevent.reinit()

    from anycable_gevent.server import Server

    return Server(cfg, sockets, ports).run()
