"""The chat example (scripts/examples/chat/app.py) run as its README says, next to the real server,
reached by the official JS client and by plain WebSocket clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import EXT, ROOT, Client, Server, close_of, free_port
from jsclient import ChatJSClient

SECRET = "chat-example-secret-3b9f2d7a61c04e58"
APP = ROOT / "scripts" / "examples" / "chat" / "app.py"


def chat(room: str) -> str:
    return json.dumps({"channel": "ChatChannel", "room": room}, separators=(",", ":"))


class Example:
    """``python scripts/examples/chat/app.py`` and ``anycable-gevent --rpc_host=…/_anycable --secret=…``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = Server(f"--secret={SECRET}", f"--rpc_host=http://127.0.0.1:{self.port}/_anycable")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Example:
        env = {**os.environ, "ANYCABLE_SECRET": SECRET}
        cmd = [sys.executable, str(APP), f"--port={self.port}", f"--broadcast-url={self.server.broadcast_url}"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = json.loads(self.proc.stdout.readline())
        assert line == {"event": "listening", "url": f"http://127.0.0.1:{self.port}"}
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.__exit__(None, None, None)
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()

    def login(self, name: str) -> tuple[str, str]:
        """(JWT, Cookie header value) for ``name``."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/login",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = json.loads(resp.read())
            cookie = resp.headers["Set-Cookie"].split(";", 1)[0]
        assert body["user"] == name
        return body["token"], cookie


@pytest.fixture(scope="module")
def example() -> Iterator[Example]:
    ex = Example().start()
    try:
        yield ex
    finally:
        ex.stop()


def speak(c: Client, room: str, text: str, **extra: Any) -> None:
    data = json.dumps({"action": "speak", "text": text, **extra})
    c.send({"command": "message", "identifier": chat(room), "data": data})


@pytest.mark.js
def test_official_clients_chat_through_the_example(example: Example) -> None:
    room = f"r{uuid.uuid4().hex[:8]}"
    token, _ = example.login("ann")
    _, bob_cookie = example.login("bob")
    ann = ChatJSClient(f"{example.server.url}?jid={token}", room)  # JWT: no Connect call
    bob = ChatJSClient(example.server.url, room, cookie=bob_cookie)  # cookie: Connect call
    try:
        for c in (ann, bob):
            c.wait_for("subscribed")
        ann.send("speak", text="hi all")
        for c in (ann, bob):
            assert c.wait_for("message")["data"] == {"user": "ann", "text": "hi all"}
        bob.send("speak", text="just ann", to_others=True)
        assert ann.wait_for("message")["data"] == {"user": "bob", "text": "just ann"}
        ann.send("speak", text="done")
        assert bob.wait_for("message")["data"] == {"user": "ann", "text": "done"}
        # bob's to_others message never reached bob: the next one he got was ann's "done"
        assert [e["data"] for e in bob.of("message")] == [
            {"user": "ann", "text": "hi all"},
            {"user": "ann", "text": "done"},
        ]
        assert not ann.of("error") and not bob.of("error"), ann.report() + bob.report()
    finally:
        ann.stop()
        bob.stop()


def test_cookie_identifies_and_to_others_skips_the_sender(example: Example) -> None:
    room = f"r{uuid.uuid4().hex[:8]}"
    _, cy_cookie = example.login("cy")
    token, _ = example.login("dee")
    with (
        Client(example.server.url, protocol=EXT, headers={"Cookie": cy_cookie}) as cy,
        Client(f"{example.server.url}?jid={token}", protocol=EXT) as dee,
    ):
        for c in (cy, dee):
            c.expect_welcome()
            assert c.subscribe(chat(room)) == {"identifier": chat(room), "type": "confirm_subscription"}
        speak(cy, room, "hello", to_others=True)
        assert dee.recv()["message"] == {"user": "cy", "text": "hello"}
        cy.nothing(0.3)
        speak(dee, room, "hi")
        assert cy.recv()["message"] == {"user": "dee", "text": "hi"}
        assert dee.recv()["message"] == {"user": "dee", "text": "hi"}


def test_without_credentials_the_connection_is_rejected(example: Example) -> None:
    forged = 'chat_user="ImV2ZSI=--0000"'
    for headers in ({}, {"Cookie": forged}):
        with Client(example.server.url, protocol=EXT, headers=headers) as c:
            rejected = [{"type": "disconnect", "reason": "unauthorized", "reconnect": False}]
            assert close_of(c) == (1000, "Auth Failed", rejected)


def test_bad_room_and_empty_text_are_refused(example: Example) -> None:
    token, _ = example.login("eve")
    room = f"r{uuid.uuid4().hex[:8]}"
    with Client(f"{example.server.url}?jid={token}", protocol=EXT) as c:
        c.expect_welcome()
        bad = chat("no spaces allowed")
        assert c.subscribe(bad) == {"identifier": bad, "type": "reject_subscription"}
        c.subscribe(chat(room))
        speak(c, room, "   ")
        c.nothing(0.3)
        speak(c, room, "ok")  # the connection is still usable
        assert c.recv()["message"] == {"user": "eve", "text": "ok"}
