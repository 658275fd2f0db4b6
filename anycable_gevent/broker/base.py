"""Broker interface: registers broadcasts (offset + epoch), keeps history, sessions and presence.

The broker owns publication: :meth:`Broker.publish` registers each message (the next
offset of its stream, the stream's epoch, stored in its history) and hands it to the
pub/sub, in one step, so that the node never knows which backend it has. The Redis
broker does both in one Lua call per message; the others register in memory and call
the pub/sub.

Epochs: an offset means one message, forever, within an epoch. Every message carries
the epoch of its stream (the memory broker has one per process; the Redis broker one per
stream, kept in Redis beside the stream's counter). A new epoch starts when a stream's
counter is gone; clients asking for positions of another epoch get ``reject_history``.

Concurrency contract: methods are called from any greenlet. The memory backend never
yields inside a call; a networked backend may, and must stay correct when it does.
Every method raises :class:`~anycable_gevent.errors.BrokerError` (never an error of a
client library) when the store fails.

Presence (SPEC §4.8, §5.4): the broker keeps, per presence stream, who is present (a
presence id, shared by every session of one user) and which sessions hold each id. It
returns the join/leave events that commands cause and never broadcasts anything itself;
the leave events of sessions whose presence expired are handed to
:attr:`Broker.presence_handler`, set by the node, which broadcasts them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Protocol

from anycable_gevent.component import Component
from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.protocol import PresenceEvent, PresenceInfo, StreamMessage

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.redis_client import RedisConnector

#: Receives ``(presence stream, leave event)`` for presence that expired.
PresenceHandler = Callable[[str, PresenceEvent], None]


class Broadcaster(Protocol):
    """Where the broker hands registered messages (the pub/sub)."""

    @property
    def is_multi_node(self) -> bool: ...

    def broadcast(self, msg: StreamMessage) -> None: ...


class Broker(Component):
    #: Where :meth:`publish` sends messages (set by the composition root before start).
    broadcaster: Broadcaster
    #: Whether session snapshots are kept for restore.
    supports_sessions: bool = True
    #: Whether presence sets are kept.
    supports_presence: bool = True
    #: Called for every leave caused by expiry (the node sets it; None = nobody listens).
    presence_handler: PresenceHandler | None = None

    @classmethod
    def from_config(cls, cfg: Config, metrics: Metrics, redis: RedisConnector | None) -> Broker:
        """Construct from the configuration (no I/O)."""
        return cls()

    def publish(self, msgs: list[StreamMessage]) -> None:
        """Register every non-transient message, then hand all of them to the pub/sub, in order.

        Raises:
            BrokerError: nothing of it can be promised to have been delivered.
        """
        for msg in msgs:
            self.register(msg)
        broadcast = self.broadcaster.broadcast
        for msg in msgs:
            broadcast(msg)

    @abstractmethod
    def register(self, msg: StreamMessage) -> None:
        """Assign the next offset and the epoch to a non-transient message and store it."""

    @abstractmethod
    def peaks(self, streams: Collection[str]) -> dict[str, tuple[str, int]]:
        """The ``(epoch, last offset)`` of each stream that has a counter (for gap repair)."""

    @abstractmethod
    def history_from(self, stream: str, epoch: str, offset: int) -> list[StreamMessage]:
        """Messages after ``offset``, oldest first.

        Raises:
            HistoryError: unknown epoch or stream, or messages after ``offset`` are gone.
        """

    @abstractmethod
    def history_since(self, stream: str, since: int) -> list[StreamMessage]:
        """Messages registered at or after ``since`` (Unix seconds), oldest first."""

    @abstractmethod
    def commit_session(self, sid: str, snapshot: bytes) -> None:
        """Store (or replace) a session snapshot; it expires ``sessions_ttl`` after its last touch."""

    def commit_sessions(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Store several ``(sid, snapshot)`` at once (the node batches its commits)."""
        for sid, snapshot in items:
            self.commit_session(sid, snapshot)

    @abstractmethod
    def take_session(self, sid: str) -> bytes | None:
        """Remove and return a live snapshot: a sid restores at most once."""

    @abstractmethod
    def touch_sessions(self, sids: Iterable[str]) -> None:
        """Extend the expiry of these snapshots (connected sessions)."""

    @abstractmethod
    def presence_join(self, stream: str, sid: str, pid: str, info: object) -> PresenceEvent | None:
        """Add session ``sid`` to presence id ``pid`` of ``stream``; ``info`` replaces the id's info.

        Returns:
            The join event when ``pid`` was not present before, else None.

        Raises:
            BrokerError: the session is already present in ``stream`` under another id,
                or the broker keeps no presence.
        """

    @abstractmethod
    def presence_leave(self, stream: str, sid: str) -> PresenceEvent | None:
        """Remove session ``sid`` from the presence of ``stream``.

        Returns:
            The leave event when it was the last session of its presence id, else None.

        Raises:
            BrokerError: the session is not present in ``stream``, or the broker keeps no presence.
        """

    @abstractmethod
    def presence_info(self, stream: str) -> PresenceInfo:
        """Who is present in ``stream`` (an unknown stream has nobody).

        Raises:
            BrokerError: the broker keeps no presence.
        """

    @abstractmethod
    def touch_presence(self, sids: Iterable[str]) -> None:
        """Keep these connected sessions' presence for another ``presence_ttl``."""

    def release_presence(self, sids: Iterable[str]) -> None:
        """These sessions are gone: their presence stays ``presence_ttl`` from now, then
        expires (with leave events), unless they come back and join again."""
        self.touch_presence(sids)

    def stats(self) -> dict[str, int]:
        return {}


class NullBroker(Broker):
    """``--broker=none``: no offsets, no history (``reject_history``), nothing to restore, no presence."""

    supports_sessions = False
    supports_presence = False

    def announce(self) -> str:
        return "broker: none (no history, no resumable sessions, no presence)"

    def register(self, msg: StreamMessage) -> None:
        return None

    def peaks(self, streams: Collection[str]) -> dict[str, tuple[str, int]]:
        return {}

    def history_from(self, stream: str, epoch: str, offset: int) -> list[StreamMessage]:
        raise HistoryError("history is not supported by --broker=none")

    def history_since(self, stream: str, since: int) -> list[StreamMessage]:
        raise HistoryError("history is not supported by --broker=none")

    def commit_session(self, sid: str, snapshot: bytes) -> None:
        return None

    def take_session(self, sid: str) -> bytes | None:
        return None

    def touch_sessions(self, sids: Iterable[str]) -> None:
        return None

    def presence_join(self, stream: str, sid: str, pid: str, info: object) -> PresenceEvent | None:
        raise BrokerError("presence is not supported by --broker=none")

    def presence_leave(self, stream: str, sid: str) -> PresenceEvent | None:
        raise BrokerError("presence is not supported by --broker=none")

    def presence_info(self, stream: str) -> PresenceInfo:
        raise BrokerError("presence is not supported by --broker=none")

    def touch_presence(self, sids: Iterable[str]) -> None:
        return None
