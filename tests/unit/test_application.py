"""The application kit without sockets: falcon's TestClient in front of ``Application.wsgi()``."""

from __future__ import annotations

import json
import logging
from typing import Any

import jwt
import pytest
from falcon import testing

from anycable_gevent import signer
from anycable_gevent.application import (
    Application,
    Channel,
    ChannelHandle,
    ConnectionHandle,
    Request,
    State,
    Status,
    create_wsgi_app,
    issue_token,
    sign_stream,
    verify_stream,
)
from anycable_gevent.config import derive_key

SECRET = "unit-secret-0123456789abcdef-0123456789"
RPC = derive_key(SECRET, "rpc-cable")
AUTH = {"Authorization": f"Bearer {RPC}", "x-anycable-meta-sid": "sid-1"}


def ident(channel: str = "Room", **params: Any) -> str:
    return json.dumps({"channel": channel, **params}, separators=(",", ":"))


class Room(Channel):
    def subscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        if params.get("id") == "closed":
            handle.transmit({"never": "sent"})
            handle.reject()
            return
        handle.stream_from(f"room_{params['id']}", whisper=bool(params.get("whisper")))
        handle.transmit({"hello": handle.identifiers.get("user")})
        handle.state["seen"] = 0

    def unsubscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        if params.get("id") == "bad":
            raise RuntimeError("unsubscribed failed")
        self.log.append((handle.identifier, dict(handle.state), handle.whisper_stream))

    log: list[Any] = []

    def see(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.state["seen"] += data.get("n", 1)
        handle.state.setdefault("items", []).append(data.get("n", 1))
        handle.connection.state["last"] = params["id"]

    def switch(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.stop_stream_from(data["old"])
        handle.stream_from(data["new"])
        handle.stream_from("temp")
        handle.stop_stream_from("temp")

    def reset(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.stop_all_streams()
        handle.stream_from("fresh")
        del handle.state["seen"]

    def join(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.join_presence(42, {"name": "Ann"})

    def leave(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.leave_presence(42)

    def boom(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        raise RuntimeError("password=hunter2")

    def unjsonable(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.state["when"] = {1, 2}

    def kick(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.connection.close()
        handle.reject()

    def _private(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        raise AssertionError("never callable")


class Cable(Application):
    def connect(self, handle: ConnectionHandle) -> None:
        user = handle.request.cookies.get("user") or handle.request.params.get("user")
        if user == "expired":
            handle.reject("token_expired")
        elif user:
            handle.identified_by(user=user, ip=handle.request.remote_addr)
            handle.state["lang"] = "fr"
            handle.transmit({"type": "hello"})
        elif handle.request.params.get("crash"):
            raise ValueError("connect crashed")
        else:
            handle.reject()

    disconnected: list[Any] = []

    def disconnect(self, handle: ConnectionHandle) -> None:
        self.disconnected.append((handle.identifiers, dict(handle.state)))


@pytest.fixture
def app() -> Cable:
    cable = Cable(SECRET)
    cable.register("Room", Room)
    Room.log = []
    Cable.disconnected = []
    return cable


@pytest.fixture
def client(app: Cable) -> testing.TestClient:
    return testing.TestClient(app.wsgi(prefix="/_anycable"))


def post(client: testing.TestClient, method: str, body: Any, headers: dict[str, str] = AUTH) -> Any:
    return client.simulate_post(f"/_anycable/{method}", json=body, headers=headers)


def command(client: testing.TestClient, cmd: str, identifier: str, **extra: Any) -> dict[str, Any]:
    body = {"command": cmd, "identifier": identifier, "connection_identifiers": '{"user":"ann"}', **extra}
    resp = post(client, "command", body)
    assert resp.status_code == 200, resp.text
    return resp.json  # type: ignore[no-any-return]


def perform(
    client: testing.TestClient, identifier: str, action: str, istate: dict[str, str] | None = None, **data: Any
) -> dict[str, Any]:
    env = {"url": "http://x/cable", "istate": istate or {}}
    return command(client, "message", identifier, data=json.dumps({"action": action, **data}), env=env)


# ---------------------------------------------------------------------- request view


def test_request_view_parses_cookies_params_and_address() -> None:
    req = Request.from_env(
        "http://h/cable?a=1&b=2&a=3&empty=",
        {"cookie": 'x=1; quoted="v w"; x=2; bad; =nameless', "X-Api": "t", "REMOTE_ADDR": "10.0.0.9"},
    )
    assert req.cookies == {"x": "1", "quoted": "v w"}
    assert req.params == {"a": "3", "b": "2", "empty": ""}
    assert req.remote_addr == "10.0.0.9"
    assert req.headers == {"cookie": 'x=1; quoted="v w"; x=2; bad; =nameless', "x-api": "t"}
    assert req.path == "/cable"


# ---------------------------------------------------------------------- state


def test_state_reports_only_changes_and_deletions() -> None:
    state = State({"a": "1", "b": '{"x": [1]}', "c": '"keep"', "d": "plain text", "e": ""})
    assert dict(state) == {"a": 1, "b": {"x": [1]}, "c": "keep", "d": "plain text"}
    assert state.changes() == {}  # re-encoding alone is no change ('{"x": [1]}' vs '{"x":[1]}')
    state["b"]["x"].append(2)  # mutated in place
    del state["a"]
    state["f"] = None
    state["c"] = "keep"
    assert state.changes() == {"b": '{"x":[1,2]}', "a": "", "f": "null"}


def test_state_type_change_is_a_change_and_non_json_values_are_refused() -> None:
    state = State({"n": "1", "nan": "NaN"})
    assert state["nan"] == "NaN"  # not JSON: kept as the raw string
    state["n"] = True  # True == 1 in Python, not on the wire
    assert state.changes() == {"n": "true"}
    state["bad"] = float("nan")
    with pytest.raises(TypeError, match="'bad'"):
        state.changes()


def test_channel_state_hides_and_protects_server_keys() -> None:
    state = State({"$w": "room", "$p": "room", "k": '"v"'}, reserved="$")
    assert dict(state) == {"k": "v"}
    with pytest.raises(KeyError, match="reserved"):
        state["$w"] = "other"


# ---------------------------------------------------------------------- secret and errors


def test_secret_is_derived_like_the_server_or_given_directly() -> None:
    assert Application(SECRET).rpc_secret == RPC
    assert Application(SECRET, rpc_secret="explicit").rpc_secret == "explicit"
    assert Application(SECRET, rpc_secret="none").rpc_secret == ""
    assert Application().rpc_secret == ""
    assert Application(SECRET).streams_secret == SECRET == Application(SECRET).jwt_secret
    assert Application(SECRET, streams_secret="none").streams_secret == ""


@pytest.mark.parametrize(
    "authorization", [None, "", f"Bearer {RPC}x", f"bearer {RPC}", RPC, f"Bearer {SECRET}", "Bearer é"]
)
def test_wrong_or_missing_secret_is_401(client: testing.TestClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = post(client, "connect", {"env": {"url": "http://x/cable?user=ann"}}, headers)
    assert resp.status_code == 401
    assert resp.json["error"] == "unauthorized" and "Bearer" in resp.json["details"]


def test_without_a_secret_nothing_is_checked(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        api = testing.TestClient(create_wsgi_app(Cable(), prefix="rpc/"))
    assert "not authenticated" in caplog.text
    resp = api.simulate_post("/rpc/connect", json={"env": {"url": "http://x/?user=a"}})
    assert resp.status_code == 200 and resp.json["status"] == Status.SUCCESS


@pytest.mark.parametrize(
    ("method", "body", "status", "error", "details"),
    [
        ("connect", b"{", 400, "invalid JSON", "Expecting"),
        ("connect", b"[]", 422, "invalid request", "the body must be a JSON object, not an array"),
        ("connect", b'{"env": "x"}', 422, "invalid request", "env must be an object"),
        ("connect", b'{"env": {"headers": {"a": 1}}}', 422, "invalid request", "env.headers['a'] must be a string"),
        ("command", b'{"command": "run", "identifier": "x"}', 422, "invalid request", "command must be one of"),
        ("command", b'{"command": "subscribe"}', 422, "invalid request", "identifier is missing"),
        ("command", b'{"command": "message", "identifier": "x"}', 422, "invalid request", "needs data"),
        (
            "command",
            b'{"command": "subscribe", "identifier": 5}',
            422,
            "invalid request",
            "identifier must be a string",
        ),
        ("disconnect", b'{"subscriptions": [1]}', 422, "invalid request", "subscriptions must be a list of strings"),
    ],
)
def test_malformed_requests_get_json_errors(
    client: testing.TestClient, method: str, body: bytes, status: int, error: str, details: str
) -> None:
    resp = client.simulate_post(f"/_anycable/{method}", body=body, headers=AUTH)
    assert resp.status_code == status
    assert resp.json["error"] == error and details in resp.json["details"]


def test_body_limit_wrong_method_and_unknown_path(app: Cable) -> None:
    api = testing.TestClient(create_wsgi_app(app, prefix="/_anycable", max_body=50))
    big = api.simulate_post("/_anycable/connect", body=b"{" + b" " * 60 + b"}", headers=AUTH)
    assert big.status_code == 413 and big.json == {"error": "body too large", "details": "limit is 50 bytes"}
    assert api.simulate_get("/_anycable/connect", headers=AUTH).status_code == 405
    assert api.simulate_post("/_anycable/other", headers=AUTH).status_code == 404
    assert api.simulate_post("/connect", headers=AUTH).status_code == 404  # only under the prefix


def test_nulls_and_unknown_fields_are_tolerated(client: testing.TestClient) -> None:
    body = {"env": {"url": "http://x/?user=ann", "headers": None, "cstate": {"k": None}}, "extra": 1}
    assert post(client, "connect", body).json["status"] == Status.SUCCESS
    sub = command(client, "subscribe", ident(id="1"), env=None, data=None)
    assert sub["status"] == Status.SUCCESS


# ---------------------------------------------------------------------- connect


def test_connect_identifies_with_welcome_sid_state_and_transmissions(client: testing.TestClient) -> None:
    env = {"url": "http://x/cable", "headers": {"cookie": "user=ann", "REMOTE_ADDR": "1.2.3.4"}}
    reply = post(client, "connect", {"env": env}).json
    assert reply == {
        "status": 1,
        "identifiers": '{"user":"ann","ip":"1.2.3.4"}',
        "transmissions": ['{"type":"hello"}', '{"type":"welcome","sid":"sid-1"}'],
        "error_msg": "",
        "env": {"cstate": {"lang": '"fr"'}},
    }


@pytest.mark.parametrize(("query", "reason"), [("", "unauthorized"), ("?user=expired", "token_expired")])
def test_connect_rejected_with_reason(client: testing.TestClient, query: str, reason: str) -> None:
    reply = post(client, "connect", {"env": {"url": f"http://x/cable{query}"}}).json
    frame = {"type": "disconnect", "reason": reason, "reconnect": False}
    assert reply["status"] == Status.FAILURE and [json.loads(t) for t in reply["transmissions"]] == [frame]
    assert reply["identifiers"] == ""


def test_connect_exception_is_error_logged_and_not_leaked(
    client: testing.TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        reply = post(client, "connect", {"env": {"url": "http://x/cable?crash=1"}}).json
    assert reply == {"status": 0, "identifiers": "", "transmissions": [], "error_msg": "internal error"}
    assert "connect failed" in caplog.text and "ValueError: connect crashed" in caplog.text
    assert "Traceback" in caplog.text and "sid-1" not in caplog.text  # conn=<digest>, never the sid


# ---------------------------------------------------------------------- commands


def test_subscribe_confirms_first_then_channel_transmissions(client: testing.TestClient) -> None:
    reply = command(client, "subscribe", ident(id="1", whisper=True), env={"url": "http://x/"})
    assert reply["status"] == Status.SUCCESS
    assert reply["transmissions"] == [
        json.dumps({"identifier": ident(id="1", whisper=True), "type": "confirm_subscription"}, separators=(",", ":")),
        json.dumps({"identifier": ident(id="1", whisper=True), "message": {"hello": "ann"}}, separators=(",", ":")),
    ]
    assert reply["streams"] == ["room_1"]
    assert reply["env"]["istate"] == {"seen": "0", "$w": "room_1"}
    assert "presence" not in reply


def test_rejected_subscription_gets_only_the_rejection(client: testing.TestClient) -> None:
    reply = command(client, "subscribe", ident(id="closed"))
    reject = json.dumps({"identifier": ident(id="closed"), "type": "reject_subscription"}, separators=(",", ":"))
    assert (reply["status"], reply["transmissions"], reply["streams"]) == (Status.FAILURE, [reject], [])


@pytest.mark.parametrize("identifier", [ident("Nope"), "not json", '{"room": 1}', '["Room"]'])
def test_unknown_channel_or_bad_identifier_is_rejected(client: testing.TestClient, identifier: str) -> None:
    reply = command(client, "subscribe", identifier)
    assert reply["status"] == Status.FAILURE
    assert [json.loads(t)["type"] for t in reply["transmissions"]] == ["reject_subscription"]
    assert command(client, "message", identifier, data='{"action":"see"}')["status"] == Status.FAILURE


@pytest.mark.parametrize(
    "data",
    [
        '{"action":"_private"}',
        '{"action":"subscribed"}',
        '{"action":"find_action"}',
        '{"action":"nope"}',
        '{"action":"log"}',
        '{"no":"action"}',
        "not json",
        '"see"',
        '{"action":"see x"}',
    ],
)
def test_only_public_methods_of_the_subclass_are_actions(client: testing.TestClient, data: str) -> None:
    reply = command(client, "message", ident(id="1"), data=data)
    assert reply["status"] == Status.FAILURE and reply["transmissions"] == []


def test_state_survives_between_commands_as_changes(client: testing.TestClient) -> None:
    first = perform(client, ident(id="1"), "see", {"seen": "0"}, n=2)
    assert first["status"] == Status.SUCCESS
    assert first["env"] == {"cstate": {"last": '"1"'}, "istate": {"seen": "2", "items": "[2]"}}
    second = perform(client, ident(id="1"), "see", {"seen": "2", "items": "[2]", "$w": "room_1"}, n=3)
    assert second["env"]["istate"] == {"seen": "5", "items": "[2,3]"}  # $w untouched


def test_stream_stop_and_start_net_out_in_order(client: testing.TestClient) -> None:
    reply = perform(client, ident(id="1"), "switch", {"$w": "a"}, old="a", new="b")
    assert (reply["streams"], reply["stopped_streams"], reply["stop_streams"]) == (["b"], ["a", "temp"], False)
    assert reply["env"]["istate"] == {"$w": ""}  # whispering stopped with its stream
    reset = perform(client, ident(id="1"), "reset", {"$w": "b", "seen": "3"})
    assert (reset["streams"], reset["stopped_streams"], reset["stop_streams"]) == (["fresh"], [], True)
    assert reset["env"]["istate"] == {"seen": "", "$w": ""}


def test_presence_join_and_leave(client: testing.TestClient) -> None:
    joined = perform(client, ident(id="1"), "join", {"$p": "room_1"})
    assert joined["presence"] == {"type": "join", "id": "42", "info": '{"name":"Ann"}'}
    assert joined["env"]["istate"] == {"$p": "room_1"}
    left = perform(client, ident(id="1"), "leave", {"$p": "room_1"})
    assert left["presence"] == {"type": "leave", "id": "42"} and left["env"]["istate"] == {}
    nowhere = perform(client, ident(id="1"), "join", {})  # no stream to be present on: a bug, ERROR
    assert nowhere["status"] == Status.ERROR


def test_close_and_reject_in_an_action(client: testing.TestClient) -> None:
    reply = perform(client, ident(id="1"), "kick")
    assert (reply["status"], reply["disconnect"]) == (Status.FAILURE, True)


@pytest.mark.parametrize(("action", "exc"), [("boom", "RuntimeError: password=hunter2"), ("unjsonable", "TypeError")])
def test_channel_exception_is_error_logged_and_not_leaked(
    client: testing.TestClient, caplog: pytest.LogCaptureFixture, action: str, exc: str
) -> None:
    with caplog.at_level(logging.ERROR):
        reply = perform(client, ident(id="1"), action)
    assert reply == {"status": 0, "transmissions": [], "error_msg": "internal error"}
    assert f"Room#{action} failed" in caplog.text and exc in caplog.text
    assert caplog.text.count("File ") <= 5  # a short traceback


# ---------------------------------------------------------------------- disconnect


def test_disconnect_runs_every_unsubscribed_then_disconnect(app: Cable, client: testing.TestClient) -> None:
    subs = [ident(id="1"), ident(id="bad"), ident(id="2"), ident("Gone")]
    istate = {subs[0]: json.dumps({"seen": "4", "$w": "room_1"}), subs[2]: "not json"}
    body = {
        "identifiers": '{"user":"ann"}',
        "subscriptions": subs,
        "env": {"url": "http://x/", "cstate": {"lang": '"fr"'}, "istate": istate},
    }
    reply = post(client, "disconnect", body).json
    assert reply == {"status": 0, "error_msg": "internal error"}  # Room{id: bad} raised
    assert Room.log == [(subs[0], {"seen": 4}, "room_1"), (subs[2], {}, "")]
    assert Cable.disconnected == [({"user": "ann"}, {"lang": "fr"})]
    ok = post(client, "disconnect", {"identifiers": "", "subscriptions": None}).json
    assert ok == {"status": 1, "error_msg": ""}


# ---------------------------------------------------------------------- registry and tokens


def test_register_by_class_instance_or_decorator() -> None:
    app = Application()

    @app.channel("A")
    class A(Channel):
        pass

    app.register("B", A())
    assert isinstance(app.channels["A"], A) and isinstance(app.channels["B"], A)
    with pytest.raises(ValueError, match="already registered"):
        app.register("A", A)
    with pytest.raises(TypeError):
        app.register("C", object)  # type: ignore[arg-type]


def test_tokens_and_signed_streams_match_the_server() -> None:
    token = issue_token({"user": "ann", "id": 1}, SECRET, expires_in=60, clock=lambda: 1_900_000_000)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"ext": '{"user":"ann","id":1}', "exp": 1_900_000_060}
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    signed = sign_stream("chat/42", SECRET)
    assert signer.verify(signed, SECRET) == "chat/42" == verify_stream(signed, SECRET)
    assert verify_stream(signed, "other") is None
    app = Application(SECRET, jwt_secret="none")
    assert signer.verify(app.sign_stream("s"), SECRET) == "s"
    with pytest.raises(ValueError, match="jwt_secret"):
        app.issue_token({"user": "x"})
