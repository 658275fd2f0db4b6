"""The broker contract (``anycable_gevent/broker/base.py``), run against every broker that keeps state.

One suite, parametrized over ``memory`` and ``redis`` (the real Redis at ``REDIS_URL``,
under a prefix of its own per test, deleted afterwards). Brokers are built the way the
server builds them (config → registry → ``from_config``) with a settable clock: time
that only the broker reads (history timestamps and the TTL cut-off, session deadlines in
memory, presence deadlines) moves without sleeping, while what Redis expires itself
(history keys, session keys) is waited for in real time with TTLs of one second.

Tests that need two nodes (two Redis brokers on one Redis) or a Redis that fails or
restarts (a private ``redis-server`` without persistence, ``tests/redis_helpers.py``) run against ``redis`` only:
the memory broker is one process by design.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from helpers import Clock, free_port
from redis_helpers import REDIS_URL, PrivateRedis, delete_prefix

from anycable_gevent import broker as broker_backends
from anycable_gevent.backends import load as load_backend
from anycable_gevent.broker import redis as redis_broker
from anycable_gevent.broker.base import Broker
from anycable_gevent.broker.memory import MemoryBroker
from anycable_gevent.broker.redis import EPOCH_LENGTH, RedisBroker
from anycable_gevent.config import load
from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.metrics import Metrics
from anycable_gevent.protocol import PresenceEvent, StreamMessage, decode_pubsub
from anycable_gevent.redis_client import RedisConnector


class Recorder:
    """A local pub/sub: records what the broker hands over."""

    def __init__(self, multi_node: bool = False) -> None:
        self.is_multi_node = multi_node
        self.got: list[StreamMessage] = []

    def broadcast(self, msg: StreamMessage) -> None:
        self.got.append(msg)


class Harness:
    """Builds brokers of one kind that share one store (for Redis: one prefix = one cluster)."""

    def __init__(self, kind: str, url: str = REDIS_URL) -> None:
        self.kind = kind
        self.url = url
        self.prefix = f"test:{uuid.uuid4().hex}:"
        self.clock = Clock(time.time()) if kind == "redis" else Clock()
        self.brokers: list[Broker] = []
        self.connectors: list[RedisConnector] = []
        #: (broker index, stream, event) of every leave caused by expiry
        self.left: list[tuple[int, str, PresenceEvent]] = []

    def make(
        self,
        history_limit: int = 100,
        history_ttl: int = 60,
        overrides: str = "",
        sessions_ttl: int = 30,
        presence_ttl: int = 15,
        multi_node: bool = False,
        url: str | None = None,
    ) -> Broker:
        argv = [
            f"--broker={self.kind}",
            "--pubsub=none",
            f"--history_limit={history_limit}",
            f"--history_ttl={history_ttl}",
            f"--sessions_ttl={sessions_ttl}",
            f"--presence_ttl={presence_ttl}",
            f"--redis_url={url or self.url}",
            f"--redis_prefix={self.prefix}",
        ]
        if overrides:
            argv.append(f"--history_overrides={overrides}")
        cfg = load(argv, {})
        backend = broker_backends.BACKENDS[self.kind]
        connector = None
        if backend.redis:
            connector = RedisConnector(cfg)
            connector.start()
            self.connectors.append(connector)
        b: Broker = load_backend(backend).from_config(cfg, Metrics(), connector)  # type: ignore[attr-defined]
        b.clock = self.clock  # type: ignore[attr-defined]
        b.broadcaster = Recorder(multi_node)
        index = len(self.brokers)
        b.presence_handler = lambda stream, event: self.left.append((index, stream, event))
        self.brokers.append(b)
        return b

    def wait(self, seconds: float, real: bool = False) -> None:
        """Let time pass for the brokers (and, with ``real``, for Redis too), then sweep."""
        self.clock.advance(seconds)
        if real and self.kind == "redis":
            time.sleep(seconds)
        for b in self.brokers:
            b.sweep()  # type: ignore[attr-defined]

    def lose_counters(self, b: Broker, streams: list[str]) -> Broker:
        """The counters of ``streams`` are gone: memory restarts (a new process); in Redis
        the meta hashes are deleted, and the old history is left for the broker to drop."""
        if self.kind == "memory":
            self.brokers.remove(b)
            return self.make()
        client = redis.Redis.from_url(self.url)
        client.delete(*[f"{self.prefix}{{{s}}}:m" for s in streams])
        client.close()
        return b

    def close(self) -> None:
        for b in self.brokers:
            b.shutdown()
        for c in self.connectors:
            c.shutdown()
        delete_prefix(self.url, self.prefix)


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(request.param)
    yield h
    h.close()


@pytest.fixture
def cluster() -> Iterator[Harness]:
    """Redis only: several brokers on one Redis are several nodes."""
    h = Harness("redis")
    yield h
    h.close()


def msg(stream: str, n: object = "x", transient: bool = False) -> StreamMessage:
    return StreamMessage(stream=stream, data=f'"{n}"', transient=transient)


def publish(b: Broker, stream: str, count: int = 1) -> list[StreamMessage]:
    msgs = [msg(stream, i) for i in range(count)]
    b.publish(msgs)
    return msgs


def offsets(msgs: list[StreamMessage]) -> list[int]:
    return [m.offset for m in msgs]


def got(b: Broker) -> list[StreamMessage]:
    recorder = b.broadcaster
    assert isinstance(recorder, Recorder)
    return recorder.got


# ---------------------------------------------------------------------------- registration


def test_offsets_start_at_one_per_stream_and_the_epoch_is_stamped(harness: Harness) -> None:
    b = harness.make()
    a1, a2, c1 = msg("a"), msg("a"), msg("c")
    b.publish([a1])
    b.publish([a2])
    b.publish([c1])
    assert offsets([a1, a2, c1]) == [1, 2, 1]
    assert a1.epoch and a1.epoch == a2.epoch
    assert c1.epoch
    assert a1.ts == int(harness.clock())
    assert b.history_from("a", a1.epoch, 0) == [
        StreamMessage(stream="a", data='"x"', offset=1, epoch=a1.epoch, ts=a1.ts),
        StreamMessage(stream="a", data='"x"', offset=2, epoch=a1.epoch, ts=a1.ts),
    ]


def test_transient_messages_get_no_offset_and_are_not_stored(harness: Harness) -> None:
    b = harness.make()
    first = publish(b, "a")[0]
    t = msg("a", "whisper", transient=True)
    b.publish([t])
    nxt = publish(b, "a")[0]
    assert (t.offset, t.epoch) == (0, "")
    assert nxt.offset == 2  # the transient one took no offset
    assert offsets(b.history_from("a", first.epoch, 0)) == [1, 2]
    assert [m.data for m in got(b)] == ['"0"', '"whisper"', '"0"']


def test_a_batch_is_registered_and_delivered_in_list_order(harness: Harness) -> None:
    b = harness.make()
    batch = [msg("a", 1), msg("b", 1), msg("a", "t", transient=True), msg("a", 2), msg("b", 2)]
    b.publish(batch)
    assert [(m.stream, m.offset) for m in batch] == [("a", 1), ("b", 1), ("a", 0), ("a", 2), ("b", 2)]
    assert got(b) == batch  # each once, in order, after registration (offsets filled in)
    assert [m.offset for m in got(b)] == [1, 1, 0, 2, 2]


def test_epoch_is_random_per_stream_or_per_process(harness: Harness) -> None:
    b = harness.make()
    epochs = {publish(b, f"s{i}")[0].epoch for i in range(5)}
    if harness.kind == "redis":
        assert len(epochs) == 5  # a fresh epoch per stream
        assert all(len(e) == EPOCH_LENGTH and e.isalnum() for e in epochs)
    else:
        assert len(epochs) == 1  # one per process


def test_multi_node_publish_sends_registered_messages_to_the_stream_channel(cluster: Harness) -> None:
    b = cluster.make(multi_node=True)
    assert isinstance(b, RedisBroker)
    listener = redis.Redis.from_url(cluster.url).pubsub()
    listener.subscribe(b.keys.channel("a"))
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    batch = [msg("a", 1), msg("a", "t", transient=True), msg("a", 2)]
    b.publish(batch)
    received = []
    for _ in batch:
        m = listener.get_message(timeout=2)
        assert m is not None and m["type"] == "message"
        received.append(decode_pubsub(m["data"]))
    listener.close()
    assert [(r.data, r.offset, r.epoch) for r in received] == [  # type: ignore[union-attr]
        ('"1"', 1, batch[0].epoch),
        ('"t"', 0, ""),
        ('"2"', 2, batch[0].epoch),
    ]
    assert got(b) == []  # a multi-node pub/sub delivers what comes back from Redis


# ---------------------------------------------------------------------------- history


def test_history_from_returns_the_messages_after_the_offset(harness: Harness) -> None:
    b = harness.make()
    epoch = publish(b, "a", 5)[0].epoch
    assert offsets(b.history_from("a", epoch, 2)) == [3, 4, 5]
    assert offsets(b.history_from("a", epoch, 0)) == [1, 2, 3, 4, 5]
    assert b.history_from("a", epoch, 5) == []  # at the top: nothing missed


@pytest.mark.parametrize(
    ("stream", "epoch", "offset"),
    [("a", "other", 1), ("never", None, 0), ("a", None, 6)],
    ids=["unknown epoch", "unknown stream", "ahead of the stream"],
)
def test_history_from_rejects(harness: Harness, stream: str, epoch: str | None, offset: int) -> None:
    b = harness.make()
    current = publish(b, "a", 5)[0].epoch
    with pytest.raises(HistoryError):
        b.history_from(stream, epoch or current, offset)


def test_relaxed_offset_rule(harness: Harness) -> None:
    """DESIGN.md: reject only when a message after the client's offset is gone."""
    b = harness.make(history_limit=2)
    epoch = publish(b, "a", 6)[0].epoch  # kept: 5, 6
    assert offsets(b.history_from("a", epoch, 4)) == [5, 6]  # anycable-go would reject
    with pytest.raises(HistoryError):
        b.history_from("a", epoch, 3)  # 4 was trimmed


