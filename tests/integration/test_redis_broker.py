"""The Redis broker end to end: the real CLI with ``--broker=redis --pubsub=none``, WebSocket clients.

What a Redis broker is for: offsets, epochs, history and session snapshots live in Redis, so
they survive a restart of the server. And while Redis is unreachable the server says so:
``/_broadcast`` answers 503 (the publisher knows to retry) and ``/health`` 503 naming Redis,
until Redis answers again, without a restart.

Each test uses a key prefix of its own on the shared Redis (deleted afterwards); the test
that stops Redis runs a private ``redis-server``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import redis
from helpers import ROOT, Client, Server, connected, pubsub_id, wait_health
from redis_helpers import REDIS_URL, PrivateRedis

from anycable_gevent.broker.redis import EPOCH_LENGTH


def redis_server(prefix: str, url: str = REDIS_URL) -> Server:
    return Server(
        "--broker=redis",
        "--pubsub=none",
        f"--redis_url={url}",
        f"--redis_prefix={prefix}",
        "--public_streams",
        "--noauth",
        "--sessions_ttl=30",
        "--history_ttl=60",
    )


def history(client: Client, ident: str, streams: dict[str, Any]) -> list[dict[str, Any]]:
    """Send a history command; every frame up to and including confirm/reject."""
    client.send({"command": "history", "identifier": ident, "history": {"streams": streams}})
    frames = []
    while True:
        frame = client.recv()
        frames.append(frame)
        if frame.get("type") in ("confirm_history", "reject_history"):
            return frames


def test_deliveries_carry_offsets_and_the_streams_epoch(prefix: str) -> None:
    with redis_server(prefix) as srv, connected(srv) as c:
        ident = pubsub_id("rb-live")
        c.subscribe(ident)
        srv.publish("rb-live", {"n": 1})
        srv.publish("rb-live", {"n": 2})
        got = [c.recv(), c.recv()]
        assert [(m["message"], m["offset"], m["stream_id"]) for m in got] == [
            ({"n": 1}, 1, "rb-live"),
            ({"n": 2}, 2, "rb-live"),
        ]
        assert got[0]["epoch"] == got[1]["epoch"] and len(got[0]["epoch"]) == EPOCH_LENGTH


def test_history_and_epoch_survive_a_server_restart(prefix: str) -> None:
    stream, ident = "rb-restart", pubsub_id("rb-restart")
    with redis_server(prefix) as srv, connected(srv) as c:
        c.subscribe(ident)
        for n in (1, 2, 3):
            srv.publish(stream, {"n": n})
        first = [c.recv() for _ in range(3)]
    epoch = first[0]["epoch"]
    with redis_server(prefix) as srv, connected(srv) as c:  # a new process: nothing in memory
        c.subscribe(ident)
        srv.publish(stream, {"n": 4})
        live = c.recv()
        assert (live["offset"], live["epoch"]) == (4, epoch)  # the counter and epoch went on
        frames = history(c, ident, {stream: {"epoch": epoch, "offset": 1}})
        assert [(f.get("message"), f.get("offset")) for f in frames[:-1]] == [({"n": 2}, 2), ({"n": 3}, 3)]
        assert frames[-1]["type"] == "confirm_history"  # 4 was delivered live: not sent twice


def test_a_session_restores_after_a_server_restart(prefix: str) -> None:
    stream, ident = "rb-session", pubsub_id("rb-session")
    with redis_server(prefix) as srv:
        with connected(srv) as c:
            c.subscribe(ident)
            srv.publish(stream, {"n": 1})
            last = c.recv()
            assert c.welcome is not None
            sid = c.welcome["sid"]
        time.sleep(0.2)  # the server sees the close and keeps the snapshot
    with redis_server(prefix) as srv:
        srv.publish(stream, {"n": 2})  # missed while away
        with Client(f"{srv.url}?sid={sid}") as c:
            welcome = c.expect_welcome()
            assert (welcome["restored"], welcome["restored_ids"]) == (True, [ident])
            frames = history(c, ident, {stream: {"epoch": last["epoch"], "offset": last["offset"]}})
            assert [(f.get("message"), f.get("offset")) for f in frames] == [({"n": 2}, 2), (None, None)]
            assert frames[-1]["type"] == "confirm_history"
        with Client(f"{srv.url}?sid={sid}") as again:  # an old sid restores once
            assert again.expect_welcome().get("restored") is not True


def test_redis_down_gives_503_and_unhealthy_then_recovers(prefix: str) -> None:
    stream, ident = "rb-down", pubsub_id("rb-down")
    with PrivateRedis() as rds, redis_server(prefix, rds.url) as srv, connected(srv) as c:
        c.subscribe(ident)
        srv.publish(stream, {"n": 1})
        before = c.recv()
        rds.stop()
        status, body = srv.broadcast({"stream": stream, "data": '{"n":2}'})
        assert status == 503, body
        health = wait_health(srv, 503)
        assert f"redis broker ({rds.url})" in health and "connection refused" in health
        assert c.welcome is not None
        with Client(f"{srv.url}?sid={c.welcome['sid']}") as other:  # no snapshot to take: authenticated anew
            welcome = other.expect_welcome()
            assert welcome.get("restored") is not True and welcome["sid"]
        rds.start()  # without persistence: every stream starts a new epoch
        wait_health(srv, 200)
        srv.publish(stream, {"n": 3})
        live = c.recv()  # live delivery goes on, under the stream's new epoch
        assert (live["message"], live["offset"]) == ({"n": 3}, 1)
        assert live["epoch"] != before["epoch"]
        frames = history(c, ident, {stream: {"epoch": before["epoch"], "offset": 1}})
        assert [f["type"] for f in frames] == ["reject_history"]


def test_the_memory_bench_reports_its_figures_and_leaves_no_keys() -> None:
    script = ROOT / "scripts" / "bench" / "redis_memory.py"
    args = ["--streams=4", "--messages=10", "--sessions=20", "--publishes=10", f"--redis-url={REDIS_URL}"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "4 streams x 10 stored messages of 200 B" in out
    for figure in ("B per stored message", "= payload + ", "B per session", "us one at a time", "in batches of 100"):
        assert figure in out, out
    prefix = out.split("prefix ", 1)[1].split()[0]
    assert prefix.startswith("bench:")
    assert list(redis.Redis.from_url(REDIS_URL).scan_iter(match=prefix + "*")) == []


def test_two_nodes_share_offsets_history_sessions_and_presence(prefix: str) -> None:
    """``--broker=redis`` with the pub/sub it selects (``redis``): two server processes are one cluster."""
    stream, ident = "rb-nodes", pubsub_id("rb-nodes")
    args = ["--broker=redis", f"--redis_url={REDIS_URL}", f"--redis_prefix={prefix}", "--public_streams", "--noauth"]
    with Server(*args) as a, Server(*args) as b, connected(a) as ca, connected(b) as cb:
        ca.subscribe(ident)
        cb.subscribe(ident)
        # a node confirms a subscription before its Redis SUBSCRIBE is active: wait for both
        channel = f"{prefix}{{{stream}}}:c"
        client = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 10
        while client.pubsub_numsub(channel)[0][1] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        time.sleep(0.2)  # and for each node's gap repair to read the stream's starting position
        a.publish(stream, {"n": 1})
        b.publish(stream, {"n": 2})
        for c in (ca, cb):  # one counter and one epoch, whichever node took the publication
            got = [c.recv(), c.recv()]
            assert [(m["message"], m["offset"]) for m in got] == [({"n": 1}, 1), ({"n": 2}, 2)]
            assert got[0]["epoch"] == got[1]["epoch"]
        epoch = got[0]["epoch"]
        frames = history(cb, ident, {stream: {"epoch": epoch, "offset": 0}})
        assert [f.get("offset") for f in frames] == [None]  # both were delivered live: confirm only
        assert frames[0]["type"] == "confirm_history"

        ca.send({"command": "join", "identifier": ident, "presence": {"id": "u1", "info": {"name": "Ann"}}})
        joined = cb.recv()  # the event reaches the other node's subscriber through Redis
        assert joined["type"] == "presence" and joined["message"] == {
            "type": "join",
            "id": "u1",
            "info": {"name": "Ann"},
        }
        assert ca.recv()["message"]["type"] == "join"
        cb.send({"command": "presence", "identifier": ident})
        info = cb.recv()
        assert info["message"] == {"type": "info", "total": 1, "records": [{"id": "u1", "info": {"name": "Ann"}}]}

        assert ca.welcome is not None
        sid = ca.welcome["sid"]
        ca.close()
        time.sleep(0.2)
        with Client(f"{b.url}?sid={sid}") as moved:  # restored on the other node
            welcome = moved.expect_welcome()
            assert (welcome["restored"], welcome["restored_ids"]) == (True, [ident])
