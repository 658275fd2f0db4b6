"""Redis broker: offsets, per-stream epochs and history in Redis, shared by every worker and node.

Each stream has a meta hash (its epoch and last offset) and a Redis Stream of its recent
messages, both under the stream's hash tag (:class:`~anycable_gevent.redis_client.Keys`).
One Lua script per registered message (``lua/publish.lua``) reads or creates the epoch,
increments the counter, appends the history entry (ID ``<offset>-0``, fields ``d`` and
``t``, ``MAXLEN`` the stream's limit), refreshes expiries and PUBLISHes the registered
message to the stream's channel, so offsets, history and pub/sub order agree. A batch is
one MULTI/EXEC round trip.

Epochs are per stream: a stream whose meta hash is gone (never used, idle for
``10 × its history TTL``, or Redis lost its data) starts again at offset 1 under a fresh
random epoch, and its old history is deleted in the same step; clients holding positions
of the old epoch get ``reject_history``. History answers are all or nothing: messages
after an offset are returned only when they run contiguously up to the stream's top.

Sessions are ``Psess:<sid>`` strings with ``EX sessions_ttl``, taken with ``GETDEL`` (a sid
restores once in the whole cluster). Presence (Redis 7.0 commands only), per stream:

=============  =================================================================
``P{S}:pz``    sorted set: sid → deadline (Unix seconds) of its presence
``P{S}:ps``    hash: sid → presence id
``P{S}:pi``    hash: presence id → info (JSON)
``P{S}:pc``    hash: presence id → number of sessions holding it
``Ppresence``  sorted set: presence stream → a time at or before its earliest deadline
=============  =================================================================

Every node sweeps the index once a second; one script per due stream removes expired
sessions atomically, so each leave event goes to exactly one node's
:attr:`~anycable_gevent.broker.base.Broker.presence_handler`.

Concurrency contract: every method may be called from any greenlet and yields while it
waits for Redis (one round trip per call, at most a few for a presence sweep); no state
of this object is shared across a yield except the health flag and the map of which
local sessions are present where (plain dict updates). Every failure of Redis raises
:class:`~anycable_gevent.errors.BrokerError` naming the target (never credentials) and
marks the broker unhealthy until Redis answers again. Publications are never retried
automatically: a repeated script could register a message twice. The only retry is
after ``NOSCRIPT`` (the script did not run): the scripts are loaded and the call is
made once more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import gevent
import redis
from gevent.event import AsyncResult
from redis.exceptions import NoScriptError

from anycable_gevent.broker.base import Broker
from anycable_gevent.broker.memory import STREAM_LIFETIME_TTLS
from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.history import HistoryPolicy, HistorySettings
from anycable_gevent.protocol import (
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PresenceEvent,
    PresenceInfo,
    StreamMessage,
    encode_pubsub,
    pubsub_head,
)
from anycable_gevent.ticker import every

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.redis_client import RedisConnector

log = logging.getLogger(__name__)

#: What a waiting registration is handed when it is to lead the next round trip.
_LEAD = "lead"

_EPOCH_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
EPOCH_LENGTH = 8
#: Presence keys expire this long after their last write if no node is left to sweep them.
PRESENCE_KEY_TTLS = 4
PRESENCE_KEY_MIN_TTL = 60
#: At most this many due presence streams per sweep, and expired sessions per stream and call.
SWEEP_STREAMS = 256
SWEEP_ROUNDS = 8
SWEEP_SESSIONS = 1000
#: Largest pipeline sent at once (touches of many sessions are split).
CHUNK = 1000
#: Errors after which the broker counts as unhealthy (Redis unreachable or unable to write).
_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError, OSError)


def new_epoch() -> str:
    """8 random characters from ``A-Za-z0-9`` (``secrets``): a stream's epoch."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(EPOCH_LENGTH))


class Script:
    """One Lua script of ``anycable_gevent/broker/lua``, called by SHA (``EVALSHA``)."""

    __slots__ = ("name", "text", "sha")

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = resources.files("anycable_gevent.broker").joinpath(f"lua/{name}.lua").read_text("utf-8")
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


