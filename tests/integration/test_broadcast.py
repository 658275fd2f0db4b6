"""HTTP broadcasts (SPEC §6.1–6.2, §3.10, §11.3): publications, remote disconnect, keys, limits."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest
from helpers import Client, Server, connected, jwt_token, pubsub_id, request

from anycable_gevent.config import derive_key

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")


@pytest.fixture(scope="module")
def keyed() -> Iterator[Server]:
    """A broadcast key and no explicit broadcast port: broadcasts go to the main port."""
    with Server("--noauth", "--public_streams", "--broadcast_key=b-key", "--http_broadcast_port=0") as srv:
        yield srv


@pytest.fixture(scope="module")
def secret() -> Iterator[Server]:
    """The key derived from --secret, on the main port."""
    with Server("--noauth", "--public_streams", "--secret=s3Krit", "--http_broadcast_port=0") as srv:
        yield srv


@pytest.fixture(scope="module")
def small() -> Iterator[Server]:
    with Server("--noauth", "--public_streams", "--http_broadcast_max_body=512") as srv:
        yield srv


@pytest.fixture(scope="module")
def jwt_server() -> Iterator[Server]:
    with Server("--jwt_secret=jwt-key", "--public_streams") as srv:
        yield srv


def post(url: str, body: object | bytes, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """POST a body (bytes as is, anything else as JSON); returns (status, parsed JSON or None)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, text = request("POST", url, raw, headers)
    return status, (json.loads(text) if text else None)


def main_port_url(srv: Server) -> str:
    return f"{srv.http}/_broadcast"


def msg(stream: str, data: object, **meta: object) -> dict:
    body: dict = {"stream": stream, "data": json.dumps(data)}
    if meta:
        body["meta"] = meta
    return body


def received(client: Client, n: int) -> list:
    return [client.recv()["message"] for _ in range(n)]


# ---------------------------------------------------------------------- publications


def test_single_publication(server: Server) -> None:
    ident = pubsub_id("bc-single")
    with connected(server) as c:
        c.subscribe(ident)
        status, body = server.broadcast(msg("bc-single", {"text": "hi"}))
        assert (status, body) == (201, None)
        frame = c.recv()
        assert frame["identifier"] == ident and frame["message"] == {"text": "hi"}
        assert frame["stream_id"] == "bc-single" and isinstance(frame["offset"], int) and frame["epoch"]


def test_batch_delivers_each_stream_its_messages_in_order(server: Server) -> None:
    # SPEC §11 #35
    with connected(server) as c1, connected(server) as c2:
        c1.subscribe(pubsub_id("bc-test"))
        c2.subscribe(pubsub_id("bc-staind_2023"))
        batch = [
            msg("bc-test", "t1"),
            msg("bc-untest", "nobody listens"),
            msg("bc-staind_2023", "s1"),
            msg("bc-test", "t2"),
            msg("bc-staind_2023", "s2"),
        ]
        assert server.broadcast(batch)[0] == 201
        assert received(c1, 2) == ["t1", "t2"]
        assert received(c2, 2) == ["s1", "s2"]
        c1.nothing(0.2)
        c2.nothing(0.1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (json.dumps({"user_id": 1, "text": "hi"}), {"user_id": 1, "text": "hi"}),  # #31
        (json.dumps("<script>alert('Message!');</script>"), "<script>alert('Message!');</script>"),  # #32
        (json.dumps('{"script":{"alert":"Message!"}}'), '{"script":{"alert":"Message!"}}'),  # #33
        ('"abc123"', "abc123"),  # #34
        ("plain text, not JSON", "plain text, not JSON"),
        ("null", "null"),
        ("[1,2,3]", [1, 2, 3]),
        ("3.5", 3.5),
        (json.dumps({"emoji": "☃ ünï 流"}, ensure_ascii=False), {"emoji": "☃ ünï 流"}),
    ],
)
def test_data_forms(server: Server, data: str, message: object) -> None:
    stream = "bc-data"
    with connected(server) as c:
        c.subscribe(pubsub_id(stream))
        assert server.broadcast({"stream": stream, "data": data})[0] == 201
        assert c.recv()["message"] == message


def test_large_message(server: Server) -> None:
    payload = {"blob": "x" * 100_000}
    with connected(server) as c:
        c.subscribe(pubsub_id("bc-large"))
        server.publish("bc-large", payload)
        assert c.recv()["message"] == payload


def test_exclude_socket(server: Server) -> None:
    # SPEC §11 #36
    ident = pubsub_id("bc-exclude")
    with connected(server) as c1, connected(server) as c2, connected(server) as c3:
        for c in (c1, c2, c3):
            c.subscribe(ident)
        assert c1.welcome is not None
        server.publish("bc-exclude", "to others", exclude_socket=c1.welcome["sid"])
        assert c2.recv()["message"] == "to others"
        assert c3.recv()["message"] == "to others"
        c1.nothing(0.3)


