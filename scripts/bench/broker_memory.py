#!/usr/bin/env python3
"""Memory used by the memory broker's history and session caches.

    python scripts/bench/broker_memory.py                      # 10,000 streams x 100 messages of 200 B, 100,000 sessions
    python scripts/bench/broker_memory.py --streams 1000 --sessions 10000

Prints RSS growth and the Python heap growth (tracemalloc) for each cache, per
message and per session. Messages are distinct strings, as real broadcasts are;
sessions are realistic snapshots (identifiers, two subscriptions, channel state).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import time
import tracemalloc
from collections.abc import Callable

from anycable_gevent.broker.memory import MemoryBroker
from anycable_gevent.protocol import StreamMessage, dumps


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def measure(label: str, fn: Callable[[], None], count: int, unit: str, trace: bool) -> None:
    gc.collect()
    before_rss = rss()
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    heap = ""
    if trace:
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        heap = f", Python heap +{size / 2**20:.1f} MiB ({size / count:.0f} B/{unit})"
    gc.collect()
    grown = rss() - before_rss
    print(f"{label}: RSS +{grown / 2**20:.1f} MiB ({grown / count:.0f} B/{unit}){heap}, {elapsed:.1f} s to fill")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=100, help="messages per stream")
    ap.add_argument("--size", type=int, default=200, help="payload bytes per message")
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--trace", action="store_true", help="also measure the Python heap (tracemalloc inflates RSS)")
    args = ap.parse_args()

    broker = MemoryBroker(history_limit=args.messages, history_ttl=300, sessions_ttl=300)
    pad = args.size - len('{"seq":0000000,"pad":""}')

    def fill_history() -> None:
        n = 0
        for _ in range(args.messages):
            for s in range(args.streams):
                n += 1
                data = f'{{"seq":{n:07d},"pad":"{secrets.token_hex(pad // 2 + 1)[:pad]}"}}'
                broker.register(StreamMessage(stream=f"stream-{s}", data=data))

    def fill_sessions() -> None:
        for i in range(args.sessions):
            broker.commit_session(secrets.token_urlsafe(18), snapshot(i))

    total = args.streams * args.messages
    print(f"history: {args.streams:,} streams x {args.messages} messages of {args.size} B = {total:,} messages")
    measure("history", fill_history, total, "message", args.trace)
    print(f"sessions: {args.sessions:,} snapshots of ~{len(snapshot(1))} B")
    measure("sessions", fill_sessions, args.sessions, "session", args.trace)
    print(f"broker stats: {broker.stats()}")


if __name__ == "__main__":
    main()
