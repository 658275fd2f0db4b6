"""The publisher against real services: the server's ``/_broadcast`` over HTTP, and Redis.

The Redis publishers are checked at Redis itself (``REDIS_URL``, default
``redis://127.0.0.1:6379``): the XADD entry holds the exact publication under ``payload``,
and a subscriber of the channel receives the PUBLISH; and end to end, through a server
that consumes both (``--broadcast_adapter=redisx,redis``) to a WebSocket subscriber.
Every key and channel name is unique to its test and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from helpers import EXT, Client, Server, close_of, free_port, jwt_token, pubsub_id
from redis.backoff import NoBackoff
from redis.retry import Retry

from anycable_gevent.publisher import (
    HTTPPublisher,
    InvalidPublication,
    PayloadTooLarge,
    PublisherUnavailable,
    RedisPublisher,
    RedisStreamPublisher,
    Unauthorized,
)

SECRET = "publisher-test-secret-8c1f4e2a9b7d0365"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server(f"--secret={SECRET}", "--public_streams", "--http_broadcast_max_body=2000") as s:
        yield s


@pytest.fixture
def pub(srv: Server) -> Iterator[HTTPPublisher]:
    with HTTPPublisher(srv.broadcast_url, secret=SECRET, timeout=2) as p:
        yield p


def subscriber(srv: Server, stream: str, identifiers: dict[str, Any] | None = None) -> Client:
    ext = json.dumps(identifiers or {"user": uuid.uuid4().hex}, separators=(",", ":"))
    c = Client(f"{srv.url}?jid={jwt_token({'ext': ext, 'exp': int(time.time()) + 60}, SECRET)}", protocol=EXT)
    c.expect_welcome()
    assert c.subscribe(pubsub_id(stream))["type"] == "confirm_subscription"
    return c


def unique(prefix: str = "pub") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------- HTTP, real server


def test_http_broadcast_delivers_json_and_strings(srv: Server, pub: HTTPPublisher) -> None:
    stream = unique()
    with subscriber(srv, stream) as c:
        pub.broadcast(stream, {"text": "hi"})
        pub.broadcast(stream, "plain <b>text</b>")
        first, second = c.recv(), c.recv()
        assert first["message"] == {"text": "hi"} and first["stream_id"] == stream and first["offset"] == 1
        assert second["message"] == "plain <b>text</b>" and second["offset"] == 2


def test_http_exclude_socket_and_transient(srv: Server, pub: HTTPPublisher) -> None:
    stream = unique()
    with subscriber(srv, stream) as a, subscriber(srv, stream) as b:
        pub.broadcast(stream, {"n": 1}, exclude_socket=a.welcome["sid"], transient=True)  # type: ignore[index]
        got = b.recv()
        assert got["message"] == {"n": 1} and "offset" not in got  # transient: not stored
        a.nothing(0.3)


def test_http_batch_is_delivered_in_order(srv: Server, pub: HTTPPublisher) -> None:
    s1, s2 = unique(), unique()
    with subscriber(srv, s1) as a, subscriber(srv, s2) as b:
        with pub.batch() as batch:
            batch.broadcast(s1, {"n": 1})
            batch.broadcast(s2, {"n": 2})
            batch.broadcast(s1, {"n": 3})
        assert [a.recv()["message"], a.recv()["message"]] == [{"n": 1}, {"n": 3}]
        assert b.recv()["message"] == {"n": 2}


def test_http_remote_disconnect(srv: Server, pub: HTTPPublisher) -> None:
    stream = unique()
    who = {"user": unique("u"), "tab": 1}
    with subscriber(srv, stream, who) as a, subscriber(srv, stream, who) as a2, subscriber(srv, stream) as other:
        pub.disconnect(who, reconnect=False)
        remote = [{"type": "disconnect", "reason": "remote", "reconnect": False}]
        assert close_of(a) == (1000, "Closed remotely", remote)
        assert close_of(a2) == (1000, "Closed remotely", remote)
        pub.broadcast(stream, "still here")
        assert other.recv()["message"] == "still here"


def test_http_wrong_key_raises_unauthorized_with_details(srv: Server) -> None:
    with HTTPPublisher(srv.broadcast_url, key="wrong") as bad:
        with pytest.raises(Unauthorized) as info:
            bad.broadcast("s", 1)
    exc = info.value
    assert (exc.status, exc.error, exc.details) == (401, "unauthorized", "send Authorization: Bearer <broadcast key>")


def test_http_too_large_raises_payload_too_large(pub: HTTPPublisher) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        pub.broadcast("s", "x" * 3000)
    assert (info.value.status, info.value.details) == (413, "limit is 2000 bytes")


def test_http_invalid_publication_raises_with_the_servers_reason(pub: HTTPPublisher) -> None:
    with pytest.raises(InvalidPublication) as info:
        pub.broadcast("s", "\ud800")  # an unpaired surrogate: valid JSON escape, not valid text
    assert info.value.status == 422 and "surrogate" in info.value.details


def test_http_unreachable_raises_after_retries() -> None:
    delays: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/_broadcast"
    with HTTPPublisher(url, retries=2, backoff=0.01, sleep=delays.append, timeout=1) as p:
        with pytest.raises(PublisherUnavailable, match="cannot connect"):
            p.broadcast("s", 1)
    assert len(delays) == 2


def test_http_503_is_retried_until_accepted() -> None:
    """A real HTTP server that answers 503 twice, then 201."""
    answers = [503, 503, 201]
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(answers.pop(0))
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with HTTPPublisher(f"http://127.0.0.1:{httpd.server_port}/_broadcast", backoff=0.01) as p:
            p.broadcast("s", {"n": 1})
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert answers == [] and len(bodies) == 3 and len(set(bodies)) == 1


# ---------------------------------------------------------------------- Redis


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


def test_redisx_xadd_entry_holds_the_publication_under_payload(rds: redis.Redis) -> None:
    key = unique("__anycable_test__")
    try:
        with RedisStreamPublisher(REDIS_URL, stream=key) as p:
            p.broadcast("chat/1", {"text": "hi"}, exclude_socket="sid-1")
            p.broadcast_many([])
            with p.batch() as batch:
                batch.broadcast("a", "x")
                batch.broadcast("b", 2, transient=True)
            p.disconnect({"user": "ann"}, reconnect=False)
        entries = rds.xrange(key)
        assert entries is not None
        assert [fields for _, fields in entries] == [
            {b"payload": b'{"stream":"chat/1","data":"{\\"text\\":\\"hi\\"}","meta":{"exclude_socket":"sid-1"}}'},
            {b"payload": b'[{"stream":"a","data":"x"},{"stream":"b","data":"2","meta":{"transient":true}}]'},
            {
                b"payload": b'{"command":"disconnect","payload":{"identifier":"{\\"user\\":\\"ann\\"}","reconnect":false}}'
            },
        ]
    finally:
        rds.delete(key)


def test_redisx_maxlen_caps_the_stream(rds: redis.Redis) -> None:
    key = unique("__anycable_test__")
    try:
        with RedisStreamPublisher(REDIS_URL, stream=key, maxlen=1) as p:
            for n in range(300):
                p.broadcast("s", n)
        assert rds.xlen(key) < 300  # approximate trimming (MAXLEN ~) keeps it bounded
    finally:
        rds.delete(key)


def test_redis_publish_reaches_a_subscriber(rds: redis.Redis) -> None:
    channel = unique("__anycable_test__")
    pubsub = rds.pubsub()
    try:
        pubsub.subscribe(channel)
        subscribed = pubsub.get_message(timeout=5)
        assert subscribed is not None and subscribed["type"] == "subscribe"
        with RedisPublisher(REDIS_URL, channel=channel) as p:
            p.broadcast("chat/1", {"text": "hi"})
            p.disconnect('{"user":"ann"}')
        first = pubsub.get_message(timeout=5)
        second = pubsub.get_message(timeout=5)
        assert first is not None and second is not None
        assert (first["channel"], first["data"]) == (
            channel.encode(),
            b'{"stream":"chat/1","data":"{\\"text\\":\\"hi\\"}"}',
        )
        assert json.loads(second["data"]) == {
            "command": "disconnect",
            "payload": {"identifier": '{"user":"ann"}', "reconnect": True},
        }
    finally:
        pubsub.unsubscribe(channel)
        pubsub.close()


def test_redis_unreachable_raises_publisher_unavailable() -> None:
    # no retries: redis-py's default policy would retry with backoff for seconds first
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    for pub in (RedisPublisher(client=client), RedisStreamPublisher(client=client)):
        with pytest.raises(PublisherUnavailable, match="Redis is unreachable"):
            pub.broadcast("s", 1)
    client.close()


# ---------------------------------------------------------------------- Redis, real server

REDISX_STREAM, REDIS_CHANNEL = unique("__anycable_test_x"), unique("__anycable_test_c")


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[Server]:
    """Consumes the Redis publishers' stream and channel (single node: memory broker)."""
    with Server(
        f"--secret={SECRET}",
        "--public_streams",
        "--broadcast_adapter=redisx,redis",
        "--broker=memory",
        "--pubsub=none",
        f"--redisx_stream={REDISX_STREAM}",
        f"--redis_channel={REDIS_CHANNEL}",
        f"--redis_url={REDIS_URL}",
        f"--redis_prefix={unique('pubtest')}:",
    ) as s:
        yield s
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(REDISX_STREAM)
    client.close()