def test_transient_message(server: Server) -> None:
    # SPEC §11 #57
    ident = pubsub_id("bc-transient")
    with connected(server) as c:
        c.subscribe(ident)
        server.publish("bc-transient", "stored 1")
        first = c.recv()
        server.publish("bc-transient", "live only", transient=True)
        assert c.recv() == {"identifier": ident, "message": "live only"}
        server.publish("bc-transient", "stored 2")
        second = c.recv()
        assert second["offset"] == first["offset"] + 1  # the transient message took no offset
    with connected(server) as late:
        late.subscribe(ident, history={"since": int(time.time()) - 60})
        history = [late.recv() for _ in range(3)]
        assert [m.get("message") for m in history[:2]] == ["stored 1", "stored 2"]  # not the transient one
        assert history[2] == {"type": "confirm_history", "identifier": ident}


def test_messages_to_two_streams_keep_their_order(server: Server) -> None:
    # SPEC §11 #40
    with connected(server) as c1, connected(server) as c2:
        c1.subscribe(pubsub_id("bc-order-1"))
        c2.subscribe(pubsub_id("bc-order-2"))
        for i in range(1, 6):
            server.publish("bc-order-1", i)
            server.publish("bc-order-2", i)
        assert received(c1, 5) == [1, 2, 3, 4, 5]
        assert received(c2, 5) == [1, 2, 3, 4, 5]


def test_many_messages_in_one_batch_keep_their_order(server: Server) -> None:
    with connected(server) as c:
        c.subscribe(pubsub_id("bc-order-batch"))
        assert server.broadcast([msg("bc-order-batch", i) for i in range(200)])[0] == 201
        assert received(c, 200) == list(range(200))


def test_content_type_is_not_checked(server: Server) -> None:
    with connected(server) as c:
        c.subscribe(pubsub_id("bc-ctype"))
        status, _ = post(server.broadcast_url, msg("bc-ctype", 1), {"Content-Type": "text/plain"})
        assert status == 201
        assert c.recv()["message"] == 1


# ---------------------------------------------------------------------- invalid publications


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b"{}",
        b"42",
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the decoder
        b'{"stream":"bc-invalid","data":"\\ud800"}',  # an unpaired surrogate: not encodable as UTF-8
        json.dumps({"stream": "bc-invalid", "data": {"x": 1}}).encode(),  # #38: data must be a string
        json.dumps({"stream": "", "data": '"x"'}).encode(),
        json.dumps({"data": '"x"'}).encode(),
        json.dumps({"stream": "bc-invalid"}).encode(),
        json.dumps({"stream": "bc-invalid", "data": '"x"', "meta": {"transient": "yes"}}).encode(),
        json.dumps({"command": "restart", "payload": {}}).encode(),
        json.dumps({"command": "disconnect", "payload": {"reconnect": True}}).encode(),
        json.dumps([{"stream": "bc-invalid", "data": '"first"'}, {"stream": "bc-invalid", "data": 2}]).encode(),
        json.dumps([{"stream": "bc-invalid", "data": '"first"'}, {"stream": "", "data": '"x"'}]).encode(),
    ],
)
def test_invalid_publication_is_422_and_delivers_nothing(server: Server, body: bytes) -> None:
    with connected(server) as c:
        c.subscribe(pubsub_id("bc-invalid"))
        status, reply = post(server.broadcast_url, body)
        assert status == 422
        assert isinstance(reply, dict) and reply["error"] and reply["details"]
        server.publish("bc-invalid", "valid one")  # proves the endpoint and the stream still work
        assert c.recv()["message"] == "valid one"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_422(server: Server, method: str) -> None:
    status, _, body = request(method, server.broadcast_url, b"{}" if method != "GET" else None)
    assert status == 422
    assert json.loads(body)["error"]


def test_body_over_the_limit_is_413(small: Server) -> None:
    with connected(small) as c:
        c.subscribe(pubsub_id("bc-limit"))
        body = msg("bc-limit", "x" * 600)
        status, reply = post(small.broadcast_url, body)
        assert status == 413
        assert isinstance(reply, dict) and reply["error"]
        c.nothing(0.2)


def test_body_at_the_limit_is_accepted(small: Server) -> None:
    with connected(small) as c:
        c.subscribe(pubsub_id("bc-limit"))
        base = len(json.dumps({"stream": "bc-limit", "data": ""}))
        raw = json.dumps({"stream": "bc-limit", "data": "x" * (512 - base)}).encode()
        assert len(raw) == 512
        assert post(small.broadcast_url, raw)[0] == 201
        assert len(c.recv()["message"]) > 400


