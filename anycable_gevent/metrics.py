"""Server metrics: counters and gauges with anycable-go's names (SPEC §10.5), and their outputs.

Counting is a dict increment in the worker that counts; nothing is exported from a hot
path. Cheap gauges are read from callbacks when someone asks; expensive ones (a walk over
every object, a read of ``/proc``) are refreshed every ``--stats_refresh_interval``.

Outputs: the Prometheus text (``--metrics_http``), the periodic log line
(``--metrics_log``), and per-worker snapshot files for several processes serving one port.
When :data:`DIR_ENV` names a directory, each worker writes its counters and gauges to its
own file there at every refresh (and at shutdown), and a scrape answered by any worker adds
up its own live values and the other workers' files: counters of every worker (a worker
that died keeps contributing what it counted, so totals never go backwards) and gauges of
the workers still alive. prometheus-client's multiprocess mode was not used because it turns
every increment into a locked write to a memory-mapped file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gevent

log = logging.getLogger(__name__)

#: Prefix of every exported metric name: anycable-go's, so that dashboards keep working.
PREFIX = "anycable_go_"

#: Environment variable naming the directory of per-worker snapshot files (empty = off).
DIR_ENV = "ANYCABLE_GEVENT_METRICS_DIR"

#: Counter name -> help text (anycable-go names, without the prefix).
COUNTERS: dict[str, str] = {
    "client_msg_total": "The total number of received messages from clients",
    "failed_client_msg_total": "The total number of unrecognized messages received from clients",
    "broadcast_msg_total": "The total number of messages received through PubSub (for broadcast)",
    "failed_broadcast_msg_total": "The total number of unrecognized messages received through PubSub",
    "publications_total": "The total number of publications accepted by broadcasters",
    "remote_commands_total": "The total number of remote commands received",
    "failed_auths_total": "The total number of failed authentication attempts",
    "disconnected_slow_clients_total": "The total number of clients disconnected for being too slow",
    "server_msg_total": "The total number of messages sent to clients",
    "failed_server_msg_total": "The total number of messages failed to send to clients",
    "timeout_server_msg_total": "The total number of messages timed out while sending to clients",
    "data_sent_total": "The total amount of bytes sent to clients",
    "data_rcvd_total": "The total amount of bytes received from clients",
    "rpc_call_total": "The total number of RPC calls",
    "rpc_retries_total": "The total number of retried RPC calls",
    "rpc_error_total": "The total number of failed RPC calls",
    "rpc_timeout_total": "The total number of RPC calls that timed out",
    "rpc_canceled_total": "The total number of RPC calls canceled",
    # limits of this server (not in anycable-go)
    "refused_connections_total": "The total number of connections refused by --max_conn (503)",
    "accept_errors_total": "The total number of connections that could not be accepted (out of file descriptors)",
    "handshake_timeouts_total": "The total number of connections that did not send their request in time (408)",
    "http_header_limit_total": "The total number of requests refused for a header block over the limits (431)",
    "http_body_timeouts_total": "The total number of requests whose body did not arrive in time (408)",
    "ws_message_too_big_total": "The total number of connections closed for a message over --max_message_size (1009)",
    "ws_fragment_limit_total": "The total number of connections closed for a message of too many fragments (1008)",
    "ws_frame_timeouts_total": "The total number of connections closed for a frame not finished in time (1008)",
    "subscriptions_refused_total": "The total number of subscriptions refused by --max_subscriptions",
    "streams_refused_total": "The total number of streams not started: over --max_subscription_streams",
    "history_refused_total": "The total number of history replies refused: over --max_history_messages",
    "no_pong_disconnects_total": "The total number of clients disconnected for not answering pings (--pong_timeout)",
}

#: Gauge name -> help text.
GAUGES: dict[str, str] = {
    "clients_num": "The number of active clients",
    "clients_uniq_num": "The number of unique clients (with respect to connection identifiers)",
    "broadcast_streams_num": "The number of active broadcasting streams",
    "disconnect_queue_size": "The size of delayed disconnect",
    "goroutines_num": "The number of greenlets (goroutines in anycable-go)",
    "mem_sys_bytes": "The total bytes of memory obtained from the OS (RSS)",
    "rpc_pending_num": "The number of pending RPC calls",
}

Values = tuple[dict[str, int], dict[str, float]]


class Metrics:
    """The counters and gauges of one worker process.

    ``counters`` is a plain dict on purpose: hot paths may do
    ``metrics.counters[name] += n`` directly. Everything here runs in the worker's
    greenlets and never yields, except :meth:`start`'s background loops.

    Args:
        directory: where this worker writes its snapshot file ('' = single process).
        worker: the name of this worker's file (default: the pid).
    """

    def __init__(self, directory: str = "", worker: str | None = None) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._gauges: dict[str, Callable[[], float]] = {}
        #: Gauges too expensive to compute on every read, and their last values.
        self._slow: dict[str, Callable[[], float]] = {}
        self._cache: dict[str, float] = {}
        #: Counters kept elsewhere for speed (the hub's), folded in on read.
        self._external: list[Callable[[], dict[str, int]]] = []
        self.directory = directory
        self.worker = worker or str(os.getpid())
        self._loops: list[gevent.Greenlet] = []
        self._logged: dict[str, int] = {}

    # ------------------------------------------------------------------ recording
    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def gauge(self, name: str, fn: Callable[[], float], slow: bool = False) -> None:
        """Register a gauge read from ``fn``; a ``slow`` one is refreshed periodically."""
        if slow:
            self._slow[name] = fn
            self._gauges.pop(name, None)
        else:
            self._gauges[name] = fn

    def external(self, fn: Callable[[], dict[str, int]]) -> None:
        """Register counters kept by another component, added to ours on every read."""
        self._external.append(fn)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> Values:
        """This worker's counters and gauge values, now."""
        counters = dict(self.counters)
        for fn in self._external:
            for k, v in fn().items():
                counters[k] = counters.get(k, 0) + v
        # every known gauge is exported, like anycable-go's (0 when its component is off)
        gauges: dict[str, float] = dict.fromkeys(GAUGES, 0.0)
        for name, gauge_fn in self._gauges.items():
            gauges[name] = _read(name, gauge_fn)
        for name, gauge_fn in self._slow.items():
            value = self._cache.get(name)
            gauges[name] = value if value is not None else self._cache.setdefault(name, _read(name, gauge_fn))
        return counters, gauges

    def collect(self) -> Values:
        """What a scrape reports: this worker's values plus the other workers' files."""
        counters, gauges = self.snapshot()
        if self.directory:
            others = read_directory(self.directory, exclude=self._path().name)
            counters, gauges = merge([(counters, gauges), others])
        return counters, gauges

    def prometheus(self, tags: Mapping[str, str] | None = None) -> str:
        counters, gauges = self.collect()
        return render_prometheus(counters, gauges, tags)

    # ------------------------------------------------------------------ periodic work
    def refresh(self) -> None:
        """Recompute the slow gauges and, with a directory, rewrite this worker's file."""
        for name, fn in self._slow.items():
            self._cache[name] = _read(name, fn)
        if self.directory:
            self.write_file()

    def write_file(self) -> None:
        counters, gauges = self.snapshot()
        data = {"pid": os.getpid(), "worker": self.worker, "time": time.time(), "counters": counters, "gauges": gauges}
        path = self._path()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        except OSError as exc:
            log.warning("cannot write metrics snapshot path=%s error=%s", path, exc)

    def _path(self) -> Path:
        return Path(self.directory) / f"worker-{self.worker}.json"

    def log_line(self, only: Iterable[str] = ()) -> str:
        """``name=value`` pairs, alphabetically: counter deltas since the last line, gauges."""
        counters, gauges = self.snapshot()
        values: dict[str, float] = {}
        for name, value in counters.items():
            values[name] = value - self._logged.get(name, 0)
        self._logged = counters
        values.update(gauges)
        wanted = set(only)
        return " ".join(f"{k}={_number(v)}" for k, v in sorted(values.items()) if not wanted or k in wanted)

    def start(self, refresh_interval: float, log_interval: float = 0, log_filter: Iterable[str] = ()) -> None:
        """Spawn the refresh loop and, when ``log_interval`` > 0, the log line loop."""
        from anycable_gevent.ticker import every  # gevent, in the serving process only

        self.refresh()
        self._loops.append(every(refresh_interval, self.refresh, "metrics refresh"))
        if log_interval > 0:
            only = tuple(log_filter)
            self._logged = self.snapshot()[0]
            self._loops.append(every(log_interval, lambda: log.info("%s", self.log_line(only)), "metrics log line"))

    def shutdown(self) -> None:
        for loop in self._loops:
            loop.kill(block=False)
        self._loops.clear()
        if self.directory:
            self.write_file()  # the final counts survive this worker


