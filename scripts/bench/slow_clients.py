#!/usr/bin/env python3
"""What two slow clients cost everybody else: fast subscribers' delivery latency with and without them.

    python scripts/bench/slow_clients.py                 # starts the server: 2 workers, Redis broker
    python scripts/bench/slow_clients.py --rounds 3 --rate 50 --payload 32000 --messages 300

Starts ``anycable-gevent --workers=2 --reuseport --broker=redis --pubsub=redis
--public_streams --noauth`` (``--redis-url``, a key prefix of its own, deleted afterwards;
``--server-arg`` adds options) and connects ``--fast`` subscribers to one stream, half on
each worker (which worker holds a connection is read from ``/proc``). Each round has two
phases of ``--messages`` publications of ``--payload`` bytes at ``--rate`` per second, POSTed
one after the other on one keep-alive connection:

* **without**: only the fast subscribers;
* **with**: also one subscriber that never reads (``SO_RCVBUF`` 4 KB) and one that reads one
  byte a second, one on each worker, connected just before the phase. The server should drop
  both as ``too_slow`` once their kernel buffers and ``--ws_max_pending_size`` are full.

Latency is the time from the POST being written to a fast subscriber having the message
(``CLOCK_MONOTONIC`` in both processes), over every delivery of the phase; ``while slow``
counts only the messages published before the last slow client was dropped. The fast
subscribers are read by a process of their own (one epoll). Stdlib only (uses cablebench's
frames and /proc helpers).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing import Pipe, Process
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from cablebench import wsframe  # noqa: E402
from cablebench.procfs import descendants, rss_kb, worker_of  # noqa: E402
from cablebench.server import free_port  # noqa: E402

EXT = "actioncable-v1-ext-json"
STREAM = "bench-slow"
IDENTIFIER = json.dumps({"channel": "$pubsub", "stream_name": STREAM}, separators=(",", ":"))
SUBSCRIBE = wsframe.client_frame(json.dumps({"command": "subscribe", "identifier": IDENTIFIER}).encode())


class Sub:
    """A subscribed client on a blocking socket (the handshake read nothing beyond the confirmation)."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = wsframe.new_key()
        self.sock.sendall(wsframe.upgrade_request(f"127.0.0.1:{port}", "/cable", key, [EXT], []))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)  # byte by byte: nothing after the confirmation is read
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            head += chunk
        wsframe.check_upgrade(head[:-4], key)
        self.sid = ""
        self.parser = wsframe.FrameParser()
        self._until("welcome")
        self.sock.sendall(SUBSCRIBE)
        self._until("confirm_subscription")
        self.port = self.sock.getsockname()[1]

    def _until(self, kind: str) -> None:
        while True:
            # read exactly one frame: its 2-byte head, the extended length, the payload
            head = self._exact(2)
            n = head[1] & 0x7F
            ext = self._exact(2 if n == 126 else 8 if n == 127 else 0)
            frames = self.parser.feed(head + ext + self._exact(int.from_bytes(ext, "big") if ext else n))
            for fr in frames:
                msg = json.loads(fr.payload)
                if msg.get("type") == "welcome":
                    self.sid = msg.get("sid", "")
                if msg.get("type") == kind:
                    return

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed during the handshake")
            out += chunk
        return out

    @property
    def ref(self) -> str:
        """The server's name for this connection in its log (``conn=``)."""
        return hashlib.sha256(self.sid.encode()).hexdigest()[:8]


def placed(port: int, pids: list[int], target: int, rcvbuf: int | None = None) -> Sub:
    """A subscriber on worker ``target`` (SO_REUSEPORT spreads by a hash of the ports: retry)."""
    for _ in range(60):
        sub = Sub(port, rcvbuf)
        if worker_of(port, sub.port, pids) == target:
            return sub
        sub.sock.close()
    raise SystemExit(f"no connection landed on worker {target}")


def reader(port: int, pids: list[int], n: int, pipe: Any) -> None:
    """The fast subscribers, in a process of their own: receipt times of every seq."""
    subs = [placed(port, pids, pids[i % 2]) for i in range(n)]
    placement = {pid: sum(i % 2 == k for i in range(n)) for k, pid in enumerate(pids)}
    ep = select.epoll()
    by_fd = {}
    for i, s in enumerate(subs):
        s.sock.setblocking(False)
        by_fd[s.sock.fileno()] = i
        ep.register(s.sock.fileno(), select.EPOLLIN)
    ep.register(pipe.fileno(), select.EPOLLIN)
    got: list[list[tuple[int, float]]] = [[] for _ in subs]
    closed = 0
    pipe.send(("ready", placement))
    while True:
        events = ep.poll(1.0)
        now = time.monotonic()
        for fd, _ in events:
            if fd == pipe.fileno():
                pipe.recv()
                pipe.send(("done", got, closed))
                return
            i = by_fd[fd]
            try:
                data = subs[i].sock.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                closed += 1
                ep.unregister(fd)
                continue
            for fr in subs[i].parser.feed(data):
                if fr.opcode == wsframe.OP_TEXT:  # pings and confirmations carry no sequence
                    m = wsframe.SEQ_RE.search(fr.payload, 0, 400)
                    if m:
                        got[i].append((int(m.group(1)), now))


