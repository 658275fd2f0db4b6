"""Property tests of the WebSocket frame decoder (``ws.FrameReader``) fed from an in-memory socket.

Whatever bytes a client sends, the reader yields messages or raises one of its own errors
(:class:`~anycable_gevent.ws.ClosedByPeer`, a
:class:`~anycable_gevent.errors.ConnectionFailure` subclass, ``EOFError``), never anything
else; it never asks the socket for more than one read chunk or one permitted payload at a
time; and a frame over the limits fails before its payload is read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from helpers import fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anycable_gevent import protocol
from anycable_gevent.errors import ConnectionFailure, InvalidText, MessageTooBig, TooManyFragments
from anycable_gevent.ws import READ_CHUNK, ClosedByPeer, FrameReader

MAX_SIZE = 4096
MAX_FRAGMENTS = 8
ALLOWED = (ClosedByPeer, ConnectionFailure, EOFError)


class FakeSocket:
    """``recv(n)`` hands out at most ``n`` bytes of ``data``, in pieces of the given sizes."""

    def __init__(self, data: bytes, pieces: list[int] | None = None) -> None:
        self.data = data
        self.pos = 0
        self.pieces = list(pieces or [])
        #: every size asked for, in order
        self.requests: list[int] = []

    def recv(self, n: int) -> bytes:
        self.requests.append(n)
        size = n
        if self.pieces:
            size = min(n, max(1, self.pieces.pop(0)))
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk


def reader_for(sock: FakeSocket) -> tuple[FrameReader, list[bytes]]:
    pings: list[bytes] = []
    reader = FrameReader(sock, None, MAX_SIZE, pings.append, lambda: None, MAX_FRAGMENTS, 0.0)
    return reader, pings


def drain(reader: FrameReader) -> tuple[list[tuple[int, str | bytes]], BaseException]:
    """Read messages until the reader raises; returns them and what it raised."""
    messages: list[tuple[int, str | bytes]] = []
    while True:
        try:
            messages.append(reader.message())
        except BaseException as exc:  # asserted by the caller: only ALLOWED may end a read
            return messages, exc
        assert len(messages) < 10_000, "the reader loops without consuming input"


def frame(
    payload: bytes,
    opcode: int = protocol.OP_TEXT,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    mask: bytes = b"\x01\x02\x03\x04",
) -> bytes:
    """A client frame; ``length`` overrides the announced length (a lie about the payload)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + mask + protocol.unmask(payload, mask)


# ---------------------------------------------------------------------- arbitrary bytes


@settings(max_examples=fuzz_examples(250), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), pieces=st.lists(st.integers(1, 64), max_size=20))
def test_any_bytes_yield_messages_or_the_readers_own_errors(data: bytes, pieces: list[int]) -> None:
    sock = FakeSocket(data, pieces)
    reader, _ = reader_for(sock)
    messages, raised = drain(reader)
    assert isinstance(raised, ALLOWED), repr(raised)
    for opcode, payload in messages:
        assert opcode in (protocol.OP_TEXT, protocol.OP_BINARY)
        assert isinstance(payload, str if opcode == protocol.OP_TEXT else bytes)
        assert len(payload) <= MAX_SIZE
    # never more than one chunk, or one permitted payload, per read
    assert all(0 < n <= max(READ_CHUNK, MAX_SIZE) for n in sock.requests), sock.requests
    assert sock.pos <= len(data)


# ---------------------------------------------------------------------- structured frames

OPCODES = st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x7, 0x8, 0x9, 0xA, 0xB, 0xF])


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    """Plausible frames with one or more things wrong: bad opcodes, reserved bits, no mask,
    announced lengths far beyond the payload or the limit, control frames that are too
    long or fragmented, close frames with bad codes, text that is not UTF-8."""
    kind = draw(
        st.sampled_from(["valid", "opcode", "rsv", "unmasked", "huge", "lie", "control", "close", "utf8", "fragments"])
    )
    payload = draw(st.binary(max_size=200))
    if kind == "valid":
        return frame(payload, draw(st.sampled_from([protocol.OP_TEXT, protocol.OP_BINARY])))
    if kind == "opcode":
        return frame(payload, draw(OPCODES), fin=draw(st.booleans()))
    if kind == "rsv":
        return frame(payload, rsv=draw(st.integers(1, 7)))
    if kind == "unmasked":
        return frame(payload, masked=False)
    if kind == "huge":
        return frame(b"", length=draw(st.sampled_from([MAX_SIZE + 1, 65535, 65536, 2**32, 2**63 - 1, 2**64 - 1])))
    if kind == "lie":
        return frame(payload, length=draw(st.integers(0, MAX_SIZE)))
    if kind == "control":
        return frame(
            draw(st.binary(max_size=300)),
            draw(st.sampled_from([0x8, 0x9, 0xA])),
            fin=draw(st.booleans()),
        )
    if kind == "close":
        code = draw(st.integers(0, 65535))
        reason = draw(st.binary(max_size=20))
        return (
            frame(struct.pack("!H", code) + reason, protocol.OP_CLOSE)
            if draw(st.booleans())
            else frame(payload[:1], protocol.OP_CLOSE)
        )
    if kind == "utf8":
        return frame(draw(st.binary(min_size=1, max_size=40)) + b"\xff\xfe", protocol.OP_TEXT)
    parts = draw(st.integers(1, MAX_FRAGMENTS + 3))
    out = frame(payload, protocol.OP_TEXT, fin=parts == 1)
    for i in range(1, parts):
        out += frame(b"x", protocol.OP_CONT, fin=i == parts - 1)
    return out


