"""conf/nginx.conf in front of the real server: the official JS client works through it,
/health is proxied, /_broadcast and /metrics are not reachable from outside.

nginx runs privately (tests/nginx_helpers.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from helpers import Client, Server, pubsub_id, request
from jsclient import JSClient
from nginx_helpers import Nginx, nginx_binary

from anycable_gevent.web import HEALTH_BODY

KEY = "nginx-test-broadcast-key"


@pytest.fixture(scope="module")
def backend() -> Iterator[Server]:
    """A broadcast key puts /_broadcast on the main port (the case nginx must guard), metrics too."""
    with Server(
        "--public_streams", "--noauth", f"--broadcast_key={KEY}", "--http_broadcast_port=0", "--metrics_http=/metrics"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def nginx(backend: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(nginx_binary(), tmp_path_factory.mktemp("nginx"), backend.port)
    checked = proxy.check()
    assert checked.returncode == 0, checked.stderr
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def publish(backend: Server, stream: str, data: object) -> int:
    body = json.dumps({"stream": stream, "data": json.dumps(data)}).encode()
    status, _, _ = request(
        "POST",
        f"{backend.http}/_broadcast",
        body,
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    return status


def test_official_js_client_through_nginx(nginx: Nginx, backend: Server) -> None:
    with JSClient(nginx.ws, stream="through-nginx", count=2, control=False) as js:
        js.wait_for("connected")
        js.wait_for("subscribed")
        assert publish(backend, "through-nginx", {"n": 1}) == 201
        assert publish(backend, "through-nginx", {"n": 2}) == 201
        messages = js.wait_messages(2)
        assert js.wait_exit() == 0
    assert [m["data"] for m in messages] == [{"n": 1}, {"n": 2}]
    metas = [m["meta"] for m in messages]
    assert [meta["stream"] for meta in metas] == ["through-nginx"] * 2
    assert metas[1]["offset"] == metas[0]["offset"] + 1 and metas[0]["epoch"] == metas[1]["epoch"]


def test_subprotocol_headers_and_pings_pass_through(nginx: Nginx, backend: Server) -> None:
    c = Client(nginx.ws)
    try:
        assert c.subprotocol == "actioncable-v1-ext-json"
        assert c.ws.getheaders().get("x-anycable-version")
        assert "sid" in c.expect_welcome()
        ident = pubsub_id("nginx-py")
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        assert c.recv(6, pings=True)["type"] == "ping"  # nothing buffers or drops server frames
        assert publish(backend, "nginx-py", "hello") == 201
        assert c.recv()["message"] == "hello"
    finally:
        c.close()


def test_health_is_proxied(nginx: Nginx) -> None:
    status, _, body = request("GET", f"{nginx.http}/health")
    assert (status, body) == (200, HEALTH_BODY)


@pytest.mark.parametrize("path", ["/_broadcast", "/_broadcast/", "/_broadcast?x=1", "/metrics"])
def test_broadcast_and_metrics_are_not_reachable_through_nginx(nginx: Nginx, backend: Server, path: str) -> None:
    with Client(backend.url) as c:
        c.expect_welcome()
        c.subscribe(pubsub_id("nginx-guard"))
        body = json.dumps({"stream": "nginx-guard", "data": json.dumps("leaked")}).encode()
        for method in ("POST", "GET"):
            status, _, _ = request(
                method, nginx.http + path, body if method == "POST" else None, {"Authorization": f"Bearer {KEY}"}
            )
            assert status == 404, (method, path, status)
        c.nothing(0.3)
    # the endpoints are there on the server itself: it is nginx that keeps them private
    assert request("GET", f"{backend.http}/metrics")[0] == 200
    assert publish(backend, "nginx-guard", "direct") == 201
