"""HTTP RPC against a scripted Python backend: wire shapes, result application, and everything a
backend can do wrong (HTTP errors, bad bodies, hangs, overload, resets, a wrong secret).

Each test scripts the backend's answers (``backend.script``); the module's server stays up
through all of them, so after every failure the next test also proves it is still serving.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import Client, Server, close_of
from rpc_backend import PyBackend, Reply, Request, wait_until, welcome_script


def metrics(srv: Server) -> dict[str, float]:
    status, text = srv.get("/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line.startswith("anycable_go_"):
            name, _, value = line.rpartition(" ")
            out[name.removeprefix("anycable_go_")] = float(value)
    return out


def welcome(req: Request) -> str:
    return json.dumps({"type": "welcome", "sid": req.headers["x-anycable-meta-sid"]})


def confirm(ident: str) -> str:
    return json.dumps({"identifier": ident, "type": "confirm_subscription"})


def on_connect(reply: Reply | Any) -> Any:
    """A script answering Connect with ``reply`` (a Reply or a callable) and the rest normally."""

    def script(req: Request) -> Reply:
        if req.method == "connect":
            return reply(req) if callable(reply) else reply
        return welcome_script(req)

    return script


ID = '{"channel":"TestChannel"}'


@pytest.fixture(scope="module")
def backend() -> Iterator[PyBackend]:
    with PyBackend() as b:
        yield b


@pytest.fixture(scope="module")
def srv(backend: PyBackend) -> Iterator[Server]:
    with Server(f"--rpc_host={backend.rpc_host}", "--rpc_request_timeout=500", "--metrics_http=/metrics") as s:
        yield s


@pytest.fixture(autouse=True)
def well_behaved(backend: PyBackend) -> Iterator[None]:
    yield
    backend.script = welcome_script


def connect_error(srv: Server, backend: PyBackend, reply: Reply) -> None:
    """Connect answered by ``reply`` ends with close 1011 "Auth Error" and no frame."""
    backend.script = on_connect(reply)
    before = len(backend.of("connect"))
    with Client(srv.url) as c:
        assert close_of(c) == (1011, "Auth Error", [])
    assert len(backend.of("connect")) == before + 1  # not retried


# ---------------------------------------------------------------------- request shapes


def test_request_shapes(srv: Server, backend: PyBackend) -> None:
    backend.script = welcome_script
    with Client(srv.url + "?a=1", headers={"Cookie": "k=v", "X-Not-Listed": "1"}) as c:
        sid = c.expect_welcome()["sid"]
        assert c.subscribe(ID) == json.loads(confirm(ID))
        c.send({"command": "message", "identifier": ID, "data": '{"action":"go"}'})
        c.send({"command": "unsubscribe", "identifier": ID})
        wait_until(lambda: len([r for r in backend.of("command") if r.headers["x-anycable-meta-sid"] == sid]) == 3)
    mine = [r for r in backend.requests if r.headers.get("x-anycable-meta-sid") == sid and r.method != "disconnect"]
    env = {"url": f"http://127.0.0.1:{srv.port}/cable?a=1", "headers": {"cookie": "k=v", "REMOTE_ADDR": "127.0.0.1"}}
    assert [(r.method, r.body) for r in mine] == [
        ("connect", {"env": env}),
        ("command", {"command": "subscribe", "identifier": ID, "connection_identifiers": '{"id":1}', "env": env}),
        (
            "command",
            {
                "command": "message",
                "identifier": ID,
                "connection_identifiers": '{"id":1}',
                "data": '{"action":"go"}',
                "env": env,
            },
        ),
        ("command", {"command": "unsubscribe", "identifier": ID, "connection_identifiers": '{"id":1}', "env": env}),
    ]
    for r in mine:
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-anycable-meta-protov"] == "v1"
        assert "authorization" not in r.headers


def test_state_merge_and_result_order(srv: Server, backend: PyBackend) -> None:
    """SPEC §3.9: stop before start, state merged ("" deletes), transmissions verbatim, then disconnect."""
    answers = {
        "subscribe": {
            "status": 1,
            "transmissions": [confirm(ID)],
            "streams": ["o1", "o2"],
            "env": {"istate": {"a": "1", "b": "2"}},
        },
        "restart": {"status": 1, "stopped_streams": ["o1"], "streams": ["o1"], "env": {"istate": {"a": ""}}},
        "switch": {"status": 1, "stop_streams": True, "streams": ["o3"], "env": {"cstate": {"k": "v"}}},
        "bye": {"status": 1, "transmissions": ['{"raw" : [1, 2]}', "not json at all"], "disconnect": True},
        "look": {"status": 1, "transmissions": ['{"look":true}']},
    }

    def script(req: Request) -> Reply:
        if req.method == "connect":
            return Reply({"status": 1, "transmissions": [welcome(req)], "env": {"cstate": {"c": "0"}}})
        if req.method == "command":
            key = req.body["command"]
            if key == "message":
                key = json.loads(req.body["data"])["action"]
            return Reply(answers.get(key, {"status": 1}))
        return Reply({"status": 1})

    backend.script = script
    with Client(srv.url) as c, Client(srv.url) as watcher:
        sid = c.expect_welcome()["sid"]
        watcher.expect_welcome()
        assert c.subscribe(ID) == json.loads(confirm(ID))
        assert watcher.subscribe(ID) == json.loads(confirm(ID))

        def act(client: Client, action: str) -> None:
            client.send({"command": "message", "identifier": ID, "data": json.dumps({"action": action})})
            client.send({"command": "message", "identifier": ID, "data": '{"action":"look"}'})
            assert client.recv() == {"look": True}  # commands are sequential: the first one was applied

        act(c, "restart")
        srv.publish("o1", "one")
        assert c.recv()["message"] == "one"  # stopped then started again in one result: still subscribed
        assert watcher.recv()["message"] == "one"
        act(c, "switch")
        for stream in ("o1", "o2", "o3"):
            srv.publish(stream, stream)
        assert c.recv()["message"] == "o3"
        assert sorted(watcher.recv()["message"] for _ in range(2)) == ["o1", "o2"]
        c.nothing(0.3)
        last = [r for r in backend.of("command") if r.headers["x-anycable-meta-sid"] == sid][-1].body
        assert last["env"]["istate"] == {"b": "2"}
        assert last["env"]["cstate"] == {"c": "0", "k": "v"}
        # transmissions first (verbatim, even when not JSON), then the close
        c.send({"command": "message", "identifier": ID, "data": '{"action":"bye"}'})
        assert [c.ws.recv(), c.ws.recv()] == ['{"raw" : [1, 2]}', "not json at all"]
        assert close_of(c) == (1000, "Command Failed", [])


def test_transmissions_are_sent_verbatim(srv: Server, backend: PyBackend) -> None:
    raw = ['{"identifier" : "x",  "message" : 1}', "[1,2,3]", "plain text"]
    backend.script = on_connect(lambda req: Reply({"status": 1, "transmissions": [welcome(req), *raw]}))
    with Client(srv.url) as c:
        c.expect_welcome()
        got = [c.ws.recv() for _ in raw]
        assert got == raw


def test_nulls_and_unknown_fields_are_tolerated(srv: Server, backend: PyBackend) -> None:
    def script(req: Request) -> Reply:
        if req.method == "connect":
            return Reply(
                {
                    "status": 1,
                    "identifiers": None,
                    "transmissions": [welcome(req)],
                    "error_msg": None,
                    "env": None,
                    "future_field": {"x": 1},
                }
            )
        return Reply(
            {
                "status": 1,
                "disconnect": None,
                "stop_streams": None,
                "streams": None,
                "stopped_streams": None,
                "transmissions": [confirm(ID)],
                "env": {"cstate": None, "istate": None},
                "presence": None,
                "error_msg": None,
            }
        )

    backend.script = script
    with Client(srv.url) as c:
        c.expect_welcome()
        assert c.subscribe(ID) == json.loads(confirm(ID))


# ---------------------------------------------------------------------- bad answers to Connect


@pytest.mark.parametrize(
    "reply",
    [
        Reply({"error": "boom"}, status=500),
        Reply({"error": "bad"}, status=422),
        Reply(b"<html>not json</html>"),
        Reply(b'["status", 1]'),
        Reply({"transmissions": ['{"type":"welcome"}']}),  # no status = ERROR
        Reply({"status": "SUCCESS", "transmissions": ['{"type":"welcome"}']}),
        Reply({"status": 1, "transmissions": '{"type":"welcome"}'}),
        Reply({"status": 0, "transmissions": ['{"type":"welcome"}'], "error_msg": "crashed"}),
        Reply({"status": 7, "transmissions": ['{"type":"welcome"}']}),
    ],
    ids=["http-500", "http-422", "not-json", "array", "no-status", "string-status", "bad-type", "error", "bad-status"],
)
def test_connect_bad_answer_closes_with_auth_error(srv: Server, backend: PyBackend, reply: Reply) -> None:
    connect_error(srv, backend, reply)


def test_huge_response_is_refused(srv: Server, backend: PyBackend) -> None:
    huge = {"status": 1, "transmissions": ['{"type":"welcome"}', "x" * (5 << 20)]}
    before = metrics(srv)["rpc_error_total"]
    connect_error(srv, backend, Reply(json.dumps(huge).encode()))
    assert metrics(srv)["rpc_error_total"] == before + 1


def test_timeout(srv: Server, backend: PyBackend) -> None:
    before = metrics(srv)
    gate = threading.Event()
    try:
        connect_error(srv, backend, Reply({"status": 1, "transmissions": ['{"type":"welcome"}']}, gate=gate))
    finally:
        gate.set()
    after = metrics(srv)
    assert after["rpc_timeout_total"] == before["rpc_timeout_total"] + 1
    assert after["rpc_retries_total"] == before["rpc_retries_total"]


@pytest.mark.parametrize("status", [503, 429])
def test_overloaded_then_success_is_retried(srv: Server, backend: PyBackend, status: int) -> None:
    seen: list[int] = []

    def reply(req: Request) -> Reply:
        seen.append(1)
        if len(seen) == 1:
            return Reply({"error": "busy"}, status=status)
        return Reply({"status": 1, "transmissions": [welcome(req)]})

    backend.script = on_connect(reply)
    before = metrics(srv)
    with Client(srv.url) as c:
        c.expect_welcome()
        after = metrics(srv)
    assert len(seen) == 2
    assert after["rpc_retries_total"] == before["rpc_retries_total"] + 1
    assert after["rpc_call_total"] == before["rpc_call_total"] + 1
    assert after["rpc_error_total"] == before["rpc_error_total"]


def test_retries_stop_at_the_budget(srv: Server, backend: PyBackend) -> None:
    backend.script = on_connect(Reply({"error": "busy"}, status=503))
    before = len(backend.of("connect"))
    with Client(srv.url, timeout=10) as c:
        assert close_of(c) == (1011, "Auth Error", [])
    assert len(backend.of("connect")) - before > 2


# ---------------------------------------------------------------------- bad answers to commands


def test_command_errors_send_nothing_and_keep_the_connection(srv: Server, backend: PyBackend) -> None:
    answers = iter([Reply(b"oops", status=500), Reply(b"{"), Reply({"status": 0}), Reply({"status": "1"})])

    def script(req: Request) -> Reply:
        if req.method == "command":
            return next(answers, None) or welcome_script(req)
        return welcome_script(req)

    backend.script = script
    with Client(srv.url) as c:
        c.expect_welcome()
        for _ in range(4):
            c.send({"command": "subscribe", "identifier": ID})
        assert c.subscribe(ID) == json.loads(confirm(ID))  # the fifth one is answered


# ---------------------------------------------------------------------- secrets and logs


def derived(secret: str) -> str:
    return hmac.new(secret.encode(), b"rpc-cable", hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--http_rpc_secret=plain-rpc-secret"], "Bearer plain-rpc-secret"),
        (["--secret=app-secret-for-everything"], f"Bearer {derived('app-secret-for-everything')}"),
        (["--secret=app-secret-for-everything", "--http_rpc_secret=none"], None),
    ],
    ids=["explicit", "derived", "none"],
)
def test_bearer_secret(make_server: type[Server], flags: list[str], expected: str | None) -> None:
    with PyBackend() as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}", *flags).start()
        with Client(srv.url) as c:
            c.expect_welcome()
        [req] = backend.of("connect")
        assert req.headers.get("authorization") == expected


def test_wrong_secret_and_errors_are_logged_without_secrets_or_sids(make_server: type[Server]) -> None:
    secret = "never-log-this-secret"

    def script(req: Request) -> Reply:
        if req.method == "command":
            return Reply({"error": "no"}, status=401)
        return welcome_script(req)

    with PyBackend(script) as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}", f"--http_rpc_secret={secret}").start()
        with Client(srv.url) as c:
            sid = c.expect_welcome()["sid"]
            c.send({"command": "subscribe", "identifier": ID})
            c.send({"command": "ping"})
            assert c.recv() == {"type": "pong"}  # the subscribe failed silently first
        log = wait_until(lambda: "HTTP 401" in srv.output() and srv.output())
        assert "--http_rpc_secret" in log  # the hint
        assert sid not in log
        assert secret not in log


# ---------------------------------------------------------------------- limits


def test_concurrency_limit(make_server: type[Server]) -> None:
    gate = threading.Event()
    first = threading.Event()

    def script(req: Request) -> Reply:
        if req.method == "connect" and not first.is_set():
            first.set()
            return Reply({"status": 1, "transmissions": [welcome(req)]}, gate=gate)
        return welcome_script(req)

    with PyBackend(script) as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}", "--rpc_concurrency=1", "--metrics_http=/metrics").start()
        try:
            a = Client(srv.url)
            first.wait(5)
            b = Client(srv.url)
            wait_until(lambda: metrics(srv)["rpc_pending_num"] == 1)
            assert backend.max_in_flight == 1
        finally:
            gate.set()
        a.expect_welcome()
        b.expect_welcome()
        assert backend.max_in_flight == 1
        a.close()
        b.close()


def test_zero_concurrency_means_default(make_server: type[Server]) -> None:
    with PyBackend() as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}", "--rpc_concurrency=0").start()
        with Client(srv.url) as c:
            c.expect_welcome()
        assert "--rpc_concurrency=0" in srv.output()


@pytest.mark.slow
def test_circuit_breaker_opens_and_recovers(make_server: type[Server]) -> None:
    healthy = threading.Event()

    def script(req: Request) -> Reply:
        return welcome_script(req) if healthy.is_set() else Reply(reset=True)

    with PyBackend(script) as backend:
        srv = make_server(f"--rpc_host={backend.rpc_host}").start()
        clients = [Client(srv.url) for _ in range(10)]
        for c in clients:
            assert close_of(c) == (1011, "Auth Error", [])
        opened = len(backend.requests)
        assert opened >= 10
        # open: refused without asking the backend
        for _ in range(3):
            with Client(srv.url) as c:
                assert close_of(c) == (1011, "Auth Error", [])
        assert len(backend.requests) == opened
        assert "RPC circuit breaker closed -> open" in srv.output()
        # the backend comes back: after the open period, trial calls close the breaker again
        healthy.set()

        def welcomed() -> bool:
            with Client(srv.url) as c:
                return c.recv(5).get("type") == "welcome"

        wait_until(lambda: _safe(welcomed), timeout=15, interval=0.5)


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except (ConnectionError, TimeoutError, OSError):
        return False
