"""Presence over real sockets (SPEC §4.8, §5.4, §11.6 #80).

Clients join and leave a stream's presence set with ``join``/``leave`` (or through
``subscribe`` and ``unsubscribe``), ask who is there with ``presence``, and every
subscriber of the presence stream, the sender included, gets the join/leave events.
A disconnected session's presence expires after ``--presence_ttl`` with leave events.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Client, Server, connected, pubsub_id, signed_id

from anycable_gevent.signer import sign

STREAMS_SECRET = "presence-streams-secret-0123456789abcdef"
_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"presence-{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server("--public_streams", "--noauth", f"--streams_secret={STREAMS_SECRET}", "--sessions_ttl=30") as s:
        yield s


def joined(ident: str, pid: str, info: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "join", "id": pid}
    if info is not None:
        message["info"] = info
    return {"type": "presence", "identifier": ident, "message": message}


def left(ident: str, pid: str) -> dict[str, Any]:
    return {"type": "presence", "identifier": ident, "message": {"type": "leave", "id": pid}}


def join(c: Client, ident: str, pid: str, info: Any = None) -> None:
    presence: dict[str, Any] = {"id": pid}
    if info is not None:
        presence["info"] = info
    c.send({"command": "join", "identifier": ident, "presence": presence})


def leave(c: Client, ident: str) -> None:
    c.send({"command": "leave", "identifier": ident})


def info(c: Client, ident: str, data: Any = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"command": "presence", "identifier": ident}
    if data is not None:
        frame["data"] = data
    c.send(frame)
    return c.recv()


def subscribed(srv: Server, ident: str, n: int) -> list[Client]:
    """``n`` connected clients, each subscribed to ``ident`` (confirmation consumed)."""
    clients = []
    for _ in range(n):
        c = Client(srv.url)
        c.expect_welcome()
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        clients.append(c)
    return clients


def test_join_and_leave_events_per_presence_id(srv: Server) -> None:
    """SPEC §11.6 #80: two sessions with the same id make one join and one leave."""
    ident = pubsub_id(unique("80"))
    first, second, observer = subscribed(srv, ident, 3)
    try:
        join(first, ident, "42", {"name": "Jack"})
        for c in (first, second, observer):  # the sender too
            assert c.recv() == joined(ident, "42", {"name": "Jack"})
        join(second, ident, "42", {"name": "Jack"})
        observer.nothing()
        leave(first, ident)
        observer.nothing()
        leave(second, ident)
        for c in (first, second, observer):
            assert c.recv() == left(ident, "42")
        for c in (first, second):
            c.nothing(0.2)
    finally:
        for c in (first, second, observer):
            c.close()


def test_presence_info_lists_ids_with_latest_info(srv: Server) -> None:
    ident = pubsub_id(unique("info"))
    a, b = subscribed(srv, ident, 2)
    try:
        assert info(a, ident) == {"type": "presence", "identifier": ident, "message": {"type": "info", "total": 0}}
        join(a, ident, "42", {"v": 1})
        assert a.recv() == b.recv() == joined(ident, "42", {"v": 1})
        join(b, ident, "42", {"v": 2})  # same id: no event, but its info wins
        join(b, ident, "7")
        join(a, ident, "8")  # already present as 42 in this stream: refused
        a.nothing(0.3)
        b.nothing(0.1)
        # the JS client sends `data: {}`
        assert info(a, ident, {}) == {
            "type": "presence",
            "identifier": ident,
            "message": {"type": "info", "total": 1, "records": [{"id": "42", "info": {"v": 2}}]},
        }
        assert info(b, ident, {"return_records": False})["message"] == {"type": "info", "total": 1}
    finally:
        a.close()
        b.close()


def test_unsubscribe_leaves_presence(srv: Server) -> None:
    ident = pubsub_id(unique("unsub"))
    leaver, observer = subscribed(srv, ident, 2)
    try:
        join(leaver, ident, "42")
        assert leaver.recv() == joined(ident, "42")
        assert observer.recv() == joined(ident, "42")
        leaver.send({"command": "unsubscribe", "identifier": ident})
        assert observer.recv() == left(ident, "42")
        leaver.nothing(0.3)  # no longer subscribed: not told
        assert info(observer, ident)["message"] == {"type": "info", "total": 0}
    finally:
        leaver.close()
        observer.close()


def test_subscribe_with_presence_joins_after_confirmation_and_history(srv: Server) -> None:
    stream = unique("subscribe")
    ident = pubsub_id(stream)
    srv.publish(stream, {"n": 1})
    with connected(srv) as c:
        c.send(
            {
                "command": "subscribe",
                "identifier": ident,
                "history": {"since": int(time.time()) - 60, "streams": {}},
                "presence": {"id": "42", "info": "Jack"},
            }
        )
        frames = [c.recv() for _ in range(4)]
        assert [f.get("type") for f in frames] == ["confirm_subscription", None, "confirm_history", "presence"]
        assert frames[1]["message"] == {"n": 1}
        assert frames[3] == joined(ident, "42", "Jack")


