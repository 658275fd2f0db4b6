"""Redis pub/sub between workers and nodes: one dedicated connection, one listener greenlet.

Channels (``redis_client.Keys``): one per stream (``P{stream}:c``), subscribed while this
worker has a local subscriber of the stream (the node calls :meth:`RedisPubSub.subscribe`
on the first and :meth:`RedisPubSub.unsubscribe` after the last); the internal channel of
remote commands; and this worker's own channel, used by the liveness probe.

* **Writes** of SUBSCRIBE/UNSUBSCRIBE go through one flusher greenlet that sends the
  difference between what the node wants and what was asked of the current connection,
  in batches of :data:`BATCH` channels, so a burst of subscriptions (a reconnect storm,
  a restore of thousands of sessions) costs a few commands, not one per stream.
* **Reads**: the listener hands every message to the node (which never blocks on it: the
  gap repair and the hub take it without waiting). A message that cannot be decoded is
  counted (``failed_broadcast_msg_total``) and dropped.
* **Failures**: after any error the listener reconnects with capped, jittered backoff and
  subscribes everything again; once confirmed, the node is told (``handle_resubscribed``)
  so that it repairs what it may have missed. ``healthy()`` names the problem meanwhile.
* **Liveness**: a connection can stay open and deaf (a failover, a proxy that lost its
  upstream). When nothing arrived for a keepalive interval, the worker publishes a
  probe to its own channel; when that does not come back within another interval, the
  connection is dropped and made again (``--redis_keepalive_interval``).
* **Waiting for confirmation**: :meth:`RedisPubSub.wait_subscribed` blocks a caller until
  the subscriptions of some streams are confirmed, so that history read afterwards
  leaves no window between the history and the live feed.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Collection
from typing import Any

import gevent
from gevent.event import Event

from anycable_gevent import protocol
from anycable_gevent.backoff import Backoff
from anycable_gevent.config import Config
from anycable_gevent.errors import BrokerError, ProtocolError
from anycable_gevent.log import Throttle
from anycable_gevent.metrics import Metrics
from anycable_gevent.protocol import RemoteCommand, StreamMessage
from anycable_gevent.pubsub.base import PubSub
from anycable_gevent.redis_client import RedisConnector, close_quietly, describe_error

log = logging.getLogger("anycable_gevent.pubsub")

#: Channels per SUBSCRIBE / UNSUBSCRIBE command.
BATCH = 256
PROBE = b"probe"


class RedisPubSub(PubSub):
    is_multi_node = True

    def __init__(self, redis: RedisConnector, metrics: Metrics, name: str = "", keepalive: float = 15.0) -> None:
        self.redis = redis
        #: seconds of silence before a probe (and again before giving the connection up)
        self.keepalive = keepalive
        self.keys = redis.keys
        self.metrics = metrics
        #: this worker's name in Redis (its probe channel)
        self.name = name or secrets.token_hex(3)
        self.node_channel = self.keys.node(f"{self.name}-{os.getpid()}-{secrets.token_hex(2)}").encode()
        self.internal = self.keys.internal.encode()
        #: streams this worker wants, and their channel names
        self.desired: dict[str, bytes] = {}
        #: channels asked of the current connection, and those it confirmed
        self.requested: set[bytes] = set()
        self.confirmed: set[bytes] = set()
        self._conn: Any = None
        self._changed = Event()  # set (and replaced) whenever confirmations change
        self._wake = Event()
        self._listener: gevent.Greenlet | None = None
        self._flusher: gevent.Greenlet | None = None
        self._problem: str | None = "connecting"
        self._errors = Throttle(log, 10.0)
        for name in ("pubsub_reconnects_total",):
            metrics.counters.setdefault(name, 0)

    @classmethod
    def from_config(cls, cfg: Config, metrics: Metrics, redis: RedisConnector | None) -> RedisPubSub:
        if redis is None:
            raise ValueError("the Redis pub/sub needs a RedisConnector")
        return cls(redis, metrics, cfg.node_id, cfg.redis_keepalive_interval)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._listener is None:
            self._listener = gevent.spawn(self._run)
            self._flusher = gevent.spawn(self._flush_loop)

    def shutdown(self) -> None:
        for g in (self._flusher, self._listener):
            if g is not None:
                g.kill(block=False)
        self._listener = self._flusher = None
        self._drop_connection()

    def announce(self) -> str:
        return f"pubsub: redis at {self.redis.describe()} (channels prefixed {self.keys.prefix!r})"

    def healthy(self) -> str | None:
        if self._problem is None:
            return None
        return f"redis pubsub ({self.redis.describe()}): {self._problem}"

    # ------------------------------------------------------------------ publishing
    def broadcast(self, msg: StreamMessage) -> None:
        self._publish(self.keys.channel(msg.stream).encode(), protocol.encode_pubsub(msg))

    def broadcast_command(self, cmd: RemoteCommand) -> None:
        self._publish(self.internal, protocol.encode_pubsub_command(cmd))

    def _publish(self, channel: bytes, payload: bytes) -> None:
        try:
            self.redis.client.publish(channel, payload)
        except Exception as exc:  # redis-py errors, sockets: the caller answers 503
            raise BrokerError(f"redis pubsub ({self.redis.describe()}): {exc}") from None

    # ------------------------------------------------------------------ subscriptions
    def subscribe(self, stream: str) -> None:
        if stream not in self.desired:
            self.desired[stream] = self.keys.channel(stream).encode()
            self._wake.set()

    def unsubscribe(self, stream: str) -> None:
        # The channel stays confirmed until the flusher sends its UNSUBSCRIBE (which drops
        # the confirmation): a subscriber of the stream arriving before that (the last one
        # left and a new one came within a loop turn) needs no new one, and would never get
        # one, since the flusher then sends nothing. It had waited SUBSCRIBE_WAIT (5 s).
        if self.desired.pop(stream, None) is not None:
            self._wake.set()

    def wait_subscribed(self, streams: Collection[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            missing = [s for s in streams if self.desired.get(s) not in self.confirmed]
            if not missing:
                return True
            if self._problem is not None and self._problem != "connecting" and self._conn is None:
                return False  # Redis is away: nobody gains by waiting (resubscribed on return)
            left = deadline - time.monotonic()
            if left <= 0:
                # live messages of these streams may be missed until Redis confirms (the
                # gap is repaired from the broker), and the caller was kept waiting
                self._errors.warning(
                    "redis pubsub did not confirm subscriptions in %gs streams=%d connected=%s",
                    timeout,
                    len(missing),
                    self._conn is not None,
                )
                return False
            self._changed.wait(left)

    def _notify(self) -> None:
        changed, self._changed = self._changed, Event()
        changed.set()

    def _wanted(self) -> set[bytes]:
        return {self.internal, self.node_channel, *self.desired.values()}

    def _flush_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            conn = self._conn
            if conn is None:
                continue
            try:
                self._flush(conn)
            except Exception as exc:  # the listener sees the broken connection and reconnects
                log.debug("pub/sub subscription update failed error=%s", exc)

    def _flush(self, conn: Any) -> None:
        wanted = self._wanted()
        gone = sorted(self.requested - wanted)
        new = sorted(wanted - self.requested)
        for i in range(0, len(gone), BATCH):
            batch = gone[i : i + BATCH]
            self.requested.difference_update(batch)
            self.confirmed.difference_update(batch)
            conn.send_command("UNSUBSCRIBE", *batch)
        for i in range(0, len(new), BATCH):
            batch = new[i : i + BATCH]
            self.requested.update(batch)
            conn.send_command("SUBSCRIBE", *batch)

    # ------------------------------------------------------------------ listening
    def _run(self) -> None:
        backoff = Backoff(0.25, 10.0)
        first = True
        while True:
            try:
                self._connect()
                backoff.reset()
                if not first:
                    self.metrics.counters["pubsub_reconnects_total"] += 1
                self._listen(resubscribing=True)
            except gevent.GreenletExit:
                raise
            except Exception as exc:
                self._problem = describe_error(exc)
                self._errors.warning(
                    "redis pubsub connection lost, reconnecting target=%s error=%s", self.redis.describe(), exc
                )
            self._drop_connection()
            first = False
            gevent.sleep(backoff.next())

    def _connect(self) -> None:
        conn = self.redis.dedicated(socket_timeout=None, role="pubsub")
        conn.connect()
        self.requested = set()
        self.confirmed = set()
        self._conn = conn
        self._wake.set()  # the flusher subscribes everything on the new connection

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self.requested = set()
        self.confirmed = set()
        self._notify()
        close_quietly(conn, "the pub/sub connection")

    def _listen(self, resubscribing: bool) -> None:
        conn = self._conn
        probed_at = 0.0
        while True:
            if not conn.can_read(timeout=self.keepalive):
                if probed_at:
                    raise ConnectionError(f"no answer to a probe for {self.keepalive:g}s (connection deaf)")
                probed_at = time.monotonic()
                try:
                    self.redis.client.publish(self.node_channel, PROBE)
                except Exception as exc:
                    raise ConnectionError(f"probe not sent: {exc}") from None
                continue
            probed_at = 0.0
            reply = conn.read_response()
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            kind, channel, data = reply[0], reply[1], reply[2]
            if kind == b"message":
                self._message(channel, data)
            elif kind == b"subscribe":
                if channel in self.requested:
                    self.confirmed.add(channel)
                    self._notify()
                if resubscribing and self._wanted() <= self.confirmed:
                    resubscribing = False
                    self._problem = None
                    self.handler.handle_resubscribed(list(self.desired))
            elif kind == b"unsubscribe":
                if channel not in self.requested:
                    self.confirmed.discard(channel)

    def _message(self, channel: bytes, data: bytes) -> None:
        if channel == self.node_channel:
            return  # our probe: the connection hears
        try:
            msg = protocol.decode_pubsub(data)
        except ProtocolError as exc:
            self.metrics.inc("failed_broadcast_msg_total")
            self._errors.warning("invalid pub/sub message dropped error=%s", exc)
            return
        try:
            if isinstance(msg, RemoteCommand):
                self.handler.handle_remote_command(msg)
            else:
                self.handler.handle_pubsub(msg)
        except Exception:  # one bad message must not take the listener down
            self._errors.error("handling a pub/sub message failed", exc_info=True)
