"""Protocol codec: client command decoding, publication parsing, message payloads, WS framing."""

from __future__ import annotations

import json
import os
import struct

import pytest

from anycable_gevent import protocol
from anycable_gevent.errors import ProtocolError
from anycable_gevent.protocol import (
    Command,
    HistoryRequest,
    Position,
    RemoteCommand,
    StreamMessage,
    decode_command,
    decode_publication,
    message_json,
    unmask,
    ws_frame,
)

# ---------------------------------------------------------------------- decode_command


def test_subscribe_frame() -> None:
    cmd = decode_command('{"command":"subscribe","identifier":"{\\"channel\\":\\"X\\"}"}')
    assert cmd == Command(command="subscribe", identifier='{"channel":"X"}')
    assert cmd.history is None and not cmd.has_data


def test_bytes_input() -> None:
    cmd = decode_command(b'{"command":"ping"}')
    assert cmd is not None and cmd.command == "ping"


def test_message_frame_keeps_data_string() -> None:
    cmd = decode_command(json.dumps({"command": "message", "identifier": "i", "data": '{"action":"x"}'}))
    assert cmd is not None
    assert cmd.data == '{"action":"x"}' and cmd.has_data


def test_whisper_data_may_be_any_json() -> None:
    cmd = decode_command(json.dumps({"command": "whisper", "identifier": "i", "data": {"event": "typing"}}))
    assert cmd is not None and cmd.data == {"event": "typing"} and cmd.has_data


def test_data_null_is_present_but_none() -> None:
    cmd = decode_command('{"command":"whisper","identifier":"i","data":null}')
    assert cmd is not None and cmd.has_data and cmd.data is None


def test_json_null_is_ignored_silently() -> None:
    assert decode_command("null") is None


def test_missing_command_and_identifier_are_empty() -> None:
    assert decode_command("{}") == Command(command="")
    assert decode_command('{"command":"x","identifier":null}') == Command(command="x")


def test_unknown_fields_are_ignored() -> None:
    cmd = decode_command('{"command":"pong","extra":[1,2],"nested":{"a":null}}')
    assert cmd == Command(command="pong")


def test_non_ascii_identifier_is_kept_byte_for_byte() -> None:
    ident = '{"channel":"Чат","room":"☃"}'
    cmd = decode_command(json.dumps({"command": "subscribe", "identifier": ident}, ensure_ascii=False).encode())
    assert cmd is not None and cmd.identifier == ident


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not-json",
        "{",
        '{"command":"subscribe"',
        "[]",
        '[{"command":"ping"}]',
        '"subscribe"',
        "42",
        "true",
        '{"command":1}',
        '{"command":null}',
        '{"command":["subscribe"]}',
        '{"command":"subscribe","identifier":{"channel":"X"}}',
        '{"command":"subscribe","identifier":42}',
        '{"command":"subscribe","identifier":"i","history":[]}',
        '{"command":"subscribe","identifier":"i","history":"x"}',
        '{"command":"subscribe","identifier":"i","history":{"since":"123"}}',
        '{"command":"subscribe","identifier":"i","history":{"since":true}}',
        '{"command":"subscribe","identifier":"i","history":{"since":-1}}',
        '{"command":"history","identifier":"i","history":{"streams":[]}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":1}}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":{"epoch":1,"offset":1}}}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":{"epoch":"e","offset":-1}}}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":{"epoch":"e","offset":1.5}}}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":{"epoch":"e","offset":true}}}}',
        '{"command":"history","identifier":"i","history":{"streams":{"s":{"epoch":"e","offset":"1"}}}}',
        '{"command":"join","identifier":"i","presence":"x"}',
        '{"command":"ping","x":NaN}',
        '{"command":"ping","x":Infinity}',
    ],
)
def test_malformed_frames_raise(raw: str) -> None:
    with pytest.raises(ProtocolError):
        decode_command(raw)


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_raises_protocol_error() -> None:
    # the JSON decoder's RecursionError must not escape as an unexpected exception
    with pytest.raises(ProtocolError):
        decode_command('{"command":"ping","x":' + DEEP + "}")
    with pytest.raises(ProtocolError):
        decode_publication(DEEP)
    with pytest.raises(ProtocolError):
        decode_publication('{"stream":"a","data":"1","meta":' + DEEP + "}")


