"""Ways of reaching Redis: TLS (``rediss://``, a private CA, mutual TLS) and Redis Sentinel.

Each test runs private ``redis-server`` processes: a TLS-only server with a CA of the test's
own (``openssl``), or a master, a replica and a sentinel watching them. The server runs
with the Redis broker and pub/sub on top, so that what is checked is the product working
(offsets, restore, live delivery), not only a PING.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import Client, Server, connected, pubsub_id, wait_for, wait_health
from redis_helpers import PrivateRedis, PrivateSentinel, TLSFiles, make_tls_files, unique_prefix


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(str(tmp_path_factory.mktemp("redis-tls")))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A second CA, which did not sign the Redis server's certificate."""
    return make_tls_files(str(tmp_path_factory.mktemp("other-tls")), name="other")


def redis_node(url: str, *extra: str) -> Server:
    return Server(
        "--broker=redis",
        "--pubsub=redis",
        f"--redis_url={url}",
        f"--redis_prefix={unique_prefix()}",
        "--public_streams",
        "--noauth",
        "--sessions_ttl=30",
        *extra,
    )


@contextmanager
def unhealthy(srv: Server) -> Iterator[Server]:
    """A server expected to start without a working Redis (``/health`` 503)."""
    srv.start_unhealthy()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def stream() -> str:
    return f"rc-{uuid.uuid4().hex[:6]}"


def works_end_to_end(srv: Server, stream: str) -> None:
    """Live delivery with offsets, then a restore of the session kept in Redis."""
    ident = pubsub_id(stream)
    with connected(srv) as c:
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        srv.publish(stream, {"n": 1})
        first = c.recv()
        assert (first["message"], first["offset"]) == ({"n": 1}, 1), first
        assert c.welcome is not None
        sid = c.welcome["sid"]
    time.sleep(0.3)  # the snapshot is committed when the session ends
    srv.publish(stream, {"n": 2})
    with Client(f"{srv.url}?sid={sid}") as again:
        welcome = again.expect_welcome()
        assert welcome.get("restored") is True and welcome.get("restored_ids") == [ident], welcome
        again.send(
            {
                "command": "history",
                "identifier": ident,
                "history": {"streams": {stream: {"epoch": first["epoch"], "offset": 1}}},
            }
        )
        frames = [again.recv(), again.recv()]
        assert [(f.get("message"), f.get("offset")) for f in frames[:1]] == [({"n": 2}, 2)], frames
        assert frames[1]["type"] == "confirm_history", frames


# ---------------------------------------------------------------------- TLS


def test_rediss_with_the_servers_ca_verifies_and_works(tls_files: TLSFiles, stream: str) -> None:
    with PrivateRedis(tls=tls_files) as rds, redis_node(rds.url, f"--redis_tls_ca_cert_path={tls_files.ca}") as srv:
        works_end_to_end(srv, stream)
        assert "TLS to Redis without a certificate check" not in srv.output()


def test_rediss_with_another_ca_is_refused_and_said_so(tls_files: TLSFiles, other_ca: TLSFiles) -> None:
    """A server whose certificate the CA did not sign: unhealthy, publications refused (never a
    201 that is lost), the reason in /health."""
    ca = f"--redis_tls_ca_cert_path={other_ca.ca}"
    with PrivateRedis(tls=tls_files) as rds, unhealthy(redis_node(rds.url, ca)) as srv:
        body = wait_health(srv, 503)
        assert "certificate verify failed" in body, body
        status, reply = srv.broadcast({"stream": "rc-refused", "data": json.dumps({"n": 1})})
        assert status == 503, reply


def test_rediss_without_a_ca_works_unverified_and_the_banner_warns(tls_files: TLSFiles, stream: str) -> None:
    """anycable-go's default: TLS without a certificate check (managed Redis with self-signed
    certificates); --redis_tls_verify turns the check on (and then fails here: the test CA
    is not a system one)."""
    with PrivateRedis(tls=tls_files) as rds:
        with redis_node(rds.url) as srv:
            works_end_to_end(srv, stream)
            assert "TLS to Redis without a certificate check" in srv.output()
        with unhealthy(redis_node(rds.url, "--redis_tls_verify")) as srv:
            assert "certificate verify failed" in wait_health(srv, 503)