def test_redisx_publisher_reaches_a_subscriber_through_the_server(redis_srv: Server, rds: redis.Redis) -> None:
    stream = unique()
    who = {"user": unique("u")}
    with subscriber(redis_srv, stream) as c, subscriber(redis_srv, stream, who) as leaving:
        with RedisStreamPublisher(REDIS_URL, stream=REDISX_STREAM) as p:
            p.broadcast(stream, {"text": "hi"})
            with p.batch() as batch:
                batch.broadcast(stream, "second")
                batch.broadcast(stream, "third", transient=True)
            p.disconnect(who, reconnect=False)
        frames = [c.recv() for _ in range(3)]
        assert [(f["message"], f.get("offset")) for f in frames] == [
            ({"text": "hi"}, 1),
            ("second", 2),
            ("third", None),
        ]
        assert frames[0]["stream_id"] == stream and frames[0]["epoch"]
        assert close_of(leaving)[:2] == (1000, "Closed remotely")
    deadline = time.monotonic() + 5
    while rds.xlen(REDISX_STREAM) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rds.xlen(REDISX_STREAM) == 0  # the server acknowledged and deleted every entry


def test_redis_publisher_reaches_a_subscriber_through_the_server(redis_srv: Server) -> None:
    stream = unique()
    who = {"user": unique("u")}
    with subscriber(redis_srv, stream) as c, subscriber(redis_srv, stream, who) as leaving:
        with RedisPublisher(REDIS_URL, channel=REDIS_CHANNEL) as p:
            p.broadcast(stream, {"text": "hi"}, exclude_socket=leaving.welcome["sid"])  # type: ignore[index]
            p.disconnect(who)
        # fanned out without registration: no offset, no epoch
        assert c.recv() == {"identifier": pubsub_id(stream), "message": {"text": "hi"}}
        code, reason, frames = close_of(leaving)
        assert (code, reason, frames) == (
            1000,
            "Closed remotely",
            [{"type": "disconnect", "reason": "remote", "reconnect": True}],
        )
