"""WebSocket endpoint: an upgraded connection's session and its reader loop.

The upgrade itself happens in :mod:`anycable_gevent.transport` (gevent-websocket);
then this module owns the socket and reads frames itself (:class:`FrameReader`): the
payload length is checked against ``--max_message_size`` before a byte of payload is
read (close 1009), unmasking runs at C speed, and RFC 6455 is enforced (close codes,
UTF-8 of text messages, fragment and time limits). Writes never go through
gevent-websocket (see :mod:`anycable_gevent.session`).

Every close the server starts (1002, 1007, 1008, 1009, 1001 at shutdown, ``too_slow``)
ends with a lingering close: the close frame is sent, the socket half-closed, and input
is discarded until the client's close frame or EOF (or the session's close timer), so
the close frame is not lost to a reset.

A burst of frames from one client does not hold the worker: the reader yields to the
other greenlets between frames while input is buffered, and session snapshots are
committed once per batch of frames, not once per command.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import gevent
from geventwebsocket.websocket import WebSocket

from anycable_gevent import protocol
from anycable_gevent.config import Config
from anycable_gevent.controllers.base import Env
from anycable_gevent.errors import (
    ConnectionFailure,
    FrameTimeout,
    InvalidText,
    MessageTooBig,
    TooManyFragments,
)
from anycable_gevent.ids import new_sid
from anycable_gevent.log import Throttle
from anycable_gevent.metrics import Metrics
from anycable_gevent.node import Node
from anycable_gevent.session import CLOSE_GRACE, DebugSession, Session

log = logging.getLogger(__name__)

#: Largest single read of WebSocket data.
READ_CHUNK = 16384

_unpack_short = struct.Struct("!H").unpack
_unpack_long = struct.Struct("!Q").unpack


class ClosedByPeer(Exception):
    """The client sent a close frame."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


