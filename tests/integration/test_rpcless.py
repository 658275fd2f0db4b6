"""Identification and channels without an RPC backend (SPEC §9, §11.6 #70–75, #41).

JWT identification, ``--noauth``/``--public``, ``$pubsub`` public and signed streams,
Turbo Streams, whispers. None of these servers has an RPC backend.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import jwt
import pytest
from helpers import BASE, EXT, Client, RawWS, Server, connected, jwt_token, pubsub_id, signed_id

from anycable_gevent.config import derive_key
from anycable_gevent.signer import sign

#: The broadcast key the ``standalone`` server derives from its --secret.
STANDALONE_KEY = derive_key("s3Krit", "broadcast-cable")
# The short test secrets are deliberate (they are the SPEC's examples).
pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")

UNAUTHORIZED = {"type": "disconnect", "reason": "unauthorized", "reconnect": False}
EXPIRED = {"type": "disconnect", "reason": "token_expired", "reconnect": False}


def token(secret: str, ext: str = '{"user_id":"42"}', ttl: int = 60, **claims: object) -> str:
    return jwt_token({"ext": ext, "exp": int(time.time()) + ttl, **claims}, secret)


def publish(srv: Server, stream: str, data: object, key: str | None = None) -> None:
    status, body = srv.broadcast({"stream": stream, "data": json.dumps(data)}, key=key)
    assert status == 201, (status, body)


def turbo_id(signed: str) -> str:
    return signed_id(signed, channel="Turbo::StreamsChannel")


@pytest.fixture(scope="module")
def standalone() -> Iterator[Server]:
    """SPEC §11 #72/#75: one secret for everything, no RPC."""
    with Server("--secret=s3Krit", "--norpc", "--turbo_streams") as srv:
        yield srv


@pytest.fixture(scope="module")
def split_secrets() -> Iterator[Server]:
    with Server(
        "--noauth",
        "--streams_secret=streams-key",
        "--turbo_streams",
        "--turbo_streams_secret=turbo-key",
        "--streams_whisper",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def private() -> Iterator[Server]:
    """Connections accepted, but no public streams and no secret for signed ones."""
    with Server("--noauth", "--turbo_streams") as srv:
        yield srv


@pytest.fixture(scope="module")
def enforced() -> Iterator[Server]:
    """SPEC §11 #70 (plus --noauth, which --enforce_jwt must override)."""
    with Server("--secret=qwerty", "--jwt_param=token", "--enforce_jwt", "--noauth", "--public_streams") as srv:
        yield srv


def rejected_at_connect(client: Client) -> list[dict]:
    code, frames = client.closed()
    assert code == 1000
    return frames


# ---------------------------------------------------------------------- $pubsub streams


def test_public_stream_with_public_streams(server: Server) -> None:
    ident = pubsub_id("rpcless/public")
    with connected(server) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        server.publish("rpcless/public", {"ok": True})
        assert c.recv()["message"] == {"ok": True}


def test_public_mode_accepts_public_streams(make_server) -> None:
    # SPEC §11 #73
    srv = make_server("--public").start()
    ident = pubsub_id("stream/2023")
    with connected(srv) as c:
        assert c.welcome is not None and c.welcome["sid"]
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        srv.publish("stream/2023", "hello")  # --public: no broadcast key either
        assert c.recv()["message"] == "hello"


def test_public_stream_rejected_without_public_streams(private: Server) -> None:
    ident = pubsub_id("rpcless/closed")
    with connected(private) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "reject_subscription"}


def test_signed_stream_without_any_secret_is_rejected(private: Server) -> None:
    ident = signed_id(sign("chat/1", "whatever"))
    with connected(private) as c:
        assert c.subscribe(ident)["type"] == "reject_subscription"


def test_signed_stream_with_secret_fallback(standalone: Server) -> None:
    # SPEC §11 #72
    ident = signed_id(sign("chat/2023", "s3Krit"))
    with connected(standalone, headers={"X-JID": token("s3Krit")}) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        publish(standalone, "chat/2023", "signed hello", STANDALONE_KEY)
        assert c.recv()["message"] == "signed hello"


