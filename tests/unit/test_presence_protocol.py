"""Presence on the wire (SPEC §4.8): client frames accepted, server frames built."""

from __future__ import annotations

import json

import pytest

from anycable_gevent.errors import ProtocolError
from anycable_gevent.protocol import PresenceEvent, PresenceInfo, decode_command, presence_error, presence_info

IDENT = '{"channel":"$pubsub","stream_name":"room"}'


def test_join_frame_of_the_js_client_is_decoded() -> None:
    frame = {"command": "join", "identifier": IDENT, "presence": {"id": "42", "info": {"name": "Jack"}}}
    cmd = decode_command(json.dumps(frame))
    assert cmd is not None
    assert (cmd.command, cmd.identifier, cmd.presence) == ("join", IDENT, {"id": "42", "info": {"name": "Jack"}})


@pytest.mark.parametrize("presence", [[], "42", {"id": 42}, {"id": None}])
def test_malformed_presence_is_a_protocol_error(presence: object) -> None:
    with pytest.raises(ProtocolError):
        decode_command(json.dumps({"command": "join", "identifier": IDENT, "presence": presence}))


def test_event_payloads() -> None:
    assert PresenceEvent("join", "42", {"name": "Jack"}).to_json() == '{"type":"join","id":"42","info":{"name":"Jack"}}'
    assert PresenceEvent("join", "42").to_json() == '{"type":"join","id":"42"}'
    assert PresenceEvent("leave", "42", {"ignored": 1}).to_json() == '{"type":"leave","id":"42"}'


def test_info_reply() -> None:
    info = PresenceInfo(2, [("42", {"name": "Jack"}), ("7", None)])
    assert json.loads(presence_info(IDENT, info)) == {
        "type": "presence",
        "identifier": IDENT,
        "message": {"type": "info", "total": 2, "records": [{"id": "42", "info": {"name": "Jack"}}, {"id": "7"}]},
    }
    assert json.loads(presence_info(IDENT, info, with_records=False))["message"] == {"type": "info", "total": 2}
    # nobody present: no records key, as anycable-go sends it
    assert json.loads(presence_info(IDENT, PresenceInfo()))["message"] == {"type": "info", "total": 0}


def test_error_reply() -> None:
    assert json.loads(presence_error(IDENT)) == {
        "type": "presence",
        "identifier": IDENT,
        "message": {"type": "error", "total": 0},
    }
