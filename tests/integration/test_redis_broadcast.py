"""Redis broadcast adapters (SPEC §6.4, §6.5) against the real server and a real Redis.

* ``redis`` (legacy): ``PUBLISH <channel> <publication>`` is fanned out to local clients,
  without offsets; invalid payloads are counted; the listener survives a Redis restart.
* ``redisx``: ``XADD <stream> * payload <publication>`` is registered once (offsets, epoch),
  acknowledged and deleted afterwards; poison entries never block; entries written before
  the server started, or pending at a dead consumer, are delivered; two servers share the
  group; a server that starts while Redis is down recovers.

The shared Redis (``REDIS_URL``) is never stopped or flushed: every stream, channel and key
prefix is unique to its test and deleted afterwards; tests that stop Redis run their own
``redis-server`` on a free port. Servers run single-node (``--broker=memory --pubsub=none``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from helpers import Client, Server, connected, counter, pubsub_id, wait_for
from redis_helpers import REDIS_URL, PrivateRedis
from tcp_proxy import Proxy

from anycable_gevent.broadcast.redisx import GROUP, remove_stale_consumers

#: the stream and channel of the module's server (``srv``)
X_STREAM, CHANNEL = f"__bcast_test_x-{uuid.uuid4().hex[:10]}", f"__bcast_test_c-{uuid.uuid4().hex[:10]}"
SINGLE = ("--public_streams", "--noauth", "--broker=memory", "--pubsub=none", "--metrics_http=/metrics")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def publication(stream: str, data: Any, **meta: Any) -> str:
    body: dict[str, Any] = {"stream": stream, "data": json.dumps(data)}
    if meta:
        body["meta"] = meta
    return json.dumps(body)


def health(srv: Server) -> tuple[int, str]:
    return srv.get("/health")


def messages(c: Client, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``n`` broadcast frames (frames with a ``message``), skipping the others."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        frame = c.recv(max(deadline - time.monotonic(), 0.01))
        if "message" in frame:
            out.append(frame)
    return out


def subscribed(srv: Server, stream: str, since: int | None = None) -> Client:
    c = Client(srv.url)
    c.expect_welcome()
    frame: dict[str, Any] = {"command": "subscribe", "identifier": pubsub_id(stream)}
    if since is not None:
        frame["history"] = {"since": since}
    c.send(frame)
    assert c.recv()["type"] == "confirm_subscription"
    return c


def stream_state(rds: redis.Redis, stream: str) -> tuple[int, int]:
    """(entries left in the stream, entries pending in the group)."""
    pending = rds.xpending(stream, GROUP)
    return rds.xlen(stream), int(pending["pending"])


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    r = PrivateRedis()
    try:
        yield r
    finally:
        r.__exit__(None, None, None)


@pytest.fixture(scope="module")
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def streams(rds: redis.Redis) -> Iterator[list[str]]:
    """Names of Redis streams a test made; deleted afterwards.

    Ask for it before ``make_server``, so that the servers stop first (a running consumer
    would make a deleted stream again).
    """
    made: list[str] = []
    yield made
    if made:
        rds.delete(*made)


@pytest.fixture(scope="module")
def srv(rds: redis.Redis) -> Iterator[Server]:
    """All three adapters at once (http, redisx, redis) on a stream and channel of its own."""
    with Server(
        *SINGLE,
        "--broadcast_adapter=http,redisx,redis",
        f"--redisx_stream={X_STREAM}",
        f"--redis_channel={CHANNEL}",
        f"--redis_prefix={unique('bcast')}:",
        f"--redis_url={REDIS_URL}",
    ) as s:
        yield s
    rds.delete(X_STREAM)


# ---------------------------------------------------------------------- legacy redis


def test_legacy_publish_reaches_subscribers_without_offsets(srv: Server, rds: redis.Redis) -> None:
    stream = unique("legacy")
    a, b = subscribed(srv, stream), subscribed(srv, stream)
    try:
        assert rds.publish(CHANNEL, publication(stream, {"text": "hi"})) == 1
        for c in (a, b):
            # a fan-out message is not registered: no stream_id, offset or epoch
            assert c.recv() == {"identifier": pubsub_id(stream), "message": {"text": "hi"}}
    finally:
        a.close()
        b.close()


def test_legacy_batch_is_delivered_in_order(srv: Server, rds: redis.Redis) -> None:
    s1, s2 = unique("legacy-a"), unique("legacy-b")
    with connected(srv) as c:
        c.subscribe(pubsub_id(s1))
        c.subscribe(pubsub_id(s2))
        batch = [json.loads(publication(s, n)) for s, n in ((s1, 1), (s2, 2), (s1, 3))]
        rds.publish(CHANNEL, json.dumps(batch))
        frames = messages(c, 3)
        # in order within each stream (streams are fanned out independently)
        assert [f["message"] for f in frames if f["identifier"] == pubsub_id(s1)] == [1, 3]
        assert [f["message"] for f in frames if f["identifier"] == pubsub_id(s2)] == [2]
        assert not any("offset" in f or "epoch" in f for f in frames)


def test_legacy_remote_disconnect_closes_the_connection(srv: Server, rds: redis.Redis) -> None:
    with connected(srv) as target, connected(srv) as other:
        assert target.welcome is not None
        ids = json.dumps({"sid": target.welcome["sid"]}, separators=(",", ":"))
        cmd = {"command": "disconnect", "payload": {"identifier": ids, "reconnect": False}}
        rds.publish(CHANNEL, json.dumps(cmd))
        code, frames = target.closed()
        assert frames == [{"type": "disconnect", "reason": "remote", "reconnect": False}]
        assert code == 1000
        other.send({"command": "ping"})
        assert other.recv() == {"type": "pong"}


def test_legacy_invalid_payload_is_counted_and_the_listener_keeps_going(srv: Server, rds: redis.Redis) -> None:
    stream = unique("legacy-bad")
    before = counter(srv, "failed_broadcast_msg_total")
    with connected(srv) as c:
        c.subscribe(pubsub_id(stream))
        for bad in ("{not json", json.dumps({"stream": stream, "data": 1}), "[]", json.dumps({"command": "nope"})):
            rds.publish(CHANNEL, bad)
        rds.publish(CHANNEL, publication(stream, "still here"))
        assert c.recv()["message"] == "still here"
    assert counter(srv, "failed_broadcast_msg_total") == before + 4


def test_legacy_listener_resubscribes_after_a_redis_restart(
    make_server: type[Server], private_redis: PrivateRedis
) -> None:
    private_redis.start()
    srv = make_server(*SINGLE, "--broadcast_adapter=redis", f"--redis_url={private_redis.url}").start()
    stream = unique("legacy-restart")
    with connected(srv) as c:
        c.subscribe(pubsub_id(stream))
        private_redis.stop()
        wait_for(lambda: health(srv)[0] == 503, what="/health reports the lost connection")
        status, body = health(srv)
        assert "redis broadcaster" in body and "retrying" in body, body
        private_redis.start()
        wait_for(lambda: health(srv)[0] == 200, timeout=15, what="the listener subscribed again")
        client = redis.Redis.from_url(private_redis.url)
        try:
            assert client.publish("__anycable__", publication(stream, "back")) == 1
        finally:
            client.close()
        assert c.recv() == {"identifier": pubsub_id(stream), "message": "back"}
    assert counter(srv, "broadcast_redis_reconnects_total") == 1


def test_legacy_listener_remakes_a_deaf_connection(make_server: type[Server]) -> None:
    port = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    channel, stream = unique("__bcast_test_deaf"), unique("legacy-deaf")
    with Proxy(port) as proxy:
        srv = make_server(
            *SINGLE,
            "--broadcast_adapter=redis",
            f"--redis_channel={channel}",
            f"--redis_url={proxy.url}",
            "--redis_keepalive_interval=0.5",
        ).start()
        with connected(srv) as c:
            c.subscribe(pubsub_id(stream))
            assert proxy.deafen() == 1  # open, but nothing Redis sends reaches the listener
            wait_for(lambda: counter(srv, "broadcast_redis_reconnects_total") == 1, what="a new connection")
            rds = redis.Redis.from_url(REDIS_URL)
            try:
                # the deaf connection is still subscribed at Redis until the proxy closes it
                assert rds.publish(channel, publication(stream, "heard")) >= 1
            finally:
                rds.close()
            assert c.recv() == {"identifier": pubsub_id(stream), "message": "heard"}
        assert "no answer to PING within 0.5s (connection deaf)" in srv.output()


# ---------------------------------------------------------------------- redisx


def test_redisx_entries_reach_subscribers_with_offsets_exactly_once(srv: Server, rds: redis.Redis) -> None:
    stream = unique("x-once")
    before = counter(srv, "publications_total")
    with connected(srv) as c:
        c.subscribe(pubsub_id(stream))
        for n in range(3):
            rds.xadd(X_STREAM, {"payload": publication(stream, {"n": n})})
        frames = messages(c, 3)
        assert [(f["message"], f["stream_id"], f["offset"]) for f in frames] == [
            ({"n": 0}, stream, 1),
            ({"n": 1}, stream, 2),
            ({"n": 2}, stream, 3),
        ]
        assert len({f["epoch"] for f in frames}) == 1 and frames[0]["epoch"]
        # acknowledged: nothing comes again, even after a claim round (every 2 s)
        c.nothing(2.5)
    assert stream_state(rds, X_STREAM) == (0, 0)
    assert counter(srv, "publications_total") == before + 3


def test_redisx_poison_entries_are_dropped_and_the_next_entry_arrives(srv: Server, rds: redis.Redis) -> None:
    stream = unique("x-poison")
    before = counter(srv, "failed_broadcast_msg_total")
    with connected(srv) as c:
        c.subscribe(pubsub_id(stream))
        key = X_STREAM
        rds.xadd(key, {"data": publication(stream, "no payload field")})
        rds.xadd(key, {"payload": "{not json"})
        rds.xadd(key, {"payload": json.dumps({"data": "no stream"})})
        rds.xadd(key, {"payload": publication(stream, "after the poison")})
        frame = c.recv()
        assert (frame["message"], frame["offset"]) == ("after the poison", 1)
    wait_for(lambda: stream_state(rds, key) == (0, 0), what="poison entries acknowledged and deleted")
    assert counter(srv, "failed_broadcast_msg_total") == before + 3


def test_redisx_batch_and_remote_disconnect(srv: Server, rds: redis.Redis) -> None:
    s1, s2 = unique("x-batch-a"), unique("x-batch-b")
    key = X_STREAM
    with connected(srv) as c, connected(srv) as target:
        c.subscribe(pubsub_id(s1))
        c.subscribe(pubsub_id(s2))
        batch = [json.loads(publication(s, n)) for s, n in ((s1, 1), (s2, 2), (s1, 3))]
        rds.xadd(key, {"payload": json.dumps(batch)})
        frames = messages(c, 3)
        # in order within each stream (streams are fanned out independently)
        assert [(f["message"], f["offset"]) for f in frames if f["stream_id"] == s1] == [(1, 1), (3, 2)]
        assert [(f["message"], f["offset"]) for f in frames if f["stream_id"] == s2] == [(2, 1)]

        assert target.welcome is not None
        ids = json.dumps({"sid": target.welcome["sid"]}, separators=(",", ":"))
        rds.xadd(key, {"payload": json.dumps({"command": "disconnect", "payload": {"identifier": ids}})})
        code, closing = target.closed()
        assert closing == [{"type": "disconnect", "reason": "remote", "reconnect": False}]
        assert code == 1000
    wait_for(lambda: stream_state(rds, key) == (0, 0), what="entries acknowledged and deleted")


def test_all_three_adapters_at_once(srv: Server, rds: redis.Redis) -> None:
    stream = unique("x-three")
    with connected(srv) as c:
        c.subscribe(pubsub_id(stream))
        srv.publish(stream, "via http")
        frame = c.recv()
        assert (frame["message"], frame["offset"]) == ("via http", 1)
        rds.xadd(X_STREAM, {"payload": publication(stream, "via redisx")})
        frame = c.recv()
        assert (frame["message"], frame["offset"]) == ("via redisx", 2)
        rds.publish(CHANNEL, publication(stream, "via redis"))
        assert c.recv() == {"identifier": pubsub_id(stream), "message": "via redis"}


def test_redisx_entries_written_before_the_server_started_are_delivered(
    streams: list[str], make_server: type[Server], rds: redis.Redis
) -> None:
    key, stream = unique("__bcast_test_early"), unique("x-early")
    streams.append(key)
    since = int(time.time()) - 5
    for n in range(5):
        rds.xadd(key, {"payload": publication(stream, n)})  # no group, no server yet
    srv = make_server(*SINGLE, "--broadcast_adapter=redisx", f"--redisx_stream={key}", f"--redis_url={REDIS_URL}")
    srv.start()
    wait_for(lambda: stream_state(rds, key) == (0, 0), what="entries consumed")
    # registered in the broker's history, in order
    c = subscribed(srv, stream, since=since)
    try:
        frames = messages(c, 5)
        assert [(f["message"], f["offset"]) for f in frames] == [(n, n + 1) for n in range(5)]
        assert c.recv() == {"type": "confirm_history", "identifier": pubsub_id(stream)}
    finally:
        c.close()
    assert counter(srv, "publications_total") == 5
    srv.stop()
    # a clean shutdown leaves no consumer behind
    assert rds.xinfo_consumers(key, GROUP) == []


def test_redisx_two_servers_share_the_group(streams: list[str], make_server: type[Server], rds: redis.Redis) -> None:
    key, stream = unique("__bcast_test_two"), unique("x-two")
    streams.append(key)
    args = (*SINGLE, "--broadcast_adapter=redisx", f"--redisx_stream={key}", f"--redis_url={REDIS_URL}")
    one, two = make_server(*args).start(), make_server(*args).start()
    clients = [subscribed(one, stream), subscribed(two, stream)]
    n = 60
    try:
        for seq in range(n):
            rds.xadd(key, {"payload": publication(stream, seq)})
        got: list[list[int]] = [[], []]
        deadline = time.monotonic() + 10
        while sum(map(len, got)) < n and time.monotonic() < deadline:
            for i, c in enumerate(clients):
                try:
                    got[i].append(c.recv(0.05)["message"])
                except TimeoutError:
                    pass
        # every entry consumed by exactly one of the two servers
        assert sorted(got[0] + got[1]) == list(range(n)), got
        for c in clients:
            c.nothing(0.3)
    finally:
        for c in clients:
            c.close()
    assert stream_state(rds, key) == (0, 0)
    assert counter(one, "publications_total") + counter(two, "publications_total") == n
    assert len(rds.xinfo_consumers(key, GROUP)) == 2


def test_redisx_entries_pending_at_a_dead_consumer_are_claimed(
    streams: list[str], make_server: type[Server], rds: redis.Redis
) -> None:
    key, stream = unique("__bcast_test_claim"), unique("x-claim")
    streams.append(key)
    rds.xgroup_create(key, GROUP, id="0", mkstream=True)
    since = int(time.time()) - 5
    for n in range(3):
        rds.xadd(key, {"payload": publication(stream, n)})
    # a consumer that read the entries and died before acknowledging them
    taken = rds.xreadgroup(GROUP, "dead-consumer", {key: ">"}, count=10)
    assert len(taken[0][1]) == 3
    read_at = time.monotonic()
    srv = make_server(*SINGLE, "--broadcast_adapter=redisx", f"--redisx_stream={key}", f"--redis_url={REDIS_URL}")
    srv.start()
    c = subscribed(srv, stream, since=since)  # history, then live: each message once either way
    try:
        frames = messages(c, 3)
        assert [(f["message"], f["offset"]) for f in frames] == [(0, 1), (1, 2), (2, 3)]
    finally:
        c.close()
    assert time.monotonic() - read_at >= 1.9  # taken over only once idle for 2 s (Redis's clock)
    wait_for(lambda: stream_state(rds, key) == (0, 0), what="claimed entries acknowledged")
    assert counter(srv, "redisx_claimed_total") == 3
    dead = [i for i in rds.xinfo_consumers(key, GROUP) if i["name"] == b"dead-consumer"]
    assert dead and dead[0]["pending"] == 0


def test_redisx_server_starts_while_redis_is_down_and_recovers(
    make_server: type[Server], private_redis: PrivateRedis
) -> None:
    srv = make_server(*SINGLE, "--broadcast_adapter=redisx", f"--redis_url={private_redis.url}")
    srv.start(healthy=False)
    wait_for(lambda: "Connection refused" in health(srv)[1], what="/health names the problem")
    status, body = health(srv)
    assert status == 503 and "redisx broadcaster" in body and "retrying" in body, body
    wait_for(lambda: "redisx: Redis unavailable, retrying" in srv.output(), what="the log says so")
    private_redis.start()
    wait_for(lambda: health(srv)[0] == 200, timeout=15, what="redisx connected")
    stream = unique("x-late")
    c = subscribed(srv, stream)
    client = redis.Redis.from_url(private_redis.url)
    try:
        client.xadd("__anycable__", {"payload": publication(stream, "late")})
        frame = c.recv()
        assert (frame["message"], frame["offset"]) == ("late", 1)
        wait_for(lambda: client.xlen("__anycable__") == 0, what="entry deleted")
    finally:
        c.close()
        client.close()


def test_remove_stale_consumers_keeps_busy_and_recent_ones(rds: redis.Redis, streams: list[str]) -> None:
    key = unique("__bcast_test_stale")
    streams.append(key)
    rds.xgroup_create(key, GROUP, id="0", mkstream=True)
    rds.xadd(key, {"payload": "{}"})
    rds.xgroup_createconsumer(key, GROUP, "idle-empty")
    rds.xreadgroup(GROUP, "idle-pending", {key: ">"}, count=1)
    rds.xgroup_createconsumer(key, GROUP, "me")
    time.sleep(0.4)
    rds.xgroup_createconsumer(key, GROUP, "recent")
    assert remove_stale_consumers(rds, key, GROUP, min_idle=0.3, keep="me") == ["idle-empty"]
    names = sorted(i["name"] for i in rds.xinfo_consumers(key, GROUP))
    assert names == [b"idle-pending", b"me", b"recent"]


def test_redisx_recreates_its_group_when_the_stream_is_deleted(
    streams: list[str], make_server: type[Server], rds: redis.Redis
) -> None:
    key, stream = unique("__bcast_test_deleted"), unique("x-deleted")
    streams.append(key)
    srv = make_server(*SINGLE, "--broadcast_adapter=redisx", f"--redisx_stream={key}", f"--redis_url={REDIS_URL}")
    srv.start()
    c = subscribed(srv, stream)
    try:
        rds.delete(key)  # the group goes with it; the blocked read is told so
        rds.xadd(key, {"payload": publication(stream, "after the delete")})  # a stream without a group
        frame = c.recv(10)
        assert (frame["message"], frame["offset"]) == ("after the delete", 1)
    finally:
        c.close()
    wait_for(lambda: stream_state(rds, key) == (0, 0), what="entry acknowledged and deleted")
    assert "reading the stream failed, retrying" in srv.output()
