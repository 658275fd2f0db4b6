"""Periodic background work: one greenlet per job, never killed by a failing call."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

log = logging.getLogger(__name__)


def every(period: float, fn: Callable[[], object], what: str) -> gevent.Greenlet:
    """Call ``fn`` every ``period`` seconds in a greenlet of its own (kill it to stop).

    A call that raises is logged with ``what`` and the loop goes on: expiry, keepalives
    and metrics must not stop because one round failed.
    """
    return gevent.spawn(_loop, period, fn, what)


def _loop(period: float, fn: Callable[[], object], what: str) -> None:
    while True:
        gevent.sleep(period)
        try:
            fn()
        except Exception:
            log.exception("%s failed", what)
