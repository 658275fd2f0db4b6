"""Session ids: long enough, unique, and never shared between a parent and a forked child."""

from __future__ import annotations

import base64
import os

from anycable_gevent.ids import new_sid


def test_sid_carries_at_least_128_random_bits_and_is_url_safe() -> None:
    sid = new_sid()
    raw = base64.urlsafe_b64decode(sid)
    assert len(raw) * 8 >= 128
    assert all(c.isalnum() or c in "-_" for c in sid)


def test_sids_are_unique_across_pool_refills() -> None:
    sids = [new_sid() for _ in range(5000)]  # several refills of the 512-sid pool
    assert len(set(sids)) == len(sids)


def test_forked_child_does_not_reuse_the_parents_pool() -> None:
    new_sid()  # the pool now holds bytes for the next sids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.write(write, new_sid().encode())
        os._exit(0)
    os.close(write)
    child_sid = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert child_sid and child_sid != new_sid()
