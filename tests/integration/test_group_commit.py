"""Group commit and auto-pipelining of the Redis broker under many greenlets, some killed.

The broker's registrations (``RedisBroker._register``) and every pipelined command
(``redis_client.Batcher``) are shared between the greenlets of a worker: while one round
trip is in flight, the others wait and go in the next. These tests run a real broker on
the real Redis in a gevent-patched subprocess (the concurrency only exists there) with
hundreds of publishing greenlets, and kill some of them while they wait or lead. What
must hold: exactly one registration round trip in flight at any moment (offsets stay in
arrival order across groups), every surviving publisher returns, each with its message
registered, offsets contiguous, and a kill never leaves anybody waiting for ever.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

DRIVER = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json
    import sys

    import gevent
    import redis

    from anycable_gevent.broker.redis import RedisBroker
    from anycable_gevent.config import load
    from anycable_gevent.errors import BrokerError
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.protocol import StreamMessage
    from anycable_gevent.redis_client import RedisConnector

    url, prefix, publishers, kills = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = load([f"--broker=redis", "--pubsub=none", f"--redis_url={url}", f"--redis_prefix={prefix}"], {})
    connector = RedisConnector(cfg)
    connector.start()
    broker = RedisBroker.from_config(cfg, Metrics(), connector)

    class Local:
        is_multi_node = False
        def broadcast(self, msg):
            pass

    broker.broadcaster = Local()
    broker.start()

    in_flight = 0
    most = 0
    rounds = 0
    real = broker._register_now

    def counted(msgs, publish):
        global in_flight, most, rounds
        in_flight += 1
        rounds += 1
        most = max(most, in_flight)
        try:
            gevent.sleep(0.002)  # a slower round trip: more waiters pile up behind it
            real(msgs, publish)
        finally:
            in_flight -= 1

    broker._register_now = counted

    done, failed = [], []
    started, ended = set(), set()

    def publish(i):
        started.add(i)
        msg = StreamMessage("group-commit", json.dumps(i))
        try:
            broker.publish([msg])
        except BrokerError as exc:
            failed.append((i, str(exc)))
            return
        finally:
            ended.add(i)
        done.append((i, msg.offset))

    # publishers keep arriving while groups go through (newcomers meet hand-overs), and
    # some of those already waiting or leading are killed on the way
    greenlets = []
    killed = []  # indices killed, and whether they were inside publish() then
    for i in range(publishers):
        greenlets.append(gevent.spawn(publish, i))
        if i % 4 == 3:
            gevent.sleep(0.0005)
        if kills and i % (publishers // kills) == publishers // kills - 1 and len(killed) < kills:
            victim = i - 2
            killed.append((victim, victim in started and victim not in ended))
            greenlets[victim].kill(block=False)
    finished = gevent.joinall(greenlets, timeout=20)
    stuck = publishers - len(finished)
    # after the kills, the broker still registers (nobody holds the lead for ever)
    late = StreamMessage("group-commit", "late")
    late_ok = gevent.spawn(broker.publish, [late]).join(5) is None and late.offset > 0
    top = redis.Redis.from_url(url).hget(f"{prefix}{{group-commit}}:m", "s")
    print(json.dumps({
        "done": done, "failed": failed, "stuck": stuck, "most_in_flight": most, "rounds": rounds,
        "late": late.offset, "late_ok": late_ok, "top": int(top or 0), "killed": killed,
    }))
    """
)


def run_driver(publishers: int, kills: int) -> dict:
    prefix = unique_prefix()
    try:
        out = subprocess.run(
            [sys.executable, "-c", DRIVER, REDIS_URL, prefix, str(publishers), str(kills)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        delete_prefix(REDIS_URL, prefix)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kills", [0, 40], ids=["no-kills", "40-kills"])
def test_one_registration_round_trip_at_a_time_and_nobody_waits_for_ever(kills: int) -> None:
    publishers = 400
    r = run_driver(publishers, kills)
    assert r["stuck"] == 0, r
    assert r["most_in_flight"] == 1, r  # never two leaders at once
    assert r["rounds"] < publishers / 4, r  # they were grouped
    assert r["late_ok"], r
    offsets = sorted(o for _, o in r["done"])
    assert len(set(offsets)) == len(offsets)  # no offset given twice
    if kills == 0:
        assert not r["failed"], r["failed"][:3]
        assert len(r["done"]) == publishers
        assert offsets == list(range(1, publishers + 1))
        assert r["late"] == publishers + 1 == r["top"]
    else:
        # The kills caught publishers inside publish() (waiting or leading). A killed one
        # may or may not be registered (its round trip can be in flight); every other one
        # returned: registered, or told that its group was interrupted.
        assert any(inside for _, inside in r["killed"]), r["killed"]
        killed = {i for i, _ in r["killed"]}
        answered = [i for i, _ in r["done"]] + [i for i, _ in r["failed"]]
        assert len(answered) == len(set(answered))
        assert set(range(publishers)) - killed <= set(answered), sorted(set(range(publishers)) - set(answered))
        assert all("interrupted" in f for _, f in r["failed"]), r["failed"][:3]
        assert r["late"] == r["top"] and r["top"] >= max(offsets)


BATCHER_DRIVER = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()

    import json
    import sys

    import gevent

    from anycable_gevent.config import load
    from anycable_gevent.redis_client import RedisConnector

    cfg = load(["--redis_url=" + sys.argv[1]], {})
    connector = RedisConnector(cfg)
    connector.start()
    batcher = connector.batcher
    answers, errors = [], []

    def ping(i):
        try:
            answers.append(batcher.run(lambda pipe: pipe.echo(str(i))))
        except ConnectionError as exc:
            errors.append(str(exc))

    greenlets = [gevent.spawn(ping, i) for i in range(50)]
    gevent.sleep(0)  # the flusher took the first batch and is in its round trip
    first = batcher._flusher
    more = [gevent.spawn(ping, i) for i in range(50, 80)]  # queued behind it
    gevent.sleep(0)
    first.kill(block=False)  # e.g. a shutdown killing greenlets
    finished = gevent.joinall(greenlets + more, timeout=10)
    print(json.dumps({"answers": len(answers), "errors": errors[:3], "n_errors": len(errors),
                      "stuck": 80 - len(finished)}))
    """
)


def test_a_killed_pipeline_round_trip_fails_its_callers_and_the_queue_still_goes_through() -> None:
    out = subprocess.run([sys.executable, "-c", BATCHER_DRIVER, REDIS_URL], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["stuck"] == 0, r
    assert r["n_errors"] == 50 and all("interrupted" in e for e in r["errors"]), r  # the killed round trip
    assert r["answers"] == 30, r  # what was queued behind it had its own round trip
