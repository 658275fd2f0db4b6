#!/usr/bin/env python3
"""Redis memory of the Redis broker's history and sessions, and the time of a publish.

    python scripts/bench/redis_memory.py                     # 1,000 streams x 100 messages of 200 B, 10,000 sessions
    python scripts/bench/redis_memory.py --streams 100 --messages 1000 --payload 1000
    python scripts/bench/redis_memory.py --redis-url redis://127.0.0.1:6379   # a prefix on an existing Redis

By default a private ``redis-server`` (no persistence) is started on a free port, so that
``INFO memory`` deltas count only what this script stores; with ``--redis-url`` the keys
go under a fresh prefix, are measured the same way (other clients of that Redis then
blur the figures) and are deleted at the end.

Streams are filled through :class:`~anycable_gevent.broker.redis.RedisBroker` in
batches of 100, ``--fill`` times the history limit per stream (so trimming is in
effect, as in steady state), with distinct random payloads of ``--payload`` bytes.
Printed: Redis bytes per stored message, in total and minus the payload (the figure to
compare with anycable-go Pro's documented payload + 325 B), split by ``MEMORY USAGE``
into the history stream and the per-stream meta hash; bytes per session (snapshots of
about 300 B like the node writes); and the time per publish, one at a time and in
batches of 100 (loopback, PUBLISH included, nobody subscribed).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import redis

from anycable_gevent.broker.redis import RedisBroker
from anycable_gevent.config import load
from anycable_gevent.ids import new_sid
from anycable_gevent.protocol import StreamMessage, dumps
from anycable_gevent.redis_client import RedisConnector


class Sink:
    """A multi-node pub/sub stand-in: the broker's scripts PUBLISH (to no subscriber)."""

    is_multi_node = True

    def broadcast(self, msg: StreamMessage) -> None:
        raise AssertionError("a multi-node broker publishes through Redis")


def payload(size: int) -> str:
    """A JSON string of exactly ``size`` bytes, random (nothing for Redis to share)."""
    body = max(size - 2, 0)
    return '"' + secrets.token_urlsafe(body)[:body] + '"'


def snapshot(i: int) -> bytes:
    sub1 = json.dumps({"channel": "ChatChannel", "room": f"room-{i % 500}"})
    sub2 = json.dumps({"channel": "$pubsub", "stream_name": f"user/{i}"})
    return dumps(
        {
            "ids": json.dumps({"user_id": i}),
            "subs": {sub1: [f"chat_room-{i % 500}"], sub2: [f"user/{i}"]},
            "cstate": {"locale": '"en"'},
            "istate": {sub1: {"typing": "false"}},
            "disconnectable": True,
            "exp": 0,
        }
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_private() -> tuple[subprocess.Popen[bytes], str]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not found: install it, or pass --redis-url")
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return proc, url


def used_memory(client: Any) -> int:
    time.sleep(0.2)  # let lazy frees and the allocator settle
    return int(client.info("memory")["used_memory"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100, help="history limit: messages kept per stream")
    ap.add_argument("--payload", type=int, default=200, help="bytes of each message's data")
    ap.add_argument("--fill", type=float, default=1.5, help="messages published per stream, in history limits")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--publishes", type=int, default=2000, help="publishes timed one at a time")
    ap.add_argument("--redis-url", default="", help="use this Redis (under a fresh prefix) instead of a private one")
    args = ap.parse_args()

    proc = None
    url = args.redis_url
    if not url:
        proc, url = start_private()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    cfg = load(
        [
            "--broker=redis",
            "--pubsub=none",
            f"--redis_url={url}",
            f"--redis_prefix={prefix}",
            f"--history_limit={args.messages}",
            "--history_ttl=3600",
            "--sessions_ttl=3600",
        ],
        {},
    )
    connector = RedisConnector(cfg)
    connector.start()
    broker = RedisBroker.from_config(cfg, None, connector)  # type: ignore[arg-type]
    broker.broadcaster = Sink()
    broker.start()
    client = redis.Redis.from_url(url)
    info = client.info("server")
    print(
        f"redis {info['redis_version']} at {connector.describe()} ({'private' if proc else 'shared'}), prefix {prefix}"
    )
    try:
        run(args, broker, client, prefix)
    finally:
        broker.shutdown()
        connector.shutdown()
        if proc is None:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
        else:
            proc.terminate()
            proc.wait()
        client.close()


def run(args: argparse.Namespace, broker: RedisBroker, client: Any, prefix: str) -> None:
    streams = [f"chat/{i}" for i in range(args.streams)]
    per_stream = max(int(args.messages * args.fill), 1)

    # ---------------------------------------------------------------- history
    before = used_memory(client)
    started = time.perf_counter()
    for name in streams:
        left = per_stream
        while left:
            n = min(100, left)
            broker.publish([StreamMessage(stream=name, data=payload(args.payload)) for _ in range(n)])
            left -= n
    fill_time = time.perf_counter() - started
    after = used_memory(client)
    stored = sum(int(client.xlen(broker.keys.stream(s, "h"))) for s in streams)
    per_msg = (after - before) / stored
    sample = streams[:: max(len(streams) // 50, 1)]
    h = sum(int(client.memory_usage(broker.keys.stream(s, "h"), samples=0)) for s in sample) / len(sample)
    m = sum(int(client.memory_usage(broker.keys.stream(s, "m"), samples=0)) for s in sample) / len(sample)
    kept = stored / len(streams)
    print(
        f"history: {len(streams)} streams x {kept:.0f} stored messages of {args.payload} B "
        f"({per_stream} published per stream, {fill_time:.1f} s)"
    )
    print(f"  used_memory +{(after - before) / 2**20:.1f} MiB = {per_msg:.0f} B per stored message")
    print(f"  = payload + {per_msg - args.payload:.0f} B (target: payload + 200; anycable-go Pro documents + 325)")
    print(
        f"  MEMORY USAGE per stream (an estimate, above used_memory for streams): history {h:.0f} B "
        f"({h / kept:.0f} B/message = payload + {h / kept - args.payload:.0f}), meta {m:.0f} B ({m / kept:.1f} B/message)"
    )

    # ---------------------------------------------------------------- sessions
    snaps = [(new_sid(), snapshot(i)) for i in range(args.sessions)]
    size = sum(len(s) for _, s in snaps) / max(len(snaps), 1)
    before = used_memory(client)
    for i in range(0, len(snaps), 1000):
        broker.commit_sessions(snaps[i : i + 1000])
    after = used_memory(client)
    per_session = (after - before) / max(len(snaps), 1)
    print(
        f"sessions: {len(snaps)} snapshots of {size:.0f} B: {per_session:.0f} B per session "
        f"(snapshot + {per_session - size:.0f} B key, expiry and allocator overhead)"
    )

    # ---------------------------------------------------------------- publish time
    data = payload(args.payload)
    started = time.perf_counter()
    for i in range(args.publishes):
        broker.publish([StreamMessage(stream=streams[i % len(streams)], data=data)])
    single = (time.perf_counter() - started) / args.publishes
    batches = max(args.publishes // 100, 1)
    started = time.perf_counter()
    for i in range(batches):
        broker.publish([StreamMessage(stream=streams[(i + j) % len(streams)], data=data) for j in range(100)])
    batched = (time.perf_counter() - started) / (batches * 100)
    print(
        f"publish (loopback, one script + PUBLISH each): {single * 1e6:.0f} us one at a time, "
        f"{batched * 1e6:.0f} us per message in batches of 100 (one MULTI/EXEC each)"
    )


if __name__ == "__main__":
    main()
