"""HTTP transport: pywsgi and gevent-websocket, with AnyCable's upgrade rules and bounds.

gevent-websocket does the WebSocket upgrade; this module adapts it. It checks the path
and Origin before the upgrade, negotiates the sub-protocol in the 101 response
(gevent-websocket alone only answers a protocol the application hard-codes), adds
``X-AnyCable-Version``, and hands the upgraded socket to the cable endpoint
(:mod:`anycable_gevent.ws`), which then owns it.

Every connection, upgraded or not, is bounded here so that one client cannot hold the
server's sockets or memory (:class:`HTTPLimits`):

* the request line and headers must arrive within ``handshake_timeout`` (also while a
  keep-alive connection waits for its next request), else ``408``;
* the header block is bounded in bytes and lines, else ``431``;
* a request body must arrive within ``body_timeout`` (on every route), else ``408``
  from the broadcast endpoint, or the connection is closed;
* with ``max_conn``, every socket accepted on a WebSocket port counts, from accept to
  close (handshakes included); over the limit a connection is answered ``503`` at once,
  without reading its request;
* an error answer is followed by a lingering close (half-close, discard input for a
  moment), so that the client reads the answer instead of a reset.

Nothing here knows the node: the endpoint is a callable in the WSGI environ's dispatch.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import gevent
from gevent import pywsgi
from gevent.pywsgi import WSGIServer
from geventwebsocket.handler import WebSocketHandler

from anycable_gevent import __version__, protocol
from anycable_gevent.log import Throttle
from anycable_gevent.metrics import Metrics

log = logging.getLogger("anycable_gevent.http")

#: Buffer of the HTTP request reader (anycable-go uses 1 KiB too); the default would be 8 KiB.
READ_BUFFER = 1024
#: Seconds an error answer waits for the client to stop sending before the socket closes.
LINGER_TIME = 2.0


@dataclass(frozen=True)
class HTTPLimits:
    """Bounds on what one HTTP connection may take (see the module docstring)."""

    handshake_timeout: float = 5.0
    body_timeout: float = 10.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    #: connections per worker on the WebSocket ports (0 = unlimited)
    max_conn: int = 0
    #: connections between accept and the end of their request, per port: more wait in
    #: the kernel's accept queue, where their handshake deadline is not running yet
    handshake_concurrency: int = 256


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


# ---------------------------------------------------------------------- request headers

TOO_LARGE = "Header block too large"
TOO_MANY = "Too many headers"


class RequestHeaders:
    """Request headers for pywsgi, parsed without the ``email`` package, within bounds.

    pywsgi's default (``http.client.parse_headers``) builds an ``email`` message for
    every request; on a server that accepts thousands of WebSocket connections a
    second, that parser was the largest single cost of a handshake. This class offers
    the part of that interface pywsgi uses (``get``, ``getheader``, ``headers``,
    ``typeheader``, ``status``, ``del``). A block over ``max_bytes`` or ``max_lines``
    stops reading at once (``status`` says why; the handler answers 431).
    """

    __slots__ = ("items", "status")

    def __init__(self) -> None:
        #: (lower-cased name, value) pairs in arrival order, repeats kept
        self.items: list[tuple[str, str]] = []
        self.status = ""

    @classmethod
    def parse(cls, fp: Any, max_bytes: int = 65536, max_lines: int = 100) -> RequestHeaders:
        headers = cls()
        items = headers.items
        left = max_bytes
        for _count in range(max_lines + 1):
            line = fp.readline(left + 1)
            left -= len(line)
            if left < 0:
                headers.status = TOO_LARGE
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
        headers.status = TOO_MANY
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


# ---------------------------------------------------------------------- deadlines


class HandshakeTimeout(BaseException):
    """The request line and headers did not arrive in time (a BaseException, so that
    pywsgi's handlers of client errors cannot turn it into something else)."""


#: pywsgi's "the request body is broken" error: it closes the connection after one answer
_InvalidClientInput: type[OSError] = pywsgi._InvalidClientInput  # type: ignore[attr-defined]


class BodyTimeout(_InvalidClientInput):  # type: ignore[valid-type,misc]
    """The request body did not arrive in time (an I/O error of the body stream)."""


class TimedInput:
    """A request body stream whose reads must all be done by a deadline.

    Wraps pywsgi's ``Input``. After a timeout or a read error, :meth:`_discard` (what
    pywsgi calls to skip an unread body before the next request) does nothing: the
    connection is closed instead, as nobody knows where the next request would start.
    """

    __slots__ = ("inner", "deadline", "failed")

    def __init__(self, inner: Any, timeout: float) -> None:
        self.inner = inner
        self.deadline = time.monotonic() + timeout
        self.failed = False

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise BodyTimeout("request body not received in time")
            with gevent.Timeout(left, False):  # type: ignore[arg-type]
                return fn(*args)
            raise BodyTimeout("request body not received in time")
        except (OSError, ValueError):
            self.failed = True
            raise

    def read(self, length: int | None = None) -> bytes:
        return self._call(self.inner.read, length)  # type: ignore[no-any-return]

    def readline(self, size: int | None = None) -> bytes:
        return self._call(self.inner.readline, size)  # type: ignore[no-any-return]

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._call(self.inner.readlines, hint)  # type: ignore[no-any-return]

    def __iter__(self) -> TimedInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _discard(self) -> None:
        if not self.failed:
            self._call(self.inner._discard)


def _response(status: str, body: bytes = b"", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode() + body


RESPONSE_408 = _response("408 Request Timeout", b"Request Timeout")
RESPONSE_431 = _response("431 Request Header Fields Too Large", b"Request Header Fields Too Large")
RESPONSE_503 = _response("503 Service Unavailable", b"Too many connections", "Retry-After: 1\r\n")


def linger_close(sock: Any, timeout: float = LINGER_TIME) -> None:
    """Half-close, discard what the client still sends for up to ``timeout``, then close.

    Closing a socket with unread input makes the kernel send a reset, and the client may
    then lose the answer it was sent. Blocks the calling greenlet (at most ``timeout``).
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(timeout, False):  # type: ignore[arg-type]
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- handler


def _nothing() -> None:
    pass


class CableHandler(WebSocketHandler):
    """gevent-websocket's handler with AnyCable's upgrade rules and the bounds above."""

    server: CableServer

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        if rfile is None:
            rfile = sock.makefile("rb", READ_BUFFER)
        super().__init__(sock, address, server, rfile)
        self._timer: gevent.Timeout | None = None
        #: the socket belongs to a WebSocket session now (see CableServer.take_over)
        self.taken = False
        #: called once the upgrade is done: the connection no longer counts against
        #: ``--handshake_concurrency`` (set by CableServer)
        self.handshake_over: Callable[[], None] = _nothing

    def MessageClass(self, *args: Any) -> RequestHeaders:  # noqa: N802 - pywsgi's name
        limits = self.server.limits
        return RequestHeaders.parse(args[0], limits.max_header_bytes, limits.max_headers)

    def handle(self) -> None:
        """pywsgi's keep-alive loop, ending with a lingering close after an error answer."""
        linger = False
        server = self.server
        served = 0
        try:
            while self.socket is not None:
                if served:
                    if server.draining:
                        break  # a draining worker answers what it accepted, then closes
                    server.idle.add(self)  # keep-alive: waiting for the next request
                self.time_start = time.time()
                self.time_finish = 0
                result = self.handle_one_request()
                served += 1
                if result is None:
                    break
                if result is True:
                    continue
                self.status, body = result
                self.socket.sendall(body)
                self.time_finish = time.time()  # type: ignore[assignment]
                self.log_request()
                # a refused request may still be arriving: let the client read the answer
                # (a client that sent nothing in time gets no such courtesy)
                linger = self.status != "408"
                break
        except OSError:
            pass
        finally:
            server.idle.discard(self)
            sock = self.socket
            if sock is not None:
                if linger or (self.close_connection and self.status != "408"):
                    linger_close(sock)
                else:
                    try:
                        sock.close()
                    except OSError:
                        pass
            self.__dict__.pop("socket", None)
            self.__dict__.pop("rfile", None)
            self.__dict__.pop("wsgi_input", None)

    def handle_one_request(self) -> Any:
        timer = self._timer = gevent.Timeout(self.server.limits.handshake_timeout, HandshakeTimeout)
        timer.start()
        try:
            return super().handle_one_request()
        except HandshakeTimeout:
            self.server.metrics.inc("handshake_timeouts_total")
            log.debug("request not received in time from=%s", self.client_address)
            return ("408", RESPONSE_408)
        finally:
            timer.close()
            self._timer = None

    def read_request(self, raw_requestline: str) -> Any:
        self.server.idle.discard(self)  # a request is in: the connection is busy again
        try:
            return super().read_request(raw_requestline)
        finally:
            if self._timer is not None:
                self._timer.close()  # headers are in: the body has deadlines of its own

    def _handle_client_error(self, ex: Exception) -> Any:
        if getattr(self.headers, "status", "") in (TOO_LARGE, TOO_MANY):
            self.server.metrics.inc("http_header_limit_total")
            log.debug("request headers over the limits from=%s: %s", self.client_address, self.headers.status)
            return ("431", RESPONSE_431)
        if isinstance(ex, BodyTimeout):
            self.server.metrics.inc("http_body_timeouts_total")
        return super()._handle_client_error(ex)

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        body: Any = getattr(self, "wsgi_input", None)
        if body is not None and env.get("wsgi.input") is body:  # a request with a body stream
            timed = env["wsgi.input"] = TimedInput(body, self.server.limits.body_timeout)
            self.wsgi_input = timed
        return env

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
        server = self.server
        path = self.environ.get("PATH_INFO", "")
        if path not in server.ws_paths:
            return None  # not a cable path: the WSGI app answers
        if self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return None  # plain HTTP to the cable path: the app answers 400
        if not origin_allowed(self.environ.get("HTTP_ORIGIN"), server.allowed_origins):
            self.start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"Origin not allowed"]
        offered = self.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
        self.environ["anycable.protocol"] = protocol.select_protocol(offered) if offered else None
        # gevent-websocket's own refusals are written for Python 2: HTTP/1.0 gets "402",
        # a key that is not base64 raises binascii.Error, and bodies are str (a 500 here).
        if self.request_version != "HTTP/1.1":
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"WebSocket upgrade needs HTTP/1.1"]
        refusal = self._check_handshake()
        if refusal is not None:
            return refusal
        try:
            result = super().upgrade_websocket()
        except binascii.Error:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Invalid Sec-WebSocket-Key"]
        return [part.encode() if isinstance(part, str) else part for part in result] if result else result

    def _check_handshake(self) -> list[bytes] | None:
        """Refuse a bad ``Sec-WebSocket-Version`` or ``-Key`` with a fixed text.

        gevent-websocket would answer them with the client's own header value in the
        body (``Invalid key: <whatever was sent>``); no error answer here ever echoes
        what a client sent.
        """
        environ = self.environ
        version = environ.get("HTTP_SEC_WEBSOCKET_VERSION")
        wants_upgrade = "upgrade" in environ.get("HTTP_CONNECTION", "").lower()
        if environ.get("REQUEST_METHOD") != "GET" or not wants_upgrade or not version:
            return None  # gevent-websocket's answers to these are fixed texts
        if version not in self.SUPPORTED_VERSIONS:
            self.start_response(
                "400 Bad Request",
                [("Content-Type", "text/plain"), ("Sec-WebSocket-Version", ", ".join(self.SUPPORTED_VERSIONS))],
            )
            return [b"Unsupported WebSocket version"]
        key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
        try:
            valid = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid = False
        if not valid:
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Invalid Sec-WebSocket-Key"]
        return None

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


