"""Just enough WebSocket (RFC 6455) for a benchmark client: upgrade request, masked frames, frame parsing.

Server frames are parsed properly only while a client is handshaking (welcome, confirmation).
After that the receive path never decodes frames: it scans the raw byte stream for
``"seq":<digits>`` (``SEQ_RE``, ``carry_tail``), which is what keeps the load generator cheap.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class HandshakeError(Exception):
    """The server did not upgrade the connection the way RFC 6455 says."""


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(host: str, path: str, key: bytes, subprotocols: list[str], headers: list[str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def check_upgrade(head: bytes, key: bytes) -> str | None:
    """Validate the server's upgrade response head (without the blank line); return its subprotocol.

    Raises:
        HandshakeError: not a 101, or a wrong ``Sec-WebSocket-Accept``.
    """
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeError(f"upgrade refused: {lines[0]!r}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("sec-websocket-accept", "").encode() != accept_for(key):
        raise HandshakeError("bad Sec-WebSocket-Accept")
    return fields.get("sec-websocket-protocol") or None


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final client frame; clients must mask (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return head + mask + masked


@dataclass
class Frame:
    opcode: int
    payload: bytes


class FrameParser:
    """Incremental parser of server frames (unmasked), reassembling fragmented messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._frag_op = 0
        self._frag: list[bytes] = []

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        frames: list[Frame] = []
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - at < 2:
                    break
                n = int.from_bytes(buf[at : at + 2], "big")
                at += 2
            elif n == 127:
                if len(buf) - at < 8:
                    break
                n = int.from_bytes(buf[at : at + 8], "big")
                at += 8
            mask = b""
            if b1 & 0x80:  # servers must not mask, but unmasking costs nothing here
                if len(buf) - at < 4:
                    break
                mask = bytes(buf[at : at + 4])
                at += 4
            if len(buf) - at < n:
                break
            payload = bytes(buf[at : at + n])
            if mask:
                key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
                payload = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
            pos = at + n
            self._collect(b0, payload, frames)
        del buf[:pos]
        return frames

    def _collect(self, b0: int, payload: bytes, frames: list[Frame]) -> None:
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if opcode >= OP_CLOSE:  # control frames are never fragmented
            frames.append(Frame(opcode, payload))
        elif opcode == OP_CONT:
            self._frag.append(payload)
            if fin:
                frames.append(Frame(self._frag_op, b"".join(self._frag)))
                self._frag = []
        elif fin:
            frames.append(Frame(opcode, payload))
        else:
            self._frag_op, self._frag = opcode, [payload]

    def take_rest(self) -> bytes:
        """Bytes received after the last complete frame (handed on to the scanner)."""
        rest = bytes(self.buf)
        self.buf.clear()
        return rest


# A receipt is `"seq":` then digits; the look-ahead demands a non-digit after them, so a
# number cut by the end of a read is not taken early (it is carried over instead).
SEQ_RE = re.compile(rb'"seq":\s*(\d+)(?=\D)')
# Any prefix of a match that a read can end in finishes with one of these bytes; a read
# ending with anything else (a frame's closing brace, padding) needs no carry-over.
TAIL_BYTES = frozenset(b'"seq: \t\r\n0123456789')
CARRY = 48


def carry_tail(data: bytes) -> bytes:
    """The end of ``data`` that may hold the start of a ``"seq":N`` cut by the read boundary.

    Starts after the last complete match so that no receipt is counted twice.
    """
    start = max(0, len(data) - CARRY)
    matches = list(SEQ_RE.finditer(data, max(0, start - CARRY)))
    if matches and matches[-1].end() > start:
        start = matches[-1].end()
    return data[start:]
