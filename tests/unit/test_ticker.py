"""Background rounds (``ticker.every``): they go on after failures, and a known failure
(Redis unreachable) is logged once, not with a traceback every round."""

from __future__ import annotations

import logging

import gevent
import pytest

from anycable_gevent.errors import BrokerError
from anycable_gevent.ticker import every


def test_a_known_failure_is_logged_once_then_its_recovery(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[Exception | None] = [BrokerError("redis down"), BrokerError("redis down"), None, None]
    calls: list[int] = []

    def round_() -> None:
        calls.append(1)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    caplog.set_level(logging.DEBUG, logger="anycable_gevent.ticker")
    g = every(0.01, round_, "keepalive")
    gevent.sleep(0.1)
    g.kill()
    assert len(calls) >= 4  # the loop went on
    records = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert records[:3] == [
        ("WARNING", "keepalive failed: redis down", False),
        ("DEBUG", "keepalive failed: redis down", False),
        ("WARNING", "keepalive works again", False),
    ]
    assert len(records) == 3


def test_an_unexpected_failure_is_logged_with_its_traceback_every_round(caplog: pytest.LogCaptureFixture) -> None:
    def round_() -> None:
        raise ValueError("bug")

    g = every(0.01, round_, "sweep")
    gevent.sleep(0.05)
    g.kill()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) >= 2
    assert all(r.getMessage() == "sweep failed" and r.exc_info is not None for r in errors)
