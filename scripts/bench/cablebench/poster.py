"""Open-loop HTTP broadcaster: POST number k leaves at t0 + k/rate over keep-alive connections.

A request never waits for the previous reply: when every open connection is busy another is
opened (up to ``max_conns``), so a slow server cannot slow the schedule down, only show up
in ``lag_ms`` when even that pool is exhausted. The send time of each POST is stamped just
before its bytes are written; that stamp is what latencies are measured from.
"""

from __future__ import annotations

import json
import select
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class Conn:
    """One keep-alive HTTP/1.1 connection carrying at most one request at a time."""

    def __init__(self, addr: tuple[str, int], timeout: float) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.buf = b""
        self.seq = 0
        self.t_sent = 0.0

    def close(self) -> None:
        self.sock.close()


class Response:
    __slots__ = ("status", "body", "close")

    def __init__(self, status: int, body: bytes, close: bool) -> None:
        self.status = status
        self.body = body
        self.close = close


def parse_response(buf: bytes, eof: bool) -> tuple[Response | None, bytes]:
    """One complete response from the front of ``buf`` (or None yet) and the bytes after it."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise ConnectionError("connection closed before a response")
        return None, buf
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    close = headers.get("connection") == "close" or parts[0] == "HTTP/1.0"
    start = end + 4
    if status in (204, 304) or 100 <= status < 200:
        return Response(status, b"", close), buf[start:]
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) - start < n:
            if eof:
                raise ConnectionError("connection closed inside a response body")
            return None, buf
        return Response(status, buf[start : start + n], close), buf[start + n :]
    if headers.get("transfer-encoding", "").endswith("chunked"):
        chunked = _dechunk(buf, start)
        if chunked is not None:
            return Response(status, chunked[0], close), buf[chunked[1] :]
        if eof:
            raise ConnectionError("connection closed inside a chunked body")
        return None, buf
    if eof:  # delimited by close
        return Response(status, buf[start:], True), b""
    return None, buf


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """A complete chunked body starting at ``pos``: (body, end offset), or None if incomplete."""
    body: list[bytes] = []
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(buf[pos:line_end].split(b";")[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            return None if trailer_end < 0 else (b"".join(body), trailer_end + 4)
        if len(buf) < line_end + 2 + size + 2:
            return None
        body.append(buf[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2


@dataclass
class PostLog:
    """What happened to the POSTs of one phase."""

    sent: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    status: dict[int, int] = field(default_factory=dict)  # seq -> HTTP status (0 = transport error)
    rtt_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)  # how late each POST left its slot
    errors: dict[str, int] = field(default_factory=dict)
    conns: int = 0

    def ok(self) -> list[int]:
        return sorted(s for s, st in self.status.items() if 200 <= st < 300)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Poster:
    """Sends the benchmark's broadcasts; used from the parent process's main thread."""

    def __init__(
        self,
        url: str,
        stream: str,
        payload: int,
        auth: str | None = None,
        max_conns: int = 32,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"--broadcast-url must be http://host:port/path (https:// is not supported), got {url!r}")
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.host = parts.netloc
        self.stream = stream
        self.pad = "x" * payload
        self.auth = auth
        self.max_conns = max_conns
        self.timeout = timeout
        self.idle: list[Conn] = []

    def body(self, seq: int) -> bytes:
        data = json.dumps({"seq": seq, "pad": self.pad}, separators=(",", ":"))
        return json.dumps({"stream": self.stream, "data": data}, separators=(",", ":")).encode()

    def request(self, seq: int) -> bytes:
        body = self.body(seq)
        head = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.auth:
            head.append(f"Authorization: {self.auth}")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    def warm_up(self) -> None:
        """Open one connection ahead of the first POST, so the first stamp is not a TCP connect."""
        if not self.idle:
            self.idle.append(Conn(self.addr, self.timeout))

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle = []

    def run(self, seqs: list[int], rate: float) -> PostLog:
        """POST each seq on schedule and wait for every reply (or its timeout)."""
        log = PostLog()
        requests = {seq: self.request(seq) for seq in seqs}
        ep = select.epoll()
        busy: dict[int, Conn] = {}
        conn: Conn | None
        opened = len(self.idle)
        for conn in self.idle:
            ep.register(conn.fd, select.EPOLLIN)
        interval = 1.0 / rate
        t0 = time.monotonic() + 0.005
        i = 0
        try:
            while i < len(seqs) or busy:
                now = time.monotonic()
                while i < len(seqs) and now >= t0 + i * interval:
                    conn = self.idle.pop() if self.idle else None
                    if conn is None and len(busy) < self.max_conns:
                        try:
                            conn = Conn(self.addr, self.timeout)
                        except OSError as exc:
                            log.error(f"connect: {exc}")
                            log.status[seqs[i]] = 0
                            i += 1
                            continue
                        opened += 1
                        ep.register(conn.fd, select.EPOLLIN)
                    if conn is None:
                        break  # pool exhausted: this POST goes out late (see lag_ms)
                    seq = seqs[i]
                    log.lag_ms.append(max(0.0, (now - (t0 + i * interval)) * 1000.0))
                    conn.seq = seq
                    conn.t_sent = time.monotonic()
                    try:
                        conn.sock.sendall(requests[seq])
                    except OSError as exc:
                        log.error(f"send: {exc}")
                        log.status[seq] = 0
                        ep.unregister(conn.fd)
                        conn.close()
                    else:
                        log.sent[seq] = conn.t_sent
                        busy[conn.fd] = conn
                    i += 1
                    now = time.monotonic()
                if i < len(seqs):
                    wait = max(0.0, t0 + i * interval - time.monotonic())
                    if len(busy) >= self.max_conns:
                        wait = 0.05
                else:
                    wait = 0.05
                for fd, _ in ep.poll(wait):
                    conn_r = busy.get(fd)
                    if conn_r is None:  # an idle keep-alive connection closed by the server
                        for c in [c for c in self.idle if c.fd == fd]:
                            self.idle.remove(c)
                            ep.unregister(fd)
                            c.close()
                        continue
                    self._read(conn_r, busy, log, ep)
                self._expire(busy, log, ep)
        finally:
            for conn in self.idle:
                ep.unregister(conn.fd)
            ep.close()
        log.conns = opened
        return log

    def _read(self, conn: Conn, busy: dict[int, Conn], log: PostLog, ep: select.epoll) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except OSError as exc:
            self._drop(conn, busy, log, ep, f"recv: {exc}")
            return
        conn.buf += chunk
        try:
            resp, conn.buf = parse_response(conn.buf, eof=not chunk)
        except (ConnectionError, ValueError) as exc:
            self._drop(conn, busy, log, ep, str(exc))
            return
        if resp is None:
            return
        log.status[conn.seq] = resp.status
        log.rtt_ms.append((time.monotonic() - conn.t_sent) * 1000.0)
        if not 200 <= resp.status < 300:
            log.error(f"HTTP {resp.status}: {resp.body[:200].decode(errors='replace')}")
        del busy[conn.fd]
        if resp.close or not chunk:
            ep.unregister(conn.fd)
            conn.close()
        else:
            self.idle.append(conn)

    def _drop(self, conn: Conn, busy: dict[int, Conn], log: PostLog, ep: select.epoll, why: str) -> None:
        log.error(why)
        log.status[conn.seq] = 0
        del busy[conn.fd]
        ep.unregister(conn.fd)
        conn.close()

    def _expire(self, busy: dict[int, Conn], log: PostLog, ep: select.epoll) -> None:
        now = time.monotonic()
        for conn in [c for c in busy.values() if now - c.t_sent > self.timeout]:
            self._drop(conn, busy, log, ep, f"no reply within {self.timeout:g} s")
