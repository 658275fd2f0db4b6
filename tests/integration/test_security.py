"""Security review, one test (or a few) per guarantee, over real sockets against the real CLI.

* Session ids are credentials: never logged at info, never sent to another client (frames,
  whispers, presence), never chosen by the client (``X-Request-ID``), and an old sid
  restores once.
* Keys and secrets are compared exactly and in constant time (broadcast key, RPC secret,
  signed stream names), and no ``==`` compares them in the source.
* JWT verification pins HMAC algorithms, enforces ``exp`` and ``nbf``, needs ``ext``.
* Signed stream names are verified strictly.
* Origin checks apply to every WebSocket path.
* The startup banner warns about endpoints that answer anyone beyond loopback.
* Redis credentials appear nowhere: logs, banner, ``/health``, errors.
* Error answers never echo attacker input unescaped, and attacker text cannot forge log lines.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import jwt
import pytest
from helpers import (
    BASE,
    EXT,
    ROOT,
    Client,
    RawWS,
    Server,
    close_of,
    connected,
    free_port,
    pubsub_id,
    request,
    signed_id,
)
from rpc_backend import MOUNT, KitBackend

from anycable_gevent import signer

PACKAGE = ROOT / "anycable_gevent"


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def frames_of(c: Client, wait: float = 0.5) -> list[str]:
    """Every text frame (raw, pings included) that arrives within ``wait`` seconds."""
    out: list[str] = []
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        c.ws.settimeout(left)
        try:
            text = c.ws.recv()
        except Exception:
            return out
        out.append(text)


# ---------------------------------------------------------------------- session ids


@pytest.fixture(scope="module")
def public() -> Any:
    with Server("--public_streams", "--noauth", "--sessions_ttl=30") as srv:
        yield srv


def test_a_sid_is_never_logged_at_info(public: Server) -> None:
    """Connect, subscribe, whisper, join presence, drop, restore (query and header), drop:
    neither the old nor the new sids appear in the log at the default level."""
    sids = []
    with connected(public) as c:
        assert c.welcome is not None
        sids.append(c.welcome["sid"])
        c.subscribe(pubsub_id("sec-log"))
        c.send({"command": "whisper", "identifier": pubsub_id("sec-log"), "data": {"typing": True}})
        c.send({"command": "join", "identifier": pubsub_id("sec-log"), "presence": {"id": "u1", "info": {}}})
        c.send("not json")  # dropped and counted
        c.send({"command": "nope"})
        c.recv()  # the presence join event: the commands were handled
    time.sleep(0.2)
    with Client(f"{public.url}?sid={sids[0]}") as c2:
        welcome = c2.expect_welcome()
        assert welcome.get("restored") is True
        sids.append(welcome["sid"])
    time.sleep(0.2)
    with Client(public.url, headers={"X-AnyCable-Restore-Sid": sids[1]}) as c3:
        welcome = c3.expect_welcome()
        assert welcome.get("restored") is True
        sids.append(welcome["sid"])
        c3.send("y" * 70_000)  # over --max_message_size: closed, logged at info
        assert c3.closed()[0] == 1009
    text = wait_for(lambda: public.output() if " INF closing: message of " in public.output() else "")
    for sid in sids:
        assert sid not in text


def until(c: Client, needle: str, seen: list[str], timeout: float = 5.0) -> None:
    """Read raw frames into ``seen`` until one contains ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no frame with {needle!r} in {seen}"
        c.ws.settimeout(left)
        text = c.ws.recv()
        seen.append(text)
        if needle in text:
            return


def test_a_sid_is_never_echoed_to_other_clients(public: Server) -> None:
    """B shares a stream with A, sees A's presence and whispers, asks for the presence
    records, gets a broadcast that excludes A: no frame B receives contains A's sid, and
    none either receives contains the other's."""
    ident = pubsub_id("sec-echo")
    seen_a: list[str] = []
    seen_b: list[str] = []
    with connected(public) as a, connected(public) as b:
        assert a.welcome is not None and b.welcome is not None
        sid_a, sid_b = a.welcome["sid"], b.welcome["sid"]
        for c in (a, b):
            assert c.subscribe(ident)["type"] == "confirm_subscription"
        a.send({"command": "join", "identifier": ident, "presence": {"id": "alice", "info": {"name": "A"}}})
        until(b, '"alice"', seen_b)  # the join event
        a.send({"command": "whisper", "identifier": ident, "data": {"event": "typing", "who": "alice"}})
        until(b, '"typing"', seen_b)
        b.send({"command": "presence", "identifier": ident, "data": {"return_records": True}})
        until(b, '"records"', seen_b)
        public.publish("sec-echo", {"to": "others"}, exclude_socket=sid_a)
        until(b, '"others"', seen_b)
        a.send({"command": "leave", "identifier": ident})
        until(b, '"leave"', seen_b)
        until(a, '"leave"', seen_a)  # A got its own join and leave, not the excluded broadcast
        seen_a += frames_of(a, 0.3)
    assert not any('"others"' in f for f in seen_a)
    for f in seen_a + seen_b:
        assert sid_a not in f and sid_b not in f, f