def test_mutual_tls_needs_the_client_certificate(tls_files: TLSFiles, stream: str) -> None:
    ca = f"--redis_tls_ca_cert_path={tls_files.ca}"
    with PrivateRedis(tls=tls_files, client_certs=True) as rds:
        with unhealthy(redis_node(rds.url, ca)) as srv:  # no client certificate: Redis ends the handshake
            wait_health(srv, 503)
        certs = [f"--redis_tls_client_cert_path={tls_files.cert}", f"--redis_tls_client_key_path={tls_files.key}"]
        with redis_node(rds.url, ca, *certs) as srv:
            works_end_to_end(srv, stream)


# ---------------------------------------------------------------------- Sentinel


def read_until(c: Client, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Data frames of the subscription until message ``{"n": n}``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not got or got[-1]["message"]["n"] < n:
        frame = c.recv(max(0.1, deadline - time.monotonic()))
        if "message" in frame and "offset" in frame:
            got.append(frame)
    return got


def publish_retrying(srv: Server, stream: str, n: int, timeout: float = 20.0) -> int:
    """Publish ``{"n": n}``; a 503 (Redis failing over) is retried. Returns the 503s seen."""
    refused = 0
    deadline = time.monotonic() + timeout
    while True:
        status, reply = srv.broadcast({"stream": stream, "data": json.dumps({"n": n})})
        if status == 201:
            return refused
        assert status == 503 and time.monotonic() < deadline, (status, reply)
        refused += 1
        time.sleep(0.2)


def test_sentinel_finds_the_master_and_follows_a_failover(stream: str) -> None:
    """The master is asked of the sentinel; after the master dies and the sentinel promotes the
    replica, the node goes on with it: every message once and in order, offsets continuing
    (the replica had the counters); a publication refused (503) during the switch is retried,
    none is lost."""
    ident = pubsub_id(stream)
    with PrivateRedis() as master, PrivateRedis(replica_of=master.port) as replica:
        with replica.client() as r:  # the replica is in sync before anything is written
            wait_for(lambda: r.info("replication").get("master_link_status") == "up", what="the replica to sync")
        with PrivateSentinel(master.port) as sentinel:
            args = [f"--redis_sentinels=127.0.0.1:{sentinel.port}", "--redis_keepalive_interval=1"]
            with redis_node("redis://mymaster", *args) as srv, connected(srv) as c:
                assert f"redis://mymaster via sentinels 127.0.0.1:{sentinel.port}" in srv.output()
                assert c.subscribe(ident)["type"] == "confirm_subscription"
                for n in (1, 2, 3):
                    srv.publish(stream, {"n": n})
                before = read_until(c, 3)
                with master.client() as m:
                    assert m.wait(1, 1000) == 1  # the replica has every write so far
                master.stop()
                wait_for(lambda: sentinel.master() == replica.port, 30, what="the sentinel to fail over")
                refused = sum(publish_retrying(srv, stream, n) for n in (4, 5, 6))
                after = read_until(c, 6)
                frames = before + after
                assert [f["message"]["n"] for f in frames] == [1, 2, 3, 4, 5, 6], frames
                assert [f["offset"] for f in frames] == [1, 2, 3, 4, 5, 6], frames
                assert len({f["epoch"] for f in frames}) == 1, frames
                wait_health(srv, 200)
                print(f"\nsentinel failover: {refused} publications refused (503) during the switch")


def test_sentinel_entries_carry_the_masters_password(stream: str) -> None:
    """anycable-go reads credentials given in --redis_sentinels as the master's."""
    with PrivateRedis() as master:
        with master.client() as m:
            m.config_set("requirepass", "s3cret")
        with PrivateSentinel(master.port) as sentinel:
            with sentinel.client() as s:
                s.sentinel_set("mymaster", "auth-pass", "s3cret")
            entry = f"--redis_sentinels=:s3cret@127.0.0.1:{sentinel.port}"
            with redis_node("redis://mymaster", entry) as srv:
                works_end_to_end(srv, stream)
                assert "s3cret" not in srv.output()