#: Close codes a client may send (RFC 6455 §7.4): 1004-1006 and 1015 are reserved, and
#: 1016-2999 are unassigned. Anything else in a close frame is answered with 1002.
def valid_close_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameReader:
    """Reads client messages straight from the socket, with its own small buffer.

    Reading the socket directly (not through the handler's ``BufferedReader``) keeps
    the greenlet's stack shallow where it waits, and that stack is copied to the heap
    for every idle connection. The first read still goes through the handler's reader
    (``read1``): it returns whatever that reader had buffered beyond the HTTP request
    (a client that sent a frame right behind its handshake) or else reads the socket,
    so nothing is lost and no extra system call is spent on checking.

    Limits: a message over ``max_size`` payload bytes or of more than ``max_fragments``
    frames fails the connection before its payload is read; once a message has begun,
    it must be complete within ``frame_timeout`` seconds of the first read that had to
    wait for it (an idle connection between messages waits as long as it likes).
    """

    __slots__ = (
        "recv",
        "sock_recv",
        "buf",
        "pos",
        "max_size",
        "max_fragments",
        "frame_timeout",
        "deadline",
        "mid",
        "on_ping",
        "on_pong",
    )

    def __init__(
        self,
        sock: Any,
        rfile: Any,
        max_size: int,
        on_ping: Any,
        on_pong: Any,
        max_fragments: int = 0,
        frame_timeout: float = 0.0,
    ) -> None:
        self.sock_recv = sock.recv
        self.recv = rfile.read1 if rfile is not None else sock.recv
        self.buf = b""
        self.pos = 0
        self.max_size = max_size
        self.max_fragments = max_fragments
        self.frame_timeout = frame_timeout
        #: monotonic time by which the message being read must be complete (0 = not set)
        self.deadline = 0.0
        #: inside a message (its first header byte has been read)
        self.mid = False
        self.on_ping = on_ping
        self.on_pong = on_pong

    @property
    def buffered(self) -> bool:
        """Input already read from the socket and not parsed yet (a burst)."""
        return self.pos < len(self.buf)

    def _read_more(self, want: int, waiting_mid_message: bool) -> bytes:
        if waiting_mid_message and self.frame_timeout > 0:
            now = time.monotonic()
            if not self.deadline:
                self.deadline = now + self.frame_timeout
            left = self.deadline - now
            if left <= 0:
                raise FrameTimeout("frame not finished in time")
            with gevent.Timeout(left, False):  # type: ignore[arg-type]
                chunk = self.recv(want)
                self.recv = self.sock_recv
                return chunk  # type: ignore[no-any-return]
            raise FrameTimeout("frame not finished in time")
        chunk = self.recv(want)
        self.recv = self.sock_recv  # after the first read: the socket itself
        return chunk  # type: ignore[no-any-return]

    def _exact(self, n: int) -> bytes:
        buf, pos = self.buf, self.pos
        end = pos + n
        if end > len(buf):
            parts = [buf[pos:]]
            have = len(buf) - pos
            while have < n:
                if self.mid or have:
                    chunk = self._read_more(max(n - have, READ_CHUNK), True)
                else:
                    # idle, between messages: wait right here (every frame on the stack of
                    # an idle connection's greenlet is copied to the heap while it waits)
                    chunk = self.recv(max(n, READ_CHUNK))
                    self.recv = self.sock_recv
                if not chunk:
                    raise EOFError
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
            pos, end = 0, n
        if end == len(buf):
            self.buf, self.pos = b"", 0  # nothing left: keep no chunk alive while idle
        else:
            self.buf, self.pos = buf, end
        return buf[pos:end]

    def _skip(self, n: int) -> None:
        """Discard ``n`` bytes of input without keeping them."""
        left = len(self.buf) - self.pos
        if n <= left:
            self.pos += n
            return
        n -= left
        self.buf, self.pos = b"", 0
        while n > 0:
            chunk = self._read_more(min(n, 65536), False)
            if not chunk:
                raise EOFError
            n -= len(chunk)
            if n < 0:  # read past the skipped bytes: keep the rest
                self.buf, self.pos = chunk, len(chunk) + n
                return

    def _control(self, op: int, fin: int, length: int) -> None:
        if not fin or length > 125:
            raise ConnectionFailure("invalid control frame")
        mask = self._exact(4)
        payload = protocol.unmask(self._exact(length), mask) if length else b""
        if op == protocol.OP_CLOSE:
            code = 0
            if length:
                if length < 2:
                    raise ConnectionFailure("close frame with a 1-byte payload", resync=0)
                code = _unpack_short(payload[:2])[0]
                if not valid_close_code(code):
                    raise ConnectionFailure(f"invalid close code {code}", resync=0)
                try:
                    payload[2:].decode()
                except UnicodeDecodeError:
                    raise ConnectionFailure("close reason is not UTF-8", resync=0) from None
            raise ClosedByPeer(code)
        if op == protocol.OP_PING:
            self.on_ping(payload)
        elif op == protocol.OP_PONG:
            self.on_pong()
        else:
            raise ConnectionFailure(f"unknown opcode {op}")

    def message(self) -> tuple[int, str | bytes]:
        """Next text message as ``str`` or binary message as ``bytes``: ``(opcode, payload)``.

        Raises:
            ClosedByPeer: a valid close frame arrived (``code`` 0: it had none).
            ConnectionFailure: the client broke RFC 6455 framing or a limit; the
                subclass names the close code to answer with.
            EOFError: the connection ended.
        """
        opcode = 0
        parts: list[bytes] = []
        size = 0
        fragments = 0
        while True:
            fin, op, length = self._header(*self._exact(2))
            if op >= 0x8:
                self._control(op, fin, length)
                if not opcode:
                    self.mid = False  # a control frame between messages ends nothing
                    self.deadline = 0.0
                continue
            if op == protocol.OP_CONT:
                if not opcode:
                    raise ConnectionFailure("continuation without a message")
            elif op in (protocol.OP_TEXT, protocol.OP_BINARY):
                if opcode:
                    raise ConnectionFailure("new message inside a fragmented one")
                opcode = op
            else:
                raise ConnectionFailure(f"unknown opcode {op}")
            fragments += 1
            if self.max_fragments and fragments > self.max_fragments:
                raise TooManyFragments(f"message of more than {self.max_fragments} frames", resync=4 + length)
            size += length
            if size > self.max_size:
                raise MessageTooBig(f"message of {size} bytes or more", resync=4 + length)
            mask = self._exact(4)
            if length:
                parts.append(protocol.unmask(self._exact(length), mask))
            if fin:
                return self._complete(opcode, parts)

    def _header(self, b1: int, b2: int) -> tuple[int, int, int]:
        """A frame header from its first two bytes: ``(fin, opcode, payload length)``; the mask follows."""
        self.mid = True
        if b1 & 0x70:
            raise ConnectionFailure("reserved bits set")
        if not b2 & 0x80:
            raise ConnectionFailure("client frames must be masked")
        length = b2 & 0x7F
        if length == 126:
            (length,) = _unpack_short(self._exact(2))
        elif length == 127:
            (length,) = _unpack_long(self._exact(8))
        return b1 & 0x80, b1 & 0x0F, length

    def _complete(self, opcode: int, parts: list[bytes]) -> tuple[int, str | bytes]:
        self.mid = False
        self.deadline = 0.0
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        if opcode == protocol.OP_TEXT:
            try:
                return opcode, payload.decode()
            except UnicodeDecodeError:
                raise InvalidText("text message is not UTF-8", resync=0) from None
        return opcode, payload

    def linger(self, resync: int = 0) -> None:
        """After the server sent its close frame: discard input until the client's close
        frame or the end of the connection, so that nothing unread is left when the
        socket is closed (unread input makes the kernel answer with a reset, and the
        client never sees the close frame). The session's close timer bounds the wait.

        Args:
            resync: unread bytes of the frame that caused the close (skipped, then frames
                are parsed again), or -1 when frame boundaries are lost (raw discard).
        """
        self.frame_timeout = 0.0
        try:
            if resync < 0:
                while self._read_more(65536, False):
                    pass
                return
            self._skip(resync)
            while True:
                b1, b2 = self._exact(2)
                length = b2 & 0x7F
                if length == 126:
                    (length,) = _unpack_short(self._exact(2))
                elif length == 127:
                    (length,) = _unpack_long(self._exact(8))
                if b1 & 0x0F == protocol.OP_CLOSE:
                    return
                self._skip(length + (4 if b2 & 0x80 else 0))
        except (EOFError, OSError):
            return


