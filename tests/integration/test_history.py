"""Streams history over real sockets (SPEC §4.4–4.6, §11.4): offsets, epoch, since, offsets, rejects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import BASE, Client, Server, connected, pubsub_id


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server("--public_streams", "--noauth", "--history_limit=5", "--history_ttl=60") as s:
        yield s


def history(client: Client, ident: str, since: int = 0, streams: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Send a history command; return every frame up to and including confirm/reject."""
    req: dict[str, Any] = {}
    if since:
        req["since"] = since
    if streams is not None:
        req["streams"] = streams
    client.send({"command": "history", "identifier": ident, "history": req})
    frames = []
    while True:
        frame = client.recv()
        frames.append(frame)
        if frame.get("type") in ("confirm_history", "reject_history"):
            return frames


def test_broadcasts_carry_stream_id_epoch_and_consecutive_offsets(srv: Server) -> None:
    with connected(srv) as c, connected(srv, protocol=BASE) as base:
        ident = pubsub_id("h-offsets")
        c.subscribe(ident)
        base.subscribe(ident)
        srv.publish("h-offsets", {"n": 1})
        srv.publish("h-offsets", {"n": 2})
        got = [c.recv(), c.recv()]
        assert [m["offset"] for m in got] == [1, 2]
        assert {m["stream_id"] for m in got} == {"h-offsets"}
        assert got[0]["epoch"] == got[1]["epoch"] != ""
        # base-protocol clients get the position fields too (SPEC §12.7)
        assert base.recv()["offset"] == 1


def test_offsets_are_per_stream_with_one_epoch(srv: Server) -> None:
    with connected(srv) as c:
        c.subscribe(pubsub_id("h-per-a"))
        c.subscribe(pubsub_id("h-per-b"))
        srv.publish("h-per-a", 1)
        srv.publish("h-per-b", 1)
        a, b = c.recv(), c.recv()
        assert a["offset"] == b["offset"] == 1
        assert a["epoch"] == b["epoch"]


def test_history_since_on_subscribe(srv: Server) -> None:
    srv.publish("h-since", {"n": 1})
    srv.publish("h-since", {"n": 2})
    with connected(srv) as c:
        ident = pubsub_id("h-since")
        c.send({"command": "subscribe", "identifier": ident, "history": {"since": int(time.time()) - 30}})
        frames = [c.recv() for _ in range(4)]
        assert frames[0] == {"identifier": ident, "type": "confirm_subscription"}
        assert [f["message"] for f in frames[1:3]] == [{"n": 1}, {"n": 2}]
        assert [f["offset"] for f in frames[1:3]] == [1, 2]
        assert frames[3] == {"type": "confirm_history", "identifier": ident}


def test_history_by_offset(srv: Server) -> None:
    with connected(srv) as first:
        ident = pubsub_id("h-offset")
        first.subscribe(ident)
        for n in range(3):
            srv.publish("h-offset", {"n": n})
        live = [first.recv() for _ in range(3)]
    epoch = live[0]["epoch"]
    with connected(srv) as second:
        second.subscribe(ident)
        frames = history(second, ident, streams={"h-offset": {"epoch": epoch, "offset": 1}})
        assert [f.get("offset") for f in frames] == [2, 3, None]
        assert frames[-1] == {"type": "confirm_history", "identifier": ident}
        # at the head: nothing to send, still confirmed
        assert history(second, ident, streams={"h-offset": {"epoch": epoch, "offset": 3}}) == [
            {"type": "confirm_history", "identifier": ident}
        ]


@pytest.mark.parametrize(
    "position",
    [
        {"epoch": "nope", "offset": 1},  # unknown epoch
        {"epoch": "EPOCH", "offset": 99},  # ahead of the stream
        {"epoch": "EPOCH", "offset": 1},  # 2 was evicted by the limit of 5
    ],
    ids=["wrong-epoch", "ahead", "evicted"],
)
def test_history_rejects(srv: Server, position: dict[str, Any]) -> None:
    stream = "h-reject"
    with connected(srv) as c:
        ident = pubsub_id(stream)
        c.subscribe(ident)
        for n in range(8):
            srv.publish(stream, {"n": n})
        epoch = [c.recv() for _ in range(8)][0]["epoch"]
        if position["epoch"] == "EPOCH":
            position = {**position, "epoch": epoch}
        frames = history(c, ident, streams={stream: position})
        assert frames == [{"type": "reject_history", "identifier": ident}]


def test_relaxed_rule_accepts_the_oldest_kept_predecessor(srv: Server) -> None:
    """anycable-go rejects when the client's own offset was evicted; we only need the ones after it."""
    stream = "h-relaxed"
    with connected(srv) as c:
        ident = pubsub_id(stream)
        c.subscribe(ident)
        for n in range(8):  # limit 5: offsets 4..8 kept
            srv.publish(stream, n)
        epoch = [c.recv() for _ in range(8)][0]["epoch"]
    with connected(srv) as c2:
        c2.subscribe(ident)
        frames = history(c2, ident, streams={stream: {"epoch": epoch, "offset": 3}})
        assert [f.get("offset") for f in frames] == [4, 5, 6, 7, 8, None]


