"""One hostile or careless client must never hurt the others (the defects issue).

Each test plays a client that the ordinary clients (websocket-client, the JS client) never
are: raw sockets that send nothing, trickle, send huge header blocks or broken frames, burst
thousands of commands. Each checks that the offender gets a clear, bounded answer (a close
code that reaches it, an HTTP status, a deadline) and that everybody else is served meanwhile.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import EXT, Client, RawWS, Server, close_of, connected, counter, masked_frame, pubsub_id, request, rss_kb
from rpc_backend import PyBackend, Reply, Request, welcome_script


def welcome_over(ws: RawWS) -> dict[str, Any]:
    msg = ws.recv()
    assert msg["type"] == "welcome", msg
    return msg


def read_close(ws: RawWS, timeout: float = 10.0) -> int | None:
    """The code of the server's close frame, skipping everything before it.

    Raises ConnectionResetError (the close frame was lost) or ConnectionError (plain EOF).
    """
    deadline = time.monotonic() + timeout
    while True:
        opcode, payload = ws.recv_frame(max(deadline - time.monotonic(), 0.01))
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


def http_status_of(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """Read one HTTP response head from a raw socket: (status, the bytes after the head)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True when the server ends the connection (EOF or reset) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


UPGRADE = (
    "GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Protocol: {EXT}\r\n"
)


# ---------------------------------------------------------------------- 1. subscribe burst


