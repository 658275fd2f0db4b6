"""The memory broker: offsets, epoch, history limits and TTLs, session snapshots.

Time is injected (a fake clock), so expiry is tested without sleeping.
"""

from __future__ import annotations

import pytest
from helpers import Clock

from anycable_gevent.broker.base import NullBroker
from anycable_gevent.broker.memory import STREAM_LIFETIME_TTLS, MemoryBroker
from anycable_gevent.errors import HistoryError
from anycable_gevent.protocol import StreamMessage


def publish(broker: MemoryBroker, stream: str, data: str = '"x"', transient: bool = False) -> StreamMessage:
    msg = StreamMessage(stream=stream, data=data, transient=transient)
    broker.register(msg)
    return msg


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def broker(clock: Clock) -> MemoryBroker:
    return MemoryBroker(history_limit=100, history_ttl=60, sessions_ttl=30, epoch="ep01", clock=clock)


def offsets(msgs: list[StreamMessage]) -> list[int]:
    return [m.offset for m in msgs]


def test_offsets_start_at_one_per_stream_and_share_the_epoch(broker: MemoryBroker) -> None:
    a1, a2, b1 = publish(broker, "a"), publish(broker, "a"), publish(broker, "b")
    assert (a1.offset, a2.offset, b1.offset) == (1, 2, 1)
    assert a1.epoch == a2.epoch == b1.epoch == "ep01"


def test_random_epoch_is_four_characters() -> None:
    epochs = {MemoryBroker().epoch for _ in range(20)}
    assert all(len(e) == 4 for e in epochs)
    assert len(epochs) > 1


def test_transient_messages_get_no_offset_and_are_not_stored(broker: MemoryBroker) -> None:
    publish(broker, "a")
    t = publish(broker, "a", transient=True)
    assert (t.offset, t.epoch) == (0, "")
    nxt = publish(broker, "a")
    assert nxt.offset == 2  # the transient one consumed no offset
    assert offsets(broker.history_since("a", 0)) == [1, 2]


def test_history_limit_keeps_the_newest(clock: Clock) -> None:
    broker = MemoryBroker(history_limit=2, history_ttl=60, epoch="e", clock=clock)
    for _ in range(3):
        publish(broker, "a")
    assert offsets(broker.history_since("a", 0)) == [2, 3]


def test_history_limit_zero_keeps_nothing_but_still_counts(clock: Clock) -> None:
    broker = MemoryBroker(history_limit=0, history_ttl=60, epoch="e", clock=clock)
    assert [publish(broker, "a").offset for _ in range(3)] == [1, 2, 3]
    assert broker.history_since("a", 0) == []
    assert broker.history_from("a", "e", 3) == []  # up to date: nothing missed
    with pytest.raises(HistoryError):
        broker.history_from("a", "e", 1)  # missed 2 and 3, which are not kept


def test_history_from_returns_messages_after_the_offset(broker: MemoryBroker) -> None:
    for _ in range(5):
        publish(broker, "a")
    assert offsets(broker.history_from("a", "ep01", 2)) == [3, 4, 5]
    assert broker.history_from("a", "ep01", 5) == []


@pytest.mark.parametrize(
    ("stream", "epoch", "offset"),
    [
        ("a", "other", 1),  # unknown epoch
        ("never", "ep01", 0),  # unknown stream
        ("a", "ep01", 6),  # ahead of the stream
    ],
)
def test_history_from_rejects(broker: MemoryBroker, stream: str, epoch: str, offset: int) -> None:
    for _ in range(5):
        publish(broker, "a")
    with pytest.raises(HistoryError):
        broker.history_from(stream, epoch, offset)


def test_relaxed_offset_rule(clock: Clock) -> None:
    """DESIGN.md: reject only when a message after the client's offset is gone."""
    broker = MemoryBroker(history_limit=2, history_ttl=60, epoch="e", clock=clock)
    for _ in range(6):
        publish(broker, "a")  # kept: 5, 6
    assert offsets(broker.history_from("a", "e", 4)) == [5, 6]  # anycable-go would reject
    with pytest.raises(HistoryError):
        broker.history_from("a", "e", 3)  # 4 is gone


