"""HTTP RPC against two real AnyCable RPC implementations running the same application.

Every test runs once per backend: ``js`` is @anycable/serverless-js (tests/js/rpc_server.mjs),
``python`` is this package's kit (tests/kit_backend.py, served by wsgiref in threads). Where
the two legitimately write different bytes (how channel and connection state are encoded,
whether a rejection says ``reconnect: false``), the backend object says what its bytes are
(``wire_istate``, ``wire_cstate``, ``reject_frame``) and the test asserts exactly those.

The server runs with ``--secret`` (so the backend checks the derived RPC secret and the
application broadcasts with the derived broadcast key, as anycable-rails does) and
``--headers=cookie,x-api-token``. What the backend received and what its callbacks saw is
read back from the backend itself. Tests that count Disconnect calls stop their own server
with SIGTERM first: a graceful shutdown sends every queued call, so the count is final.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import BASE, EXT, Client, Server, close_of, free_port, jwt_token, pubsub_id
from jsclient import JSClient
from rpc_backend import BACKENDS, SubprocessBackend, wait_until

SECRET = "rpc-test-secret-0123456789abcdef-xyz"


def derived(phrase: str) -> str:
    return hmac.new(SECRET.encode(), phrase.encode(), hashlib.sha256).hexdigest()


RPC_SECRET = derived("rpc-cable")
BROADCAST_KEY = derived("broadcast-cable")


def ident(room: str) -> str:
    return json.dumps({"channel": "ChatChannel", "room": room}, separators=(",", ":"))


def unique(prefix: str = "r") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def perform(c: Client, identifier: str, action: str, **data: Any) -> None:
    c.send({"command": "message", "identifier": identifier, "data": json.dumps({"action": action, **data})})


def sync(c: Client, identifier: str) -> dict[str, Any]:
    """Wait until every command sent before has been applied (commands run in order)."""
    perform(c, identifier, "whoami")
    return recv_message(c)


def recv_message(c: Client) -> dict[str, Any]:
    """The next frame that is not a "user left" broadcast (those come from other connections'
    ``unsubscribed`` callbacks, whenever their Disconnect calls run)."""
    while True:
        msg = c.recv()
        if not (isinstance(msg.get("message"), dict) and "left" in msg["message"]):
            return msg


def frames_within(c: Client, wait: float) -> list[dict[str, Any]]:
    """Every non-ping frame that arrives within ``wait`` seconds."""
    frames = []
    while True:
        try:
            frames.append(c.recv(wait))
        except TimeoutError:
            return frames


class Cable:
    """A server wired to a real backend of kind ``kind`` (both started, both stopped)."""

    def __init__(self, *args: str, kind: str = "js", backend: SubprocessBackend | None = None) -> None:
        self.server = Server(f"--secret={SECRET}", "--headers=cookie,x-api-token", *args)
        self.own_backend = backend is None
        self.backend = backend or BACKENDS[kind](self.server.broadcast_url, BROADCAST_KEY, RPC_SECRET)

    def __enter__(self) -> Cable:
        if self.own_backend:
            self.backend.start()
        self.server.args.append(f"--rpc_host={self.backend.rpc_host}")
        try:
            self.server.start()
        except BaseException:
            self.backend.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.__exit__(*exc)
        if self.own_backend:
            self.backend.stop()

    def client(self, query: str = "", protocol: str | None = EXT, **kwargs: Any) -> Client:
        return Client(self.server.url + query, protocol=protocol, **kwargs)

    def user(self, name: str, protocol: str | None = EXT) -> Client:
        """A client identified by ``?token=tok-<name>``, welcome received."""
        c = self.client(f"?token=tok-{name}", protocol)
        c.expect_welcome()
        return c

    def publish(self, stream: str, data: Any) -> None:
        status, body = self.server.broadcast({"stream": stream, "data": json.dumps(data)}, key=BROADCAST_KEY)
        assert status == 201, (status, body)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def kind(request: pytest.FixtureRequest) -> str:
    """The backend every test of this module runs against: "js" (serverless-js) or "python" (the kit)."""
    return str(request.param)


@pytest.fixture(scope="module")
def cable(kind: str) -> Iterator[Cable]:
    with Cable("--sessions_ttl=60", kind=kind) as c:
        yield c


# ---------------------------------------------------------------------- connect


@pytest.mark.parametrize(
    ("how", "query", "headers"),
    [
        ("param", "?token=tok-ann", {}),
        ("header", "", {"X-Api-Token": "tok-ann"}),
        ("cookie", "", {"Cookie": "username=ann"}),
    ],
)
def test_connect_accepted(cable: Cable, how: str, query: str, headers: dict[str, str]) -> None:
    with cable.client(query, headers=headers) as c:
        welcome = c.expect_welcome()
        sid = welcome["sid"]
        assert welcome == {"type": "welcome", "sid": sid} and sid
        [call] = cable.backend.calls("connect", sid)
        assert call["protov"] == "v1"
        assert call["content_type"] == "application/json"
        assert call["authorization"] == f"Bearer {RPC_SECRET}"
        assert call["body"]["env"]["url"] == f"http://127.0.0.1:{cable.server.port}/cable{query}"
        [event] = cable.backend.events("connect", sid)
        assert event["found"] == {"user": "ann", "via": how}


def test_connect_rejected(cable: Cable) -> None:
    with cable.client("?token=wrong") as c:
        assert close_of(c) == (1000, "Auth Failed", [cable.backend.reject_frame])


def test_backend_down_closes_with_auth_error(make_server: type[Server]) -> None:
    srv = make_server(f"--rpc_host=http://127.0.0.1:{free_port()}/_anycable").start()
    with Client(srv.url + "?token=tok-ann") as c:
        assert close_of(c) == (1011, "Auth Error", [])


# ---------------------------------------------------------------------- commands


def test_subscribe_confirmed_with_transmissions(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as c:
        c.send({"command": "subscribe", "identifier": ident(room)})
        # verbatim, in the backend's order (serverless-js puts confirm first)
        assert c.recv() == {"identifier": ident(room), "type": "confirm_subscription"}
        assert c.recv() == {"identifier": ident(room), "message": {"hello": "ann"}}
        c.nothing(0.2)


def test_subscribe_rejected(cable: Cable) -> None:
    other = unique()
    with cable.user("ann") as c:
        sid = c.welcome["sid"]  # type: ignore[index]
        assert c.subscribe(ident("forbidden")) == {"identifier": ident("forbidden"), "type": "reject_subscription"}
        perform(c, ident("forbidden"), "tick", by=1)  # not subscribed: no RPC, no reply
        assert c.subscribe(ident(other))["type"] == "confirm_subscription"
        commands = [(x["body"]["command"], x["body"]["identifier"]) for x in cable.backend.calls("command", sid)]
        assert commands == [("subscribe", ident("forbidden")), ("subscribe", ident(other))]


def test_perform_transmissions_and_broadcasts(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as a, cable.user("bob") as b:
        for c in (a, b):
            c.subscribe(ident(room))
            c.recv()  # hello
        perform(a, ident(room), "speak", text="hi")
        got = sorted((a.recv(), a.recv()), key=lambda m: "echo" in m["message"])
        broadcast, echo = got
        assert echo == {"identifier": ident(room), "message": {"echo": "hi"}}
        assert broadcast["identifier"] == ident(room) and broadcast["message"] == {"user": "ann", "text": "hi"}
        assert broadcast["stream_id"] == f"chat_{room}" and broadcast["offset"] >= 1 and broadcast["epoch"]
        other = b.recv()
        assert other["message"] == {"user": "ann", "text": "hi"}
        b.nothing(0.2)


def test_stream_from_and_stop_stream_from(cable: Cable) -> None:
    room, side = unique(), unique("side")
    with cable.user("ann") as a, cable.user("sentinel") as s:
        for c in (a, s):
            c.subscribe(ident(room))
            c.recv()
            perform(c, ident(room), "follow", stream=side)
            sync(c, ident(room))
        cable.publish(side, {"n": 1})
        assert a.recv()["message"] == {"n": 1}
        assert s.recv()["message"] == {"n": 1}
        perform(a, ident(room), "unfollow", stream=side)
        sync(a, ident(room))
        cable.publish(side, {"n": 2})
        assert s.recv()["message"] == {"n": 2}
        cable.publish(f"chat_{room}", {"n": 3})
        assert a.recv()["message"] == {"n": 3}  # the room stream is still there
        assert s.recv()["message"] == {"n": 3}
        perform(a, ident(room), "stop_all")
        sync(a, ident(room))
        cable.publish(f"chat_{room}", {"n": 4})
        assert s.recv()["message"] == {"n": 4}
        a.nothing(0.3)


def test_channel_state_round_trip(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as c:
        sid = c.welcome["sid"]  # type: ignore[index]
        c.subscribe(ident(room))
        c.recv()
        perform(c, ident(room), "tick", by=2)
        assert c.recv()["message"] == {"count": 2, "user": "ann"}
        perform(c, ident(room), "tick", by=3)
        assert c.recv()["message"] == {"count": 5, "user": "ann"}
        last = cable.backend.calls("command", sid)[-1]["body"]
        # Command env.istate is the identifier's own flat state map
        assert last["env"]["istate"] == cable.backend.wire_istate(ident(room), {"room": room, "count": 2})
        assert last["connection_identifiers"] == '{"user":"ann"}'
        assert json.loads(last["data"]) == {"action": "tick", "by": 3}


def test_connection_state_round_trip(cable: Cable) -> None:
    room = unique()
    with cable.client(headers={"Cookie": "username=cy"}) as c:
        sid = c.expect_welcome()["sid"]
        c.subscribe(ident(room))
        c.recv()
        perform(c, ident(room), "remember", city="Paris")
        perform(c, ident(room), "whoami")
        me = c.recv()["message"]
        assert me["identifiers"] == {"user": "cy"}
        assert me["cstate"] == {"via": "cookie", "city": "Paris"}
        assert me["state"] == {"room": room, "count": 0}
        cstate = cable.backend.wire_cstate({"via": "cookie", "city": "Paris"})
        assert cable.backend.calls("command", sid)[-1]["body"]["env"]["cstate"] == cstate


def test_unsubscribe_runs_callback_and_stops_streams(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as a, cable.user("bob") as b:
        sid = a.welcome["sid"]  # type: ignore[index]
        for c in (a, b):
            c.subscribe(ident(room))
            c.recv()
        perform(a, ident(room), "tick", by=7)
        a.recv()
        a.send({"command": "unsubscribe", "identifier": ident(room)})
        # Commands run in order: the pong comes once the unsubscribe is over (its RPC call
        # returned and the streams stopped). `unsubscribed` ran while ann was still
        # subscribed, so its own "left" may reach her before; nothing else does.
        a.send({"command": "ping"})
        before_pong = []
        while (msg := a.recv()).get("type") != "pong":
            before_pong.append(msg)
        for msg in before_pong:
            assert msg == {**msg, "identifier": ident(room), "message": {"left": "ann"}}
        assert b.recv()["message"] == {"left": "ann"}  # broadcast by the backend's `unsubscribed`
        [event] = cable.backend.events("unsubscribed", sid)
        assert event["state"] == {"room": room, "count": 7}
        cable.publish(f"chat_{room}", {"n": 1})
        assert b.recv()["message"] == {"n": 1}
        assert frames_within(a, 0.3) == []  # no acknowledgment, no later room messages


def test_command_disconnect_closes(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as c:
        c.subscribe(ident(room))
        c.recv()
        perform(c, ident(room), "kick")
        code, reason, frames = close_of(c)
        assert (code, frames) == (1000, [])


def test_backend_error_is_ignored(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as c:
        c.subscribe(ident(room))
        c.recv()
        perform(c, ident(room), "boom")  # status ERROR: nothing is sent, the connection stays
        perform(c, ident(room), "tick", by=1)
        assert c.recv()["message"] == {"count": 1, "user": "ann"}


# ---------------------------------------------------------------------- headers


def test_headers_and_cookies_forwarded(cable: Cable) -> None:
    with Cable(
        "--headers=cookie,x-api-token,x-forwarded-for", "--proxy-cookies=username,_session", backend=cable.backend
    ) as own:
        headers = {
            "Cookie": "username=dee; tracking=t1; _session=s1",
            "X-Api-Token": "tok-zzz",
            "X-Forwarded-For": "10.0.0.1",
            "X-Other": "not forwarded",
        }
        with own.client("?x=1", headers=headers) as c:
            sid = c.expect_welcome()["sid"]
        [call] = cable.backend.calls("connect", sid)
        assert call["body"]["env"] == {
            "url": f"http://127.0.0.1:{own.server.port}/cable?x=1",
            "headers": {
                "cookie": "username=dee; _session=s1",
                "x-api-token": "tok-zzz",
                "x-forwarded-for": "10.0.0.1",
                "REMOTE_ADDR": "127.0.0.1",
            },
        }


def test_all_cookies_forwarded_by_default(cable: Cable) -> None:
    with cable.client(headers={"Cookie": "username=eve; tracking=t1", "X-Other": "x"}) as c:
        sid = c.expect_welcome()["sid"]
        [call] = cable.backend.calls("connect", sid)
        assert call["body"]["env"]["headers"] == {"cookie": "username=eve; tracking=t1", "REMOTE_ADDR": "127.0.0.1"}


# ---------------------------------------------------------------------- restore


def test_restore_without_rpc(cable: Cable) -> None:
    room = unique()
    with cable.user("ann") as c:
        old = c.welcome["sid"]  # type: ignore[index]
        c.subscribe(ident(room))
        c.recv()
        perform(c, ident(room), "tick", by=4)
        c.recv()
        perform(c, ident(room), "remember", city="Oslo")
        perform(c, ident(room), "whoami")
        c.recv()
    with cable.client(f"?token=tok-ann&sid={old}") as r:
        welcome = r.expect_welcome()
        new = welcome["sid"]
        assert welcome == {"type": "welcome", "sid": new, "restored": True, "restored_ids": [ident(room)]}
        assert new != old
        me = sync(r, ident(room))["message"]
        assert me["state"] == {"room": room, "count": 4}
        assert me["cstate"] == {"via": "param", "city": "Oslo"}
        cable.publish(f"chat_{room}", {"after": "restore"})
        assert recv_message(r)["message"] == {"after": "restore"}
        # the backend never heard Connect or Subscribe for the restored connection
        assert cable.backend.calls("connect", new) == []
        assert [x["body"]["command"] for x in cable.backend.calls("command", new)] == ["message"]


def test_base_protocol_is_not_restored(cable: Cable) -> None:
    with cable.user("ann") as c:
        old = c.welcome["sid"]  # type: ignore[index]
    with cable.client(f"?token=tok-ann&sid={old}", protocol=BASE) as r:
        welcome = r.expect_welcome()
        assert "restored" not in welcome
        assert len(cable.backend.calls("connect", welcome["sid"])) == 1


# ---------------------------------------------------------------------- disconnect


def test_disconnect_called_once_per_authenticated_connection(kind: str) -> None:
    r1, r2 = unique(), unique()
    with Cable(kind=kind) as own:
        a = own.user("ann")
        sid = a.welcome["sid"]  # type: ignore[index]
        for room in (r1, r2):
            a.subscribe(ident(room))
            a.recv()
        perform(a, ident(r1), "tick", by=3)
        a.recv()
        rejected = own.client("?token=nope")
        close_of(rejected)
        a.close()
        wait_until(lambda: own.backend.calls("disconnect", sid))
        assert own.server.stop() == 0  # graceful: whatever was queued has been sent
        [call] = own.backend.calls("disconnect", sid)
        body = call["body"]
        assert body["identifiers"] == '{"user":"ann"}'
        assert sorted(body["subscriptions"]) == sorted([ident(r1), ident(r2)])
        assert body["env"]["url"] == f"http://127.0.0.1:{own.server.port}/cable?token=tok-ann"
        assert body["env"]["cstate"] == own.backend.wire_cstate({"via": "param"})
        # Disconnect env.istate: identifier -> JSON-encoded state map of that identifier
        flat1 = own.backend.wire_istate(ident(r1), {"room": r1, "count": 3})
        assert json.loads(body["env"]["istate"][ident(r1)]) == flat1
        states = {e["identifier"]: e["state"] for e in own.backend.events("unsubscribed", sid)}
        assert states == {ident(r1): {"room": r1, "count": 3}, ident(r2): {"room": r2, "count": 0}}
        assert len(own.backend.events("disconnect", sid)) == 1
        # the rejected connection was never authenticated: no Disconnect for it
        assert len(own.backend.calls("disconnect")) == 1


def test_disconnect_mode_never(kind: str) -> None:
    with Cable("--disconnect_mode=never", kind=kind) as own:
        for name in ("ann", "bob"):
            own.user(name).close()
        assert own.server.stop() == 0
        assert len(own.backend.calls("connect")) == 2
        assert own.backend.calls("disconnect") == []


def test_sigterm_sends_every_disconnect_despite_rate_limit(kind: str) -> None:
    """SPEC §11.6 #76: 3 clients, --disconnect_mode=always --disconnect_rate=1, SIGTERM."""
    with Cable("--disconnect_mode=always", "--disconnect_rate=1", kind=kind) as own:
        clients = [own.user(name) for name in ("ann", "bob", "cy")]
        sids = sorted(c.welcome["sid"] for c in clients)  # type: ignore[index]
        proc = own.server.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            assert close_of(c) == (
                1001,
                "Server restart",
                [{"type": "disconnect", "reason": "server_restart", "reconnect": True}],
            )
        assert proc.wait(15) == 0
        assert sorted(x["sid"] for x in own.backend.calls("disconnect")) == sids


