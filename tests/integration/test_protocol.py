"""Action Cable protocol over a real socket (SPEC §3, §4.7, §11.1–11.2).

Uses the module ``server`` (``--public_streams --noauth``) plus one server with fast pings
and a pong timeout for the keepalive tests.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from helpers import BASE, EXT, Client, RawWS, Server, connected, pubsub_id


@pytest.fixture(scope="module")
def fast() -> Iterator[Server]:
    """Pings every 0.5 s in milliseconds; extended-protocol clients must answer within 1 s."""
    with Server(
        "--noauth",
        "--public_streams",
        "--ping_interval=0.5",
        "--ping_timestamp_precision=ms",
        "--pong_timeout=1",
    ) as srv:
        yield srv


def pings(client: Client, n: int, timeout: float = 5.0) -> list[int]:
    """The timestamps of the next ``n`` pings (failing on any other frame)."""
    out = []
    while len(out) < n:
        msg = client.recv(timeout, pings=True)
        assert msg["type"] == "ping", msg
        assert isinstance(msg["message"], int)
        out.append(msg["message"])
    return out


# ---------------------------------------------------------------------- welcome and sid

SID = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize("protocol", [EXT, BASE])
def test_welcome_carries_a_server_generated_sid(server: Server, protocol: str) -> None:
    with connected(server, protocol=protocol) as c:
        assert c.welcome is not None
        assert set(c.welcome) == {"type", "sid"}
        sid = c.welcome["sid"]
        assert SID.match(sid)
        assert len(sid) * 6 >= 128  # URL-safe base64: 6 bits per character


def test_sids_are_unique(server: Server) -> None:
    sids = set()
    for _ in range(20):
        with connected(server) as c:
            assert c.welcome is not None
            sids.add(c.welcome["sid"])
    assert len(sids) == 20


def test_sid_is_never_taken_from_x_request_id(server: Server) -> None:
    # DESIGN.md: a sid is a bearer credential (restore), so a client never chooses it
    with connected(server, headers={"X-Request-ID": "chosen-by-client"}) as c:
        assert c.welcome is not None and c.welcome["sid"] != "chosen-by-client"
        ident = pubsub_id("xrid")
        c.subscribe(ident)
        # exclude_socket naming the header value must not match this socket
        server.publish("xrid", "still delivered", exclude_socket="chosen-by-client")
        assert c.recv()["message"] == "still delivered"


# ---------------------------------------------------------------------- pings


def test_pings_follow_the_interval_with_increasing_timestamps(fast: Server) -> None:
    with connected(fast, protocol=BASE) as c:
        stamps = pings(c, 3)
    assert all(abs(ts - time.time() * 1000) < 60_000 for ts in stamps)  # milliseconds, server-wide setting
    assert stamps[0] < stamps[1] < stamps[2]
    # the server's own clock: consecutive pings are at least one interval apart
    assert all(b - a >= 450 for a, b in zip(stamps, stamps[1:], strict=False))


def test_pi_query_sets_the_interval_per_connection(server: Server) -> None:
    # the server pings every 3 s; this connection asks for 1 s
    client = Client(server.url + "?pi=1&ptp=ms")
    try:
        client.expect_welcome()
        first, second = pings(client, 2, timeout=3)
        assert 900 <= second - first < 2500
    finally:
        client.close()


def test_pi_zero_disables_pings(fast: Server) -> None:
    client = Client(fast.url + "?pi=0", protocol=BASE)
    try:
        client.expect_welcome()
        client.nothing(1.6)  # three pings would have come at the server's interval
        assert client.pings == []
        client.send({"command": "ping"})
        assert client.recv() == {"type": "pong"}
        assert client.pings == []
    finally:
        client.close()


def test_ptp_query_sets_the_timestamp_precision(server: Server) -> None:
    scales = {"ms": 1e3, "ns": 1e9, "s": 1, "us": 1, "": 1}  # anything unknown behaves as s
    clients = {ptp: Client(server.url + f"?pi=1&ptp={ptp}") for ptp in scales}
    try:
        for client in clients.values():
            client.expect_welcome()
        for ptp, client in clients.items():
            (stamp,) = pings(client, 1, timeout=3)
            assert abs(stamp / scales[ptp] - time.time()) < 60, ptp
    finally:
        for client in clients.values():
            client.close()


def test_invalid_pi_is_ignored(fast: Server) -> None:
    client = Client(fast.url + "?pi=abc", protocol=BASE)
    try:
        client.expect_welcome()
        first, second = pings(client, 2, timeout=3)  # the server's 0.5 s interval still applies
        assert first < second
    finally:
        client.close()


# ---------------------------------------------------------------------- pong timeout (ext only)


def test_ext_client_answering_pongs_stays_connected_then_is_dropped(fast: Server) -> None:
    with connected(fast, protocol=EXT) as c:
        for _ in range(4):  # 2 s of pings, each answered at once: twice the 1 s timeout
            msg = c.recv(3, pings=True)
            assert msg["type"] == "ping", msg
            c.send({"command": "pong"})
        code, frames = c.closed(timeout=5)  # now silent
        assert frames == [{"type": "disconnect", "reason": "no_pong", "reconnect": True}]
        assert code == 1000


def test_any_client_frame_counts_as_a_pong(fast: Server) -> None:
    with connected(fast, protocol=EXT) as c:
        for _ in range(4):
            assert c.recv(3, pings=True)["type"] == "ping"
            c.send({"command": "ping"})
            assert c.recv(3) == {"type": "pong"}


def test_base_protocol_is_not_held_to_pongs(fast: Server) -> None:
    with connected(fast, protocol=BASE) as c:
        pings(c, 4)  # 2 s without a single frame from the client
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


# ---------------------------------------------------------------------- subscriptions


def test_subscribe_confirm_and_receive(server: Server) -> None:
    with connected(server) as c:
        ident = pubsub_id("proto-sub")
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
        server.publish("proto-sub", {"n": 1})
        msg = c.recv()
        assert (msg["identifier"], msg["message"]) == (ident, {"n": 1})


def test_identifier_is_echoed_byte_for_byte(server: Server) -> None:
    ident = '{ "stream_name" : "proto-echo", "channel":"$pubsub","extra":"ü"}'
    with connected(server) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}


@pytest.mark.parametrize(
    "ident",
    [
        json.dumps({"channel": "ChatChannel", "id": 1}),  # no RPC backend: nobody serves it
        json.dumps({"channel": "$pubsub"}),  # no stream
        json.dumps({"channel": "$pubsub", "stream_name": ""}),
        json.dumps({"channel": "$pubsub", "signed_stream_name": "bogus--00"}),
        "not json at all",
        "[1,2]",
        pytest.param("[" * 30000 + "]" * 30000, id="nested-too-deep"),
    ],
)
def test_reject(server: Server, ident: str) -> None:
    with connected(server) as c:
        assert c.subscribe(ident) == {"identifier": ident, "type": "reject_subscription"}
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


def test_rejected_identifier_can_be_retried(server: Server) -> None:
    ident = json.dumps({"channel": "ChatChannel"})
    with connected(server) as c:
        assert c.subscribe(ident)["type"] == "reject_subscription"
        assert c.subscribe(ident)["type"] == "reject_subscription"


def test_duplicate_subscribe_is_ignored(server: Server) -> None:
    with connected(server) as c:
        ident = pubsub_id("proto-dup")
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        c.send({"command": "subscribe", "identifier": ident})
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}  # no second confirmation before it
        server.publish("proto-dup", "once")
        assert c.recv()["message"] == "once"
        c.nothing(0.3)


def test_two_identifiers_on_one_stream_get_one_frame_each(server: Server) -> None:
    # SPEC §11 #25
    a = pubsub_id("proto-two")
    b = json.dumps({"stream_name": "proto-two", "channel": "$pubsub"})
    with connected(server) as c:
        c.subscribe(a)
        c.subscribe(b)
        server.publish("proto-two", "x")
        got = {c.recv()["identifier"], c.recv()["identifier"]}
        assert got == {a, b}
        c.nothing(0.3)


def test_unsubscribe_has_no_ack_and_stops_broadcasts(server: Server) -> None:
    # SPEC §11 #22
    ident = pubsub_id("proto-unsub")
    with connected(server) as c1, connected(server) as c2:
        c1.subscribe(ident)
        c2.subscribe(ident)
        c1.send({"command": "unsubscribe", "identifier": ident})
        c1.send({"command": "ping"})
        assert c1.recv() == {"type": "pong"}  # no acknowledgment came first
        server.publish("proto-unsub", "Y")
        assert c2.recv()["message"] == "Y"
        c1.nothing(0.5)
        # and the identifier can be subscribed again
        assert c1.subscribe(ident)["type"] == "confirm_subscription"
        server.publish("proto-unsub", "Z")
        assert c1.recv()["message"] == "Z"


def test_unsubscribe_unknown_identifier_is_ignored(server: Server) -> None:
    with connected(server) as c:
        c.send({"command": "unsubscribe", "identifier": pubsub_id("never-subscribed")})
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


@pytest.mark.parametrize(
    "frame",
    [
        {"command": "message", "identifier": pubsub_id("proto-not-subscribed"), "data": '{"action":"x"}'},
        {"command": "message", "identifier": pubsub_id("proto-msg"), "data": {"action": "x"}},
        {"command": "message", "identifier": pubsub_id("proto-msg"), "data": 1},
        {"command": "message", "identifier": pubsub_id("proto-msg")},
    ],
)
def test_ignored_messages(server: Server, frame: dict) -> None:
    with connected(server) as c:
        c.subscribe(pubsub_id("proto-msg"))
        c.send(frame)
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
        server.publish("proto-msg", "after")
        assert c.recv()["message"] == "after"


def test_ping_command_gets_pong(server: Server) -> None:
    with connected(server) as c:
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


def test_pong_command_gets_no_reply(server: Server) -> None:
    with connected(server) as c:
        c.send({"command": "pong"})
        c.nothing(0.3)


# ---------------------------------------------------------------------- ordering


def test_commands_are_answered_in_order(server: Server) -> None:
    """A burst of mixed commands sent without waiting: every reply comes back in order."""
    frames: list[dict] = []
    expected: list[dict] = []
    for i in range(30):
        ok = pubsub_id(f"order-{i}")
        bad = json.dumps({"channel": "Nope", "i": i})
        frames += [
            {"command": "subscribe", "identifier": ok},
            {"command": "ping"},
            {"command": "subscribe", "identifier": bad},
            {"command": "subscribe", "identifier": ok},  # duplicate: no reply
            {"command": "unsubscribe", "identifier": ok},  # no reply
            {"command": "subscribe", "identifier": ok},  # confirmed again
        ]
        expected += [
            {"identifier": ok, "type": "confirm_subscription"},
            {"type": "pong"},
            {"identifier": bad, "type": "reject_subscription"},
            {"identifier": ok, "type": "confirm_subscription"},
        ]
    with connected(server) as c:
        for frame in frames:
            c.send(frame)
        got = [c.recv() for _ in expected]
        assert got == expected
        c.nothing(0.3)


# ---------------------------------------------------------------------- bad input (SPEC §3.8)

BAD_FRAMES = [
    "not-json",
    "{",
    "null",
    "[]",
    '[{"command":"ping"}]',
    '"ping"',
    "42",
    "true",
    "{}",
    '{"command":1}',
    '{"command":null}',
    '{"command":"foo","identifier":"x"}',
    '{"command":"subscribe","identifier":{"channel":"$pubsub","stream_name":"x"}}',
    '{"command":"subscribe","identifier":42}',
    '{"command":"subscribe","identifier":""}',
    '{"command":"subscribe","identifier":"x","history":"yesterday"}',
    '{"command":"subscribe","identifier":"x","history":{"since":"1"}}',
    '{"command":"history","identifier":"x","history":{"streams":{"a":{"offset":-1}}}}',
    '{"command":"ping","x":NaN}',
    '{"command":"ping","x":' + "[" * 30000 + "]" * 30000 + "}",  # nested too deeply for the decoder
    '{"command":"subscribe","identifier":"\\ud800"}',  # an unpaired surrogate: not encodable as UTF-8
]


@pytest.mark.parametrize("frame", BAD_FRAMES, ids=lambda frame: frame[:60])
def test_bad_frame_is_dropped_and_the_connection_keeps_working(server: Server, frame: str) -> None:
    with connected(server) as c:
        c.send(frame)
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}


def test_bad_frames_in_a_burst_do_not_stop_the_reader(server: Server) -> None:
    ident = pubsub_id("proto-after-bad")
    with connected(server) as c:
        for frame in BAD_FRAMES:
            c.send(frame)
        c.ws.send_binary(b"\xff\xfe\x00garbage")
        c.send({"command": "subscribe", "identifier": ident})
        assert c.recv() == {"identifier": ident, "type": "confirm_subscription"}
        server.publish("proto-after-bad", "fine")
        assert c.recv()["message"] == "fine"


def test_invalid_utf8_text_frame_fails_the_connection(server: Server) -> None:
    # RFC 6455 §8.1: the official clients never send it; the server closes with 1007
    with RawWS(server.port, protocols=[EXT]) as ws:
        assert ws.recv()["type"] == "welcome"
        ws.send_frame(b'{"command":"\xff"}')
        code, _ = ws.closed()
        assert code == 1007
