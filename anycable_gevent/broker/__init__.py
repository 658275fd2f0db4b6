"""Brokers by name; constructed from the configuration in one place."""

from __future__ import annotations

from anycable_gevent.broker.base import Broker, NullBroker
from anycable_gevent.config import Config


def build_broker(cfg: Config) -> Broker:
    if cfg.broker == "memory":
        from anycable_gevent.broker.memory import MemoryBroker

        return MemoryBroker(
            history_limit=cfg.history_limit,
            history_ttl=cfg.history_ttl,
            sessions_ttl=cfg.sessions_ttl,
            presence_ttl=cfg.presence_ttl,
        )
    return NullBroker()