def test_signed_stream_with_streams_secret(split_secrets: Server) -> None:
    ident = signed_id(sign("chat/7", "streams-key"))
    with connected(split_secrets) as c:
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        split_secrets.publish("chat/7", "x")
        msg = c.recv()
        assert (msg["identifier"], msg["message"], msg["stream_id"]) == (ident, "x", "chat/7")


@pytest.mark.parametrize(
    "signed",
    [
        sign("chat/7", "turbo-key"),  # the Turbo key is not the streams key
        sign("chat/7", "streams-key")[:-2] + "00",  # digest changed
        sign("chat/8", "streams-key").split("--")[0] + "--" + sign("chat/7", "streams-key").split("--")[1],
        sign("chat/7", "streams-key") + "--x",
        sign("chat/7", "streams-key")[:-1] + "é",  # non-ASCII digest
        "",
    ],
)
def test_tampered_signed_stream_is_rejected(split_secrets: Server, signed: str) -> None:
    # SPEC §11 #74
    ident = signed_id(signed)
    with connected(split_secrets) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "reject_subscription"}
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


def test_signed_name_wins_over_stream_name(server: Server) -> None:
    # server has public streams but no secret: a signed name present means "verify this"
    ident = json.dumps({"channel": "$pubsub", "signed_stream_name": "x--00", "stream_name": "rpcless/public"})
    with connected(server) as c:
        assert c.subscribe(ident)["type"] == "reject_subscription"


# ---------------------------------------------------------------------- Turbo Streams


def test_turbo_stream_with_secret_fallback(standalone: Server) -> None:
    ident = turbo_id(sign("turbo/1", "s3Krit"))
    with connected(standalone, headers={"X-JID": token("s3Krit")}) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        publish(standalone, "turbo/1", "<turbo-stream></turbo-stream>", STANDALONE_KEY)
        assert c.recv()["message"] == "<turbo-stream></turbo-stream>"


def test_turbo_stream_with_turbo_secret(split_secrets: Server) -> None:
    # SPEC §11 #75
    ok = turbo_id(sign("turbo/2", "turbo-key"))
    wrong = turbo_id(sign("turbo/2", "streams-key"))
    with connected(split_secrets) as c:
        assert c.subscribe(ok)["type"] == "confirm_subscription"
        assert c.subscribe(wrong)["type"] == "reject_subscription"


def test_turbo_never_accepts_unsigned_names(split_secrets: Server) -> None:
    ident = json.dumps({"channel": "Turbo::StreamsChannel", "stream_name": "turbo/3"})
    with connected(split_secrets) as c:
        assert c.subscribe(ident)["type"] == "reject_subscription"


def test_turbo_without_a_secret_is_not_served(private: Server) -> None:
    ident = turbo_id(sign("turbo/4", ""))
    with connected(private) as c:
        assert c.subscribe(ident)["type"] == "reject_subscription"


def test_turbo_unsubscribe_stops_broadcasts(split_secrets: Server) -> None:
    ident = turbo_id(sign("turbo/5", "turbo-key"))
    with connected(split_secrets) as c:
        c.subscribe(ident)
        c.send({"command": "unsubscribe", "identifier": ident})
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
        split_secrets.publish("turbo/5", "gone")
        c.nothing(0.3)


# ---------------------------------------------------------------------- JWT identification


@pytest.mark.parametrize("via", ["query", "header", "subprotocol"])
def test_jwt_sources(standalone: Server, via: str) -> None:
    t = token("s3Krit")
    if via == "query":
        client = Client(standalone.url + f"?jid={t}")
    elif via == "header":
        client = Client(standalone.url, headers={"X-JID": t})
    else:
        client = Client(standalone.url, protocols=[EXT, f"anycable-token.{t}"])
        assert client.subprotocol == EXT
    try:
        welcome = client.expect_welcome()
        assert set(welcome) == {"type", "sid"} and welcome["sid"]
    finally:
        client.close()