def test_history_limit_keeps_the_newest(harness: Harness) -> None:
    b = harness.make(history_limit=2)
    publish(b, "a", 3)
    assert offsets(b.history_since("a", 0)) == [2, 3]


def test_history_limit_zero_keeps_nothing_but_still_counts(harness: Harness) -> None:
    b = harness.make(history_limit=0)
    msgs = publish(b, "a", 3)
    assert offsets(msgs) == [1, 2, 3]
    assert b.history_since("a", 0) == []
    assert b.history_from("a", msgs[0].epoch, 3) == []  # up to date
    with pytest.raises(HistoryError):
        b.history_from("a", msgs[0].epoch, 1)  # 2 and 3 are not kept


def test_history_since_is_inclusive_in_seconds_and_never_rejects(harness: Harness) -> None:
    b = harness.make()
    publish(b, "a")
    harness.clock.advance(10)
    second = int(harness.clock())
    publish(b, "a", 2)
    assert offsets(b.history_since("a", second)) == [2, 3]
    assert offsets(b.history_since("a", second - 100)) == [1, 2, 3]  # older than kept: no rejection
    assert b.history_since("a", second + 1) == []
    assert b.history_since("unknown", 0) == []


def test_messages_older_than_the_ttl_are_gone(harness: Harness) -> None:
    b = harness.make(history_ttl=60)
    epoch = publish(b, "a", 2)[0].epoch
    harness.wait(40)
    publish(b, "a", 2)
    harness.wait(25)  # the first two are 65 s old, the others 25 s
    assert offsets(b.history_since("a", 0)) == [3, 4]
    assert offsets(b.history_from("a", epoch, 2)) == [3, 4]
    with pytest.raises(HistoryError):
        b.history_from("a", epoch, 1)  # 2 expired
    harness.wait(40)
    assert b.history_since("a", 0) == []
    with pytest.raises(HistoryError):
        b.history_from("a", epoch, 3)  # 4 expired
    assert b.history_from("a", epoch, 4) == []  # nothing missed