def _read(name: str, fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # a broken gauge must not break a scrape
        log.debug("gauge failed name=%s", name, exc_info=True)
        return 0.0


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---------------------------------------------------------------------- several workers


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_directory(directory: str, exclude: str = "") -> Values:
    """Sum the snapshot files in ``directory``: all counters, gauges of live processes only."""
    parts: list[Values] = []
    try:
        paths = sorted(Path(directory).glob("worker-*.json"))
    except OSError:
        paths = []
    for path in paths:
        if path.name == exclude:
            continue
        try:
            data = json.loads(path.read_text())
            counters = {str(k): int(v) for k, v in data["counters"].items()}
            gauges = {str(k): float(v) for k, v in data["gauges"].items()} if pid_alive(int(data["pid"])) else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.debug("skipping metrics snapshot path=%s error=%s", path, exc)
            continue
        parts.append((counters, gauges))
    return merge(parts)


def clear_directory(directory: str) -> int:
    """Remove every worker snapshot file (what a master does before it forks); returns how many."""
    removed = 0
    for path in Path(directory).glob("worker-*.json"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def merge(parts: Iterable[Values]) -> Values:
    counters: dict[str, int] = {}
    gauges: dict[str, float] = {}
    for c, g in parts:
        for k, v in c.items():
            counters[k] = counters.get(k, 0) + v
        for k, gv in g.items():
            gauges[k] = gauges.get(k, 0.0) + gv
    return counters, gauges


# ---------------------------------------------------------------------- Prometheus text

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    """``["env:prod", "region:eu"]`` (``--metrics_tags``) -> labels; bad names are cleaned up."""
    tags: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition(":")
        key = re.sub(r"[^a-zA-Z0-9_]", "_", key.strip())
        if key and not key[0].isdigit():
            tags[key] = value.strip()
    return tags


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(
    counters: Mapping[str, int], gauges: Mapping[str, float], tags: Mapping[str, str] | None = None
) -> str:
    """Prometheus text format 0.0.4 in anycable-go's layout: one block per metric,
    each preceded by an empty line, counters first, ``anycable_go_`` names."""
    pairs = [f'{k}="{_escape(v)}"' for k, v in sorted((tags or {}).items()) if _LABEL_NAME.match(k)]
    # anycable-go joins with ", "; the canonical "," is read the same by every parser
    labels = "{" + ",".join(pairs) + "}" if pairs else ""
    out: list[str] = []
    for name, value in sorted(counters.items()):
        full = PREFIX + name
        out.append(f"\n# HELP {full} {COUNTERS.get(name, name)}\n# TYPE {full} counter\n{full}{labels} {value}\n")
    for name, fvalue in sorted(gauges.items()):
        full = PREFIX + name
        out.append(f"\n# HELP {full} {GAUGES.get(name, name)}\n# TYPE {full} gauge\n{full}{labels} {_number(fvalue)}\n")
    return "".join(out)
