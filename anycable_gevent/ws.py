"""WebSocket endpoint: the upgrade (through gevent-websocket) and the reader loop.

gevent-websocket does the HTTP upgrade; this module checks the path and Origin before
it, negotiates the sub-protocol in the 101 response (gevent-websocket alone only
answers a protocol the application hard-codes), adds ``X-AnyCable-Version``, and then
reads frames itself: the payload length is checked against ``--max_message_size``
before a byte of payload is read (close 1009), and unmasking runs at C speed.
Writes never go through gevent-websocket (see :mod:`anycable_gevent.session`).
"""

from __future__ import annotations

import binascii
import logging
import struct
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import gevent
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from anycable_gevent import __version__, protocol
from anycable_gevent.config import Config
from anycable_gevent.controllers.base import Env
from anycable_gevent.errors import MessageTooBig, ProtocolError
from anycable_gevent.ids import new_sid
from anycable_gevent.metrics import Metrics
from anycable_gevent.node import Node
from anycable_gevent.session import CLOSE_GRACE, DebugSession, Session

log = logging.getLogger(__name__)

#: Buffer of the HTTP request reader (anycable-go uses 1 KiB too); the default would be 8 KiB.
READ_BUFFER = 1024
#: Largest single read of WebSocket data.
READ_CHUNK = 16384

_unpack_short = struct.Struct("!H").unpack
_unpack_long = struct.Struct("!Q").unpack


class ClosedByPeer(Exception):
    """The client sent a close frame."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """SPEC §2.2: host[:port] of Origin equals an entry, or ends with the text after ``*``."""
    if not allowed:
        return True
    if not origin:
        return False
    host = urlsplit(origin.strip()).netloc.lower()
    if not host:
        return False
    for entry in allowed:
        entry = entry.lower()
        if entry.startswith("*"):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


class RequestHeaders:
    """Request headers for pywsgi, parsed without the ``email`` package.

    pywsgi's default (``http.client.parse_headers``) builds an ``email`` message for
    every request; on a server that accepts thousands of WebSocket connections a
    second, that parser was the largest single cost of a handshake. This class offers
    the part of that interface pywsgi uses (``get``, ``getheader``, ``headers``,
    ``typeheader``, ``status``, ``del``).
    """

    __slots__ = ("items", "status")

    MAX_LINE = 65536
    MAX_HEADERS = 100

    def __init__(self) -> None:
        #: (lower-cased name, value) pairs in arrival order, repeats kept
        self.items: list[tuple[str, str]] = []
        self.status = ""

    @classmethod
    def parse(cls, fp: Any, *_: Any) -> RequestHeaders:
        headers = cls()
        items = headers.items
        for _count in range(cls.MAX_HEADERS + 1):
            line = fp.readline(cls.MAX_LINE + 1)
            if len(line) > cls.MAX_LINE:
                headers.status = "Line too long"
                return headers
            if line in (b"\r\n", b"\n", b""):
                return headers
            text = line.decode("latin-1")
            if text[0] in " \t" and items:  # obsolete line folding: continues the last value
                name, value = items[-1]
                items[-1] = (name, f"{value} {text.strip()}")
                continue
            name, sep, value = text.partition(":")
            if not sep or not name.strip():
                headers.status = "Invalid header line"
                return headers
            items.append((name.strip().lower(), value.strip()))
        headers.status = "Too many headers"
        return headers

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for key, value in self.items:
            if key == name:
                return value
        return default

    getheader = get

    def __delitem__(self, name: str) -> None:
        name = name.lower()
        self.items = [(k, v) for k, v in self.items if k != name]

    @property
    def headers(self) -> list[str]:
        return [f"{k}: {v}\r\n" for k, v in self.items]

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")  # type: ignore[no-any-return]


class CableHandler(WebSocketHandler):
    """gevent-websocket's handler with AnyCable's upgrade rules."""

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        if rfile is None:
            rfile = sock.makefile("rb", READ_BUFFER)
        super().__init__(sock, address, server, rfile)

    def MessageClass(self, *args: Any) -> RequestHeaders:  # noqa: N802 - pywsgi's name
        return RequestHeaders.parse(*args)

    def _headers(self) -> Any:
        # pywsgi formats every header as a line and splits it again; ours are pairs already
        for key, value in self.headers.items:
            if "_" in key:
                continue  # pywsgi drops names with underscores (they would collide)
            name = key.replace("-", "_").upper()
            if name != "CONTENT_TYPE" and name != "CONTENT_LENGTH":
                yield "HTTP_" + name, value

    def _sendall(self, data: Any) -> None:
        if self.code == 101 and self.environ.get("wsgi.websocket") is not None and not hasattr(self, "upgrade_head"):
            # Keep the 101 response: the session sends it together with the welcome.
            self.upgrade_head = bytes(data)
            self.response_length += len(data)
            return
        super()._sendall(data)

    def upgrade_websocket(self) -> Any:
        endpoint: CableEndpoint | None = getattr(self.server, "cable", None)
        path = self.environ.get("PATH_INFO", "")
        if endpoint is None or path not in endpoint.paths:
            return None  # not a cable path: the WSGI app answers
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return None  # plain HTTP to the cable path: the app answers 400
        if not origin_allowed(self.environ.get("HTTP_ORIGIN"), endpoint.cfg.allowed_origins):
            self.start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"Origin not allowed"]
        if endpoint.cfg.max_conn and len(endpoint.node.sessions) >= endpoint.cfg.max_conn:
            self.start_response("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
            return [b"Too many connections"]
        offered = self.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
        self.environ["anycable.protocol"] = protocol.select_protocol(offered) if offered else None
        # gevent-websocket's own refusals are written for Python 2: HTTP/1.0 gets "402",
        # a key that is not base64 raises binascii.Error, and bodies are str (a 500 here).
        if self.request_version != "HTTP/1.1":
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"WebSocket upgrade needs HTTP/1.1"]
        try:
            result = super().upgrade_websocket()
        except binascii.Error:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Invalid Sec-WebSocket-Key"]
        return [part.encode() if isinstance(part, str) else part for part in result] if result else result

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if status.startswith("101"):
            headers = list(headers)
            chosen = self.environ.get("anycable.protocol")
            if chosen:
                headers.append(("Sec-WebSocket-Protocol", chosen))
            headers.append(("X-AnyCable-Version", __version__))
        return super().start_response(status, headers, exc_info)

    def run_websocket(self) -> None:
        # gevent-websocket also records every connection in ``server.clients``; nothing
        # here reads that map, so skip it (one object and a dict entry per connection).
        try:
            list(self.application(self.environ, lambda status, headers, exc_info=None: []))
        finally:
            self.websocket = None

    def log_request(self) -> None:
        if "101" not in str(self.status):
            log.debug("%s", self.format_request())


class CableServer(WSGIServer):
    """A pywsgi server whose WebSocket connections outlive their WSGI handler.

    Once a connection is upgraded, :class:`CableEndpoint` takes the socket over and
    serves it from a fresh greenlet, and the WSGI handler finishes at once. An idle
    connection then holds only its session, its socket and a shallow greenlet, not the
    handler, the environ and a deep stack (see README: memory per connection).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: ids of client sockets taken over by a session: not closed when the handler ends
        self.detached: set[int] = set()

    def do_close(self, sock: Any, *args: Any) -> None:
        if id(sock) in self.detached:
            self.detached.discard(id(sock))
            return
        super().do_close(sock, *args)