@pytest.mark.parametrize(
    "raw",
    [
        '{"command":"subscribe","identifier":"\\ud800"}',
        b'{"command":"subscribe","identifier":"\\udfff"}',
        '{"command":"whisper","identifier":"i","data":{"k":["\\udc00"]}}',
        '{"command":"subscribe","identifier":"i","\\ud83d":1}',  # even in a key
        '{"command":"subscribe","identifier":"\ud800"}',  # a raw surrogate in a str frame
    ],
)
def test_unpaired_surrogates_are_refused(raw: str | bytes) -> None:
    # they could not be encoded as UTF-8 when echoed back (reject_subscription) or relayed
    with pytest.raises(ProtocolError, match="surrogate"):
        decode_command(raw)


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    cmd = decode_command('{"command":"subscribe","identifier":"\\ud83d\\ude00 \\\\ud800"}')
    assert cmd is not None and cmd.identifier == "\U0001f600 \\ud800"


@pytest.mark.parametrize(
    "body",
    [
        b'{"stream":"a","data":"\\ud800"}',
        b'{"stream":"\\ud800","data":"1"}',
        b'{"stream":"a","data":"1","meta":{"exclude_socket":"\\udc00"}}',
        b'[{"stream":"a","data":"1"},{"stream":"b","data":"\\ud9ff"}]',
    ],
)
def test_publications_with_unpaired_surrogates_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="surrogate"):
        decode_publication(body)


def test_data_with_an_escaped_surrogate_inside_the_json_string_is_kept() -> None:
    # data is itself JSON whose string holds an escape: it is relayed verbatim, never decoded to UTF-8
    (msg,) = decode_publication(b'{"stream":"a","data":"\\"\\\\ud800\\""}')
    assert msg.data == '"\\ud800"'
    assert message_json(msg.data) == '"\\ud800"'


def test_deeply_nested_broadcast_data_is_delivered_as_a_string() -> None:
    assert json.loads(message_json(DEEP)) == DEEP


def test_invalid_utf8_raises() -> None:
    with pytest.raises(ProtocolError):
        decode_command(b'{"command":"\xff"}')


@pytest.mark.parametrize("since", [None, False])
def test_history_since_false_or_null_means_none(since: object) -> None:
    # the JS client sends since:false when historyTimestamp is false but positions exist
    cmd = decode_command(json.dumps({"command": "history", "identifier": "i", "history": {"since": since}}))
    assert cmd is not None and cmd.history == HistoryRequest(0, None)
    assert cmd.history.empty


def test_history_since_float_is_truncated_to_seconds() -> None:
    cmd = decode_command('{"command":"history","identifier":"i","history":{"since":1700000000.9}}')
    assert cmd is not None and cmd.history == HistoryRequest(1700000000, None)


def test_history_with_streams() -> None:
    raw = {
        "command": "history",
        "identifier": "i",
        "history": {"since": 10, "streams": {"a": {"epoch": "e1", "offset": 3}, "b": {"epoch": "e1", "offset": 0}}},
    }
    cmd = decode_command(json.dumps(raw))
    assert cmd is not None
    assert cmd.history == HistoryRequest(10, {"a": Position("e1", 3), "b": Position("e1", 0)})


def test_history_empty_streams_object_counts_as_present() -> None:
    # the JS client sends {"since": T, "streams": {}} on every subscribe
    cmd = decode_command('{"command":"subscribe","identifier":"i","history":{"streams":{}}}')
    assert cmd is not None and cmd.history == HistoryRequest(0, {})
    assert not cmd.history.empty


