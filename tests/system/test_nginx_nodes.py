"""A rolling deploy of two nodes behind nginx (conf/nginx.conf with both in its upstream).

Two single-process nodes share one Redis (the Redis broker) and run with
``--restorable_shutdown``; the official JS client connects through nginx and an RPC backend
(@anycable/serverless-js) authenticates it and serves ``ChatChannel``. Node A is stopped
(SIGTERM), started again on the same ports, then node B is stopped: every client moves
through nginx to the other node, is restored there, and ends with every accepted message
exactly once and in order, and the backend sees no Connect or Subscribe call for the moves
(README: Scaling, Nodes). With nginx's default passive health checks (``max_fails=1``) the
restarted node would get one new connection per ``fail_timeout``: the sample sets
``max_fails=0``, and this test fails without it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest
from drills import Drill, Publisher, check_exactly_once
from helpers import Server, counter, wait_for
from nginx_helpers import Nginx, nginx_binary, render_site, upstream_of
from redis_helpers import REDIS_URL
from rpc_backend import JSBackend

SECRET = "nodes-secret-0123456789abcdef-0123456789"
BROADCAST_KEY = hmac.new(SECRET.encode(), b"broadcast-cable", hashlib.sha256).hexdigest()
RPC_SECRET = hmac.new(SECRET.encode(), b"rpc-cable", hashlib.sha256).hexdigest()
CLIENTS = 16
ROOMS = 4


def node(prefix: str, rpc_host: str, port: int | None = None, broadcast_port: int | None = None) -> Server:
    srv = Server(
        "--broker=redis",
        f"--redis_url={REDIS_URL}",
        f"--redis_prefix={prefix}",
        f"--secret={SECRET}",
        *([f"--rpc_host={rpc_host}"] if rpc_host else []),
        "--restorable_shutdown",
        "--sessions_ttl=60",
        "--shutdown_timeout=10",
        "--metrics_http=/metrics",
        broadcast_port=broadcast_port,
    )
    if port is not None:
        srv.port = port
    return srv


def test_a_rolling_deploy_of_two_nodes_behind_nginx_loses_nothing_and_costs_no_rpc(
    prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    a = node(prefix, "")
    backend = JSBackend(a.broadcast_url, BROADCAST_KEY, RPC_SECRET)  # "user left" notes go to A
    backend.start()
    a.args.append(f"--rpc_host={backend.rpc_host}")
    b = node(prefix, backend.rpc_host)
    proxy: Nginx | None = None
    try:
        a.start()
        b.start()
        proxy = Nginx(nginx_binary(), tmp_path_factory.mktemp("nginx"), a.port)
        (proxy.prefix / "site.conf").write_text(upstream_of(render_site(a.port, proxy.port), [a.port, b.port]))
        checked = proxy.check()
        assert checked.returncode == 0, checked.stderr
        proxy.start()

        def rpc_counts() -> tuple[int, int]:
            connects = len(backend.calls("connect"))
            subscribes = sum(1 for c in backend.calls("command") if c["body"].get("command") == "subscribe")
            return connects, subscribes

        streams = [f"chat_{r}" for r in range(ROOMS)]
        drill = Drill(
            [proxy.ws],
            CLIENTS,
            "--channel=ChatChannel",
            f"--streams={ROOMS}",
            "--token-param=token",
            "--reconnect-delay=150",
        )
        with drill:
            drill.wait("ready")
            assert counter(a, "clients_num") > 0 and counter(b, "clients_num") > 0  # least_conn spreads them
            before = rpc_counts()
            pub = Publisher([a.broadcast_url, b.broadcast_url], streams, rate=40, key=BROADCAST_KEY).start()
            time.sleep(1.0)

            # deploy step 1: node A stops; its clients move to B through nginx (the app
            # publishes to the nodes that run)
            pub.urls = [b.broadcast_url]
            time.sleep(0.2)
            assert a.stop() == 0
            wait_for(lambda: counter(b, "clients_num") == CLIENTS, timeout=30, what="every client on node B")
            a2 = node(prefix, backend.rpc_host, port=a.port, broadcast_port=a.broadcast_port).start()
            pub.urls = [a2.broadcast_url, b.broadcast_url]
            time.sleep(1.0)

            # deploy step 2: node B stops; every client moves to the new A
            pub.urls = [a2.broadcast_url]
            time.sleep(0.2)
            assert b.stop() == 0
            wait_for(lambda: counter(a2, "clients_num") == CLIENTS, timeout=30, what="every client on node A")
            time.sleep(1.5)
            pub.stop()
            time.sleep(2.0)
            clients = drill.report()
            assert len(clients) == CLIENTS
            after = rpc_counts()
        a2.stop()
        problems = check_exactly_once(clients, pub.accepted, lambda c: f"chat_{c['stream']}", pub.attempts)
        assert problems == [], problems
        assert pub.total > 100
        assert after == before, f"Connect/Subscribe calls before {before}, after {after}"
        # every client moved once or twice (the clients of B moved once, those of A twice),
        # and was restored each time
        assert all(c["restores"] >= 1 and c["connects"] == c["restores"] + 1 for c in clients), [
            (c["connects"], c["restores"]) for c in clients
        ]
    finally:
        if proxy is not None:
            proxy.stop()
        for srv in (a, b):
            srv.stop()
        backend.stop()
