"""Action Cable (+ AnyCable extended) protocol: data shapes, decoding and encoding.

Pure stdlib, no I/O. Server frames follow SPEC.md §3.2 (key order and omitted empty
fields as anycable-go emits them); client frames are validated strictly, and anything
that does not fit raises :class:`~anycable_gevent.errors.ProtocolError` (the caller drops
the frame and keeps the connection).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from anycable_gevent.errors import ProtocolError

PROTOCOL_JSON = "actioncable-v1-json"
PROTOCOL_EXT_JSON = "actioncable-v1-ext-json"
#: Sub-protocols this server speaks, in preference order (SPEC §2.2).
SUPPORTED_PROTOCOLS = (PROTOCOL_JSON, PROTOCOL_EXT_JSON)
TOKEN_PROTOCOL_PREFIX = "anycable-token."

PUBSUB_CHANNEL = "$pubsub"
TURBO_CHANNEL = "Turbo::StreamsChannel"
CABLE_READY_CHANNEL = "CableReady::Stream"

WHISPER_STATE_KEY = "$w"
PRESENCE_STATE_KEY = "$p"

# Disconnect reasons (SPEC §3.11).
UNAUTHORIZED = "unauthorized"
TOKEN_EXPIRED = "token_expired"
SERVER_RESTART = "server_restart"
REMOTE = "remote"
NO_PONG = "no_pong"
TOO_SLOW = "too_slow"

# WebSocket close codes.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 characters kept as they are."""
    return _dumps(obj)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