def test_history_empty_object_is_empty() -> None:
    cmd = decode_command('{"command":"history","identifier":"i","history":{}}')
    assert cmd is not None and cmd.history is not None and cmd.history.empty


def test_presence_object() -> None:
    cmd = decode_command('{"command":"join","identifier":"i","presence":{"id":"42","info":{"n":1}}}')
    assert cmd is not None and cmd.presence == {"id": "42", "info": {"n": 1}}


# ---------------------------------------------------------------------- server frames


def test_server_frames() -> None:
    assert json.loads(protocol.welcome()) == {"type": "welcome"}
    assert json.loads(protocol.welcome("abc")) == {"type": "welcome", "sid": "abc"}
    assert json.loads(protocol.welcome("n", True, ["a"])) == {
        "type": "welcome",
        "sid": "n",
        "restored": True,
        "restored_ids": ["a"],
    }
    assert json.loads(protocol.welcome("n", True, [])) == {"type": "welcome", "sid": "n", "restored": True}
    assert json.loads(protocol.confirm("i")) == {"identifier": "i", "type": "confirm_subscription"}
    assert json.loads(protocol.reject("i")) == {"identifier": "i", "type": "reject_subscription"}
    assert json.loads(protocol.disconnect("too_slow", True)) == {
        "type": "disconnect",
        "reason": "too_slow",
        "reconnect": True,
    }
    # disconnect always carries reconnect, even when false (SPEC §3.2)
    assert json.loads(protocol.disconnect("unauthorized", False))["reconnect"] is False
    assert json.loads(protocol.ping(1700000000)) == {"type": "ping", "message": 1700000000}
    assert json.loads(protocol.PONG) == {"type": "pong"}
    assert json.loads(protocol.confirm_history("i")) == {"type": "confirm_history", "identifier": "i"}
    assert json.loads(protocol.reject_history("i")) == {"type": "reject_history", "identifier": "i"}


def test_identifier_is_escaped_in_frames() -> None:
    ident = '{"channel":"X","q":"a\\"b"}'
    assert json.loads(protocol.confirm(ident))["identifier"] == ident


# ---------------------------------------------------------------------- message_json (SPEC §3.10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"user_id":1,"text":"hi"}', {"user_id": 1, "text": "hi"}),  # #31: an object
        (json.dumps("<script>alert('Message!');</script>"), "<script>alert('Message!');</script>"),  # #32
        (json.dumps('{"script":{"alert":"Message!"}}'), '{"script":{"alert":"Message!"}}'),  # #33: stays a string
        ('"abc123"', "abc123"),  # #34
        ("<script>alert('Message!');</script>", "<script>alert('Message!');</script>"),  # not JSON: the raw string
        ("null", "null"),  # JSON null: the raw string
        ("", ""),
        ("42", 42),
        ("[1,2]", [1, 2]),
        ("true", True),
        ('{"a":1} trailing', '{"a":1} trailing'),
        ("NaN", "NaN"),
        ('{"x":NaN}', '{"x":NaN}'),
        ("ünï ☃", "ünï ☃"),
    ],
)
def test_message_json(data: str, message: object) -> None:
    assert json.loads(message_json(data)) == message


def test_message_json_embeds_valid_json_verbatim() -> None:
    data = '{"b": 1,  "a": [ 2 ]}'
    assert message_json(data) == data


def test_stream_message_tail() -> None:
    plain = StreamMessage("s", '{"x":1}')
    frame = json.loads(protocol.frame_prefix("id") + plain.tail())
    assert frame == {"identifier": "id", "message": {"x": 1}}
    registered = StreamMessage("s", '"hi"', offset=7, epoch="ep")
    frame = json.loads(protocol.frame_prefix("id") + registered.tail())
    assert frame == {"identifier": "id", "message": "hi", "stream_id": "s", "epoch": "ep", "offset": 7}


