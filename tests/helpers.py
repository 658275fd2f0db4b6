"""Test helpers: run the real server (the CLI in a subprocess) and talk to it over sockets."""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websocket

ROOT = Path(__file__).resolve().parent.parent
EXT = "actioncable-v1-ext-json"
BASE = "actioncable-v1-json"


class Clock:
    """A settable clock for code that takes ``clock=`` (unit tests of expiry, no sleeping)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fuzz_examples(n: int) -> int:
    """``n`` examples for a property test, times ``ANYCABLE_FUZZ_SCALE`` (default 1).

    The suite keeps property tests fast; ``ANYCABLE_FUZZ_SCALE=100 scripts/test
    tests/unit/test_fuzz_*.py`` runs a hundred times as many (still deterministic).
    """
    return n * max(1, int(os.environ.get("ANYCABLE_FUZZ_SCALE", "1") or 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pubsub_id(stream: str) -> str:
    """Identifier the JS client builds for ``cable.streamFrom(stream)`` (sorted keys)."""
    return json.dumps({"channel": "$pubsub", "stream_name": stream}, separators=(",", ":"))


def signed_id(signed: str, channel: str = "$pubsub") -> str:
    return json.dumps({"channel": channel, "signed_stream_name": signed}, separators=(",", ":"))


class _PortTaken(RuntimeError):
    """The server could not listen: a port picked as free was taken meanwhile."""


class Server:
    """The real CLI (``python -m anycable_gevent``) on free loopback ports."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        broadcast_port: int | None = None,
        nofile: int | None = None,
    ) -> None:
        self.port = free_port()
        #: open-files limit of the server process (None = inherited); start_limits sets
        #: soft and hard apart
        self.nofile = nofile
        self.start_limits: tuple[int, int] | None = (nofile, nofile) if nofile is not None else None
        self.broadcast_port = broadcast_port or free_port()
        self.args = list(args)
        #: both ports were picked here (so they may be picked again if taken meanwhile)
        self._auto_ports = broadcast_port is None and not any(
            a.startswith(("--http_broadcast_port", "--port")) for a in self.args
        )
        if not any(a.startswith("--http_broadcast_port") for a in self.args):
            self.args.append(f"--http_broadcast_port={self.broadcast_port}")
        else:
            for a in self.args:
                if a.startswith("--http_broadcast_port="):
                    self.broadcast_port = int(a.split("=", 1)[1])
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith("ANYCABLE_") or k in ("REDIS_URL", "PORT"):
                del self.env[k]
        self.env.update(env or {})
        self.log = tempfile.NamedTemporaryFile(prefix="anycable-gevent-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        """The WebSocket port speaks TLS (``--ssl_cert``)."""
        return any(a.startswith("--ssl_cert") for a in self.args)

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/cable"

    @property
    def http(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def broadcast_url(self) -> str:
        return f"http://127.0.0.1:{self.broadcast_port}/_broadcast"

    def start(self, timeout: float = 15.0, healthy: bool = True) -> Server:
        """Start and wait until ``/health`` answers 200 (with ``healthy=False``: answers at all).

        A free port can be taken by another process between :func:`free_port` and the
        server's bind (other test runs share the machine): a server whose ports were picked
        here and that exits because one is in use is started again on new ports, twice at most.
        """
        for attempt in range(3):
            try:
                return self._start(timeout, healthy)
            except _PortTaken:
                if attempt == 2 or not self._auto_ports:
                    raise
                self.port, self.broadcast_port = free_port(), free_port()
                self.args = [a for a in self.args if not a.startswith("--http_broadcast_port=")]
                self.args.append(f"--http_broadcast_port={self.broadcast_port}")
        raise AssertionError("unreachable")

    def _start(self, timeout: float, healthy: bool) -> Server:
        cmd = [sys.executable, "-m", "anycable_gevent", "--host=127.0.0.1", f"--port={self.port}", *self.args]
        start_limits = self.start_limits

        def limits() -> None:
            if start_limits is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, start_limits)

        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, preexec_fn=limits
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                if self.proc.returncode == 2 and "Address already in use" in output:
                    raise _PortTaken(output)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output}")
            try:
                context = ssl._create_unverified_context() if self.tls else None  # a test certificate
                with urllib.request.urlopen(f"{self.http}/health", timeout=0.5, context=context):
                    return self
            except urllib.error.HTTPError:
                if not healthy:
                    return self
                time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def start_unhealthy(self, timeout: float = 15.0) -> Server:
        """Start a server expected to report a problem on ``/health`` (503)."""
        return self.start(timeout, healthy=False)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    # -------------------------------------------------------------- HTTP helpers
    def broadcast(self, body: Any, key: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        """POST to the broadcast endpoint; returns (status, parsed JSON body or None)."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.broadcast_url, data=data, method="POST")
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", f"Bearer {key}")
        return http_call(req)

    def publish(self, stream: str, data: Any, **meta: Any) -> None:
        body: dict[str, Any] = {"stream": stream, "data": json.dumps(data)}
        if meta:
            body["meta"] = meta
        status, reply = self.broadcast(body)
        assert status == 201, (status, reply)

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port}{path}" if port else f"{self.http}{path}"
        context = ssl._create_unverified_context() if self.tls and not port else None
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def http_call(req: urllib.request.Request) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            text = resp.read()
            return resp.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text) if text else None
        except ValueError:
            return exc.code, text.decode(errors="replace")