def post_chunked(srv: Server, body: bytes) -> tuple[int, bytes]:
    """POST with Transfer-Encoding: chunked (no Content-Length), in two chunks."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.broadcast_port, timeout=5)
    try:
        conn.request("POST", "/_broadcast", body=iter([body[:40], body[40:]]), encode_chunked=True)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_chunked_body_is_accepted(small: Server) -> None:
    with connected(small) as c:
        c.subscribe(pubsub_id("bc-chunked"))
        status, _ = post_chunked(small, json.dumps(msg("bc-chunked", {"via": "chunks"})).encode())
        assert status == 201
        assert c.recv()["message"] == {"via": "chunks"}


def test_chunked_body_over_the_limit_is_413(small: Server) -> None:
    """No Content-Length: the limit is enforced on what is read."""
    with connected(small) as c:
        c.subscribe(pubsub_id("bc-limit"))
        status, body = post_chunked(small, json.dumps(msg("bc-limit", "x" * 2000)).encode())
        assert status == 413
        assert json.loads(body)["error"]
        c.nothing(0.2)


# ---------------------------------------------------------------------- keys and ports


def test_key_is_required_when_set(keyed: Server) -> None:
    url = main_port_url(keyed)
    with connected(keyed) as c:
        c.subscribe(pubsub_id("bc-keyed"))
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "b-key"},
            {"Authorization": "bearer b-key"},
            {"Authorization": "Basic b-key"},
        ):
            status, reply = post(url, msg("bc-keyed", "nope"), headers)
            assert status == 401, headers
            assert isinstance(reply, dict) and reply["error"]
        c.nothing(0.2)
        status, reply = post(url, msg("bc-keyed", "yes"), {"Authorization": "Bearer b-key"})
        assert (status, reply) == (201, None)
        assert c.recv()["message"] == "yes"


def test_key_is_checked_before_the_body(keyed: Server) -> None:
    status, reply = post(main_port_url(keyed), b"not json")
    assert status == 401


def test_key_derived_from_secret(secret: Server) -> None:
    key = derive_key("s3Krit", "broadcast-cable")
    with connected(secret) as c:
        c.subscribe(pubsub_id("bc-secret"))
        assert post(main_port_url(secret), msg("bc-secret", 1), {"Authorization": "Bearer s3Krit"})[0] == 401
        assert post(main_port_url(secret), msg("bc-secret", 2), {"Authorization": f"Bearer {key}"})[0] == 201
        assert c.recv()["message"] == 2


def test_main_port_serves_both_websockets_and_broadcasts(keyed: Server) -> None:
    status, _, body = request("GET", f"{keyed.http}/health")
    assert (status, body.decode()) == (200, "Ah, ha, ha, ha, stayin' alive, stayin' alive.")
    assert request("GET", main_port_url(keyed))[0] == 422  # routed, not 404


def test_without_a_key_broadcasts_have_their_own_port(server: Server) -> None:
    assert server.broadcast_port != server.port
    assert request("POST", f"{server.http}/_broadcast", json.dumps(msg("x", 1)).encode())[0] == 404
    other = f"http://127.0.0.1:{server.broadcast_port}"
    assert request("GET", f"{other}/cable")[0] == 404
    assert request("GET", f"{other}/health")[0] == 404
    assert request("POST", f"{other}/_broadcast/", json.dumps(msg("x", 1)).encode())[0] == 404


# ---------------------------------------------------------------------- remote disconnect (SPEC §11 #39)


def test_remote_disconnect_noauth(server: Server) -> None:
    with connected(server) as c1, connected(server) as c2:
        assert c1.welcome is not None
        ids = json.dumps({"sid": c1.welcome["sid"]}, separators=(",", ":"))
        cmd = {"command": "disconnect", "payload": {"identifier": ids, "reconnect": True}}
        assert server.broadcast(cmd)[0] == 201
        code, frames = c1.closed()
        assert frames == [{"type": "disconnect", "reason": "remote", "reconnect": True}]
        assert code == 1000
        c2.send({"command": "ping"})
        assert c2.recv() == {"type": "pong"}


def test_remote_disconnect_closes_every_session_with_the_identifiers(jwt_server: Server) -> None:
    alice = '{"user_id":"alice"}'
    bob = '{"user_id":"bob"}'
    exp = int(time.time()) + 60

    def client(ext: str) -> Client:
        c = Client(jwt_server.url + "?jid=" + jwt_token({"ext": ext, "exp": exp}, "jwt-key"))
        c.expect_welcome()
        return c

    a1, a2, b = client(alice), client(alice), client(bob)
    try:
        cmd = {"command": "disconnect", "payload": {"identifier": alice, "reconnect": False}}
        assert jwt_server.broadcast(cmd)[0] == 201
        for c in (a1, a2):
            code, frames = c.closed()
            assert frames == [{"type": "disconnect", "reason": "remote", "reconnect": False}]
            assert code == 1000
        b.send({"command": "ping"})
        assert b.recv() == {"type": "pong"}
    finally:
        for c in (a1, a2, b):
            c.close()


def test_remote_disconnect_matches_identifiers_exactly(jwt_server: Server) -> None:
    ext = '{"user_id":"carol"}'
    c = Client(jwt_server.url + "?jid=" + jwt_token({"ext": ext, "exp": int(time.time()) + 60}, "jwt-key"))
    try:
        c.expect_welcome()
        for near_miss in ('{"user_id": "carol"}', '{"user_id":"carol"} ', "carol"):
            cmd = {"command": "disconnect", "payload": {"identifier": near_miss}}
            assert jwt_server.broadcast(cmd)[0] == 201
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
    finally:
        c.close()
