"""The lifecycle every backend shares (brokers, pub/subs, broadcasters).

The composition root (:mod:`anycable_gevent.graph`) starts the components in dependency
order, prints each one's :meth:`Component.announce` line in the banner, asks each whether
it is :meth:`Component.healthy` for ``/health``, and shuts them down in reverse order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Component(ABC):
    def start(self) -> None:
        """Start background work (connections, listeners, expiry); no-op by default."""

    def shutdown(self) -> None:
        """Stop background work; what was already accepted is handled first."""

    @abstractmethod
    def announce(self) -> str:
        """One line with the effective settings, for the startup banner."""

    def healthy(self) -> str | None:
        """``None`` when working, else what is wrong (``/health`` answers 503 naming it)."""
        return None
