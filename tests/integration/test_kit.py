"""Kit features that serverless-js 0.1.0 does not have, end to end: the real server with
``--rpc_host`` pointing at tests/kit_backend.py (the Python kit under wsgiref).

Whispers and presence declared by a channel (``$w``/``$p`` in istate, RPC presence),
signed streams checked by the channel, ``exclude_socket`` of the sender's sid, a remote
disconnect published from a channel, and a JWT minted by the kit that the server accepts.
The shared behaviours (connect, commands, state, restore, disconnect) are in test_rpc.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import EXT, ROOT, Client, Server, close_of
from rpc_backend import KitBackend

from anycable_gevent.application import issue_token, sign_stream
from anycable_gevent.keys import derive_key

SECRET = "kit-test-secret-5f1e0c2b-9a7d3e41c6b8"
RPC_SECRET = derive_key(SECRET, "rpc-cable")
BROADCAST_KEY = derive_key(SECRET, "broadcast-cable")


def chat(room: str) -> str:
    return json.dumps({"channel": "ChatChannel", "room": room}, separators=(",", ":"))


def kit(**params: Any) -> str:
    return json.dumps({"channel": "KitChannel", **params}, separators=(",", ":"))


def unique(prefix: str = "k") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def perform(c: Client, identifier: str, action: str, **data: Any) -> None:
    c.send({"command": "message", "identifier": identifier, "data": json.dumps({"action": action, **data})})


class Stack:
    def __init__(self) -> None:
        self.server = Server(f"--secret={SECRET}", "--headers=cookie,x-api-token", "--sessions_ttl=60")
        self.backend = KitBackend(self.server.broadcast_url, BROADCAST_KEY, RPC_SECRET, streams_secret=SECRET)

    def user(self, name: str) -> Client:
        c = Client(f"{self.server.url}?token=tok-{name}", protocol=EXT)
        c.expect_welcome()
        return c


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    with s.backend:
        s.server.args.append(f"--rpc_host={s.backend.rpc_host}")
        with s.server:
            yield s


def test_to_others_skips_the_sender(stack: Stack) -> None:
    room = unique()
    with stack.user("ann") as a, stack.user("bob") as b:
        for c in (a, b):
            c.subscribe(chat(room))
            c.recv()  # hello
        perform(a, chat(room), "speak", text="psst", to_others=True)
        assert b.recv()["message"] == {"user": "ann", "text": "psst"}
        assert a.recv() == {"identifier": chat(room), "message": {"echo": "psst"}}
        a.nothing(0.3)


def test_whisper_on_a_stream_started_with_whisper(stack: Stack) -> None:
    stream = unique("w")
    ident = kit(stream=stream, whisper=True)
    with stack.user("ann") as a, stack.user("bob") as b:
        for c in (a, b):
            assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        a.send({"command": "whisper", "identifier": ident, "data": {"event": "typing"}})
        assert b.recv() == {"identifier": ident, "message": {"event": "typing"}}
        a.nothing(0.3)


def test_no_whisper_without_the_flag(stack: Stack) -> None:
    ident = kit(stream=unique("w"))
    with stack.user("ann") as a, stack.user("bob") as b:
        for c in (a, b):
            c.subscribe(ident)
        a.send({"command": "whisper", "identifier": ident, "data": {"event": "typing"}})
        b.nothing(0.3)


def test_presence_joined_in_subscribed_and_left_by_action(stack: Stack) -> None:
    ident = kit(stream=unique("p"), presence=True)
    with stack.user("ann") as a, stack.user("bob") as b:
        assert a.subscribe(ident)["type"] == "confirm_subscription"
        join_ann = {
            "type": "presence",
            "identifier": ident,
            "message": {"type": "join", "id": "ann", "info": {"name": "Ann"}},
        }
        assert a.recv() == join_ann
        b.subscribe(ident)
        join_bob = {
            "type": "presence",
            "identifier": ident,
            "message": {"type": "join", "id": "bob", "info": {"name": "Bob"}},
        }
        assert a.recv() == join_bob
        assert b.recv() == join_bob
        perform(b, ident, "leave")
        assert a.recv() == {"type": "presence", "identifier": ident, "message": {"type": "leave", "id": "bob"}}
        a.send({"command": "presence", "identifier": ident})
        info = a.recv()["message"]
        assert (info["type"], info["total"], info["records"]) == ("info", 1, [{"id": "ann", "info": {"name": "Ann"}}])


def test_signed_stream_checked_by_the_channel(stack: Stack) -> None:
    stream = unique("s")
    good, bad = kit(signed=sign_stream(stream, SECRET)), kit(signed=sign_stream(stream, "another secret"))
    with stack.user("ann") as c:
        assert c.subscribe(bad) == {"identifier": bad, "type": "reject_subscription"}
        assert c.subscribe(good) == {"identifier": good, "type": "confirm_subscription"}
        status, body = stack.server.broadcast({"stream": stream, "data": '{"n":1}'}, key=BROADCAST_KEY)
        assert status == 201, body
        assert c.recv()["message"] == {"n": 1}


def test_signed_name_minted_by_the_kit_is_accepted_by_the_server(stack: Stack) -> None:
    """The server's own $pubsub channel verifies names signed with kit.sign_stream (no RPC)."""
    stream = unique("s")
    ident = json.dumps({"channel": "$pubsub", "signed_stream_name": sign_stream(stream, SECRET)}, separators=(",", ":"))
    with stack.user("ann") as c:
        sid = c.welcome["sid"]  # type: ignore[index]
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        assert stack.backend.calls("command", sid) == []