@pytest.mark.parametrize("via", ["query", "header", "subprotocol"])
def test_custom_jwt_param(enforced: Server, via: str) -> None:
    # SPEC §11 #70
    t = token("qwerty")
    if via == "query":
        client = Client(enforced.url + f"?token={t}")
    elif via == "header":
        client = Client(enforced.url, headers={"X-Token": t})
    else:
        client = Client(enforced.url, protocols=[EXT, f"anycable-token.{t}"])
    try:
        client.expect_welcome()
    finally:
        client.close()


def test_default_param_is_not_read_when_renamed(enforced: Server) -> None:
    with Client(enforced.url + f"?jid={token('qwerty')}") as c:
        assert rejected_at_connect(c) == [UNAUTHORIZED]


def test_enforce_jwt_rejects_missing_token_even_with_noauth(enforced: Server) -> None:
    with Client(enforced.url) as c:
        assert rejected_at_connect(c) == [UNAUTHORIZED]


def test_no_identification_and_no_rpc_is_unauthorized(standalone: Server) -> None:
    # SPEC §11 #72: no token, no --noauth, no RPC backend
    for protocol in (EXT, BASE):
        with Client(standalone.url, protocol=protocol) as c:
            assert rejected_at_connect(c) == [UNAUTHORIZED]


def test_expired_token(standalone: Server) -> None:
    # SPEC §11 #71
    with Client(standalone.url + f"?jid={token('s3Krit', ttl=-10)}") as c:
        assert rejected_at_connect(c) == [EXPIRED]


BAD_TOKENS = {
    "wrong secret": lambda: token("wrong-secret"),
    "signature changed": lambda: token("s3Krit")[:-3] + "abc",
    "not a jwt": lambda: "not.a.jwt",
    "garbage": lambda: "garbage",
    "not valid yet": lambda: jwt_token(
        {"ext": "{}", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 600}, "s3Krit"
    ),
}


@pytest.mark.parametrize("bad", list(BAD_TOKENS))
def test_bad_token_is_unauthorized(standalone: Server, bad: str) -> None:
    with Client(standalone.url + f"?jid={BAD_TOKENS[bad]()}") as c:
        assert rejected_at_connect(c) == [UNAUTHORIZED]


def test_unsigned_token_is_unauthorized(standalone: Server) -> None:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    unsigned = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'ext': '{}', 'exp': int(time.time()) + 60})}."
    with Client(standalone.url + f"?jid={unsigned}") as c:
        assert rejected_at_connect(c) == [UNAUTHORIZED]


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms(standalone: Server, alg: str) -> None:
    t = jwt.encode({"ext": "{}", "exp": int(time.time()) + 60}, "s3Krit", algorithm=alg)
    with Client(standalone.url + f"?jid={t}") as c:
        c.expect_welcome()


def test_header_token_wins_over_query(standalone: Server) -> None:
    with Client(standalone.url + "?jid=garbage", headers={"X-JID": token("s3Krit")}) as c:
        c.expect_welcome()


def test_bad_token_is_not_rescued_by_noauth(enforced: Server) -> None:
    with Client(enforced.url + "?token=garbage") as c:
        assert rejected_at_connect(c) == [UNAUTHORIZED]


@pytest.mark.parametrize("ext", [None, 42, {"user_id": 42}])
def test_token_without_string_ext_is_an_error(standalone: Server, ext: object) -> None:
    claims: dict = {"exp": int(time.time()) + 60}
    if ext is not None:
        claims["ext"] = ext
    with Client(standalone.url + f"?jid={jwt_token(claims, 's3Krit')}") as c:
        code, frames = c.closed()
        assert (code, frames) == (1011, [])


