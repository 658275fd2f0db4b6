"""The official JS client (@anycable/core 1.1.7 with ``ws``) works against this server unchanged.

Every scenario runs ``tests/js/stream_client.mjs`` with the ext protocol against the real server
and asserts what the client's app sees (events, messages, meta) and, where it matters, the frames
on the wire (FRAMES.md).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from helpers import EXT, Client, Server, jwt_token, pubsub_id, signed_id
from jsclient import JS_DIR, JSClient, JSClientError, node_binary

from anycable_gevent.signer import sign

pytestmark = pytest.mark.js

STREAMS_SECRET = "js-streams-secret-0123456789abcdef0123456789"
JWT_SECRET = "js-jwt-secret-0123456789abcdef0123456789abcdef"
_names = itertools.count(1)


def unique(prefix: str) -> str:
    """A stream name no other test (or earlier run against the same server) has used."""
    return f"js-{prefix}-{next(_names)}-{time.monotonic_ns()}"


@pytest.fixture(scope="module")
def cable() -> Iterator[Server]:
    """No auth, public and signed streams, memory broker with resumable sessions."""
    with Server(
        "--noauth", "--public_streams", f"--streams_secret={STREAMS_SECRET}", "--sessions_ttl=60", "--history_ttl=60"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def jwt_cable() -> Iterator[Server]:
    """Connections must bring a JWT (no --noauth); public streams."""
    with Server(f"--jwt_secret={JWT_SECRET}", "--public_streams") as srv:
        yield srv


@pytest.fixture
def js() -> Iterator[Any]:
    """Start JS clients; every one started is stopped after the test."""
    started: list[JSClient] = []

    def start(url: str, **kwargs: Any) -> JSClient:
        client = JSClient(url, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


def welcome_frames(client: JSClient) -> list[dict[str, Any]]:
    return [f for f in client.frames("in") if isinstance(f, dict) and f.get("type") == "welcome"]


# ---------------------------------------------------------------------------------- streams


def test_stream_from_receives_broadcasts_in_order_with_meta(cable: Server, js: Any) -> None:
    stream = unique("order")
    client = js(cable.url, stream=stream, count=5, protocol=EXT)
    assert client.wait_for("connected")["reconnect"] is False
    client.wait_for("subscribed")
    payloads: list[Any] = [{"n": 1}, "two", [3, "three"], {"n": 4}, {"n": 5}]
    for data in payloads[:3]:
        cable.publish(stream, data)
    # A batch is delivered in array order, after what came before it.
    status, _ = cable.broadcast([{"stream": stream, "data": json.dumps(data)} for data in payloads[3:]])
    assert status == 201
    assert client.wait_exit() == 0, client.report()

    assert client.messages() == payloads
    metas = [e["meta"] for e in client.of("message")]
    epoch = metas[0]["epoch"]
    assert isinstance(epoch, str) and epoch
    assert metas == [{"stream": stream, "epoch": epoch, "offset": n} for n in (1, 2, 3, 4, 5)]


def test_signed_stream(cable: Server, js: Any) -> None:
    stream = unique("signed")
    client = js(cable.url, signed=sign(stream, STREAMS_SECRET), count=1)
    client.wait_for("subscribed")
    cable.publish(stream, {"secret": True})
    assert client.wait_exit() == 0, client.report()
    assert client.messages() == [{"secret": True}]
    assert client.of("message")[0]["meta"]["stream"] == stream


def test_tampered_signed_stream_is_rejected(cable: Server, js: Any) -> None:
    stream = unique("tampered")
    encoded, digest = sign(stream, STREAMS_SECRET).split("--")
    forged = sign(stream + "-other", STREAMS_SECRET).split("--")[0] + "--" + digest
    client = js(cable.url, signed=forged, frames=True)
    error = client.wait_for("error")
    assert "SubscriptionRejectedError" in error["error"]
    assert client.wait_exit() == 1
    assert {"identifier": signed_id(forged), "type": "reject_subscription"} in client.frames("in")
    assert client.of("subscribed") == []
    assert encoded != forged.split("--")[0]


# ---------------------------------------------------------------------------------- JWT


def test_jwt_in_query_connects(jwt_cable: Server, js: Any) -> None:
    stream = unique("jwt")
    token = jwt_token({"ext": json.dumps({"user": "u1"}), "exp": int(time.time()) + 300}, JWT_SECRET)
    client = js(f"{jwt_cable.url}?jid={token}", stream=stream, count=1, frames=True)
    client.wait_for("subscribed")
    jwt_cable.publish(stream, {"hello": "u1"})
    assert client.wait_exit() == 0, client.report()
    assert client.messages() == [{"hello": "u1"}]
    (welcome,) = welcome_frames(client)
    assert welcome["sid"]


def test_expired_jwt_closes_the_cable_for_good(jwt_cable: Server, js: Any) -> None:
    token = jwt_token({"ext": json.dumps({"user": "u2"}), "exp": int(time.time()) - 60}, JWT_SECRET)
    # A fast reconnect strategy and a short linger: a client that did reconnect would show it.
    client = js(f"{jwt_cable.url}?jid={token}", stream=unique("expired"), frames=True, reconnect_delay=50, linger=1)
    close = client.wait_for("close")
    assert close["reason"] == "token_expired"
    assert close["state"] == "closed" and close["monitor"] == "closed"
    assert client.wait_exit() == 1
    assert {"type": "disconnect", "reason": "token_expired", "reconnect": False} in client.frames("in")
    assert len(client.of("ws_open")) == 1, client.report()
    assert client.of("connected") == [] and client.of("subscribed") == []


# ---------------------------------------------------------------------------------- network drop


def go_offline_and_publish(client: JSClient, server: Server, stream: str, numbers: Iterable[int]) -> None:
    """Cut the client's socket (no close frame), publish while it cannot reconnect, let it back."""
    client.send("offline")  # reconnect attempts wait until "online"
    client.wait_for("offline")
    client.send("drop")
    assert client.wait_for("disconnect")["reason"] == "transport_closed"
    for n in numbers:
        server.publish(stream, {"n": n})


