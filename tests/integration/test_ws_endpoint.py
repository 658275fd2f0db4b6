"""The WebSocket endpoint (SPEC §2.2): upgrade rules, sub-protocols, origins, frame limits, routes."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from helpers import BASE, EXT, RawWS, Server, request

from anycable_gevent import __version__


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    """Small frame limit, two WebSocket paths, an Origin allow-list with a wildcard."""
    with Server(
        "--noauth",
        "--public_streams",
        "--max_message_size=1024",
        "--path=/cable,/ws",
        "--allowed_origins=example.com,*.trusted.io,localhost:3000",
    ) as srv:
        yield srv


#: An Origin the ``limited`` server accepts.
OK_ORIGIN = {"Origin": "http://example.com"}


def welcome_over(ws: RawWS) -> dict:
    msg = ws.recv()
    assert msg["type"] == "welcome", msg
    return msg


# ---------------------------------------------------------------------- sub-protocols


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ([EXT, "anycable-token.X"], EXT),
        ([BASE], BASE),
        ([BASE, "actioncable-unsupported"], BASE),  # what Rails' own client offers
        (["anycable-token.X", BASE, EXT], BASE),  # the client's order decides
        ([EXT, BASE], EXT),
    ],
)
def test_subprotocol_negotiation(server: Server, offered: list[str], chosen: str) -> None:
    with RawWS(server.port, protocols=offered) as ws:
        assert ws.status == 101
        assert ws.headers.get("sec-websocket-protocol") == chosen
        welcome_over(ws)


@pytest.mark.parametrize("offered", [["actioncable-v1-msgpack"], ["foo", "bar"], None])
def test_unknown_or_no_subprotocol_still_upgrades_without_the_header(server: Server, offered) -> None:
    with RawWS(server.port, protocols=offered) as ws:
        assert ws.status == 101
        assert "sec-websocket-protocol" not in ws.headers
        welcome_over(ws)


def test_token_subprotocol_is_never_echoed(server: Server) -> None:
    with RawWS(server.port, protocols=["anycable-token.secret-token"]) as ws:
        assert ws.status == 101
        assert "secret-token" not in json.dumps(ws.headers)


def test_version_header(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        assert ws.headers.get("x-anycable-version") == __version__


# ---------------------------------------------------------------------- origins


@pytest.mark.parametrize(
    "origin",
    [
        "http://example.com",
        "https://EXAMPLE.com",
        "http://a.trusted.io",
        "https://deep.sub.trusted.io",
        "http://localhost:3000",
    ],
)
def test_allowed_origins(limited: Server, origin: str) -> None:
    with RawWS(limited.port, protocols=[EXT], headers={"Origin": origin}) as ws:
        assert ws.status == 101
        welcome_over(ws)


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.com",
        "http://example.com.evil.com",
        "http://sub.example.com",  # no wildcard for example.com
        "http://localhost:4000",
        "http://localhost",
        "not a url",
        None,
    ],
)
def test_rejected_origins_get_403(limited: Server, origin: str | None) -> None:
    headers = {"Origin": origin} if origin is not None else {}
    with RawWS(limited.port, protocols=[EXT], headers=headers) as ws:
        assert ws.status == 403
        assert "sec-websocket-accept" not in ws.headers


def test_any_origin_without_allow_list(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT], headers={"Origin": "http://evil.com"}) as ws:
        assert ws.status == 101


# ---------------------------------------------------------------------- frame size limit


def padded_ping(size: int) -> bytes:
    """A valid ``ping`` command of exactly ``size`` bytes."""
    frame = b'{"command":"ping","pad":""}'
    return frame[:-2] + b"x" * (size - len(frame)) + frame[-2:]


def test_frame_at_the_limit_is_processed(limited: Server) -> None:
    with RawWS(limited.port, protocols=[EXT], headers=OK_ORIGIN) as ws:
        welcome_over(ws)
        ws.send_frame(padded_ping(1024))
        assert ws.recv() == {"type": "pong"}


def test_frame_over_the_limit_closes_with_1009(limited: Server) -> None:
    with RawWS(limited.port, protocols=[EXT], headers=OK_ORIGIN) as ws:
        welcome_over(ws)
        ws.send_frame(padded_ping(1025))
        code, frames = ws.closed()
        assert code == 1009
        assert frames == []


def test_fragmented_message_over_the_limit_closes_with_1009(limited: Server) -> None:
    with RawWS(limited.port, protocols=[EXT], headers=OK_ORIGIN) as ws:
        welcome_over(ws)
        data = padded_ping(1500)
        ws.send_frame(data[:700], opcode=0x1, fin=False)
        ws.send_frame(data[700:], opcode=0x0, fin=True)
        code, _ = ws.closed()
        assert code == 1009


def test_fragmented_message_under_the_limit_is_processed(limited: Server) -> None:
    with RawWS(limited.port, protocols=[EXT], headers=OK_ORIGIN) as ws:
        welcome_over(ws)
        data = padded_ping(900)
        ws.send_frame(data[:300], opcode=0x1, fin=False)
        ws.send_frame(b"", opcode=0x9)  # a control frame may sit between fragments
        ws.send_frame(data[300:600], opcode=0x0, fin=False)
        ws.send_frame(data[600:], opcode=0x0, fin=True)
        frames = []
        while len(frames) < 2:
            opcode, payload = ws.recv_frame()
            if opcode == 0xA:
                frames.append("native pong")
            elif opcode == 0x1 and json.loads(payload)["type"] != "ping":
                frames.append(json.loads(payload))
        assert frames == ["native pong", {"type": "pong"}]


def test_default_limit_is_64_kib(server: Server) -> None:
    # SPEC §11 #30: a frame of 70 000 bytes closes with 1009
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(padded_ping(65536))
        assert ws.recv() == {"type": "pong"}
        ws.send_frame(padded_ping(70000))
        code, _ = ws.closed()
        assert code == 1009


def test_binary_frames_are_decoded_like_text(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(b'{"command":"ping"}', opcode=0x2)
        assert ws.recv() == {"type": "pong"}


def test_native_ping_gets_native_pong(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(b"hello", opcode=0x9)
        while True:
            opcode, payload = ws.recv_frame()
            if opcode != 0x1:
                break
        assert (opcode, payload) == (0xA, b"hello")


@pytest.mark.parametrize(
    ("first_byte", "masked"),
    [
        (0x81 | 0x40, True),  # reserved bit set (no extension negotiated)
        (0x83, True),  # reserved opcode
        (0x81, False),  # client frames must be masked
    ],
)
def test_framing_violations_close_with_1002(server: Server, first_byte: int, masked: bool) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        payload = b'{"command":"ping"}'
        if masked:
            frame = bytes([first_byte, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
        else:
            frame = bytes([first_byte, len(payload)]) + payload
        ws.sock.sendall(frame)
        code, frames = ws.closed()
        assert code == 1002
        assert frames == []


def test_client_close_is_answered(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame((1000).to_bytes(2, "big") + b"bye", opcode=0x8)
        code, _ = ws.closed()
        assert code == 1000
        assert ws.wait_eof(5)


# ---------------------------------------------------------------------- broken handshakes


def raw_response(port: int, lines: list[str]) -> tuple[str, dict[str, str], bytes]:
    """Send a hand-written request; read the whole response (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed before the headers: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, *rest = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in rest)}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed {length - len(body)} bytes before the end of the body"
            body += chunk
        return status, headers, body


KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    ("name", "lines", "status"),
    [
        ("no key", ["Sec-WebSocket-Version: 13"], "400"),
        ("key not base64", ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: not base64!"], "400"),
        ("key too short", ["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: c2hvcnQ="], "400"),
        ("unsupported version", ["Sec-WebSocket-Version: 12", f"Sec-WebSocket-Key: {KEY}"], "400"),
        ("no version", [f"Sec-WebSocket-Key: {KEY}"], "426"),
    ],
)
def test_broken_handshake_gets_a_complete_error_response(server: Server, name: str, lines: list[str], status: str):
    request_lines = [
        "GET /cable HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        *lines,
    ]
    status_line, _, body = raw_response(server.port, request_lines)
    assert status_line.split()[1] == status, name
    assert body  # says what is wrong


def test_http_1_0_upgrade_is_400(server: Server) -> None:
    lines = ["GET /cable HTTP/1.0", "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"]
    status_line, _, body = raw_response(server.port, [*lines, f"Sec-WebSocket-Key: {KEY}"])
    assert status_line.split()[1] == "400"
    assert body


def test_server_survives_broken_handshakes(server: Server) -> None:
    for lines in (["Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: !!"], ["Sec-WebSocket-Version: 13"]):
        raw_response(
            server.port, ["GET /cable HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade", *lines]
        )
    with RawWS(server.port, protocols=[EXT]) as ws:
        assert welcome_over(ws)["sid"]


# ---------------------------------------------------------------------- routes


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "DELETE", "PUT"])
def test_health_answers_any_method(server: Server, method: str) -> None:
    status, _, body = request(method, f"{server.http}/health")
    assert status == 200
    if method != "HEAD":
        assert body == b"Ah, ha, ha, ha, stayin' alive, stayin' alive."


def test_plain_get_to_the_cable_path_is_400(server: Server) -> None:
    status, _, _ = request("GET", server.url.replace("ws://", "http://"))
    assert status == 400


def test_post_to_the_cable_path_is_400(server: Server) -> None:
    status, _, _ = request("POST", server.url.replace("ws://", "http://"), body=b"{}")
    assert status == 400


@pytest.mark.parametrize("path", ["/", "/foo", "/cable/", "/cable/x", "/Cable", "/healthz", "/_broadcast"])
def test_unknown_paths_are_404(server: Server, path: str) -> None:
    # /_broadcast lives on its own port when there is no broadcast key
    status, _, _ = request("GET", f"{server.http}{path}")
    assert status == 404


def test_upgrade_on_an_unknown_path_is_404(server: Server) -> None:
    with RawWS(server.port, path="/nope", protocols=[EXT]) as ws:
        assert ws.status == 404


@pytest.mark.parametrize("path", ["/cable", "/ws"])
def test_every_configured_path_serves_websockets(limited: Server, path: str) -> None:
    with RawWS(limited.port, path=path, protocols=[EXT], headers=OK_ORIGIN) as ws:
        assert welcome_over(ws)["sid"]
        ident = json.dumps({"channel": "$pubsub", "stream_name": f"path{path}"})
        ws.send({"command": "subscribe", "identifier": ident})
        assert ws.recv() == {"identifier": ident, "type": "confirm_subscription"}


def test_paths_are_exact(limited: Server) -> None:
    for path in ("/ws/", "/wss", "/cable/ws"):
        with RawWS(limited.port, path=path, protocols=[EXT], headers=OK_ORIGIN) as ws:
            assert ws.status == 404, path