class Steady:
    """While running: one publication every 20 ms to a stream a separate client reads, and
    a /health request every 50 ms; records the largest gaps and the answers."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.stop = threading.Event()
        self.sent: list[int] = []
        self.received: list[int] = []
        self.arrivals: list[float] = []
        self.health: list[tuple[int, float]] = []
        self.errors: list[str] = []

    def _publish(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.srv.publish("steady", n)
                self.sent.append(n)
            except Exception as exc:  # recorded, asserted by the test
                self.errors.append(f"publish {n}: {exc!r}")
            time.sleep(0.02)

    def _health(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                status, _ = self.srv.get("/health")
            except Exception as exc:
                self.errors.append(f"health: {exc!r}")
                status = 0
            self.health.append((status, time.monotonic() - t0))
            time.sleep(0.05)

    def _read(self, client: Any) -> None:
        deadline = None
        while True:
            if self.stop.is_set():
                deadline = deadline or time.monotonic() + 5.0
                if len(self.received) >= len(self.sent) or time.monotonic() > deadline:
                    return
            try:
                msg = client.recv(0.5)
            except TimeoutError:
                continue
            self.received.append(msg["message"])
            self.arrivals.append(time.monotonic())

    def __enter__(self) -> Steady:
        return self

    def run(self, client: Any) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._health, daemon=True),
            threading.Thread(target=self._read, args=(client,), daemon=True),
        ]
        for t in threads:
            t.start()
        return threads

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()


@pytest.mark.parametrize(
    ("n", "limit"),
    [(4000, None), (20000, "0")],
    ids=["4000-default-limit", "20000-unlimited"],
)
def test_a_subscribe_burst_does_not_freeze_other_clients(make_server: type[Server], n: int, limit: str | None) -> None:
    """Thousands of subscribes in one send(): every one is answered, and meanwhile /health
    answers and another client receives a steady stream exactly once, in order. Without a
    subscription limit too: snapshots are committed per batch, not per subscribe.

    The longest /health answer and the longest gap in the steady stream are printed
    (``-s`` shows them); they are figures for the closing note, not assertions.
    """
    extra = [f"--max_subscriptions={limit}"] if limit is not None else []
    srv = make_server("--public_streams", "--noauth", "--metrics_http=/metrics", *extra).start()
    with connected(srv, protocol=EXT) as steady_client:
        steady_client.send({"command": "subscribe", "identifier": pubsub_id("steady")})
        assert steady_client.recv()["type"] == "confirm_subscription"
        steady = Steady(srv)
        threads = steady.run(steady_client)
        time.sleep(0.5)
        with RawWS(srv.port, protocols=[EXT]) as ws:
            welcome_over(ws)
            frames = b"".join(
                masked_frame(json.dumps({"command": "subscribe", "identifier": pubsub_id(f"burst/{i}")}).encode())
                for i in range(n)
            )
            t0 = time.monotonic()
            ws.sock.sendall(frames)
            answers: dict[str, str] = {}
            while len(answers) < n:
                msg = ws.recv(timeout=60)
                ident = json.loads(msg["identifier"])["stream_name"]
                assert ident not in answers, f"{ident} answered twice"
                answers[ident] = msg["type"]
            burst_s = time.monotonic() - t0
        time.sleep(0.5)
        steady.stop.set()
        for t in threads:
            t.join(10)
    confirmed = sum(1 for t in answers.values() if t == "confirm_subscription")
    rejected = sum(1 for t in answers.values() if t == "reject_subscription")
    gaps = [b - a for a, b in zip(steady.arrivals, steady.arrivals[1:], strict=False)]
    print(
        f"\nsubscribe burst of {n}: answered in {burst_s:.2f}s ({confirmed} confirmed, {rejected} rejected); "
        f"longest /health answer {max(d for _, d in steady.health) * 1000:.0f} ms "
        f"({len(steady.health)} requests); longest gap in the steady stream {max(gaps, default=0) * 1000:.0f} ms "
        f"({len(steady.received)} of {len(steady.sent)} messages); errors: {len(steady.errors)}"
    )
    assert confirmed + rejected == n
    assert steady.errors == []
    assert all(status == 200 for status, _ in steady.health), steady.health
    assert steady.received == steady.sent  # every message, once, in order


def test_subscriptions_per_connection_are_limited(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--max_subscriptions=3", "--metrics_http=/metrics").start()
    with connected(srv, protocol=EXT) as c, connected(srv, protocol=EXT) as other:
        for i in range(3):
            assert c.subscribe(pubsub_id(f"lim/{i}"))["type"] == "confirm_subscription"
        assert c.subscribe(pubsub_id("lim/3")) == {"identifier": pubsub_id("lim/3"), "type": "reject_subscription"}
        assert counter(srv, "subscriptions_refused_total") == 1
        # the limit is per connection: another client is not affected
        assert other.subscribe(pubsub_id("lim/3"))["type"] == "confirm_subscription"
        # unsubscribing frees a place
        c.send({"command": "unsubscribe", "identifier": pubsub_id("lim/0")})
        assert c.subscribe(pubsub_id("lim/3"))["type"] == "confirm_subscription"
        srv.publish("lim/3", "both")
        assert c.recv()["message"] == "both"
        assert other.recv()["message"] == "both"


# ---------------------------------------------------------------------- 2. handshake deadline


def test_a_silent_connection_is_closed_after_the_handshake_deadline(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=1", "--metrics_http=/metrics").start()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        assert closed_within(sock, 5)
    assert counter(srv, "handshake_timeouts_total") == 1


def test_a_trickled_upgrade_request_is_closed_at_the_deadline(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=1").start()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        t0 = time.monotonic()
        closed = False
        for line in UPGRADE.split("\r\n"):  # one header line every 0.3 s, never the final blank line
            try:
                sock.sendall((line + "\r\n").encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_within(sock, 0.3):
                closed = True
                break
        closed = closed or closed_within(sock, 3)
        assert closed
        assert time.monotonic() - t0 < 4


def test_idle_sockets_cannot_exhaust_the_open_files(make_server: type[Server]) -> None:
    """With 256 open files, 300 sockets that never send a request do not lock everybody out."""
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=1", nofile=256).start()
    idle = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", srv.port))
            idle.append(s)
        time.sleep(2.5)  # past the deadline: the server has closed (or never taken) them all
        with connected(srv, protocol=EXT) as c:
            assert c.subscribe(pubsub_id("fd/ok"))["type"] == "confirm_subscription"
        assert srv.get("/health")[0] == 200
    finally:
        for s in idle:
            s.close()


def test_sockets_in_their_handshake_count_against_max_conn(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=2", "--max_conn=3").start()
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        with RawWS(srv.port, protocols=[EXT]) as ws:
            assert ws.status == 503
        for s in idle:
            assert closed_within(s, 5)
        with connected(srv, protocol=EXT) as c:  # their places are free again
            assert c.welcome is not None
    finally:
        for s in idle:
            s.close()


def test_handshakes_in_progress_are_bounded(make_server: type[Server]) -> None:
    """Over --handshake_concurrency, a new connection waits in the accept queue, not in the server."""
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=1.5", "--handshake_concurrency=2").start()
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(UPGRADE.encode() + b"\r\n")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # not accepted while both handshakes are open
                sock.recv(1)
            for s in idle:
                assert closed_within(s, 5)  # their deadline frees the places
            sock.settimeout(5)
            assert sock.recv(12).startswith(b"HTTP/1.1 101")
    finally:
        for s in idle:
            s.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_upgraded_connections_do_not_count_as_handshakes(
    make_server: type[Server], certificate: tuple[str, str], tls: bool
) -> None:
    """Only the handshake counts: many more connections than --handshake_concurrency stay open."""
    args = [f"--ssl_cert={certificate[0]}", f"--ssl_key={certificate[1]}"] if tls else []
    srv = make_server("--public_streams", "--noauth", "--handshake_concurrency=2", *args).start()
    clients = []
    try:
        for i in range(6):
            c = Client(srv.url, timeout=5)
            clients.append(c)
            c.expect_welcome()
            assert c.subscribe(pubsub_id(f"hs/{i}"))["type"] == "confirm_subscription"
        assert srv.get("/health")[0] == 200
    finally:
        for c in clients:
            c.close()


# ---------------------------------------------------------------------- 3. header block


def test_a_huge_header_block_is_refused_with_431(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth").start()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        block = "".join(f"X-Pad-{i}: {'a' * 60000}\r\n" for i in range(90))
        try:
            sock.sendall((UPGRADE + block + "\r\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused (and closed) before everything was sent
        status, _ = http_status_of(sock)
        assert status == 431


def test_too_many_header_lines_are_refused(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--http_max_headers=20").start()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall((UPGRADE + "".join(f"X-{i}: y\r\n" for i in range(30)) + "\r\n").encode())
        status, _ = http_status_of(sock)
        assert status == 431


def test_unfinished_huge_header_blocks_do_not_grow_the_server(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--handshake_timeout=10").start()
    assert srv.proc is not None
    before = rss_kb(srv.proc.pid)
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.settimeout(5)
            try:
                s.sendall((UPGRADE + "".join(f"X-Pad-{i}: {'a' * 60000}\r\n" for i in range(90))).encode())
            except (BrokenPipeError, ConnectionResetError):
                pass
            socks.append(s)
        time.sleep(0.5)
        grown_mb = (rss_kb(srv.proc.pid) - before) / 1024
        assert grown_mb < 40, f"the server grew by {grown_mb:.0f} MB"
        with connected(srv, protocol=EXT) as c:
            assert c.welcome is not None
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------- 4. closes reach the client


@pytest.mark.parametrize("attempt", range(10))
def test_an_oversized_message_gets_1009_not_a_reset(server: Server, attempt: int) -> None:
    """websocket-client sends 69 KB in one frame: it must be able to finish sending and read the 1009."""
    c = Client(server.url, protocol=EXT)
    try:
        c.expect_welcome()
        c.ws.send(json.dumps({"command": "ping", "pad": "x" * 69000}))
        code, _, _ = close_of(c)
        assert code == 1009
    finally:
        c.close()


def test_a_framing_error_with_unread_data_still_gets_1002(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        # an unmasked frame followed by lots of bytes the server will never parse
        ws.sock.sendall(bytes([0x81, 126]) + (60000).to_bytes(2, "big") + b"y" * 60000)
        assert read_close(ws) == 1002


# ---------------------------------------------------------------------- 5. fragments


def test_empty_fragments_are_bounded(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--ws_max_fragments=16", "--metrics_http=/metrics").start()
    with RawWS(srv.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.sock.sendall(masked_frame(b'{"command":', fin=False) + masked_frame(b"", opcode=0x0, fin=False) * 5000)
        assert read_close(ws) == 1008
    assert counter(srv, "ws_fragment_limit_total") == 1
    with RawWS(srv.port, protocols=[EXT]) as ws:  # a fragmented message within the limit is fine
        welcome_over(ws)
        parts = [b'{"command":', b'"ping"', b"}"]
        ws.sock.sendall(
            masked_frame(parts[0], fin=False)
            + masked_frame(parts[1], opcode=0x0, fin=False)
            + masked_frame(parts[2], opcode=0x0)
        )
        assert ws.recv() == {"type": "pong"}


# ---------------------------------------------------------------------- 6. broadcast body deadline


def test_a_trickled_broadcast_body_times_out(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--http_body_timeout=1").start()
    with socket.create_connection(("127.0.0.1", srv.broadcast_port)) as sock:
        sock.sendall(b"POST /_broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        status = None
        for _ in range(20):  # one byte every 0.3 s: 6 s if nobody stops it
            try:
                sock.sendall(b"{")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.3)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if data:
                status = int(data.split(b" ", 2)[1])
            break
        assert status == 408
        assert time.monotonic() - t0 < 4
        assert closed_within(sock, 3)


def test_a_trickled_body_on_health_is_bounded_too(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--http_body_timeout=1").start()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        status, _ = http_status_of(sock)
        assert status == 200  # answered at once; the unread body is not waited for forever
        assert closed_within(sock, 4)


# ---------------------------------------------------------------------- 7. partial frame deadline


def test_a_frame_that_stops_midway_is_closed(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--ws_frame_timeout=1", "--metrics_http=/metrics").start()
    with RawWS(srv.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        frame = masked_frame(b"z" * 1000)
        ws.sock.sendall(frame[:18])  # header, mask and 10 of 1,000 bytes
        t0 = time.monotonic()
        assert read_close(ws) == 1008
        assert time.monotonic() - t0 < 5
    assert counter(srv, "ws_frame_timeouts_total") == 1


def test_an_idle_connection_between_frames_is_not_a_partial_frame(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--ws_frame_timeout=1").start()
    with RawWS(srv.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        time.sleep(2)
        ws.send({"command": "ping"})
        assert ws.recv() == {"type": "pong"}


# ---------------------------------------------------------------------- 8. surrogates in identifiers


def test_an_identifier_with_a_lone_surrogate_is_rejected(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth").start()
    ident = '{"channel":"$pubsub","stream_name":"z\\ud800"}'
    with connected(srv, protocol=EXT) as c:
        for _ in range(50):
            c.send({"command": "subscribe", "identifier": ident})
            assert c.recv() == {"identifier": ident, "type": "reject_subscription"}
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
    assert "Traceback" not in srv.output()


# ---------------------------------------------------------------------- 9, 10. close frames, UTF-8


@pytest.mark.parametrize(
    "payload",
    [
        (0).to_bytes(2, "big"),
        (999).to_bytes(2, "big"),
        (1004).to_bytes(2, "big"),
        (1005).to_bytes(2, "big"),
        (1006).to_bytes(2, "big"),
        (1015).to_bytes(2, "big"),
        (2999).to_bytes(2, "big"),
        (5000).to_bytes(2, "big"),
        b"\x03",  # one byte: no room for a code
        (1000).to_bytes(2, "big") + b"\xff\xfe",  # reason not UTF-8
    ],
    ids=["0", "999", "1004", "1005", "1006", "1015", "2999", "5000", "1-byte", "bad-reason"],
)
def test_an_invalid_close_frame_is_answered_with_1002(server: Server, payload: bytes) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(payload, opcode=0x8)
        assert read_close(ws) == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
def test_a_valid_close_code_is_echoed(server: Server, code: int) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(code.to_bytes(2, "big") + "adiós".encode(), opcode=0x8)
        assert read_close(ws) == code


def test_a_close_without_a_code_is_answered_with_1000(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(b"", opcode=0x8)
        assert read_close(ws) == 1000


def test_invalid_utf8_in_a_text_frame_fails_the_connection_with_1007(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(b'{"command":"\xff"}')
        assert read_close(ws) == 1007


def test_invalid_utf8_in_a_binary_frame_is_only_dropped(server: Server) -> None:
    with RawWS(server.port, protocols=[EXT]) as ws:
        welcome_over(ws)
        ws.send_frame(b'{"command":"\xff"}', opcode=0x2)
        ws.send({"command": "ping"})
        assert ws.recv() == {"type": "pong"}


# ---------------------------------------------------------------------- 11. bad chunked body


def test_a_bad_chunked_body_gets_one_400_then_close(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth").start()
    with socket.create_connection(("127.0.0.1", srv.broadcast_port)) as sock:
        sock.sendall(
            b"POST /_broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n"
        )
        sock.settimeout(5)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert data.count(b"HTTP/1.1 ") == 1, data


@pytest.fixture
def quiet_server(make_server: type[Server]) -> Iterator[Server]:
    yield make_server("--public_streams", "--noauth").start()


def test_ordinary_clients_are_unaffected_by_all_of_the_above(quiet_server: Server) -> None:
    """A mix of the offenders above, at once, while an ordinary client subscribes and receives."""
    srv = quiet_server
    with connected(srv, protocol=EXT) as c:
        assert c.subscribe(pubsub_id("calm"))["type"] == "confirm_subscription"
        offenders = []
        for payload in (b"\x03", (5000).to_bytes(2, "big")):
            ws = RawWS(srv.port, protocols=[EXT])
            welcome_over(ws)
            ws.send_frame(payload, opcode=0x8)
            offenders.append(ws)
        for _ in range(5):
            offenders.append(socket.create_connection(("127.0.0.1", srv.port)))
        srv.publish("calm", "still here")
        assert c.recv()["message"] == "still here"
        status, _, _ = request("GET", f"{srv.http}/health")
        assert status == 200
        for o in offenders:
            o.close()


# ---------------------------------------------------------------------- more limits


def test_streams_per_subscription_are_limited(make_server: type[Server]) -> None:
    ident = '{"channel":"ManyStreams"}'

    def script(req: Request) -> Reply:
        if req.method == "command" and req.body.get("command") == "subscribe":
            return Reply(
                {
                    "status": 1,
                    "streams": [f"many/{i}" for i in range(50)],
                    "transmissions": [json.dumps({"identifier": ident, "type": "confirm_subscription"})],
                }
            )
        return welcome_script(req)

    with PyBackend(script) as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}", "--max_subscription_streams=10", "--metrics_http=/metrics")
        srv.start()
        with connected(srv, protocol=EXT) as c:
            assert c.subscribe(ident)["type"] == "confirm_subscription"
            srv.publish("many/9", "kept")
            assert c.recv()["message"] == "kept"
            srv.publish("many/10", "dropped")
            c.nothing(0.5)
        assert counter(srv, "streams_refused_total") == 40


def test_a_history_reply_over_the_limit_is_rejected(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--max_history_messages=10", "--metrics_http=/metrics").start()
    for i in range(30):
        srv.publish("long/history", i)
    with connected(srv, protocol=EXT) as c:
        assert c.subscribe(pubsub_id("long/history"))["type"] == "confirm_subscription"
        c.send({"command": "history", "identifier": pubsub_id("long/history"), "history": {"since": 1}})
        assert c.recv() == {"type": "reject_history", "identifier": pubsub_id("long/history")}
        srv.publish("long/history", "live")
        assert c.recv()["message"] == "live"  # still subscribed, live goes on
    assert counter(srv, "history_refused_total") == 1


def test_the_open_file_limit_is_raised_to_the_hard_limit(make_server: type[Server]) -> None:
    srv = make_server("--public_streams", "--noauth", "--max_conn=3000")
    srv.start_limits = (1024, 2048)  # soft, hard
    srv.start()
    assert srv.proc is not None
    with open(f"/proc/{srv.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard == "2048"
    assert "open file limit is 2048, below --max_conn=3000" in srv.output()