def test_jwt_identifiers_are_the_ext_claim(standalone: Server) -> None:
    ext = '{"user_id":"jwt-ids"}'
    with connected(standalone, headers={"X-JID": token("s3Krit", ext=ext)}) as c:
        status, _ = standalone.broadcast(
            {"command": "disconnect", "payload": {"identifier": ext, "reconnect": False}}, key=STANDALONE_KEY
        )
        assert status == 201
        code, frames = c.closed()
        assert frames == [{"type": "disconnect", "reason": "remote", "reconnect": False}]
        assert code == 1000


def test_noauth_welcome_and_identifiers(server: Server) -> None:
    with connected(server) as c:
        assert c.welcome is not None
        sid = c.welcome["sid"]
        # compact JSON, byte for byte what anycable-go uses
        identifiers = json.dumps({"sid": sid}, separators=(",", ":"))
        status, _ = server.broadcast({"command": "disconnect", "payload": {"identifier": identifiers}})
        assert status == 201
        _, frames = c.closed()
        assert frames == [{"type": "disconnect", "reason": "remote", "reconnect": False}]


# ---------------------------------------------------------------------- whispers (SPEC §4.8, §11 #41)


def test_whisper_on_a_public_stream(server: Server) -> None:
    ident = pubsub_id("rpcless/whisper")
    with connected(server) as c1, connected(server) as c2, connected(server) as c3:
        for c in (c1, c2, c3):
            c.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident, "data": {"event": "typing", "user": "Vova"}})
        expected = {"identifier": ident, "message": {"event": "typing", "user": "Vova"}}
        assert c2.recv() == expected  # transient: no stream_id/epoch/offset
        assert c3.recv() == expected
        c1.nothing(0.3)


def test_whisper_is_not_stored_in_history(server: Server) -> None:
    ident = pubsub_id("rpcless/whisper-history")
    with connected(server) as c1, connected(server) as c2:
        c1.subscribe(ident)
        c2.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident, "data": "psst"})
        assert c2.recv()["message"] == "psst"
        c2.send({"command": "history", "identifier": ident, "history": {"since": int(time.time()) - 60}})
        assert c2.recv() == {"type": "confirm_history", "identifier": ident}


def test_whisper_on_signed_stream_with_streams_whisper(split_secrets: Server) -> None:
    ident = signed_id(sign("rpcless/signed-whisper", "streams-key"))
    with connected(split_secrets) as c1, connected(split_secrets) as c2:
        c1.subscribe(ident)
        c2.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident, "data": [1, "two"]})
        assert c2.recv() == {"identifier": ident, "message": [1, "two"]}
        c1.nothing(0.3)


def test_no_whisper_without_the_whisper_stream(standalone: Server) -> None:
    # a signed stream without --streams_whisper has no $w: the whisper goes nowhere
    ident = signed_id(sign("rpcless/no-whisper", "s3Krit"))
    t = token("s3Krit")
    with connected(standalone, headers={"X-JID": t}) as c1, connected(standalone, headers={"X-JID": t}) as c2:
        c1.subscribe(ident)
        c2.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident, "data": {"event": "typing"}})
        c2.nothing(0.4)
        c1.nothing(0.1)
        c1.send({"command": "ping"})
        assert c1.recv() == {"type": "pong"}


def test_whisper_needs_a_subscription(server: Server) -> None:
    ident = pubsub_id("rpcless/whisper-unsubscribed")
    with connected(server) as c1, connected(server) as c2:
        c2.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident, "data": "x"})
        c2.nothing(0.3)


def test_whisper_without_data_is_ignored(server: Server) -> None:
    ident = pubsub_id("rpcless/whisper-nodata")
    with connected(server) as c1, connected(server) as c2:
        c1.subscribe(ident)
        c2.subscribe(ident)
        c1.send({"command": "whisper", "identifier": ident})
        c2.nothing(0.3)


def test_raw_ext_client_over_token_subprotocol(standalone: Server) -> None:
    with RawWS(standalone.port, protocols=[EXT, f"anycable-token.{token('s3Krit')}"]) as ws:
        assert ws.status == 101 and ws.headers["sec-websocket-protocol"] == EXT
        assert ws.recv()["type"] == "welcome"
