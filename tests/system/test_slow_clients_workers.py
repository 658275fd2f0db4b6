"""Slow clients on ``--workers=2`` with the Redis broker and pub/sub (issue 12, item 4).

Ten fast subscribers, one that never reads (a tiny ``SO_RCVBUF``, no ``recv``) and one that
reads one byte a second, spread over both workers and all on one stream, while a steady
stream of 32 KB publications runs. Then:

* every fast client got every message exactly once and in order (consecutive offsets);
* each slow client was disconnected as ``too_slow`` (the log line names its connection and
  its worker's pid; ``disconnected_slow_clients_total``, summed over the workers, is 2), at
  most ``--ws_write_timeout`` plus a margin after the bytes published since it subscribed
  exceed what the kernel can buffer for it plus ``--ws_max_pending_size``; what it still
  reads afterwards is an in-order prefix of the stream, with the ``too_slow`` disconnect
  before the close frame if that got through;
* each worker's RSS grew by at most ``--ws_max_pending_size`` plus one frame per connection
  it serves, plus a fixed margin (allocator pages, Redis reply buffers).

Without the protection (``--ws_max_pending_size=0``, unlimited, and ``--ws_write_timeout=3600``)
the stalled clients are never dropped and each worker keeps everything published since them:
this test then fails, on the RSS bound (+27 to +31 MB against a bound of 12 MB) and, with
that check taken out, on the drop deadline.

Which worker serves a connection is read from ``/proc`` (:func:`procs.worker_of`): the
server-side socket of the client's port in ``/proc/net/tcp``, and which worker holds that
inode among its fds.
"""

from __future__ import annotations

import http.client
import json
import re
import selectors
import threading
import time
from dataclasses import dataclass, field

import pytest
from helpers import EXT, RawWS, Server, metric, pubsub_id, rss_kb
from procs import wait_children, worker_of
from redis_helpers import REDIS_URL

from anycable_gevent.log import conn_ref

STREAM = "slow-workers"
PAD = 32_000  # bytes of padding per message: a frame is a bit over 32 KB
RATE = 50.0  # publications per second (about 1.6 MB/s to every subscriber)
MAX_PENDING = 256 * 1024
WRITE_TIMEOUT = 2.0
FAST = 10
#: slack on the drop deadline: Redis pub/sub, two busy cores shared with other test runs
MARGIN_S = 6.0
#: publications go on this long after the last drop (the fast clients must still get them)
AFTER_DROP_S = 3.0
#: and the run lasts at least this long (so that an unbounded backlog shows in RSS too)
MIN_RUN_S = 15.0
#: RSS a worker may gain beyond its connections' backlogs
RSS_MARGIN_KB = 10 * 1024


def server_args(prefix: str) -> list[str]:
    return [
        "--workers=2",
        "--reuseport",
        "--broker=redis",
        "--pubsub=redis",
        "--public_streams",
        "--noauth",
        f"--redis_url={REDIS_URL}",
        f"--redis_prefix={prefix}",
        "--metrics_http=/metrics",
        "--stats_refresh_interval=1",
        f"--ws_max_pending_size={MAX_PENDING}",
        f"--ws_write_timeout={WRITE_TIMEOUT:g}",
    ]


# ---------------------------------------------------------------------- /proc


def tcp_wmem_max() -> int:
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


# ---------------------------------------------------------------------- clients


SEQ = re.compile(rb'"seq":\s*(\d+)')
OFFSET = re.compile(rb'"offset":\s*(\d+)')


class Fast:
    """A subscriber that reads everything, as fast as it comes (a bare socket, see :class:`Readers`)."""

    def __init__(self, srv: Server) -> None:
        self.ws = RawWS(srv.port, protocols=[EXT], timeout=10)
        assert self.ws.status == 101
        assert self.ws.recv()["type"] == "welcome"
        self.identifier = pubsub_id(STREAM)
        self.ws.send({"command": "subscribe", "identifier": self.identifier})
        assert self.ws.recv()["type"] == "confirm_subscription"
        self.port = self.ws.sock.getsockname()[1]
        self.buf = bytearray(self.ws.buf)
        self.worker = 0
        #: (seq, offset) of every stream message, in arrival order
        self.got: list[tuple[int, int]] = []
        self.failure = ""

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            n, head = b2 & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            self.frame(b1 & 0x0F, payload)
        del buf[:pos]

    def frame(self, opcode: int, payload: bytes) -> None:
        if opcode != 0x1:
            self.failure = self.failure or f"opcode {opcode}: {payload[:100]!r}"
            return
        if len(payload) < 1000:  # a ping, or something that should not be there
            msg = json.loads(payload)
            if msg.get("type") != "ping":
                self.failure = self.failure or f"unexpected frame {msg}"
            return
        # a stream message: {"identifier":…,"message":{"seq":N,"pad":…},…,"offset":N,…}
        seq, offset = SEQ.search(payload, 0, 300), OFFSET.search(payload, len(payload) - 300)
        if seq is None or offset is None:
            self.failure = self.failure or f"unexpected frame {payload[:300]!r}"
            return
        self.got.append((int(seq.group(1)), int(offset.group(1))))

    def close(self) -> None:
        self.ws.close()


