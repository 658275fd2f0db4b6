"""Disconnect calls: queued, sent at a bounded rate, drained at shutdown (SPEC §8.5).

Each connection is pushed at most once (by its reader greenlet when it ends) and each
queued call is taken off the queue exactly once, so the backend never hears about one
connection twice. Calls start at most ``rate`` per second; they run in a small pool so
that a slow backend lowers throughput without stalling the pacing. At shutdown,
:meth:`DisconnectQueue.drain` lifts the rate limit and waits for every queued and
running call until the deadline: a call already sent is never interrupted (killing it
half-way could lose it or leave the backend unsure).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import gevent
from gevent.event import Event
from gevent.pool import Pool

from anycable_gevent.controllers.base import Connection, Controller
from anycable_gevent.log import conn_ref

log = logging.getLogger(__name__)

_Item = tuple[Connection, list[str], dict[str, dict[str, str]]]

#: Disconnect calls running at the same time (the RPC concurrency limit applies too).
POOL_SIZE = 16


class DisconnectQueue:
    """Concurrency contract: ``push`` may be called from any greenlet and never yields;
    the calls run in greenlets owned by this object (the pacer and its pool)."""

    def __init__(self, controller: Controller, rate: int, backlog: int) -> None:
        self.controller = controller
        self.rate = rate
        self.backlog = backlog
        self._queue: deque[_Item] = deque()
        self._wakeup = Event()
        #: Set by drain(): no more pacing.
        self._unthrottled = Event()
        self._pool = Pool(POOL_SIZE)
        self._pacer: gevent.Greenlet | None = None
        self.dropped = 0
        self.sent = 0

    @property
    def size(self) -> int:
        """Calls waiting to start (the ``disconnect_queue_size`` gauge)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        return POOL_SIZE - self._pool.free_count()

    def start(self) -> None:
        if self._pacer is None:
            self._pacer = gevent.spawn(self._run)

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
        self.sent += 1

    def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while True:
            if not self._queue:
                self._wakeup.clear()
                self._wakeup.wait()
                continue
            if not self._unthrottled.is_set():
                delay = next_at - time.monotonic()
                if delay > 0 and not self._unthrottled.wait(delay):
                    continue  # the pace allows the next call now; re-check the queue
                next_at = max(next_at, time.monotonic()) + interval
            item = self._queue.popleft()
            self._pool.spawn(self._call, item)  # blocks while the pool is full

    def drain(self, deadline: float) -> None:
        """Send what is queued without throttling and wait for running calls, until ``deadline`` (monotonic)."""
        self._unthrottled.set()
        self.start()
        self._wakeup.set()
        while (self._queue or self.running) and time.monotonic() < deadline:
            gevent.sleep(0.01)
        if self._queue or self.running:
            log.warning(
                "shutdown deadline passed: %d Disconnect calls not sent, %d not finished",
                len(self._queue),
                self.running,
            )
        if self._pacer is not None:
            self._pacer.kill(block=False)
            self._pacer = None
