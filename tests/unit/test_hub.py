"""The hub's index and fan-out, and the hold/release rules behind exactly-once delivery."""

from __future__ import annotations

import json

from anycable_gevent.hub import Hub
from anycable_gevent.protocol import StreamMessage


class FakeSession:
    """Records the frames it is given (the hub only needs ``sid`` and ``write``)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.frames: list[bytes] = []

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    def messages(self) -> list[dict]:
        """Every frame in every write (a write may carry several frames)."""
        out = []
        for data in self.frames:
            pos = 0
            while pos < len(data):
                length = data[pos + 1] & 0x7F
                start = pos + 2
                if length == 126:
                    length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                    start = pos + 4
                out.append(json.loads(data[start : start + length]))
                pos = start + length
        return out

    def offsets(self) -> list[int]:
        return [m.get("offset", 0) for m in self.messages()]


def msg(stream: str, offset: int = 0, data: str = '{"n":1}', epoch: str = "e1", **kw: object) -> StreamMessage:
    return StreamMessage(stream=stream, data=data, offset=offset, epoch=epoch if offset else "", **kw)  # type: ignore[arg-type]


def test_frame_built_once_per_identifier() -> None:
    hub = Hub()
    a, b = FakeSession("a"), FakeSession("b")
    hub.join(a, "id1", "s")
    hub.join(b, "id1", "s")
    hub.join(b, "id2", "s")
    hub.broadcast(msg("s", 1))
    assert a.frames[0] is b.frames[0]  # the same bytes object for one identifier
    assert [m["identifier"] for m in b.messages()] == ["id1", "id2"]
    assert a.messages()[0] == {"identifier": "id1", "message": {"n": 1}, "stream_id": "s", "epoch": "e1", "offset": 1}
    assert hub.frames_sent == 3


def test_leave_removes_empty_streams() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s")
    hub.leave(sub)
    assert hub.streams == {}
    hub.broadcast(msg("s", 1))
    assert a.frames == []


def test_exclude_socket_and_transient() -> None:
    hub = Hub()
    a, b = FakeSession("a"), FakeSession("b")
    hub.join(a, "id", "s")
    hub.join(b, "id", "s")
    hub.broadcast(msg("s", 1, exclude_socket="a"))
    hub.broadcast(msg("s", 0, transient=True))
    assert a.offsets() == [0]
    assert b.offsets() == [1, 0]
    assert "stream_id" not in b.messages()[1]


def test_live_delivery_never_goes_backwards() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s")
    hub.broadcast(msg("s", 1))
    sub.pos = 5  # e.g. a history reply already sent up to 5 ahead of the hub
    for off in (2, 3, 4, 5, 6):
        hub.broadcast(msg("s", off))
    assert a.offsets() == [1, 6]


def test_fresh_member_learns_where_its_run_starts() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s")
    assert sub.lo == 0
    hub.broadcast(msg("s", 7))
    hub.broadcast(msg("s", 8))
    assert (sub.lo, sub.pos) == (7, 8)


def test_held_messages_are_buffered_then_merged_after_history() -> None:
    hub = Hub()
    a, live = FakeSession("a"), FakeSession("live")
    sub = hub.join(a, "id", "s", held=True)
    hub.join(live, "id", "s")
    for off in (3, 4, 5):
        hub.broadcast(msg("s", off))
    assert a.frames == []  # held
    assert live.offsets() == [3, 4, 5]
    # a history reply sent offsets up to 4: 3 and 4 must not come again
    hub.release(sub, until=4)
    assert a.offsets() == [5]
    hub.broadcast(msg("s", 6))
    assert a.offsets() == [5, 6]


def test_release_without_history_flushes_everything_in_order() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s", held=True)
    hub.broadcast(msg("s", 1))
    hub.broadcast(msg("s", 0, transient=True))
    hub.broadcast(msg("s", 2))
    hub.release(sub)
    assert a.offsets() == [1, 0, 2]
    assert (sub.lo, sub.pos) == (1, 2)


def test_hold_of_a_live_member_and_release() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s")
    hub.broadcast(msg("s", 1))
    hub.hold(sub)
    hub.broadcast(msg("s", 2))
    assert a.offsets() == [1]
    hub.release(sub, until=1)
    assert a.offsets() == [1, 2]


def test_new_epoch_resets_positions() -> None:
    hub = Hub()
    a = FakeSession("a")
    hub.join(a, "id", "s")
    hub.broadcast(msg("s", 5, epoch="old"))
    hub.broadcast(msg("s", 1, epoch="new"))
    assert a.offsets() == [5, 1]


def test_leave_while_held_drops_the_buffer() -> None:
    hub = Hub()
    a = FakeSession("a")
    sub = hub.join(a, "id", "s", held=True)
    hub.broadcast(msg("s", 1))
    hub.leave(sub)
    hub.release(sub)
    assert a.frames == []
    assert hub.streams == {}


def test_queued_run_goes_out_as_one_write_per_subscriber() -> None:
    hub = Hub()
    a, b = FakeSession("a"), FakeSession("b")
    hub.join(a, "id", "s")
    hub.join(b, "id", "s")
    hub.broadcast_many([msg("s", 1), msg("other", 1), msg("s", 2), msg("s", 3)])
    assert len(a.frames) == 1 and a.frames[0] is b.frames[0]
    assert a.offsets() == [1, 2, 3]
    assert hub.frames_sent == 6


def test_queued_run_respects_positions_and_holds() -> None:
    hub = Hub()
    ahead, held = FakeSession("ahead"), FakeSession("held")
    sub = hub.join(ahead, "id", "s")
    hold = hub.join(held, "id", "s", held=True)
    hub.broadcast(msg("s", 1))
    sub.pos = 3  # a history reply already sent 2 and 3
    hub.broadcast_many([msg("s", 2), msg("s", 3), msg("s", 4)])
    assert ahead.offsets() == [1, 4]
    hub.release(hold, until=2)
    assert held.offsets() == [3, 4]


def test_queued_run_with_transient_or_excluded_goes_one_by_one() -> None:
    hub = Hub()
    a, b = FakeSession("a"), FakeSession("b")
    hub.join(a, "id", "s")
    hub.join(b, "id", "s")
    hub.broadcast_many([msg("s", 1), msg("s", 0, transient=True), msg("s", 2, exclude_socket="a")])
    assert a.offsets() == [1, 0]
    assert b.offsets() == [1, 0, 2]
    assert len(b.frames) == 3


def test_queued_run_without_offsets_is_coalesced_too() -> None:
    """--broker=none (and transient runs): one write per subscriber, held ones buffered in order."""
    hub = Hub()
    a, b = FakeSession("a"), FakeSession("b")
    hub.join(a, "id", "s")
    held = hub.join(b, "id", "s", held=True)
    hub.broadcast_many([msg("s", 0, data='{"n":1}'), msg("s", 0, data='{"n":2}')])
    assert len(a.frames) == 1
    assert [m["message"] for m in a.messages()] == [{"n": 1}, {"n": 2}]
    hub.release(held)
    assert [m["message"] for m in b.messages()] == [{"n": 1}, {"n": 2}]
