"""Two nodes (two server processes) on one Redis pub/sub, without a broker (fan-out only).

What pub/sub alone must do: a publication POSTed to either node reaches the subscribers
of both exactly once, remote commands reach every node, and the listener survives Redis
going away, a killed connection and a connection that went deaf. Offsets, history and
gap repair need the Redis broker (tests/system/test_redis_nodes.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis
from helpers import EXT, Server, connected, counter, pubsub_id, wait_for
from redis_helpers import REDIS_URL, PrivateRedis, delete_prefix, kill_pubsub_connections, unique_prefix
from tcp_proxy import Proxy


def node_args(url: str, prefix: str, *extra: str) -> list[str]:
    return [
        "--public_streams",
        "--noauth",
        "--broker=none",
        "--pubsub=redis",
        f"--redis_url={url}",
        f"--redis_prefix={prefix}",
        "--metrics_http=/metrics",
        *extra,
    ]


def healthy(srv: Server) -> bool:
    return srv.get("/health")[0] == 200


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Server, Server]]:
    prefix = unique_prefix()
    with Server(*node_args(REDIS_URL, prefix)) as a, Server(*node_args(REDIS_URL, prefix)) as b:
        yield a, b
    delete_prefix(REDIS_URL, prefix)


def test_a_publication_to_either_node_reaches_both_exactly_once(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(a, protocol=EXT) as ca, connected(b, protocol=EXT) as cb:
        for c in (ca, cb):
            assert c.subscribe(pubsub_id("both"))["type"] == "confirm_subscription"
        a.publish("both", {"n": 1})
        b.publish("both", {"n": 2})
        for c in (ca, cb):
            got = sorted(c.recv()["message"]["n"] for _ in range(2))
            assert got == [1, 2]
            c.nothing(0.5)


def test_a_batch_keeps_its_order_on_the_other_node(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(b, protocol=EXT) as cb:
        assert cb.subscribe(pubsub_id("order"))["type"] == "confirm_subscription"
        status, _ = a.broadcast([{"stream": "order", "data": json.dumps(i)} for i in range(50)])
        assert status == 201
        assert [cb.recv()["message"] for _ in range(50)] == list(range(50))


def test_remote_disconnect_reaches_a_client_on_the_other_node(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(b, protocol=EXT) as cb:
        ident = json.dumps({"sid": cb.welcome["sid"]}, separators=(",", ":"))  # type: ignore[index]
        status, _ = a.broadcast({"command": "disconnect", "payload": {"identifier": ident, "reconnect": False}})
        assert status == 201
        assert cb.recv() == {"type": "disconnect", "reason": "remote", "reconnect": False}


def test_exclude_socket_works_across_nodes(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    with connected(b, protocol=EXT) as me, connected(b, protocol=EXT) as other, connected(a, protocol=EXT) as far:
        for c in (me, other, far):
            assert c.subscribe(pubsub_id("ex"))["type"] == "confirm_subscription"
        a.publish("ex", "to others", exclude_socket=me.welcome["sid"])  # type: ignore[index]
        assert other.recv()["message"] == "to others"
        assert far.recv()["message"] == "to others"
        me.nothing(0.5)


def test_whispers_reach_the_other_node(nodes: tuple[Server, Server]) -> None:
    a, b = nodes
    ident = pubsub_id("whisper/room")
    with connected(a, protocol=EXT) as talker, connected(b, protocol=EXT) as listener:
        for c in (talker, listener):
            assert c.subscribe(ident)["type"] == "confirm_subscription"
        time.sleep(0.2)
        talker.send({"command": "whisper", "identifier": ident, "data": {"typing": True}})
        assert listener.recv() == {"identifier": ident, "message": {"typing": True}}
        talker.nothing(0.5)


def test_channels_are_unsubscribed_after_the_last_local_subscriber(nodes: tuple[Server, Server]) -> None:
    a, _ = nodes
    client = redis.Redis.from_url(REDIS_URL)
    prefix = next(arg.split("=", 1)[1] for arg in a.args if arg.startswith("--redis_prefix="))
    channel = f"{prefix}{{refcount}}:c".encode()
    with connected(a, protocol=EXT) as c1, connected(a, protocol=EXT) as c2:
        for c in (c1, c2):
            assert c.subscribe(pubsub_id("refcount"))["type"] == "confirm_subscription"
        wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 1, what="one subscription for two clients")
        c1.send({"command": "unsubscribe", "identifier": pubsub_id("refcount")})
        time.sleep(0.3)
        assert client.pubsub_numsub(channel)[0][1] == 1  # c2 still there
        c2.send({"command": "unsubscribe", "identifier": pubsub_id("refcount")})
        wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 0, what="the channel to be unsubscribed")


# ---------------------------------------------------------------------- failures


def test_redis_down_gives_503_and_the_node_recovers_without_a_restart(make_server: type[Server]) -> None:
    with PrivateRedis() as r:
        prefix = unique_prefix()
        a = make_server(*node_args(r.url, prefix, "--redis_keepalive_interval=1")).start()
        with connected(a, protocol=EXT) as c:
            assert c.subscribe(pubsub_id("down"))["type"] == "confirm_subscription"
            r.stop()
            wait_for(lambda: not healthy(a), what="/health to fail")
            status, body = a.get("/health")
            assert status == 503 and "redis pubsub" in body
            status, reply = a.broadcast({"stream": "down", "data": '"lost?"'})
            assert status == 503 and reply["error"] == "unavailable"
            r.start()
            wait_for(lambda: healthy(a), what="/health to recover")
            a.publish("down", "back")
            assert c.recv()["message"] == "back"  # the same connection, never closed
        assert counter(a, "pubsub_reconnects_total") >= 1


def test_a_node_started_while_redis_is_down_recovers(make_server: type[Server]) -> None:
    r = PrivateRedis()
    try:
        prefix = unique_prefix()
        srv = make_server(*node_args(r.url, prefix))
        srv.start_unhealthy()
        status, body = srv.get("/health")
        assert status == 503 and "redis pubsub" in body
        assert "redis pubsub connection lost" in srv.output() or "connecting" in body
        r.start()
        wait_for(lambda: healthy(srv), what="/health to recover")
        with connected(srv, protocol=EXT) as c:
            assert c.subscribe(pubsub_id("late"))["type"] == "confirm_subscription"
            srv.publish("late", "hello")
            assert c.recv()["message"] == "hello"
    finally:
        r.__exit__(None, None, None)


def test_a_killed_pubsub_connection_is_remade_and_resubscribed(make_server: type[Server]) -> None:
    prefix = unique_prefix()
    a = make_server(*node_args(REDIS_URL, prefix)).start()
    try:
        with connected(a, protocol=EXT) as c:
            assert c.subscribe(pubsub_id("killed"))["type"] == "confirm_subscription"
            client = redis.Redis.from_url(REDIS_URL)
            channel = f"{prefix}{{killed}}:c".encode()
            wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 1, what="the subscription")
            assert a.proc is not None
            assert kill_pubsub_connections(REDIS_URL, a.proc.pid) == 1
            wait_for(lambda: counter(a, "pubsub_reconnects_total") >= 1, what="a reconnect")
            wait_for(lambda: client.pubsub_numsub(channel)[0][1] == 1, what="the resubscription")
            a.publish("killed", "again")
            assert c.recv()["message"] == "again"
    finally:
        delete_prefix(REDIS_URL, prefix)


def test_a_deaf_pubsub_connection_is_detected_and_remade(make_server: type[Server]) -> None:
    prefix = unique_prefix()
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    with Proxy(port) as proxy:
        a = make_server(*node_args(proxy.url, prefix, "--redis_keepalive_interval=1")).start()
        try:
            with connected(a, protocol=EXT) as c:
                assert c.subscribe(pubsub_id("deaf"))["type"] == "confirm_subscription"
                time.sleep(0.3)
                assert proxy.deafen() == 1
                wait_for(lambda: counter(a, "pubsub_reconnects_total") >= 1, what="the deaf connection to be remade")
                wait_for(lambda: healthy(a), what="/health")
                a.publish("deaf", "heard")
                assert c.recv()["message"] == "heard"
        finally:
            delete_prefix(REDIS_URL, prefix)
