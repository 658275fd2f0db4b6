"""Command line of ``scripts/soak``: options, the summary, the exit code."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from soaktool.run import Check, Options, run
from soaktool.topology import SERVER_TTLS, TOPOLOGIES

DESCRIPTION = """\
Soak test: N extended-protocol clients on M public streams ($pubsub, --public_streams
--noauth), a steady rate of numbered publications, random socket kills (the clients come
back with ?sid= and restore, or some as new sessions resubscribing from their offsets), random unsubscribe/resubscribe with history from the last
offset, optionally SIGKILL of a worker; checks that every client got every accepted
message of its streams exactly once and in order, and samples RSS, fds, Redis keys and
log errors. Exit code 0 when every check passes, 1 when one fails, 2 on a setup error.

  scripts/soak --topology workers --minutes 10 --kill-workers-every 30
  scripts/soak --url ws://10.0.0.5:8080/cable --broadcast-url http://10.0.0.5:8090/_broadcast \\
      --server-pid 4242 --log /var/log/anycable.log --redis-url redis://10.0.0.6 --redis-prefix anycable:
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/soak", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_argument_group("servers")
    where.add_argument("--topology", choices=TOPOLOGIES, help="start the servers here (see README.rst)")
    where.add_argument("--url", action="append", default=[], help="WebSocket URL of a running server (repeatable)")
    where.add_argument("--broadcast-url", action="append", default=[], help="its broadcast URL(s) (repeatable)")
    where.add_argument("--broadcast-key", default=os.environ.get("ANYCABLE_BROADCAST_KEY", ""))
    where.add_argument(
        "--server-pid", type=int, action="append", default=[], help="for RSS/fd figures (a master: its workers too)"
    )
    where.add_argument("--log", type=Path, action="append", default=[], help="server log to count errors in")
    where.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    where.add_argument("--redis-prefix", help="key prefix (self-started: soak:<random>:, deleted at the end)")
    where.add_argument("--server-arg", action="append", default=[], help="extra option for self-started servers")
    load = p.add_argument_group("load")
    load.add_argument("--minutes", type=float, default=10.0)
    load.add_argument("--seconds", type=float, help="duration in seconds (instead of --minutes)")
    load.add_argument("-n", "--clients", type=int, default=200)
    load.add_argument("--streams", type=int, default=20)
    load.add_argument("--streams-per-client", type=int, default=3)
    load.add_argument("--rate", type=float, default=50.0, help="publications per second, over all streams")
    load.add_argument("--pad", type=int, default=0, help="extra payload bytes per message")
    load.add_argument("--kill-rate", type=float, default=2.0, help="socket kills per second")
    load.add_argument(
        "--fresh-fraction", type=float, default=0.1, help="share of killed clients that come back without their sid"
    )
    load.add_argument("--toggle-rate", type=float, default=2.0, help="unsubscribe/resubscribe per second")
    load.add_argument(
        "--kill-workers-every", type=float, default=0.0, metavar="S", help="SIGKILL a worker every S seconds"
    )
    load.add_argument("--warmup", type=float, help="seconds before the first sample (default: 10%% of the run, 5-60)")
    load.add_argument("--seed", type=int, default=None)
    limits = p.add_argument_group("limits (a check fails beyond them)")
    limits.add_argument("--max-reject-history", type=int, default=0, help="-1: any")
    limits.add_argument("--max-restore-failures", type=int, default=0, help="-1: any")
    limits.add_argument("--max-log-errors", type=int, default=0)
    limits.add_argument("--max-fd-growth", type=int, default=32)
    limits.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    limits.add_argument(
        "--sessions-ttl", type=int, help=f"the server's --sessions_ttl (self-started: {SERVER_TTLS['sessions_ttl']})"
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the figures here")
    out.add_argument("--workdir", type=Path, help="server logs of a self-started topology (default: a temp dir)")
    out.add_argument("--keep-keys", action="store_true", help="do not delete the self-started run's Redis keys")
    out.add_argument("-q", "--quiet", action="store_true")
    return p


def _options(a: argparse.Namespace, p: argparse.ArgumentParser) -> Options:
    if bool(a.topology) == bool(a.url):
        p.error("give either --topology or --url")
    if a.url and not a.broadcast_url:
        p.error("--url needs --broadcast-url")
    if a.kill_workers_every and not (a.topology == "workers" or a.server_pid):
        p.error("--kill-workers-every needs --topology workers or --server-pid of a master")
    duration = a.seconds if a.seconds is not None else a.minutes * 60
    warmup = a.warmup if a.warmup is not None else min(max(duration / 10, 5.0), 60.0)
    prefix = a.redis_prefix or (f"soak:{uuid.uuid4().hex[:8]}:" if a.topology else "anycable:")
    sessions_ttl = a.sessions_ttl
    if sessions_ttl is None:
        sessions_ttl = SERVER_TTLS["sessions_ttl"] if a.topology else 300
    say = (lambda _text: None) if a.quiet else (lambda text: print(f"soak: {text}", flush=True))
    return Options(
        duration=duration,
        topology=a.topology,
        urls=a.url,
        broadcast_urls=a.broadcast_url,
        broadcast_key=a.broadcast_key,
        server_pids=a.server_pid,
        logs=a.log,
        redis_url=a.redis_url if (a.topology or a.redis_prefix) else "",
        redis_prefix=prefix,
        clients=a.clients,
        streams=a.streams,
        streams_per_client=a.streams_per_client,
        rate=a.rate,
        pad=a.pad,
        kill_rate=a.kill_rate,
        fresh_fraction=a.fresh_fraction,
        toggle_rate=a.toggle_rate,
        kill_workers_every=a.kill_workers_every,
        warmup=warmup,
        sessions_ttl=sessions_ttl,
        max_reject_history=a.max_reject_history,
        max_restore_failures=a.max_restore_failures,
        max_log_errors=a.max_log_errors,
        max_fd_growth=a.max_fd_growth,
        max_rss_growth_mb=a.max_rss_growth_mb,
        seed=a.seed if a.seed is not None else int(time.time()),
        workdir=a.workdir or Path(tempfile.mkdtemp(prefix="soak-")),
        keep_keys=a.keep_keys,
        server_args=a.server_arg,
        say=say,
    )


def _kb(n: int) -> str:
    return f"{n / 1024:+.1f} MB" if abs(n) >= 1024 else f"{n:+d} KB"


def summary(f: dict[str, Any], checks: list[Check]) -> str:
    lines = [
        f"soak {f['topology']} {f['seconds']:.0f}s: {f['clients']} clients, {f['streams']} streams "
        f"({f['streams_per_client']} each), published {f['published_accepted']} accepted / "
        f"{f['published_not_accepted']} not",
        f"  reconnects {f['reconnects']} (socket kills {f['socket_kills']}, worker kills {f['worker_kills']}, "
        f"server closes {f['server_closes']}), restores {f['restores']}, failed restores {f['restore_failed']}, "
        f"new sessions {f['fresh_sessions']}, "
        f"connect errors {f['connect_errors']}, unsubscribe/resubscribe {f['unsubscribes']}/{f['resubscribes']}",
        f"  messages checked {f['checked']}, duplicates {f['duplicates']}, gaps {f['gaps']}, "
        f"out of order {f['out_of_order']}, reject_history {f['reject_history']}, "
        f"unaccepted delivered {f['unaccepted_delivered']}, ignored after unsubscribe {f['ignored_after_unsubscribe']}",
    ]
    procs = f.get("processes")
    if procs:
        rss0, rss1 = procs["rss_kb_total"]
        fd0, fd1 = procs["fds_total"]
        per = ", ".join(
            f"{procs['end'][p]['role']} {p} {_kb(g)}" for p, g in procs["rss_growth_kb"].items() if p in procs["end"]
        )
        lines.append(
            f"  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MB ({per or 'no process lived through'}"
            f"{'; replaced ' + str(len(procs['replaced'])) if procs['replaced'] else ''}), fds {fd0} -> {fd1}"
        )
    keys = f.get("redis_keys")
    if keys:
        w, e = keys["warmup"], keys["end"]
        lines.append(
            f"  Redis keys {sum(w.values())} -> {sum(e.values())} "
            f"(sessions {w['session']} -> {e['session']}, streams {w['stream']} -> {e['stream']}, "
            f"presence {w['presence']} -> {e['presence']}, other {w['other']} -> {e['other']}; "
            f"without TTL {len(keys['persistent'])})"
        )
    lines.append(
        f"  log errors {f['log_errors']}, warnings {f['log_warnings']} "
        f"({f['log_unexpected_warnings']} other than the banner's and killed workers')"
    )
    for example in f.get("log_examples", [])[:3]:
        lines.append(f"    {example}")
    for example in f.get("problem_examples", [])[:5]:
        lines.append(f"    {example}")
    failed = [c for c in checks if not c.ok]
    if failed:
        lines.append("FAILED: " + "; ".join(f"{c.name} = {c.value} (want {c.limit})" for c in failed))
    else:
        lines.append(f"OK: {len(checks)} checks passed")
    return "\n".join(lines)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    opts = _options(a, p)
    _raise_nofile()
    try:
        figures, checks = run(opts)
    except (RuntimeError, OSError) as exc:
        print(f"soak: setup failed: {exc}", file=sys.stderr)
        return 2
    if opts.topology:
        figures["workdir"] = str(opts.workdir)
    figures["seed"] = opts.seed
    print(summary(figures, checks), flush=True)
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0 if all(c.ok for c in checks) else 1
