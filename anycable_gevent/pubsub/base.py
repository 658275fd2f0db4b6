"""Pub/sub between workers and nodes: the last hop of every broadcast.

Broadcaster → broker (registers once) → pub/sub → every worker's node → hub. With one
worker and no Redis the pub/sub is an in-process loopback (:class:`LocalPubSub`), so
there is exactly one delivery path in every setup.

Concurrency contract: ``broadcast``, ``broadcast_command``, ``subscribe`` and
``unsubscribe`` may be called from any greenlet; ``subscribe``/``unsubscribe`` never
yield (they record what this worker wants and return). What arrives is handed to the
:class:`Handler` from the pub/sub's own greenlet, which must never block on it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection
from typing import TYPE_CHECKING, ClassVar, Protocol

from anycable_gevent.component import Component
from anycable_gevent.protocol import RemoteCommand, StreamMessage

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.redis_client import RedisConnector


class Handler(Protocol):
    """Who receives what comes out of pub/sub (the node)."""

    def handle_pubsub(self, msg: StreamMessage) -> None:
        """A message for local delivery (never blocks)."""

    def handle_remote_command(self, cmd: RemoteCommand) -> None:
        """A command for every node (remote disconnect)."""

    def handle_resubscribed(self, streams: Collection[str]) -> None:
        """The pub/sub was away and is back: messages of ``streams`` may have been missed."""


class PubSub(Component):
    #: delivery reaches every process and node (not only this one)
    is_multi_node: ClassVar[bool] = False
    handler: Handler

    @classmethod
    def from_config(cls, cfg: Config, metrics: Metrics, redis: RedisConnector | None) -> PubSub:
        """Construct from the configuration (no I/O)."""
        return cls()

    def bind(self, handler: Handler) -> None:
        """Set the receiver (the node), before :meth:`start`."""
        self.handler = handler

    @abstractmethod
    def broadcast(self, msg: StreamMessage) -> None:
        """Deliver a message to every worker and node.

        Raises:
            BrokerError: it could not be sent (the publication must not be acknowledged).
        """

    @abstractmethod
    def broadcast_command(self, cmd: RemoteCommand) -> None:
        """Deliver a remote command to every worker and node.

        Raises:
            BrokerError: it could not be sent.
        """

    def subscribe(self, stream: str) -> None:
        """This worker has its first subscriber of ``stream``."""

    def unsubscribe(self, stream: str) -> None:
        """This worker has no subscriber of ``stream`` any more."""

    def wait_subscribed(self, streams: Collection[str], timeout: float) -> bool:
        """Block until the pub/sub delivers messages of ``streams`` (their subscriptions are
        confirmed), at most ``timeout`` seconds; False when some are not.

        Reading history before this would leave a window in which a message is in
        neither the history nor the live feed.
        """
        return True


class LocalPubSub(PubSub):
    """One process: pub/sub is a direct call."""

    def announce(self) -> str:
        return "pubsub: none (single process)"

    def broadcast(self, msg: StreamMessage) -> None:
        self.handler.handle_pubsub(msg)

    def broadcast_command(self, cmd: RemoteCommand) -> None:
        self.handler.handle_remote_command(cmd)