class FrameReader:
    """Reads client messages straight from the socket, with its own small buffer.

    Reading the socket directly (not through the handler's ``BufferedReader``) keeps
    the greenlet's stack shallow where it waits, and that stack is copied to the heap
    for every idle connection. The first read still goes through the handler's reader
    (``read1``): it returns whatever that reader had buffered beyond the HTTP request
    (a client that sent a frame right behind its handshake) or else reads the socket,
    so nothing is lost and no extra system call is spent on checking.
    """

    __slots__ = ("recv", "sock_recv", "buf", "pos", "max_size", "on_ping", "on_pong")

    def __init__(self, sock: Any, rfile: Any, max_size: int, on_ping: Any, on_pong: Any) -> None:
        self.sock_recv = sock.recv
        self.recv = rfile.read1 if rfile is not None else sock.recv
        self.buf = b""
        self.pos = 0
        self.max_size = max_size
        self.on_ping = on_ping
        self.on_pong = on_pong

    def _exact(self, n: int) -> bytes:
        buf, pos = self.buf, self.pos
        end = pos + n
        if end > len(buf):
            parts = [buf[pos:]]
            have = len(buf) - pos
            while have < n:
                chunk = self.recv(max(n - have, READ_CHUNK))
                self.recv = self.sock_recv  # after the first read: the socket itself
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

    def _control(self, op: int, fin: int, length: int) -> None:
        if not fin or length > 125:
            raise ProtocolError("invalid control frame")
        mask = self._exact(4)
        payload = protocol.unmask(self._exact(length), mask) if length else b""
        if op == protocol.OP_CLOSE:
            code = _unpack_short(payload[:2])[0] if len(payload) >= 2 else protocol.CLOSE_NORMAL
            raise ClosedByPeer(code)
        if op == protocol.OP_PING:
            self.on_ping(payload)
        elif op == protocol.OP_PONG:
            self.on_pong()
        else:
            raise ProtocolError(f"unknown opcode {op}")

    def message(self) -> tuple[int, bytes]:
        """Next text or binary message as ``(opcode, payload)``.

        Raises:
            ClosedByPeer: a close frame arrived.
            MessageTooBig: the message is over ``max_size``.
            ProtocolError: the client broke RFC 6455 framing.
            EOFError: the connection ended.
        """
        opcode = 0
        parts: list[bytes] = []
        size = 0
        while True:
            b1, b2 = self._exact(2)
            fin = b1 & 0x80
            if b1 & 0x70:
                raise ProtocolError("reserved bits set")
            op = b1 & 0x0F
            length = b2 & 0x7F
            if not b2 & 0x80:
                raise ProtocolError("client frames must be masked")
            if length == 126:
                (length,) = _unpack_short(self._exact(2))
            elif length == 127:
                (length,) = _unpack_long(self._exact(8))
            if op >= 0x8:
                self._control(op, fin, length)
                continue
            if op == protocol.OP_CONT:
                if not opcode:
                    raise ProtocolError("continuation without a message")
            elif op in (protocol.OP_TEXT, protocol.OP_BINARY):
                if opcode:
                    raise ProtocolError("new message inside a fragmented one")
                opcode = op
            else:
                raise ProtocolError(f"unknown opcode {op}")
            size += length
            if size > self.max_size:
                raise MessageTooBig(f"message of {size} bytes or more")
            mask = self._exact(4)
            parts.append(protocol.unmask(self._exact(length), mask) if length else b"")
            if fin:
                return opcode, parts[0] if len(parts) == 1 else b"".join(parts)


