#!/usr/bin/env python3
"""Side-by-side runs of the broadcast benchmark: several server setups, interleaved rounds.

Each setup is a name and the extra arguments of the server; every round runs each setup
once, in turn (A B A B …), so that a drift of the machine's speed hits them alike. Prints
one table of medians with the ratio of every setup to the first, and writes every run's
JSON report to ``--out``.

    python scripts/bench/compare.py -n 5000 --rounds 3 \\
        memory='--broker=memory' redis='--broker=redis --redis_prefix=bench:'

Figures per setup: connects/s, server CPU per connection, RSS per connection, latency
p50/p99 and server CPU per 1,000 delivered in the 5/s phase, delivered/s, p99 and server
CPU per 1,000 in the burst. ``--server-cpus``/``--loadgen-cpus`` pin as the broadcast tool
does; without them nothing is pinned (forked workers may use every core).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BASE = (
    "{python} -m anycable_gevent --host=127.0.0.1 --port={{port}} --http_broadcast_port={{broadcast_port}} "
    "--public_streams --noauth --log_level=warn"
)

FIGURES = [
    ("conn/s", lambda r: r["connect"]["rate_per_s"]),
    ("srv ms/conn", lambda r: 1000 * r["connect"]["server_cpu_s"] / r["connect"]["connected"]),
    ("KB/conn", lambda r: r["memory"]["rss_kb_per_conn"]),
    ("p50 ms", lambda r: r["phases"]["latency"]["latency_ms"]["p50"]),
    ("p99 ms", lambda r: r["phases"]["latency"]["latency_ms"]["p99"]),
    ("srv ms/1k", lambda r: r["phases"]["latency"]["server_cpu_ms_per_1k"]),
    ("burst msg/s", lambda r: r["phases"]["burst"]["delivered_msgs_per_s"]),
    ("burst p99 ms", lambda r: r["phases"]["burst"]["latency_ms"]["p99"]),
    ("burst ms/1k", lambda r: r["phases"]["burst"]["server_cpu_ms_per_1k"]),
    ("loadgen %", lambda r: r["phases"]["burst"]["loadgen_saturation_pct"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setups", nargs="+", help="NAME='server args'")
    p.add_argument("-n", "--clients", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--server-cpus")
    p.add_argument("--loadgen-cpus")
    p.add_argument("--procs", type=int, default=1, help="load generator processes")
    p.add_argument("--out", default="bench-out", help="directory for the JSON reports")
    p.add_argument("--bench-arg", action="append", default=[], help="extra option of the broadcast tool (repeat)")
    args = p.parse_args()
    setups = [s.split("=", 1) for s in args.setups]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name, _ in setups}
    for rnd in range(args.rounds):
        for name, extra in setups:
            report = out / f"{name}-{rnd}.json"
            cmd = [
                str(HERE / "broadcast"),
                "-n",
                str(args.clients),
                "-q",
                "--json",
                str(report),
                "--procs",
                str(args.procs),
            ]
            if args.server_cpus:
                cmd += ["--server-cpus", args.server_cpus]
            if args.loadgen_cpus:
                cmd += ["--loadgen-cpus", args.loadgen_cpus]
            cmd += args.bench_arg
            cmd += ["--start-server", BASE.format(python=shlex.quote(sys.executable)) + " " + extra]
            print(f"round {rnd + 1}: {name}", file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            results[name].append(json.loads(report.read_text()))
    first = setups[0][0]
    head = f"{'setup':<14}" + "".join(f"{label:>14}" for label, _ in FIGURES)
    print(f"N={args.clients}, medians of {args.rounds} interleaved rounds; ratio to {first} below each")
    print(head)
    medians = {name: [statistics.median(f(r) for r in runs) for _, f in FIGURES] for name, runs in results.items()}
    for name, values in medians.items():
        print(f"{name:<14}" + "".join(f"{v:>14,.2f}" for v in values))
        if name != first:
            ratios = [v / b if b else float("nan") for v, b in zip(values, medians[first], strict=True)]
            print(f"{'  ×' + first:<14}" + "".join(f"{r:>14.2f}" for r in ratios))


if __name__ == "__main__":
    main()