class Client:
    """A WebSocket client (websocket-client) with Action Cable helpers."""

    def __init__(
        self,
        url: str,
        protocol: str | None = EXT,
        headers: dict[str, str] | None = None,
        protocols: list[str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        subprotocols = protocols if protocols is not None else ([protocol] if protocol else None)
        header = [f"{k}: {v}" for k, v in (headers or {}).items()]
        sslopt = {"cert_reqs": ssl.CERT_NONE} if url.startswith("wss:") else None  # test certificates
        self.ws = websocket.create_connection(
            url, subprotocols=subprotocols, header=header, timeout=timeout, sslopt=sslopt
        )
        self.pings: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] | None = None

    @property
    def subprotocol(self) -> str | None:
        return self.ws.getsubprotocol()  # type: ignore[no-any-return]

    def send(self, frame: Any) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, timeout: float = 5.0, pings: bool = False) -> dict[str, Any]:
        """Next JSON frame (pings are skipped unless ``pings``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame")
            self.ws.settimeout(left)
            try:
                text = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                raise TimeoutError("no frame") from None
            if not text:
                raise ConnectionError("closed")
            msg = json.loads(text)
            if msg.get("type") == "ping" and not pings:
                self.pings.append(msg)
                continue
            return msg  # type: ignore[no-any-return]

    def expect_welcome(self) -> dict[str, Any]:
        msg = self.recv()
        assert msg.get("type") == "welcome", msg
        self.welcome = msg
        return msg

    def nothing(self, wait: float = 0.5) -> None:
        """Assert that no non-ping frame arrives within ``wait`` seconds."""
        try:
            msg = self.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {msg}")

    def subscribe(self, identifier: str, history: dict[str, Any] | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"command": "subscribe", "identifier": identifier}
        if history is not None:
            frame["history"] = history
        self.send(frame)
        return self.recv()

    def closed(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes: (close code, frames received before it)."""
        frames: list[dict[str, Any]] = []
        self.ws.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                return None, frames
            except websocket.WebSocketTimeoutException:
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return code, frames
            if opcode == websocket.ABNF.OPCODE_TEXT:
                msg = json.loads(data)
                if msg.get("type") != "ping":
                    frames.append(msg)
        raise TimeoutError("server did not close the connection")

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def connected(server: Server, **kwargs: Any) -> Iterator[Client]:
    """A client that has received its welcome."""
    client = Client(server.url, **kwargs)
    try:
        client.expect_welcome()
        yield client
    finally:
        client.close()