def test_frame_prefix_with_broadcast_type() -> None:
    frame = json.loads(protocol.frame_prefix("id", "presence") + StreamMessage("s", "{}").tail())
    assert frame == {"type": "presence", "identifier": "id", "message": {}}


# ---------------------------------------------------------------------- decode_publication (SPEC §6.1)


def test_single_publication() -> None:
    pub = decode_publication(b'{"stream":"a","data":"{\\"x\\":1}"}')
    assert pub == [StreamMessage("a", '{"x":1}')]


def test_publication_meta() -> None:
    pub = decode_publication(json.dumps({"stream": "a", "data": "1", "meta": {"exclude_socket": "s1", "x": 1}}))
    assert pub == [StreamMessage("a", "1", exclude_socket="s1")]
    pub = decode_publication(json.dumps({"stream": "a", "data": "1", "meta": {"transient": True}}))
    assert pub == [StreamMessage("a", "1", transient=True)]


def test_batch_publication_keeps_order() -> None:
    body = [{"stream": "a", "data": "1"}, {"stream": "b", "data": "2"}, {"stream": "a", "data": "3"}]
    pub = decode_publication(json.dumps(body))
    assert isinstance(pub, list)
    assert [(m.stream, m.data) for m in pub] == [("a", "1"), ("b", "2"), ("a", "3")]


def test_remote_disconnect() -> None:
    body = {"command": "disconnect", "payload": {"identifier": '{"uid":"26"}', "reconnect": True}}
    assert decode_publication(json.dumps(body)) == RemoteCommand("disconnect", '{"uid":"26"}', True)
    body = {"command": "disconnect", "payload": {"identifier": "x"}}
    assert decode_publication(json.dumps(body)) == RemoteCommand("disconnect", "x", False)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"42",
        b'"stream"',
        b"null",
        b"{}",
        b'{"data":"1"}',
        b'{"stream":"","data":"1"}',
        b'{"stream":"a"}',
        b'{"stream":"a","data":{"x":1}}',
        b'{"stream":"a","data":1}',
        b'{"stream":"a","data":null}',
        b'{"stream":1,"data":"1"}',
        b'{"stream":"a","data":"1","meta":"x"}',
        b'{"stream":"a","data":"1","meta":{"exclude_socket":1}}',
        b'{"stream":"a","data":"1","meta":{"transient":"yes"}}',
        b'[{"stream":"a","data":"1"},{"stream":"b","data":{"x":1}}]',
        b'[{"stream":"a","data":"1"},{"stream":"","data":"2"}]',
        b'[{"stream":"a","data":"1"},"x"]',
        b'{"command":"restart"}',
        b'{"command":"disconnect"}',
        b'{"command":"disconnect","payload":{}}',
        b'{"command":"disconnect","payload":{"identifier":""}}',
        b'{"command":"disconnect","payload":{"identifier":"x","reconnect":"yes"}}',
        b'{"stream":"a","data":"1","x":NaN}',
    ],
)
def test_invalid_publications_raise(body: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_publication(body)
    assert str(info.value)  # every rejection says why


def test_invalid_batch_error_names_the_element() -> None:
    with pytest.raises(ProtocolError, match=r"\[1\]"):
        decode_publication(b'[{"stream":"a","data":"1"},{"stream":"b","data":2}]')


# ---------------------------------------------------------------------- WebSocket framing


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, bytes([0x81, 0])),
        (125, bytes([0x81, 125])),
        (126, bytes([0x81, 126]) + struct.pack("!H", 126)),
        (65535, bytes([0x81, 126]) + struct.pack("!H", 65535)),
        (65536, bytes([0x81, 127]) + struct.pack("!Q", 65536)),
    ],
)
def test_ws_frame_lengths(length: int, header: bytes) -> None:
    payload = os.urandom(length)
    frame = ws_frame(payload)
    assert frame == header + payload


