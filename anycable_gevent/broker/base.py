"""Broker interface: registers broadcasts (offset + epoch), keeps history and sessions.

Concurrency contract: methods are called from any greenlet. The memory backend never
yields inside a call; a networked backend may, and must stay correct when it does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

from anycable_gevent.errors import HistoryError
from anycable_gevent.protocol import StreamMessage


class Broker(ABC):
    #: The broker's epoch, stamped on every registered message.
    epoch: str = ""
    #: Whether history requests can be served at all.
    supports_history: bool = True
    #: Whether session snapshots are kept for restore.
    supports_sessions: bool = True

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

    @abstractmethod
    def take_session(self, sid: str) -> bytes | None:
        """Remove and return a live snapshot: a sid restores at most once."""

    @abstractmethod
    def touch_sessions(self, sids: Iterable[str]) -> None:
        """Extend the expiry of these snapshots (connected sessions)."""

    def stats(self) -> dict[str, int]:
        return {}


class NullBroker(Broker):
    """``--broker=none``: no offsets, no history (``reject_history``), nothing to restore."""

    supports_history = False
    supports_sessions = False

    def announce(self) -> str:
        return "broker: none (no history, no resumable sessions)"

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
