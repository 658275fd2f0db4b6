"""Broadcaster interface: how publications from the application come in.

A *single-node* broadcaster (HTTP, ``redisx``) hands each publication to exactly one
node of the cluster, which registers it once in the broker (offset, epoch, history) and
publishes it to every node through pub/sub. A *fan-out* broadcaster (legacy Redis
pub/sub) delivers each publication to every node itself, so it must not go through the
broker: those messages are delivered locally, without offsets (as anycable-go does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from anycable_gevent.component import Component
from anycable_gevent.protocol import Publication

if TYPE_CHECKING:
    from anycable_gevent.config import Config
    from anycable_gevent.metrics import Metrics
    from anycable_gevent.redis_client import RedisConnector

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Handler(Protocol):
    """What a broadcaster hands publications to (the node)."""

    def handle_publication(self, publication: Publication) -> None:
        """Only this node got it: register once and publish to every node.

        Raises:
            BrokerError: the broker or pub/sub failed; the publication is not accepted.
        """

    def handle_fanout(self, publication: Publication) -> None:
        """Every node got it: deliver it to this node's clients only."""


class Broadcaster(Component):
    #: every node receives each publication (no broker: no offsets, no history)
    is_fanout: ClassVar[bool] = False

    def __init__(self, cfg: Config, handler: Handler, metrics: Metrics, redis: RedisConnector | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self.metrics = metrics
        self.redis = redis

    def routes(self) -> Mapping[str, WSGIApp]:
        """WSGI apps by path that this broadcaster serves on its port (HTTP only)."""
        return {}
