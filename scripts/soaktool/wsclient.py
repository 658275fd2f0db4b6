"""A small WebSocket client (RFC 6455) for gevent: handshake, masked text frames, reads.

Blocking calls on gevent's (monkey-patched) sockets, so each connection's reader is a
greenlet. :meth:`WSConn.kill` ends the connection with a TCP reset, as a network drop or a
killed browser tab would; a greenlet blocked in :meth:`WSConn.recv` then gets an error.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from urllib.parse import urlsplit

from gevent.lock import Semaphore

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(OSError):
    """The server did not upgrade (an HTTP status other than 101, or a wrong accept key)."""


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WSConn:
    """One client connection. ``url`` is ``ws://host:port/path?query``."""

    def __init__(self, url: str, subprotocol: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// URLs are supported: {url}")
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._lock = Semaphore()
        self.buf = b""
        self.status = 0
        try:
            self._handshake(f"{host}:{port}", target, subprotocol)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)

    def _handshake(self, host: str, target: str, subprotocol: str) -> None:
        key = base64.b64encode(os.urandom(16))
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {subprotocol}",
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeError("connection closed during the handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = status_line.split()
        self.status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        if self.status != 101:
            raise HandshakeError(f"upgrade answered {self.status or status_line[:60]!r}")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            raise HandshakeError("wrong Sec-WebSocket-Accept")

    def send_text(self, text: str) -> None:
        frame = client_frame(text.encode())
        with self._lock:
            self.sock.sendall(frame)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> str | None:
        """The next text message (fragments joined); None when the server closes."""
        parts: list[bytes] = []
        while True:
            b1, b2 = self._read(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            key = self._read(4) if b2 & 0x80 else b""  # servers do not mask; tolerated
            payload = self._read(n)
            if key:
                payload = _mask(payload, key)
            opcode = b1 & 0x0F
            if opcode == OP_PING:
                with self._lock:
                    self.sock.sendall(client_frame(payload, OP_PONG))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                try:
                    with self._lock:
                        self.sock.sendall(client_frame(payload[:2], OP_CLOSE))
                except OSError:
                    pass
                return None
            parts.append(payload)
            if b1 & 0x80:
                return b"".join(parts).decode("utf-8", errors="replace")

    def kill(self) -> None:
        """Drop the connection with a TCP reset (no close frame)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