def test_x_request_id_is_ignored(public: Server) -> None:
    chosen = "attacker-chosen-sid-0001"
    with connected(public, headers={"X-Request-ID": chosen}) as c:
        assert c.welcome is not None
        assert c.welcome["sid"] != chosen
        c.subscribe(pubsub_id("sec-rid"))
    time.sleep(0.2)
    with Client(f"{public.url}?sid={chosen}") as c2:  # nothing was ever stored under it
        welcome = c2.expect_welcome()
        assert "restored" not in welcome and welcome["sid"] != chosen


def test_a_sid_from_the_query_only_restores_and_only_once(public: Server) -> None:
    with connected(public) as c:
        assert c.welcome is not None
        old = c.welcome["sid"]
        c.subscribe(pubsub_id("sec-once"))
    time.sleep(0.2)
    with Client(f"{public.url}?sid={old}", protocol=BASE) as base:  # the base protocol never restores
        welcome = base.expect_welcome()
        assert "restored" not in welcome and welcome["sid"] != old
    with Client(f"{public.url}?sid={old}") as first:
        welcome = first.expect_welcome()
        assert welcome["restored"] is True and welcome["sid"] != old  # restored under a new sid
        assert welcome["restored_ids"] == [pubsub_id("sec-once")]
    time.sleep(0.2)
    with Client(f"{public.url}?sid={old}") as second:  # taken: normal authentication
        welcome = second.expect_welcome()
        assert "restored" not in welcome and welcome["sid"] not in (old, first.welcome and first.welcome["sid"])
        second.send({"command": "history", "identifier": pubsub_id("sec-once"), "history": {"since": 1}})
        second.nothing(0.3)  # not subscribed: nothing of the old session came back


# ---------------------------------------------------------------------- keys and secrets

BROADCAST_KEY = "bk-" + "q7" * 16


@pytest.fixture(scope="module")
def keyed() -> Any:
    with Server("--noauth", "--public_streams", f"--broadcast_key={BROADCAST_KEY}") as srv:
        yield srv


def near_misses(key: str) -> list[str]:
    """Authorization values that differ from ``Bearer <key>`` in one way each."""
    last = "0" if key[-1] != "0" else "1"
    return [
        f"Bearer {key[:-1]}{last}",  # only the last byte differs
        f"Bearer {key[:-1]}",  # a prefix
        f"Bearer {key[:8]}",
        f"Bearer {key}x",  # the key is a prefix of it
        f"Bearer {key.upper()}",
        f"Bearer {key[:-1]}é",  # a non-ASCII last byte
        f"bearer {key}",
        f"Bearer  {key}",
        f"Basic {key}",
        key,
        "Bearer ",
        "",
    ]


def test_the_broadcast_key_accepts_the_exact_key_only(keyed: Server) -> None:
    body = json.dumps({"stream": "sec-key", "data": '"x"'}).encode()
    for value in near_misses(BROADCAST_KEY):
        status, _, _ = request("POST", keyed.broadcast_url, body, {"Authorization": value} if value else {})
        assert status == 401, value
    status, _, _ = request("POST", keyed.broadcast_url, body, {"Authorization": f"Bearer {BROADCAST_KEY}"})
    assert status == 201


def test_the_rpc_secret_of_the_kit_accepts_the_exact_secret_only() -> None:
    secret = "rpc-" + "z9" * 16
    connect = json.dumps({"env": {"url": "http://127.0.0.1/cable", "headers": {"REMOTE_ADDR": "127.0.0.1"}}})
    with KitBackend(rpc_secret=secret) as backend:
        url = f"http://127.0.0.1:{backend.port}{MOUNT}/connect"
        headers = {"Content-Type": "application/json"}
        for value in near_misses(secret):
            status, _, _ = request("POST", url, connect.encode(), {**headers, "Authorization": value})
            assert status == 401, value
        status, _, _ = request("POST", url, connect.encode(), {**headers, "Authorization": f"Bearer {secret}"})
        assert status == 200