@settings(max_examples=fuzz_examples(150), suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(hostile_frames(), min_size=1, max_size=6), pieces=st.lists(st.integers(1, 300), max_size=10))
def test_hostile_frames_end_in_the_readers_own_errors(frames: list[bytes], pieces: list[int]) -> None:
    data = b"".join(frames)
    sock = FakeSocket(data, pieces)
    reader, _ = reader_for(sock)
    _, raised = drain(reader)
    assert isinstance(raised, ALLOWED), repr(raised)
    assert all(0 < n <= max(READ_CHUNK, MAX_SIZE) for n in sock.requests), sock.requests


@settings(max_examples=fuzz_examples(80))
@given(
    prefix=st.lists(st.binary(max_size=100), max_size=4),
    announced=st.sampled_from([MAX_SIZE + 1, 10 * READ_CHUNK, 2**31, 2**63 - 1]),
    trailing=st.integers(0, 4 * READ_CHUNK),
)
def test_an_oversized_frame_fails_before_its_payload_is_read(
    prefix: list[bytes], announced: int, trailing: int
) -> None:
    head = b"".join(frame(p, protocol.OP_BINARY) for p in prefix)
    big = frame(b"", protocol.OP_BINARY, length=announced)
    data = head + big + os.urandom(trailing)
    sock = FakeSocket(data)
    reader, _ = reader_for(sock)
    messages, raised = drain(reader)
    assert isinstance(raised, MessageTooBig), repr(raised)
    assert [m for _, m in messages] == prefix
    # at most one read chunk beyond the offending header: its payload is never read in
    assert sock.pos <= len(head) + len(big) + READ_CHUNK
    # what is left to skip is what the frame announced (the lingering close resyncs there)
    assert raised.resync == 4 + announced


@settings(max_examples=fuzz_examples(100))
@given(parts=st.integers(MAX_FRAGMENTS + 1, 3 * MAX_FRAGMENTS))
def test_too_many_fragments_fail_at_the_first_fragment_over_the_limit(parts: int) -> None:
    data = frame(b"a", protocol.OP_TEXT, fin=False)
    for i in range(1, parts):
        data += frame(b"b", protocol.OP_CONT, fin=i == parts - 1)
    sock = FakeSocket(data)
    reader, _ = reader_for(sock)
    _, raised = drain(reader)
    assert isinstance(raised, TooManyFragments), repr(raised)


# ---------------------------------------------------------------------- valid streams


@dataclass
class Message:
    opcode: int
    payload: bytes
    #: sizes of its fragments (they add up to the payload)
    cuts: list[int]


@st.composite
def messages(draw: st.DrawFn) -> Message:
    binary = draw(st.booleans())
    if binary:
        payload = draw(st.binary(max_size=MAX_SIZE // 4))
    else:
        payload = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
        if b"\xed\xa0" in payload or b"\xed\xb0" in payload:  # a surrogate is not UTF-8
            payload = b"plain"
    n = draw(st.integers(1, MAX_FRAGMENTS))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=n - 1, max_size=n - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    return Message(protocol.OP_BINARY if binary else protocol.OP_TEXT, payload, sizes)


def encode(msg: Message, ping_between: bool) -> bytes:
    out = b""
    pos = 0
    for i, size in enumerate(msg.cuts):
        op = msg.opcode if i == 0 else protocol.OP_CONT
        out += frame(msg.payload[pos : pos + size], op, fin=i == len(msg.cuts) - 1, mask=os.urandom(4))
        pos += size
        if ping_between and i == 0:
            out += frame(b"hi", protocol.OP_PING)  # control frames may sit between fragments
    return out


@settings(max_examples=fuzz_examples(120), suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(messages(), min_size=1, max_size=5),
    ping=st.booleans(),
    pieces=st.lists(st.integers(1, 200), max_size=30),
)
def test_valid_fragmented_messages_are_decoded_exactly(msgs: list[Message], ping: bool, pieces: list[int]) -> None:
    data = b"".join(encode(m, ping) for m in msgs) + frame(struct.pack("!H", 1000), protocol.OP_CLOSE)
    sock = FakeSocket(data, pieces)
    reader, pings = reader_for(sock)
    got, raised = drain(reader)
    assert isinstance(raised, ClosedByPeer) and raised.code == 1000, repr(raised)
    expected = [(m.opcode, m.payload.decode() if m.opcode == protocol.OP_TEXT else m.payload) for m in msgs]
    assert got == expected
    assert pings == [b"hi" for m in msgs if ping]


def test_text_that_is_not_utf8_is_an_invalid_text_failure() -> None:
    reader, _ = reader_for(FakeSocket(frame(b"\xc3\x28", protocol.OP_TEXT)))
    _, raised = drain(reader)
    assert isinstance(raised, InvalidText)
