#!/usr/bin/env python3
"""What a history catch-up costs the server, compared with live delivery.

    python scripts/bench/history_cost.py              # starts a server, 500 clients, 100 messages
    python scripts/bench/history_cost.py --clients 200 --messages 50 --keep-log

Measures the server's CPU time (from /proc/<pid>/schedstat, nanoseconds) for:

* live: C clients subscribed to a stream receive M broadcasts, posted one at a time and
  each fanned out before the next (no coalescing) -> cost of M live deliveries to one client;
* history: C clients each subscribe with ``history.since`` to a stream holding M messages
  -> cost of one catch-up of M messages, minus the cost of the same subscribe without
  history (measured separately).

The server runs pinned to CPU 1 and the clients to CPU 0 when ``taskset`` exists.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from cablebench.server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    key = (mask * (n // 4 + 1))[:n]
    return head + mask + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: actioncable-v1-ext-json\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        self.wait_for(b"welcome")

    def wait_for(self, needle: bytes, count: int = 1) -> None:
        """Read until ``needle`` has been seen ``count`` times in the stream."""
        seen = 0
        while True:
            seen_now = self.buf.count(needle)
            if seen + seen_now >= count:
                self.buf = b""
                return
            seen += seen_now
            self.buf = self.buf[-len(needle) :]
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def send(self, obj: object) -> None:
        self.sock.sendall(frame(json.dumps(obj)))


def publish(port: int, stream: str, n: int, pad: int) -> None:
    body = [{"stream": stream, "data": json.dumps({"seq": i, "pad": "x" * pad})} for i in range(n)]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/_broadcast", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 201


def ident(stream: str) -> str:
    return json.dumps({"channel": "$pubsub", "stream_name": stream}, separators=(",", ":"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--payload", type=int, default=200)
    ap.add_argument("--keep-log", action="store_true")
    args = ap.parse_args()
    c, m = args.clients, args.messages

    port, bport = free_port(), free_port()
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") else []
    if pin:
        os.sched_setaffinity(0, {0})
    log = tempfile.NamedTemporaryFile(prefix="history-cost-", suffix=".log", delete=False)
    cmd = [
        *pin,
        sys.executable,
        "-m",
        "anycable_gevent",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--http_broadcast_port={bport}",
        "--public_streams",
        "--noauth",
        f"--history_limit={m}",
        "--log_level=warn",
    ]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        pid = server.pid

        # live: c clients, m broadcasts
        conns = [Conn(port) for _ in range(c)]
        for conn in conns:
            conn.send({"command": "subscribe", "identifier": ident("live")})
            conn.wait_for(b"confirm_subscription")
        time.sleep(0.3)
        live_ns = 0
        for _ in range(m):
            before = cpu_ns(pid)
            publish(bport, "live", 1, args.payload)
            for conn in conns:
                conn.wait_for(b'"seq"')
            live_ns += cpu_ns(pid) - before
        live = live_ns / c

        # subscribe without history (baseline for the history subscribe)
        publish(bport, "hist", m, args.payload)
        time.sleep(0.3)
        before = cpu_ns(pid)
        for conn in conns:
            conn.send({"command": "subscribe", "identifier": ident("plain")})
            conn.wait_for(b"confirm_subscription")
        plain = (cpu_ns(pid) - before) / c

        # subscribe with history: m messages each
        since = int(time.time()) - 60
        before = cpu_ns(pid)
        for conn in conns:
            conn.send({"command": "subscribe", "identifier": ident("hist"), "history": {"since": since}})
            conn.wait_for(b"confirm_history")
        hist = (cpu_ns(pid) - before) / c
        for conn in conns:
            conn.sock.close()
    finally:
        server.terminate()
        server.wait()
        if not args.keep_log:
            os.unlink(log.name)

    catch_up = hist - plain
    print(f"clients {c}, messages {m}, payload {args.payload} B (server CPU from /proc/<pid>/schedstat)")
    print(f"  {m} live deliveries to one client:      {live / 1000:8.1f} us")
    print(f"  subscribe without history:              {plain / 1000:8.1f} us")
    print(f"  subscribe with a {m}-message catch-up: {hist / 1000:8.1f} us")
    print(
        f"  catch-up of {m} messages:               {catch_up / 1000:8.1f} us = {catch_up / live:.2f} x {m} live deliveries"
    )


if __name__ == "__main__":
    main()
