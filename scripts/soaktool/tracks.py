"""What one client saw of one stream, and the exactly-once check.

The publisher numbers each stream's publications ``n = 1, 2, 3, …`` and publishes one at a
time per stream, so for one stream the order of ``n`` is the order of offsets. A
:class:`Track` (one client, one stream) records the ``n`` of every message delivered to it,
in arrival order, and checks offsets as they arrive (same epoch, increasing by one).

A track's deliveries fall into **segments**, each expected to be gapless: a segment begins
at the first message the client received after subscribing (with history ``since`` the
subscription time), and continues across socket kills, restores, worker kills and
unsubscribe/resubscribe, because each of those resumes from the last offset seen (history
``{epoch, offset}``). Only a ``reject_history`` ends a segment (the messages between the
last one seen and the next one received cannot be had any more); it is counted apart.

At the end (:func:`analyse`), every accepted publication of the stream from the first
``n`` of a segment to its last (to the last accepted one, for the segment still open) must
have been received exactly once. Publications that were not accepted (non-2xx, or no
answer) may have been registered all the same: receiving them is fine and counted apart.
"""

from __future__ import annotations

import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

#: Track states: not subscribed (nothing counted), subscribe sent (messages ignored until
#: the confirmation: whatever arrives before it belongs to an earlier subscription), live.
OFF, SUBSCRIBING, LIVE = "off", "subscribing", "live"


class Track:
    __slots__ = (
        "stream",
        "identifier",
        "desired",
        "state",
        "epoch",
        "offset",
        "received",
        "breaks",
        "seg_start",
        "history_pending",
        "mark",
        "jumps_since_mark",
        "out_of_order",
        "offset_jumps",
        "epoch_changes",
        "rejects",
        "ignored",
        "no_offset",
    )

    def __init__(self, stream: str, identifier: str) -> None:
        self.stream = stream
        self.identifier = identifier
        #: the client wants to be subscribed (false between an unsubscribe and its resubscribe)
        self.desired = True
        self.state = OFF
        self.epoch = ""
        self.offset = 0
        #: ``n`` of each accounted delivery, in arrival order
        self.received: list[int] = []
        #: indexes into :attr:`received` where a segment begins (after a reject_history)
        self.breaks: list[int] = []
        #: when the current segment began (Unix seconds)
        self.seg_start = time.time()
        self.history_pending = False
        #: len(received) when the pending history request was sent
        self.mark = 0
        self.jumps_since_mark = 0
        self.out_of_order = 0
        self.offset_jumps = 0
        self.epoch_changes = 0
        self.rejects = 0
        #: messages delivered while not subscribed (in flight before an unsubscribe took effect)
        self.ignored = 0
        #: data messages without an offset (a broker would have given one)
        self.no_offset = 0

    # ------------------------------------------------------------------ requests
    def history(self) -> dict[str, object]:
        """What to ask for: from the last position seen, else since the segment began."""
        if self.epoch:
            return {"streams": {self.stream: {"epoch": self.epoch, "offset": self.offset}}}
        return {"since": max(int(self.seg_start) - 1, 1)}

    def requested(self) -> None:
        """A history request (or a subscribe with history) was just sent."""
        self.history_pending = True
        self.mark = len(self.received)
        self.jumps_since_mark = 0

    # ------------------------------------------------------------------ replies
    def deliver(self, n: int, epoch: str, offset: int) -> None:
        if self.state != LIVE:
            self.ignored += 1
            return
        if not offset:
            self.no_offset += 1
        elif self.epoch and epoch != self.epoch:
            self.epoch_changes += 1
            self.epoch, self.offset = epoch, offset
        elif self.offset and offset <= self.offset:
            if n not in self.received[-64:]:
                self.out_of_order += 1  # (a repeated n is counted as a duplicate at the end)
        else:
            if self.offset and offset != self.offset + 1 and not self._at_segment_start():
                self.offset_jumps += 1
                if self.history_pending:
                    self.jumps_since_mark += 1
            self.epoch, self.offset = epoch, offset
        self.received.append(n)

    def _at_segment_start(self) -> bool:
        return bool(self.breaks) and self.breaks[-1] == len(self.received)

    def confirmed(self) -> None:
        self.history_pending = False

    def rejected(self) -> None:
        """reject_history: a new segment begins with what was received after the request."""
        self.history_pending = False
        self.rejects += 1
        self.offset_jumps -= self.jumps_since_mark
        if not self.breaks or self.breaks[-1] != self.mark:
            self.breaks.append(self.mark)
        if self.mark == len(self.received):
            self.epoch, self.offset = "", 0
        self.seg_start = time.time()


@dataclass
class Published:
    """The accepted publications of one stream: their numbers, in order, and when."""

    numbers: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    attempts: int = 0

    @property
    def last(self) -> int:
        return self.numbers[-1] if self.numbers else 0


@dataclass
class Verdict:
    checked: int = 0
    duplicates: int = 0
    gaps: int = 0
    out_of_order: int = 0
    offset_jumps: int = 0
    epoch_changes: int = 0
    reject_history: int = 0
    unaccepted_delivered: int = 0
    ignored_after_unsubscribe: int = 0
    no_offset: int = 0
    #: a few tracks with problems, for the report
    examples: list[str] = field(default_factory=list)


def analyse(tracks: list[tuple[int, Track]], published: dict[str, Published], grace: float = 3.0) -> Verdict:
    """The exactly-once check over every (client number, track)."""
    v = Verdict()
    for client, t in tracks:
        pub = published[t.stream]
        accepted = set(pub.numbers)
        seen: dict[int, int] = {}
        for n in t.received:
            seen[n] = seen.get(n, 0) + 1
        dups = sum(c - 1 for c in seen.values() if c > 1)
        v.unaccepted_delivered += sum(1 for n in seen if n not in accepted)
        v.checked += sum(c for n, c in seen.items() if n in accepted)
        starts = [0, *t.breaks]
        missing: list[int] = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(t.received)
            segment = t.received[start:end]
            last_segment = i + 1 == len(starts)
            if not segment:
                if last_segment and t.state == LIVE:
                    # nothing received since it began: publications accepted well after that are missing
                    k = bisect_left(pub.times, t.seg_start + grace)
                    missing.extend(pub.numbers[k:])
                continue
            lo = min(segment)
            hi = pub.last if last_segment and t.state == LIVE else max(segment)
            a, b = bisect_left(pub.numbers, lo), bisect_right(pub.numbers, hi)
            missing.extend(n for n in pub.numbers[a:b] if n not in seen)
        v.duplicates += dups
        v.gaps += len(missing)
        v.out_of_order += t.out_of_order
        v.offset_jumps += max(t.offset_jumps, 0)
        v.epoch_changes += t.epoch_changes
        v.reject_history += t.rejects
        v.ignored_after_unsubscribe += t.ignored
        v.no_offset += t.no_offset
        if (missing or dups or t.out_of_order) and len(v.examples) < 10:
            v.examples.append(
                f"client {client} stream {t.stream}: {len(t.received)} received, missing {missing[:8]}, "
                f"duplicates {sorted(n for n, c in seen.items() if c > 1)[:8]}, out of order {t.out_of_order}, "
                f"state {t.state}"
            )
    return v