def test_client_at_the_top_is_confirmed_after_the_history_itself_expired(harness: Harness) -> None:
    b = harness.make(history_ttl=1)
    epoch = publish(b, "a", 3)[0].epoch
    harness.wait(1.2, real=True)  # Redis expires the history key; its meta lives 10 × TTL
    if isinstance(b, RedisBroker):
        assert not redis.Redis.from_url(harness.url).exists(b.keys.stream("a", "h"))
    assert b.history_since("a", 0) == []
    assert b.history_from("a", epoch, 3) == []
    with pytest.raises(HistoryError):
        b.history_from("a", epoch, 2)
    assert b.peaks(["a"]) == {"a": (epoch, 3)}
    assert publish(b, "a")[0].offset == 4  # the counter outlives its messages


def test_a_new_epoch_starts_at_offset_one_when_the_counter_is_gone(harness: Harness) -> None:
    b = harness.make()
    old = publish(b, "a", 3)
    b = harness.lose_counters(b, ["a"])
    new = publish(b, "a")[0]
    assert new.offset == 1
    assert new.epoch != old[0].epoch
    with pytest.raises(HistoryError):
        b.history_from("a", old[0].epoch, 1)
    # no entry of the old epoch survives under the new one (offsets 2 and 3 must not reappear)
    assert [(m.offset, m.data) for m in b.history_from("a", new.epoch, 0)] == [(1, '"0"')]
    assert offsets(b.history_since("a", 0)) == [1]