class Readers(threading.Thread):
    """One thread reading every fast client (a Python thread each would be the bottleneck)."""

    def __init__(self, clients: list[Fast]) -> None:
        super().__init__(daemon=True)
        self.clients = clients
        self.stop = threading.Event()
        self.sel = selectors.DefaultSelector()
        for c in clients:
            c.ws.sock.setblocking(False)
            self.sel.register(c.ws.sock, selectors.EVENT_READ, c)

    def run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.2):
                c: Fast = key.data
                try:
                    data = c.ws.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, c.failure = b"", c.failure or repr(exc)
                if not data:
                    c.failure = c.failure or "closed by the server"
                    self.sel.unregister(c.ws.sock)
                    continue
                c.feed(data)

    def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(len(c.got) < n and not c.failure for c in self.clients) and time.monotonic() < deadline:
            time.sleep(0.05)


#: what a slow client read after its drop: seqs of data messages, close code, other frames
Drained = tuple[list[int], int | None, list[dict]]


class Slow:
    """A bare socket subscribed to the stream; ``trickle`` reads one byte a second, else nothing."""

    def __init__(self, srv: Server, name: str, rcvbuf: int | None, trickle: bool) -> None:
        self.name = name
        self.ws = RawWS(srv.port, protocols=[EXT], rcvbuf=rcvbuf, timeout=10)
        assert self.ws.status == 101
        welcome = self.ws.recv()
        assert welcome["type"] == "welcome", welcome
        self.ref = conn_ref(welcome["sid"])
        self.ws.send({"command": "subscribe", "identifier": pubsub_id(STREAM)})
        assert self.ws.recv()["type"] == "confirm_subscription"
        assert not self.ws.buf  # nothing read ahead: the stall starts now
        self.port = self.ws.sock.getsockname()[1]
        self.trickled = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True) if trickle else None
        #: monotonic time at which the publications since the subscription exceeded its buffers
        self.full_at = 0.0
        self.dropped_at = 0.0
        self.worker = 0

    @property
    def rcvbuf(self) -> int:
        return int(self.ws.sock.getsockopt(1, 8))  # SOL_SOCKET, SO_RCVBUF (as the kernel doubled it)

    def start(self) -> None:
        if self.thread is not None:
            self.thread.start()

    def _trickle(self) -> None:
        self.ws.sock.settimeout(1.0)
        while not self.stop.wait(1.0):
            try:
                byte = self.ws.sock.recv(1)
            except TimeoutError:
                continue
            except OSError:
                return
            if not byte:
                return
            self.trickled += byte

    def drain(self) -> Drained:
        """Read what the server still delivers: (seqs of data messages, close code, other frames)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.ws.buf = self.trickled + self.ws.buf
        seqs: list[int] = []
        control: list[dict] = []
        if not self.dropped_at:
            return seqs, None, control  # it would never end (pings)
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                opcode, payload = self.ws.recv_frame(10)
                if opcode == 0x8:
                    return seqs, int.from_bytes(payload[:2], "big"), control
                msg = json.loads(payload)
                if "message" in msg and "type" not in msg:
                    seqs.append(msg["message"]["seq"])
                elif msg.get("type") != "ping":
                    control.append(msg)
        except (ConnectionError, OSError):
            return seqs, None, control
        raise AssertionError(f"{self.name}: still receiving {len(seqs)} messages after its drop")


def on_worker(make, srv: Server, target: int, pids: list[int], tries: int = 40):
    """Connect with ``make()`` until the connection lands on worker ``target`` (SO_REUSEPORT
    spreads connections by a hash of their ports)."""
    for _ in range(tries):
        client = make()
        if worker_of(srv.port, client.port, pids) == target:
            client.worker = target
            return client
        client.ws.close() if isinstance(client, Slow) else client.close()
    raise AssertionError(f"no connection landed on worker {target} in {tries} tries")


@dataclass
class Publisher:
    """Sequential POSTs over one keep-alive connection: the registration order is the seq order."""

    srv: Server
    sent: int = 0
    bytes_sent: int = 0
    reconnects: int = 0
    conn: http.client.HTTPConnection = field(init=False)

    def __post_init__(self) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", self.srv.broadcast_port, timeout=10)

    def publish(self) -> None:
        data = json.dumps({"seq": self.sent, "pad": "x" * PAD})
        body = json.dumps({"stream": STREAM, "data": data})
        try:
            self.conn.request("POST", "/_broadcast", body, {"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            # the server closed the idle keep-alive connection (its 408 after --handshake_timeout)
            # before this request: it was not taken, send it again on a new connection
            self.reconnects += 1
            self.conn.close()
            self.conn.request("POST", "/_broadcast", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        resp.read()
        assert resp.status == 201, resp.status
        self.sent += 1
        self.bytes_sent += len(data)


def wait_metric(srv: Server, name: str, value: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (got := metric(srv, name)) != value and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


# ---------------------------------------------------------------------- the test


class Run:
    """The server, the clients, the publication stream, and what was measured."""

    def __init__(self, srv: Server, pids: list[int]) -> None:
        self.srv, self.pids = srv, pids
        self.fast: list[Fast] = []
        self.slow: list[Slow] = []
        self.readers: Readers | None = None
        self.pub = Publisher(srv)
        self.frame_max = PAD + 1024
        self.baseline: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.conns: dict[int, int] = {}
        self.capacity: dict[str, int] = {}
        self.t0 = 0.0

    def connect(self) -> None:
        srv, pids = self.srv, self.pids
        for i in range(FAST):
            self.fast.append(on_worker(lambda: Fast(srv), srv, pids[i % 2], pids))
        self.readers = Readers(self.fast)
        self.readers.start()
        # warm up: the same message size through every path (allocator, Redis reply buffers)
        for _ in range(20):
            self.pub.publish()
        self.readers.wait(self.pub.sent, 15)
        time.sleep(0.5)
        self.baseline = {pid: rss_kb(pid) for pid in pids}
        self.peak = dict(self.baseline)
        self.slow.append(on_worker(lambda: Slow(srv, "stalled", rcvbuf=4096, trickle=False), srv, pids[0], pids))
        self.slow.append(on_worker(lambda: Slow(srv, "trickle", rcvbuf=None, trickle=True), srv, pids[1], pids))
        self.conns = {pid: sum(c.worker == pid for c in [*self.fast, *self.slow]) for pid in pids}
        assert all(n == (FAST // 2) + 1 for n in self.conns.values()), self.conns
        # what the kernel may buffer towards each (the server's send buffer grows up to
        # tcp_wmem's maximum, the client's receive queue), then the server's own backlog
        self.capacity = {
            s.name: tcp_wmem_max() + 2 * s.rcvbuf + 65536 + MAX_PENDING + 2 * self.frame_max for s in self.slow
        }
        for s in self.slow:
            s.start()

    def stream(self) -> float:
        """Publish at RATE until both slow clients are dropped (or their deadline is past)."""
        pub, slow = self.pub, self.slow
        start_bytes = pub.bytes_sent
        self.t0 = next_at = time.monotonic()
        checked = 0
        while True:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += 1 / RATE
            pub.publish()
            now = time.monotonic()
            for s in slow:
                if not s.full_at and pub.bytes_sent - start_bytes >= self.capacity[s.name]:
                    s.full_at = now
            if pub.sent - checked >= 5:  # every 0.1 s: the log, the workers' RSS
                checked = pub.sent
                self.sample(now)
            if now - self.t0 < MIN_RUN_S:
                continue
            if all(s.dropped_at for s in slow) and now > max(s.dropped_at for s in slow) + AFTER_DROP_S:
                break
            if all(s.full_at for s in slow) and now > max(s.full_at for s in slow) + WRITE_TIMEOUT + MARGIN_S:
                break  # past the deadline: asserted by the test
        return time.monotonic() - self.t0

    def sample(self, now: float) -> None:
        output = self.srv.output()
        for s in self.slow:
            if not s.dropped_at and f"client too slow, disconnecting conn={s.ref}" in output:
                s.dropped_at = now
        for pid in self.pids:
            self.peak[pid] = max(self.peak[pid], rss_kb(pid))

    def rss_bound(self, pid: int) -> int:
        """KB a worker may gain: a full backlog and a frame per connection, and the margin."""
        return self.conns[pid] * (MAX_PENDING + self.frame_max) // 1024 + RSS_MARGIN_KB

    def close(self) -> None:
        if self.readers is not None:
            self.readers.stop.set()
        for f in self.fast:
            f.close()
        for s in self.slow:
            s.ws.close()


def report(run: Run, elapsed: float, drained: dict[str, Drained], slow_total: float) -> None:
    pub = run.pub
    print(
        f"\nslow clients on 2 workers: published={pub.sent} in {elapsed:.1f} s "
        f"({pub.bytes_sent / elapsed / 1e6:.2f} MB/s to each subscriber), connections per worker={run.conns}, "
        f"broadcast reconnects={pub.reconnects}"
    )
    for s in run.slow:
        seqs, code, control = drained[s.name]
        full = f"{s.full_at - run.t0:.2f}" if s.full_at else "never"
        dropped = f"{s.dropped_at - run.t0:.2f}" if s.dropped_at else "never"
        print(
            f"  {s.name}: worker={s.worker} buffers full at {full} s, dropped at {dropped} s, "
            f"then read {len(seqs)} messages, close={code}, control={control}"
        )
    for pid in run.pids:
        print(
            f"  worker {pid}: rss baseline={run.baseline[pid]} KB peak={run.peak[pid]} KB "
            f"(bound {run.baseline[pid] + run.rss_bound(pid)} KB)"
        )
    print(f"  disconnected_slow_clients_total={slow_total:g}")


def check_slow(run: Run, s: Slow, drained: Drained, output: str) -> None:
    """Dropped as too_slow by its own worker, in time; what it read after is a clean prefix."""
    assert s.full_at, f"{s.name}: the run ended before its buffers could be full"
    assert s.dropped_at, f"{s.name} was never disconnected as too_slow"
    assert s.dropped_at <= s.full_at + WRITE_TIMEOUT + MARGIN_S, (s.name, s.full_at - run.t0, s.dropped_at - run.t0)
    lines = [ln for ln in output.splitlines() if f"conn={s.ref}" in ln]
    # the backlog bound acted first (the flush of the close frame may time out after it)
    assert "client too slow, disconnecting" in lines[0], lines
    assert f"pid={s.worker}" in lines[0], lines[0]
    seqs, code, control = drained
    if seqs:  # from the first message after its subscription, without a gap
        assert seqs == list(range(20, 20 + len(seqs))), "lost, duplicated or reordered"
    if code is not None:  # all of it got through: the disconnect came right before the close
        assert control == [{"type": "disconnect", "reason": "too_slow", "reconnect": True}], control
        assert code == 1000
    else:
        assert control == [], control
    assert s.ws.wait_eof(10)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_slow_clients_on_two_workers_are_dropped_and_nobody_else_suffers(
    make_server: type[Server], prefix: str
) -> None:
    srv = make_server(*server_args(prefix)).start()
    assert srv.proc is not None
    pids = wait_children(srv.proc.pid, 2)
    deadline = time.monotonic() + 15
    while srv.output().count("worker serving index=") < 2:
        assert time.monotonic() < deadline, srv.output()[-3000:]
        time.sleep(0.05)

    run = Run(srv, pids)
    try:
        run.connect()
        elapsed = run.stream()
        assert run.readers is not None
        run.readers.wait(run.pub.sent, 30)
        run.readers.stop.set()
        run.readers.join(5)
        drained = {s.name: s.drain() for s in run.slow}
        output = srv.output()
        slow_total = wait_metric(srv, "disconnected_slow_clients_total", 2)
        report(run, elapsed, drained, slow_total)

        # the fast clients: everything, once, in order
        for f in run.fast:
            assert not f.failure, f.failure
            assert [n for n, _ in f.got] == list(range(run.pub.sent)), "lost, duplicated or reordered"
            offsets = [o for _, o in f.got]
            assert offsets == list(range(offsets[0], offsets[0] + run.pub.sent))
        # memory: bounded by the backlog limit, per worker
        for pid in pids:
            assert run.peak[pid] - run.baseline[pid] <= run.rss_bound(pid), (pid, run.baseline[pid], run.peak[pid])
        # the slow ones
        for s in run.slow:
            check_slow(run, s, drained[s.name], output)
        assert slow_total == 2  # the two slow ones, no fast one
        assert "Traceback" not in output, output[output.index("Traceback") - 2000 :][:6000]
        assert wait_metric(srv, "clients_num", FAST) == FAST
    finally:
        run.close()
