"""Disconnect calls: queued, sent at a bounded rate, drained at shutdown (SPEC §8.5).

Each connection is pushed at most once (by its reader greenlet when it ends), so the
backend never hears about one connection twice.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import gevent
from gevent.event import Event

from anycable_gevent.controllers.base import Connection, Controller
from anycable_gevent.log import conn_ref

log = logging.getLogger(__name__)

_Item = tuple[Connection, list[str], dict[str, dict[str, str]]]


class DisconnectQueue:
    def __init__(self, controller: Controller, rate: int, backlog: int) -> None:
        self.controller = controller
        self.rate = rate
        self.backlog = backlog
        self._queue: deque[_Item] = deque()
        self._wakeup = Event()
        self._worker: gevent.Greenlet | None = None
        self._unthrottled = False
        self.dropped = 0

    @property
    def size(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._worker is None:
            self._worker = gevent.spawn(self._run)

    def push(self, conn: Connection, subscriptions: list[str], istates: dict[str, dict[str, str]]) -> None:
        if len(self._queue) >= self.backlog:
            self.dropped += 1
            log.warning("disconnect queue full, dropping Disconnect call conn=%s", conn_ref(conn.sid))
            return
        self._queue.append((conn, subscriptions, istates))
        self._wakeup.set()

    def _call(self, item: _Item) -> None:
        conn, subscriptions, istates = item
        try:
            self.controller.disconnect(conn, subscriptions, istates)
        except Exception:
            log.exception("Disconnect call failed conn=%s", conn_ref(conn.sid))

    def _run(self) -> None:
        interval = 1.0 / self.rate
        while True:
            if not self._queue:
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            self._call(self._queue.popleft())
            if not self._unthrottled:
                gevent.sleep(interval)

    def drain(self, deadline: float) -> None:
        """Send what is queued without throttling, until ``deadline`` (monotonic)."""
        self._unthrottled = True
        if self._worker is not None:
            self._worker.kill(block=False)
            self._worker = None
        pool: list[gevent.Greenlet] = []
        while self._queue and time.monotonic() < deadline:
            pool.append(gevent.spawn(self._call, self._queue.popleft()))
            if len(pool) >= 16:
                gevent.joinall(pool, timeout=max(deadline - time.monotonic(), 0))
                pool = [g for g in pool if not g.dead]
        gevent.joinall(pool, timeout=max(deadline - time.monotonic(), 0))
        if self._queue:
            log.warning("shutdown deadline passed with %d Disconnect calls not sent", len(self._queue))
