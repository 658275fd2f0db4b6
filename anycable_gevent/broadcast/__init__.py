"""Broadcasters by name (data only: see :mod:`anycable_gevent.backends`)."""

from __future__ import annotations

from anycable_gevent.backends import Backend

BACKENDS: dict[str, Backend] = {
    "http": Backend("anycable_gevent.broadcast.http:HTTPBroadcaster"),
    "redis": Backend("anycable_gevent.broadcast.redis:RedisBroadcaster", fanout=True, redis=True),
    "redisx": Backend("anycable_gevent.broadcast.redisx:RedisStreamBroadcaster", redis=True),
}
