"""redisx when the broker refuses (:class:`BrokerError`): entries stay pending and come back in order.

Consecutive entries are handed to the node as one publication (one broker round trip),
so they are accepted or refused together.

The memory broker never refuses, so the consumer runs here in a gevent subprocess of its
own against the real Redis (``REDIS_URL``), handing entries to a node stand-in that
refuses one entry twice (as a broker whose Redis is down would) and records what it
accepted. The stream is unique to the test and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import redis
from helpers import ROOT

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")

SCRIPT = r"""
from gevent import monkey

monkey.patch_all()

import json, sys, time

import gevent, redis

from anycable_gevent.broadcast.redisx import GROUP, RedisStreamBroadcaster
from anycable_gevent.config import load
from anycable_gevent.errors import BrokerError
from anycable_gevent.metrics import Metrics
from anycable_gevent.redis_client import RedisConnector

url, key = sys.argv[1:3]
cfg = load([f"--redis_url={url}", f"--redisx_stream={key}", "--broadcast_adapter=redisx", "--pubsub=none"])


class Node:
    # stands in for the node: refuses what holds entry "2" twice, as a broker that lost its Redis
    def __init__(self):
        self.refusals = 2
        self.accepted = []

    def handle_publication(self, publication):
        datas = [m.data for m in publication]
        if "2" in datas and self.refusals:
            self.refusals -= 1
            raise BrokerError("broker unavailable (test)")
        self.accepted.extend(datas)

    def handle_fanout(self, publication):
        raise AssertionError("redisx is not fan-out")


def wait(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        gevent.sleep(0.01)


rds = redis.Redis.from_url(url)
for n in range(5):
    rds.xadd(key, {"payload": json.dumps({"stream": "s", "data": str(n)})})
node = Node()
connector = RedisConnector(cfg)
connector.start()
bx = RedisStreamBroadcaster(cfg, node, Metrics(), connector)
bx.start()
out = {}
wait(lambda: node.refusals == 1)
out["accepted_while_refused"] = list(node.accepted)
out["pending_while_refused"] = int(rds.xpending(key, GROUP)["pending"])
out["length_while_refused"] = rds.xlen(key)
out["health_while_refused"] = bx.healthy()
wait(lambda: len(node.accepted) >= 5)
wait(lambda: rds.xlen(key) == 0)
gevent.sleep(0.3)  # anything delivered twice would show up now
out["accepted"] = list(node.accepted)
out["pending"] = int(rds.xpending(key, GROUP)["pending"])
out["health"] = bx.healthy()
bx.shutdown()
out["consumers_after_shutdown"] = len(rds.xinfo_consumers(key, GROUP))
connector.shutdown()
print(json.dumps(out))
"""


def test_refused_entries_stay_pending_and_are_retried_in_order() -> None:
    key = f"__bcast_test_refused-{uuid.uuid4().hex[:10]}"
    rds = redis.Redis.from_url(REDIS_URL)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, REDIS_URL, key], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        rds.delete(key)
        rds.close()
    # consecutive entries are registered together (one round trip), so the five of them
    # were refused together: none acknowledged, all pending at this consumer
    assert out["accepted_while_refused"] == []
    assert out["pending_while_refused"] == 5 and out["length_while_refused"] == 5
    assert "publications not accepted, entries wait: broker unavailable (test)" in out["health_while_refused"]
    # then each entry exactly once, in stream order
    assert out["accepted"] == ["0", "1", "2", "3", "4"]
    assert out["pending"] == 0 and out["health"] is None
    assert out["consumers_after_shutdown"] == 0
