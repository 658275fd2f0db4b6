"""Pings: one ticker per interval for the whole worker, one frame built per tick.

Connections that asked for their own interval (``?pi=``) or timestamp precision
(``?ptp=``) get a bucket of their own; the default bucket holds everybody else. With
``--pong_timeout`` the ticker also arms a pong deadline for connections that must
answer (extended protocol, or native pings) and checks it once per tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import gevent

from anycable_gevent import protocol
from anycable_gevent.session import Session
from anycable_gevent.ticker import every

log = logging.getLogger(__name__)

_PRECISION = {"s": 1, "ms": 1000, "ns": 1_000_000_000}


def timestamp(precision: str) -> int:
    if precision == "ns":
        return time.time_ns()
    return int(time.time() * _PRECISION.get(precision, 1))


class Bucket:
    __slots__ = ("interval", "precision", "sessions", "ticker")

    def __init__(self, interval: float, precision: str) -> None:
        self.interval = interval
        self.precision = precision
        self.sessions: dict[Session, None] = {}
        self.ticker: gevent.Greenlet | None = None


class Pinger:
    def __init__(
        self,
        interval: float,
        precision: str,
        pong_timeout: float,
        native: bool,
        on_no_pong: Callable[[Session], None],
    ) -> None:
        self.interval = interval
        self.precision = precision
        self.pong_timeout = pong_timeout
        self.native = native
        self.on_no_pong = on_no_pong
        self.buckets: dict[tuple[float, str], Bucket] = {}
        self._native_frame = protocol.ws_frame(b"", protocol.OP_PING)

    def add(self, session: Session, interval: float | None = None, precision: str | None = None) -> None:
        key = (interval if interval is not None else self.interval, precision or self.precision)
        if key[0] <= 0:
            return  # ?pi=0: no pings for this connection
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(*key)
            bucket.ticker = every(bucket.interval, partial(self.tick, bucket), "ping tick")
        bucket.sessions[session] = None
        session.ping_bucket = bucket

    def remove(self, session: Session) -> None:
        bucket = session.ping_bucket
        if bucket is None:
            return
        session.ping_bucket = None
        bucket.sessions.pop(session, None)
        if not bucket.sessions and (bucket.interval, bucket.precision) != (self.interval, self.precision):
            # a custom interval nobody uses any more
            if bucket.ticker is not None:
                bucket.ticker.kill(block=False)
            self.buckets.pop((bucket.interval, bucket.precision), None)

    def shutdown(self) -> None:
        for bucket in self.buckets.values():
            if bucket.ticker is not None:
                bucket.ticker.kill(block=False)
        self.buckets.clear()

    def tick(self, bucket: Bucket) -> None:
        if not bucket.sessions:
            return
        frame = protocol.text_frame(protocol.ping(timestamp(bucket.precision)))
        native = self._native_frame if self.native else None
        enforce = self.pong_timeout > 0
        now = time.monotonic()
        for session in tuple(bucket.sessions):
            session.write(frame)
            if native is not None:
                session.write(native)
            if enforce and (session.ext or self.native) and not session.awaiting_pong:
                session.awaiting_pong = now
        if enforce:
            gevent.spawn_later(self.pong_timeout, self._check_pongs, bucket, now)

    def _check_pongs(self, bucket: Bucket, armed_before: float) -> None:
        for session in tuple(bucket.sessions):
            since = session.awaiting_pong
            if since and since <= armed_before:
                self.on_no_pong(session)