def test_ws_frame_opcodes() -> None:
    assert ws_frame(b"x", protocol.OP_PONG)[0] == 0x80 | 0xA
    assert ws_frame(b"", protocol.OP_PING) == bytes([0x89, 0])
    close = protocol.close_frame(1001, "Server restart")
    assert close[0] == 0x88 and close[1] == 2 + len("Server restart")
    assert struct.unpack("!H", close[2:4])[0] == 1001 and close[4:] == b"Server restart"


def test_close_frame_reason_fits_a_control_frame() -> None:
    close = protocol.close_frame(1000, "x" * 500)
    assert close[1] <= 125


def _xor(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 125, 126, 1000, 4097])
def test_unmask(length: int) -> None:
    payload, mask = os.urandom(length), os.urandom(4)
    masked = _xor(payload, mask)
    assert unmask(masked, mask) == payload


def test_unmask_keeps_leading_zero_bytes() -> None:
    mask = b"\x01\x02\x03\x04"
    assert unmask(_xor(b"\x00\x00\x00abc", mask), mask) == b"\x00\x00\x00abc"


# ---------------------------------------------------------------------- sub-protocols


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("actioncable-v1-ext-json, anycable-token.X", "actioncable-v1-ext-json"),
        ("actioncable-v1-json, actioncable-unsupported", "actioncable-v1-json"),
        ("actioncable-v1-ext-json,actioncable-v1-json", "actioncable-v1-ext-json"),  # the client's order
        ("actioncable-v1-json,actioncable-v1-ext-json", "actioncable-v1-json"),
        ("anycable-token.X, actioncable-v1-json", "actioncable-v1-json"),
        ("actioncable-v1-msgpack", None),
        ("foo, bar", None),
        ("", None),
    ],
)
def test_select_protocol(offered: str, chosen: str | None) -> None:
    assert protocol.select_protocol(offered) == chosen


def test_token_from_protocols() -> None:
    assert protocol.token_from_protocols("actioncable-v1-ext-json, anycable-token.abc.def") == "abc.def"
    assert protocol.token_from_protocols("actioncable-v1-ext-json") == ""


# ---------------------------------------------------------------------- pub/sub codec


@pytest.mark.parametrize(
    "msg",
    [
        protocol.StreamMessage(stream="a", data='{"x":1}'),
        protocol.StreamMessage(stream="chat/ü", data="plain", offset=7, epoch="Ab3_"),
        protocol.StreamMessage(stream="s", data='"w"', exclude_socket="sid-1", transient=True),
        protocol.StreamMessage(stream="p", data='{"type":"join"}', transient=True, broadcast_type="presence"),
    ],
)
def test_pubsub_messages_round_trip(msg: protocol.StreamMessage) -> None:
    decoded = protocol.decode_pubsub(protocol.encode_pubsub(msg))
    assert decoded == msg


def test_pubsub_head_plus_a_position_is_a_valid_message() -> None:
    # what the Redis broker's script publishes: the head, then ',"offset":N,"epoch":"E"}'
    msg = protocol.StreamMessage(stream="a", data="d")
    decoded = protocol.decode_pubsub(protocol.pubsub_head(msg) + ',"offset":3,"epoch":"XyZ1"}')
    assert (decoded.offset, decoded.epoch) == (3, "XyZ1")  # type: ignore[union-attr]


def test_pubsub_commands_round_trip() -> None:
    cmd = protocol.RemoteCommand("disconnect", '{"user_id":1}', True)
    assert protocol.decode_pubsub(protocol.encode_pubsub_command(cmd)) == cmd


@pytest.mark.parametrize(
    "raw",
    [
        b"nope",
        b"[]",
        b'{"stream":"a"}',
        b'{"stream":"a","data":"d","offset":-1,"epoch":"e"}',
        b'{"stream":"a","data":"d","offset":3}',
        b'{"command":"reload"}',
        b'{"command":"disconnect","payload":1}',
    ],
)
def test_malformed_pubsub_messages_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_pubsub(raw)
