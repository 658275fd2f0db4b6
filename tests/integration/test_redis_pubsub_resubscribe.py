"""The Redis pub/sub of one worker when the last subscriber of a stream leaves and a new one
arrives before the flusher ran (a reload, a fuzzer): the new one is confirmed at once.

It had waited ``SUBSCRIBE_WAIT`` (5 s) for a confirmation that never came: ``unsubscribe``
dropped the channel's confirmation, and the flusher, seeing the channel wanted and already
asked of Redis, sent nothing. Under the live fuzz with two workers this held connections
(and their greenlets, unable to read the client's close) for seconds.

The pub/sub runs in a subprocess of its own (gevent, monkey-patched, like a worker) against
the shared Redis, on a key prefix of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT
from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

SCRIPT = r"""
from gevent import monkey

monkey.patch_all()

import json, sys
import gevent
from anycable_gevent import config
from anycable_gevent.metrics import Metrics
from anycable_gevent.protocol import StreamMessage
from anycable_gevent.pubsub.redis import RedisPubSub
from anycable_gevent.redis_client import RedisConnector

url, prefix = sys.argv[1], sys.argv[2]
cfg = config.load([f"--redis_url={url}", f"--redis_prefix={prefix}", "--broker=none", "--pubsub=redis"], {})
redis = RedisConnector(cfg)
redis.start()
got = []

class Handler:
    def handle_pubsub(self, msg):
        got.append(msg.data)
    def handle_remote_command(self, cmd):
        pass
    def handle_resubscribed(self, streams):
        pass

ps = RedisPubSub(redis, Metrics())
ps.bind(Handler())
ps.start()
out = {}
ps.subscribe("s")
out["first"] = ps.wait_subscribed(["s"], 5.0)
# the last subscriber leaves and a new one comes, with no yield in between
ps.unsubscribe("s")
ps.subscribe("s")
out["again"] = ps.wait_subscribed(["s"], 3.0)
gevent.sleep(0.2)  # the flusher ran
ps.broadcast(StreamMessage(stream="s", data='"live"'))
for _ in range(50):
    if got:
        break
    gevent.sleep(0.1)
out["delivered"] = got
# and once an UNSUBSCRIBE really went out, a new subscriber waits for a new confirmation
ps.unsubscribe("s")
gevent.sleep(0.2)
out["after_unsubscribe"] = ps.keys.channel("s").encode() in ps.confirmed
ps.subscribe("s")
out["resubscribed"] = ps.wait_subscribed(["s"], 5.0)
ps.shutdown()
print(json.dumps(out))
"""


def test_a_subscriber_right_after_the_last_one_left_is_confirmed_at_once() -> None:
    prefix = unique_prefix()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, REDIS_URL, prefix],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        delete_prefix(REDIS_URL, prefix)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first"] is True
    assert out["again"] is True, "the new subscriber waited for a confirmation that never comes"
    assert out["delivered"] == ['"live"']  # the channel was subscribed all along
    assert out["after_unsubscribe"] is False
    assert out["resubscribed"] is True
