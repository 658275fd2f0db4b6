"""Figures taken from outside the server: RSS and open fds (Linux /proc), Redis keys, logs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies excluded), sorted."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


def age(pid: int) -> float | None:
    """Seconds since the process started (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class ProcSample:
    pid: int
    role: str
    rss_kb: int
    fds: int


def sample_processes(roots: list[int]) -> dict[int, ProcSample]:
    """RSS and fds of every root and each of its children (a master's workers)."""
    out: dict[int, ProcSample] = {}
    for root in roots:
        kids = children(root)
        for pid, role in [(root, "master" if kids else "server"), *((k, "worker") for k in kids)]:
            rss, fds = rss_kb(pid), fd_count(pid)
            if rss is not None and fds is not None:
                out[pid] = ProcSample(pid, role, rss, fds)
    return out


# ---------------------------------------------------------------------- Redis keys

#: kinds of keys under the prefix (see README.rst, "Redis broker")
KEY_KINDS = ("session", "stream", "presence", "other")


@dataclass
class KeyCensus:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEY_KINDS, 0))
    #: keys with no expiry (every key the broker writes has one)
    persistent: list[str] = field(default_factory=list)
    #: longest remaining TTL seen per kind (seconds)
    max_ttl: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEY_KINDS, 0))
    #: stream keys whose name contains the ``mine`` marker given to :func:`census`
    ours: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def kind_of(key: str, prefix: str) -> str:
    rest = key[len(prefix) :]
    if rest.startswith("sess:"):
        return "session"
    if rest == "presence" or re.search(r"\}:p[zsic]$", rest):
        return "presence"
    if rest.startswith("{") and re.search(r"\}:[mhc]$", rest):
        return "stream"
    return "other"


def census(redis_url: str, prefix: str, mine: str = "") -> KeyCensus:
    import redis

    client: Any = redis.Redis.from_url(redis_url)
    out = KeyCensus()
    try:
        keys = [k.decode() for k in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.ttl(key)
            for key, ttl in zip(chunk, pipe.execute(), strict=True):
                if ttl == -2:
                    continue  # expired meanwhile
                kind = kind_of(key, prefix)
                out.counts[kind] += 1
                if mine and kind == "stream" and mine in key:
                    out.ours += 1
                if ttl == -1:
                    out.persistent.append(key)
                else:
                    out.max_ttl[kind] = max(out.max_ttl[kind], int(ttl))
    finally:
        client.close()
    return out


def delete_prefix(redis_url: str, prefix: str) -> int:
    import redis

    client: Any = redis.Redis.from_url(redis_url)
    n = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += client.delete(*batch)
                batch = []
        if batch:
            n += client.delete(*batch)
    finally:
        client.close()
    return n


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


# ---------------------------------------------------------------------- logs

ERROR_LINE = re.compile(r" ERR |Traceback \(most recent call last\)|\"level\":\s*\"error\"")
WARN_LINE = re.compile(r" WRN |\"level\":\s*\"warn")
#: warnings a soak causes on purpose: the banner's (public streams, no auth) and killed workers
EXPECTED_WARNING = re.compile(r"--noauth|--public|worker died pid=\d+ killed by SIGKILL")


@dataclass
class LogFigures:
    errors: int = 0
    warnings: int = 0
    #: warnings other than :data:`EXPECTED_WARNING`
    unexpected_warnings: int = 0
    examples: list[str] = field(default_factory=list)


def scan_logs(paths: list[Path], offsets: dict[Path, int] | None = None) -> LogFigures:
    """Error and warning lines in the logs (from ``offsets`` on, when given)."""
    out = LogFigures()
    for path in paths:
        try:
            with path.open("rb") as f:
                f.seek((offsets or {}).get(path, 0))
                for raw in f:
                    line = raw.decode(errors="replace").rstrip()
                    if ERROR_LINE.search(line):
                        out.errors += 1
                        if len(out.examples) < 10:
                            out.examples.append(f"{path.name}: {line[:300]}")
                    elif WARN_LINE.search(line):
                        out.warnings += 1
                        if not EXPECTED_WARNING.search(line):
                            out.unexpected_warnings += 1
                            if len(out.examples) < 10:
                                out.examples.append(f"{path.name}: {line[:300]}")
        except OSError:
            continue
    return out
