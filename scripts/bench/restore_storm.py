#!/usr/bin/env python3
"""Reconnect storm: N extended-protocol clients drop at once and come back with their sids.

Measures how long it takes until every one of them is restored (``welcome`` with
``restored: true``) and has its history answered (``confirm_history`` for its stream),
which is what a worker crash or a network blip costs. Stdlib only (uses cablebench's
frames); the load generator runs in ``--procs`` processes with one epoll each.

    python scripts/bench/restore_storm.py -n 10000 --url ws://127.0.0.1:8080/cable \\
        [--server-pid PID] [--kill-workers PID,PID]

Phases: connect N clients (``$pubsub`` public streams ``storm/<i % 100>``, ``--noauth``),
then drop every socket at once (or SIGKILL the given workers: their clients drop), then
reconnect all with ``?sid=`` immediately and time it. Prints one line of figures and,
with ``--json``, writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from multiprocessing import Pipe, Process
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cablebench.extclient import LINGER_RESET, Conn, run_phase  # noqa: E402
from cablebench.procfs import ProcessTree, raise_nofile  # noqa: E402


def worker(n: int, offset: int, args: argparse.Namespace, pipe: Any) -> None:
    u = urlsplit(args.url)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path or "/cable"
    conns = [Conn(offset + i, f"storm/{(offset + i) % 100}") for i in range(n)]
    run_phase(conns, host, port, path, False, args.timeout)
    pipe.send(("subscribed", sum(c.stage == "done" for c in conns)))
    pipe.recv()  # go: drop
    if args.kill_workers:
        pipe.recv()  # the parent killed the workers: our sockets are dead
    for c in conns:
        if c.sock is not None:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            c.sock.close()  # a reset, like a network drop
    pipe.send("dropped")
    t0 = pipe.recv()
    run_phase(conns, host, port, path, True, args.timeout)
    done = [c.done_at - t0 for c in conns if c.stage == "done"]
    restored = sum(c.restored for c in conns if c.stage == "done")  # restored and history answered
    pipe.send(("restored", len(done), restored, max(done, default=0.0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--clients", type=int, default=1000)
    p.add_argument("--url", default="ws://127.0.0.1:8080/cable")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--server-pid", type=int, help="root pid of the server (CPU of its process tree)")
    p.add_argument("--kill-workers", help="SIGKILL these pids instead of dropping the sockets")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    raise_nofile()
    share = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
    pipes, procs, offset = [], [], 0
    for n in share:
        a, b = Pipe()
        proc = Process(target=worker, args=(n, offset, args, b))
        proc.start()
        pipes.append(a)
        procs.append(proc)
        offset += n
    subscribed = sum(pipe.recv()[1] for pipe in pipes)
    tree = ProcessTree(args.server_pid) if args.server_pid else None
    for pipe in pipes:
        pipe.send("drop")
    if args.kill_workers:
        for pid in args.kill_workers.split(","):
            os.kill(int(pid), signal.SIGKILL)
        for pipe in pipes:
            pipe.send("killed")
    for pipe in pipes:
        pipe.recv()
    time.sleep(0.2)
    cpu0 = tree.cpu() if tree else None
    t0 = time.monotonic()
    for pipe in pipes:
        pipe.send(t0)
    results = [pipe.recv() for pipe in pipes]
    cpu1 = tree.cpu() if tree else None
    for proc in procs:
        proc.join()
    done = sum(r[1] for r in results)
    restored = sum(r[2] for r in results)
    slowest = max(r[3] for r in results)
    figures = {
        "clients": args.clients,
        "subscribed": subscribed,
        "reconnected": done,
        "restored": restored,
        "storm_seconds": round(slowest, 3),
        "server_cpu_seconds": round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None,
    }
    print(
        f"restore storm: {restored} of {args.clients} clients restored (history answered: {done}) "
        f"in {slowest:.2f} s; server CPU {figures['server_cpu_seconds']} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