def test_remote_disconnect_published_by_a_channel(stack: Stack) -> None:
    name = unique("u")
    with stack.user(name) as a, stack.user(name) as a2, stack.user("bystander") as other:
        ident = kit(stream=unique())
        a.subscribe(ident)
        perform(a, ident, "disconnect_me", reconnect=False)
        remote = [{"type": "disconnect", "reason": "remote", "reconnect": False}]
        assert close_of(a) == (1000, "Closed remotely", remote)
        assert close_of(a2) == (1000, "Closed remotely", remote)
        other.send({"command": "ping"})
        assert other.recv() == {"type": "pong"}


def test_jwt_minted_by_the_kit_identifies_without_connect(stack: Stack) -> None:
    token = issue_token({"user": "jo"}, SECRET, expires_in=60)
    room = unique()
    with Client(f"{stack.server.url}?jid={token}", protocol=EXT) as c:
        sid = c.expect_welcome()["sid"]
        assert c.subscribe(chat(room))["type"] == "confirm_subscription"
        assert c.recv()["message"] == {"hello": "jo"}
        assert stack.backend.calls("connect", sid) == []
        [call] = stack.backend.calls("command", sid)
        assert call["body"]["connection_identifiers"] == '{"user":"jo"}'


def test_expired_jwt_minted_by_the_kit_is_refused(stack: Stack) -> None:
    token = issue_token({"user": "jo"}, SECRET, expires_in=60, clock=lambda: 1_000_000_000.0)
    with Client(f"{stack.server.url}?jid={token}", protocol=EXT) as c:
        expired = [{"type": "disconnect", "reason": "token_expired", "reconnect": False}]
        assert close_of(c) == (1000, "Auth Failed", expired)


def test_kit_and_publisher_import_neither_gevent_nor_redis() -> None:
    """They must run in any WSGI stack (gunicorn sync workers, Django): no gevent, and redis
    only when a Redis publisher is built."""
    code = (
        "import sys, anycable_gevent.application, anycable_gevent.publisher; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'redis', 'configargparse', 'geventwebsocket') "
        "or m in ('anycable_gevent.config', 'anycable_gevent.node', 'anycable_gevent.server')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
