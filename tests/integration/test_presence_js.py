"""The official JS client's presence API (@anycable/core 1.1.7) against this server.

``channel.presence.join(id, info)``, ``channel.presence.info()``, ``channel.presence.leave()``
and the channel's ``presence`` events, driven through ``tests/js/stream_client.mjs``; and
what the client does on its own after a dropped connection is restored (it joins again),
which must not make other subscribers see the user leave and come back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import EXT, Server, pubsub_id
from jsclient import JSClient

pytestmark = pytest.mark.js

TTL = 2
_names = itertools.count(1)


@pytest.fixture(scope="module")
def cable() -> Iterator[Server]:
    with Server("--noauth", "--public_streams", "--sessions_ttl=60", f"--presence_ttl={TTL}") as srv:
        yield srv


@pytest.fixture
def js() -> Iterator[Any]:
    started: list[JSClient] = []

    def start(url: str, **kwargs: Any) -> JSClient:
        client = JSClient(url, count=0, timeout=60, protocol=EXT, control=True, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.stop()


def presence_events(client: JSClient) -> list[dict[str, Any]]:
    """Join and leave events the client's channel got (not the info replies)."""
    return [e["message"] for e in client.of("presence") if e["message"].get("type") in ("join", "leave")]


def test_join_info_and_leave(cable: Server, js: Any) -> None:
    stream = f"js-presence-{next(_names)}-{time.monotonic_ns()}"
    jack = js(cable.url, stream=stream, frames=True)
    mia = js(cable.url, stream=stream)
    jack.wait_for("subscribed")
    mia.wait_for("subscribed")

    jack.send("join", id="42", info={"name": "Jack"})
    join = {"type": "join", "id": "42", "info": {"name": "Jack"}}
    jack.wait_for("presence", message=join)  # the sender too
    mia.wait_for("presence", message=join)
    assert {"command": "join", "identifier": pubsub_id(stream), "presence": {"id": "42", "info": {"name": "Jack"}}} in (
        jack.frames("out")
    )

    mia.send("presence")
    assert mia.wait_for("presence_state")["state"] == {"42": {"name": "Jack"}}

    jack.send("leave")
    mia.wait_for("presence", message={"type": "leave", "id": "42"})
    jack.wait_for("presence", message={"type": "leave", "id": "42"})


def test_restored_client_joins_again_without_leave_and_join(cable: Server, js: Any) -> None:
    stream = f"js-presence-restore-{next(_names)}-{time.monotonic_ns()}"
    jack = js(cable.url, stream=stream, frames=True, reconnect_delay=100)
    mia = js(cable.url, stream=stream)
    jack.wait_for("subscribed")
    mia.wait_for("subscribed")
    jack.send("join", id="42", info={"name": "Jack"})
    mia.wait_for("presence", message={"type": "join", "id": "42", "info": {"name": "Jack"}})

    jack.send("drop")
    jack.wait_for("connected", timeout=15, restored=True)
    # @anycable/core joins again by itself once the session is restored (FRAMES.md, SPEC §4.9)
    joins = [f for f in jack.frames("out") if isinstance(f, dict) and f.get("command") == "join"]
    assert len(joins) == 2, joins
    time.sleep(TTL + 1.5)  # the dropped connection's presence has expired by now
    assert presence_events(mia) == [{"type": "join", "id": "42", "info": {"name": "Jack"}}]
    mia.send("presence")
    assert mia.wait_for("presence_state")["state"] == {"42": {"name": "Jack"}}
