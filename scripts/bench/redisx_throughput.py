#!/usr/bin/env python3
"""How many publications per second one server process takes in through ``redisx``.

    python scripts/bench/redisx_throughput.py                      # 50,000 entries, 1,000 streams
    python scripts/bench/redisx_throughput.py -n 200000 --streams 5000
    python scripts/bench/redisx_throughput.py --broker=redis --pubsub=redis   # later: Redis broker
    python scripts/bench/redisx_throughput.py --server-arg=--history_limit=10 --server-cpus=1

Starts the server (``python -m anycable_gevent``) as a subprocess on free loopback ports
with ``--broadcast_adapter=redisx`` on a stream of its own, waits until ``/health`` says
it consumes, then appends N entries (``XADD <stream> * payload <publication>``, round-robin
over the streams) inside one MULTI/EXEC, so that the server sees them all at once, and
times from EXEC's answer until the stream is empty and nothing is pending (every entry registered in the
broker, acknowledged and deleted). Reports publications per second, the server's CPU
seconds for the drain (utime + stime from ``/proc/<pid>/stat``) and CPU microseconds per
publication. ``--subscribers`` clients subscribed to the first streams check that what
was registered is delivered (their frames are counted, not timed).

Nothing is asserted: this prints figures. The Redis at ``--redis-url`` (default
``REDIS_URL`` or ``redis://127.0.0.1:6379``) is never flushed; the stream and key prefix
are unique to the run and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cablebench.procfs import cpu_seconds  # noqa: E402
from cablebench.server import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def subscribe_clients(port: int, streams: list[str], counts: list[int], stop: threading.Event) -> None:
    """One raw WebSocket per stream, counting broadcast frames until ``stop``."""
    import websocket  # websocket-client (a test dependency)

    conns = []
    for name in streams:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/cable", subprotocols=["actioncable-v1-ext-json"])
        ws.recv()  # welcome
        ident = json.dumps({"channel": "$pubsub", "stream_name": name}, separators=(",", ":"))
        ws.send(json.dumps({"command": "subscribe", "identifier": ident}))
        ws.recv()  # confirm_subscription
        ws.settimeout(0.2)
        conns.append(ws)

    def reader(i: int, ws: Any) -> None:
        while not stop.is_set():
            try:
                text = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                return
            if text and '"message"' in text and '"type":"ping"' not in text:
                counts[i] += 1
        ws.close()

    for i, ws in enumerate(conns):
        threading.Thread(target=reader, args=(i, ws), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--entries", type=int, default=50_000, help="entries to drain (default 50000)")
    ap.add_argument("--streams", type=int, default=1000, help="distinct streams (default 1000)")
    ap.add_argument("--payload", type=int, default=100, help="bytes of data per publication (default 100)")
    ap.add_argument("--broker", default="memory", help="server --broker (default memory)")
    ap.add_argument("--pubsub", default="none", help="server --pubsub (default none)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable)")
    ap.add_argument("--subscribers", type=int, default=0, help="clients subscribed to the first streams")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--rounds", type=int, default=1, help="fill and drain this many times (default 1)")
    ap.add_argument("--server-cpus", default="", help="pin the server with taskset, e.g. 1")
    ap.add_argument("--keep-log", action="store_true", help="print the server log path and keep it")
    args = ap.parse_args()

    key = f"__bench_redisx-{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    port, bport = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "anycable_gevent",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--http_broadcast_port={bport}",
        "--public_streams",
        "--noauth",
        "--broadcast_adapter=redisx",
        f"--redisx_stream={key}",
        f"--redis_url={args.redis_url}",
        f"--redis_prefix={prefix}",
        f"--broker={args.broker}",
        f"--pubsub={args.pubsub}",
        "--log_level=warn",
        *args.server_arg,
    ]
    if args.server_cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", args.server_cpus, *cmd]
    log = tempfile.NamedTemporaryFile(prefix="redisx-bench-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCABLE_")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    rds = redis.Redis.from_url(args.redis_url, socket_timeout=30)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 20
        while health(port) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read(), file=sys.stderr)
                raise SystemExit("the server did not become healthy")
            time.sleep(0.05)
        names = [f"bench/{i}" for i in range(args.streams)]
        counts = [0] * min(args.subscribers, len(names))
        if counts:
            subscribe_clients(port, names[: len(counts)], counts, stop)
        pad = "x" * max(args.payload - 20, 0)
        bodies = [
            json.dumps({"stream": names[i % len(names)], "data": json.dumps({"seq": i, "pad": pad})})
            for i in range(args.entries)
        ]
        print(
            f"server: {' '.join(a for a in cmd if a != sys.executable)}\n"
            f"entries: {args.entries} over {args.streams} streams, {len(bodies[0])} bytes of payload each"
        )
        for r in range(args.rounds):
            pipe = rds.pipeline(transaction=True)  # MULTI/EXEC: the server sees all at once
            for body in bodies:
                pipe.xadd(key, {"payload": body})
            cpu0, started = cpu_seconds([proc.pid]), time.monotonic()
            pipe.execute()  # the entries appear at once when EXEC runs, just before it answers
            t0 = time.monotonic()
            filled = t0 - started
            while rds.xlen(key) or int(rds.xpending(key, "bx")["pending"]):
                if proc.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.005)
            elapsed = time.monotonic() - t0
            cpu = cpu_seconds([proc.pid]) - cpu0
            rate = args.entries / elapsed
            print(
                f"round {r + 1}: drained in {elapsed:.3f}s (filling took {filled:.3f}s before) -> {rate:,.0f} publications/s; "
                f"server CPU {cpu:.2f}s = {cpu / args.entries * 1e6:.1f} us/publication "
                f"({args.entries / cpu if cpu else float('inf'):,.0f} publications per CPU second)"
            )
        if counts:
            time.sleep(0.5)
            expected = sum((args.entries - i + args.streams - 1) // args.streams for i in range(len(counts)))
            print(f"subscribers: received {sum(counts)} of {expected * args.rounds} frames")
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rds.delete(key)
        keys = list(rds.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            rds.delete(*keys)
        rds.close()
        if args.keep_log:
            print(f"server log: {log.name}")
        else:
            os.unlink(log.name)
    return 0


if __name__ == "__main__":
    if not shutil.which("redis-server") and "REDIS_URL" not in os.environ:
        print("note: no local redis-server found; set REDIS_URL or --redis-url", file=sys.stderr)
    sys.exit(main())
