"""Brokers by name (data only: see :mod:`anycable_gevent.backends`)."""

from __future__ import annotations

from anycable_gevent.backends import Backend

BACKENDS: dict[str, Backend] = {
    "none": Backend("anycable_gevent.broker.base:NullBroker"),
    "memory": Backend("anycable_gevent.broker.memory:MemoryBroker"),
    "redis": Backend("anycable_gevent.broker.redis:RedisBroker", multi_node=True, redis=True),
}
