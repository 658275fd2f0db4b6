"""Hub: the stream → subscribers index and the fan-out of broadcasts.

A *group* is every subscriber of one stream through one channel identifier; each
broadcast's frame (WebSocket header + JSON) is built once per group and the same bytes
are handed to every member's writer. Per recipient the fan-out does one comparison and
one call. Broadcasts that queue up while a fan-out runs (bursts) go out together: a run
of one stream's messages reaches each subscriber as one write, i.e. one system call.

Exactly once, in order (DESIGN.md): each :class:`StreamSub` (one session, identifier
and stream) remembers the highest offset it was sent (``pos``) and where its contiguous
run of delivered offsets starts (``lo``). Live delivery skips anything at or below
``pos``; a history reply skips what the run already covers. While a history reply is
being prepared, or right after a restore, the subscription is *held*: live messages are
buffered and merged in offset order when it is released.

Concurrency contract: the index is only mutated from greenlets between yields; no
method here yields. Broadcasts are processed in arrival order by one fan-out greenlet
(per-stream order follows), which snapshots a group's members before writing to them.
"""

from __future__ import annotations

import logging
from typing import Protocol

import gevent
from gevent.queue import Full, Queue

from anycable_gevent import protocol
from anycable_gevent.protocol import StreamMessage, ws_frame

log = logging.getLogger(__name__)

#: Most queued broadcasts fanned out together.
MAX_BATCH = 64


def _coalescible(msgs: list[StreamMessage]) -> bool:
    """One buffer fits every subscriber: nothing per-recipient, and either no offsets at
    all (no broker, transient) or registered messages with increasing offsets of one epoch."""
    if any(m.exclude_socket or m.broadcast_type for m in msgs):
        return False
    if not any(m.offset for m in msgs):
        return True
    epoch = msgs[0].epoch
    prev = 0
    for m in msgs:
        if m.offset <= prev or m.epoch != epoch:
            return False
        prev = m.offset
    return True


class HubSession(Protocol):
    """What the hub needs from a connection."""

    sid: str

    def write(self, frame: bytes) -> None:
        """Queue or send a complete frame; never blocks, never mutates the hub."""


class StreamSub:
    """One (session, identifier, stream) membership."""

    __slots__ = ("session", "write", "group", "pos", "lo", "held")

    def __init__(self, session: HubSession, group: Group) -> None:
        self.session = session
        self.write = session.write
        self.group = group
        #: Highest offset delivered (0 = none yet).
        self.pos = 0
        #: First offset of the contiguous delivered run ending at ``pos`` (0 = unknown).
        self.lo = 0
        #: Buffered ``(offset, frame)`` while held, else None.
        self.held: list[tuple[int, bytes]] | None = None

    @property
    def stream(self) -> str:
        return self.group.stream

    @property
    def identifier(self) -> str:
        return self.group.identifier


class Group:
    __slots__ = ("stream", "identifier", "prefix", "members", "fresh", "held", "epoch", "last")

    def __init__(self, stream: str, identifier: str) -> None:
        self.stream = stream
        self.identifier = identifier
        self.prefix = protocol.frame_prefix(identifier)
        self.members: dict[StreamSub, None] = {}
        #: Live members that have not been sent a registered message yet (``lo`` unknown).
        self.fresh: dict[StreamSub, None] = {}
        self.held: dict[StreamSub, None] = {}
        self.epoch = ""
        #: Offset of the last registered message that passed through this group.
        self.last = 0

    def __len__(self) -> int:
        return len(self.members) + len(self.held)