def test_a_gap_in_the_stored_history_is_rejected(cluster: Harness) -> None:
    b = cluster.make()
    assert isinstance(b, RedisBroker)
    epoch = publish(b, "a", 5)[0].epoch
    redis.Redis.from_url(cluster.url).xdel(b.keys.stream("a", "h"), "3-0")  # e.g. lost by Redis
    with pytest.raises(HistoryError, match="gap"):
        b.history_from("a", epoch, 1)
    assert offsets(b.history_from("a", epoch, 3)) == [4, 5]


def test_per_stream_history_settings(harness: Harness) -> None:
    b = harness.make(history_limit=3, history_ttl=60, overrides="chat/*=5/120,cursor/*=0")
    publish(b, "chat/1", 7)
    cursor = publish(b, "cursor/1", 4)
    publish(b, "other", 7)
    assert offsets(b.history_since("chat/1", 0)) == [3, 4, 5, 6, 7]
    assert b.history_since("cursor/1", 0) == []
    assert offsets(cursor) == [1, 2, 3, 4]  # counted, not kept
    assert b.history_from("cursor/1", cursor[0].epoch, 4) == []
    assert offsets(b.history_since("other", 0)) == [5, 6, 7]
    harness.wait(90)  # past the default TTL, within chat's
    assert offsets(b.history_since("chat/1", 0)) == [3, 4, 5, 6, 7]
    assert b.history_since("other", 0) == []


def test_peaks_give_epoch_and_top_of_streams_with_a_counter(harness: Harness) -> None:
    b = harness.make()
    a = publish(b, "a", 3)[0]
    c = publish(b, "c")[0]
    assert b.peaks(["a", "c", "never"]) == {"a": (a.epoch, 3), "c": (c.epoch, 1)}
    assert b.peaks([]) == {}


# ---------------------------------------------------------------------------- sessions


def test_a_session_restores_once(harness: Harness) -> None:
    b = harness.make()
    b.commit_session("sid1", b'{"ids":"u1"}')
    assert b.take_session("sid1") == b'{"ids":"u1"}'
    assert b.take_session("sid1") is None
    assert b.take_session("never") is None


def test_recommit_replaces_the_snapshot_and_batches_commit_all(harness: Harness) -> None:
    b = harness.make()
    b.commit_session("s", b"1")
    b.commit_session("s", b"2")
    b.commit_sessions([("x", b"x"), ("y", b"y")])
    assert [b.take_session(sid) for sid in ("s", "x", "y")] == [b"2", b"x", b"y"]


