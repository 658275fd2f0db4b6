"""History settings per stream: the global limit and TTL, and overrides by stream-name pattern.

``--history_overrides`` lists ``PATTERN=LIMIT`` or ``PATTERN=LIMIT/TTL`` entries, comma
separated; the first pattern that matches a stream's name wins, and streams that match
none use ``--history_limit`` / ``--history_ttl``. Patterns are shell-style globs
(``*`` matches any text, ``/`` included; ``?`` one character; ``[abc]`` a set)::

    --history_overrides='chat/*=1000/3600,cursor/*=0'

keeps 1,000 messages for an hour on ``chat/…`` streams and nothing on ``cursor/…`` ones.
Every broker applies the result per stream. Stdlib only.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class HistorySettings:
    """How much of one stream's history is kept: ``limit`` messages for ``ttl`` seconds."""

    limit: int
    ttl: int


class HistoryPolicy:
    """Maps a stream name to its :class:`HistorySettings` (first matching rule wins)."""

    def __init__(self, default: HistorySettings, rules: Iterable[tuple[str, HistorySettings]] = ()) -> None:
        self.default = default
        self.rules = list(rules)
        self._compiled = [(re.compile(fnmatch.translate(p)), s) for p, s in self.rules]
        self._cached = lru_cache(maxsize=65536)(self._lookup)

    def _lookup(self, stream: str) -> HistorySettings:
        for pattern, settings in self._compiled:
            if pattern.match(stream):
                return settings
        return self.default

    def for_stream(self, stream: str) -> HistorySettings:
        if not self._compiled:
            return self.default
        return self._cached(stream)

    @property
    def max_ttl(self) -> int:
        """The longest TTL of any stream."""
        return max([self.default.ttl, *(s.ttl for _, s in self.rules)])

    def describe(self) -> str:
        """For the banner: ``history limit: 100, history ttl: 300s[, overrides: chat/*=1000/3600s]``."""
        text = f"history limit: {self.default.limit}, history ttl: {self.default.ttl}s"
        if self.rules:
            text += ", overrides: " + ", ".join(f"{p}={s.limit}/{s.ttl}s" for p, s in self.rules)
        return text

    @classmethod
    def parse(cls, items: Iterable[str], default: HistorySettings) -> HistoryPolicy:
        """Build from ``--history_overrides`` entries.

        Raises:
            ValueError: an entry that is not ``PATTERN=LIMIT[/TTL]`` with LIMIT >= 0 and TTL > 0.
        """
        rules = []
        for item in items:
            pattern, sep, value = item.rpartition("=")
            pattern = pattern.strip()
            if not sep or not pattern:
                raise ValueError(f"{item!r} is not PATTERN=LIMIT or PATTERN=LIMIT/TTL")
            limit_text, slash, ttl_text = value.partition("/")
            try:
                limit = int(limit_text.strip())
                ttl = int(ttl_text.strip().removesuffix("s")) if slash else default.ttl
            except ValueError:
                raise ValueError(f"{item!r}: LIMIT and TTL must be whole numbers") from None
            if limit < 0:
                raise ValueError(f"{item!r}: LIMIT must be >= 0")
            if ttl <= 0:
                raise ValueError(f"{item!r}: TTL must be > 0 seconds")
            rules.append((pattern, HistorySettings(limit, ttl)))
        return cls(default, rules)
