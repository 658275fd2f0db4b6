"""Resumable sessions over real sockets (SPEC §4.3, §4.9, §5.3, §11.5; DESIGN.md decisions).

A reconnect with the old sid is restored without re-subscribing; each missed message
arrives exactly once and in order, also while new messages keep arriving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import BASE, EXT, Client, Server, connected, jwt_token, pubsub_id


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server("--public_streams", "--noauth", "--sessions_ttl=30", "--restore_hold=1") as s:
        yield s


def offline_session(srv: Server, stream: str, received: int = 1) -> tuple[str, str, dict[str, Any]]:
    """Connect, subscribe, receive ``received`` broadcasts, drop. Returns (sid, identifier, last message)."""
    ident = pubsub_id(stream)
    with connected(srv) as c:
        c.subscribe(ident)
        last: dict[str, Any] = {}
        for n in range(1, received + 1):
            srv.publish(stream, {"n": n})
            last = c.recv()
        assert c.welcome is not None
        sid = c.welcome["sid"]
    time.sleep(0.1)  # let the server see the close
    return sid, ident, last


def restore(srv: Server, sid: str, header: bool = False, protocol: str | None = EXT) -> Client:
    if header:
        client = Client(srv.url, protocol=protocol, headers={"X-AnyCable-Restore-Sid": sid})
    else:
        client = Client(f"{srv.url}?sid={sid}", protocol=protocol)
    client.expect_welcome()
    return client


def history_request(client: Client, ident: str, stream: str, last: dict[str, Any]) -> None:
    """What the JS client sends after a restored welcome (FRAMES.md)."""
    client.send(
        {
            "identifier": ident,
            "command": "history",
            "history": {
                "since": int(time.time()) - 60,
                "streams": {stream: {"epoch": last["epoch"], "offset": last["offset"]}},
            },
        }
    )


@pytest.mark.parametrize("header", [False, True], ids=["query", "header"])
def test_restore_without_resubscribing(srv: Server, header: bool) -> None:
    stream = f"r-basic-{header}"
    sid, ident, _ = offline_session(srv, stream)
    with restore(srv, sid, header=header) as c:
        assert c.welcome is not None
        assert c.welcome["restored"] is True
        assert c.welcome["restored_ids"] == [ident]
        assert c.welcome["sid"] != sid
        srv.publish(stream, {"n": 2})
        msg = c.recv(3)  # held for --restore_hold, then delivered without a subscribe
        assert msg["message"] == {"n": 2} and msg["identifier"] == ident


def test_missed_messages_arrive_once_in_order_then_live(srv: Server) -> None:
    stream = "r-missed"
    sid, ident, last = offline_session(srv, stream)
    for n in (2, 3, 4):
        srv.publish(stream, {"n": n})
    with restore(srv, sid) as c:
        history_request(c, ident, stream, last)
        frames = [c.recv() for _ in range(4)]
        assert [f.get("message") for f in frames[:3]] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert frames[3] == {"type": "confirm_history", "identifier": ident}
        srv.publish(stream, {"n": 5})
        assert c.recv()["message"] == {"n": 5}
        c.nothing(0.3)


def test_live_messages_during_restore_are_merged_after_history(srv: Server) -> None:
    """Messages published after the restore but before the history request are held, not duplicated."""
    stream = "r-merge"
    sid, ident, last = offline_session(srv, stream)
    srv.publish(stream, {"n": 2})  # missed while offline
    with restore(srv, sid) as c:
        srv.publish(stream, {"n": 3})  # arrives live, while the client has not asked yet
        srv.publish(stream, {"n": 4})
        history_request(c, ident, stream, last)
        got = []
        while True:
            f = c.recv()
            got.append(f.get("offset") or f.get("type"))
            if len(got) == 4:
                break
        # history holds 2, 3, 4 (all registered before the request); the held live
        # copies of 3 and 4 are dropped, nothing comes twice
        assert got == [2, 3, 4, "confirm_history"]
        srv.publish(stream, {"n": 5})
        assert c.recv()["offset"] == 5
        c.nothing(0.3)


def test_exactly_once_under_concurrent_publishing(srv: Server) -> None:
    """A publisher never stops while the client drops, restores and catches up."""
    stream = "r-concurrent"
    sid, ident, last = offline_session(srv, stream)
    stop = threading.Event()
    published = [1]

    def publisher() -> None:
        n = 2
        while not stop.is_set():
            srv.publish(stream, {"n": n})
            published.append(n)
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        time.sleep(0.2)
        c = restore(srv, sid)
        time.sleep(0.1)
        history_request(c, ident, stream, last)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    seen = [last["offset"]]
    try:
        while True:
            f = c.recv(1.0)
            if "offset" in f:
                seen.append(f["offset"])
    except TimeoutError:
        pass
    c.close()
    assert seen == sorted(set(seen)), "duplicates or out of order"
    assert seen == list(range(1, len(published) + 1)), "gap"


def test_held_messages_flushed_after_grace_without_history_request(srv: Server) -> None:
    stream = "r-grace"
    sid, _, _ = offline_session(srv, stream)
    with restore(srv, sid) as c:
        srv.publish(stream, {"n": 2})
        with pytest.raises(TimeoutError):
            c.recv(0.3)  # held while the client may still ask for history
        assert c.recv(3)["message"] == {"n": 2}


def test_a_sid_restores_once(srv: Server) -> None:
    sid, _, _ = offline_session(srv, "r-once")
    with restore(srv, sid) as first:
        assert first.welcome is not None and first.welcome.get("restored") is True
    time.sleep(0.1)
    with restore(srv, sid) as second:
        assert second.welcome is not None and "restored" not in second.welcome


def test_the_new_sid_restores_next_time(srv: Server) -> None:
    stream = "r-chain"
    sid, ident, _ = offline_session(srv, stream)
    with restore(srv, sid) as c:
        assert c.welcome is not None
        new_sid = c.welcome["sid"]
    time.sleep(0.1)
    with restore(srv, new_sid) as c2:
        assert c2.welcome is not None and c2.welcome["restored_ids"] == [ident]


def test_unknown_and_empty_sid_connect_normally(srv: Server) -> None:
    for sid in ("unknown-session-id", ""):
        with restore(srv, sid) as c:
            assert c.welcome is not None and "restored" not in c.welcome and c.welcome["sid"]


def test_base_protocol_is_never_restored(srv: Server) -> None:
    sid, _, _ = offline_session(srv, "r-base")
    with restore(srv, sid, protocol=BASE) as c:
        assert c.welcome is not None and "restored" not in c.welcome


def test_restored_session_without_subscriptions_has_no_restored_ids(srv: Server) -> None:
    with connected(srv) as c:
        assert c.welcome is not None
        sid = c.welcome["sid"]
    time.sleep(0.1)
    with restore(srv, sid) as c2:
        assert c2.welcome is not None
        assert c2.welcome["restored"] is True and "restored_ids" not in c2.welcome


def test_restored_channel_state_allows_whisper(srv: Server) -> None:
    stream = "r-whisper"
    sid, ident, _ = offline_session(srv, stream)
    with restore(srv, sid) as c, connected(srv) as other:
        other.subscribe(ident)
        c.send({"command": "whisper", "identifier": ident, "data": {"event": "typing"}})
        assert other.recv() == {"identifier": ident, "message": {"event": "typing"}}
        c.nothing(0.3)


def test_sessions_expire_after_ttl(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--sessions_ttl=1").start()
    sid, _, _ = offline_session(srv, "r-ttl")
    time.sleep(2.5)
    with restore(srv, sid) as c:
        assert c.welcome is not None and "restored" not in c.welcome


@pytest.mark.parametrize("flags", [["--sessions_ttl=0"], ["--broker=none"]], ids=["ttl0", "no-broker"])
def test_no_restore_when_sessions_are_off(make_server: type[Server], flags: list[str]) -> None:
    srv = make_server("--public_streams", "--noauth", *flags).start()
    sid, _, _ = offline_session(srv, "r-off")
    with restore(srv, sid) as c:
        assert c.welcome is not None and "restored" not in c.welcome


def test_jwt_session_is_not_restored_after_the_token_expired(make_server: type[Server]) -> None:
    secret = "jwt-restore-secret-0123456789abcdef"
    srv = make_server("--public_streams", f"--jwt_secret={secret}").start()
    token = jwt_token({"ext": '{"user":"u1"}', "exp": int(time.time()) + 2}, secret)
    c = Client(f"{srv.url}?jid={token}")
    welcome = c.expect_welcome()
    c.subscribe(pubsub_id("r-jwt"))
    c.close()
    time.sleep(0.1)
    # still valid: restored
    with Client(f"{srv.url}?jid={token}&sid={welcome['sid']}") as again:
        w = again.expect_welcome()
        assert w.get("restored") is True
        new_sid = w["sid"]
    time.sleep(3.2)
    # expired: not restored; the token itself is rejected
    late = Client(f"{srv.url}?jid={token}&sid={new_sid}")
    code, frames = late.closed()
    assert frames == [{"type": "disconnect", "reason": "token_expired", "reconnect": False}]
    assert code == 1000