def test_sessions_expire_unless_touched(harness: Harness) -> None:
    b = harness.make(sessions_ttl=1)
    b.commit_sessions([("kept", b"k"), ("dropped", b"d")])
    harness.wait(0.6, real=True)
    b.touch_sessions(["kept", "unknown"])
    harness.wait(0.6, real=True)
    assert b.take_session("dropped") is None
    assert b.take_session("kept") == b"k"
    assert b.take_session("unknown") is None  # touching does not create


def test_sessions_ttl_zero_keeps_no_session(harness: Harness) -> None:
    b = harness.make(sessions_ttl=0)
    assert b.supports_sessions is False
    b.commit_session("s", b"1")
    b.touch_sessions(["s"])
    assert b.take_session("s") is None


def test_a_session_restores_once_across_nodes(cluster: Harness) -> None:
    a, b = cluster.make(), cluster.make()
    a.commit_session("sid", b"snap")
    assert b.take_session("sid") == b"snap"
    assert a.take_session("sid") is None


# ---------------------------------------------------------------------------- presence


def join(pid: str, info: object = None) -> PresenceEvent:
    return PresenceEvent("join", pid, info)


def leave(pid: str) -> PresenceEvent:
    return PresenceEvent("leave", pid)


def test_presence_join_and_leave_events(harness: Harness) -> None:
    b = harness.make()
    assert b.presence_join("room", "s1", "u1", {"name": "Ann"}) == join("u1", {"name": "Ann"})
    assert b.presence_join("room", "s2", "u1", {"name": "Ann 2"}) is None  # same id: no event
    assert b.presence_join("room", "s3", "u2", None) == join("u2")
    assert b.presence_join("room", "s1", "u1", {"name": "Ann 3"}) is None  # joining again
    info = b.presence_info("room")
    assert info.total == 2
    assert sorted(info.records, key=lambda r: r[0]) == [("u1", {"name": "Ann 3"}), ("u2", None)]
    assert b.presence_leave("room", "s1") is None  # s2 still holds u1
    assert b.presence_leave("room", "s2") == leave("u1")
    assert b.presence_leave("room", "s3") == leave("u2")
    assert b.presence_info("room").total == 0
    assert b.presence_info("never").records == []


def test_presence_errors(harness: Harness) -> None:
    b = harness.make()
    b.presence_join("room", "s1", "u1", None)
    with pytest.raises(BrokerError):
        b.presence_join("room", "s1", "u2", None)  # already present under another id
    with pytest.raises(BrokerError):
        b.presence_leave("room", "s2")  # not present
    with pytest.raises(BrokerError):
        b.presence_leave("other", "s1")
    assert b.presence_info("room").records == [("u1", None)]  # nothing changed


def test_presence_expires_with_leave_events_unless_touched(harness: Harness) -> None:
    b = harness.make(presence_ttl=10)
    b.presence_join("room", "s1", "u1", None)
    b.presence_join("room", "s2", "u2", None)
    b.presence_join("room", "s3", "u2", None)
    b.presence_join("hall", "s1", "u1", None)
    harness.wait(6)
    b.touch_presence(["s2"])
    harness.wait(6)  # s1 and s3 expired; s2 keeps u2
    assert sorted((s, e.id) for _, s, e in harness.left) == [("hall", "u1"), ("room", "u1")]
    assert b.presence_info("room").records == [("u2", None)]
    b.release_presence(["s2"])  # disconnected: presence_ttl from now, then it expires
    harness.wait(6)
    assert b.presence_info("room").total == 1
    harness.wait(6)
    assert [(s, e) for _, s, e in harness.left[2:]] == [("room", leave("u2"))]
    assert b.presence_info("room").total == 0


