"""Extended-protocol (``actioncable-v1-ext-json``) clients on one epoll: subscribe, hold, restore by sid.

Shared by ``restore_storm.py`` and ``capacity.py``. A :class:`Conn` goes through
``connect`` → ``upgrade`` → ``ws`` → ``done``:

* fresh: after ``welcome`` it subscribes to its ``$pubsub`` stream and is done at
  ``confirm_subscription``;
* restoring (``?sid=`` of its last session): after ``welcome`` with ``restored: true`` it asks
  for what it missed (``history``: by its last epoch/offset when it has seen one, else
  ``since: 1``), as the JS client does, and is done at ``confirm_history``/``reject_history``;
  a ``welcome`` without ``restored`` means a new session: it subscribes again (``restored``
  stays False) and is done at the confirmation.

A refused or reset connection, an upgrade that is not a 101, or an end of stream before
``done`` makes it ``failed`` (:attr:`Conn.error` says why); what to do then (give up, retry
later) is the caller's business. Once done, a connection's frames go to ``on_frame``.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import time
from collections.abc import Callable

from cablebench import wsframe

EXT = "actioncable-v1-ext-json"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends a reset


def identifier(stream: str) -> str:
    return json.dumps({"channel": "$pubsub", "stream_name": stream}, separators=(",", ":"))


class Conn:
    __slots__ = (
        "i",
        "stream",
        "ident",
        "sock",
        "key",
        "stage",
        "head",
        "parser",
        "sid",
        "restoring",
        "restored",
        "started_at",
        "done_at",
        "error",
        "epoch",
        "offset",
        "attempts",
    )

    def __init__(self, i: int, stream: str) -> None:
        self.i = i
        self.stream = stream
        self.ident = identifier(stream)
        self.sock: socket.socket | None = None
        self.key = b""
        self.stage = "new"
        self.head = b""
        self.parser = wsframe.FrameParser()
        self.sid = ""
        self.restoring = False
        self.restored = False
        self.started_at = 0.0
        self.done_at = 0.0
        self.error = ""
        self.epoch = ""  # of the last stream message seen (set by the caller's on_frame)
        self.offset = 0
        self.attempts = 0

    def history_request(self) -> bytes:
        if self.offset:
            hist: dict[str, object] = {"streams": {self.stream: {"epoch": self.epoch, "offset": self.offset}}}
        else:
            hist = {"since": 1}
        return json.dumps({"command": "history", "identifier": self.ident, "history": hist}).encode()

    def subscribe_request(self) -> bytes:
        return json.dumps({"command": "subscribe", "identifier": self.ident}).encode()


FrameHandler = Callable[[Conn, wsframe.Frame, float], None]
DataHandler = Callable[[Conn, bytes, float], None]


class Clients:
    """One epoll driving many :class:`Conn` (non-blocking sockets, no threads)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        on_frame: FrameHandler | None = None,
        local_addrs: list[str] | None = None,
        on_data: DataHandler | None = None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.local_addrs = local_addrs or []  # source addresses, by turns (~28k ports each)
        self.on_frame = on_frame
        # Raw bytes of connections that are done, instead of frames: the cheap path of a load
        # generator, which must then find what it looks for across read boundaries itself.
        self.on_data = on_data
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.extra: dict[int, Callable[[], None]] = {}  # other fds to wake up for (a control pipe)
        self.changed: list[Conn] = []

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.extra[fd] = callback
        self.ep.register(fd, select.EPOLLIN)

    def open(self, c: Conn, restore: bool) -> None:
        """Start connecting ``c`` (with ``?sid=`` when ``restore``)."""
        s = socket.socket()
        s.setblocking(False)
        c.sock, c.stage, c.head, c.parser = s, "connect", b"", wsframe.FrameParser()
        c.key, c.restoring, c.restored, c.error = wsframe.new_key(), restore, False, ""
        c.started_at = time.monotonic()
        c.attempts += 1
        if self.local_addrs:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # the port is chosen at connect()
            s.bind((self.local_addrs[c.i % len(self.local_addrs)], 0))
        err = s.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(c, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.by_fd[s.fileno()] = c
        self.ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN)

    def close(self, c: Conn, reset: bool = False) -> None:
        """Forget ``c`` (a reset instead of a FIN with ``reset``, like a network drop)."""
        if c.sock is None:
            return
        fd = c.sock.fileno()
        if self.by_fd.pop(fd, None) is not None:
            self.ep.unregister(fd)
        if reset:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        c.sock.close()
        c.sock = None

    def _fail(self, c: Conn, reason: str) -> None:
        self.close(c, reset=True)
        c.error = reason
        c.stage = "failed" if c.stage != "done" else "dropped"
        self.changed.append(c)

    def poll(self, timeout: float) -> list[Conn]:
        """Handle what is ready within ``timeout`` s; returns the connections that became done,
        failed (not done yet) or dropped (were done), also by :meth:`open`, since the last call."""
        events = self.ep.poll(timeout)
        now = time.monotonic()
        for fd, ev in events:
            c = self.by_fd.get(fd)
            if c is not None:
                self._event(c, fd, ev, now)
            elif (cb := self.extra.get(fd)) is not None:
                cb()
        changed, self.changed = self.changed, []
        return changed

    def _event(self, c: Conn, fd: int, ev: int, now: float) -> None:
        sock = c.sock
        assert sock is not None
        try:
            if c.stage == "connect":
                if ev & select.EPOLLOUT:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._fail(c, f"connect: {errno.errorcode.get(err, err)}")
                        return
                    q = f"{self.path}?sid={c.sid}" if c.restoring else self.path
                    sock.send(wsframe.upgrade_request(f"{self.host}:{self.port}", q, c.key, [EXT], []))
                    c.stage = "upgrade"
                    self.ep.modify(fd, select.EPOLLIN)
                return
            if not ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                return
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(c, f"{c.stage}: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if not data:
            self._fail(c, f"{c.stage}: closed")
            return
        if c.stage == "done" and self.on_data is not None:
            self.on_data(c, data, now)
            return
        if c.stage == "upgrade":
            rest = self._upgrade(c, data)
            if rest is None:
                return
            data = rest
        self._frames(c, data, now)

    def _frames(self, c: Conn, data: bytes, now: float) -> None:
        for frame in c.parser.feed(data):
            if frame.opcode == wsframe.OP_CLOSE:
                self._fail(c, f"{c.stage}: close frame")
                return
            if c.stage == "done":
                if self.on_data is not None:
                    self.on_data(c, frame.payload, now)
                elif self.on_frame is not None:
                    self.on_frame(c, frame, now)
            elif frame.opcode == wsframe.OP_TEXT and not self._handshake_message(c, json.loads(frame.payload), now):
                return
        if c.stage == "done" and self.on_data is not None and c.parser.buf:
            self.on_data(c, c.parser.take_rest(), now)  # from now on its reads go there raw

    def _upgrade(self, c: Conn, data: bytes) -> bytes | None:
        """The bytes after the 101 response once it is complete (else None: wait, or failed)."""
        c.head += data
        if b"\r\n\r\n" not in c.head:
            return None
        head, _, rest = c.head.partition(b"\r\n\r\n")
        try:
            wsframe.check_upgrade(head, c.key)
        except wsframe.HandshakeError as exc:
            self._fail(c, str(exc)[:60])
            return None
        c.stage = "ws"
        return rest

    def _handshake_message(self, c: Conn, msg: dict[str, object], now: float) -> bool:
        sock = c.sock
        assert sock is not None
        kind = msg.get("type")
        if kind == "welcome":
            c.sid = str(msg.get("sid", c.sid))
            c.restored = c.restoring and bool(msg.get("restored"))
            sock.send(wsframe.client_frame(c.history_request() if c.restored else c.subscribe_request()))
        elif kind in ("confirm_subscription", "confirm_history", "reject_history"):
            c.stage = "done"
            c.done_at = now
            self.changed.append(c)
        elif kind in ("reject_subscription", "disconnect"):
            self._fail(c, f"ws: {kind} {msg.get('reason', '')}".strip())
            return False
        return True


def run_phase(conns: list[Conn], host: str, port: int, path: str, restore: bool, timeout: float) -> float:
    """Open every connection at once; returns when each is done or failed (or at ``timeout``)."""
    clients = Clients(host, port, path)
    for c in conns:
        clients.open(c, restore)
    deadline = time.monotonic() + timeout
    # derived from the stages each round (a connection can change more than once, or fail
    # already in open(): counting the changes would count some twice)
    while time.monotonic() < deadline and any(c.stage not in ("done", "failed", "dropped") for c in conns):
        clients.poll(0.5)
    clients.ep.close()
    return time.monotonic()