#: Comparisons that mention a secret-like name but compare none (checked by hand).
NOT_SECRETS = {("transport.py", "key == name")}  # RequestHeaders.get: a header name
SECRET_NAME = re.compile(r"secret|digest|expected|given|token|passw|(^|[._])key($|[._])|signature|authoriz", re.I)


def test_no_equality_operator_compares_a_secret() -> None:
    """Source check: every ``==``/``!=`` whose operand names a secret-like value compares it
    with a literal (``secret == "none"``), and each place that checks a credential calls
    ``hmac.compare_digest``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not any(isinstance(o, ast.Eq | ast.NotEq) for o in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) for o in operands):
                continue
            text = ast.unparse(node)
            if any(SECRET_NAME.search(ast.unparse(o)) for o in operands) and (path.name, text) not in NOT_SECRETS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not found, found
    for name in ("broadcast/http.py", "application/wsgi.py", "signer.py"):
        calls = [
            n
            for n in ast.walk(ast.parse((PACKAGE / name).read_text()))
            if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"
        ]
        assert calls, f"{name} checks a credential without hmac.compare_digest"


# ---------------------------------------------------------------------- JWT

JWT_SECRET = "jwt-" + "k" * 60  # 64 bytes: long enough for HS512
EXT_CLAIM = json.dumps({"user_id": 42})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None, digest: Any = hashlib.sha256) -> str:
    """A JWT built by hand, so that the header can say anything."""
    head = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = b64url(hmac.new(key, head.encode(), digest).digest()) if key is not None else ""
    return f"{head}.{sig}"


@pytest.fixture(scope="module")
def jwt_server() -> Any:
    with Server(f"--jwt_secret={JWT_SECRET}", "--norpc") as srv:
        yield srv


def outcome(srv: Server, token: str, header: bool = False) -> tuple[int | None, list[dict[str, Any]]]:
    """(close code, frames) of a connection that brings ``token``; (0, [welcome]) when accepted."""
    c = Client(srv.url, headers={"X-JID": token}) if header else Client(f"{srv.url}?jid={token}")
    try:
        code, _, frames = close_of(c, 5)
        return code, frames
    except TimeoutError:
        return 0, [c.welcome] if c.welcome else []
    finally:
        c.close()


def accepted(srv: Server, token: str) -> bool:
    with Client(f"{srv.url}?jid={token}") as c:
        msg = c.recv()
        return msg.get("type") == "welcome"


now = int(time.time())
UNAUTHORIZED = [{"type": "disconnect", "reason": "unauthorized", "reconnect": False}]


def test_a_valid_hmac_token_is_accepted(jwt_server: Server) -> None:
    for alg in ("HS256", "HS384", "HS512"):
        token = jwt.encode({"ext": EXT_CLAIM, "exp": now + 600}, JWT_SECRET, algorithm=alg)
        assert accepted(jwt_server, token), alg


@pytest.mark.parametrize(
    "token",
    [
        raw_token({"alg": "none", "typ": "JWT"}, {"ext": EXT_CLAIM}, None),
        raw_token({"alg": "None"}, {"ext": EXT_CLAIM}, None),
        raw_token({"alg": "NONE"}, {"ext": EXT_CLAIM}, None),
        raw_token({"alg": "HS256"}, {"ext": EXT_CLAIM}, None),  # no signature
        jwt.encode({"ext": EXT_CLAIM}, "another-key-" + "x" * 32, algorithm="HS256"),
        # RS256 in the header, HMAC-signed with the shared secret (algorithm confusion)
        raw_token({"alg": "RS256", "typ": "JWT"}, {"ext": EXT_CLAIM}, JWT_SECRET.encode()),
        raw_token({"alg": "ES256"}, {"ext": EXT_CLAIM}, JWT_SECRET.encode()),
        raw_token({"alg": "HS256"}, {"ext": EXT_CLAIM, "nbf": now + 3600}, JWT_SECRET.encode()),
        raw_token({"alg": "HS256"}, {"ext": EXT_CLAIM, "exp": "tomorrow"}, JWT_SECRET.encode()),
        "not.a.token",
        "x" * 300,
    ],
    ids=[
        "alg-none",
        "alg-None",
        "alg-NONE",
        "unsigned",
        "other-key",
        "rs256",
        "es256",
        "nbf",
        "exp-text",
        "junk",
        "long",
    ],
)
def test_a_bad_token_is_unauthorized(jwt_server: Server, token: str) -> None:
    assert outcome(jwt_server, token) == (1000, UNAUTHORIZED)


def test_alg_none_is_refused_from_the_header_too(jwt_server: Server) -> None:
    token = raw_token({"alg": "none"}, {"ext": EXT_CLAIM}, None)
    assert outcome(jwt_server, token, header=True) == (1000, UNAUTHORIZED)


def test_an_expired_token_gets_token_expired(jwt_server: Server) -> None:
    token = jwt.encode({"ext": EXT_CLAIM, "exp": now - 60}, JWT_SECRET, algorithm="HS256")
    assert outcome(jwt_server, token) == (1000, [{"type": "disconnect", "reason": "token_expired", "reconnect": False}])


@pytest.mark.parametrize("claims", [{"exp": now + 600}, {"ext": {"user_id": 42}}, {"ext": 42}], ids=str)
def test_a_token_without_a_string_ext_is_refused(jwt_server: Server, claims: dict[str, Any]) -> None:
    token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    code, frames = outcome(jwt_server, token)
    assert code == 1011 and frames == []  # SPEC §9.3: an error, no welcome


# ---------------------------------------------------------------------- signed streams

STREAMS_SECRET = "ss-" + "m" * 30


def hmac_hex(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def signed_with(payload: bytes, secret: str = STREAMS_SECRET) -> str:
    encoded = base64.b64encode(payload).decode()
    return f"{encoded}--{hmac_hex(secret, encoded)}"


GOOD = signer.sign("room/1", STREAMS_SECRET)
ENCODED, DIGEST = GOOD.split("--")
BAD_SIGNED = {
    "tampered signature": f"{ENCODED}--{DIGEST[:-1]}{'0' if DIGEST[-1] != '0' else '1'}",
    "tampered payload": signer.sign("room/2", STREAMS_SECRET).split("--")[0] + "--" + DIGEST,
    "wrong secret": signer.sign("room/1", "another-secret"),
    "truncated signature": GOOD[:-1],
    "truncated payload": ENCODED[:-4] + "--" + hmac_hex(STREAMS_SECRET, ENCODED[:-4])[:64],
    "no signature": ENCODED,
    "empty signature": ENCODED + "--",
    "extra --": GOOD + "--",
    "extra part": GOOD + "--" + DIGEST,
    "leading --": "--" + GOOD,
    "uppercase signature": f"{ENCODED}--{DIGEST.upper()}",
    "non-base64": "not base64!--" + hmac_hex(STREAMS_SECRET, "not base64!"),
    "unpadded base64": ENCODED.rstrip("=") + "--" + hmac_hex(STREAMS_SECRET, ENCODED.rstrip("=")),
    "base64 of a number": signed_with(b"42"),
    "base64 of an object": signed_with(b'{"stream":"room/1"}'),
    "base64 of a list": signed_with(b'["room/1"]'),
    "base64 of null": signed_with(b"null"),
    "base64 of an empty string": signed_with(b'""'),
    "base64 of invalid JSON": signed_with(b'"room/1'),
    "empty": "",
}


@pytest.fixture(scope="module")
def streams_server() -> Any:
    with Server(f"--streams_secret={STREAMS_SECRET}", "--noauth") as srv:
        yield srv


def test_signed_stream_names_are_verified_strictly(streams_server: Server) -> None:
    assert ENCODED.endswith("=")  # the unpadded case above differs from the good one
    with connected(streams_server) as c:
        assert c.subscribe(signed_id(GOOD))["type"] == "confirm_subscription"
        for what, signed in BAD_SIGNED.items():
            reply = c.subscribe(signed_id(signed))
            assert reply == {"identifier": signed_id(signed), "type": "reject_subscription"}, what
        # an unsigned name needs public streams, which are off
        assert c.subscribe(pubsub_id("room/1"))["type"] == "reject_subscription"


# ---------------------------------------------------------------------- origins


def test_origin_checks_apply_to_every_websocket_path(make_server: type[Server]) -> None:
    paths = ["/cable", "/ws/second", "/third"]
    srv = make_server(f"--path={','.join(paths)}", "--allowed_origins=good.example.com", "--noauth").start()
    for path in paths:
        with RawWS(srv.port, path, [EXT], {"Origin": "https://good.example.com"}) as ok:
            assert ok.status == 101, path
        for origin in ("https://evil.example", "https://good.example.com.evil.net", "null", "", None):
            headers = {"Origin": origin} if origin is not None else {}
            with RawWS(srv.port, path, [EXT], headers) as refused:
                assert refused.status == 403, (path, origin)


# ---------------------------------------------------------------------- startup warnings


def warnings_of(srv: Server) -> list[str]:
    return [line for line in srv.output().splitlines() if " WRN " in line]


def test_endpoints_without_a_key_beyond_loopback_are_warned_about(make_server: type[Server]) -> None:
    srv = make_server("--host=0.0.0.0", "--noauth", "--metrics_http=/metrics").start()
    lines = warnings_of(srv)
    assert any(
        f"the broadcast endpoint on 0.0.0.0:{srv.broadcast_port}/_broadcast accepts publications without a key" in w
        for w in lines
    ), lines
    assert any(f"the metrics endpoint on 0.0.0.0:{srv.port}/metrics answers anyone" in w for w in lines), lines


def test_loopback_or_keyed_endpoints_are_not_warned_about(make_server: type[Server]) -> None:
    local = make_server("--noauth", "--metrics_http=/metrics").start()  # the helper binds 127.0.0.1
    metrics_port = free_port()
    keyed = make_server(
        "--host=0.0.0.0",
        "--noauth",
        "--broadcast_key=" + "k" * 24,
        "--metrics_http=/metrics",
        f"--metrics_port={metrics_port}",
        "--metrics_host=127.0.0.1",
    ).start()
    for srv in (local, keyed):
        lines = warnings_of(srv)
        assert not any("broadcast endpoint" in w or "metrics endpoint" in w for w in lines), lines
    assert local.get("/metrics")[0] == 200 and keyed.get("/metrics", metrics_port)[0] == 200


# ---------------------------------------------------------------------- Redis credentials


@pytest.mark.parametrize("level", ["info", "debug"])
def test_redis_credentials_never_appear(make_server: type[Server], level: str) -> None:
    closed = free_port()  # nothing listens there
    url = f"redis://user:s3cret@127.0.0.1:{closed}/0"
    srv = make_server(
        f"--redis_url={url}",
        "--broker=none",
        "--pubsub=redis",
        "--noauth",
        "--public_streams",
        f"--log_level={level}",
    ).start_unhealthy()
    status, health = srv.get("/health")
    assert status == 503 and f"127.0.0.1:{closed}" in health
    with connected(srv) as c:
        c.subscribe(pubsub_id("sec-redis"))
    code, body = srv.broadcast({"stream": "sec-redis", "data": '"x"'})
    assert code == 503
    wait_for(lambda: "redis pubsub connection lost" in srv.output())
    text = srv.output()
    assert f"redis://127.0.0.1:{closed}/0" in text  # the banner names the target
    for where in (text, health, json.dumps(body)):
        assert "s3cret" not in where


@pytest.mark.parametrize(
    "option",
    [
        "--redis_url=redis://user:s3cret@[bad",
        "--redis_url=redis://user:s3cret@127.0.0.1:99999",
        "--redis_url=ftp://user:s3cret@127.0.0.1",
        "--redis_url=http://user:s3cret/x@127.0.0.1",
        "--rpc_host=grpc://user:s3cret@127.0.0.1:50051",
        "--rpc_host=http://user:s3cret@[bad/_anycable",
    ],
)
def test_a_config_error_never_echoes_url_credentials(option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "anycable_gevent", option],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stdout + result.stderr


# ---------------------------------------------------------------------- error answers and logs


def test_422_details_are_json_escaped(public: Server) -> None:
    body = json.dumps({"command": "<script>alert(1)</script>", "payload": {}}).encode()
    status, headers, raw = request("POST", public.broadcast_url, body)
    assert status == 422 and headers["content-type"].startswith("application/json")
    assert b"<script>" not in raw and b"</script>" not in raw and b"<" not in raw
    assert "<script>alert(1)</script>" in json.loads(raw)["details"]
    huge = json.dumps({"command": "<b>" * 100_000}).encode()
    status, _, raw = request("POST", public.broadcast_url, huge)
    assert status == 422 and len(raw) < 1000  # quoted input is bounded


MARK = "<script>MARK"


def raw_http(port: int, head: str) -> tuple[int, bytes]:
    """Send a raw request head; (status, body) of the answer, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head_part, _, rest = data.partition(b"\r\n\r\n")
                match = re.search(rb"content-length:\s*(\d+)", head_part, re.I)
                if match and len(rest) >= int(match.group(1)):
                    break
    head_part, _, body = data.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), body