PUBLISH = Script("publish")
HISTORY = Script("history")
PRESENCE_JOIN_SCRIPT = Script("presence_join")
PRESENCE_LEAVE_SCRIPT = Script("presence_leave")
PRESENCE_TOUCH = Script("presence_touch")
PRESENCE_EXPIRE = Script("presence_expire")
SCRIPTS = (PUBLISH, HISTORY, PRESENCE_JOIN_SCRIPT, PRESENCE_LEAVE_SCRIPT, PRESENCE_TOUCH, PRESENCE_EXPIRE)


def _reason(exc: BaseException) -> str:
    """A short, credential-free description of a Redis failure (``connection refused``)."""
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    cause: BaseException | None = exc
    for _ in range(8):  # the chain of causes, bounded
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip().rstrip(".")
    if "refused" in text.lower():
        return "connection refused"
    return (text or type(exc).__name__)[:200]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBroker(Broker):
    """The broker of several workers and nodes (``--broker=redis``).

    Args:
        redis: the worker's connector (started by the composition root before :meth:`start`).
        policy: history limit and TTL per stream.
        sessions_ttl: seconds a session snapshot lives after its last touch (0 = none kept).
        presence_ttl: seconds presence lives after its last touch.
        clock: Unix time in seconds (history timestamps, TTL cut-off, presence deadlines);
            injectable for tests. Key expiries in Redis run on Redis's own clock.
    """

    def __init__(
        self,
        redis: RedisConnector,
        policy: HistoryPolicy | None = None,
        sessions_ttl: int = 300,
        presence_ttl: int = 15,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = redis.keys
        self.policy = policy or HistoryPolicy(HistorySettings(100, 300))
        self.sessions_ttl = sessions_ttl
        self.presence_ttl = presence_ttl
        self.supports_sessions = sessions_ttl > 0
        self.clock = clock
        self.target = redis.describe()
        self._presence_key_ttl = max(PRESENCE_KEY_MIN_TTL, PRESENCE_KEY_TTLS * presence_ttl)
        #: sid → {stream: presence id} of the sessions that joined through this broker (for touches)
        self._present: dict[str, dict[str, str]] = {}
        #: why Redis does not work right now (None = it does)
        self._down: str | None = None
        self._ticker: gevent.Greenlet | None = None
        #: registrations waiting for the round trip in flight (group commit, see _register)
        self._waiting: list[tuple[list[StreamMessage], AsyncResult]] = []
        self._leading = False

    @classmethod
    def from_config(cls, cfg: Config, metrics: Metrics, redis: RedisConnector | None) -> RedisBroker:
        if redis is None:
            raise BrokerError("the redis broker needs a Redis connector")
        return cls(redis, policy=cfg.history_policy, sessions_ttl=cfg.sessions_ttl, presence_ttl=cfg.presence_ttl)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load the scripts (a Redis that is down only makes the broker unhealthy) and start
        the background ticker: presence expiry, or a PING while Redis is failing."""
        try:
            self._load_scripts()
        except BrokerError as exc:
            log.warning("%s", exc)
        if self._ticker is None:
            self._ticker = every(1.0, self.tick, "redis broker tick")

    def shutdown(self) -> None:
        """Stop the ticker and wait for it: the connector closes the pool right after."""
        if self._ticker is not None:
            self._ticker.kill(block=True, timeout=2)
            self._ticker = None

    def announce(self) -> str:
        sessions = f"sessions ttl: {self.sessions_ttl}s" if self.supports_sessions else "no resumable sessions"
        return (
            f"broker: redis ({self.target}, prefix: {self.keys.prefix!r}, {self.policy.describe()}, "
            f"{sessions}, presence ttl: {self.presence_ttl}s)"
        )

    def healthy(self) -> str | None:
        """No I/O: what the last call to Redis told (the ticker PINGs while it fails)."""
        down = self._down
        return None if down is None else f"redis broker ({self.target}): {down}"

    def tick(self) -> None:
        """Once a second: PING while Redis is failing, else expire presence."""
        if self._down is not None:
            try:
                self._call(lambda c: c.ping())
                self._load_scripts()
            except BrokerError:
                return
            log.warning("redis broker (%s): Redis answers again", self.target)
            return
        self.sweep()

    # ------------------------------------------------------------------ plumbing
    def _failed(self, exc: Exception) -> BrokerError:
        reason = _reason(exc)
        if isinstance(exc, _DOWN_ERRORS):
            if self._down is None:
                log.warning("redis broker (%s): %s", self.target, reason)
            self._down = reason
        return BrokerError(f"redis broker ({self.target}): {reason}")

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(client)``; Redis errors become BrokerError, success clears the health flag."""
        try:
            result = fn(self.redis.client)
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from None
        self._down = None
        return result

    def _load_scripts(self) -> None:
        def load(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            for s in SCRIPTS:
                pipe.script_load(s.text)
            pipe.execute()

        self._call(load)

    def _pipeline(self, build: Callable[[Any], None], transaction: bool = False) -> list[Any]:
        """One round trip: the commands ``build(pipe)`` queues, with their results in order.

        A command error fails the call (BrokerError) after the others ran; ``NOSCRIPT``
        (Redis lost its script cache, so no script ran) loads the scripts and runs the
        whole pipeline once more: only for pipelines whose commands are all safe to repeat
        when no script ran (not :meth:`publish`, which handles it itself).
        """

        def run(c: Any) -> list[Any]:
            if not transaction:
                return self.redis.batcher.run(build)  # one round trip with every other caller's
            pipe = c.pipeline(transaction=True)
            build(pipe)
            return list(pipe.execute(raise_on_error=False))

        results: list[Any] = self._call(run)
        if any(isinstance(r, NoScriptError) for r in results):
            self._load_scripts()
            results = self._call(run)
        self._raise_first(results)
        return results

    def _raise_first(self, results: Sequence[Any]) -> None:
        for r in results:
            if isinstance(r, Exception):
                raise self._failed(r)

    def _presence_keys(self, stream: str) -> tuple[str, str, str, str]:
        k = self.keys.stream
        return k(stream, "pz"), k(stream, "ps"), k(stream, "pi"), k(stream, "pc")

    # ------------------------------------------------------------------ streams
    def register(self, msg: StreamMessage) -> None:
        """Register one message (without publishing it): :meth:`publish` is the normal path."""
        if not msg.transient:
            self._register_now([msg], publish=False)

    def publish(self, msgs: list[StreamMessage]) -> None:
        """Register the non-transient messages and publish all of them, in list order, in one
        round trip (MULTI/EXEC for a batch).

        With a multi-node broadcaster the scripts PUBLISH the registered messages and
        transient ones are PUBLISHed (:func:`~anycable_gevent.protocol.encode_pubsub`) in
        the same transaction; with a local one, every message goes to
        ``broadcaster.broadcast`` once the transaction succeeded.

        Raises:
            BrokerError: Redis failed; nothing can be promised to have been registered or
                delivered (after a connection loss during the round trip it may have been).
        """
        if not msgs:
            return
        multi = self.broadcaster.is_multi_node
        if multi or any(not m.transient for m in msgs):
            self._register(msgs, publish=multi)
        if not multi:
            broadcast = self.broadcaster.broadcast
            for msg in msgs:
                broadcast(msg)

    def _register(self, msgs: list[StreamMessage], publish: bool) -> None:
        """Register (and publish) ``msgs``, grouped with what other greenlets register meanwhile.

        Group commit: while one round trip is in flight, the registrations that arrive
        wait, and the next round trip carries all of them (one MULTI/EXEC: they succeed
        or fail together). One greenlet leads at a time and, when others are waiting
        after its own group, hands the lead to the first of them, so no caller is kept
        waiting for anybody else's.
        """
        done: AsyncResult = AsyncResult()
        entry = (msgs, done)
        self._waiting.append(entry)
        if self._leading:
            try:
                handed = done.get()
            except BaseException:  # its group failed, or this greenlet is being killed
                self._withdraw(entry)
                raise
            if handed is not _LEAD:
                return  # registered by the leader's round trip
        # This greenlet leads: the lead was free, or it was handed over (still held).
        self._leading = True
        group, self._waiting = self._waiting, []
        try:
            self._register_now([m for part, _ in group for m in part], publish)
        except BrokerError as exc:
            for _, w in group:
                w.set_exception(exc)
        except BaseException:  # killed in the round trip: nobody must wait for it for ever
            interrupted = BrokerError(f"redis broker ({self.target}): registration interrupted, outcome unknown")
            for _, w in group:
                if not w.ready():
                    w.set_exception(interrupted)
            raise
        else:
            for _, w in group:
                w.set(None)
        finally:
            self._hand_over()
        done.get()

    def _hand_over(self) -> None:
        """The leader is done: the first waiter leads next (the lead stays held, so no
        newcomer starts a round trip beside it), or nobody does."""
        if self._waiting:
            self._waiting[0][1].set(_LEAD)
        else:
            self._leading = False

    def _withdraw(self, entry: tuple[list[StreamMessage], AsyncResult]) -> None:
        """A waiter leaves early (killed, or its group failed): if it was handed the lead,
        pass the lead on; if it is still queued, its messages are not registered."""
        done = entry[1]
        handed = done.ready() and done.successful() and done.value is _LEAD
        self._waiting = [w for w in self._waiting if w is not entry]
        if handed:
            self._hand_over()

    def _register_now(self, msgs: list[StreamMessage], publish: bool) -> None:
        keys = self.keys
        epoch = new_epoch()  # used by a stream only if its counter is gone
        ts = int(self.clock())
        sha = PUBLISH.sha
        todo = [m for m in msgs if publish or not m.transient]

        def build(pipe: Any, batch: list[StreamMessage]) -> None:
            for m in batch:
                name = m.stream
                if m.transient:
                    pipe.publish(keys.channel(name), encode_pubsub(m))
                    continue
                s = self.policy.for_stream(name)
                pipe.evalsha(
                    sha,
                    3,
                    keys.stream(name, "m"),
                    keys.stream(name, "h"),
                    keys.channel(name),
                    epoch,
                    m.data,
                    ts,
                    s.limit,
                    s.ttl,
                    STREAM_LIFETIME_TTLS * s.ttl,
                    pubsub_head(m) if publish else "",
                )

        def run(batch: list[StreamMessage]) -> list[Any]:
            def execute(c: Any) -> list[Any]:
                pipe = c.pipeline(transaction=len(batch) > 1)
                build(pipe, batch)
                return list(pipe.execute(raise_on_error=False))

            return list(self._call(execute))

        results = run(todo)
        if any(isinstance(r, NoScriptError) for r in results):
            # No script ran (the cache is all or nothing); transient messages of the batch
            # were published already, so only the registrations are sent again.
            self._load_scripts()
            todo = [m for m in todo if not m.transient]
            results = run(todo)
        self._raise_first(results)
        for m, r in zip(todo, results, strict=True):
            if not m.transient:
                m.offset = int(r[0])
                m.epoch = _text(r[1])
                m.ts = ts

    def peaks(self, streams: Collection[str]) -> dict[str, tuple[str, int]]:
        names = list(streams)
        if not names:
            return {}
        meta = self.keys.stream

        def build(pipe: Any) -> None:
            for name in names:
                pipe.hmget(meta(name, "m"), "e", "s")

        out = {}
        for name, (epoch, top) in zip(names, self._pipeline(build), strict=True):
            if epoch is not None:
                out[name] = (_text(epoch), int(top or 0))
        return out

    def _read(self, stream: str, start: str) -> tuple[str | None, int, list[StreamMessage], HistorySettings]:
        """The stream's epoch and top, and its live entries from ID ``start`` (one script)."""
        keys = self.keys

        def build(pipe: Any) -> None:
            pipe.evalsha(HISTORY.sha, 2, keys.stream(stream, "m"), keys.stream(stream, "h"), start)

        epoch_raw, top_raw, entries = self._pipeline(build)[0]
        settings = self.policy.for_stream(stream)
        if not epoch_raw:
            return None, 0, [], settings
        epoch = _text(epoch_raw)
        cutoff = self.clock() - settings.ttl
        msgs: list[StreamMessage] = []
        for entry_id, flat in entries:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            ts = int(fields[b"t"])
            if ts < cutoff and not msgs:
                continue  # older than the stream's TTL: gone (as the memory broker drops them)
            offset = int(entry_id.split(b"-", 1)[0])
            msgs.append(StreamMessage(stream=stream, data=fields[b"d"].decode(), offset=offset, epoch=epoch, ts=ts))
        if len(msgs) > settings.limit:  # the limit was lowered since they were stored
            msgs = msgs[len(msgs) - settings.limit :] if settings.limit else []
        return epoch, int(top_raw or 0), msgs, settings

    def history_from(self, stream: str, epoch: str, offset: int) -> list[StreamMessage]:
        """The memory broker's rules (relaxed: reject only when a message after ``offset``
        is gone), and ``confirm`` only when the entries run contiguously from ``offset + 1``
        to the top; a client at the top gets ``[]`` even when the history itself expired."""
        current, top, msgs, _ = self._read(stream, f"{offset + 1}-0" if offset >= 0 else "-")
        if current is None:
            raise HistoryError("stream not found")
        if epoch != current:
            raise HistoryError(f"unknown epoch {epoch!r}")
        if offset > top:
            raise HistoryError("offset not found (ahead of the stream)")
        if offset == top:
            return []
        if not msgs:
            raise HistoryError("stream history has expired")
        if msgs[0].offset != offset + 1:
            raise HistoryError("offset not found (messages after it have expired)")
        if msgs[-1].offset != top or len(msgs) != top - offset:
            raise HistoryError("history has a gap")
        return msgs

    def history_since(self, stream: str, since: int) -> list[StreamMessage]:
        _, _, msgs, _ = self._read(stream, "-")
        for i, m in enumerate(msgs):
            if m.ts >= since:
                return msgs[i:]
        return []

    # ------------------------------------------------------------------ sessions
    def commit_session(self, sid: str, snapshot: bytes) -> None:
        self.commit_sessions(((sid, snapshot),))

    def commit_sessions(self, items: Iterable[tuple[str, bytes]]) -> None:
        """``SET … EX sessions_ttl`` for every snapshot, pipelined."""
        if not self.supports_sessions:
            return
        pairs = list(items)
        session, ttl = self.keys.session, self.sessions_ttl
        for i in range(0, len(pairs), CHUNK):
            chunk = pairs[i : i + CHUNK]

            def build(pipe: Any, chunk: list[tuple[str, bytes]] = chunk) -> None:
                for sid, snapshot in chunk:
                    pipe.set(session(sid), snapshot, ex=ttl)

            self._pipeline(build)

    def take_session(self, sid: str) -> bytes | None:
        """``GETDEL``: of every node and worker, one restore gets the snapshot."""
        if not self.supports_sessions:
            return None
        key = self.keys.session(sid)
        raw = self._pipeline(lambda pipe: pipe.getdel(key))[0]
        return bytes(raw) if raw is not None else None

    def touch_sessions(self, sids: Iterable[str]) -> None:
        """One pipelined ``EXPIRE`` per sid (a sid without snapshot is left alone)."""
        if not self.supports_sessions:
            return
        names = list(sids)
        session, ttl = self.keys.session, self.sessions_ttl
        for i in range(0, len(names), CHUNK):
            chunk = names[i : i + CHUNK]

            def build(pipe: Any, chunk: list[str] = chunk) -> None:
                for sid in chunk:
                    pipe.expire(session(sid), ttl)

            self._pipeline(build)

    # ------------------------------------------------------------------ presence
    def presence_join(self, stream: str, sid: str, pid: str, info: object) -> PresenceEvent | None:
        deadline = self.clock() + self.presence_ttl
        keys = self._presence_keys(stream)
        encoded = json.dumps(info, separators=(",", ":"))

        def build(pipe: Any) -> None:
            pipe.evalsha(PRESENCE_JOIN_SCRIPT.sha, 4, *keys, sid, pid, encoded, deadline, self._presence_key_ttl)
            # the index needs a score at or before the stream's earliest deadline
            pipe.zadd(self.keys.presence_index, {stream: deadline}, lt=True)

        result = self._pipeline(build)[0]
        if int(result[0]) < 0:
            raise BrokerError(f"session is already present in this stream as {_text(result[1])!r}")
        self._present.setdefault(sid, {})[stream] = pid
        return PresenceEvent(PRESENCE_JOIN, pid, info) if int(result[0]) == 1 else None

    def presence_leave(self, stream: str, sid: str) -> PresenceEvent | None:
        keys = self._presence_keys(stream)
        result = self._pipeline(lambda pipe: pipe.evalsha(PRESENCE_LEAVE_SCRIPT.sha, 4, *keys, sid))[0]
        streams = self._present.get(sid)
        if streams is not None:
            streams.pop(stream, None)
            if not streams:
                del self._present[sid]
        if int(result[0]) < 0:
            raise BrokerError("session is not present in this stream")
        return PresenceEvent(PRESENCE_LEAVE, _text(result[1])) if int(result[0]) == 1 else None

    def presence_info(self, stream: str) -> PresenceInfo:
        key = self.keys.stream(stream, "pi")
        records = self._pipeline(lambda pipe: pipe.hgetall(key))[0]
        if not records:
            return PresenceInfo()
        return PresenceInfo(len(records), [(_text(pid), json.loads(info)) for pid, info in records.items()])

    def touch_presence(self, sids: Iterable[str]) -> None:
        """One script per stream for the listed sessions that joined through this broker."""
        self._extend_presence(sids, forget=False)

    def release_presence(self, sids: Iterable[str]) -> None:
        """Their presence lasts ``presence_ttl`` from now; this broker stops touching them."""
        self._extend_presence(sids, forget=True)

    def _extend_presence(self, sids: Iterable[str], forget: bool) -> None:
        by_stream: dict[str, list[str]] = {}
        present = self._present
        for sid in sids:
            streams = present.pop(sid, None) if forget else present.get(sid)
            for stream in streams or ():
                by_stream.setdefault(stream, []).append(sid)
        if not by_stream:
            return
        deadline = self.clock() + self.presence_ttl
        calls = [
            (stream, members[i : i + CHUNK])
            for stream, members in by_stream.items()
            for i in range(0, len(members), CHUNK)
        ]
        for i in range(0, len(calls), CHUNK):
            chunk = calls[i : i + CHUNK]

            def build(pipe: Any, chunk: list[tuple[str, list[str]]] = chunk) -> None:
                for stream, members in chunk:
                    pipe.evalsha(
                        PRESENCE_TOUCH.sha, 4, *self._presence_keys(stream), deadline, self._presence_key_ttl, *members
                    )

            self._pipeline(build)

    def sweep(self) -> None:
        """Expire presence whose deadline passed; hand each leave event to ``presence_handler``.

        Reads the index of due streams, runs one atomic script per stream (so a session's
        expiry is seen by one sweeping node only), then moves each stream's index entry to
        its next deadline, or removes it when nobody is left (checking again afterwards,
        since a join may have raced the removal). At most ``SWEEP_ROUNDS × SWEEP_STREAMS``
        streams per call; the rest wait for the next one.
        """
        now = self.clock()
        for _ in range(SWEEP_ROUNDS):
            if self._sweep_once(now) < SWEEP_STREAMS:
                break

    def _sweep_once(self, now: float) -> int:
        """One round of :meth:`sweep`; returns how many streams were due."""
        index = self.keys.presence_index
        due = [_text(s) for s in self._call(lambda c: c.zrangebyscore(index, "-inf", now, start=0, num=SWEEP_STREAMS))]
        if not due:
            return 0

        def expire(pipe: Any) -> None:
            for stream in due:
                pipe.evalsha(PRESENCE_EXPIRE.sha, 4, *self._presence_keys(stream), now, SWEEP_SESSIONS)

        results = self._pipeline(expire)
        left: list[tuple[str, PresenceEvent]] = []
        emptied: list[str] = []
        rescheduled: dict[str, float] = {}
        for stream, result in zip(due, results, strict=True):
            left.extend((stream, PresenceEvent(PRESENCE_LEAVE, _text(pid))) for pid in result[1:])
            nxt = _text(result[0])
            if nxt:
                rescheduled[stream] = float(nxt)
            else:
                emptied.append(stream)

        def reindex(pipe: Any) -> None:
            if rescheduled:
                pipe.zadd(index, rescheduled)
            for stream in emptied:
                pipe.zrem(index, stream)
                pipe.exists(self._presence_keys(stream)[0])

        checks = self._pipeline(reindex)[1 if rescheduled else 0 :][1::2]
        back = {stream: now for stream, exists in zip(emptied, checks, strict=True) if exists}
        if back:  # joined between the script and the removal: look again at the next sweep
            self._call(lambda c: c.zadd(index, back, lt=True))
        handler = self.presence_handler
        if handler is not None:
            for stream, event in left:
                handler(stream, event)
        return len(due)
