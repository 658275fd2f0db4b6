"""One WebSocket connection: its protocol state and the single owner of its writes.

Writes: :meth:`Session.write` sends straight to the socket while nothing is queued
(a non-blocking ``send`` that never yields); only when the kernel buffer is full does
the rest wait in a byte-bounded backlog drained by a writer greenlet, spawned on demand
and gone when the backlog is empty. Every write of the socket (data, pings, pongs,
close) goes through that one path, so frames never interleave. A backlog over
``ws_max_pending_size`` disconnects the client as ``too_slow``; a write that cannot
progress within ``ws_write_timeout`` aborts the connection. Neither ever delays the
fan-out to other clients.

Reads happen in the connection's own greenlet (see :mod:`anycable_gevent.ws`), which
also runs every command of this connection, one at a time, in order.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import gevent
from gevent.socket import wait_write

from anycable_gevent import protocol
from anycable_gevent.controllers.base import Env, Interest
from anycable_gevent.hub import StreamSub
from anycable_gevent.log import conn_ref, describe_frame

if TYPE_CHECKING:
    from anycable_gevent.metrics import Metrics

log = logging.getLogger(__name__)

#: Seconds a server-closed connection waits for the client's close frame.
CLOSE_GRACE = 2.0

_encode_snapshot = json.JSONEncoder(separators=(",", ":")).encode


class Subscription:
    """A confirmed channel subscription of one connection."""

    __slots__ = ("identifier", "streams", "istate")

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self.streams: dict[str, StreamSub] = {}
        self.istate: dict[str, str] = {}


class Session:
    """State and output of one connection. Created by the WebSocket endpoint."""

    __slots__ = (
        "sid",
        "ext",
        "env",
        "query",
        "identifiers",
        "subscriptions",
        "authenticated",
        "interest",
        "expires_at",
        "closing",
        "closed",
        "sock",
        "_send",
        "_backlog",
        "_pending",
        "_writer",
        "_shutdown_after_flush",
        "max_pending",
        "write_timeout",
        "metrics",
        "awaiting_pong",
        "hold_timer",
        "ping_bucket",
        "dirty",
        "__weakref__",
    )

    def __init__(
        self,
        sid: str,
        sock: Any,
        env: Env,
        query: dict[str, str],
        ext: bool,
        metrics: Metrics,
        max_pending: int = 1 << 20,
        write_timeout: float = 2.0,
    ) -> None:
        self.sid = sid
        self.ext = ext
        self.env = env
        self.query = query
        self.identifiers = ""
        self.subscriptions: dict[str, Subscription] = {}
        self.authenticated = False
        #: Whether a Disconnect call is wanted (SPEC §8.5 "auto" mode): set once any
        #: controller result did not say "no interest".
        self.interest = False
        #: JWT expiry (Unix seconds) when the identity came from a token.
        self.expires_at = 0
        self.closing = False
        self.closed = False
        self.sock = sock
        # The raw non-blocking socket's send: returns at once, never yields.
        raw = getattr(sock, "_sock", None)
        self._send = raw.send if raw is not None and not hasattr(sock, "_sslobj") else None
        self._backlog: deque[bytes | memoryview] | None = None
        self._pending = 0
        self._writer: gevent.Greenlet | None = None
        self._shutdown_after_flush = False
        self.max_pending = max_pending
        self.write_timeout = write_timeout
        self.metrics = metrics
        self.awaiting_pong = 0.0
        self.hold_timer: gevent.Greenlet | None = None
        self.ping_bucket: Any = None
        #: the state changed since the snapshot was last handed to the broker
        self.dirty = False

    @property
    def direct(self) -> bool:
        """Writes go straight to a plain (non-TLS) socket."""
        return self._send is not None

    def __repr__(self) -> str:
        return f"<Session conn={self.ref}>"

    @property
    def ref(self) -> str:
        """This connection's name in logs at info level and above (the sid is a credential)."""
        return conn_ref(self.sid)

    # ------------------------------------------------------------------ output
    def write(self, frame: bytes) -> None:
        """Send one complete frame now, or queue it behind earlier ones. Never yields."""
        if self.closed:
            return
        backlog = self._backlog
        if backlog is None:
            send = self._send
            if send is None:  # TLS: always through the writer greenlet
                self._queue(frame)
                return
            try:
                n = send(frame)
            except BlockingIOError:
                n = 0
            except OSError:
                self._abort()
                return
            if n == len(frame):
                return
            self._queue(memoryview(frame)[n:] if n else frame)
            return
        backlog.append(frame)
        self._pending += len(frame)
        if self.max_pending and self._pending > self.max_pending and not self.closing:
            self._too_slow()

    def write_text(self, text: str) -> None:
        self.write(protocol.text_frame(text))

    def cork(self) -> None:
        """Hold writes until :meth:`uncork`, which sends them with one system call.

        Used for the handshake: the 101 response, the welcome and anything else the
        connect step writes leave in one TCP segment.
        """
        if self._backlog is None and self._writer is None:
            self._backlog = deque()
            self._pending = 0

    def uncork(self) -> None:
        backlog = self._backlog
        if backlog is None or self._writer is not None:
            return
        self._backlog = None
        self._pending = 0
        if backlog:
            self.write(b"".join(backlog))
        if self._shutdown_after_flush and self._backlog is None:
            self._half_close()

    def _queue(self, chunk: bytes | memoryview) -> None:
        self._backlog = deque((chunk,))
        self._pending = len(chunk)
        self._writer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        backlog = self._backlog
        sock = self.sock
        fileno = sock.fileno()
        send = self._send if self._send is not None else sock.send
        try:
            while backlog:
                chunk = backlog[0]
                wait_write(fileno, timeout=self.write_timeout, timeout_exc=TimeoutError("write timed out"))
                try:
                    n = send(chunk)
                except BlockingIOError:
                    continue
                self._pending -= n
                if n == len(chunk):
                    backlog.popleft()
                else:
                    backlog[0] = memoryview(chunk)[n:]
        except TimeoutError:
            self.metrics.inc("timeout_server_msg_total")
            self.metrics.inc("failed_server_msg_total")
            log.info("write timed out, dropping client conn=%s", self.ref)
            self._abort()
            return
        except OSError:
            self._abort()
            return
        finally:
            self._writer = None
        self._backlog = None
        self._pending = 0
        if self._shutdown_after_flush:
            self._half_close()

    @property
    def pending(self) -> int:
        """Bytes waiting in the backlog."""
        return self._pending

    def _too_slow(self) -> None:
        self.metrics.inc("disconnected_slow_clients_total")
        log.info("client too slow, disconnecting conn=%s pending=%d", self.ref, self._pending)
        backlog = self._backlog
        if backlog is not None:
            # keep a partially written frame whole, drop everything queued behind it
            head = backlog[0]
            backlog.clear()
            self._pending = 0
            if isinstance(head, memoryview):
                backlog.append(head)
                self._pending = len(head)
        self.close(protocol.CLOSE_NORMAL, "", protocol.disconnect(protocol.TOO_SLOW, True))

    # ------------------------------------------------------------------ closing
    def close(self, code: int, reason: str = "", message: str | None = None) -> None:
        """Server-side close: optional disconnect frame, close frame, then FIN.

        The reader greenlet sees the client's close reply (or the socket shut down
        after a grace period) and finishes the connection.
        """
        if self.closing or self.closed:
            return
        self.closing = True
        if message is not None:
            self.write(protocol.text_frame(message))
        self.write(protocol.close_frame(code, reason))
        if self.closed:
            return
        if self._backlog is None:
            self._half_close()
        else:
            self._shutdown_after_flush = True
        gevent.spawn_later(CLOSE_GRACE, self._abort)

    def reply_close(self, code: int) -> None:
        """Answer a client's close frame (the reader then ends the connection)."""
        if self.closing or self.closed:
            return
        self.closing = True
        self.write(protocol.close_frame(code if code else protocol.CLOSE_NORMAL))

    def flush(self, timeout: float) -> None:
        """Wait (in the reader greenlet) until queued frames are written or ``timeout``."""
        writer = self._writer
        if writer is not None:
            writer.join(timeout)

    def _half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _abort(self) -> None:
        """Give up on the socket: wake the reader, drop whatever is queued."""
        if self.closed:
            return
        self.closed = True
        self._backlog = None
        self._pending = 0
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)

    def finish(self) -> None:
        """Called by the reader when the connection is over."""
        self.closed = True
        self._backlog = None
        self._pending = 0
        writer = self._writer
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)
        timer = self.hold_timer
        if timer is not None:
            timer.kill(block=False)
            self.hold_timer = None

    # ------------------------------------------------------------------ state
    def note_interest(self, interest: Interest) -> None:
        if interest != Interest.NONE:
            self.interest = True

    def dump(self) -> bytes:
        """The snapshot as JSON bytes: ASCII with escapes, so that any string (even one an
        RPC backend returned with a lone surrogate in it) round-trips."""
        return _encode_snapshot(self.snapshot()).encode()

    def snapshot(self) -> dict[str, Any]:
        """What a restore needs (SPEC §5.3), as a JSON-able dict."""
        return {
            "ids": self.identifiers,
            "subs": {ident: list(sub.streams) for ident, sub in self.subscriptions.items()},
            "cstate": self.env.cstate,
            "istate": {ident: sub.istate for ident, sub in self.subscriptions.items() if sub.istate},
            "disconnectable": self.interest,
            "exp": self.expires_at,
        }


class DebugSession(Session):
    """A session that logs every frame it sends (``--debug``). Chosen per connection at
    upgrade, so that the normal write path carries no logging check."""

    __slots__ = ()

    def write(self, frame: bytes) -> None:
        log.debug("outgoing frame conn=%s sid=%s %s", self.ref, self.sid, describe_frame(frame))
        Session.write(self, frame)