UPGRADE = "Upgrade: websocket\r\nConnection: Upgrade\r\nHost: x\r\n"
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
BAD_REQUESTS = {
    "version": f"GET /cable HTTP/1.1\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: {MARK}\r\n\r\n",
    "short key": f"GET /cable HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Key: MARKMARKMARK\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "key": f"GET /cable HTTP/1.1\r\n{UPGRADE}Sec-WebSocket-Key: {MARK}\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "no version": f"GET /cable HTTP/1.1\r\n{UPGRADE}{KEY}X-Other: {MARK}\r\n\r\n",
    "http/1.0": f"GET /cable HTTP/1.0\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: 13\r\nX: {MARK}\r\n\r\n",
    "not an upgrade": f"GET /cable?{MARK} HTTP/1.1\r\nHost: x\r\nX: {MARK}\r\n\r\n",
    "unknown path": f"GET /{MARK} HTTP/1.1\r\nHost: x\r\n\r\n",
    "request line": f"{MARK} / HTTP/1.1\r\nHost: x\r\n\r\n",
    "header line": f"GET /health HTTP/1.1\r\nHost: x\r\n{MARK}\r\n\r\n",
    "huge headers": "GET /cable HTTP/1.1\r\n" + "".join(f"X-{i}: {MARK}\r\n" for i in range(200)) + "\r\n",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_transport_error_bodies_are_fixed_texts(public: Server, name: str) -> None:
    status, body = raw_http(public.port, BAD_REQUESTS[name])
    assert 400 <= status < 500, (status, body)
    assert b"MARK" not in body and b"<" not in body, body


def test_a_broadcast_refusal_is_a_fixed_text(keyed: Server) -> None:
    status, _, raw = request(
        "POST", f"{keyed.broadcast_url}?{MARK}", b"{}", {"Authorization": f"Bearer {MARK}", "X": MARK}
    )
    assert status == 401 and b"MARK" not in raw
    status, body = raw_http(
        keyed.broadcast_port, f"GET /_broadcast?{MARK} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 422 and b"MARK" not in body


TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DBG|INF|WRN|ERR) ")
FORGERIES = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def test_attacker_text_cannot_forge_log_lines(make_server: type[Server]) -> None:
    """Values that reach info/warning lines (an identifier in an RPC error, a ping interval,
    a publication error) carry line breaks and terminal escapes: each log line still starts
    with a timestamp and a level, whatever splits the lines."""
    closed = free_port()
    srv = make_server("--noauth", f"--rpc_host=http://127.0.0.1:{closed}/_anycable").start()
    forged = "".join(f"{sep}2030-01-01 00:00:00.000 ERR forged{i} context=x" for i, sep in enumerate(FORGERIES))
    forged += "\x1b[2K\x1b[1A"
    with connected(srv) as c:  # --noauth: no RPC to connect; the channel's RPC fails
        c.send({"command": "subscribe", "identifier": json.dumps({"channel": "Chat" + forged})})
        c.send({"command": "subscribe", "identifier": "Chat" + forged})
        text = wait_for(lambda: srv.output() if srv.output().count("subscribe error") >= 2 else "", 20)
    with Client(f"{srv.url}?pi={urllib.parse.quote(forged[:40])}"):
        pass
    request("POST", srv.broadcast_url, json.dumps({"command": "x" + forged}).encode())
    text = wait_for(lambda: srv.output() if "invalid publication" in srv.output() else "")
    assert "\x1b" not in text
    for line in text.splitlines():  # str.splitlines() splits on every separator above
        assert TIMESTAMPED.match(line), repr(line)
    assert sum("forged0" in line for line in text.split("\n")) >= 3  # the text is there, escaped


def test_the_json_log_format_escapes_attacker_text(make_server: type[Server]) -> None:
    srv = make_server("--noauth", "--log_format=json").start()
    request("POST", srv.broadcast_url, json.dumps({"command": 'x\n{"level":"error"}\u2028'}).encode())
    text = wait_for(lambda: srv.output() if "invalid publication" in srv.output() else "")
    for line in text.split("\n"):
        if line:
            assert isinstance(json.loads(line), dict), line
