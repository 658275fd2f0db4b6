"""The soak tool's checker (scripts/soaktool/tracks.py): it must see every kind of loss.

These runs need no server: a track is fed what a client would have received, and
:func:`analyse` must count exactly the gaps, duplicates and reorderings put in.
"""

from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

from soaktool.tracks import LIVE, Published, Track, analyse  # noqa: E402

S = "soak/x/0"


def published(*numbers: int) -> dict[str, Published]:
    return {S: Published(list(numbers), [1000.0 + n for n in numbers], max(numbers, default=0))}


def live(*deliveries: tuple[int, int]) -> Track:
    """A live track that received ``(n, offset)`` pairs, epoch "e"."""
    t = Track(S, "id")
    t.state = LIVE
    for n, offset in deliveries:
        t.deliver(n, "e", offset)
    return t


def test_everything_once_in_order_is_clean() -> None:
    v = analyse([(0, live((3, 3), (4, 4), (5, 5)))], published(1, 2, 3, 4, 5))
    assert (v.checked, v.gaps, v.duplicates, v.out_of_order, v.offset_jumps) == (3, 0, 0, 0, 0)


def test_a_missing_message_is_a_gap() -> None:
    v = analyse([(0, live((1, 1), (2, 2), (4, 4)))], published(1, 2, 3, 4))
    assert v.gaps == 1
    assert v.offset_jumps == 1
    assert "missing [3]" in v.examples[0]


def test_messages_missing_at_the_end_are_gaps() -> None:
    v = analyse([(0, live((1, 1), (2, 2)))], published(1, 2, 3, 4))
    assert v.gaps == 2


def test_a_repeated_message_is_a_duplicate() -> None:
    v = analyse([(0, live((1, 1), (2, 2), (2, 2), (3, 3)))], published(1, 2, 3))
    assert v.duplicates == 1
    assert v.gaps == 0


def test_a_message_that_comes_late_is_out_of_order() -> None:
    v = analyse([(0, live((1, 1), (3, 3), (2, 2)))], published(1, 2, 3))
    assert v.out_of_order == 1
    assert v.gaps == 0


def test_unaccepted_publications_may_arrive() -> None:
    # n=2 was not accepted (no answer) but registered all the same: offsets stay gapless
    v = analyse([(0, live((1, 1), (2, 2), (3, 3)))], published(1, 3))
    assert (v.gaps, v.duplicates, v.unaccepted_delivered) == (0, 0, 1)


def test_a_reject_history_starts_a_new_segment() -> None:
    t = live((1, 1), (2, 2))
    t.requested()
    t.rejected()
    t.deliver(6, "e", 6)
    t.deliver(7, "e", 7)
    v = analyse([(0, t)], published(*range(1, 8)))
    assert (v.reject_history, v.gaps, v.offset_jumps) == (1, 0, 0)


def test_messages_while_not_subscribed_are_ignored() -> None:
    t = live((1, 1))
    t.state = "off"
    t.deliver(2, "e", 2)
    assert t.ignored == 1
    t.state = LIVE
    t.deliver(2, "e", 2)
    v = analyse([(0, t)], published(1, 2))
    assert (v.gaps, v.duplicates) == (0, 0)


def test_a_live_track_that_received_nothing_misses_what_was_published_after_it_began() -> None:
    t = Track(S, "id")
    t.state = LIVE
    t.seg_start = 1000.0
    v = analyse([(0, t)], published(1, 2, 10, 11))
    assert v.gaps == 2  # published at 1010 and 1011, after the grace period


def test_history_asks_from_the_last_position() -> None:
    t = live((1, 4))
    assert t.history() == {"streams": {S: {"epoch": "e", "offset": 4}}}
    t.requested()
    t.rejected()
    assert "since" in t.history()