@pytest.mark.parametrize("auth", ["noauth", "jwt"])
def test_network_drop_restores_the_session_and_catches_up_exactly_once(
    auth: str, request: pytest.FixtureRequest, js: Any
) -> None:
    """SPEC §4.3/§4.9: reconnect with sid=, restored welcome, history instead of subscribe."""
    server: Server = request.getfixturevalue("cable" if auth == "noauth" else "jwt_cable")
    url = server.url
    if auth == "jwt":
        token = jwt_token({"ext": json.dumps({"user": "u3"}), "exp": int(time.time()) + 300}, JWT_SECRET)
        url = f"{server.url}?jid={token}"
    stream = unique("restore")
    ident = pubsub_id(stream)
    client = js(url, stream=stream, count=5, frames=True, reconnect_delay=100)
    client.wait_for("subscribed")
    server.publish(stream, {"n": 1})
    client.wait_messages(1)

    go_offline_and_publish(client, server, stream, (2, 3, 4))
    client.send("online")
    assert client.wait_for("connected", reconnect=True)["restored"] is True
    client.wait_messages(4)
    server.publish(stream, {"n": 5})
    assert client.wait_exit() == 0, client.report()

    # The app saw every message exactly once, in order, with positions it can trust.
    assert client.messages() == [{"n": n} for n in (1, 2, 3, 4, 5)]
    assert [e["meta"]["offset"] for e in client.of("message")] == [1, 2, 3, 4, 5]
    assert len({e["meta"]["epoch"] for e in client.of("message")}) == 1

    # The reconnect URL keeps the original query (the token) and adds the last sid (fact 1).
    first_open, second_open = client.of("ws_open")
    first_welcome, second_welcome = welcome_frames(client)
    assert first_open["url"] == url
    assert second_open["url"] == f"{url}{'&' if '?' in url else '?'}sid={first_welcome['sid']}"
    assert second_welcome["restored"] is True
    assert second_welcome["restored_ids"] == [ident]
    assert second_welcome["sid"] != first_welcome["sid"]

    # After the restored welcome the client asks for history only; it never subscribes again.
    sent = client.frames_since(second_open, "out")
    assert [f["command"] for f in sent] == ["history"], sent
    assert sent[0]["identifier"] == ident
    epoch = client.of("message")[0]["meta"]["epoch"]
    assert sent[0]["history"]["streams"] == {stream: {"epoch": epoch, "offset": 1}}

    # On the wire too: 2, 3, 4 once each, then confirm_history, then live 5.
    received = [
        f.get("offset") if "message" in f else f.get("type")
        for f in client.frames_since(second_open, "in")
        if isinstance(f, dict) and f.get("type") not in ("ping", "welcome")
    ]
    assert received == [2, 3, 4, "confirm_history", 5], received


