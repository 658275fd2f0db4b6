"""Gap repair: what comes out of pub/sub reaches the hub once, in offset order, with no holes.

Redis pub/sub is at-most-once: a message can be lost between Redis and a worker (a
reconnect, a client-output-buffer limit, a worker too busy to read). The broker has
every registered message, so a worker that sees offset n+2 of a stream after n fetches
n+1 from the broker and delivers it first; what is at or below the last offset passed on is a
duplicate at most, and the hub, which keeps each subscriber's position, drops it for
those who have it. A message lost at the tail of a stream is followed by nothing
that would reveal it, so the worker also compares its streams with the broker
(``peaks``: epoch and last offset) after every resubscribe and on a slow periodic check,
and delivers what is missing.

Per stream this worker has subscribers for, a :class:`_Track` remembers the epoch and the
last offset handed to the hub. A new track learns its starting point from the broker once
the pub/sub confirms the subscription; messages that arrive before are held. While a
fill is running (history read from the broker), newer live messages are held too and
merged after it. A new epoch (the broker lost the stream's counter and started again)
is followed from its first offset.

Concurrency contract: :meth:`Sequencer.accept` runs in the pub/sub listener's greenlet
and never blocks (hub hand-off is non-blocking; if the hub's inbox is full the message is
fetched again later). Broker reads happen in fill greenlets, one per stream at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import gevent

from anycable_gevent.broker.base import Broker
from anycable_gevent.errors import BrokerError, HistoryError
from anycable_gevent.hub import Hub
from anycable_gevent.metrics import Metrics
from anycable_gevent.protocol import StreamMessage
from anycable_gevent.pubsub.base import PubSub
from anycable_gevent.ticker import every

log = logging.getLogger(__name__)

#: Seconds between the periodic checks of every tracked stream against the broker.
RESYNC_INTERVAL = 20.0
#: Seconds a new track waits for its subscription to be confirmed before asking the broker.
SUBSCRIBE_WAIT = 5.0


class _Track:
    __slots__ = ("stream", "epoch", "last", "ready", "empty", "busy", "held")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.epoch = ""
        #: last offset handed to the hub (0 = none of this epoch)
        self.last = 0
        #: the starting point is known (before that, messages are held)
        self.ready = False
        #: the stream had no counter when this worker subscribed: it starts at offset 1
        self.empty = False
        #: a greenlet is reading from the broker for this stream
        self.busy = False
        self.held: list[StreamMessage] = []


class Sequencer:
    """Between the pub/sub and the hub of one worker (see the module docstring)."""

    def __init__(self, hub: Hub, broker: Broker, pubsub: PubSub, metrics: Metrics) -> None:
        self.hub = hub
        self.broker = broker
        self.pubsub = pubsub
        self.metrics = metrics
        self.tracks: dict[str, _Track] = {}
        self._ticker: gevent.Greenlet | None = None
        for name in ("pubsub_repaired_total", "pubsub_duplicates_total", "pubsub_unrepaired_total"):
            metrics.counters.setdefault(name, 0)

    @property
    def background(self) -> int:
        return int(self._ticker is not None)

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = every(RESYNC_INTERVAL, lambda: self.check(list(self.tracks)), "stream position check")

    def shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.kill(block=False)
            self._ticker = None

    # ------------------------------------------------------------------ tracks
    def track(self, stream: str) -> None:
        """This worker has its first subscriber of ``stream``."""
        if stream in self.tracks:
            return
        t = self.tracks[stream] = _Track(stream)
        t.busy = True
        gevent.spawn(self._start_track, t)

    def untrack(self, stream: str) -> None:
        self.tracks.pop(stream, None)

    def _start_track(self, t: _Track) -> None:
        try:
            self.pubsub.wait_subscribed((t.stream,), SUBSCRIBE_WAIT)
            if self.tracks.get(t.stream) is not t:
                return
            try:
                peak = self.broker.peaks((t.stream,)).get(t.stream)
            except BrokerError as exc:
                log.debug("stream position unknown stream=%s error=%s", t.stream[:100], exc)
            else:
                if peak is not None:
                    t.epoch, t.last = peak
                    # what arrived since the subscription was confirmed is live for this
                    # worker even when the broker's top already counts it
                    held = [m.offset for m in t.held if m.epoch == t.epoch and m.offset]
                    if held:
                        t.last = min(t.last, min(held) - 1)
                else:
                    t.empty = True
        finally:
            t.ready = True
            t.busy = False
            self._drain(t, allow_gaps=False)

    # ------------------------------------------------------------------ live
    def accept(self, msg: StreamMessage) -> None:
        """A message from pub/sub (listener greenlet; never blocks)."""
        t = self.tracks.get(msg.stream)
        if t is None or not msg.offset:
            # not subscribed here (the hub drops it), or nothing to order (transient,
            # no broker, legacy fan-out)
            self._offer(msg, None)
            return
        if t.busy or not t.ready:
            t.held.append(msg)
            return
        self._sequence(t, msg, allow_gaps=False)

    def _sequence(self, t: _Track, msg: StreamMessage, allow_gaps: bool) -> None:
        if msg.epoch != t.epoch:
            if t.epoch or t.empty:
                # a new epoch, or a stream that was empty when this worker subscribed:
                # everything from its offset 1 is due
                t.epoch, t.last = msg.epoch, 0
            else:
                # the starting point could not be read from the broker: start here
                t.epoch, t.last = msg.epoch, msg.offset - 1
            t.empty = False
        if msg.offset <= t.last:
            # At or below what this worker counts as delivered: a duplicate of a fill, or a
            # message that was still on its way when the starting point was read. The hub
            # keeps each subscriber's own position and drops what that one already has,
            # so it is passed on rather than guessed at here.
            self.metrics.counters["pubsub_duplicates_total"] += 1
            self._offer(msg, None)
            return
        if msg.offset > t.last + 1 and not allow_gaps:
            self._fill(t, msg)
            return
        if not self._offer(msg, t):
            return
        t.last = msg.offset

    def _offer(self, msg: StreamMessage, t: _Track | None) -> bool:
        if self.hub.offer(msg):
            return True
        # the fan-out is behind: fetch this message (and what follows) again later
        log.debug("hub inbox full, message will be fetched again stream=%s", msg.stream[:100])
        if t is not None and not t.busy:
            self._fill(t, None)
        return False

    # ------------------------------------------------------------------ repair
    def _fill(self, t: _Track, trigger: StreamMessage | None) -> None:
        """Read what follows ``t.last`` from the broker in a greenlet; hold live messages meanwhile."""
        t.busy = True
        if trigger is not None:
            t.held.append(trigger)
        gevent.spawn(self._run_fill, t)

    def _run_fill(self, t: _Track) -> None:
        repaired = 0
        complete = True
        try:
            msgs = self.broker.history_from(t.stream, t.epoch, t.last)
        except HistoryError as exc:
            msgs = self._what_is_left(t, exc)
            complete = False
        except BrokerError as exc:
            log.info("gap repair failed, retried at the next check stream=%s error=%s", t.stream[:100], exc)
            msgs = []
            complete = False
        for m in msgs:
            if self.tracks.get(t.stream) is not t:
                break
            if m.offset > t.last:
                self.hub.enqueue(m)  # may block: this is the fill's own greenlet
                t.last = m.offset
                repaired += 1
        self.metrics.counters["pubsub_repaired_total"] += repaired
        if repaired:
            log.info("repaired stream=%s messages=%d epoch=%s upto=%d", t.stream[:100], repaired, t.epoch, t.last)
        t.busy = False
        self._drain(t, allow_gaps=not complete)

    def _what_is_left(self, t: _Track, exc: BrokerError) -> list[StreamMessage]:
        """The gap cannot be filled (its messages expired, or another epoch): deliver what
        the broker still has after the gap, and count the loss."""
        self.metrics.counters["pubsub_unrepaired_total"] += 1
        log.warning("gap not repairable stream=%s after=%d reason=%s", t.stream[:100], t.last, exc)
        try:
            return [m for m in self.broker.history_since(t.stream, 0) if m.epoch == t.epoch]
        except BrokerError:
            return []

    def _drain(self, t: _Track, allow_gaps: bool) -> None:
        """Pass held messages on in offset order (after a fill or once the track is ready)."""
        while t.held and not t.busy and self.tracks.get(t.stream) is t:
            held, t.held = sorted(t.held, key=lambda m: (m.epoch != t.epoch, m.offset)), []
            for i, msg in enumerate(held):
                self._sequence(t, msg, allow_gaps)
                if t.busy:  # another gap: a new fill holds the rest
                    t.held.extend(held[i + 1 :])
                    return

    def resync(self, streams: Collection[str]) -> None:
        """After a resubscribe: compare these streams with the broker (in a greenlet)."""
        gevent.spawn(self.check, [s for s in streams if s in self.tracks])

    def check(self, streams: Collection[str]) -> None:
        """Fill every tracked stream that is behind the broker (one batched broker call)."""
        if not streams:
            return
        try:
            peaks = self.broker.peaks(streams)
        except BrokerError as exc:
            log.debug("stream position check failed error=%s", exc)
            return
        for stream, (epoch, top) in peaks.items():
            t = self.tracks.get(stream)
            if t is None or t.busy or not t.ready:
                continue
            if epoch != t.epoch:
                if t.epoch:  # a new epoch we have not seen a message of
                    t.epoch, t.last = epoch, 0
                    self._fill(t, None)
                else:
                    t.epoch, t.last = epoch, top
            elif top > t.last:
                self._fill(t, None)
