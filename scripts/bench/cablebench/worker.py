"""A load-generator worker process: holds its share of the N clients and stamps every receipt.

One process, one ``select.epoll``, raw non-blocking sockets. A client goes TCP connect →
WebSocket upgrade → ``welcome`` → ``subscribe`` → ``confirm_subscription`` (frames parsed
properly), then becomes *live*: from then on its reads are only scanned for ``"seq":N`` and
the receipt time is the moment ``epoll.poll`` returned (one ``CLOCK_MONOTONIC`` read per
wake-up, comparable across processes). Live counts go to the parent through shared memory,
receipts through the control socket at the end.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cablebench import wsframe

READ_SIZE = 65536
MAX_EVENTS = 1024
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# ---------------------------------------------------------------------------- parent <-> worker


def send_msg(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def recv_msg(sock: socket.socket) -> Any:
    """One message from a blocking control socket; ``None`` when the peer is gone."""
    head = _recv_exact(sock, 8)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("!Q", head)[0])
    return None if body is None else pickle.loads(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Counters:
    """Live progress per worker in anonymous shared memory (created before fork, one int64 each)."""

    FIELDS = ("connected", "subscribed", "failed", "received", "lost", "connect_done", "wakeups")

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._mm = mmap.mmap(-1, 8 * len(self.FIELDS) * workers)
        self.view = memoryview(self._mm).cast("q")

    def slot(self, worker: int, name: str) -> int:
        return worker * len(self.FIELDS) + self.FIELDS.index(name)

    def total(self, name: str) -> int:
        i = self.FIELDS.index(name)
        n = len(self.FIELDS)
        return sum(self.view[w * n + i] for w in range(self.workers))


# ---------------------------------------------------------------------------- worker


@dataclass
class WorkerSpec:
    """What one worker does; built by the parent before fork, so nothing is pickled."""

    index: int
    clients: int
    concurrency: int
    family: int
    sockaddr: tuple[Any, ...]
    host_header: str
    path: str
    subprotocols: list[str]
    headers: list[str]
    identifier: str
    max_seq: int
    handshake_timeout: float
    local_addrs: list[str] = field(default_factory=list)


CONNECTING, UPGRADING, WELCOME, CONFIRMING = range(4)


class Pending:
    """A client still handshaking."""

    __slots__ = ("sock", "fd", "stage", "key", "head", "parser", "t0")

    def __init__(self, sock: socket.socket, t0: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.stage = CONNECTING
        self.key = wsframe.new_key()
        self.head = b""
        self.parser = wsframe.FrameParser()
        self.t0 = t0


class Fail(Exception):
    """A handshake went wrong; the message is what the report shows."""


class Worker:
    def __init__(self, spec: WorkerSpec, ctl: socket.socket, counters: Counters) -> None:
        self.spec = spec
        self.ctl = ctl
        self.counters = counters
        self.ep = select.epoll()
        self.pending: dict[int, Pending] = {}
        self.live: dict[int, socket.socket] = {}
        # Indexed by fd: a live client's receipt bitmap (index = seq) and its carried-over bytes.
        self.seen: list[bytearray | None] = []
        self.carry: list[bytes] = []
        self.dead_seen: list[bytearray] = []
        self._track(ctl.fileno())  # every fd registered with epoll is covered by these lists
        self.times = [array("d") for _ in range(spec.max_seq + 1)]
        self.runs: list[tuple[int, int, float]] = []  # (first seq, last seq, time) of multi-receipt reads
        self.handshake_ms = array("d")
        self.errors: Counter[str] = Counter()
        self.lost_reasons: Counter[str] = Counter()
        self.received = 0
        self.duplicates = 0
        self.unexpected = 0
        self.failed = 0
        self.connected = 0
        self.lost = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.launched = 0
        self.next_expiry = 0.0
        self.subscribe_frame = wsframe.client_frame(
            json.dumps({"command": "subscribe", "identifier": spec.identifier}).encode()
        )

    # ------------------------------------------------------------------ connect phase
    def _launch(self, n: int) -> None:
        spec = self.spec
        sock = socket.socket(spec.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        if not self.t_first:
            self.t_first = now
        p = Pending(sock, now)
        self._track(p.fd)
        self.pending[p.fd] = p
        try:
            if spec.local_addrs:
                # Pick the source port at connect() time, per (source, destination) pair.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((spec.local_addrs[n % len(spec.local_addrs)], 0))
            err = sock.connect_ex(spec.sockaddr)
            if err not in (0, errno.EINPROGRESS):
                raise Fail(f"connect: {os.strerror(err)}")
        except OSError as exc:
            self._fail(p, f"connect: {exc.strerror or exc}")
            return
        except Fail as exc:
            self._fail(p, str(exc))
            return
        self.ep.register(p.fd, select.EPOLLOUT)

    def _track(self, fd: int) -> None:
        while len(self.seen) <= fd:
            self.seen.append(None)
            self.carry.append(b"")

    def _fail(self, p: Pending, reason: str) -> None:
        self.pending.pop(p.fd, None)
        try:
            self.ep.unregister(p.fd)
        except (OSError, ValueError):
            pass
        p.sock.close()
        self.failed += 1
        self.errors[reason] += 1
        self.t_last = time.monotonic()

    def _handshake_event(self, p: Pending, ev: int, now: float) -> None:
        try:
            if p.stage == CONNECTING:
                err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise Fail(f"connect: {os.strerror(err)}")
                spec = self.spec
                req = wsframe.upgrade_request(spec.host_header, spec.path, p.key, spec.subprotocols, spec.headers)
                p.sock.sendall(req)  # a few hundred bytes into an empty socket buffer
                p.stage = UPGRADING
                self.ep.modify(p.fd, select.EPOLLIN)
                return
            data = p.sock.recv(READ_SIZE)
            if not data:
                raise Fail(f"closed by server during handshake ({_stage_name(p.stage)})")
            if p.stage == UPGRADING:
                p.head += data
                end = p.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(p.head) > 65536:
                        raise Fail("upgrade response head too large")
                    return
                wsframe.check_upgrade(p.head[:end], p.key)
                data, p.head = p.head[end + 4 :], b""
                p.stage = WELCOME
                self.connected += 1
            self._handshake_frames(p, p.parser.feed(data), now)
        except BlockingIOError:
            return
        except wsframe.HandshakeError as exc:
            self._fail(p, str(exc))
        except Fail as exc:
            self._fail(p, str(exc))
        except OSError as exc:
            self._fail(p, f"{_stage_name(p.stage)}: {exc.strerror or exc}")

    def _handshake_frames(self, p: Pending, frames: list[wsframe.Frame], now: float) -> None:
        for i, frame in enumerate(frames):
            if frame.opcode == wsframe.OP_PING:
                p.sock.sendall(wsframe.client_frame(frame.payload, wsframe.OP_PONG))
                continue
            if frame.opcode == wsframe.OP_CLOSE:
                code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
                raise Fail(f"close frame {code} during handshake ({_stage_name(p.stage)})")
            if frame.opcode != wsframe.OP_TEXT:
                continue
            try:
                msg = json.loads(frame.payload)
            except ValueError:
                raise Fail(f"non-JSON frame during handshake: {frame.payload[:80]!r}") from None
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "disconnect":
                raise Fail(f"disconnect during handshake: reason={msg.get('reason')!r}")
            if kind == "reject_subscription":
                raise Fail("reject_subscription")
            if p.stage == WELCOME and kind == "welcome":
                p.sock.sendall(self.subscribe_frame)
                p.stage = CONFIRMING
            elif p.stage == CONFIRMING and kind == "confirm_subscription":
                if msg.get("identifier") != self.spec.identifier:
                    raise Fail(f"confirmation for another identifier: {msg.get('identifier')!r}")
                self._go_live(p, now)
                # Whatever followed the confirmation is ordinary traffic already.
                for later in frames[i + 1 :]:
                    if later.opcode == wsframe.OP_TEXT:
                        self._consume(p.fd, later.payload + b"\n", now)
                rest = p.parser.take_rest()
                if rest:
                    self._consume(p.fd, rest, now)
                return

    def _go_live(self, p: Pending, now: float) -> None:
        del self.pending[p.fd]
        self.live[p.fd] = p.sock
        self.seen[p.fd] = bytearray(self.spec.max_seq + 1)
        self.carry[p.fd] = b""
        self.handshake_ms.append((now - p.t0) * 1000.0)
        self.t_last = now

    def _expire(self, now: float) -> None:
        limit = self.spec.handshake_timeout
        for p in [p for p in self.pending.values() if now - p.t0 > limit]:
            self._fail(p, f"handshake timeout ({_stage_name(p.stage)})")

    # ------------------------------------------------------------------ receive path
    def _consume(self, fd: int, data: bytes, now: float) -> None:
        """Count the receipts in ``data`` (the cold-path twin of the loop in :meth:`run`)."""
        seen = self.seen[fd]
        if seen is None:
            return
        if self.carry[fd]:
            data = self.carry[fd] + data
            self.carry[fd] = b""
        self.received += self._record(seen, [int(d) for d in wsframe.SEQ_RE.findall(data)], now)
        if data and data[-1] in wsframe.TAIL_BYTES:
            self.carry[fd] = wsframe.carry_tail(data)

    def _record(self, seen: bytearray, seqs: list[int], now: float) -> int:
        """Receipts one by one (duplicates and strays counted apart); returns how many were new."""
        new = 0
        top = self.spec.max_seq
        for s in seqs:
            if not 0 < s <= top:
                self.unexpected += 1
            elif seen[s]:
                self.duplicates += 1
            else:
                seen[s] = 1
                self.times[s].append(now)
                new += 1
        return new

    def _lost(self, fd: int, reason: str) -> None:
        sock = self.live.pop(fd)
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        sock.close()
        seen = self.seen[fd]
        if seen is not None:
            self.dead_seen.append(seen)
        self.seen[fd] = None
        self.carry[fd] = b""
        self.lost_reasons[reason] += 1
        self.lost += 1

    def _connect_step(self, now: float) -> bool:
        """Keep ``concurrency`` handshakes in flight; True while some are still to finish."""
        spec = self.spec
        while self.launched < spec.clients and len(self.pending) < spec.concurrency:
            self._launch(self.launched)
            self.launched += 1
        if now >= self.next_expiry:
            self._expire(now)
            self.next_expiry = now + 0.5
        cv, i = self.counters.view, spec.index
        cv[self.counters.slot(i, "connected")] = self.connected
        cv[self.counters.slot(i, "subscribed")] = len(self.live)
        cv[self.counters.slot(i, "failed")] = self.failed
        if self.launched == spec.clients and not self.pending:
            send_msg(self.ctl, self._connect_report())
            cv[self.counters.slot(i, "connect_done")] = 1
            return False
        return True

    def _other_event(self, fd: int, ev: int, now: float) -> bool:
        """An event on the control socket or a handshaking client; False when told to exit."""
        if fd == self.ctl.fileno():
            return self._command()
        p = self.pending.get(fd)
        if p is not None:
            self._handshake_event(p, ev, now)
        return True

    def run(self) -> None:
        spec = self.spec
        ep, seen_by_fd, carry_by_fd, times = self.ep, self.seen, self.carry, self.times
        ep.register(self.ctl.fileno(), select.EPOLLIN)
        cv = self.counters.view
        c_recv = self.counters.slot(spec.index, "received")
        c_lost = self.counters.slot(spec.index, "lost")
        c_wake = self.counters.slot(spec.index, "wakeups")
        wakeups = 0
        findall = wsframe.SEQ_RE.findall
        tail_bytes = wsframe.TAIL_BYTES
        carry_tail = wsframe.carry_tail
        read = os.read
        monotonic = time.monotonic
        poll = ep.poll
        top = spec.max_seq
        runs = self.runs
        ones = memoryview(b"\x01" * (top + 1))
        connecting = self._connect_step(monotonic())
        while True:
            events = poll(0.1 if connecting else 1.0, MAX_EVENTS)
            now = monotonic()
            got = 0
            for fd, ev in events:
                seen = seen_by_fd[fd]
                if seen is None:
                    if not self._other_event(fd, ev, now):
                        return
                    continue
                # Hot path: one read, one regex scan; per receipt only an int() and a bitmap byte.
                try:
                    data = read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._lost(fd, f"read: {exc.strerror or exc}")
                    continue
                if not data:
                    self._lost(fd, "closed by server")
                    continue
                carried = carry_by_fd[fd]
                if carried:
                    data = carried + data
                    carry_by_fd[fd] = b""
                found = findall(data)
                if len(found) == 1:
                    s = int(found[0])
                    if 0 < s <= top and not seen[s]:
                        seen[s] = 1
                        times[s].append(now)
                        got += 1
                    else:
                        got += self._record(seen, [s], now)
                elif found:
                    # Several receipts in one read are nearly always the seqs a..b (in order, or
                    # reversed when the server took overlapping POSTs last-in first-out): record
                    # them as one run, expanded into per-seq times only after the measurement.
                    nums = sorted(map(int, found))
                    a, b = nums[0], nums[-1]
                    if (
                        0 < a
                        and b <= top
                        and b - a + 1 == len(nums)
                        and seen.find(1, a, b + 1) < 0
                        and nums == list(range(a, b + 1))
                    ):
                        seen[a : b + 1] = ones[: b - a + 1]
                        runs.append((a, b, now))
                        got += b - a + 1
                    else:
                        got += self._record(seen, nums, now)
                if data[-1] in tail_bytes:
                    carry_by_fd[fd] = carry_tail(data)
            self.received += got
            cv[c_recv] = self.received
            cv[c_lost] = self.lost
            wakeups += 1
            cv[c_wake] = wakeups
            if connecting:
                connecting = self._connect_step(now)

    def _connect_report(self) -> dict[str, Any]:
        return {
            "subscribed": len(self.live),
            "connected": self.connected,
            "failed": self.failed,
            "errors": dict(self.errors),
            "handshake_ms": self.handshake_ms.tobytes(),
            "t_first": self.t_first,
            "t_last": self.t_last,
        }

    def _command(self) -> bool:
        """Serve one request from the parent; False when the worker should exit."""
        msg = recv_msg(self.ctl)
        if msg is None or msg[0] == "exit":
            return False
        if msg[0] == "collect":
            send_msg(self.ctl, self._results(msg[1]))
        return True

    def _results(self, phases: list[list[int]]) -> dict[str, Any]:
        for a, b, t in self.runs:
            for s in range(a, b + 1):
                self.times[s].append(t)
        self.runs.clear()
        bitmaps = [s for s in self.seen if s is not None] + self.dead_seen
        complete = [sum(1 for seen in bitmaps if all(seen[s] for s in seqs)) for seqs in phases]
        return {
            "times": [t.tobytes() for t in self.times],
            "received": self.received,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "lost": dict(self.lost_reasons),
            "clients": len(bitmaps),
            "complete": complete,
        }


def _stage_name(stage: int) -> str:
    return ("connect", "upgrade", "welcome", "confirm_subscription")[stage]


def worker_main(spec: WorkerSpec, ctl: socket.socket, counters: Counters) -> None:
    """Entry point in the forked child; never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    code = 0
    try:
        Worker(spec, ctl, counters).run()
    except BaseException as exc:  # report, then leave without running the parent's cleanup
        try:
            send_msg(ctl, {"error": f"worker {spec.index}: {type(exc).__name__}: {exc}"})
        except OSError:
            pass
        code = 1
    os._exit(code)
