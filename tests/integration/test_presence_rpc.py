"""Presence asked for by an RPC backend (SPEC §3.9 step 7, §8.3 ``presence``).

``@anycable/serverless-js`` 0.1.0 cannot return presence from a channel, so a scripted
Python backend plays a Rails channel that calls ``join_presence``/``leave_presence``:
its command replies carry ``presence: {type, id, info}`` with ``info`` JSON-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Client, Server
from rpc_backend import PyBackend, Reply, Request, welcome_script

ROOM = "rpc-presence-room"


def chat_id(user: str) -> str:
    return json.dumps({"channel": "ChatChannel", "user": user}, separators=(",", ":"))


def plain_id(user: str) -> str:
    return json.dumps({"channel": "PlainChannel", "user": user}, separators=(",", ":"))


def chat_channel(req: Request) -> Reply:
    """ChatChannel streams from ROOM with presence; PlainChannel asks for presence without ``$p``."""
    if req.method != "command":
        return welcome_script(req)
    ident = req.body["identifier"]
    params = json.loads(ident)
    user = params["user"]
    command = req.body["command"]
    if command == "subscribe":
        reply: dict[str, Any] = {
            "status": 1,
            "transmissions": [json.dumps({"identifier": ident, "type": "confirm_subscription"})],
            "streams": [ROOM],
            "presence": {"type": "join", "id": user, "info": json.dumps({"name": user.title()})},
        }
        if params["channel"] == "ChatChannel":
            reply["env"] = {"istate": {"$p": ROOM}}
        return Reply(reply)
    if command == "message":
        action = json.loads(req.body["data"])["action"]
        if action == "away":
            return Reply({"status": 1, "presence": {"type": "leave", "id": user}})
        if action == "rename":
            info = json.dumps({"name": f"{user.title()} (renamed)"})
            return Reply(
                {
                    "status": 1,
                    "transmissions": ['{"renamed":true}'],
                    "presence": {"type": "join", "id": user, "info": info},
                }
            )
    return Reply({"status": 1})


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with PyBackend(chat_channel) as backend, Server(f"--rpc_host={backend.rpc_host}") as s:
        yield s


def event(ident: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"type": "presence", "identifier": ident, "message": message}


def perform(c: Client, ident: str, action: str) -> None:
    c.send({"command": "message", "identifier": ident, "data": json.dumps({"action": action})})


def test_backend_joins_and_leaves_for_the_client(srv: Server) -> None:
    jack, mia = chat_id("jack"), chat_id("mia")
    with Client(srv.url) as a, Client(srv.url) as b:
        a.expect_welcome()
        b.expect_welcome()
        assert a.subscribe(jack)["type"] == "confirm_subscription"
        # info arrives JSON-encoded from RPC and reaches clients as a JSON value
        assert a.recv() == event(jack, {"type": "join", "id": "jack", "info": {"name": "Jack"}})
        assert b.subscribe(mia)["type"] == "confirm_subscription"
        assert a.recv() == event(jack, {"type": "join", "id": "mia", "info": {"name": "Mia"}})
        assert b.recv() == event(mia, {"type": "join", "id": "mia", "info": {"name": "Mia"}})
        perform(a, jack, "rename")  # same id again: transmissions, no event, the new info wins
        assert a.recv() == {"renamed": True}
        b.nothing(0.3)
        b.send({"command": "presence", "identifier": mia})
        assert b.recv() == event(
            mia,
            {
                "type": "info",
                "total": 2,
                "records": [{"id": "jack", "info": {"name": "Jack (renamed)"}}, {"id": "mia", "info": {"name": "Mia"}}],
            },
        )
        perform(b, mia, "away")
        assert a.recv() == event(jack, {"type": "leave", "id": "mia"})
        assert b.recv() == event(mia, {"type": "leave", "id": "mia"})


def test_backend_presence_needs_a_presence_stream(srv: Server) -> None:
    with Client(srv.url) as observer, Client(srv.url) as c:
        observer.expect_welcome()
        c.expect_welcome()
        ident = chat_id("watcher")
        assert observer.subscribe(ident)["type"] == "confirm_subscription"
        assert observer.recv()["message"]["type"] == "join"  # its own
        # streams from the same room, but its channel state names no presence stream
        assert c.subscribe(plain_id("ghost"))["type"] == "confirm_subscription"
        c.nothing(0.3)
        observer.nothing(0.2)
