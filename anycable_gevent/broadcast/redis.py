"""Legacy Redis pub/sub broadcaster (``redis``, SPEC §6.4): fan-out, no offsets.

The application publishes with ``PUBLISH <--redis_channel> <publication json>``
(anycable-rails ``broadcast_adapter: redis``); every node (every worker) is subscribed and
delivers what it hears to its own clients. Nothing registers these messages: they get no
offset and no epoch and are not kept in history, even with a history broker, because each
node would register its own copy (anycable-go behaves the same). A message published while
a node is disconnected from Redis is lost for that node's clients (Redis pub/sub is
at-most-once); use ``redisx`` for history, offsets and retries.

Concurrency: one listener greenlet owns one dedicated connection (not pooled) and does
everything on it: SUBSCRIBE, reads, and a PING when the connection has been silent for
``--redis_keepalive_interval`` (a connection can stay open and deaf after a failover or
behind a proxy; no answer within another interval means it is dropped and made again). Each
payload is decoded and handed to :meth:`Handler.handle_fanout` inline; that call only
enqueues to the hub, so the listener never waits on a slow client. After any failure the
listener reconnects with capped, jittered backoff, forever (anycable-go exits after 5
attempts; here the node keeps serving and ``healthy()`` names the problem meanwhile).
"""

from __future__ import annotations

import logging
from typing import Any

import gevent

from anycable_gevent import protocol
from anycable_gevent.backoff import Backoff
from anycable_gevent.broadcast.base import Broadcaster, Handler
from anycable_gevent.config import Config
from anycable_gevent.errors import ProtocolError
from anycable_gevent.log import Throttle
from anycable_gevent.metrics import Metrics
from anycable_gevent.redis_client import RedisConnector, close_quietly, describe_error

log = logging.getLogger("anycable_gevent.broadcast")

#: Reconnect delays: from a quarter second up to this many seconds, jittered.
BACKOFF_CAP = 10.0
#: Counter of lost-and-made-again connections (this server's, not anycable-go's).
RECONNECTS = "broadcast_redis_reconnects_total"


class RedisBroadcaster(Broadcaster):
    """``SUBSCRIBE <--redis_channel>``: publications fanned out to every node."""

    is_fanout = True

    def __init__(self, cfg: Config, handler: Handler, metrics: Metrics, redis: RedisConnector | None = None) -> None:
        super().__init__(cfg, handler, metrics, redis)
        if redis is None:
            raise ValueError("the redis broadcast adapter needs a RedisConnector")
        self.connector = redis
        self.channel = cfg.redis_channel.encode()
        #: seconds of silence before a PING (and again before the connection is given up)
        self.probe_interval = cfg.redis_keepalive_interval
        self._conn: Any = None
        self._listener: gevent.Greenlet | None = None
        self._problem: str | None = "connecting"
        #: failed connection attempts since the last subscription confirmed
        self.attempts = 0
        self._errors = Throttle(log, 10.0)
        self._invalid = Throttle(log, 10.0)
        metrics.counters.setdefault(RECONNECTS, 0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._listener is None:
            self._listener = gevent.spawn(self._run)

    def shutdown(self) -> None:
        """Stop listening. A message is handled within one non-yielding call, so the
        listener can only be blocked in a read here: nothing taken is dropped."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.kill(block=True, timeout=2.0)
        self._drop_connection()

    def announce(self) -> str:
        return (
            f"Accept broadcasts from Redis channel {self.cfg.redis_channel!r} at {self.connector.describe()} "
            "(legacy redis adapter: fanned out to every node, without history or offsets)"
        )

    def healthy(self) -> str | None:
        if self._problem is None:
            return None
        tries = f"attempt {self.attempts}, retrying" if self.attempts else "first attempt"
        return f"redis broadcaster ({self.connector.describe()}, channel {self.cfg.redis_channel!r}): {self._problem} ({tries})"

    # ------------------------------------------------------------------ listening
    def _run(self) -> None:
        backoff = Backoff(0.25, BACKOFF_CAP)
        while True:
            try:
                self._connect()
                self._listen(backoff)
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # redis-py errors, sockets: log a line, retry
                self.attempts += 1
                self._problem = describe_error(exc)
                self._errors.warning(
                    "redis broadcaster: Redis unavailable, retrying target=%s channel=%s attempt=%d error=%s "
                    "(broadcasts published meanwhile are lost for this node; retrying without limit)",
                    self.connector.describe(),
                    self.cfg.redis_channel,
                    self.attempts,
                    self._problem,
                )
            self._drop_connection()
            gevent.sleep(backoff.next())

    def _connect(self) -> None:
        conn = self.connector.dedicated(socket_timeout=None, role="broadcast")
        self._conn = conn
        conn.connect()
        conn.send_command("SUBSCRIBE", self.channel)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn, "the broadcast listener's connection")

    def _listen(self, backoff: Backoff) -> None:
        conn = self._conn
        probing = False
        while True:
            if not conn.can_read(timeout=self.probe_interval):
                if probing:
                    raise ConnectionError(f"no answer to PING within {self.probe_interval:g}s (connection deaf)")
                probing = True
                conn.send_command("PING")
                continue
            probing = False
            reply = conn.read_response()
            if not isinstance(reply, list) or len(reply) < 2:
                continue
            kind = reply[0]
            if kind == b"message" and len(reply) >= 3:
                self._message(reply[2])
            elif kind == b"subscribe":
                if self.attempts:
                    log.info(
                        "redis broadcaster: subscribed again target=%s channel=%s after attempts=%d",
                        self.connector.describe(),
                        self.cfg.redis_channel,
                        self.attempts,
                    )
                    self.metrics.inc(RECONNECTS)
                else:
                    log.debug("redis broadcaster: subscribed channel=%s", self.cfg.redis_channel)
                self.attempts = 0
                self._problem = None
                backoff.reset()

    def _message(self, data: Any) -> None:
        try:
            publication = protocol.decode_publication(data)
        except ProtocolError as exc:
            self.metrics.inc("failed_broadcast_msg_total")
            self._invalid.warning(
                "redis broadcaster: invalid publication dropped channel=%s error=%s", self.cfg.redis_channel, exc
            )
            return
        try:
            self.handler.handle_fanout(publication)
        except Exception:  # one bad message must not take the listener down
            self._errors.error("redis broadcaster: handling a publication failed", exc_info=True)