class Trickle(threading.Thread):
    """Reads one byte a second."""

    def __init__(self, sub: Sub) -> None:
        super().__init__(daemon=True)
        self.sub = sub
        self.stop = threading.Event()

    def run(self) -> None:
        self.sub.sock.settimeout(1.0)
        while not self.stop.wait(1.0):
            try:
                if not self.sub.sock.recv(1):
                    return
            except TimeoutError:
                continue
            except OSError:
                return


class Publisher:
    def __init__(self, port: int, payload: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.pad = "x" * payload
        self.seq = 0
        self.sent_at: dict[int, float] = {}

    def publish(self) -> None:
        body = json.dumps({"stream": STREAM, "data": json.dumps({"seq": self.seq, "pad": self.pad})})
        self.sent_at[self.seq] = time.monotonic()
        try:
            self.conn.request("POST", "/_broadcast", body, {"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):  # an idle keep-alive connection was closed
            self.conn.close()
            self.conn.request("POST", "/_broadcast", body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        resp.read()
        if resp.status != 201:
            raise SystemExit(f"broadcast answered {resp.status}")
        self.seq += 1

    def run(self, n: int, rate: float, each: Any = None) -> tuple[int, int]:
        """Publish ``n`` at ``rate``/s (a fixed schedule); returns the seq range."""
        first = self.seq
        next_at = time.monotonic()
        for _ in range(n):
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += 1 / rate
            self.publish()
            if each is not None and self.seq % 5 == 0:
                each()
        return first, self.seq


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def redis_cleanup(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN + DEL over a bare RESP connection)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=10) as s:
        f = s.makefile("rb")

        def call(*args: str | bytes) -> Any:
            parts = [a if isinstance(a, bytes) else a.encode() for a in args]
            s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
            return read()

        def read() -> Any:
            line = f.readline()[:-2]
            kind, rest = line[:1], line[1:]
            if kind == b"-":
                raise RuntimeError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return None if rest == b"-1" else f.read(int(rest) + 2)[:-2]
            if kind == b"*":
                return [read() for _ in range(int(rest))]
            return rest

        if u.password:
            call("AUTH", *([u.username] if u.username else []), u.password)
        deleted, cursor = 0, b"0"
        while True:
            cursor, keys = call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", "1000")
            if keys:
                deleted += call("DEL", *keys)
            if cursor == b"0":
                return deleted


def start_server(
    args: argparse.Namespace, prefix: str, log: Any
) -> tuple[subprocess.Popen[bytes], int, int, list[int]]:
    port, bport = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "anycable_gevent", "--host=127.0.0.1", f"--port={port}",
        f"--http_broadcast_port={bport}", "--workers=2", "--reuseport", "--broker=redis", "--pubsub=redis",
        "--public_streams", "--noauth", f"--redis_url={args.redis_url}", f"--redis_prefix={prefix}",
        f"--ws_max_pending_size={args.max_pending}", f"--ws_write_timeout={args.write_timeout:g}",
        *args.server_arg,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCABLE_")}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while Path(log.name).read_text().count("worker serving index=") < 2:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("server did not start:\n" + Path(log.name).read_text()[-3000:])
        time.sleep(0.1)
    pids = sorted(pid for pid in descendants(server.pid) if pid != server.pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        assert resp.status == 200
    return server, port, bport, pids


#: a phase: its name, the seq range it published, the seq published by the last slow client's drop
Phase = tuple[str, tuple[int, int], int]


def phase_with_slow(
    args: argparse.Namespace, pub: Publisher, port: int, pids: list[int], log: str
) -> tuple[Phase, str]:
    """A phase with the two slow clients connected just before it; (the phase, a line on the drops)."""
    stalled = placed(port, pids, pids[0], rcvbuf=4096)
    trickle = placed(port, pids, pids[1])
    reader = Trickle(trickle)
    reader.start()
    dropped: dict[str, tuple[float, int]] = {}  # name -> (seconds into the phase, seq published by then)
    rss0 = {pid: rss_kb([pid]) for pid in pids}
    peak = dict(rss0)
    t0 = time.monotonic()

    def watch() -> None:
        text = Path(log).read_text()
        for name, sub in (("stalled", stalled), ("trickle", trickle)):
            if name not in dropped and f"client too slow, disconnecting conn={sub.ref}" in text:
                dropped[name] = (time.monotonic() - t0, pub.seq)
        for pid in pids:
            peak[pid] = max(peak[pid], rss_kb([pid]))

    span = pub.run(args.messages, args.rate, watch)
    watch()
    reader.stop.set()
    stalled.sock.close()
    trickle.sock.close()
    last = max(dropped.get(name, (0.0, span[1]))[1] for name in ("stalled", "trickle"))
    when = ", ".join(
        f"{name} at {dropped[name][0]:.2f} s" if name in dropped else f"{name} not dropped"
        for name in ("stalled", "trickle")
    )
    growth = {pid: peak[pid] - rss0[pid] for pid in pids}
    return ("with", span, last), f"{when} into the phase; worker RSS growth during it {growth} KB"


def report(phases: list[Phase], got: list[list[tuple[int, float]]], sent_at: dict[int, float]) -> None:
    def latencies(lo: int, hi: int) -> tuple[list[float], int, int]:
        out, missing, dups = [], 0, 0
        for recs in got:
            seen: dict[int, float] = {}
            for seq, at in recs:
                if lo <= seq < hi:
                    dups += seq in seen
                    seen[seq] = at
            missing += (hi - lo) - len(seen)
            out += [1000 * (at - sent_at[seq]) for seq, at in seen.items()]
        return out, missing, dups

    print(f"{'phase':<16} {'deliveries':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'missing':>8} {'dups':>5}")
    for name, (lo, hi), last in phases:
        rows = [(name, lo, hi)] + ([("  while slow", lo, last)] if lo < last < hi else [])
        for label, a, b in rows:
            lat, missing, dups = latencies(a, b)
            print(
                f"{label:<16} {len(lat):>10} {pct(lat, 0.5):>8.1f} {pct(lat, 0.99):>8.1f} "
                f"{max(lat, default=float('nan')):>8.1f} {missing:>8} {dups:>5}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", type=int, default=10, help="fast subscribers")
    p.add_argument("--messages", type=int, default=300, help="publications per phase")
    p.add_argument("--rate", type=float, default=50.0, help="publications per second")
    p.add_argument("--payload", type=int, default=32_000, help="pad bytes per message")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (without, with)")
    p.add_argument("--max-pending", type=int, default=262_144, help="--ws_max_pending_size of the server")
    p.add_argument("--write-timeout", type=float, default=2.0, help="--ws_write_timeout of the server")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--server-arg", action="append", default=[], help="extra server option (repeat)")
    p.add_argument("--keep-log", action="store_true")
    args = p.parse_args()

    prefix = f"bench-slow:{os.urandom(5).hex()}:"
    log = tempfile.NamedTemporaryFile(prefix="slow-clients-", suffix=".log", delete=False)
    server, port, bport, pids = start_server(args, prefix, log)
    proc: Process | None = None
    phases: list[Phase] = []
    drops: list[str] = []
    try:
        ours, theirs = Pipe()
        proc = Process(target=reader, args=(port, pids, args.fast, theirs))
        proc.start()
        _, placement = ours.recv()
        pub = Publisher(bport, args.payload)
        warm = pub.run(20, args.rate)
        time.sleep(1.0)
        print(
            f"slow clients bench: 2 workers {pids}, fast subscribers per worker {placement}, "
            f"{args.messages} messages of {args.payload} B at {args.rate:g}/s per phase, "
            f"--ws_max_pending_size={args.max_pending} --ws_write_timeout={args.write_timeout:g}",
            flush=True,
        )
        for r in range(args.rounds):
            phases.append(("without", pub.run(args.messages, args.rate), 0))
            time.sleep(1.0)
            phase, line = phase_with_slow(args, pub, port, pids, log.name)
            phases.append(phase)
            drops.append(f"round {r + 1}: slow clients dropped: {line}")
            time.sleep(1.0)
        ours.send("stop")
        _, got, closed = ours.recv()
        proc.join(10)
        proc = None
    finally:
        if proc is not None:
            proc.kill()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        try:
            redis_cleanup(args.redis_url, prefix)
        except (OSError, RuntimeError) as exc:
            print(f"could not delete the Redis keys under {prefix}: {exc}", file=sys.stderr)
        if args.keep_log:
            print(f"server log: {log.name}")
        else:
            os.unlink(log.name)

    report(phases, got, pub.sent_at)
    for line in drops:
        print(line)
    in_order = all([s for s, _ in recs] == list(range(warm[0], pub.seq)) for recs in got)
    print(f"every fast subscriber got every message once and in order: {in_order}; closed by the server: {closed}")


if __name__ == "__main__":
    main()
