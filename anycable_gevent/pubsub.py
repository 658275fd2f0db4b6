"""Pub/sub between workers and nodes: the last hop of every broadcast.

Broadcaster → broker (registers once) → pub/sub → every worker's hub. With one worker
and no Redis the pub/sub is an in-process loopback (:class:`LocalPubSub`), so there is
exactly one delivery path in every setup.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from anycable_gevent.protocol import RemoteCommand, StreamMessage


class Handler(Protocol):
    """Who receives what comes out of pub/sub (the node)."""

    def handle_pubsub(self, msg: StreamMessage) -> None: ...

    def handle_remote_command(self, cmd: RemoteCommand) -> None: ...


class PubSub(ABC):
    def start(self) -> None:
        """Connect and start listening."""

    def shutdown(self) -> None:
        """Stop listening (last of all components, so nothing accepted is lost)."""

    @abstractmethod
    def announce(self) -> str: ...

    @abstractmethod
    def broadcast(self, msg: StreamMessage) -> None:
        """Deliver a registered message to every worker and node."""

    @abstractmethod
    def broadcast_command(self, cmd: RemoteCommand) -> None:
        """Deliver a remote command to every worker and node."""

    def subscribe(self, stream: str) -> None:
        """This worker has its first subscriber of ``stream``."""

    def unsubscribe(self, stream: str) -> None:
        """This worker has no subscriber of ``stream`` any more."""


class LocalPubSub(PubSub):
    """One process: pub/sub is a direct call."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def announce(self) -> str:
        return "pubsub: none (single process)"

    def broadcast(self, msg: StreamMessage) -> None:
        self.handler.handle_pubsub(msg)

    def broadcast_command(self, cmd: RemoteCommand) -> None:
        self.handler.handle_remote_command(cmd)
