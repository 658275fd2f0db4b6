"""Property tests of the codecs that take untrusted input.

Client commands (``decode_command``), channel identifiers (``encodable_identifier``,
``channel_params``), publications (``decode_publication``), the pub/sub codec
(``encode_pubsub``/``decode_pubsub``) and ``--history_overrides`` (``HistoryPolicy.parse``):
each either parses or raises its one documented error, and what it accepts can be
encoded and sent on (no error far from the input).
"""

from __future__ import annotations

import json
from typing import Any

from helpers import fuzz_examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anycable_gevent import protocol
from anycable_gevent.controllers.chain import channel_params
from anycable_gevent.errors import ProtocolError
from anycable_gevent.history import HistoryPolicy, HistorySettings
from anycable_gevent.protocol import Command, HistoryRequest, Position, RemoteCommand, StreamMessage

# Text with everything that trips codecs up: surrogates, NUL, quotes, backslashes, escapes.
TRICKY = st.sampled_from(['"', "\\", "\\u", "\\ud800", "\\udc00", "\ud800", "\x00", "\n", "é", "💥", "{", "["])
TEXT = st.text(max_size=30) | st.lists(TRICKY, max_size=6).map("".join)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=6,
)
FIELD_NAMES = st.sampled_from(
    ["command", "identifier", "data", "history", "presence", "since", "streams", "epoch", "offset", "id", "info"]
)
COMMANDS = st.sampled_from(["subscribe", "unsubscribe", "message", "history", "whisper", "join", "leave", "presence"])


def utf8_ok(value: Any) -> bool:
    """The value can be sent: its JSON encodes as UTF-8."""
    try:
        protocol.dumps(value).encode()
    except UnicodeEncodeError:
        return False
    return True


def raw_variants(obj: Any) -> st.SearchStrategy[str | bytes]:
    text = json.dumps(obj)
    return st.sampled_from([text, text.encode("utf-8", "surrogatepass"), json.dumps(obj, ensure_ascii=False)])


