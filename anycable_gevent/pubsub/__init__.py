"""Pub/sub backends by name (data only: see :mod:`anycable_gevent.backends`)."""

from __future__ import annotations

from anycable_gevent.backends import Backend

BACKENDS: dict[str, Backend] = {
    "none": Backend("anycable_gevent.pubsub.base:LocalPubSub"),
    "redis": Backend("anycable_gevent.pubsub.redis:RedisPubSub", multi_node=True, redis=True),
}