# ---------------------------------------------------------------------- server


class ConnectionGate:
    """Counts the sockets of the WebSocket ports of one worker, from accept to close."""

    __slots__ = ("open", "limit")

    def __init__(self, limit: int) -> None:
        self.open = 0
        self.limit = limit

    def full(self) -> bool:
        return bool(self.limit) and self.open >= self.limit


class _HandshakeSlot:
    """One connection's place under ``--handshake_concurrency``, given back once (when its
    upgrade is done, or when its handler ends, whichever comes first)."""

    __slots__ = ("server", "held")

    def __init__(self, server: CableServer) -> None:
        self.server = server
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.server.release_handshake()


class CableServer(WSGIServer):
    """A pywsgi server whose WebSocket connections outlive their WSGI handler.

    Once a connection is upgraded, the cable endpoint takes the socket over
    (:meth:`take_over`) and serves it from a fresh greenlet, and the WSGI handler
    finishes at once. An idle connection then holds only its session, its socket and a
    shallow greenlet, not the handler, the environ and a deep stack (see README: memory
    per connection).

    Args:
        ws_paths: the WebSocket paths of this port (empty: plain HTTP only).
        allowed_origins: ``--allowed_origins``.
        limits: the bounds of every connection.
        gate: the connection count of the WebSocket ports (None on other ports).
    """

    handler_class = CableHandler

    def __init__(
        self,
        *args: Any,
        ws_paths: set[str],
        allowed_origins: list[str],
        limits: HTTPLimits,
        metrics: Metrics,
        gate: ConnectionGate | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ws_paths = ws_paths
        self.allowed_origins = allowed_origins
        self.limits = limits
        self.metrics = metrics
        self.gate = gate
        #: ids of client sockets taken over by a session: not closed when the handler ends
        self.detached: set[int] = set()
        self._paused: Any = None
        self._emfile = Throttle(log, 10.0)
        self._handshakes = 0
        #: set by :meth:`close`: requests already accepted are answered, keep-alive ends
        self.draining = False
        #: handlers of keep-alive connections waiting for their next request
        self.idle: set[CableHandler] = set()

    @property
    def in_flight(self) -> int:
        """Accepted connections not yet upgraded nor finished: requests and handshakes that
        a worker about to exit still owes an answer (exiting would reset them)."""
        return self._handshakes

    def close(self) -> None:
        """Stop accepting; keep-alive connections waiting for a next request are ended (the
        one being answered gets its answer first)."""
        self.draining = True
        super().close()
        for handler in list(self.idle):
            sock = handler.socket
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RD)  # its read of the next request line ends
                except OSError:
                    pass

    def full(self) -> bool:
        """As many handshakes as ``handshake_concurrency`` are under way: stop accepting.

        In a reconnect storm, accepting everything at once would start every deadline at
        once while each connection waits for the CPU; the kernel keeps the rest instead.
        """
        return self._handshakes >= self.limits.handshake_concurrency

    def do_handle(self, *args: Any) -> None:
        self._handshakes += 1
        super().do_handle(*args)

    def handle(self, sock: Any, address: Any) -> None:
        slot = _HandshakeSlot(self)
        try:
            self._serve_connection(sock, address, slot)
        finally:
            slot.release()

    def release_handshake(self) -> None:
        self._handshakes -= 1
        if self._handshakes == self.limits.handshake_concurrency - 1:
            getattr(self, "_start_accepting_if_started")()  # noqa: B009 - gevent's private hook

    def _serve_connection(self, sock: Any, address: Any, slot: _HandshakeSlot) -> None:
        gate = self.gate
        if gate is not None and gate.full():
            self._refuse(sock)
            return
        handler = self.handler_class(sock, address, self)
        handler.handshake_over = slot.release
        if gate is None:
            handler.handle()
            return
        gate.open += 1
        try:
            handler.handle()
        finally:
            if not handler.taken:
                gate.open -= 1

    def take_over(self, handler: CableHandler) -> Callable[[], None]:
        """The endpoint takes the handler's socket: pywsgi must neither drain nor close it.

        Returns what the new owner calls once it has closed the socket (it frees the
        connection's place under ``--max_conn``).
        """
        sock = handler.socket
        handler.socket = None  # pywsgi's cleanup skips a handler without a socket
        handler.taken = True
        self.detached.add(id(sock))
        gate = self.gate

        def release() -> None:
            if gate is not None:
                gate.open -= 1

        return release

    def _refuse(self, sock: Any) -> None:
        """Over ``--max_conn``: answer 503 without reading the request, and close."""
        self.metrics.inc("refused_connections_total")
        raw = getattr(sock, "_sock", sock)
        try:
            raw.setblocking(False)
            raw.send(RESPONSE_503)
            raw.shutdown(socket.SHUT_WR)
            while raw.recv(65536):  # what already arrived, so that closing sends no reset
                pass
        except OSError:
            pass
        finally:
            sock.close()

    def do_close(self, sock: Any, *args: Any) -> None:
        if id(sock) in self.detached:
            self.detached.discard(id(sock))
            return
        super().do_close(sock, *args)

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of file descriptors: pause accepting for a moment instead of spinning
            # (gevent would print a traceback for every attempt).
            self.metrics.inc("accept_errors_total")
            self._emfile.warning(
                "cannot accept connections: %s; raise the open file limit (ulimit -n, LimitNOFILE=)",
                exc.strerror or exc,
            )
            self.stop_accepting()
            self._paused = self.loop.timer(0.1)
            self._paused.start(getattr(self, "_start_accepting_if_started"))  # noqa: B009 - gevent's private hook
            return None
