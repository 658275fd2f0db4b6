"""The first thing a user does: connect, subscribe to a public stream, receive a broadcast."""

from __future__ import annotations

import time

from helpers import EXT, Client, Server, connected, pubsub_id


def test_welcome_subscribe_broadcast(server: Server) -> None:
    with connected(server) as c:
        assert c.subprotocol == EXT
        assert c.welcome is not None and len(c.welcome["sid"]) >= 22
        ident = pubsub_id("smoke")
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        server.publish("smoke", {"text": "hi"})
        msg = c.recv()
        assert msg["identifier"] == ident
        assert msg["message"] == {"text": "hi"}
        assert msg["stream_id"] == "smoke" and msg["offset"] >= 1 and msg["epoch"]


def test_health(server: Server) -> None:
    status, body = server.get("/health")
    assert status == 200
    assert body == "Ah, ha, ha, ha, stayin' alive, stayin' alive."


def test_version_header(server: Server) -> None:
    c = Client(server.url)
    try:
        assert c.ws.getheaders().get("x-anycable-version")
    finally:
        c.close()


def test_pings(server: Server) -> None:
    with connected(server) as c:
        first = c.recv(5, pings=True)
        second = c.recv(5, pings=True)
        assert first["type"] == second["type"] == "ping"
        assert isinstance(first["message"], int) and second["message"] > first["message"]
        assert abs(first["message"] - time.time()) < 10