def test_presence_released_and_joined_again_in_time_stays(harness: Harness) -> None:
    b = harness.make(presence_ttl=10)
    b.presence_join("room", "s1", "u1", None)
    b.release_presence(["s1"])
    harness.wait(5)
    assert b.presence_join("room", "s2", "u1", None) is None  # came back as a new session
    harness.wait(7)  # s1 expired, s2 still holds u1: no leave
    assert harness.left == []
    assert b.presence_info("room").records == [("u1", None)]


def test_presence_is_shared_by_nodes(cluster: Harness) -> None:
    a, b = cluster.make(), cluster.make()
    assert a.presence_join("room", "s1", "u1", {"n": 1}) == join("u1", {"n": 1})
    assert b.presence_info("room").records == [("u1", {"n": 1})]
    assert b.presence_join("room", "s2", "u1", {"n": 2}) is None
    assert a.presence_info("room").records == [("u1", {"n": 2})]
    with pytest.raises(BrokerError):
        b.presence_join("room", "s1", "u9", None)
    assert a.presence_leave("room", "s1") is None
    assert b.presence_leave("room", "s2") == leave("u1")


def test_presence_expiry_events_are_delivered_once_when_nodes_sweep_together(cluster: Harness) -> None:
    nodes = [cluster.make(presence_ttl=5) for _ in range(3)]
    streams = [f"room{i}" for i in range(20)]
    for i, stream in enumerate(streams):
        for j in range(3):
            nodes[j].presence_join(stream, f"s{i}-{j}", f"u{j}", None)
    for j, node in enumerate(nodes):
        node.release_presence([f"s{i}-{j}" for i in range(len(streams))])
    cluster.clock.advance(6)
    barrier = threading.Barrier(len(nodes))

    def sweep(node: Broker) -> None:
        barrier.wait()
        node.sweep()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=sweep, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    events = sorted((stream, e.type, e.id) for _, stream, e in cluster.left)
    assert events == sorted((s, "leave", f"u{j}") for s in streams for j in range(3))
    assert all(n.presence_info(s).total == 0 for n in nodes for s in streams)
    nodes[0].sweep()  # type: ignore[attr-defined]
    assert len(cluster.left) == 3 * len(streams)
    assert redis.Redis.from_url(cluster.url).zcard(cluster.prefix + "presence") == 0  # index emptied


def test_one_sweep_expires_more_streams_than_one_round_takes(cluster: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_broker, "SWEEP_STREAMS", 3)
    b = cluster.make(presence_ttl=5)
    streams = [f"room{i}" for i in range(10)]
    for i, stream in enumerate(streams):
        b.presence_join(stream, f"s{i}", "u", None)
    b.release_presence([f"s{i}" for i in range(len(streams))])
    cluster.wait(6)  # one sweep: 4 rounds of at most 3 streams
    assert sorted(stream for _, stream, _ in cluster.left) == sorted(streams)


def test_presence_touched_by_its_node_does_not_expire_while_another_sweeps(cluster: Harness) -> None:
    a, b = cluster.make(presence_ttl=10), cluster.make(presence_ttl=10)
    a.presence_join("room", "s1", "u1", None)
    for _ in range(4):
        cluster.clock.advance(6)
        a.touch_presence(["s1"])
        b.sweep()  # type: ignore[attr-defined]
    assert cluster.left == []
    assert b.presence_info("room").total == 1


# ---------------------------------------------------------------------------- failures and lifecycle


def test_unreachable_redis_raises_broker_error_naming_the_target() -> None:
    h = Harness("redis", url=f"redis://user:s3cret@127.0.0.1:{free_port()}")
    b = h.make()
    calls: list[Any] = [
        lambda: b.publish([msg("a")]),
        lambda: b.history_from("a", "e", 0),
        lambda: b.history_since("a", 0),
        lambda: b.peaks(["a"]),
        lambda: b.commit_session("s", b"x"),
        lambda: b.take_session("s"),
        lambda: b.touch_sessions(["s"]),
        lambda: b.presence_join("a", "s", "u", None),
        lambda: b.presence_leave("a", "s"),
        lambda: b.presence_info("a"),
        lambda: b.sweep(),  # type: ignore[attr-defined]
    ]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(BrokerError) as info:
            call()
        assert "redis broker (redis://127.0.0.1:" in str(info.value)
        assert "connection refused" in str(info.value)
        assert "s3cret" not in str(info.value) and "user" not in str(info.value)
        assert not isinstance(info.value, HistoryError)  # a failure, not a rejection
    assert time.monotonic() - started < 2  # no retries with backoff
    assert got(b) == []  # nothing was delivered
    health = b.healthy()
    assert health is not None and "connection refused" in health and "s3cret" not in health
    for c in h.connectors:
        c.shutdown()


