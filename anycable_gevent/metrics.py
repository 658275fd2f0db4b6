"""Per-worker counters and gauges with anycable-go's metric names (SPEC §10.5).

Counting is a dict increment; nothing is exported from the hot path. Gauges are read
from callbacks when someone asks (a scrape, the periodic log line).
"""

from __future__ import annotations

from collections.abc import Callable

#: Counter name -> help text (anycable-go names, without the ``anycable_go_`` prefix).
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


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._gauges: dict[str, Callable[[], float]] = {}
        #: Counters kept elsewhere for speed (the hub's), folded in on read.
        self._external: list[Callable[[], dict[str, int]]] = []

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        self._gauges[name] = fn

    def external(self, fn: Callable[[], dict[str, int]]) -> None:
        self._external.append(fn)

    def snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        """Current counters and gauge values."""
        counters = dict(self.counters)
        for fn in self._external:
            for k, v in fn().items():
                counters[k] = counters.get(k, 0) + v
        gauges = {}
        for name, gauge_fn in self._gauges.items():
            try:
                gauges[name] = float(gauge_fn())
            except Exception:  # a broken gauge must not break a scrape
                gauges[name] = 0.0
        return counters, gauges


PREFIX = "anycable_go_"


def render_prometheus(metrics: Metrics, tags: dict[str, str] | None = None) -> str:
    """Prometheus text exposition with anycable-go's names and layout."""
    counters, gauges = metrics.snapshot()
    labels = ""
    if tags:
        labels = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(tags.items())) + "}"
    out: list[str] = []
    for name, value in sorted(counters.items()):
        out.append(
            f"\n# HELP {PREFIX}{name} {COUNTERS.get(name, name)}\n# TYPE {PREFIX}{name} counter\n{PREFIX}{name}{labels} {value}\n"
        )
    for name, fvalue in sorted(gauges.items()):
        text = str(int(fvalue)) if fvalue.is_integer() else repr(fvalue)
        out.append(
            f"\n# HELP {PREFIX}{name} {GAUGES.get(name, name)}\n# TYPE {PREFIX}{name} gauge\n{PREFIX}{name}{labels} {text}\n"
        )
    return "".join(out)
