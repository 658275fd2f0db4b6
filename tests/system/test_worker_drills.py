"""Drills on ``--workers 2`` with the Redis broker: the official JS client, an RPC backend
(@anycable/serverless-js), a steady stream of numbered messages, and a worker killed,
rolled or removed. Every client must end with every accepted message exactly once, in
order, and restored clients must cost the backend no Connect or Subscribe call.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import time
from collections.abc import Iterator

import pytest
from drills import Drill, Publisher, check_exactly_once
from helpers import Server
from procs import wait_children
from redis_helpers import REDIS_URL, delete_prefix, unique_prefix
from rpc_backend import JSBackend

SECRET = "drill-secret-0123456789abcdef-0123456789"
BROADCAST_KEY = hmac.new(SECRET.encode(), b"broadcast-cable", hashlib.sha256).hexdigest()
RPC_SECRET = hmac.new(SECRET.encode(), b"rpc-cable", hashlib.sha256).hexdigest()
CLIENTS = 24
ROOMS = 4


class Cluster:
    """The server with two workers and the RPC backend, each knowing the other's address."""

    def __init__(self, make_server: type[Server], prefix: str) -> None:
        self.server = make_server(
            "--workers=2",
            "--broker=redis",
            f"--redis_url={REDIS_URL}",
            f"--redis_prefix={prefix}",
            f"--secret={SECRET}",
            "--sessions_ttl=60",
            "--shutdown_timeout=10",
        )
        # the backend broadcasts ("user left") to the server's endpoint
        self.backend = JSBackend(self.server.broadcast_url, BROADCAST_KEY, RPC_SECRET)
        self.backend.start()
        self.server.args.append(f"--rpc_host={self.backend.rpc_host}")

    def start(self) -> list[int]:
        self.server.start()
        kids = wait_children(self.master, 2)
        deadline = time.monotonic() + 15
        while self.server.output().count("worker serving index=") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return kids

    @property
    def master(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def drill(self) -> Drill:
        return Drill(
            [self.server.url],
            CLIENTS,
            "--channel=ChatChannel",
            f"--streams={ROOMS}",
            "--token-param=token",
            "--reconnect-delay=150",
        )

    def publisher(self) -> Publisher:
        return Publisher([self.server.broadcast_url], [f"chat_{r}" for r in range(ROOMS)], rate=40, key=BROADCAST_KEY)

    def rpc_counts(self) -> tuple[int, int]:
        connects = len(self.backend.calls("connect"))
        subscribes = sum(1 for c in self.backend.calls("command") if c["body"].get("command") == "subscribe")
        return connects, subscribes


@pytest.fixture
def cluster(make_server: type[Server]) -> Iterator[Cluster]:
    prefix = unique_prefix()
    c = Cluster(make_server, prefix)
    try:
        yield c
    finally:
        c.server.stop()
        c.backend.stop()
        delete_prefix(REDIS_URL, prefix)


def settle_and_check(drill: Drill, pub: Publisher) -> list[dict]:
    pub.stop()
    time.sleep(3.0)
    clients = drill.report()
    problems = check_exactly_once(clients, pub.accepted, lambda c: f"chat_{c['stream']}", pub.attempts)
    assert problems == [], problems
    assert pub.total > 50
    return clients


def test_a_killed_worker_loses_no_message(cluster: Cluster) -> None:
    kids = cluster.start()
    with cluster.drill() as drill:
        drill.wait("ready")
        pub = cluster.publisher().start()
        time.sleep(1.5)
        os.kill(kids[0], signal.SIGKILL)
        wait_children(cluster.master, 2, exclude={kids[0]})
        time.sleep(2.0)
        clients = settle_and_check(drill, pub)
    assert sum(c["restores"] for c in clients) >= 1


def test_a_rolling_restart_loses_nothing_and_costs_the_backend_nothing(cluster: Cluster) -> None:
    kids = cluster.start()
    with cluster.drill() as drill:
        drill.wait("ready")
        time.sleep(0.5)
        before = cluster.rpc_counts()
        pub = cluster.publisher().start()
        time.sleep(1.0)
        os.kill(cluster.master, signal.SIGHUP)
        new = wait_children(cluster.master, 2, timeout=30, exclude=set(kids))
        deadline = time.monotonic() + 30
        while "rolling restart done" not in cluster.server.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        clients = settle_and_check(drill, pub)
        after = cluster.rpc_counts()
    assert not set(new) & set(kids)
    assert after == before, f"Connect/Subscribe calls before {before}, after {after}"
    # every client moved at least once (some twice: from the first old worker to the second
    # one, which is replaced next) and was restored each time
    assert all(c["restores"] >= 1 for c in clients)
    assert all(c["connects"] == c["restores"] + 1 for c in clients)


def test_ttin_then_ttou_loses_nothing(cluster: Cluster) -> None:
    kids = cluster.start()
    with cluster.drill() as drill:
        drill.wait("ready")
        pub = cluster.publisher().start()
        time.sleep(1.0)
        os.kill(cluster.master, signal.SIGTTIN)
        three = wait_children(cluster.master, 3)
        time.sleep(1.0)
        os.kill(cluster.master, signal.SIGTTOU)  # the oldest drains: its clients restore elsewhere
        two = wait_children(cluster.master, 2)
        time.sleep(1.5)
        clients = settle_and_check(drill, pub)
    assert set(kids) - set(two)  # one of the first workers left
    assert set(three) - set(kids) <= set(two)  # the added one stays
    assert sum(c["restores"] for c in clients) >= 1


def test_term_tells_every_js_client_server_restart_and_exits_0(cluster: Cluster) -> None:
    cluster.start()
    with cluster.drill() as drill:
        drill.wait("ready")
        assert cluster.server.proc is not None
        cluster.server.proc.send_signal(signal.SIGTERM)
        assert cluster.server.proc.wait(20) == 0
        clients = drill.report()
    assert len(clients) == CLIENTS
    assert all(c["disconnects"][:1] == ["server_restart"] for c in clients), [c["disconnects"] for c in clients]