def test_session_that_cannot_be_restored_falls_back_to_subscribe_with_history(cable: Server, js: Any) -> None:
    """FRAMES.md "unknown sid": plain welcome, re-subscribe carrying the last positions, no gap."""
    stream = unique("norestore")
    ident = pubsub_id(stream)
    client = js(cable.url, stream=stream, count=4, frames=True, reconnect_delay=100)
    client.wait_for("subscribed")
    (welcome,) = welcome_frames(client)
    cable.publish(stream, {"n": 1})
    client.wait_messages(1)
    go_offline_and_publish(client, cable, stream, (2, 3))

    # Someone else restores the session first: a sid restores only once (DESIGN.md).
    with Client(f"{cable.url}?sid={welcome['sid']}", protocol=EXT) as thief:
        assert thief.expect_welcome()["restored"] is True

    client.send("online")
    assert client.wait_for("subscribed", reconnect=True) == {
        "event": "subscribed",
        "reconnect": True,
        "restored": False,
    }
    client.wait_messages(3)
    cable.publish(stream, {"n": 4})
    assert client.wait_exit() == 0, client.report()

    assert client.messages() == [{"n": n} for n in (1, 2, 3, 4)]
    assert [e["meta"]["offset"] for e in client.of("message")] == [1, 2, 3, 4]
    _, second_open = client.of("ws_open")
    assert "restored" not in welcome_frames(client)[1]
    sent = client.frames_since(second_open, "out")
    assert [(f["command"], f["identifier"]) for f in sent] == [("subscribe", ident)], sent
    epoch = client.of("message")[0]["meta"]["epoch"]
    assert sent[0]["history"]["streams"] == {stream: {"epoch": epoch, "offset": 1}}
    received = [
        f.get("offset") if "message" in f else f.get("type")
        for f in client.frames_since(second_open, "in")
        if isinstance(f, dict) and f.get("type") not in ("ping", "welcome")
    ]
    assert received == ["confirm_subscription", 2, 3, "confirm_history", 4], received


# ---------------------------------------------------------------------------------- server-initiated


def test_remote_disconnect_reconnects_without_sid_and_resubscribes(cable: Server, js: Any) -> None:
    """FRAMES.md facts 6-7: a disconnect frame drops the sid; the client re-subscribes."""
    stream = unique("remote")
    ident = pubsub_id(stream)
    client = js(cable.url, stream=stream, count=1, frames=True, reconnect_delay=100)
    client.wait_for("subscribed")
    (welcome,) = welcome_frames(client)

    status, _ = cable.broadcast(
        {
            "command": "disconnect",
            "payload": {"identifier": json.dumps({"sid": welcome["sid"]}, separators=(",", ":")), "reconnect": True},
        }
    )
    assert status == 201
    assert client.wait_for("disconnect")["reason"] == "remote"
    again = client.wait_for("subscribed")
    assert again == {"event": "subscribed", "reconnect": True, "restored": False}
    cable.publish(stream, {"after": "reconnect"})
    assert client.wait_exit() == 0, client.report()
    assert client.messages() == [{"after": "reconnect"}]

    assert {"type": "disconnect", "reason": "remote", "reconnect": True} in client.frames("in")
    first_open, second_open = client.of("ws_open")
    assert second_open["url"] == f"{cable.url}?sid="
    new_welcome = welcome_frames(client)[1]
    assert "restored" not in new_welcome and new_welcome["sid"] != welcome["sid"]
    sent = client.frames_since(second_open, "out")
    assert [(f["command"], f["identifier"]) for f in sent][:1] == [("subscribe", ident)], sent


# ---------------------------------------------------------------------------------- whisper


def test_whisper_reaches_other_clients_but_not_the_sender(cable: Server, js: Any) -> None:
    stream = unique("whisper")
    sender = js(cable.url, stream=stream, count=1)
    listener = js(cable.url, stream=stream, count=2)
    sender.wait_for("subscribed")
    listener.wait_for("subscribed")

    sender.send("whisper", data={"event": "typing", "user": "jack"})
    (whisper,) = listener.wait_messages(1)
    assert whisper["data"] == {"event": "typing", "user": "jack"}
    assert whisper["meta"] is None  # transient: no stream position
    # A broadcast after the whisper: the sender's first message must be this one.
    cable.publish(stream, {"marker": True})
    assert sender.wait_exit() == 0, sender.report()
    assert listener.wait_exit() == 0, listener.report()
    assert sender.messages() == [{"marker": True}]
    assert listener.messages() == [{"event": "typing", "user": "jack"}, {"marker": True}]


# ---------------------------------------------------------------------------------- harness


def test_missing_npm_packages_fail_loudly(tmp_path: Any) -> None:
    """Without tests/js/node_modules the JS tests fail with a clear message instead of skipping."""
    with pytest.raises(JSClientError, match="npm ci"):
        node_binary(tmp_path)
    node_binary(JS_DIR)  # and the real directory is complete
