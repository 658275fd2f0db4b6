#!/usr/bin/env python3
"""How many publications per second one server process takes in over HTTP.

    python scripts/bench/publish_rate.py --batch 100 --broker=redis     # batches of 100
    python scripts/bench/publish_rate.py --batch 1 --concurrency 8      # one publication per POST

Starts the server (``python -m anycable_gevent``) on free loopback ports, then POSTs
publications to ``/_broadcast`` for ``--seconds`` from ``--concurrency`` keep-alive
connections (threads), round-robin over ``--streams`` streams, ``--batch`` publications
per request. Reports accepted publications per second (201s only) and the server's CPU
microseconds per publication (utime + stime from ``/proc``). Prints figures, asserts
nothing; the Redis key prefix is unique to the run and deleted at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cablebench.procfs import cpu_seconds  # noqa: E402
from cablebench.server import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--payload", type=int, default=100)
    p.add_argument("--broker", default="memory")
    p.add_argument("--server-arg", action="append", default=[])
    p.add_argument("--server-cpus", default="", help="pin the server with taskset, e.g. 1")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    args = p.parse_args()
    port, bport = free_port(), free_port()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    cmd = [sys.executable, "-m", "anycable_gevent", "--host=127.0.0.1", f"--port={port}"]
    cmd += [f"--http_broadcast_port={bport}", "--noauth", "--public_streams", "--log_level=warn"]
    cmd += [f"--broker={args.broker}", f"--redis_url={args.redis_url}", f"--redis_prefix={prefix}", *args.server_arg]
    if args.server_cpus:
        cmd = ["taskset", "-c", args.server_cpus, *cmd]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        data = json.dumps({"x": "p" * args.payload})
        accepted = [0] * args.concurrency
        other = [0] * args.concurrency
        stop = threading.Event()

        def post(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", bport, timeout=10)
            i = k
            while not stop.is_set():
                batch = [{"stream": f"pub/{(i + j) % args.streams}", "data": data} for j in range(args.batch)]
                i += args.batch
                body = json.dumps(batch if args.batch > 1 else batch[0])
                conn.request("POST", "/_broadcast", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 201:
                    accepted[k] += args.batch
                else:
                    other[k] += 1

        threads = [threading.Thread(target=post, args=(k,), daemon=True) for k in range(args.concurrency)]
        cpu0, t0 = cpu_seconds([server.pid]), time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(15)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds([server.pid]) - cpu0
        total = sum(accepted)
        print(
            f"{args.broker} broker, batches of {args.batch}, {args.concurrency} connections: "
            f"{total / elapsed:,.0f} publications/s accepted, server CPU {1e6 * cpu / max(total, 1):.1f} us "
            f"per publication, {sum(other)} other answers"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
        if args.broker == "redis":
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])


if __name__ == "__main__":
    main()