#: One strict decoder for every frame (``json.loads`` with options builds a new one per call).
_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def loads(text: str | bytes) -> Any:
    """Strict JSON: NaN and Infinity are not JSON and are refused.

    Raises:
        ValueError: not JSON, or nested too deeply to decode (the decoder's
            RecursionError, which callers handling untrusted input would not expect).
    """
    try:
        if isinstance(text, bytes | bytearray):
            text = text.decode()  # UnicodeDecodeError is a ValueError
        return _decode(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


#: A JSON escape of a UTF-16 surrogate: the only way a decoded string can hold one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def _check_unicode(raw: str | bytes, obj: Any) -> None:
    """Refuse strings with an unpaired surrogate (``"\\ud800"``): they cannot be encoded
    as UTF-8, so echoing or broadcasting them would fail later, far from the input.

    ``raw`` is the JSON text ``obj`` was decoded from.

    Raises:
        ProtocolError: such a string is present.
    """
    if isinstance(raw, str):
        if not raw.isascii():  # O(1) for ASCII text: CPython knows it
            try:
                raw.encode()
            except UnicodeEncodeError:
                raise ProtocolError("string with an unpaired UTF-16 surrogate") from None
        if _SURROGATE_ESCAPE_TEXT.search(raw) is None:
            return
    elif _SURROGATE_ESCAPE.search(raw) is None:
        return  # the common case: no escape that could produce a surrogate
    try:
        _dumps(obj).encode()
    except UnicodeEncodeError:
        raise ProtocolError("string with an unpaired UTF-16 surrogate") from None


def encodable_identifier(identifier: str) -> bool:
    """False when the channel identifier's JSON holds a string that cannot be encoded
    (an escaped unpaired surrogate): a stream or state taken from it could never be
    stored or sent. Identifiers that are not JSON are opaque and fine."""
    if _SURROGATE_ESCAPE_TEXT.search(identifier) is None:
        return True
    try:
        obj = loads(identifier)
    except ValueError:
        return True
    try:
        _check_unicode(identifier, obj)
    except ProtocolError:
        return False
    return True


# ---------------------------------------------------------------------------- client frames


@dataclass(frozen=True)
class Position:
    """A client's last seen position in one stream."""

    epoch: str
    offset: int


@dataclass(frozen=True)
class HistoryRequest:
    since: int = 0
    streams: dict[str, Position] | None = None

    @property
    def empty(self) -> bool:
        return self.since <= 0 and self.streams is None


@dataclass(frozen=True)
class Command:
    command: str
    identifier: str = ""
    data: Any = None
    has_data: bool = False
    history: HistoryRequest | None = None
    presence: dict[str, Any] | None = None


def _history(raw: Any) -> HistoryRequest | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError("history must be an object")
    since = raw.get("since")
    # The JS client may send since: false (historyTimestamp: false) or null.
    if since is None or since is False:
        since_s = 0
    elif isinstance(since, bool) or not isinstance(since, int | float):
        raise ProtocolError("history.since must be a number of seconds")
    else:
        since_s = int(since)
        if since_s < 0:
            raise ProtocolError("history.since must not be negative")
    streams_raw = raw.get("streams")
    streams: dict[str, Position] | None = None
    if streams_raw is not None:
        if not isinstance(streams_raw, dict):
            raise ProtocolError("history.streams must be an object")
        streams = {}
        for name, pos in streams_raw.items():
            if not isinstance(pos, dict):
                raise ProtocolError("history.streams entries must be objects")
            epoch = pos.get("epoch", "")
            offset = pos.get("offset", 0)
            if not isinstance(epoch, str):
                raise ProtocolError("history epoch must be a string")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ProtocolError("history offset must be a non-negative integer")
            streams[name] = Position(epoch, offset)
    return HistoryRequest(since_s, streams)


def decode_command(raw: str | bytes) -> Command | None:
    """Decode one client frame. ``None`` means 'JSON null: ignore silently'.

    Raises:
        ProtocolError: not JSON, not an object, or a field of the wrong type.
    """
    try:
        msg = loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if msg is None:
        return None
    if not isinstance(msg, dict):
        raise ProtocolError("frame must be a JSON object")
    _check_unicode(raw, msg)
    command = msg.get("command", "")
    if not isinstance(command, str):
        raise ProtocolError("command must be a string")
    identifier = msg.get("identifier", "")
    if identifier is None:
        identifier = ""
    if not isinstance(identifier, str):
        raise ProtocolError("identifier must be a string")
    presence = msg.get("presence")
    if presence is not None:
        if not isinstance(presence, dict):
            raise ProtocolError("presence must be an object")
        if not isinstance(presence.get("id", ""), str):
            raise ProtocolError("presence.id must be a string")
    return Command(
        command=command,
        identifier=identifier,
        data=msg.get("data"),
        has_data="data" in msg,
        history=_history(msg.get("history")),
        presence=presence,
    )


# ---------------------------------------------------------------------------- server frames


def welcome(sid: str | None = None, restored: bool = False, restored_ids: list[str] | None = None) -> str:
    msg: dict[str, Any] = {"type": "welcome"}
    if sid:
        msg["sid"] = sid
    if restored:
        msg["restored"] = True
        if restored_ids:
            msg["restored_ids"] = restored_ids
    return dumps(msg)


def confirm(identifier: str) -> str:
    return '{"identifier":' + dumps(identifier) + ',"type":"confirm_subscription"}'


def reject(identifier: str) -> str:
    return '{"identifier":' + dumps(identifier) + ',"type":"reject_subscription"}'


def confirm_history(identifier: str) -> str:
    return dumps({"type": "confirm_history", "identifier": identifier})


def reject_history(identifier: str) -> str:
    return dumps({"type": "reject_history", "identifier": identifier})


def disconnect(reason: str, reconnect: bool) -> str:
    return dumps({"type": "disconnect", "reason": reason, "reconnect": reconnect})


def ping(ts: int) -> str:
    return f'{{"type":"ping","message":{ts}}}'


PONG = '{"type":"pong"}'


def message_json(data: str) -> str:
    """The ``message`` value of a broadcast: ``data`` as JSON if it parses, else the string.

    Valid JSON is embedded verbatim (no re-encoding); JSON ``null`` and anything that
    does not parse are delivered as a JSON string (SPEC §3.10).
    """
    try:
        value = loads(data)
    except ValueError:
        return dumps(data)
    if value is None:
        return dumps(data)
    return data


PRESENCE_JOIN = "join"
PRESENCE_LEAVE = "leave"
#: ``type`` of the frames and broadcasts that carry presence (SPEC §4.8).
PRESENCE_TYPE = "presence"


@dataclass(frozen=True)
class PresenceEvent:
    """A change of a stream's presence set: someone (``id``) joined or left."""

    type: str
    id: str
    info: Any = None

    def to_json(self) -> str:
        """The ``message`` of a presence frame: ``info`` only on a join, and only when given."""
        msg: dict[str, Any] = {"type": self.type, "id": self.id}
        if self.type == PRESENCE_JOIN and self.info is not None:
            msg["info"] = self.info
        return dumps(msg)


@dataclass(frozen=True)
class PresenceInfo:
    """A stream's presence set: every presence id with its latest info."""

    total: int = 0
    records: list[tuple[str, Any]] = field(default_factory=list)


def presence_info(identifier: str, info: PresenceInfo, with_records: bool = True) -> str:
    """Reply to a ``presence`` command; ``records`` is left out when empty (as Go does)."""
    message: dict[str, Any] = {"type": "info", "total": info.total}
    if with_records and info.records:
        message["records"] = [_presence_record(pid, data) for pid, data in info.records]
    return dumps({"type": PRESENCE_TYPE, "identifier": identifier, "message": message})


def _presence_record(pid: str, info: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"id": pid}
    if info is not None:
        record["info"] = info
    return record


def presence_error(identifier: str) -> str:
    """Reply to a ``presence`` command the broker could not answer."""
    return dumps({"type": PRESENCE_TYPE, "identifier": identifier, "message": {"type": "error", "total": 0}})


# ---------------------------------------------------------------------------- broadcasts


@dataclass(slots=True)
class StreamMessage:
    """One publication to one stream (the unit the broker registers and the hub fans out)."""

    stream: str
    data: str
    exclude_socket: str = ""
    transient: bool = False
    broadcast_type: str = ""
    offset: int = 0
    epoch: str = ""
    #: Unix seconds when the broker registered it (history ``since`` matching).
    ts: int = 0
    #: Cached ``,"message":…[,"stream_id":…,"epoch":…,"offset":N]}`` tail of every frame.
    _tail: bytes | None = field(default=None, repr=False, compare=False)
    #: Cached JSON text of the ``message`` value (see :func:`message_json`).
    _json: str | None = field(default=None, repr=False, compare=False)

    def message(self) -> str:
        """The ``message`` value as JSON text, validated once per message."""
        text = self._json
        if text is None:
            text = self._json = message_json(self.data)
        return text

    def tail(self) -> bytes:
        """Everything after the identifier in a data frame, encoded once per message."""
        tail = self._tail
        if tail is None:
            parts = [',"message":', self.message()]
            if self.epoch:
                parts.append(f',"stream_id":{dumps(self.stream)},"epoch":{dumps(self.epoch)},"offset":{self.offset}')
            parts.append("}")
            tail = self._tail = "".join(parts).encode()
        return tail


@dataclass(frozen=True)
class RemoteCommand:
    """A server command published by the application (only ``disconnect`` exists)."""

    command: str
    identifier: str
    reconnect: bool


def frame_prefix(identifier: str, broadcast_type: str = "") -> bytes:
    """``{"identifier":"…"`` (or with a leading ``"type"``), shared by every frame of a group."""
    if broadcast_type:
        return f'{{"type":{dumps(broadcast_type)},"identifier":{dumps(identifier)}'.encode()
    return f'{{"identifier":{dumps(identifier)}'.encode()


# ---------------------------------------------------------------------------- WebSocket framing

_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def ws_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A complete, unmasked, final WebSocket frame (what a server sends)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


def text_frame(text: str) -> bytes:
    return ws_frame(text.encode())


def close_frame(code: int, reason: str = "") -> bytes:
    return ws_frame(struct.pack("!H", code) + reason.encode()[:123], OP_CLOSE)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR a client payload with its 4-byte mask, in C speed via big integers."""
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def select_protocol(offered: str) -> str | None:
    """First protocol in the client's list that this server speaks (SPEC §2.2)."""
    for item in offered.split(","):
        name = item.strip()
        if name in SUPPORTED_PROTOCOLS:
            return name
    return None


def token_from_protocols(offered: str) -> str:
    for item in offered.split(","):
        name = item.strip()
        if name.startswith(TOKEN_PROTOCOL_PREFIX):
            return name[len(TOKEN_PROTOCOL_PREFIX) :]
    return ""


# ---------------------------------------------------------------------------- publications

Publication = list[StreamMessage] | RemoteCommand


def _stream_message(obj: dict[str, Any], where: str) -> StreamMessage:
    stream = obj.get("stream")
    if not isinstance(stream, str) or not stream:
        raise ProtocolError(f"{where}stream must be a non-empty string")
    data = obj.get("data")
    if not isinstance(data, str):
        raise ProtocolError(f"{where}data must be a string (JSON-encode the payload)")
    meta = obj.get("meta")
    exclude, transient = "", False
    if meta is not None:
        if not isinstance(meta, dict):
            raise ProtocolError(f"{where}meta must be an object")
        exclude = meta.get("exclude_socket") or ""
        if not isinstance(exclude, str):
            raise ProtocolError(f"{where}meta.exclude_socket must be a string")
        transient = meta.get("transient", False)
        if not isinstance(transient, bool):
            raise ProtocolError(f"{where}meta.transient must be a boolean")
    return StreamMessage(stream=stream, data=data, exclude_socket=exclude, transient=transient)


def _clip(text: str, limit: int = 100) -> str:
    """Client input quoted in an error: bounded (it goes to a log line and a 422 body)."""
    return text if len(text) <= limit else text[:limit] + "…"


def decode_publication(body: bytes | str) -> Publication:
    """Parse a broadcast body: one message, a batch, or a remote command (SPEC §6.1).

    Stricter than anycable-go: a body that is not a valid publication raises instead of
    being logged and dropped, and a batch is all-or-nothing.

    Raises:
        ProtocolError: with a message that says what is wrong.
    """
    try:
        obj = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"body is not valid JSON: {exc}") from None
    _check_unicode(body, obj)
    if isinstance(obj, list):
        if not obj:
            raise ProtocolError("batch is empty")
        out = []
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                raise ProtocolError(f"[{i}]: each publication must be an object")
            out.append(_stream_message(item, f"[{i}]."))
        return out
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a JSON object or an array of objects")
    if obj.get("stream"):
        return [_stream_message(obj, "")]
    command = obj.get("command")
    if command:
        if command != "disconnect":
            raise ProtocolError(f"unknown command {_clip(repr(command))} (only 'disconnect' is supported)")
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise ProtocolError("payload must be an object")
        identifier = payload.get("identifier")
        if not isinstance(identifier, str) or not identifier:
            raise ProtocolError("payload.identifier must be a non-empty string")
        reconnect = payload.get("reconnect", False)
        if not isinstance(reconnect, bool):
            raise ProtocolError("payload.reconnect must be a boolean")
        return RemoteCommand("disconnect", identifier, reconnect)
    raise ProtocolError("publication needs a non-empty stream (or a command)")


