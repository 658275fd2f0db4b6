"""Broker interface: registers broadcasts (offset + epoch), keeps history, sessions and presence.

Concurrency contract: methods are called from any greenlet. The memory backend never
yields inside a call; a networked backend may, and must stay correct when it does.

Presence (SPEC §4.8, §5.4): the broker keeps, per presence stream, who is present (a
presence id, shared by every session of one user) and which sessions hold each id. It
returns the join/leave events that commands cause and never broadcasts anything itself;
the leave events of sessions whose presence expired are handed to
:attr:`Broker.presence_handler`, set by the node, which broadcasts them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.protocol import PresenceEvent, PresenceInfo, StreamMessage

#: Receives ``(presence stream, leave event)`` for presence that expired.
PresenceHandler = Callable[[str, PresenceEvent], None]


class Broker(ABC):
    #: The broker's epoch, stamped on every registered message.
    epoch: str = ""
    #: Whether session snapshots are kept for restore.
    supports_sessions: bool = True
    #: Whether presence sets are kept.
    supports_presence: bool = True
    #: Called for every leave caused by expiry (the node sets it; None = nobody listens).
    presence_handler: PresenceHandler | None = None

    def start(self) -> None:
        """Start background work (expiry)."""

    def shutdown(self) -> None:
        """Stop background work."""

    @abstractmethod
    def announce(self) -> str:
        """One line with the effective settings, for the startup banner."""

    @abstractmethod
    def register(self, msg: StreamMessage) -> None:
        """Assign the next offset and the epoch to a non-transient message and store it."""

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
        """Keep these sessions' presence for another ``presence_ttl`` (connected, or just gone)."""

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
