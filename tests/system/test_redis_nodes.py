"""Two nodes (two server processes) sharing one Redis: broker, pub/sub and broadcasters.

Every broker guarantee must hold across nodes: one offset and epoch per message whatever
node took the publication, history and sessions readable from any node (a sid restores
once in the cluster), presence shared, and exactly-once delivery in order while clients
move between nodes, while Redis restarts, and while pub/sub loses messages on the way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from drills import Drill, Publisher, check_exactly_once
from helpers import EXT, Client, Server, connected, counter, pubsub_id, wait_for
from redis_helpers import REDIS_URL, PrivateRedis, delete_prefix, kill_pubsub_connections, unique_prefix


def node_args(url: str, prefix: str, *extra: str) -> list[str]:
    return [
        "--public_streams",
        "--noauth",
        "--broker=redis",
        f"--redis_url={url}",
        f"--redis_prefix={prefix}",
        "--metrics_http=/metrics",
        "--sessions_ttl=60",
        *extra,
    ]


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Server, Server]]:
    prefix = unique_prefix()
    extra = ["--broadcast_adapter=http,redisx,redis", f"--redisx_stream={prefix}x", f"--redis_channel={prefix}legacy"]
    with Server(*node_args(REDIS_URL, prefix, *extra)) as a, Server(*node_args(REDIS_URL, prefix, *extra)) as b:
        a.prefix = prefix  # type: ignore[attr-defined]
        yield a, b
    delete_prefix(REDIS_URL, prefix)


def test_one_offset_per_message_whichever_node_took_it(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(a, protocol=EXT) as ca, connected(b, protocol=EXT) as cb:
        for c in (ca, cb):
            assert c.subscribe(pubsub_id("shared"))["type"] == "confirm_subscription"
        a.publish("shared", "one")
        b.publish("shared", "two")
        got_a = [ca.recv() for _ in range(2)]
        got_b = [cb.recv() for _ in range(2)]
        positions = [(m["message"], m["epoch"], m["offset"]) for m in got_a]
        assert positions == [(m["message"], m["epoch"], m["offset"]) for m in got_b]
        assert [p[2] for p in positions] == [1, 2] and positions[0][1] == positions[1][1]
        ca.nothing(0.3)
        cb.nothing(0.3)


def test_history_on_one_node_of_what_was_posted_to_the_other(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    for i in range(3):
        a.publish("hist/x", i)
    with connected(b, protocol=EXT) as c:
        msg = c.subscribe(pubsub_id("hist/x"), history={"since": int(time.time()) - 60})
        assert msg["type"] == "confirm_subscription"
        got = [c.recv() for _ in range(4)]
        assert [m.get("message") for m in got[:3]] == [0, 1, 2]
        assert got[3] == {"type": "confirm_history", "identifier": pubsub_id("hist/x")}


def test_a_session_opened_on_one_node_restores_on_the_other_once(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(a, protocol=EXT) as c:
        assert c.subscribe(pubsub_id("moving"))["type"] == "confirm_subscription"
        sid = c.welcome["sid"]  # type: ignore[index]
    time.sleep(0.3)
    a.publish("moving", "while away")
    restored = Client(f"{b.url}?sid={sid}", protocol=EXT)
    try:
        welcome = restored.recv()
        assert welcome["restored"] is True and welcome["restored_ids"] == [pubsub_id("moving")]
        restored.send({"command": "history", "identifier": pubsub_id("moving"), "history": {"since": 1}})
        assert restored.recv()["message"] == "while away"
        assert restored.recv()["type"] == "confirm_history"
        a.publish("moving", "live on b")
        assert restored.recv()["message"] == "live on b"
    finally:
        restored.close()
    again = Client(f"{a.url}?sid={sid}", protocol=EXT)
    try:
        assert "restored" not in again.recv()  # taken already: a new session
    finally:
        again.close()


def test_remote_disconnect_and_exclude_socket_across_nodes(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(b, protocol=EXT) as me, connected(a, protocol=EXT) as other:
        for c in (me, other):
            assert c.subscribe(pubsub_id("ex2"))["type"] == "confirm_subscription"
        a.publish("ex2", "not me", exclude_socket=me.welcome["sid"])  # type: ignore[index]
        assert other.recv()["message"] == "not me"
        me.nothing(0.5)
        ident = json.dumps({"sid": me.welcome["sid"]}, separators=(",", ":"))  # type: ignore[index]
        status, _ = a.broadcast({"command": "disconnect", "payload": {"identifier": ident, "reconnect": True}})
        assert status == 201
        assert me.recv() == {"type": "disconnect", "reason": "remote", "reconnect": True}


def test_redisx_and_legacy_redis_publications_reach_both_nodes(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    prefix = a.prefix  # type: ignore[attr-defined]
    client = redis.Redis.from_url(REDIS_URL)
    with connected(a, protocol=EXT) as ca, connected(b, protocol=EXT) as cb:
        for c in (ca, cb):
            assert c.subscribe(pubsub_id("via/redis"))["type"] == "confirm_subscription"
        client.xadd(f"{prefix}x", {"payload": json.dumps({"stream": "via/redis", "data": '"x1"'})})
        for c in (ca, cb):
            msg = c.recv()
            assert (msg["message"], msg["offset"]) == ("x1", 1)  # registered once, by one node
        client.publish(f"{prefix}legacy", json.dumps({"stream": "via/redis", "data": '"fanout"'}))
        for c in (ca, cb):
            msg = c.recv()
            assert msg["message"] == "fanout" and "offset" not in msg  # every node got it itself
        ca.nothing(0.3)
        cb.nothing(0.3)


def test_presence_is_seen_from_both_nodes(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    ident = pubsub_id("room/p")
    with connected(a, protocol=EXT) as ca, connected(b, protocol=EXT) as cb:
        for c in (ca, cb):
            assert c.subscribe(ident)["type"] == "confirm_subscription"
        ca.send({"command": "join", "identifier": ident, "presence": {"id": "42", "info": {"name": "Jack"}}})
        for c in (ca, cb):
            assert c.recv() == {
                "type": "presence",
                "identifier": ident,
                "message": {"type": "join", "id": "42", "info": {"name": "Jack"}},
            }
        cb.send({"command": "presence", "identifier": ident})
        info = cb.recv()
        assert info["message"]["total"] == 1 and info["message"]["records"] == [{"id": "42", "info": {"name": "Jack"}}]


def test_every_message_exactly_once_while_clients_move_between_nodes(nodes: tuple[Server, Server]) -> None:
    """Two publishers post to both nodes; half the official JS clients drop now and then and
    restore on whichever node they reach next."""
    a, b = nodes
    streams = [f"drill/{i}" for i in range(4)]
    with Drill([a.url, b.url], 24, "--stream=drill", "--streams=4", "--reconnect-delay=100") as drill:
        drill.wait("ready")
        pubs = [
            Publisher([a.broadcast_url, b.broadcast_url], streams, rate=40).start(),
        ]
        for _ in range(3):
            time.sleep(1.0)
            drill.send({"cmd": "drop", "fraction": 0.5})
        time.sleep(1.5)
        for p in pubs:
            p.stop()
        time.sleep(2.5)
        clients = drill.report()
    expected = pubs[0].accepted
    problems = check_exactly_once(clients, expected, lambda c: c["stream"])
    assert problems == [], problems
    assert sum(c["restores"] for c in clients) >= 12


# ---------------------------------------------------------------------- faults


def test_a_message_lost_between_redis_and_one_node_is_repaired(make_server: type[Server]) -> None:
    """CLIENT KILL of one node's pub/sub connection while publishing: what it missed meanwhile
    (and the last message, which nothing follows) comes from the broker, in order."""
    prefix = unique_prefix()
    try:
        a = make_server(*node_args(REDIS_URL, prefix)).start()
        b = make_server(*node_args(REDIS_URL, prefix)).start()
        with connected(b, protocol=EXT) as cb:
            assert cb.subscribe(pubsub_id("lossy"))["type"] == "confirm_subscription"
            for i in range(1, 6):
                a.publish("lossy", i)
            got = [cb.recv()["message"] for _ in range(5)]
            assert b.proc is not None
            assert kill_pubsub_connections(REDIS_URL, b.proc.pid) == 1
            for i in range(6, 21):
                a.publish("lossy", i)
            while len(got) < 20:
                got.append(cb.recv(timeout=30)["message"])
            assert got == list(range(1, 21))
            cb.nothing(0.5)
        assert counter(b, "pubsub_repaired_total") >= 1
    finally:
        delete_prefix(REDIS_URL, prefix)


@pytest.mark.parametrize("persistence", [True, False], ids=["with-persistence", "without-persistence"])
def test_redis_restarts_mid_stream(make_server: type[Server], persistence: bool) -> None:
    """The official JS client on both nodes, a steady stream, Redis stopped and started again.

    With persistence every accepted message reaches every client once, in order. Without it
    the streams start a new epoch: old positions get reject_history, live delivery goes on,
    and still no client gets a message twice or out of order.
    """
    with PrivateRedis(persistence=persistence) as r:
        prefix = unique_prefix()
        args = node_args(r.url, prefix, "--redis_keepalive_interval=1")
        a = make_server(*args).start()
        b = make_server(*args).start()
        streams = [f"restart/{i}" for i in range(2)]
        with Drill([a.url, b.url], 8, "--stream=restart", "--streams=2", "--reconnect-delay=200") as drill:
            drill.wait("ready")
            pub = Publisher([a.broadcast_url, b.broadcast_url], streams, rate=30).start()
            time.sleep(1.5)
            r.restart(down_for=1.0)
            wait_for(lambda: a.get("/health")[0] == 200 and b.get("/health")[0] == 200, what="recovery")
            time.sleep(2.0)
            pub.stop()
            time.sleep(2.5)
            clients = drill.report()
        assert pub.retries > 0  # some publications were refused (503) while Redis was down
        if persistence:
            assert check_exactly_once(clients, pub.accepted, lambda c: c["stream"], pub.attempts) == []
        else:
            for c in clients:
                got, tries = c["got"], pub.attempts[c["stream"]]
                assert all(got.count(n) <= tries.get(n, 1) for n in got), f"duplicates for client {c['i']}"
                assert got == sorted(got), f"out of order for client {c['i']}"
                metas = [tuple(m) for m in c["metas"] if m]
                assert len(metas) == len(set(metas)), f"an offset twice for client {c['i']}"
                # live delivery resumed after the restart: the last accepted messages arrived
                assert got[-1] == pub.accepted[c["stream"]][-1]
                epochs = {m[0] for m in c["metas"] if m}
                assert len(epochs) == 2  # the new epoch after the data loss