def test_history_for_a_stream_that_never_had_messages(srv: Server) -> None:
    with connected(srv) as c:
        ident = pubsub_id("h-empty")
        c.subscribe(ident)
        assert history(c, ident, since=int(time.time()) - 10) == [{"type": "confirm_history", "identifier": ident}]
        assert history(c, ident, streams={"h-empty": {"epoch": "x", "offset": 0}}) == [
            {"type": "reject_history", "identifier": ident}
        ]


def test_history_request_without_since_or_streams_and_for_unknown_identifier(srv: Server) -> None:
    with connected(srv) as c:
        ident = pubsub_id("h-noop")
        c.subscribe(ident)
        c.send({"command": "history", "identifier": ident, "history": {}})
        c.send({"command": "history", "identifier": pubsub_id("h-not-subscribed"), "history": {"since": 1}})
        c.nothing(0.5)
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}  # still working


def test_since_false_is_tolerated(srv: Server) -> None:
    """The JS client sends since:false with historyTimestamp:false and known positions."""
    with connected(srv) as c:
        ident = pubsub_id("h-false")
        c.subscribe(ident)
        srv.publish("h-false", 1)
        first = c.recv()
        srv.publish("h-false", 2)
        c.recv()
        c.send(
            {
                "command": "history",
                "identifier": ident,
                "history": {"since": False, "streams": {"h-false": {"epoch": first["epoch"], "offset": 1}}},
            }
        )
        # offset 2 was delivered live on this connection: only the confirmation comes back
        assert c.recv() == {"type": "confirm_history", "identifier": ident}


def test_transient_messages_are_not_stored_and_consume_no_offset(srv: Server) -> None:
    stream = "h-transient"
    with connected(srv) as c:
        ident = pubsub_id(stream)
        c.subscribe(ident)
        srv.publish(stream, {"n": 1})
        srv.publish(stream, {"t": 1}, transient=True)
        srv.publish(stream, {"n": 2})
        got = [c.recv() for _ in range(3)]
        assert [g.get("offset") for g in got] == [1, None, 2]
        assert "epoch" not in got[1] and "stream_id" not in got[1]
    with connected(srv) as c2:
        c2.send({"command": "subscribe", "identifier": ident, "history": {"since": int(time.time()) - 30}})
        frames = [c2.recv() for _ in range(4)]
        assert [f.get("message") for f in frames[1:3]] == [{"n": 1}, {"n": 2}]


def test_history_reply_skips_what_the_connection_already_received(srv: Server) -> None:
    """Exactly once per connection: a history request overlapping live delivery sends only the gap."""
    stream = "h-overlap"
    srv.publish(stream, {"n": 1})
    srv.publish(stream, {"n": 2})
    with connected(srv) as c:
        ident = pubsub_id(stream)
        c.subscribe(ident)  # live from here on, no history yet
        srv.publish(stream, {"n": 3})
        srv.publish(stream, {"n": 4})
        live = [c.recv(), c.recv()]
        assert [m["offset"] for m in live] == [3, 4]
        frames = history(c, ident, streams={stream: {"epoch": live[0]["epoch"], "offset": 0}})
        # 1 and 2 were missed; 3 and 4 were delivered already and are not sent again
        assert [f.get("offset") for f in frames] == [1, 2, None]
        srv.publish(stream, {"n": 5})
        assert c.recv()["offset"] == 5


def test_ttl_expiry(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--history_ttl=1").start()
    stream = "h-ttl"
    srv.publish(stream, 1)
    srv.publish(stream, 2)
    time.sleep(2.5)
    srv.publish(stream, 3)
    with connected(srv) as c:
        ident = pubsub_id(stream)
        c.send({"command": "subscribe", "identifier": ident, "history": {"since": int(time.time()) - 60}})
        frames = [c.recv() for _ in range(3)]
        assert [f.get("offset") for f in frames] == [None, 3, None]  # confirm, 3, confirm_history


def test_no_broker_rejects_history(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--broker=none").start()
    with connected(srv) as c:
        ident = pubsub_id("h-none")
        c.send({"command": "subscribe", "identifier": ident, "history": {"since": int(time.time()), "streams": {}}})
        assert c.recv() == {"identifier": ident, "type": "confirm_subscription"}
        assert c.recv() == {"type": "reject_history", "identifier": ident}
        srv.publish("h-none", {"x": 1})
        msg = c.recv()
        assert msg == {"identifier": ident, "message": {"x": 1}}  # no stream_id/epoch/offset
