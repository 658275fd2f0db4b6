"""Circuit breaker for the RPC backend: stop calling a backend that keeps failing.

States, as in anycable-go's HTTP RPC (gobreaker settings there):

* **closed**: calls go through. Calls and transport failures are counted in a fixed
  window (10 s); when the window holds at least ``min_calls`` calls and at least
  ``failure_ratio`` of them failed, the breaker opens.
* **open**: every call is refused at once (:class:`CircuitOpen`) for ``open_for`` seconds,
  so clients get a fast, clear answer instead of waiting for a dead backend.
* **half-open**: up to ``trials`` calls are let through; if they all succeed the breaker
  closes, the first failure opens it again.

Only transport failures count (connection refused or reset, timeouts): a backend that
answers, even with HTTP 500, is reachable. Each call reports against the *generation*
it was admitted in, so a slow call admitted before a state change cannot flip the new
state.

Concurrency contract: called from many greenlets; no method yields, so no lock is needed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

from anycable_gevent.errors import RPCError

log = logging.getLogger(__name__)


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpen(RPCError):
    """The breaker refused the call: the backend is considered down."""


class CircuitBreaker:
    def __init__(
        self,
        min_calls: int = 10,
        failure_ratio: float = 0.8,
        window: float = 10.0,
        open_for: float = 5.0,
        trials: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_calls = min_calls
        self.failure_ratio = failure_ratio
        self.window = window
        self.open_for = open_for
        self.trials = trials
        self.clock = clock
        self.state = State.CLOSED
        self.generation = 0
        self._calls = 0
        self._failures = 0
        self._successes = 0
        self._admitted = 0
        self._window_end = clock() + window
        self._open_until = 0.0

    def _enter(self, state: State, now: float) -> None:
        if state is not self.state:
            level = logging.INFO if state is not State.OPEN else logging.WARNING
            log.log(level, "RPC circuit breaker %s -> %s", self.state.value, state.value)
        self.state = state
        self.generation += 1
        self._calls = self._failures = self._successes = self._admitted = 0
        if state is State.OPEN:
            self._open_until = now + self.open_for
        elif state is State.CLOSED:
            self._window_end = now + self.window

    def allow(self) -> int:
        """Admit one call; returns its generation (pass it to :meth:`record`).

        Raises:
            CircuitOpen: the breaker is open (or half-open with all trial slots taken).
        """
        now = self.clock()
        if self.state is State.OPEN:
            if now < self._open_until:
                raise CircuitOpen("RPC backend unavailable (circuit breaker open)")
            self._enter(State.HALF_OPEN, now)
        if self.state is State.HALF_OPEN:
            if self._admitted >= self.trials:
                raise CircuitOpen("RPC backend unavailable (circuit breaker half-open, trials in flight)")
            self._admitted += 1
            return self.generation
        if now >= self._window_end:
            self._calls = self._failures = 0
            self._window_end = now + self.window
        self._calls += 1
        return self.generation

    def record(self, generation: int, ok: bool) -> None:
        """Report the outcome of a call admitted in ``generation``."""
        if generation != self.generation:
            return
        now = self.clock()
        if self.state is State.HALF_OPEN:
            if not ok:
                self._enter(State.OPEN, now)
                return
            self._successes += 1
            if self._successes >= self.trials:
                self._enter(State.CLOSED, now)
            return
        if self.state is State.CLOSED and not ok:
            self._failures += 1
            if self._calls >= self.min_calls and self._failures >= self.failure_ratio * self._calls:
                self._enter(State.OPEN, now)

    def abandon(self, generation: int) -> None:
        """A call admitted in ``generation`` ended without an outcome (e.g. its greenlet was killed)."""
        if generation == self.generation and self.state is State.HALF_OPEN and self._admitted > 0:
            self._admitted -= 1