def test_disconnect_mode_auto_skips_connections_nobody_asked_about(kind: str) -> None:
    """SPEC §8.5: JWT identification and $pubsub streams say "no interest"; one RPC subscribe is enough."""
    room = unique()
    with Cable("--public_streams", kind=kind) as own:

        def jwt_client(user: str) -> Client:
            token = jwt_token({"ext": json.dumps({"user": user}), "exp": int(time.time()) + 300}, SECRET)
            c = own.client(f"?jid={token}")
            c.expect_welcome()
            return c

        quiet, chatty = jwt_client("quiet"), jwt_client("chatty")
        assert quiet.subscribe(pubsub_id("public-a"))["type"] == "confirm_subscription"
        chatty.subscribe(ident(room))
        chatty.recv()
        sids = [c.welcome["sid"] for c in (quiet, chatty)]  # type: ignore[index]
        quiet.close()
        chatty.close()
        assert own.server.stop() == 0
        assert own.backend.calls("connect") == []  # identified by the JWT
        assert [x["sid"] for x in own.backend.calls("disconnect")] == [sids[1]]


@pytest.mark.js
def test_official_client_session_is_restored_without_rpc(kind: str) -> None:
    """The backend's welcome carries the sid; @anycable/core reconnects with ?sid= and is restored."""
    stream = unique("js")
    with Cable("--public_streams", kind=kind) as own:
        client = JSClient(own.server.url + "?token=tok-jsann", stream=stream, count=2, frames=True, reconnect_delay=100)
        try:
            client.wait_for("subscribed")
            own.publish(stream, {"n": 1})
            client.wait_messages(1)
            client.send("drop")
            assert client.wait_for("connected", reconnect=True)["restored"] is True
            own.publish(stream, {"n": 2})
            assert client.wait_exit() == 0, client.report()
        finally:
            client.stop()
        assert client.messages() == [{"n": 1}, {"n": 2}]
        first, second = [f for f in client.frames("in") if isinstance(f, dict) and f.get("type") == "welcome"]
        assert first == {"type": "welcome", "sid": first["sid"]}  # the backend's welcome
        assert second["restored"] is True
        assert own.server.stop() == 0
        assert [x["sid"] for x in own.backend.calls("connect")] == [first["sid"]]
        # the dropped connection still gets its Disconnect (SPEC §4.3), and only that one is missing
        # a matching Connect: the restored one is disconnected when the server stops
        assert sorted(x["sid"] for x in own.backend.calls("disconnect")) == sorted([first["sid"], second["sid"]])
