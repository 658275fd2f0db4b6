"""Redis Streams broadcaster (``redisx``, SPEC §6.5): one consumer group, each entry
registered once in the cluster.

The application appends ``XADD <--redisx_stream> * payload <publication json>``
(anycable-rails ``broadcast_adapter: redisx``). Every node (every worker) is a consumer
of the group ``bx``; Redis gives each entry to one of them, which registers it in the
broker (offset, epoch, history) and publishes it to every node through pub/sub
(:meth:`Handler.handle_publication`). The stream name is used as given (no
``--redis_prefix``), so that anycable-rails and anycable-go's setups keep working.

Guarantees, and where they come from:

* **Nothing is skipped.** The group is created at ``0`` (``XGROUP CREATE … 0 MKSTREAM``;
  anycable-go creates it at ``$``), so entries written before any node ever ran are
  delivered by the first one that starts.
* **Acknowledged only after registration.** An entry is acknowledged and deleted (``XACK``
  and ``XDEL``, pipelined, one round trip per batch) only once the broker accepted it. If
  the broker refuses (:class:`BrokerError`), the entry and everything read after it stay
  pending, the consumer backs off and retries them from its own pending list, in order,
  before it reads anything new. Entries pending at a consumer idle for
  :data:`CLAIM_IDLE_MS` (a crashed node, or a node that cannot reach its broker) are taken
  over with ``XAUTOCLAIM`` and handled first. Delivery from Redis is therefore
  *at-least-once*: an entry registered just before its node died (or lost Redis for longer
  than the claim delay before its acknowledgement got through) is registered again by
  the node that claims it.
* **Poison never blocks.** An entry without a ``payload`` field, or whose payload is not a
  publication, is acknowledged and deleted at once, counted
  (``failed_broadcast_msg_total``) and logged (throttled). anycable-go keeps an entry without
  ``payload`` pending forever and re-claims it every 2 s.
* **Clean group.** At start, consumers idle for :data:`STALE_CONSUMER_IDLE` with nothing
  pending are removed (anycable-go leaves crashed consumers behind forever). At shutdown
  this node's consumer is removed when its pending list is empty; otherwise it is left for
  another node to claim from.

Concurrency: one consumer greenlet owns one dedicated connection (not pooled; its socket
timeout is above the block time) and runs the loop: acknowledgements still owed, then own
pending entries, then claims, then ``XREADGROUP … BLOCK``. The publications of consecutive
entries are handed to the node together, inline (one broker round trip for up to
:data:`COUNT` entries: registered, or refused, together); the node only registers and
enqueues, so the consumer never waits on a slow client. The shared pool is used only at start (group, stale consumers) and at
shutdown. Failures of Redis (unreachable at start included) are retried with capped,
jittered backoff, forever; ``healthy()`` names the problem meanwhile.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import gevent
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from anycable_gevent import protocol
from anycable_gevent.backoff import Backoff
from anycable_gevent.broadcast.base import Broadcaster, Handler
from anycable_gevent.config import Config
from anycable_gevent.errors import BrokerError, ProtocolError
from anycable_gevent.log import Throttle
from anycable_gevent.metrics import Metrics
from anycable_gevent.protocol import StreamMessage
from anycable_gevent.redis_client import COMMAND_TIMEOUT, RedisConnector, close_quietly, describe_error

log = logging.getLogger("anycable_gevent.broadcast")

GROUP = "bx"
#: Entries per read and per claim.
COUNT = 100
#: Milliseconds an ``XREADGROUP`` waits for new entries.
BLOCK_MS = 2000
#: Entries pending this long at any consumer are taken over (``XAUTOCLAIM`` min-idle-time).
CLAIM_IDLE_MS = 2000
#: Seconds between two claim rounds.
CLAIM_EVERY = 2.0
#: Seconds a consumer with nothing pending must have been idle to be removed at start.
#: A live consumer reads every :data:`BLOCK_MS` (or retries within ``BACKOFF_CAP``), and a
#: removed consumer that was alive after all is created again by its next read.
STALE_CONSUMER_IDLE = 300.0
#: Retry delays (Redis unreachable, broker refusing): from a quarter second to this cap.
BACKOFF_CAP = 10.0
#: Seconds a shutdown waits for the entries being handled.
SHUTDOWN_WAIT = 5.0

#: Counters of this server (not in anycable-go).
CLAIMED = "redisx_claimed_total"
RETRIED = "redisx_retried_total"
RECONNECTS = "broadcast_redisx_reconnects_total"

Entry = tuple[bytes, dict[bytes, Any] | None]

#: Errors that mean Redis cannot be reached (anything else is an answer of Redis).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def consumer_name(node_id: str) -> str:
    """Unique per process: the node's name (or the host's), the pid, and random bits."""
    return f"{node_id or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def remove_stale_consumers(client: Any, stream: str, group: str, min_idle: float, keep: str = "") -> list[str]:
    """Delete the group's consumers idle for ``min_idle`` seconds that have nothing pending.

    ``client`` is a ``redis.Redis``; ``keep`` is never removed. Returns the names removed.
    A consumer with pending entries is always kept: deleting it would drop them from the
    group's pending list, and they could no longer be claimed.
    """
    removed = []
    for info in client.xinfo_consumers(stream, group):
        name = _text(info.get("name", b""))
        if name == keep or int(info.get("pending", 0)) or int(info.get("idle", 0)) < min_idle * 1000:
            continue
        # DELCONSUMER returns how many entries were pending at that consumer: 0 here,
        # unless it read since XINFO (then it is alive and handles them itself)
        client.xgroup_delconsumer(stream, group, name)
        removed.append(name)
    return removed


class RedisStreamBroadcaster(Broadcaster):
    """``XREADGROUP GROUP bx <me> … STREAMS <--redisx_stream> >``: each entry to one node."""

    def __init__(self, cfg: Config, handler: Handler, metrics: Metrics, redis: RedisConnector | None = None) -> None:
        super().__init__(cfg, handler, metrics, redis)
        if redis is None:
            raise ValueError("the redisx broadcast adapter needs a RedisConnector")
        self.connector = redis
        self.stream = cfg.redisx_stream
        self._stream = self.stream.encode()
        self.consumer = consumer_name(cfg.node_id)
        self._conn: Any = None
        self._loop: gevent.Greenlet | None = None
        self._stopping = False
        #: handling entries it took (a shutdown waits for them; anything else is interrupted)
        self._handling = False
        self._problem: str | None = "connecting"
        #: why entries wait (the broker refused them), while they do
        self._refused: str | None = None
        #: failed connection attempts since the last success
        self.attempts = 0
        #: entries registered whose acknowledgement did not get through (sent first on reconnect)
        self._unacked: list[bytes] = []
        #: read this consumer's own pending entries before new ones (after a start,
        #: a reconnect, or a refusal), so that a stream's entries keep their order
        self._own_first = True
        self._claim_at = 0.0
        self._claim_cursor = b"0-0"
        self._cleaned = False
        self._errors = Throttle(log, 10.0)
        self._poison = Throttle(log, 10.0)
        for name in (CLAIMED, RETRIED, RECONNECTS):
            metrics.counters.setdefault(name, 0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._loop is None:
            self._stopping = False
            self._loop = gevent.spawn(self._run)

    def shutdown(self) -> None:
        """Stop reading; entries already read are handled (and acknowledged) first, then
        this consumer leaves the group if nothing is pending at it."""
        self._stopping = True
        loop, self._loop = self._loop, None
        if loop is not None:
            if self._handling:
                loop.join(SHUTDOWN_WAIT)  # it stops before its next read
            if not loop.dead:
                if self._handling:
                    log.warning("redisx: entries still being handled at shutdown; they stay pending for others")
                # waiting for entries or for a retry: what a read took and did not return
                # yet stays pending at this consumer, for another node to claim
                loop.kill(block=True, timeout=1.0)
        self._drop_connection()
        self._leave_group()

    def _leave_group(self) -> None:
        if self._problem is not None:
            log.info("redisx: consumer %s not removed from group %s: Redis unavailable", self.consumer, GROUP)
            return
        try:
            client = self.connector.client
            if self._unacked:  # registered, but the acknowledgement did not get through
                pipe = client.pipeline(transaction=False)
                pipe.xack(self.stream, GROUP, *self._unacked)
                pipe.xdel(self.stream, *self._unacked)
                pipe.execute()
                self._unacked = []
            if client.xpending_range(self.stream, GROUP, min="-", max="+", count=1, consumername=self.consumer):
                log.info("redisx: consumer %s keeps pending entries for another node to claim", self.consumer)
                return
            client.xgroup_delconsumer(self.stream, GROUP, self.consumer)
        except Exception as exc:  # Redis down at shutdown: the next node's start cleans up
            log.info("redisx: consumer %s not removed from group %s: %s", self.consumer, GROUP, describe_error(exc))

    def announce(self) -> str:
        return (
            f"Accept broadcasts from Redis stream {self.stream!r} at {self.connector.describe()} "
            f"(redisx: group {GROUP}, consumer {self.consumer})"
        )

    def healthy(self) -> str | None:
        where = f"redisx broadcaster ({self.connector.describe()}, stream {self.stream!r})"
        if self._problem is not None:
            tries = f"attempt {self.attempts}, retrying" if self.attempts else "first attempt"
            return f"{where}: {self._problem} ({tries})"
        if self._refused is not None:
            return f"{where}: publications not accepted, entries wait: {self._refused}"
        return None

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        backoff = Backoff(0.25, BACKOFF_CAP)
        while not self._stopping:
            try:
                self._connect()
                self._consume(backoff)
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # redis-py errors, sockets: log a line, retry
                self.attempts += 1
                self._problem = describe_error(exc)
                self._errors.warning(
                    "redisx: %s, retrying target=%s stream=%s attempt=%d error=%s "
                    "(entries wait in the stream; retrying without limit)",
                    "Redis unavailable" if isinstance(exc, UNREACHABLE) else "reading the stream failed",
                    self.connector.describe(),
                    self.stream,
                    self.attempts,
                    self._problem,
                )
            self._drop_connection()
            if not self._stopping:
                gevent.sleep(backoff.next())

    def _connect(self) -> None:
        conn = self.connector.dedicated(socket_timeout=BLOCK_MS / 1000.0 + COMMAND_TIMEOUT, role="redisx")
        self._conn = conn
        conn.connect()
        try:
            self._call("XGROUP", "CREATE", self._stream, GROUP, "0", "MKSTREAM")
            log.info("redisx: created consumer group %s on stream %s", GROUP, self.stream)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        if not self._cleaned:
            self._cleaned = True
            try:
                removed = remove_stale_consumers(
                    self.connector.client, self.stream, GROUP, STALE_CONSUMER_IDLE, keep=self.consumer
                )
            except Exception as exc:  # housekeeping only
                log.info("redisx: stale consumers not checked: %s", describe_error(exc))
            else:
                if removed:
                    log.info("redisx: removed stale consumers of group %s: %s", GROUP, ", ".join(removed))
        self._own_first = True
        if self.attempts:
            log.info(
                "redisx: Redis reachable again target=%s stream=%s after attempts=%d",
                self.connector.describe(),
                self.stream,
                self.attempts,
            )
            self.metrics.inc(RECONNECTS)
        self.attempts = 0
        self._problem = None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn, "the redisx connection")

    def _consume(self, backoff: Backoff) -> None:
        refusals = Backoff(0.25, BACKOFF_CAP)
        while not self._stopping:
            if self._unacked:
                self._ack(self._unacked)
            if self._own_first:
                entries = self._read(b"0", block=False)
                if not entries:
                    self._own_first = False
                    continue
                self.metrics.inc(RETRIED, len(entries))
            elif time.monotonic() >= self._claim_at:
                entries = self._claim()
            else:
                entries = self._read(b">", block=True)
            backoff.reset()
            if not entries:
                continue
            if self._handle(entries):
                refusals.reset()
            else:
                gevent.sleep(refusals.next())

    # ------------------------------------------------------------------ Redis commands
    def _call(self, *args: Any) -> Any:
        conn = self._conn
        conn.send_command(*args)
        return conn.read_response()

    def _read(self, start: bytes, block: bool) -> list[Entry]:
        args: list[Any] = ["XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", COUNT]
        if block:
            args += ["BLOCK", BLOCK_MS]
        args += ["STREAMS", self._stream, start]
        return _entries(self._call(*args))

    def _claim(self) -> list[Entry]:
        reply = self._call(
            "XAUTOCLAIM", self._stream, GROUP, self.consumer, CLAIM_IDLE_MS, self._claim_cursor, "COUNT", COUNT
        )
        cursor = reply[0] if reply else b"0-0"
        entries = [_entry(e) for e in (reply[1] if reply and len(reply) > 1 else ()) if e]
        if cursor in (b"0-0", "0-0"):
            self._claim_cursor = b"0-0"
            self._claim_at = time.monotonic() + CLAIM_EVERY
        else:
            self._claim_cursor = cursor if isinstance(cursor, bytes) else str(cursor).encode()
            self._claim_at = 0.0  # more to claim: go on at once
        if entries:
            self.metrics.inc(CLAIMED, len(entries))
            log.info("redisx: claimed %d entries idle for %dms or more", len(entries), CLAIM_IDLE_MS)
        return entries

    def _ack(self, ids: Sequence[bytes]) -> None:
        """``XACK`` + ``XDEL`` in one round trip; on failure the ids stay owed (and the
        error goes to the loop, which reconnects and sends them first)."""
        ids = list(ids)
        self._unacked = ids
        conn = self._conn
        conn.send_packed_command(
            conn.pack_commands([("XACK", self._stream, GROUP, *ids), ("XDEL", self._stream, *ids)])
        )
        error: ResponseError | None = None
        for _ in range(2):
            try:
                conn.read_response()
            except ResponseError as exc:
                error = error or exc
        if error is not None:
            raise error
        self._unacked = []

    # ------------------------------------------------------------------ handling
    def _handle(self, entries: Iterable[Entry]) -> bool:
        """Register each entry in order; acknowledge those done. False when the broker
        refused one (it and the ones after it stay pending)."""
        self._handling = True
        try:
            return self._handle_entries(entries)
        finally:
            self._handling = False

    def _handle_entries(self, entries: Iterable[Entry]) -> bool:
        """Consecutive publications are registered together (one broker call, one round
        trip with the Redis broker); a remote command is handled in its place in order."""
        done: list[bytes] = []
        run_ids: list[bytes] = []
        run: list[StreamMessage] = []
        refused: BrokerError | None = None

        def flush() -> None:
            if run:
                self._publish(run.copy(), run_ids)
            done.extend(run_ids)
            run_ids.clear()
            run.clear()

        try:
            for entry_id, fields in entries:
                publication = None if fields is None else self._decode(entry_id, fields)
                if publication is None:
                    # deleted from the stream while pending, or invalid: nothing to register
                    run_ids.append(entry_id)
                    continue
                if isinstance(publication, list):
                    run_ids.append(entry_id)
                    run.extend(publication)
                    continue
                flush()
                self._publish(publication, [entry_id])
                done.append(entry_id)
            flush()
        except BrokerError as exc:
            refused = exc
        if done:
            self._ack(done)
        if refused is None:
            if self._refused is not None:
                log.info("redisx: publications accepted again stream=%s", self.stream)
                self._refused = None
            return True
        self._refused = describe_error(refused)
        self._own_first = True
        self._errors.warning(
            "redisx: publication not accepted, entries stay pending stream=%s error=%s", self.stream, self._refused
        )
        return False

    def _publish(self, publication: protocol.Publication, ids: list[bytes]) -> None:
        """Hand a publication to the node. BrokerError propagates (the entries stay pending);
        another error is a bug for these entries: retrying them forever would block the
        stream, so they are counted, logged and acknowledged."""
        try:
            self.handler.handle_publication(publication)
        except BrokerError:
            raise
        except Exception:
            self.metrics.inc("failed_broadcast_msg_total")
            self._errors.error(
                "redisx: handling entries %s failed, dropped", ",".join(_text(i) for i in ids[:5]), exc_info=True
            )

    def _decode(self, entry_id: bytes, fields: dict[bytes, Any]) -> protocol.Publication | None:
        payload = fields.get(b"payload")
        try:
            if payload is None:
                raise ProtocolError("entry has no 'payload' field (XADD <stream> * payload <json>)")
            return protocol.decode_publication(payload)
        except ProtocolError as exc:
            self.metrics.inc("failed_broadcast_msg_total")
            self._poison.warning(
                "redisx: invalid entry acknowledged and deleted stream=%s id=%s error=%s",
                self.stream,
                _text(entry_id),
                exc,
            )
            return None


# ---------------------------------------------------------------------- replies
# RESP2 and RESP3 shapes of XREADGROUP / XAUTOCLAIM, as a raw connection returns them.


def _entries(reply: Any) -> list[Entry]:
    if not reply:
        return []
    per_stream = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    return [_entry(e) for entries in per_stream for e in (entries or ()) if e]


def _entry(raw: Any) -> Entry:
    entry_id, fields = raw[0], raw[1] if len(raw) > 1 else None
    if fields is None:
        return entry_id, None
    if isinstance(fields, dict):
        return entry_id, fields
    return entry_id, dict(zip(fields[::2], fields[1::2], strict=False))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
