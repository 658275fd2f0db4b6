"""The publisher without a server: payloads, and the HTTP publisher's requests, retries and errors
against a stand-in for urllib3's pool (injected, as the publisher's ``http=`` allows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

from anycable_gevent.application.handles import ConnectionHandle
from anycable_gevent.application.request import Request
from anycable_gevent.config import derive_key
from anycable_gevent.publisher import (
    Broadcast,
    HTTPPublisher,
    InvalidPublication,
    PayloadTooLarge,
    PublicationRejected,
    PublishError,
    PublisherUnavailable,
    RedisPublisher,
    RedisStreamPublisher,
    Unauthorized,
    create_publisher,
)


@dataclass
class FakeResponse:
    status: int
    data: bytes = b""


@dataclass
class FakePool:
    """Answers each request with the next scripted outcome (a response or an exception)."""

    outcomes: list[Any]
    requests: list[dict[str, Any]] = field(default_factory=list)
    cleared: bool = False

    def request(self, method: str, url: str, **kwargs: Any) -> FakeResponse:
        self.requests.append({"method": method, "url": url, **kwargs})
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    def clear(self) -> None:
        self.cleared = True

    def bodies(self) -> list[Any]:
        return [json.loads(r["body"]) for r in self.requests]


def publisher(*outcomes: Any, **kwargs: Any) -> tuple[HTTPPublisher, FakePool, list[float]]:
    pool = FakePool(list(outcomes))
    delays: list[float] = []
    pub = HTTPPublisher("http://cable:8080/_broadcast", http=pool, sleep=delays.append, **kwargs)  # type: ignore[arg-type]
    return pub, pool, delays


# ---------------------------------------------------------------------- payloads


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        ({"text": "hi"}, '{"text":"hi"}'),
        ("<b>as is</b>", "<b>as is</b>"),
        ('{"already":"json"}', '{"already":"json"}'),
        ([1, None], "[1,null]"),
        (7, "7"),
        (None, "null"),
    ],
)
def test_data_a_string_as_is_anything_else_json(data: Any, wire: str) -> None:
    assert Broadcast("s", data).to_publication() == {"stream": "s", "data": wire}


def test_meta_only_when_set() -> None:
    assert Broadcast("s", 1, exclude_socket="sid-9", transient=True).to_publication() == {
        "stream": "s",
        "data": "1",
        "meta": {"exclude_socket": "sid-9", "transient": True},
    }
    assert "meta" not in Broadcast("s", 1, exclude_socket="").to_publication()


def test_bad_broadcasts_fail_before_sending() -> None:
    pub, pool, _ = publisher()
    with pytest.raises(ValueError, match="stream"):
        pub.broadcast("", "x")
    with pytest.raises(TypeError):
        pub.broadcast("s", {1, 2})
    with pytest.raises(ValueError, match="identifiers"):
        pub.disconnect("")
    assert pool.requests == []


def test_http_request_building() -> None:
    pub, pool, _ = publisher(FakeResponse(201), secret="s3Krit")
    pub.broadcast("chat/1", {"text": "é"}, exclude_socket="abc")
    [req] = pool.requests
    assert (req["method"], req["url"], req["retries"], req["redirect"]) == (
        "POST",
        "http://cable:8080/_broadcast",
        False,
        False,
    )
    assert req["headers"] == {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {derive_key('s3Krit', 'broadcast-cable')}",
    }
    assert req["body"] == b'{"stream":"chat/1","data":"{\\"text\\":\\"\\\\u00e9\\"}","meta":{"exclude_socket":"abc"}}'
    assert json.loads(json.loads(req["body"])["data"]) == {"text": "é"}
    assert req["timeout"].connect_timeout == 5.0 and req["timeout"].read_timeout == 5.0


def test_explicit_key_wins_and_no_key_sends_no_authorization() -> None:
    pub, pool, _ = publisher(FakeResponse(201), key="k1", secret="ignored")
    pub.broadcast("s", 1)
    assert pool.requests[0]["headers"]["Authorization"] == "Bearer k1"
    pub, pool, _ = publisher(FakeResponse(201))
    pub.broadcast("s", 1)
    assert "Authorization" not in pool.requests[0]["headers"]


def test_batches_are_one_request_in_order() -> None:
    pub, pool, _ = publisher(FakeResponse(201), FakeResponse(201))
    with pub.batch() as batch:
        batch.broadcast("a", {"n": 1})
        batch.broadcast("b", "two", transient=True)
    pub.broadcast_many([Broadcast("c", 3), Broadcast("a", 4)])
    pub.broadcast_many([])
    with pub.batch():
        pass  # empty: nothing sent
    assert pool.bodies() == [
        [{"stream": "a", "data": '{"n":1}'}, {"stream": "b", "data": "two", "meta": {"transient": True}}],
        [{"stream": "c", "data": "3"}, {"stream": "a", "data": "4"}],
    ]


def test_batch_with_an_exception_sends_nothing() -> None:
    pub, pool, _ = publisher()
    with pytest.raises(RuntimeError):
        with pub.batch() as batch:
            batch.broadcast("a", 1)
            raise RuntimeError("abort")
    assert pool.requests == []


def test_disconnect_identifiers_match_what_the_kit_returns_from_connect() -> None:
    conn = ConnectionHandle("sid", Request())
    conn.identified_by(user="zoë", id=42)
    pub, pool, _ = publisher(FakeResponse(201), FakeResponse(201))
    pub.disconnect({"user": "zoë", "id": 42})
    pub.disconnect('{"raw":1}', reconnect=False)
    assert pool.bodies() == [
        {"command": "disconnect", "payload": {"identifier": conn.raw_identifiers, "reconnect": True}},
        {"command": "disconnect", "payload": {"identifier": '{"raw":1}', "reconnect": False}},
    ]


# ---------------------------------------------------------------------- retries and errors


def test_retries_503_and_connection_errors_with_backoff() -> None:
    refused = NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    pub, pool, delays = publisher(
        FakeResponse(503),
        refused,
        ProtocolError("Connection aborted", ConnectionResetError()),
        ConnectTimeoutError(),
        FakeResponse(201),
        retries=4,
        backoff=0.1,
        max_backoff=0.3,
    )
    pub.broadcast("s", 1)
    assert len(pool.requests) == 5
    assert all(body == pool.bodies()[0] for body in pool.bodies())  # the same request each time
    expected = [0.1, 0.2, 0.3, 0.3]  # doubling, capped, ±20 % jitter
    assert all(e * 0.8 <= d <= e * 1.2 for d, e in zip(delays, expected, strict=True)), delays


def test_gives_up_after_the_retries() -> None:
    pub, pool, delays = publisher(*[FakeResponse(503)] * 3, retries=2)
    with pytest.raises(PublisherUnavailable, match="503"):
        pub.broadcast("s", 1)
    assert (len(pool.requests), len(delays)) == (3, 2)


def test_read_timeout_is_not_retried() -> None:
    pub, pool, delays = publisher(ReadTimeoutError(None, "/_broadcast", "read timed out"), FakeResponse(201))  # type: ignore[arg-type]
    with pytest.raises(PublisherUnavailable, match="did not answer"):
        pub.broadcast("s", 1)
    assert (len(pool.requests), delays) == (1, [])


@pytest.mark.parametrize(
    ("status", "body", "cls", "error", "details"),
    [
        (
            401,
            b'{"error":"unauthorized","details":"send Authorization: Bearer <broadcast key>"}',
            Unauthorized,
            "unauthorized",
            "send Authorization: Bearer <broadcast key>",
        ),
        (
            413,
            b'{"error":"body too large","details":"limit is 10 bytes"}',
            PayloadTooLarge,
            "body too large",
            "limit is 10 bytes",
        ),
        (
            422,
            b'{"error":"invalid publication","details":"data must be a string"}',
            InvalidPublication,
            "invalid publication",
            "data must be a string",
        ),
        (422, b'{"error":"invalid publication"}', InvalidPublication, "invalid publication", ""),
        (404, b"Not Found", PublicationRejected, "Not Found", ""),
        (500, b"", PublicationRejected, "no details", ""),
    ],
)
def test_rejections_carry_the_servers_error(
    status: int, body: bytes, cls: type[PublicationRejected], error: str, details: str
) -> None:
    pub, pool, delays = publisher(FakeResponse(status, body))
    with pytest.raises(cls) as info:
        pub.broadcast("s", 1)
    exc = info.value
    assert type(exc) is cls and isinstance(exc, PublishError)
    assert (exc.status, exc.error, exc.details) == (status, error, details)
    assert str(status) in str(exc) and error in str(exc)
    assert (len(pool.requests), delays) == (1, [])  # never retried


def test_close_leaves_an_injected_pool_alone_and_clears_its_own() -> None:
    pub, pool, _ = publisher()
    with pub:
        pass
    assert not pool.cleared
    own = HTTPPublisher("http://x/_broadcast")
    own.http.connection_from_url("http://x/")
    assert len(own.http.pools) == 1
    own.close()
    assert len(own.http.pools) == 0


def test_adapters_by_server_name() -> None:
    assert isinstance(create_publisher("http", url="http://x/_broadcast"), HTTPPublisher)
    stream = create_publisher("redisx", url="redis://127.0.0.1:1", stream="s")
    legacy = create_publisher("redis", url="redis://127.0.0.1:1", channel="c")
    assert isinstance(stream, RedisStreamPublisher) and stream.stream == "s"
    assert isinstance(legacy, RedisPublisher) and legacy.channel == "c"
    with pytest.raises(ValueError, match="unknown broadcast adapter 'nats'"):
        create_publisher("nats")
    with pytest.raises(ValueError, match="http://"):
        HTTPPublisher("localhost:8090/_broadcast")