class CableEndpoint:
    """Serves one upgraded WebSocket: builds the session, authenticates, reads."""

    def __init__(self, cfg: Config, node: Node, metrics: Metrics) -> None:
        self.cfg = cfg
        self.node = node
        self.metrics = metrics
        #: (header name, environ key) for each ``--headers`` entry, computed once
        self.headers = [(h.lower(), "HTTP_" + h.upper().replace("-", "_")) for h in cfg.headers]
        self.jwt_header = "x-" + cfg.jwt_param.lower()
        self.jwt_environ = "HTTP_" + self.jwt_header.upper().replace("-", "_")
        #: Connections are authenticated without I/O (no RPC backend), so the 101
        #: response can wait for the welcome and leave in the same write.
        self.local_auth = not cfg.rpc_enabled
        #: unexpected errors: a traceback now and then, not one per client
        self._crashes = Throttle(log, 60.0)

    def env(self, environ: dict[str, Any], remote_addr: str) -> Env:
        scheme = "https" if environ.get("wsgi.url_scheme") == "https" else "http"
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        path = environ.get("PATH_INFO", "")
        qs = environ.get("QUERY_STRING", "")
        url = f"{scheme}://{host}{path}" + (f"?{qs}" if qs else "")
        headers: dict[str, str] = {}
        for name, key in self.headers:
            value = environ.get(key)
            if value:
                if name == "cookie" and self.cfg.proxy_cookies:
                    value = filter_cookies(value, self.cfg.proxy_cookies)
                if value:
                    headers[name] = value
        token = environ.get(self.jwt_environ)
        if not token:
            token = protocol.token_from_protocols(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", ""))
        if token:
            headers[self.jwt_header] = token
        restore = environ.get("HTTP_X_ANYCABLE_RESTORE_SID")
        if restore:
            headers["x-anycable-restore-sid"] = restore
        headers["REMOTE_ADDR"] = remote_addr
        return Env(url=url, headers=headers)

    def __call__(self, environ: dict[str, Any], ws: Any) -> None:
        handler = ws.handler
        ws.closed = True  # gevent-websocket must not write its own close frame later
        sock = handler.socket
        chosen = environ.get("anycable.protocol")
        remote = environ.get("REMOTE_ADDR", "")
        env = self.env(environ, remote)
        cfg = self.cfg
        # --debug: a session class that logs each outgoing frame (the normal one never checks)
        session = (DebugSession if log.isEnabledFor(logging.DEBUG) else Session)(
            new_sid(),
            sock,
            env,
            parse_query(environ.get("QUERY_STRING", "")),
            chosen == protocol.PROTOCOL_EXT_JSON,
            self.metrics,
            cfg.ws_max_pending_size,
            cfg.ws_write_timeout,
        )
        node = self.node
        head: bytes | None = getattr(handler, "upgrade_head", None)
        if head is not None:
            handler.upgrade_head = None
            if self.local_auth:
                session.cork()  # 101 + welcome in one write (see serve())
            session.write(head)
        reader = FrameReader(
            sock,
            _release_http_state(handler, ws, environ),
            cfg.max_message_size,
            lambda payload: session.write(protocol.ws_frame(payload, protocol.OP_PONG)),
            lambda: node.note_activity(session),
            cfg.ws_max_fragments,
            cfg.ws_frame_timeout,
        )
        over = getattr(handler, "handshake_over", None)
        if over is not None:  # the connection stops counting as a handshake in progress
            over()
        take_over = getattr(handler.server, "take_over", None)
        if take_over is not None and session.direct:
            # The socket is ours from now on: served from a greenlet of its own, closed
            # here (TLS sockets stay in the handler's greenlet).
            gevent.spawn_raw(self.serve, session, reader, take_over(handler))
            return
        self.serve(session, reader, None)

    def serve(self, session: Session, reader: FrameReader, release: Callable[[], None] | None) -> None:
        """Authenticate, then read until the connection ends (the connection's greenlet).

        ``release``: the socket was taken over from pywsgi; it is closed here and then
        ``release`` is called.
        """
        node = self.node
        try:
            opened = node.open(session)
            session.uncork()
            if opened:
                self._read_loop(session, reader)
            else:
                reader.linger()
        except Exception:
            self._crashes.error("connection failed conn=%s", session.ref, exc_info=True)
            session.close(protocol.CLOSE_INTERNAL_ERROR, "Internal error")
            reader.linger(-1)
        finally:
            node.close(session)
            if release is not None:
                try:
                    session.sock.close()
                except OSError:
                    pass
                release()

    def _read_loop(self, session: Session, reader: FrameReader) -> None:
        node = self.node
        metrics = self.metrics
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            if session.dirty and not reader.buffered:
                node.end_batch(session)  # about to wait: commit what this batch changed
            try:
                _, payload = reader.message()
            except ClosedByPeer as closed:
                session.reply_close(closed.code)
                session.flush(CLOSE_GRACE)
                return
            except ConnectionFailure as exc:
                log.info("closing: %s code=%d conn=%s", exc, exc.code, session.ref)
                metrics.inc("failed_client_msg_total")
                if exc.counter:
                    metrics.inc(exc.counter)
                session.close(exc.code, exc.reason)
                reader.linger(exc.resync)
                return
            except (EOFError, OSError):
                return
            metrics.counters["data_rcvd_total"] += len(payload)
            session.awaiting_pong = 0.0
            if session.closing:
                continue
            if debug:
                text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
                log.debug("incoming frame sid=%s frame=%s", session.sid, text[:1024])
            node.handle_frame(session, payload)
            if reader.buffered:
                gevent.sleep(0)  # a burst: let everybody else run between its frames


class _DoneWebSocket(WebSocket):
    """gevent-websocket's WebSocket once this module owns the socket.

    The original ``__del__`` tries to send a close frame and builds a throw-away class
    on the way; here the session does all writes and closing, so it does nothing.
    """

    __slots__ = ()

    def __del__(self) -> None:
        pass


def _release_http_state(handler: Any, ws: Any, environ: dict[str, Any]) -> Any:
    """Free what the WSGI handler keeps for plain HTTP; return its buffered reader.

    An idle connection should cost as little as possible: the request headers, the
    environ and the handler are not needed once the WebSocket is open. The reader is
    handed to :class:`FrameReader` for its first read only.
    """
    rfile = handler.rfile
    handler.headers = None
    handler.response_headers = None
    handler.rfile = None
    wsgi_input = getattr(handler, "wsgi_input", None)
    if wsgi_input is not None:
        getattr(wsgi_input, "inner", wsgi_input).rfile = None
    ws.stream = ws.raw_read = ws.raw_write = None
    ws.__class__ = _DoneWebSocket
    environ.clear()
    return rfile


def parse_query(qs: str) -> dict[str, str]:
    """Query parameters; the last value of a repeated key wins (SPEC §2.3)."""
    return dict(parse_qsl(qs, keep_blank_values=True)) if qs else {}


def filter_cookies(header: str, allowed: list[str]) -> str:
    """Keep only the named cookies (names trimmed, unlike anycable-go; SPEC §2.3)."""
    keep = set(allowed)
    out = []
    for piece in header.split(";"):
        name, _, _ = piece.partition("=")
        if name.strip() in keep:
            out.append(piece.strip())
    return "; ".join(out)
