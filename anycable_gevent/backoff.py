"""Retry delays: capped exponential backoff with jitter (stdlib only).

Many workers that lost the same Redis must not come back in lockstep: each delay is
drawn at random between half and all of ``min(cap, base * 2**attempt)``.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success."""

    __slots__ = ("base", "cap", "attempt")

    def __init__(self, base: float = 0.25, cap: float = 10.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
