"""Percentiles, and the report: the JSON document and the table printed at the end of a run."""

from __future__ import annotations

import math
from typing import Any

SATURATED_PCT = 85.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: list[float], qs: tuple[float, ...] = (50, 90, 95, 99)) -> dict[str, float | None]:
    """p50…p99, max and mean of ``values`` (milliseconds, rounded to µs); None when empty."""
    values = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        out[f"p{q:g}"] = _r(percentile(values, q)) if values else None
    out["max"] = _r(values[-1]) if values else None
    out["mean"] = _r(sum(values) / len(values)) if values else None
    return out


def _r(x: float) -> float:
    return round(x, 3)


# ---------------------------------------------------------------------------- table


def _num(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _ms(d: dict[str, Any] | None, *keys: str) -> str:
    if not d:
        return "-"
    return " / ".join(_num(d.get(k)) for k in keys)


def table(report: dict[str, Any]) -> str:
    """The human-readable end-of-run summary."""
    cfg = report["config"]
    con = report["connect"]
    mem = report["memory"]
    lines = [
        f"broadcast bench: N={cfg['clients']:,} clients, {cfg['broadcasts']} + {cfg['burst_broadcasts']} broadcasts, "
        f"payload {cfg['payload']} B, {cfg['procs']} loadgen proc(s)",
        f"  cable {cfg['url']}   broadcast {cfg['broadcast_url']}"
        + (f"   server pid {cfg['server_pid']}" if cfg.get("server_pid") else ""),
        "",
        f"connect     {con['subscribed']:,}/{con['requested']:,} subscribed, {con['failed']:,} failed, "
        f"in {_num(con['wall_s'], 2)} s = {_num(con['rate_per_s'], 0)} conns/s; "
        f"handshake p50/p99/max {_ms(con['handshake_ms'], 'p50', 'p99', 'max')} ms",
        f"            CPU while connecting: server {_num(con.get('server_cpu_s'), 2)} s, "
        f"load generator {_num(con.get('loadgen_cpu_s'), 2)} s",
    ]
    for err, n in list(con.get("errors", {}).items())[:3]:
        lines.append(f"            {n:,} x {err}")
    if mem.get("rss_kb_per_conn") is not None:
        lines.append(
            f"memory      server RSS {mem['baseline_rss_kb'] / 1024:,.1f} MB before, "
            f"{mem['idle_rss_kb'] / 1024:,.1f} MB with all subscribed: "
            f"{mem['rss_kb_per_conn']:.1f} KB per connection"
        )
    else:
        lines.append("memory      (no --server-pid: server RSS not measured)")
    phases = report["phases"]
    if not phases:
        return "\n".join(lines)
    names = list(phases)
    heads = [f"{n} ({_num(phases[n]['rate'], 0)}/s)" for n in names]
    rows: list[tuple[str, list[str]]] = [
        ("broadcasts posted ok", [f"{p['posts_ok']}/{p['broadcasts']}" for p in phases.values()]),
        ("delivered", [f"{p['delivered']:,}/{p['expected']:,}" for p in phases.values()]),
        ("delivered %", [_num(p["delivered_pct"], 2) for p in phases.values()]),
        ("clients missing any", [_num(p["clients_missing"]) for p in phases.values()]),
        ("latency p50/p95 ms", [_ms(p["latency_ms"], "p50", "p95") for p in phases.values()]),
        ("latency p99/max ms", [_ms(p["latency_ms"], "p99", "max") for p in phases.values()]),
        ("fan-out complete p50/max ms", [_ms(p["fanout_complete_ms"], "p50", "max") for p in phases.values()]),
        ("delivered msgs/s", [_num(p["delivered_msgs_per_s"], 0) for p in phases.values()]),
        ("POST reply p50/max ms", [_ms(p["post"]["reply_ms"], "p50", "max") for p in phases.values()]),
        ("server CPU ms per 1k msgs", [_num(p["server_cpu_ms_per_1k"], 2) for p in phases.values()]),
        ("server CPU % of a core", [_num(p["server_cpu_pct"]) for p in phases.values()]),
        ("loadgen CPU ms per 1k msgs", [_num(p["loadgen_cpu_ms_per_1k"], 2) for p in phases.values()]),
        ("loadgen CPU % (all procs)", [_num(p["loadgen_cpu_pct"]) for p in phases.values()]),
        ("loadgen saturation %", [_num(p["loadgen_saturation_pct"]) for p in phases.values()]),
        ("server RSS at end MB", [_num(_mb(p.get("server_rss_kb"))) for p in phases.values()]),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    widths = [max(len(h), *(len(r[1][i]) for r in rows)) + 2 for i, h in enumerate(heads)]
    lines.append("")
    lines.append(" " * w0 + "".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for label, cells in rows:
        lines.append(label.ljust(w0) + "".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    hot = [n for n, p in phases.items() if (p["loadgen_saturation_pct"] or 0) >= SATURATED_PCT]
    if hot:
        lines.append("")
        lines.append(
            f"WARNING: the load generator was near its limit in: {', '.join(hot)} (>= {SATURATED_PCT:g} % "
            "saturation); that phase's throughput and latency may be its own, not the server's. "
            "Give it more cores (--procs, --loadgen-cpus) or lower the rate."
        )
    if report.get("duplicates"):
        lines.append("")
        lines.append(f"duplicate receipts (same client, same seq): {report['duplicates']:,}")
    lost = report.get("disconnects", {})
    if lost:
        lines.append("")
        lines.append("disconnected during the run: " + ", ".join(f"{n:,} x {why}" for why, n in lost.items()))
    return "\n".join(lines)


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024