def test_presence_needs_a_subscription(srv: Server) -> None:
    ident = pubsub_id(unique("nosub"))
    with connected(srv) as outsider:
        (observer,) = subscribed(srv, ident, 1)
        try:
            join(outsider, ident, "42")
            outsider.send({"command": "presence", "identifier": ident})
            outsider.nothing(0.3)
            observer.nothing(0.2)
            assert info(observer, ident)["message"] == {"type": "info", "total": 0}
        finally:
            observer.close()


def test_signed_streams_have_presence_unless_streams_presence_is_false(make_server: type[Server]) -> None:
    on = make_server("--noauth", f"--streams_secret={STREAMS_SECRET}").start()
    off = make_server("--noauth", f"--streams_secret={STREAMS_SECRET}", "--streams_presence=false").start()
    ident = signed_id(sign("room/1", STREAMS_SECRET))
    with connected(on) as c:
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        join(c, ident, "42")
        assert c.recv() == joined(ident, "42")
    with connected(off) as c:
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        join(c, ident, "42")
        c.send({"command": "presence", "identifier": ident})
        c.nothing()  # no presence stream for this subscription: both ignored


def test_no_presence_without_a_broker(make_server: type[Server]) -> None:
    """``--broker=none``: joins are ignored and ``presence`` is answered with an error (as Go does)."""
    srv = make_server("--public_streams", "--noauth", "--broker=none").start()
    ident = pubsub_id("room")
    with connected(srv) as c:
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        join(c, ident, "42")
        c.nothing(0.3)
        assert info(c, ident) == {"type": "presence", "identifier": ident, "message": {"type": "error", "total": 0}}


@pytest.fixture(scope="module")
def short() -> Iterator[Server]:
    """Presence kept 2 s after a disconnect (kept alive every second while connected)."""
    with Server("--public_streams", "--noauth", "--sessions_ttl=30", "--presence_ttl=2", "--restore_hold=1") as s:
        yield s


def test_presence_expires_after_disconnect(short: Server) -> None:
    ident = pubsub_id(unique("expire"))
    gone, staying = subscribed(short, ident, 2)
    try:
        join(staying, ident, "7")
        join(gone, ident, "42", {"name": "Jack"})
        assert [staying.recv(), staying.recv()] == [joined(ident, "7"), joined(ident, "42", {"name": "Jack"})]
        gone.close()
        # Both joined before the close: only the connected one is kept alive past the TTL.
        assert staying.recv(10) == left(ident, "42")
        staying.nothing(0.5)
        assert info(staying, ident)["message"] == {"type": "info", "total": 1, "records": [{"id": "7"}]}
    finally:
        gone.close()
        staying.close()


def test_restored_session_rejoining_causes_no_churn(short: Server) -> None:
    """The JS client joins again after a restore: no leave, no join, even after the old sid expires."""
    ident = pubsub_id(unique("restore"))
    first, observer = subscribed(short, ident, 2)
    try:
        join(first, ident, "42", {"name": "Jack"})
        assert observer.recv() == joined(ident, "42", {"name": "Jack"})
        assert first.welcome is not None
        sid = first.welcome["sid"]
        first.close()
        time.sleep(0.1)  # let the server see the close
        with Client(f"{short.url}?sid={sid}") as again:
            welcome = again.expect_welcome()
            assert welcome["restored"] is True and welcome["restored_ids"] == [ident]
            # what @anycable/core sends after a restored welcome (FRAMES.md)
            again.send(
                {"identifier": ident, "command": "history", "history": {"since": int(time.time()), "streams": {}}}
            )
            join(again, ident, "42", {"name": "Jack"})
            assert again.recv()["type"] == "confirm_history"
            observer.nothing(4)  # past the old sid's presence TTL
            assert info(observer, ident)["message"]["total"] == 1
            again.send({"command": "leave", "identifier": ident})
            assert observer.recv() == left(ident, "42")
    finally:
        first.close()
        observer.close()


def test_presence_events_are_not_stored(srv: Server) -> None:
    stream = unique("transient")
    ident = pubsub_id(stream)
    (c,) = subscribed(srv, ident, 1)
    try:
        join(c, ident, "42")
        assert c.recv() == joined(ident, "42")  # no stream_id/epoch/offset
        srv.publish(stream, {"n": 1})
        assert c.recv()["offset"] == 1  # the event used no offset
        with connected(srv) as late:
            frames = late.subscribe(ident, history={"since": int(time.time()) - 60, "streams": {}}), late.recv()
            assert frames[0]["type"] == "confirm_subscription"
            assert frames[1]["message"] == {"n": 1}  # the only stored message
            assert late.recv()["type"] == "confirm_history"
    finally:
        c.close()


def test_malformed_presence_frames_are_dropped(srv: Server) -> None:
    ident = pubsub_id(unique("bad"))
    (c,) = subscribed(srv, ident, 1)
    try:
        for presence in ({"id": 42}, {"info": "no id"}, {"id": ""}, "42"):
            c.send(json.dumps({"command": "join", "identifier": ident, "presence": presence}))
        c.nothing(0.3)
        join(c, ident, "42")  # the connection still works
        assert c.recv() == joined(ident, "42")
    finally:
        c.close()
