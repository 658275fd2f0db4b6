"""Back-pressure (SPEC §10.8, §11 #69): a client that stops reading is dropped, nobody else waits.

The slow client is a bare TCP socket with a tiny receive buffer that does the WebSocket
handshake itself, subscribes, and then never reads. Linux lets the server's send buffer
grow to ``tcp_wmem``'s maximum even towards a tiny window, so several MB fit in kernel
buffers before the server's own backlog fills: the tests keep publishing small batches
(paced by a normal client that reads everything) until the server reports the drop.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from helpers import EXT, Client, RawWS, Server, connected, pubsub_id, request

PAD = "x" * 50_000
BATCH = 4  # 4 x 50 KB per request: each batch fits the reading client's backlog
MAX_BATCHES = 320  # give up after 64 MB


def metric(srv: Server, name: str) -> int:
    status, _, body = request("GET", f"{srv.http}/metrics")
    assert status == 200
    found = re.search(rf"^anycable_go_{name} (\d+)$", body.decode(), re.M)
    assert found, name
    return int(found.group(1))


def subscribed_slow_client(srv: Server, stream: str) -> RawWS:
    slow = RawWS(srv.port, protocols=[EXT], rcvbuf=4096)
    assert slow.status == 101
    assert slow.recv()["type"] == "welcome"
    slow.send({"command": "subscribe", "identifier": pubsub_id(stream)})
    assert slow.recv()["type"] == "confirm_subscription"
    return slow  # from now on it reads nothing


def flood_until(srv: Server, stream: str, fast: Client, counter: str) -> int:
    """Publish batches until ``counter`` moves; ``fast`` must get every message, in order."""
    sent = 0
    for _ in range(MAX_BATCHES):
        batch = [{"stream": stream, "data": json.dumps({"i": sent + i, "pad": PAD})} for i in range(BATCH)]
        status, reply = srv.broadcast(batch)
        assert status == 201, reply
        got = [fast.recv(10)["message"]["i"] for _ in range(BATCH)]
        assert got == list(range(sent, sent + BATCH))  # nothing lost or reordered for the reader
        sent += BATCH
        if metric(srv, counter):
            return sent
    raise AssertionError(f"{counter} did not move after {sent} messages")


def read_until_closed(ws: RawWS, timeout: float = 10.0) -> tuple[int | None, list[dict]]:
    """What the server managed to send, up to its close frame or the end of the stream.

    Returns (close code, or None when the stream ended without one; the frames that are
    not data messages or pings).
    """
    control: list[dict] = []
    try:
        while True:
            opcode, payload = ws.recv_frame(timeout)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big"), control
            frame = json.loads(payload)
            if "message" not in frame or frame.get("type") not in (None, "ping"):
                control.append(frame)
    except (ConnectionError, OSError):
        return None, control


@pytest.fixture(scope="module")
def bounded() -> Iterator[Server]:
    with Server("--noauth", "--public_streams", "--ws_max_pending_size=262144", "--metrics_http=/metrics") as srv:
        yield srv


def test_slow_reader_is_dropped_while_a_fast_one_gets_everything(bounded: Server) -> None:
    stream = "slow-1"
    with connected(bounded) as fast:
        fast.subscribe(pubsub_id(stream))
        slow = subscribed_slow_client(bounded, stream)
        try:
            flood_until(bounded, stream, fast, "disconnected_slow_clients_total")
            assert metric(bounded, "disconnected_slow_clients_total") == 1  # only the slow one

            code, control = read_until_closed(slow)
            if code is not None:  # everything reached it: the disconnect came right before the close
                assert control == [{"type": "disconnect", "reason": "too_slow", "reconnect": True}]
                assert code == 1000
            assert slow.wait_eof(10)  # either way the server ended the connection
        finally:
            slow.close()

        # the reading client is unaffected and the stream still works
        bounded.publish(stream, "after")
        assert fast.recv()["message"] == "after"
        assert metric(bounded, "clients_num") == 1


def test_write_timeout_drops_a_stuck_client_when_the_backlog_is_unbounded(make_server) -> None:
    srv = make_server(
        "--noauth", "--public_streams", "--ws_max_pending_size=0", "--ws_write_timeout=0.5", "--metrics_http=/metrics"
    ).start()
    stream = "slow-2"
    with connected(srv) as fast:
        fast.subscribe(pubsub_id(stream))
        slow = subscribed_slow_client(srv, stream)
        try:
            flood_until(srv, stream, fast, "timeout_server_msg_total")
            assert slow.wait_eof(10)
        finally:
            slow.close()
        assert metric(srv, "disconnected_slow_clients_total") == 0  # no backlog limit was involved
        fast.send({"command": "ping"})
        assert fast.recv() == {"type": "pong"}


def wait_for_metric(srv: Server, name: str, value: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(srv, name) != value:
        assert time.monotonic() < deadline, f"{name} stayed at {metric(srv, name)}, expected {value}"
        time.sleep(0.05)


def test_vanished_clients_leave_nothing_behind(bounded: Server) -> None:
    """Sockets that drop without a close frame (or after a close, or mid-frame) are cleaned up."""
    wait_for_metric(bounded, "clients_num", 0)
    streams_before = metric(bounded, "broadcast_streams_num")
    gone: list[RawWS] = []
    for i in range(12):
        ws = RawWS(bounded.port, protocols=[EXT])
        assert ws.recv()["type"] == "welcome"
        ws.send({"command": "subscribe", "identifier": pubsub_id(f"vanish-{i % 3}")})
        assert ws.recv()["type"] == "confirm_subscription"
        gone.append(ws)
    wait_for_metric(bounded, "clients_num", 12)
    assert metric(bounded, "broadcast_streams_num") == streams_before + 3
    for i, ws in enumerate(gone):
        if i % 3 == 0:
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        elif i % 3 == 1:
            ws.sock.sendall(b"\x81\xfe\x10\x00")  # the start of a frame that never comes
        ws.close()
    wait_for_metric(bounded, "clients_num", 0)
    wait_for_metric(bounded, "broadcast_streams_num", streams_before)
    # and broadcasts to those streams go nowhere without complaint
    for i in range(3):
        bounded.publish(f"vanish-{i}", "anyone?")
    with connected(bounded) as c:
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
