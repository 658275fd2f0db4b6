"""Periodic background work: one greenlet per job, never killed by a failing call."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent

from anycable_gevent.errors import AnyCableError

log = logging.getLogger(__name__)


def every(period: float, fn: Callable[[], object], what: str) -> gevent.Greenlet:
    """Call ``fn`` every ``period`` seconds in a greenlet of its own (kill it to stop).

    A call that raises is logged with ``what`` and the loop goes on: expiry, keepalives
    and metrics must not stop because one round failed. A known failure
    (:class:`~anycable_gevent.errors.AnyCableError`, e.g. Redis unreachable) is logged as
    one warning when it starts, at debug while it lasts, and once more when a round
    succeeds again; anything else is logged with its traceback every time.
    """
    return gevent.spawn(_loop, period, fn, what)


def _loop(period: float, fn: Callable[[], object], what: str) -> None:
    failing = False
    while True:
        gevent.sleep(period)
        try:
            fn()
        except AnyCableError as exc:
            log.log(logging.DEBUG if failing else logging.WARNING, "%s failed: %s", what, exc)
            failing = True
            continue
        except Exception:
            log.exception("%s failed", what)
            continue
        if failing:
            failing = False
            log.warning("%s works again", what)