@st.composite
def command_frames(draw: st.DrawFn) -> str | bytes:
    """Command-shaped JSON with random fields and types, serialized in one of several ways."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["command"] = draw(COMMANDS | JSON)
    for name in draw(st.lists(FIELD_NAMES, max_size=5)):
        obj[name] = draw(JSON)
    if draw(st.booleans()):
        obj["history"] = {
            "since": draw(JSON),
            "streams": draw(st.dictionaries(TEXT, st.dictionaries(st.sampled_from(["epoch", "offset"]), JSON))),
        }
    return draw(raw_variants(obj))


def check_command(cmd: Command | None) -> None:
    if cmd is None:
        return
    assert isinstance(cmd.command, str) and isinstance(cmd.identifier, str)
    assert cmd.history is None or isinstance(cmd.history, HistoryRequest)
    if cmd.history is not None:
        assert isinstance(cmd.history.since, int) and cmd.history.since >= 0
        for name, pos in (cmd.history.streams or {}).items():
            assert isinstance(name, str) and isinstance(pos, Position)
            assert isinstance(pos.epoch, str) and isinstance(pos.offset, int) and pos.offset >= 0
    assert cmd.presence is None or (isinstance(cmd.presence, dict) and isinstance(cmd.presence.get("id", ""), str))
    # everything accepted can be echoed, whispered, stored: it encodes
    assert utf8_ok([cmd.command, cmd.identifier, cmd.data, cmd.presence])


def decode(raw: str | bytes) -> Command | None | ProtocolError:
    try:
        return protocol.decode_command(raw)
    except ProtocolError as exc:
        return exc


# ---------------------------------------------------------------------- commands


@settings(max_examples=fuzz_examples(60), suppress_health_check=[HealthCheck.too_slow])
@given(raw=command_frames())
def test_command_shaped_frames_parse_or_raise_protocol_error(raw: str | bytes) -> None:
    result = decode(raw)
    if not isinstance(result, ProtocolError):
        check_command(result)


@settings(max_examples=fuzz_examples(60))
@given(raw=st.binary(max_size=200) | st.text(max_size=200) | JSON.map(json.dumps))
def test_any_frame_parses_or_raises_protocol_error(raw: str | bytes) -> None:
    result = decode(raw)
    if not isinstance(result, ProtocolError):
        check_command(result)


@settings(max_examples=fuzz_examples(20))
@given(depth=st.integers(100, 200_000), opener=st.sampled_from(["[", '{"a":']))
def test_deeply_nested_frames_are_a_protocol_error_not_a_recursion_error(depth: int, opener: str) -> None:
    raw = '{"command":"message","data":' + opener * depth
    assert isinstance(decode(raw), ProtocolError)


# ---------------------------------------------------------------------- identifiers


IDENTIFIERS = (
    st.text(max_size=60)
    | JSON.map(json.dumps)
    | st.dictionaries(st.sampled_from(["channel", "stream_name", "signed_stream_name", "id"]), JSON).map(json.dumps)
    | st.integers(1, 100_000).map(lambda n: "[" * n)
)


@settings(max_examples=fuzz_examples(75), suppress_health_check=[HealthCheck.too_slow])
@given(identifier=IDENTIFIERS)
def test_identifiers_never_raise_and_what_is_accepted_encodes(identifier: str) -> None:
    encodable = protocol.encodable_identifier(identifier)
    assert isinstance(encodable, bool)
    params = channel_params(identifier)
    assert params is None or isinstance(params, dict)
    if encodable and params is not None:
        # streams and channel state taken from it can be stored and sent
        assert utf8_ok(params)
    # the frames that carry it back to the client encode (or the identifier is refused first)
    if encodable and "\ud800" not in identifier and utf8_ok(identifier):
        protocol.confirm(identifier).encode()
        protocol.reject(identifier).encode()


# ---------------------------------------------------------------------- publications


@st.composite
def publication_bodies(draw: st.DrawFn) -> str | bytes:
    def message() -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name in draw(st.lists(st.sampled_from(["stream", "data", "meta", "command", "payload"]), max_size=4)):
            obj[name] = draw(JSON)
        if draw(st.booleans()):
            obj["stream"] = draw(TEXT)
            obj["data"] = draw(TEXT | JSON.map(json.dumps))
        if draw(st.booleans()):
            obj["meta"] = draw(
                st.dictionaries(st.sampled_from(["exclude_socket", "transient", "broadcast_type", "x"]), JSON)
            )
        if draw(st.booleans()):
            obj["command"] = draw(st.sampled_from(["disconnect", "<script>"]) | JSON)
            obj["payload"] = draw(st.dictionaries(st.sampled_from(["identifier", "reconnect"]), JSON) | JSON)
        return obj

    body: Any = [message() for _ in range(draw(st.integers(0, 3)))] if draw(st.booleans()) else message()
    return draw(raw_variants(body))


def check_publication(pub: protocol.Publication) -> None:
    if isinstance(pub, RemoteCommand):
        assert pub.command == "disconnect" and isinstance(pub.identifier, str) and pub.identifier
        assert protocol.decode_pubsub(protocol.encode_pubsub_command(pub)) == pub
        return
    assert pub, "an accepted batch is never empty"
    for msg in pub:
        assert isinstance(msg, StreamMessage) and msg.stream and isinstance(msg.data, str)
        # it re-encodes: for pub/sub, and as the tail of a client frame that is valid JSON
        again = protocol.decode_pubsub(protocol.encode_pubsub(msg))
        assert isinstance(again, StreamMessage)
        assert (again.stream, again.data, again.exclude_socket, again.transient) == (
            msg.stream,
            msg.data,
            msg.exclude_socket,
            msg.transient,
        )
        frame = json.loads(protocol.frame_prefix("id") + msg.tail())
        assert frame["identifier"] == "id"


@settings(max_examples=fuzz_examples(50), suppress_health_check=[HealthCheck.too_slow])
@given(body=publication_bodies())
def test_publications_parse_or_raise_protocol_error_and_re_encode(body: str | bytes) -> None:
    try:
        pub = protocol.decode_publication(body)
    except ProtocolError:
        return
    check_publication(pub)


@settings(max_examples=fuzz_examples(60))
@given(body=st.binary(max_size=200) | st.text(max_size=200) | JSON.map(json.dumps))
def test_any_body_parses_or_raises_protocol_error(body: str | bytes) -> None:
    try:
        pub = protocol.decode_publication(body)
    except ProtocolError:
        return
    check_publication(pub)


# ---------------------------------------------------------------------- pub/sub codec

# What a StreamMessage can hold: strings that encode (parsers refuse the others), and a
# position only as the broker makes it (an offset always with its epoch).
SENDABLE = st.text(max_size=40).filter(lambda s: utf8_ok(s))


@st.composite
def stream_messages(draw: st.DrawFn) -> StreamMessage:
    positioned = draw(st.booleans())
    return StreamMessage(
        stream=draw(SENDABLE.filter(bool)),
        data=draw(SENDABLE | JSON.filter(utf8_ok).map(protocol.dumps)),
        exclude_socket=draw(SENDABLE),
        transient=draw(st.booleans()),
        broadcast_type=draw(SENDABLE),
        offset=draw(st.integers(1, 2**63)) if positioned else 0,
        epoch=draw(SENDABLE.filter(bool)) if positioned else "",
    )


@settings(max_examples=fuzz_examples(75))
@given(msg=stream_messages())
def test_pubsub_round_trip_of_any_stream_message(msg: StreamMessage) -> None:
    again = protocol.decode_pubsub(protocol.encode_pubsub(msg))
    assert again == msg


@settings(max_examples=fuzz_examples(50))
@given(identifier=SENDABLE.filter(bool), reconnect=st.booleans())
def test_pubsub_round_trip_of_a_remote_command(identifier: str, reconnect: bool) -> None:
    cmd = RemoteCommand("disconnect", identifier, reconnect)
    assert protocol.decode_pubsub(protocol.encode_pubsub_command(cmd)) == cmd


@st.composite
def pubsub_shaped(draw: st.DrawFn) -> str | bytes:
    obj: dict[str, Any] = {}
    for name in draw(
        st.lists(st.sampled_from(["stream", "data", "meta", "offset", "epoch", "command", "payload"]), max_size=7)
    ):
        obj[name] = draw(JSON)
    if draw(st.booleans()):
        obj["stream"], obj["data"] = draw(TEXT), draw(TEXT)
        obj["meta"] = draw(st.dictionaries(st.sampled_from(["exclude_socket", "transient", "broadcast_type"]), JSON))
    return draw(raw_variants(obj))


@settings(max_examples=fuzz_examples(75), suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200) | pubsub_shaped())
def test_any_pubsub_bytes_parse_or_raise_protocol_error(raw: str | bytes) -> None:
    try:
        msg = protocol.decode_pubsub(raw)
    except ProtocolError:
        return
    if isinstance(msg, RemoteCommand):
        assert isinstance(msg.identifier, str) and isinstance(msg.reconnect, bool)
        return
    assert msg.stream and isinstance(msg.data, str) and msg.offset >= 0
    # what is accepted can be delivered: the frame tail encodes
    json.loads(protocol.frame_prefix("id", msg.broadcast_type) + msg.tail())


# ---------------------------------------------------------------------- history overrides

DEFAULT = HistorySettings(100, 300)
OVERRIDE_ITEMS = st.lists(
    st.text(max_size=30)
    | st.tuples(
        st.text(max_size=10) | st.sampled_from(["chat/*", "[", "[z-a]", "[!]", "**", "\\", "?"]),
        st.sampled_from(["=", "==", ""]),
        st.text(max_size=8) | st.integers(-5, 10**6).map(str),
        st.sampled_from(["", "/", "/s", "/0", "/-1"]),
        st.text(max_size=4) | st.integers(-5, 10**6).map(str),
    ).map("".join),
    max_size=4,
)


@settings(max_examples=fuzz_examples(75))
@given(items=OVERRIDE_ITEMS, streams=st.lists(st.text(max_size=20), max_size=5))
def test_history_overrides_parse_or_raise_value_error(items: list[str], streams: list[str]) -> None:
    try:
        policy = HistoryPolicy.parse(items, DEFAULT)
    except ValueError:
        return
    for stream in streams:
        found = policy.for_stream(stream)
        assert found.limit >= 0 and found.ttl > 0
    assert policy.max_ttl >= DEFAULT.ttl
    policy.describe()