def jwt_token(payload: dict[str, Any], secret: str) -> str:
    import jwt

    return jwt.encode(payload, secret, algorithm="HS256")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------------ raw sockets and HTTP


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Any HTTP request: (status, lower-cased headers, body), whatever the status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def port_is_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (a connection attempt is refused)."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


class RawWS:
    """A WebSocket client on a bare TCP socket: the test controls every byte.

    Does the opening handshake itself (so a response without ``Sec-WebSocket-Protocol``
    or a non-101 status can be inspected), sends masked frames of any size and opcode,
    and can use a tiny receive buffer (``rcvbuf``) to play a client that never reads.
    """

    def __init__(
        self,
        port: int,
        path: str = "/cable",
        protocols: list[str] | None = None,
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # must be set before connect() for the TCP window to stay small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1]) if status_line else 0
        self.headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def send_frame(self, payload: bytes, opcode: int = 0x1, fin: bool = True) -> None:
        self.sock.sendall(masked_frame(payload, opcode, fin))

    def send(self, frame: Any) -> None:
        self.send_frame((frame if isinstance(frame, str) else json.dumps(frame)).encode())

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """Next frame from the server as (opcode, payload)."""
        self.sock.settimeout(timeout)
        b1, b2 = self._read(2)
        n = b2 & 0x7F
        if n == 126:
            n = int.from_bytes(self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(self._read(8), "big")
        return b1 & 0x0F, self._read(n)

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """Next JSON text frame, pings skipped."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            if opcode != 0x1:
                raise AssertionError(f"expected a text frame, got opcode {opcode}")
            msg = json.loads(payload)
            if msg.get("type") != "ping":
                return msg  # type: ignore[no-any-return]

    def closed(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until a close frame: (close code, JSON frames before it, pings skipped)."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.recv_frame(max(deadline - time.monotonic(), 0.01))
            if opcode == 0x8:
                return (int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None), frames
            if opcode == 0x1:
                msg = json.loads(payload)
                if msg.get("type") != "ping":
                    frames.append(msg)

    def wait_eof(self, timeout: float = 10.0) -> bool:
        """Discard everything until the server ends the TCP connection; False on timeout."""
        deadline = time.monotonic() + timeout
        self.buf = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def masked_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """A client's WebSocket frame (masked, as RFC 6455 requires) of any size and opcode."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + _mask(payload, mask)


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def close_of(c: Client, timeout: float = 10.0) -> tuple[int | None, str, list[dict[str, Any]]]:
    """Read until the server's close frame: (code, reason, JSON frames before it, pings skipped).

    ``(None, "", frames)`` when the TCP connection ended without a close frame.
    """
    frames: list[dict[str, Any]] = []
    c.ws.settimeout(timeout)
    while True:
        try:
            opcode, data = c.ws.recv_data(control_frame=True)
        except websocket.WebSocketConnectionClosedException:
            return None, "", frames
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return code, data[2:].decode(), frames
        if opcode == websocket.ABNF.OPCODE_TEXT:
            msg = json.loads(data)
            if msg.get("type") != "ping":
                frames.append(msg)


# ------------------------------------------------------------------ metrics and waiting


def metric(srv: Server, name: str) -> float:
    """A sample of the server's Prometheus text (``--metrics_http=/metrics``), by its
    anycable-go name without the ``anycable_go_`` prefix."""
    status, text = srv.get("/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(f"anycable_go_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def counter(srv: Server, name: str) -> int:
    """A counter (or any whole-valued sample) of the server's metrics."""
    return int(metric(srv, name))


def wait_health(srv: Server, status: int, timeout: float = 15.0) -> str:
    """Poll ``/health`` until it answers ``status``; returns its body (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = srv.get("/health")
        if code == status or time.monotonic() > deadline:
            assert code == status, body
            return body
        time.sleep(0.1)


def wait_for(cond: Any, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; fails after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def rss_kb(pid: int) -> int:
    """Resident memory of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
