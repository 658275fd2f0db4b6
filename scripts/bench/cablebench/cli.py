"""Command line: options, optional server start and CPU pinning, then one run and its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from cablebench import stats
from cablebench.runner import Bench, BenchError, Options
from cablebench.server import ManagedServer, ServerError, free_port, parse_cpus

EPILOG = """\
examples:
  # against a server you started yourself (pass its pid for CPU and memory figures)
  scripts/bench/broadcast --server-pid 12345 -n 5000
  # start this server, pinned to CPU 1, the load generator on CPU 0
  scripts/bench/broadcast -n 1000 --server-cpus 1 --loadgen-cpus 0 \\
      --start-server 'anycable-gevent --host=127.0.0.1 --port={port} --http_broadcast_port={broadcast_port} \\
                      --broker=memory --public_streams --noauth'

{port} and {broadcast_port} in --start-server become free loopback ports, and the default
--url / --broadcast-url then point at them.

exit status: 0 when every client subscribed and received every broadcast exactly once,
1 when the run finished but did not (the report says what was missing), 2 on a usage or
setup error (one line on stderr).
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _cpus(text: str) -> set[int]:
    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="broadcast",
        description="Broadcast benchmark for AnyCable-compatible servers: N subscribers to one stream, "
        "M HTTP broadcasts at --rate then at --burst-rate; latency, fan-out, throughput, server CPU and memory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Options()
    g = p.add_argument_group("target")
    g.add_argument("--url", help=f"cable URL (default {d.url})")
    g.add_argument("--broadcast-url", help=f"HTTP broadcast endpoint (default {d.broadcast_url})")
    g.add_argument("--broadcast-auth", help="Authorization header for the POSTs, e.g. 'Bearer KEY'")
    g.add_argument("--stream", default=d.stream, help="stream to subscribe to and broadcast on (default %(default)s)")
    g.add_argument(
        "--identifier",
        help='subscription identifier JSON, verbatim (default {"channel":"$pubsub","stream_name":STREAM})',
    )
    g.add_argument(
        "--subprotocol",
        action="append",
        help="WebSocket subprotocol to offer; repeat for several, '' for none (default actioncable-v1-json)",
    )
    g.add_argument("--header", action="append", default=[], help="extra upgrade request header 'Name: value'")
    g.add_argument("--server-pid", type=int, help="pid of the server (its process tree is measured: CPU, RSS)")

    g = p.add_argument_group("workload")
    g.add_argument("-n", "--clients", type=_positive_int, default=d.clients, help="clients (default %(default)s)")
    g.add_argument(
        "-m",
        "--broadcasts",
        type=_positive_int,
        default=d.broadcasts,
        help="broadcasts per phase (default %(default)s)",
    )
    g.add_argument(
        "--burst-broadcasts",
        type=_positive_int,
        help="broadcasts in the burst phase (default: -m); more gives steadier burst CPU figures",
    )
    g.add_argument("--rate", type=_positive, default=d.rate, help="latency phase, broadcasts/s (default %(default)g)")
    g.add_argument(
        "--burst-rate",
        type=_non_negative,
        default=d.burst_rate,
        help="burst phase, broadcasts/s; 0 skips it (default %(default)g)",
    )
    g.add_argument("--payload", type=int, default=d.payload, help="padding bytes per message (default %(default)s)")
    g.add_argument(
        "--connect-concurrency",
        type=_positive_int,
        default=d.connect_concurrency,
        help="handshakes in flight (default %(default)s)",
    )
    g.add_argument(
        "--wait",
        type=_non_negative,
        default=d.wait,
        help="seconds to wait for deliveries after a phase's last POST (default %(default)g)",
    )
    g.add_argument(
        "--settle",
        type=_non_negative,
        default=d.settle,
        help="seconds between the last subscription and the memory sample (default %(default)g)",
    )
    g.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=d.handshake_timeout,
        help="per-client limit from connect to confirmation (default %(default)g)",
    )

    g = p.add_argument_group("load generator")
    g.add_argument(
        "--procs", type=_positive_int, default=d.procs, help="worker processes holding the clients (default 1)"
    )
    g.add_argument("--local-addrs", help="source addresses to spread clients over, e.g. 127.0.0.1,127.0.0.2")
    g.add_argument("--loadgen-cpus", type=_cpus, help="pin the load generator, e.g. 0")
    g.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    g = p.add_argument_group("server started by the tool")
    g.add_argument("--start-server", metavar="CMD", help="command to start the server under test (stopped after)")
    g.add_argument("--server-cpus", type=_cpus, help="pin the started server, e.g. 1")
    g.add_argument("--server-log", help="file for the started server's output (default: a temp file)")
    g.add_argument(
        "--server-start-timeout", type=_positive, default=30.0, help="seconds to wait for it to listen (default 30)"
    )
    return p


