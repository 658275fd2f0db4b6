"""In-process broker: per-stream history ring, offsets, epoch, session snapshots, presence.

One worker only (each process would have its own epoch and offsets; the config
refuses ``--broker=memory`` with several workers). No method yields, so no locks are
needed under gevent. Expiry is driven by :meth:`sweep`, called once a second by one
background greenlet; the clock is injectable for tests.

History limit and TTL are per stream (:mod:`anycable_gevent.history`). Offsets are never
reused within an epoch: an idle stream's counter outlives its messages by ``10 × its
history TTL`` (as in anycable-go); when it is finally dropped, its
last offset is folded into a small table of per-bucket floors, and a stream created
again in that bucket continues above the floor instead of restarting at 1.

Presence: stream → presence id → (latest info, the sessions holding it), and sid →
(stream → presence id, deadline). A session's presence lives until ``presence_ttl`` after
its last touch (the node touches connected sessions, and each one once when it goes);
the sweep then removes it, and every presence id left without a session gives a leave
event, handed to :attr:`~anycable_gevent.broker.base.Broker.presence_handler`.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

import gevent

from anycable_gevent.broker.base import Broker
from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.history import HistoryPolicy, HistorySettings
from anycable_gevent.protocol import PRESENCE_JOIN, PRESENCE_LEAVE, PresenceEvent, PresenceInfo, StreamMessage
from anycable_gevent.ticker import every

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.redis_client import RedisConnector

_EPOCH_ALPHABET = "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FLOOR_BUCKETS = 4096
#: An idle stream's counter is kept this many history TTLs after its last message.
STREAM_LIFETIME_TTLS = 10


def new_epoch() -> str:
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(4))


class _Stream:
    """One stream's counter and history.

    History entries are ``(data, ts, json)`` tuples: ``json`` is the message's JSON text
    when it differs from ``data`` (data that is not JSON), else None, so a history
    reply never parses a payload again. Offsets are implied by position (the last
    entry has ``offset``, the ones before it count down), which keeps a stored message
    at its payload plus ~80 bytes.
    """

    __slots__ = ("name", "offset", "entries", "deadline", "scheduled", "limit", "ttl")

    def __init__(self, name: str, offset: int, settings: HistorySettings) -> None:
        self.name = name
        self.offset = offset
        self.entries: deque[tuple[str, int, str | None]] = deque()
        self.deadline = 0.0
        self.scheduled = False
        self.limit = settings.limit
        self.ttl = settings.ttl

    @property
    def low(self) -> int:
        """Offset of the oldest stored message (0 when none is stored)."""
        return self.offset - len(self.entries) + 1 if self.entries else 0

    def messages(self, start: int, epoch: str) -> list[StreamMessage]:
        """Stored messages from index ``start`` on, as StreamMessages."""
        name = self.name
        first = self.offset - len(self.entries) + 1
        return [
            StreamMessage(stream=name, data=data, offset=first + i, epoch=epoch, ts=ts, _json=text or data)
            for i, (data, ts, text) in enumerate(itertools.islice(self.entries, start, None), start)
        ]


class _Expiring(Protocol):
    deadline: float


_E = TypeVar("_E", bound=_Expiring)


def _extend(entries: Mapping[str, _Expiring], sids: Iterable[str], deadline: float) -> None:
    """Move the deadline of the listed entries that exist."""
    for sid in sids:
        entry = entries.get(sid)
        if entry is not None:
            entry.deadline = deadline


def _pop_expired(timers: list[tuple[float, str]], entries: dict[str, _E], now: float) -> list[tuple[str, _E]]:
    """Remove and return the entries whose deadline has passed.

    ``timers`` holds one (deadline, sid) per entry; a timer whose entry was extended
    meanwhile is queued again at the new deadline, one whose entry is gone is dropped.
    """
    expired: list[tuple[str, _E]] = []
    while timers and timers[0][0] <= now:
        _, sid = heapq.heappop(timers)
        entry = entries.get(sid)
        if entry is None:
            continue
        if entry.deadline > now:
            heapq.heappush(timers, (entry.deadline, sid))
        else:
            del entries[sid]
            expired.append((sid, entry))
    return expired


class _Session:
    __slots__ = ("snapshot", "deadline")

    def __init__(self, snapshot: bytes, deadline: float) -> None:
        self.snapshot = snapshot
        self.deadline = deadline


class _Present:
    """One presence id in one stream: its latest info and the sessions holding it."""

    __slots__ = ("info", "sids")

    def __init__(self, info: object) -> None:
        self.info = info
        #: insertion-ordered set
        self.sids: dict[str, None] = {}


class _PresenceSession:
    """Where one session is present (stream → presence id) and until when."""

    __slots__ = ("streams", "deadline")

    def __init__(self, deadline: float) -> None:
        self.streams: dict[str, str] = {}
        self.deadline = deadline


class MemoryBroker(Broker):
    def __init__(
        self,
        history_limit: int = 100,
        history_ttl: int = 300,
        sessions_ttl: int = 300,
        epoch: str | None = None,
        clock: Callable[[], float] = time.time,
        presence_ttl: int = 15,
        policy: HistoryPolicy | None = None,
    ) -> None:
        self.policy = policy or HistoryPolicy(HistorySettings(history_limit, history_ttl))
        self.sessions_ttl = sessions_ttl
        self.presence_ttl = presence_ttl
        self.supports_sessions = sessions_ttl > 0
        self.epoch = epoch or new_epoch()
        self.clock = clock
        self._streams: dict[str, _Stream] = {}
        self._floors = [0] * _FLOOR_BUCKETS
        # (when, stream): the next time a stream needs a look (expiry or disposal)
        self._stream_timers: list[tuple[float, str]] = []
        self._sessions: dict[str, _Session] = {}
        self._session_timers: list[tuple[float, str]] = []
        # stream -> presence id -> who holds it; sid -> where it is present
        self._presence: dict[str, dict[str, _Present]] = {}
        self._presence_sessions: dict[str, _PresenceSession] = {}
        self._presence_timers: list[tuple[float, str]] = []
        self._sweeper: gevent.Greenlet | None = None
        # one int object per second for all messages registered in it
        self._ts = 0

    @classmethod
    def from_config(cls, cfg: Config, metrics: Metrics, redis: RedisConnector | None) -> MemoryBroker:
        return cls(sessions_ttl=cfg.sessions_ttl, presence_ttl=cfg.presence_ttl, policy=cfg.history_policy)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = every(1.0, self.sweep, "broker sweep")

    def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None

    def announce(self) -> str:
        return (
            f"broker: memory (epoch: {self.epoch}, {self.policy.describe()}, "
            f"sessions ttl: {self.sessions_ttl}s, presence ttl: {self.presence_ttl}s)"
        )

    # ------------------------------------------------------------------ streams
    def register(self, msg: StreamMessage) -> None:
        if msg.transient:
            return
        now = self.clock()
        ts = int(now)
        if ts != self._ts:
            self._ts = ts
        ts = self._ts
        name = msg.stream
        stream = self._streams.get(name)
        if stream is None:
            settings = self.policy.for_stream(name)
            stream = self._streams[name] = _Stream(name, self._floors[self._bucket(name)], settings)
        stream.offset += 1
        msg.offset = stream.offset
        msg.epoch = self.epoch
        msg.ts = ts
        stream.deadline = now + STREAM_LIFETIME_TTLS * stream.ttl
        if stream.limit > 0:
            entries = stream.entries
            text = msg.message()  # validated once here; the fan-out reuses it
            entries.append((msg.data, ts, None if text is msg.data else text))
            if len(entries) > stream.limit:
                entries.popleft()
        if not stream.scheduled:
            stream.scheduled = True
            heapq.heappush(self._stream_timers, (now + stream.ttl, name))

    def peaks(self, streams: Collection[str]) -> dict[str, tuple[str, int]]:
        out = {}
        for name in streams:
            s = self._streams.get(name)
            if s is not None:
                out[name] = (self.epoch, s.offset)
        return out

    @staticmethod
    def _bucket(name: str) -> int:
        return zlib.crc32(name.encode()) % _FLOOR_BUCKETS

    def history_from(self, stream: str, epoch: str, offset: int) -> list[StreamMessage]:
        if epoch != self.epoch:
            raise HistoryError(f"unknown epoch {epoch!r}")
        s = self._streams.get(stream)
        if s is None:
            raise HistoryError("stream not found")
        if offset > s.offset:
            raise HistoryError("offset not found (ahead of the stream)")
        if offset == s.offset:
            return []
        if not s.entries:
            raise HistoryError("stream history has expired")
        low = s.low
        # Relaxed rule (DESIGN.md): reject only when a message after `offset` is gone.
        if offset + 1 < low:
            raise HistoryError("offset not found (messages after it have expired)")
        return s.messages(offset + 1 - low, self.epoch)

    def history_since(self, stream: str, since: int) -> list[StreamMessage]:
        s = self._streams.get(stream)
        if s is None:
            return []
        for start, (_, ts, _) in enumerate(s.entries):
            if ts >= since:
                return s.messages(start, self.epoch)
        return []

    # ------------------------------------------------------------------ sessions
    def commit_session(self, sid: str, snapshot: bytes) -> None:
        if not self.supports_sessions:
            return
        deadline = self.clock() + self.sessions_ttl
        entry = self._sessions.get(sid)
        if entry is None:
            self._sessions[sid] = _Session(snapshot, deadline)
            heapq.heappush(self._session_timers, (deadline, sid))
        else:
            # one timer per sid: the sweeper re-queues it while the deadline moves on
            entry.snapshot = snapshot
            entry.deadline = deadline

    def take_session(self, sid: str) -> bytes | None:
        entry = self._sessions.pop(sid, None)
        if entry is None:
            return None
        if entry.deadline < self.clock():
            return None
        return entry.snapshot

    def touch_sessions(self, sids: Iterable[str]) -> None:
        if not self.supports_sessions:
            return
        _extend(self._sessions, sids, self.clock() + self.sessions_ttl)

    # ------------------------------------------------------------------ presence
    def presence_join(self, stream: str, sid: str, pid: str, info: object) -> PresenceEvent | None:
        deadline = self.clock() + self.presence_ttl
        session = self._presence_sessions.get(sid)
        if session is not None:
            held = session.streams.get(stream)
            if held is not None and held != pid:
                raise BrokerError(f"session is already present in this stream as {held!r}")
        members = self._presence.get(stream)
        if members is None:
            members = self._presence[stream] = {}
        if session is None:
            session = self._presence_sessions[sid] = _PresenceSession(deadline)
            heapq.heappush(self._presence_timers, (deadline, sid))
        else:
            # a join is a sign of life too (the timer already queued follows the deadline)
            session.deadline = max(session.deadline, deadline)
        session.streams[stream] = pid
        present = members.get(pid)
        if present is None:
            present = members[pid] = _Present(info)
            present.sids[sid] = None
            return PresenceEvent(PRESENCE_JOIN, pid, info)
        present.info = info  # the latest join's info wins
        present.sids[sid] = None
        return None

    def presence_leave(self, stream: str, sid: str) -> PresenceEvent | None:
        session = self._presence_sessions.get(sid)
        pid = session.streams.pop(stream, None) if session is not None else None
        if session is None or pid is None:
            raise BrokerError("session is not present in this stream")
        # An entry left without streams stays until its deadline: its one timer removes it
        # (dropping it now would leave that timer behind for a new entry of the same sid).
        return self._drop_presence(stream, pid, sid)

    def _drop_presence(self, stream: str, pid: str, sid: str) -> PresenceEvent | None:
        """Remove ``sid`` from ``pid`` in ``stream``; the leave event if ``pid`` is gone."""
        members = self._presence.get(stream)
        present = members.get(pid) if members is not None else None
        if members is None or present is None:
            return None
        present.sids.pop(sid, None)
        if present.sids:
            return None
        del members[pid]
        if not members:
            del self._presence[stream]
        return PresenceEvent(PRESENCE_LEAVE, pid)

    def presence_info(self, stream: str) -> PresenceInfo:
        members = self._presence.get(stream)
        if not members:
            return PresenceInfo()
        return PresenceInfo(len(members), [(pid, present.info) for pid, present in members.items()])

    def touch_presence(self, sids: Iterable[str]) -> None:
        _extend(self._presence_sessions, sids, self.clock() + self.presence_ttl)

    # ------------------------------------------------------------------ expiry
    def sweep(self) -> None:
        """Expire old messages, idle streams, stale sessions and presence (called every second)."""
        now = self.clock()
        self._sweep_streams(now)
        self._sweep_sessions(now)
        self._sweep_presence(now)

    def _sweep_streams(self, now: float) -> None:
        timers = self._stream_timers
        while timers and timers[0][0] <= now:
            _, name = heapq.heappop(timers)
            s = self._streams.get(name)
            if s is None:
                continue
            entries = s.entries
            cutoff = now - s.ttl
            while entries and entries[0][1] < cutoff:
                entries.popleft()
            if entries:
                heapq.heappush(timers, (entries[0][1] + s.ttl + 1, name))
            elif s.deadline <= now:
                del self._streams[name]
                bucket = self._bucket(name)
                if s.offset > self._floors[bucket]:
                    self._floors[bucket] = s.offset
            else:
                heapq.heappush(timers, (s.deadline, name))

    def _sweep_sessions(self, now: float) -> None:
        _pop_expired(self._session_timers, self._sessions, now)

    def _sweep_presence(self, now: float) -> None:
        left: list[tuple[str, PresenceEvent]] = []
        for sid, entry in _pop_expired(self._presence_timers, self._presence_sessions, now):
            for stream, pid in entry.streams.items():
                event = self._drop_presence(stream, pid, sid)
                if event is not None:
                    left.append((stream, event))
        # handed out only once the state is consistent: the handler may yield
        handler = self.presence_handler
        if handler is not None:
            for stream, event in left:
                handler(stream, event)

    def stats(self) -> dict[str, int]:
        return {
            "streams": len(self._streams),
            "messages": sum(len(s.entries) for s in self._streams.values()),
            "sessions": len(self._sessions),
            "presence_streams": len(self._presence),
            "presence_sessions": len(self._presence_sessions),
        }
