"""The memory broker's presence store (SPEC §5.4): join/leave events, info, expiry.

Time is injected (a fake clock) and the sweep is called by the test, so expiry is tested
without sleeping; leave events of expired presence are collected through the broker's
``presence_handler`` as the node would receive them.
"""

from __future__ import annotations

import pytest
from helpers import Clock

from anycable_gevent.broker.base import NullBroker
from anycable_gevent.broker.memory import MemoryBroker
from anycable_gevent.errors import BrokerError
from anycable_gevent.protocol import PresenceEvent, PresenceInfo

TTL = 15


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def expired() -> list[tuple[str, PresenceEvent]]:
    return []


@pytest.fixture
def broker(clock: Clock, expired: list[tuple[str, PresenceEvent]]) -> MemoryBroker:
    b = MemoryBroker(presence_ttl=TTL, epoch="ep01", clock=clock)
    b.presence_handler = lambda stream, event: expired.append((stream, event))
    return b


def join(pid: str, info: object = None) -> PresenceEvent:
    return PresenceEvent("join", pid, info)


def leave(pid: str) -> PresenceEvent:
    return PresenceEvent("leave", pid)


def test_first_session_of_an_id_joins_later_ones_do_not(broker: MemoryBroker) -> None:
    assert broker.presence_join("room", "s1", "42", {"name": "Jack"}) == join("42", {"name": "Jack"})
    assert broker.presence_join("room", "s2", "42", {"name": "Jack"}) is None
    assert broker.presence_join("room", "s3", "7", None) == join("7")


def test_leave_only_when_the_last_session_of_an_id_goes(broker: MemoryBroker) -> None:
    """SPEC §11.6 #80 at the store level."""
    broker.presence_join("room", "s1", "42", {"name": "Jack"})
    broker.presence_join("room", "s2", "42", {"name": "Jack"})
    assert broker.presence_leave("room", "s1") is None
    assert broker.presence_leave("room", "s2") == leave("42")
    assert broker.presence_info("room") == PresenceInfo(0, [])


def test_info_lists_every_id_once_with_the_latest_info(broker: MemoryBroker) -> None:
    broker.presence_join("room", "s1", "42", {"v": 1})
    broker.presence_join("room", "s2", "7", "seven")
    broker.presence_join("room", "s3", "42", {"v": 2})
    broker.presence_join("other", "s1", "42", {"elsewhere": True})
    assert broker.presence_info("room") == PresenceInfo(2, [("42", {"v": 2}), ("7", "seven")])
    assert broker.presence_info("other") == PresenceInfo(1, [("42", {"elsewhere": True})])
    assert broker.presence_info("nobody-here") == PresenceInfo(0, [])


def test_rejoining_with_the_same_id_updates_info_without_an_event(broker: MemoryBroker) -> None:
    broker.presence_join("room", "s1", "42", {"v": 1})
    assert broker.presence_join("room", "s1", "42", {"v": 2}) is None
    assert broker.presence_info("room") == PresenceInfo(1, [("42", {"v": 2})])
    # still one session: one leave removes it
    assert broker.presence_leave("room", "s1") == leave("42")


def test_same_session_with_another_id_is_an_error(broker: MemoryBroker) -> None:
    broker.presence_join("room", "s1", "42", None)
    with pytest.raises(BrokerError):
        broker.presence_join("room", "s1", "43", None)
    assert broker.presence_info("room") == PresenceInfo(1, [("42", None)])
    # another stream is another presence set
    assert broker.presence_join("other", "s1", "43", None) == join("43")


def test_leaving_where_not_present_is_an_error(broker: MemoryBroker) -> None:
    with pytest.raises(BrokerError):
        broker.presence_leave("room", "s1")
    broker.presence_join("room", "s1", "42", None)
    with pytest.raises(BrokerError):
        broker.presence_leave("other", "s1")
    broker.presence_leave("room", "s1")
    with pytest.raises(BrokerError):
        broker.presence_leave("room", "s1")


def test_untouched_presence_expires_with_leave_events(
    broker: MemoryBroker, clock: Clock, expired: list[tuple[str, PresenceEvent]]
) -> None:
    broker.presence_join("room", "gone", "42", None)
    broker.presence_join("lobby", "gone", "42", None)
    broker.presence_join("room", "here", "7", None)
    clock.advance(TTL / 2)
    broker.touch_presence(["here"])
    broker.sweep()
    assert expired == []
    clock.advance(TTL / 2 + 1)
    broker.sweep()
    assert sorted(expired, key=lambda e: e[0]) == [("lobby", leave("42")), ("room", leave("42"))]
    assert broker.presence_info("room") == PresenceInfo(1, [("7", None)])
    assert broker.presence_info("lobby") == PresenceInfo(0, [])


def test_expiry_of_one_session_of_an_id_is_silent(
    broker: MemoryBroker, clock: Clock, expired: list[tuple[str, PresenceEvent]]
) -> None:
    """A reconnect joins again under a new sid; the old sid expiring causes no leave."""
    broker.presence_join("room", "old", "42", {"v": 1})
    clock.advance(TTL - 1)
    assert broker.presence_join("room", "new", "42", {"v": 2}) is None
    clock.advance(2)
    broker.sweep()
    assert expired == []
    assert broker.presence_info("room") == PresenceInfo(1, [("42", {"v": 2})])
    assert broker.presence_leave("room", "new") == leave("42")


def test_touching_keeps_presence_as_long_as_it_goes_on(
    broker: MemoryBroker, clock: Clock, expired: list[tuple[str, PresenceEvent]]
) -> None:
    broker.presence_join("room", "s1", "42", None)
    for _ in range(10):
        clock.advance(TTL / 2)
        broker.touch_presence(["s1"])
        broker.sweep()
    assert expired == []
    assert len(broker._presence_timers) == 1  # one timer per session, not one per touch
    clock.advance(TTL + 1)
    broker.sweep()
    assert expired == [("room", leave("42"))]
    assert broker.stats()["presence_sessions"] == 0


def test_left_session_joining_again_keeps_one_timer(
    broker: MemoryBroker, clock: Clock, expired: list[tuple[str, PresenceEvent]]
) -> None:
    for _ in range(5):
        broker.presence_join("room", "s1", "42", None)
        broker.presence_leave("room", "s1")
        clock.advance(1)
        broker.sweep()
    assert len(broker._presence_timers) == 1
    clock.advance(TTL + 1)
    broker.sweep()
    assert expired == []  # it had left: nothing to expire
    assert broker.stats()["presence_sessions"] == 0


def test_touching_unknown_sessions_is_harmless(broker: MemoryBroker) -> None:
    broker.touch_presence(["nobody"])
    assert broker.stats()["presence_sessions"] == 0


def test_null_broker_keeps_no_presence() -> None:
    broker = NullBroker()
    assert not broker.supports_presence
    with pytest.raises(BrokerError):
        broker.presence_join("room", "s1", "42", None)
    with pytest.raises(BrokerError):
        broker.presence_leave("room", "s1")
    with pytest.raises(BrokerError):
        broker.presence_info("room")
    broker.touch_presence(["s1"])