class Hub:
    def __init__(self, inbox_size: int = 4096) -> None:
        self.streams: dict[str, dict[str, Group]] = {}
        self.inbox: Queue[StreamMessage] = Queue(maxsize=inbox_size)
        self._loop: gevent.Greenlet | None = None
        #: Counters read by metrics.
        self.broadcasts = 0
        self.frames_sent = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._loop is None:
            self._loop = gevent.spawn(self._run)

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.kill(block=False)
            self._loop = None

    def _run(self) -> None:
        inbox = self.inbox
        while True:
            batch = [inbox.get()]
            # Whatever queued up meanwhile goes out together (one write per subscriber).
            while len(batch) < MAX_BATCH and inbox.qsize():
                batch.append(inbox.get_nowait())
            try:
                if len(batch) == 1:
                    self.broadcast(batch[0])
                else:
                    self.broadcast_many(batch)
            except Exception:
                log.exception("broadcast failed streams=%s", ",".join({m.stream for m in batch}))
            gevent.sleep(0)

    def enqueue(self, msg: StreamMessage) -> None:
        """Hand a message to the fan-out greenlet (blocks only when the inbox is full)."""
        self.inbox.put(msg)

    def offer(self, msg: StreamMessage) -> bool:
        """Hand a message to the fan-out greenlet if there is room; never blocks."""
        try:
            self.inbox.put_nowait(msg)
        except Full:
            return False
        return True

    # ------------------------------------------------------------------ index
    def join(self, session: HubSession, identifier: str, stream: str, held: bool = False) -> StreamSub:
        by_id = self.streams.get(stream)
        if by_id is None:
            by_id = self.streams[stream] = {}
        group = by_id.get(identifier)
        if group is None:
            group = by_id[identifier] = Group(stream, identifier)
        sub = StreamSub(session, group)
        if held:
            sub.held = []
            group.held[sub] = None
        else:
            group.members[sub] = None
            group.fresh[sub] = None
        return sub

    def leave(self, sub: StreamSub) -> None:
        group = sub.group
        group.members.pop(sub, None)
        group.held.pop(sub, None)
        group.fresh.pop(sub, None)
        sub.held = None
        if not group.members and not group.held:
            by_id = self.streams.get(group.stream)
            if by_id is not None and by_id.get(group.identifier) is group:
                del by_id[group.identifier]
                if not by_id:
                    del self.streams[group.stream]

    def hold(self, sub: StreamSub) -> None:
        """Buffer live messages for ``sub`` until :meth:`release`."""
        if sub.held is not None:
            return
        group = sub.group
        if sub not in group.members:
            return  # not a member any more (left)
        del group.members[sub]
        group.fresh.pop(sub, None)
        sub.held = []
        group.held[sub] = None

    def release(self, sub: StreamSub, until: int | None = None) -> None:
        """Stop holding: flush buffered messages after ``until`` in order, then go live.

        Args:
            until: the highest offset the client already has (from a history reply);
                buffered messages at or below it are dropped. ``None`` flushes all.
        """
        buf = sub.held
        if buf is None:
            return
        group = sub.group
        sub.held = None
        if sub not in group.held:
            return
        del group.held[sub]
        if until is not None and until > sub.pos:
            sub.pos = until
        write = sub.write
        for off, frame in buf:
            if off == 0:
                write(frame)
            elif off > sub.pos:
                if sub.lo == 0:
                    sub.lo = off
                sub.pos = off
                write(frame)
        group.members[sub] = None
        if sub.lo == 0:
            group.fresh[sub] = None

    @property
    def streams_count(self) -> int:
        return len(self.streams)

    # ------------------------------------------------------------------ fan-out
    def broadcast(self, msg: StreamMessage) -> None:
        """Deliver one message to every subscriber of its stream (never yields)."""
        by_id = self.streams.get(msg.stream)
        self.broadcasts += 1
        if not by_id:
            return
        tail = msg.tail()
        off = msg.offset
        exclude = msg.exclude_socket
        sent = 0
        nbytes = 0
        for group in tuple(by_id.values()):
            prefix = protocol.frame_prefix(group.identifier, msg.broadcast_type) if msg.broadcast_type else group.prefix
            frame = ws_frame(prefix + tail)
            n = 0
            if off:
                if group.epoch != msg.epoch:
                    self._new_epoch(group, msg.epoch)
                group.last = off
                if group.fresh:
                    for sub in group.fresh:
                        sub.lo = off
                    group.fresh.clear()
            for sub in tuple(group.members):
                if exclude and sub.session.sid == exclude:
                    continue
                if off:  # registered: never twice, never backwards
                    if off <= sub.pos:
                        continue
                    sub.pos = off
                sub.write(frame)
                n += 1
            for sub in tuple(group.held):
                # buffered in arrival order (transient ones too), merged on release
                if sub.held is not None and not (exclude and sub.session.sid == exclude):
                    sub.held.append((off, frame))
            sent += n
            nbytes += n * len(frame)
        self.frames_sent += sent
        self.bytes_sent += nbytes

    def broadcast_many(self, batch: list[StreamMessage]) -> None:
        """Deliver queued messages: per stream in order, coalesced per subscriber.

        A run of registered messages of one stream is written to each subscriber as
        one buffer (one system call instead of one per message); anything unusual
        (transient, excluded socket, custom type) takes the one-by-one path.
        """
        by_stream: dict[str, list[StreamMessage]] = {}
        for msg in batch:
            by_stream.setdefault(msg.stream, []).append(msg)
        for msgs in by_stream.values():
            if len(msgs) > 1 and _coalescible(msgs):
                self._broadcast_run(msgs)
            else:
                for msg in msgs:
                    self.broadcast(msg)

    def _broadcast_run(self, msgs: list[StreamMessage]) -> None:
        self.broadcasts += len(msgs)
        by_id = self.streams.get(msgs[0].stream)
        if not by_id:
            return
        tails = [m.tail() for m in msgs]
        offsets = [m.offset for m in msgs]
        first, last, epoch = offsets[0], offsets[-1], msgs[0].epoch
        count = len(msgs)
        sent = 0
        nbytes = 0
        for group in tuple(by_id.values()):
            prefix = group.prefix
            frames = [ws_frame(prefix + tail) for tail in tails]
            joined = b"".join(frames)
            if not last:  # no offsets: plain delivery, in arrival order
                members = tuple(group.members)
                for sub in members:
                    sub.write(joined)
                for sub in tuple(group.held):
                    if sub.held is not None:
                        sub.held.extend(zip(offsets, frames, strict=True))
                sent += len(members) * count
                nbytes += len(members) * len(joined)
                continue
            if group.epoch != epoch:
                self._new_epoch(group, epoch)
            group.last = last
            if group.fresh:
                for sub in group.fresh:
                    sub.lo = first
                group.fresh.clear()
            whole = 0
            for sub in tuple(group.members):
                pos = sub.pos
                if pos < first:
                    sub.pos = last
                    sub.write(joined)
                    whole += 1
                elif pos < last:  # a history reply went ahead: send only what is new
                    rest = [frame for off, frame in zip(offsets, frames, strict=True) if off > pos]
                    sub.pos = last
                    sub.write(b"".join(rest))
                    sent += len(rest)
                    nbytes += sum(map(len, rest))
            for sub in tuple(group.held):
                if sub.held is not None:
                    sub.held.extend(zip(offsets, frames, strict=True))
            sent += whole * count
            nbytes += whole * len(joined)
        self.frames_sent += sent
        self.bytes_sent += nbytes

    @staticmethod
    def _new_epoch(group: Group, epoch: str) -> None:
        if group.epoch:
            # the broker started a new epoch: old positions mean nothing any more
            for sub in (*group.members, *group.held):
                sub.pos = 0
                sub.lo = 0
        group.epoch = epoch
        group.last = 0