# ---------------------------------------------------------------------------- pub/sub codec
#
# What travels between processes and nodes (SPEC §7, anycable-go 1.6's shape):
#   {"stream":"…","data":"…"[,"meta":{"exclude_socket":…,"transient":true,"broadcast_type":…}]
#    [,"offset":N,"epoch":"…"]}
#   {"command":"disconnect","payload":{"identifier":"…","reconnect":true}}
# The Redis broker's Lua script appends ``,"offset":N,"epoch":"…"}`` to :func:`pubsub_head`
# itself, so the offset and the publish come from one atomic step.


def pubsub_head(msg: StreamMessage) -> str:
    """The JSON of a message without its position and without the closing brace."""
    head = '{"stream":' + dumps(msg.stream) + ',"data":' + dumps(msg.data)
    meta: dict[str, Any] = {}
    if msg.exclude_socket:
        meta["exclude_socket"] = msg.exclude_socket
    if msg.transient:
        meta["transient"] = True
    if msg.broadcast_type:
        meta["broadcast_type"] = msg.broadcast_type
    if meta:
        head += ',"meta":' + dumps(meta)
    return head


def encode_pubsub(msg: StreamMessage) -> bytes:
    """A message for pub/sub (with its position when it has one)."""
    tail = f',"offset":{msg.offset},"epoch":{dumps(msg.epoch)}}}' if msg.offset else "}"
    return (pubsub_head(msg) + tail).encode()


