"""The composition root: builds one worker's object graph and orders its lifecycle.

The only module that imports concrete backends (through the registries and
:func:`anycable_gevent.backends.load`). Constructors do no I/O: :meth:`Graph.start`
connects, in dependency order (pub/sub, broker, controller, hub, node, broadcasters), and
:meth:`Graph.shutdown` stops in reverse, with the pub/sub last of all so that nothing a
broadcaster accepted is lost before it is fanned out (anycable-go's order).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from anycable_gevent import broadcast, broker, pubsub
from anycable_gevent.backends import load
from anycable_gevent.broadcast.base import Broadcaster
from anycable_gevent.broker.base import Broker
from anycable_gevent.config import Config
from anycable_gevent.controllers import build_controller
from anycable_gevent.controllers.base import Controller
from anycable_gevent.hub import Hub
from anycable_gevent.listeners import BROADCAST, HEALTH, METRICS, Listen
from anycable_gevent.metrics import Metrics, parse_tags
from anycable_gevent.node import Node
from anycable_gevent.pubsub.base import PubSub
from anycable_gevent.redis_client import RedisConnector
from anycable_gevent.web import Dispatcher, health_app, metrics_app
from anycable_gevent.ws import CableEndpoint

log = logging.getLogger("anycable_gevent.main")


@dataclass
class Graph:
    cfg: Config
    metrics: Metrics
    redis: RedisConnector | None
    hub: Hub
    pubsub: PubSub
    broker: Broker
    controller: Controller
    node: Node
    endpoint: CableEndpoint
    broadcasters: list[Broadcaster]
    dispatchers: dict[int, Dispatcher] = field(default_factory=dict)

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        self.pubsub.start()
        self.broker.start()
        self.controller.start()
        self.hub.start()
        self.node.start()
        for b in self.broadcasters:
            b.start()

    def announce(self) -> list[str]:
        """The component lines of the startup banner."""
        lines = [self.broker.announce(), self.pubsub.announce(), f"controller: {self.controller.announce()}"]
        lines += [b.announce() for b in self.broadcasters]
        return lines

    def problems(self) -> list[str]:
        """What does not work right now (``/health`` answers 503 while this is not empty)."""
        checks = [self.pubsub.healthy, self.broker.healthy, *(b.healthy for b in self.broadcasters)]
        return [problem for problem in (check() for check in checks) if problem]

    def shutdown(self, deadline: float, restorable: bool = False) -> None:
        """Stop taking publications, close the connections (``restorable``: with a close
        frame only, so that clients restore their sessions elsewhere), drain, then
        release every client."""
        for b in self.broadcasters:
            b.shutdown()
        self.node.shutdown(deadline, restorable)
        self.controller.shutdown(max(deadline - time.monotonic(), 0.0))
        self.broker.shutdown()
        self.hub.shutdown()
        self.pubsub.shutdown()
        if self.redis is not None:
            self.redis.shutdown()


def build(cfg: Config, ports: dict[int, Listen], metrics: Metrics) -> Graph:
    """Every component of one worker, wired but not started."""
    redis = RedisConnector(cfg) if cfg.uses_redis else None
    hub = Hub()
    the_pubsub: PubSub = load(pubsub.BACKENDS[cfg.pubsub_adapter]).from_config(cfg, metrics, redis)  # type: ignore[attr-defined]
    the_broker: Broker = load(broker.BACKENDS[cfg.broker]).from_config(cfg, metrics, redis)  # type: ignore[attr-defined]
    the_broker.broadcaster = the_pubsub
    controller = build_controller(cfg, metrics)
    node = Node(cfg, controller, the_broker, hub, the_pubsub, metrics)
    the_pubsub.bind(node)
    endpoint = CableEndpoint(cfg, node, metrics)
    broadcasters: list[Broadcaster] = [
        load(broadcast.BACKENDS[name])(cfg, node, metrics, redis) for name in cfg.broadcast_adapter
    ]
    graph = Graph(cfg, metrics, redis, hub, the_pubsub, the_broker, controller, node, endpoint, broadcasters)
    graph.dispatchers = _dispatchers(graph, ports)
    return graph


def _dispatchers(graph: Graph, ports: dict[int, Listen]) -> dict[int, Dispatcher]:
    cfg = graph.cfg
    broadcast_routes: dict[str, Any] = {}
    for b in graph.broadcasters:
        broadcast_routes.update(b.routes())
    out = {}
    for port, listen in ports.items():
        routes: dict[str, Any] = {}
        for path, kind in listen.routes.items():
            if kind == HEALTH:
                routes[path] = health_app(graph.problems)
            elif kind == BROADCAST:
                routes[path] = broadcast_routes[path]
            elif kind == METRICS:
                routes[path] = metrics_app(graph.metrics, parse_tags(cfg.metrics_tags))
        out[port] = Dispatcher(routes, listen.ws_paths, graph.endpoint if listen.ws_paths else None)
    return out