class CableEndpoint:
    """Serves one upgraded WebSocket: builds the session, authenticates, reads."""

    def __init__(self, cfg: Config, node: Node, metrics: Metrics) -> None:
        self.cfg = cfg
        self.node = node
        self.metrics = metrics
        self.paths = set(cfg.path)
        #: (header name, environ key) for each ``--headers`` entry, computed once
        self.headers = [(h.lower(), "HTTP_" + h.upper().replace("-", "_")) for h in cfg.headers]
        self.jwt_header = "x-" + cfg.jwt_param.lower()
        self.jwt_environ = "HTTP_" + self.jwt_header.upper().replace("-", "_")
        #: Connections are authenticated without I/O (no RPC backend), so the 101
        #: response can wait for the welcome and leave in the same write.
        self.local_auth = not cfg.rpc_enabled

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
        # --debug: a session class that logs each outgoing frame (the normal one never checks)
        session = (DebugSession if log.isEnabledFor(logging.DEBUG) else Session)(
            new_sid(),
            sock,
            env,
            parse_query(environ.get("QUERY_STRING", "")),
            chosen == protocol.PROTOCOL_EXT_JSON,
            self.metrics,
            self.cfg.ws_max_pending_size,
            self.cfg.ws_write_timeout,
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
            self.cfg.max_message_size,
            lambda payload: session.write(protocol.ws_frame(payload, protocol.OP_PONG)),
            lambda: node.note_activity(session),
        )
        server = handler.server
        detached = getattr(server, "detached", None)
        if detached is not None and session.direct:
            # Take the socket over: pywsgi must neither drain nor close it when the
            # handler returns (its cleanup is skipped for handler.socket = None and
            # CableServer.do_close skips detached sockets). TLS sockets stay put.
            handler.socket = None
            detached.add(id(sock))
            gevent.spawn_raw(self.serve, session, reader, True)
            return
        self.serve(session, reader, False)

    def serve(self, session: Session, reader: FrameReader, owned: bool) -> None:
        """Authenticate, then read until the connection ends (the connection's greenlet).

        ``owned``: the socket was taken over from pywsgi and is closed here.
        """
        node = self.node
        try:
            opened = node.open(session)
            session.uncork()
            if opened:
                self._read_loop(session, reader)
            else:
                self._drain(session, reader)
        finally:
            node.close(session)
            if owned:
                try:
                    session.sock.close()
                except OSError:
                    pass

    def _read_loop(self, session: Session, reader: FrameReader) -> None:
        node = self.node
        metrics = self.metrics
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            try:
                _, payload = reader.message()
            except ClosedByPeer as closed:
                session.reply_close(closed.code)
                session.flush(CLOSE_GRACE)
                return
            except MessageTooBig as exc:
                log.info("closing: %s conn=%s", exc, session.ref)
                metrics.inc("failed_client_msg_total")
                session.close(protocol.CLOSE_TOO_BIG, "Message too big")
                self._drain(session, reader)
                return
            except ProtocolError as exc:
                log.info("closing: protocol error %s conn=%s", exc, session.ref)
                session.close(protocol.CLOSE_PROTOCOL_ERROR, "Protocol error")
                self._drain(session, reader)
                return
            except (EOFError, OSError):
                return
            metrics.counters["data_rcvd_total"] += len(payload)
            session.awaiting_pong = 0.0
            if session.closing:
                continue
            if debug:
                log.debug("incoming frame sid=%s frame=%s", session.sid, payload[:1024].decode("utf-8", "replace"))
            node.handle_frame(session, payload)

    @staticmethod
    def _drain(session: Session, reader: FrameReader) -> None:
        """After a server-side close: wait for the client's close frame (or EOF)."""
        while True:
            try:
                reader.message()
            except (ClosedByPeer, EOFError, OSError, ProtocolError):
                return


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
        wsgi_input.rfile = None
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