def encode_pubsub_command(cmd: RemoteCommand) -> bytes:
    return dumps(
        {"command": cmd.command, "payload": {"identifier": cmd.identifier, "reconnect": cmd.reconnect}}
    ).encode()


def decode_pubsub(raw: bytes | str) -> StreamMessage | RemoteCommand:
    """Decode what another process published (strictly: pub/sub is shared with nobody else).

    Raises:
        ProtocolError: not one of the two shapes above.
    """
    try:
        obj = loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"pub/sub message is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("pub/sub message must be an object")
    # as strict as the publication parser: a string that cannot be encoded would fail
    # the fan-out of a whole batch later, far from here
    _check_unicode(raw, obj)
    if "command" in obj:
        payload = obj.get("payload")
        if obj["command"] != "disconnect" or not isinstance(payload, dict):
            raise ProtocolError("unknown pub/sub command")
        identifier, reconnect = payload.get("identifier"), payload.get("reconnect", False)
        if not isinstance(identifier, str) or not isinstance(reconnect, bool):
            raise ProtocolError("invalid disconnect command")
        return RemoteCommand("disconnect", identifier, reconnect)
    msg = _stream_message(obj, "")
    meta = obj.get("meta")
    if isinstance(meta, dict):
        kind = meta.get("broadcast_type", "")
        if not isinstance(kind, str):
            raise ProtocolError("meta.broadcast_type must be a string")
        msg.broadcast_type = kind
    offset, epoch = obj.get("offset", 0), obj.get("epoch", "")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or not isinstance(epoch, str):
        raise ProtocolError("offset must be a non-negative integer and epoch a string")
    if offset and not epoch:
        raise ProtocolError("an offset needs its epoch")
    msg.offset, msg.epoch = offset, epoch
    return msg