def test_history_since_is_inclusive_in_seconds(broker: MemoryBroker, clock: Clock) -> None:
    publish(broker, "a")
    clock.advance(10)
    publish(broker, "a")
    second = int(clock.now)
    publish(broker, "a")
    assert offsets(broker.history_since("a", second)) == [2, 3]
    assert offsets(broker.history_since("a", second - 100)) == [1, 2, 3]  # too old never rejects
    assert broker.history_since("a", second + 1) == []
    assert broker.history_since("unknown", 0) == []


def test_ttl_expires_old_messages(broker: MemoryBroker, clock: Clock) -> None:
    publish(broker, "a")
    publish(broker, "a")
    clock.advance(40)
    publish(broker, "a")
    publish(broker, "a")
    clock.advance(25)  # the first two are 65 s old, the others 25 s
    broker.sweep()
    assert offsets(broker.history_since("a", 0)) == [3, 4]
    clock.advance(40)
    broker.sweep()
    assert broker.history_since("a", 0) == []
    with pytest.raises(HistoryError):
        broker.history_from("a", "ep01", 2)  # everything after 2 expired
    assert broker.history_from("a", "ep01", 4) == []  # the client has everything


def test_idle_stream_counter_outlives_messages_and_offsets_are_never_reused(broker: MemoryBroker, clock: Clock) -> None:
    for _ in range(3):
        publish(broker, "a")
    clock.advance(61)
    broker.sweep()
    assert broker.history_since("a", 0) == []
    assert publish(broker, "a").offset == 4  # the counter survived its messages
    clock.advance(STREAM_LIFETIME_TTLS * 60 + 61)
    broker.sweep()
    broker.sweep()
    assert broker.stats()["streams"] == 0  # disposed
    assert publish(broker, "a").offset == 5  # continues above the floor: no reuse
    with pytest.raises(HistoryError):
        broker.history_from("a", "ep01", 7)


def test_session_snapshot_restores_once(broker: MemoryBroker) -> None:
    broker.commit_session("sid1", b'{"ids":"x"}')
    assert broker.take_session("sid1") == b'{"ids":"x"}'
    assert broker.take_session("sid1") is None


def test_session_expires_after_ttl_unless_touched(broker: MemoryBroker, clock: Clock) -> None:
    broker.commit_session("s1", b"one")
    broker.commit_session("s2", b"two")
    clock.advance(20)
    broker.touch_sessions(["s1"])
    clock.advance(20)  # s2: 40 s since commit; s1: 20 s since touch
    broker.sweep()
    assert broker.take_session("s2") is None
    assert broker.take_session("s1") == b"one"


def test_expired_but_not_swept_session_is_not_restored(broker: MemoryBroker, clock: Clock) -> None:
    broker.commit_session("s", b"x")
    clock.advance(31)
    assert broker.take_session("s") is None


def test_recommit_replaces_snapshot_and_extends(broker: MemoryBroker, clock: Clock) -> None:
    broker.commit_session("s", b"v1")
    clock.advance(20)
    broker.commit_session("s", b"v2")
    clock.advance(20)
    broker.sweep()
    assert broker.take_session("s") == b"v2"
    assert len(broker._session_timers) <= 1  # one timer per sid, not one per commit


def test_sessions_disabled_with_zero_ttl(clock: Clock) -> None:
    broker = MemoryBroker(sessions_ttl=0, clock=clock)
    broker.commit_session("s", b"x")
    assert broker.take_session("s") is None
    assert not broker.supports_sessions


def test_null_broker_rejects_history_and_keeps_nothing() -> None:
    broker = NullBroker()
    msg = StreamMessage(stream="a", data='"x"')
    broker.register(msg)
    assert (msg.offset, msg.epoch) == (0, "")
    with pytest.raises(HistoryError):
        broker.history_since("a", 0)
    with pytest.raises(HistoryError):
        broker.history_from("a", "e", 0)
    broker.commit_session("s", b"x")
    assert broker.take_session("s") is None
