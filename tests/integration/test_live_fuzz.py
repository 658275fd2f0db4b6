"""Live fuzzing of the real server: hostile clients and publishers next to ordinary subscribers.

For ~20 s, ``FUZZERS`` raw connections send random and malformed WebSocket frames (bad
opcodes, reserved bits, unmasked frames, lying length fields, broken fragments, control
frames with bad payloads, invalid UTF-8, random bytes) and random JSON commands
(subscribe, unsubscribe, history, whisper, presence, ... with random fields and types),
reconnecting whenever the server closes them; another thread POSTs random bodies to the
broadcast endpoint. Meanwhile ordinary subscribers (websocket-client, extended protocol)
receive a numbered stream. Then: the server is alive and healthy, logged no traceback and
no error, every subscriber got every message exactly once and in order, the connection
count is back to the subscribers, and the memory is back near its baseline.

The seed is fixed and printed (``ANYCABLE_FUZZ_SEED`` overrides it, ``ANYCABLE_FUZZ_SECONDS``
the duration). ``SERVER_ARGS`` lists the server command lines the test runs against. With
``--workers``, "the server" is the master and its workers: the subscribers are spread over
every worker, no worker may die or be replaced, the connection count is summed over them,
and the memory of each worker must be back near its own baseline.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
import websocket
from helpers import BASE, EXT, Server, metric, pubsub_id, rss_kb
from procs import children, connection_states, wait_children, worker_of
from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

#: One entry per server setup (each a list of CLI arguments): the memory broker in one
#: process; two workers with the Redis broker and pub/sub (``{redis_url}`` and ``{prefix}``
#: are filled in per run, a key prefix of its own that is deleted afterwards; metrics of both
#: workers are summed through the master's metrics directory, refreshed every second).
SERVER_ARGS: list[Any] = [
    pytest.param(["--public_streams", "--noauth", "--metrics_http=/metrics"], id="memory-1-process"),
    pytest.param(
        [
            "--public_streams",
            "--noauth",
            "--metrics_http=/metrics",
            "--workers=2",
            "--broker=redis",
            "--pubsub=redis",
            "--redis_url={redis_url}",
            "--redis_prefix={prefix}",
            "--stats_refresh_interval=1",
        ],
        id="redis-2-workers",
    ),
]

SEED = int(os.environ.get("ANYCABLE_FUZZ_SEED", "1212"))
SECONDS = float(os.environ.get("ANYCABLE_FUZZ_SECONDS", "20"))
FUZZERS = 30
SUBSCRIBERS = 4
STREAM = "live-fuzz-steady"
#: RSS the server (each worker) may keep after the fuzzers are gone, over its baseline (history and
#: session snapshots of what the fuzzers did stay for their TTLs; the allocator keeps pages).
RSS_MARGIN_KB = 32 * 1024
#: Seconds for the server to release every connection of the fuzzers once they are gone.
RELEASE_SECONDS = 30.0

PROTOCOLS = [[EXT], [BASE], [], ["garbage"], [EXT, BASE], ["anycable-token.x", EXT]]
STREAMS = [STREAM, "fz-a", "fz-b", "fz/c", "", "fz-" + "x" * 300, "fz-é💥"]


# ---------------------------------------------------------------------- random input


def ws_frame(
    payload: bytes, opcode: int = 0x1, fin: bool = True, rsv: int = 0, masked: bool = True, length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", min(n, 2**64 - 1))
    if not masked:
        return head + payload
    mask = os.urandom(4)
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return head + mask + bytes(a ^ b for a, b in zip(payload, key, strict=True))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**70), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1.5, 1e300, 1681828329.25])
    if kind in (4, 5):
        return random_text(rng)
    if kind in (6, 7):
        return {random_text(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_text(rng: random.Random) -> str:
    pieces = ["a", "chat", '"', "\\", "\n", "\u2028", "é", "💥", "{", "}", "<script>", "$pubsub", "--", "\x00", " "]
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))


def random_identifier(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.45:
        return pubsub_id(rng.choice(STREAMS))
    if r < 0.6:
        return json.dumps({"channel": "$pubsub", "signed_stream_name": random_text(rng) + "--" + "0" * 64})
    if r < 0.7:
        return json.dumps({"channel": random_json(rng), "stream_name": random_json(rng)})
    if r < 0.8:
        return json.dumps(random_json(rng))
    if r < 0.9:
        return random_text(rng)
    return random_json(rng)  # not even a string


def random_command(rng: random.Random) -> dict[str, Any]:
    command = rng.choice(
        ["subscribe"] * 4
        + ["unsubscribe", "history", "whisper", "join", "leave", "presence", "message"] * 2
        + ["ping", "pong", "", "nope", None, 7]
    )
    frame: dict[str, Any] = {"command": command, "identifier": random_identifier(rng)}
    if rng.random() < 0.5:
        frame["history"] = rng.choice(
            [
                {"since": int(time.time()) - rng.randrange(100), "streams": {}},
                {"since": random_json(rng), "streams": random_json(rng)},
                {"streams": {rng.choice(STREAMS): {"epoch": random_json(rng), "offset": random_json(rng)}}},
                random_json(rng),
            ]
        )
    if rng.random() < 0.4:
        frame["data"] = rng.choice([random_json(rng), json.dumps({"action": random_text(rng)}), {"n": 1}])
    if rng.random() < 0.3:
        frame["presence"] = rng.choice([{"id": random_text(rng), "info": random_json(rng)}, random_json(rng)])
    for _ in range(rng.randrange(2)):
        frame[random_text(rng)] = random_json(rng)
    return frame


def hostile_frame(rng: random.Random) -> tuple[bytes, bool]:
    """A malformed frame (or bytes): ``(data, ends_the_connection)``."""
    payload = os.urandom(rng.randrange(0, 120))
    kind = rng.randrange(12)
    if kind == 0:
        return os.urandom(rng.randrange(1, 200)), True
    if kind == 1:
        return ws_frame(payload, rng.choice([0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])), True
    if kind == 2:
        return ws_frame(payload, rsv=rng.randrange(1, 8)), True
    if kind == 3:
        return ws_frame(payload, masked=False), True
    if kind == 4:
        return ws_frame(b"", 0x1, length=rng.choice([65537, 2**20, 2**32, 2**63 - 1, 2**64 - 1])), True
    if kind == 5:  # a fragmented message, broken one way or another
        data = ws_frame(b'{"command":', 0x1, fin=False)
        tail = rng.randrange(4)
        if tail == 0:
            data += ws_frame(b"ping", 0x9) + ws_frame(b'"ping"}', 0x0)  # valid: a control frame in between
            return data, False
        if tail == 1:
            return data + ws_frame(b"{}", 0x1), True  # a new message inside a fragmented one
        if tail == 2:
            return data + b"".join(ws_frame(b"", 0x0, fin=False) for _ in range(200)), True  # too many fragments
        return ws_frame(b"x", 0x0), True  # a continuation without a message
    if kind == 6:
        return ws_frame(os.urandom(126 + rng.randrange(100)), 0x9), True  # control frame over 125 bytes
    if kind == 7:
        return ws_frame(b"x", 0x9, fin=False), True  # fragmented control frame
    if kind == 8:
        code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
        return ws_frame(struct.pack("!H", code) + b"bye", 0x8), True
    if kind == 9:
        return ws_frame(rng.choice([b"\x03", struct.pack("!H", 1000) + b"\xff\xfe"]), 0x8), True
    if kind == 10:
        return ws_frame(b'{"command":"ping","x":"\xff\xfe"}', 0x1), True  # text, not UTF-8
    return ws_frame(os.urandom(rng.randrange(1, 64)), 0x2), False  # binary garbage: dropped


def random_body(rng: random.Random) -> bytes:
    """A broadcast body: valid, invalid, garbage, batches, commands (never the steady stream)."""
    streams = [s for s in STREAMS if s != STREAM] + ["fz-" + random_text(rng)]

    def message() -> Any:
        msg: dict[str, Any] = {"stream": rng.choice(streams), "data": json.dumps(random_json(rng))}
        if rng.random() < 0.3:
            msg["data"] = random_json(rng)
        if rng.random() < 0.3:
            msg["meta"] = rng.choice([{"transient": True}, {"exclude_socket": random_text(rng)}, random_json(rng)])
        return msg

    kind = rng.randrange(7)
    if kind == 0:
        return os.urandom(rng.randrange(0, 300))
    if kind == 1:
        return json.dumps(random_json(rng)).encode()
    if kind == 2:
        return json.dumps([message() for _ in range(rng.randrange(5))]).encode()
    if kind == 3:
        payload = rng.choice([{"identifier": json.dumps({"sid": random_text(rng)})}, random_json(rng)])
        return json.dumps(
            {"command": rng.choice(["disconnect", "<script>", random_json(rng)]), "payload": payload}
        ).encode()
    if kind == 4:
        return b'{"stream":"fz-a","data":"\\ud800"}'
    return json.dumps(message()).encode()


# ---------------------------------------------------------------------- the actors


@dataclass
class Counts:
    frames: int = 0
    connections: int = 0
    closed_by_server: int = 0
    bodies: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Fuzzer(threading.Thread):
    """One hostile client: connects, sends random frames, reconnects when it is closed."""

    def __init__(self, port: int, rng: random.Random, stop: threading.Event, counts: Counts) -> None:
        super().__init__(daemon=True)
        self.port, self.rng, self.stop, self.counts = port, rng, stop, counts
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        rng = self.rng
        query = rng.choice(["", "?pi=1", "?pi=x", "?ptp=ms", "?sid=" + random_text(rng), "?sid=" + "A" * 24])
        lines = [
            f"GET /cable{query} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        protocols = rng.choice(PROTOCOLS)
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        if rng.random() < 0.2:
            lines.append(f"X-AnyCable-Restore-Sid: {random_text(rng).encode('ascii', 'replace').decode()}")
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        with self.counts.lock:
            self.counts.connections += 1
        return sock

    def drain(self, sock: socket.socket) -> bool:
        """Read what arrived without waiting; False when the server ended the connection."""
        sock.setblocking(False)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return False
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        finally:
            sock.settimeout(5)

    def run(self) -> None:
        rng = self.rng
        sock: socket.socket | None = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = self.connect()
                if rng.random() < 0.85:
                    data, ends = ws_frame(json.dumps(random_command(rng)).encode()), False
                else:
                    data, ends = hostile_frame(rng)
                sock.sendall(data)
                with self.counts.lock:
                    self.counts.frames += 1
                alive = self.drain(sock)
                if ends or not alive or rng.random() < 0.01:
                    with self.counts.lock:
                        self.counts.closed_by_server += not alive
                    sock.close()
                    sock = None
                    # A pause before the next connection: this is a fuzz of what clients
                    # send, not a connection flood (one process accepts a few thousand
                    # connections a second; past that --max_conn is the bound).
                    time.sleep(0.05 + rng.random() * 0.05)
                time.sleep(rng.random() * 0.01)
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


class Publisher(threading.Thread):
    """POSTs random bodies to the broadcast endpoint; only 201, 413 and 422 are expected."""

    def __init__(self, srv: Server, rng: random.Random, stop: threading.Event, counts: Counts) -> None:
        super().__init__(daemon=True)
        self.srv, self.rng, self.stop, self.counts = srv, rng, stop, counts

    def run(self) -> None:
        while not self.stop.is_set():
            body = random_body(self.rng)
            if self.rng.random() < 0.01:
                body = b'{"stream":"fz-a","data":"' + b"x" * (1 << 20) + b'"}'  # over the limit: 413
            req = urllib.request.Request(self.srv.broadcast_url, data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = 0
                self.counts.errors.append(f"broadcast: {exc!r}")
            with self.counts.lock:
                self.counts.bodies += 1
                self.counts.statuses[status] = self.counts.statuses.get(status, 0) + 1
            time.sleep(0.005)


class Subscriber(threading.Thread):
    """An ordinary client: websocket-client, extended protocol, subscribed to the steady stream."""

    def __init__(self, srv: Server) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(srv.url, subprotocols=[EXT], timeout=5)
        self.port = self.ws.sock.getsockname()[1]
        welcome = json.loads(self.ws.recv())
        assert welcome["type"] == "welcome", welcome
        self.identifier = pubsub_id(STREAM)
        self.ws.send(json.dumps({"command": "subscribe", "identifier": self.identifier}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("type") == "confirm_subscription":
                break
            assert msg.get("type") == "ping", msg
        #: (n, offset) of every data frame of the steady stream, in arrival order
        self.got: list[tuple[int, int]] = []
        self.other: list[dict[str, Any]] = []
        self.expected = 0
        self.done = threading.Event()
        self.failure = ""

    def run(self) -> None:
        self.ws.settimeout(0.5)
        try:
            while not (self.done.is_set() and len(self.got) >= self.expected):
                try:
                    text = self.ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not text:
                    self.failure = "closed by the server"
                    return
                msg = json.loads(text)
                if msg.get("type") == "ping":
                    continue
                if msg.get("identifier") == self.identifier and "offset" in msg and "type" not in msg:
                    self.got.append((msg["message"]["n"], msg["offset"]))
                else:
                    self.other.append(msg)  # whispers and presence from the fuzzers: not counted
        except Exception as exc:  # recorded, asserted by the test
            self.failure = repr(exc)


# ---------------------------------------------------------------------- the test


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("args", SERVER_ARGS)
def test_live_fuzz(make_server: type[Server], args: list[str]) -> None:
    prefix = unique_prefix()
    args = [a.format(redis_url=REDIS_URL, prefix=prefix) for a in args]
    try:
        fuzz(make_server, args)
    finally:
        if any(a.startswith("--redis_prefix=") for a in args):
            delete_prefix(REDIS_URL, prefix)


def start_workers(srv: Server, args: list[str]) -> list[int]:
    """The processes holding connections: the server itself, or its workers once all serve."""
    assert srv.proc is not None
    n = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--workers=")), 1)
    if n == 1:
        return [srv.proc.pid]
    pids = wait_children(srv.proc.pid, n)
    deadline = time.monotonic() + 15
    while srv.output().count("worker serving index=") < n:
        assert time.monotonic() < deadline, srv.output()[-3000:]
        time.sleep(0.05)
    return pids


def spread_subscribers(srv: Server, pids: list[int]) -> list[Subscriber]:
    """SUBSCRIBERS subscribers, on every worker in turn (reconnecting until one lands there)."""
    subscribers: list[Subscriber] = []
    for i in range(SUBSCRIBERS):
        for _ in range(40):
            sub = Subscriber(srv)
            if len(pids) == 1 or worker_of(srv.port, sub.port, pids) == pids[i % len(pids)]:
                subscribers.append(sub)
                break
            sub.ws.close()
        else:
            raise AssertionError(f"no subscriber landed on worker {pids[i % len(pids)]}")
    return subscribers


def fuzz(make_server: type[Server], args: list[str]) -> None:
    print(f"\nlive fuzz: seed={SEED} seconds={SECONDS:g} fuzzers={FUZZERS} server args={' '.join(args)}")
    srv = make_server(*args).start()
    assert srv.proc is not None
    pids = start_workers(srv, args)
    subscribers = spread_subscribers(srv, pids)
    for s in subscribers:
        s.start()
    # warm up every code path once before the baseline (imports, caches, the broker's structures)
    for n in range(1, 21):
        srv.publish(STREAM, {"n": n})
    published = 20
    time.sleep(0.5)
    baseline = {pid: rss_kb(pid) for pid in pids}

    stop = threading.Event()
    counts = Counts()
    rng = random.Random(SEED)
    fuzzers = [Fuzzer(srv.port, random.Random(rng.random()), stop, counts) for _ in range(FUZZERS)]
    publisher = Publisher(srv, random.Random(rng.random()), stop, counts)
    for t in [*fuzzers, publisher]:
        t.start()
    peak = dict(baseline)
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        published += 1
        srv.publish(STREAM, {"n": published})
        if published % 50 == 0:
            for pid in pids:
                peak[pid] = max(peak[pid], rss_kb(pid)) if os.path.exists(f"/proc/{pid}") else peak[pid]
            assert srv.proc.poll() is None, srv.output()[-5000:]
        time.sleep(0.01)
    stop.set()
    for t in [*fuzzers, publisher]:
        t.join(15)
    for s in subscribers:
        s.expected = published
        s.done.set()
    for s in subscribers:
        s.join(15)

    # The fuzzers are gone: only the subscribers are connected again, once the server has
    # read what the fuzzers' sockets still held and seen them end (a worker's count reaches
    # the others through its metrics file, rewritten every second).
    gone_at = time.monotonic()
    lingering: dict[str, int] = {}
    while (clients := metric(srv, "clients_num")) != SUBSCRIBERS and time.monotonic() < gone_at + RELEASE_SECONDS:
        lingering = connection_states(srv.port)
        time.sleep(0.2)
    released_in = time.monotonic() - gone_at
    print(f"live fuzz: the fuzzers' connections released in {released_in:.1f} s, last seen lingering: {lingering}")
    time.sleep(2.0)
    workers = children(srv.proc.pid) if len(pids) > 1 else pids
    after = {pid: rss_kb(pid) for pid in pids if pid in workers}
    output = srv.output()
    crashes = output.count("worker died pid=") + sum(pid not in workers for pid in pids)
    status, _ = srv.get("/health")
    lost = sum(max(0, published - len({n for n, _ in s.got})) for s in subscribers)
    print(
        f"live fuzz: frames sent={counts.frames} connections={counts.connections} "
        f"closed by the server={counts.closed_by_server} bodies posted={counts.bodies} "
        f"statuses={dict(sorted(counts.statuses.items()))} messages published={published} "
        f"checked={sum(len(s.got) for s in subscribers)} lost={lost} worker crashes={crashes} "
        f"rss KB per process: baseline={baseline} peak={peak} after={after}"
    )

    closes: dict[str, int] = {}
    for line in output.splitlines():
        if " INF closing: " in line:
            reason = line.split(" INF closing: ", 1)[1].split(" code=", 1)[0]
            reason = "message of N bytes or more" if reason.endswith("bytes or more") else reason
            closes[reason] = closes.get(reason, 0) + 1
    print(f"live fuzz: server closes by reason: {dict(sorted(closes.items(), key=lambda kv: -kv[1]))}")

    assert srv.proc.poll() is None, "the server crashed:\n" + output[-5000:]
    assert crashes == 0 and workers == pids, (pids, workers, output[-5000:])  # no worker died or was replaced
    assert status == 200
    assert "Traceback" not in output, output[output.index("Traceback") - 2000 :][:6000]
    errors = [line for line in output.splitlines() if " ERR " in line]
    assert not errors, errors[:10]
    assert not counts.errors, counts.errors[:10]
    assert set(counts.statuses) <= {201, 413, 422}, counts.statuses
    assert counts.frames > 1000 and counts.bodies > 100
    for s in subscribers:
        assert not s.failure, s.failure
        assert [n for n, _ in s.got] == list(range(1, published + 1)), "lost, duplicated or reordered"
        offsets = [o for _, o in s.got]
        assert offsets == list(range(offsets[0], offsets[0] + published))
        s.ws.close()
    warnings = [line for line in output.splitlines() if " WRN " in line]
    assert clients == SUBSCRIBERS, (clients, lingering, connection_states(srv.port), warnings[-20:])
    for pid in pids:
        assert after[pid] <= baseline[pid] + RSS_MARGIN_KB, (pid, baseline, peak, after)