def test_redis_restart_without_persistence_gives_a_new_epoch_and_health_recovers() -> None:
    with PrivateRedis() as server:
        h = Harness("redis", url=server.url)
        b = h.make()
        assert isinstance(b, RedisBroker)
        b.start()
        old = publish(b, "a", 3)
        b.commit_session("sid", b"snap")
        assert b.healthy() is None
        server.stop()
        with pytest.raises(BrokerError):
            b.publish([msg("a")])
        health = b.healthy()
        assert health is not None and health.startswith(f"redis broker ({server.url}): ")
        b.tick()  # the ticker's PING while down
        assert b.healthy() is not None
        server.start()  # empty: no keys, no scripts
        b.tick()
        assert b.healthy() is None
        new = publish(b, "a")[0]
        assert (new.offset, new.epoch != old[0].epoch) == (1, True)
        with pytest.raises(HistoryError):
            b.history_from("a", old[0].epoch, 3)
        assert b.take_session("sid") is None  # sessions are lost with the data
        b.shutdown()
        for c in h.connectors:
            c.shutdown()


def test_a_batch_after_redis_lost_its_scripts_is_delivered_once_in_order() -> None:
    with PrivateRedis() as server:
        h = Harness("redis", url=server.url)
        b = h.make(multi_node=True)
        assert isinstance(b, RedisBroker)
        b.start()
        listener = redis.Redis.from_url(server.url).pubsub()
        listener.subscribe(b.keys.channel("a"))
        assert listener.get_message(timeout=2)["type"] == "subscribe"
        redis.Redis.from_url(server.url).script_flush()  # as after a restart or a failover
        batch = [msg("a", 1), msg("a", "t", transient=True), msg("a", 2)]
        b.publish(batch)  # NOSCRIPT: no script ran; they are loaded and the registrations sent again
        received = [decode_pubsub(listener.get_message(timeout=2)["data"]) for _ in batch]
        assert listener.get_message(timeout=0.3) is None  # nothing twice
        listener.close()
        # the transient message went out with the first try, before the registered ones
        assert [(r.data, r.offset) for r in received] == [('"t"', 0), ('"1"', 1), ('"2"', 2)]  # type: ignore[union-attr]
        assert offsets(b.history_since("a", 0)) == [1, 2]
        b.shutdown()
        for c in h.connectors:
            c.shutdown()


def test_lifecycle_and_announce(harness: Harness) -> None:
    b = harness.make(history_limit=7, history_ttl=70, overrides="chat/*=5/60", sessions_ttl=33, presence_ttl=9)
    b.start()
    line = b.announce()
    for part in ("history limit: 7", "history ttl: 70s", "chat/*=5/60s", "sessions ttl: 33s", "presence ttl: 9s"):
        assert part in line
    if harness.kind == "redis":
        assert line.startswith(f"broker: redis ({REDIS_URL}, prefix: '{harness.prefix}'")
    assert b.healthy() is None
    b.shutdown()
    b.shutdown()  # idempotent


def test_registry_lists_the_redis_broker() -> None:
    backend = broker_backends.BACKENDS["redis"]
    assert load_backend(backend) is RedisBroker
    assert backend.multi_node and backend.redis
    assert load_backend(broker_backends.BACKENDS["memory"]) is MemoryBroker
    cfg = load(["--broker=redis", "--pubsub=none"], {})
    assert (cfg.broker, cfg.pubsub_adapter) == ("redis", "none")