def _addr(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    opts = Options(
        clients=args.clients,
        broadcasts=args.broadcasts,
        burst_broadcasts=args.burst_broadcasts,
        rate=args.rate,
        burst_rate=args.burst_rate,
        payload=args.payload,
        procs=args.procs,
        stream=args.stream,
        identifier=args.identifier,
        headers=args.header,
        broadcast_auth=args.broadcast_auth,
        connect_concurrency=args.connect_concurrency,
        wait=args.wait,
        settle=args.settle,
        handshake_timeout=args.handshake_timeout,
        server_pid=args.server_pid,
        progress=not args.quiet,
    )
    if args.subprotocol is not None:
        opts.subprotocols = [s for s in args.subprotocol if s]
    if args.local_addrs:
        opts.local_addrs = [a.strip() for a in args.local_addrs.split(",") if a.strip()]
    if args.identifier is not None:
        try:
            json.loads(args.identifier)
        except ValueError:
            parser.error(f"--identifier is not JSON: {args.identifier!r}")
    if args.server_cpus and not args.start_server:
        parser.error("--server-cpus needs --start-server (pin your own server with taskset)")
    if args.start_server and args.server_pid:
        parser.error("--server-pid and --start-server exclude each other")
    return opts


def _server_command(args: argparse.Namespace, opts: Options) -> str | None:
    """--start-server with its {port} placeholders filled in; the URLs follow.

    The default --url / --broadcast-url use the ports the command got, and the same
    placeholders may appear in explicit URLs (a server with one port for both).
    """
    command: str | None = args.start_server
    ports: dict[str, str] = {}
    if command:
        for name in ("port", "broadcast_port"):
            if "{" + name + "}" in command:
                ports[name] = str(free_port())
                command = command.replace("{" + name + "}", ports[name])
    if "port" in ports:
        opts.url = f"ws://127.0.0.1:{ports['port']}/cable"
    if "broadcast_port" in ports:
        opts.broadcast_url = f"http://127.0.0.1:{ports['broadcast_port']}/_broadcast"
    opts.url = args.url or opts.url
    opts.broadcast_url = args.broadcast_url or opts.broadcast_url
    for name, value in ports.items():
        opts.url = opts.url.replace("{" + name + "}", value)
        opts.broadcast_url = opts.broadcast_url.replace("{" + name + "}", value)
    return command


def _run(args: argparse.Namespace, opts: Options, command: str | None) -> dict[str, Any]:
    server: ManagedServer | None = None
    try:
        if command:
            server = ManagedServer(command, args.server_cpus, args.server_log)
            addrs = list(dict.fromkeys([_addr(opts.url, 80), _addr(opts.broadcast_url, 80)]))
            server.start(addrs, args.server_start_timeout)
            opts.server_pid = server.pid
            if not args.quiet:
                print(f"started server pid {server.pid}: {command} (log {server.log_path})", file=sys.stderr)
        if args.loadgen_cpus:
            os.sched_setaffinity(0, args.loadgen_cpus)  # the workers inherit it
        report = Bench(opts).run()
    finally:
        if server is not None:
            status = server.stop()
            if not args.quiet:
                print(f"server stopped (status {status}); log {server.log_path}", file=sys.stderr)
    if command:
        report["config"]["server_command"] = command
        report["config"]["server_cpus"] = sorted(args.server_cpus) if args.server_cpus else None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    opts = _options(args, parser)
    command = _server_command(args, opts)
    try:
        report = _run(args, opts, command)
    except (BenchError, ServerError) as exc:
        print(f"broadcast: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("broadcast: interrupted", file=sys.stderr)
        return 130
    print(stats.table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if clean(report) else 1


def clean(report: dict[str, Any]) -> bool:
    """Every client subscribed and got every broadcast exactly once (exit status 0)."""
    con = report["connect"]
    if con["subscribed"] != con["requested"] or report["duplicates"] or not report["phases"]:
        return False
    return all(p["posts_ok"] == p["broadcasts"] and p["delivered"] == p["expected"] for p in report["phases"].values())
