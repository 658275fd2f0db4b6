#!/usr/bin/env python3
"""Capacity of one topology: memory per connection, idle CPU, broadcast delivery, restore after a crash.

In one run: start the server (or use ``--url`` with ``--server-pid``), connect N
extended-protocol clients (``actioncable-v1-ext-json``, one ``$pubsub`` public stream, the
server runs with ``--public_streams --noauth``), hold them while server pings flow, and measure

1. **memory per connection**: server RSS (summed over master and workers) with everybody
   subscribed minus RSS before the first connection, over N;
2. **idle CPU**: the server's CPU % (100 = one core) over ``--idle`` seconds of holding the
   idle connections (pings every ``--ping-interval`` s; the pings received are counted);
3. **delivery**: ``--broadcasts`` broadcasts POSTed at ``--rate``/s on the stream all N
   clients hold; p50/p99 of POST → a client has it, over every delivery, and per broadcast
   the time until the last client has it;
4. **restore**: SIGKILL the worker(s) (one worker: the server process, which is then started
   again as a supervisor would); every client notices, reconnects with ``?sid=``, retrying
   while nobody listens, and asks for the history after its last offset; time from the kill
   until each has ``confirm_history`` after ``welcome`` with ``restored: true``; how many were
   restored, got a new session instead, or never finished.

    python scripts/bench/capacity.py -n 10000                    # 1 worker, Redis broker
    python scripts/bench/capacity.py -n 20000 --workers 2 --reuseport
    python scripts/bench/capacity.py -n 10000 --broker memory --skip-restore --server-cpus 1 --loadgen-cpus 0

The clients run in ``--procs`` processes with one epoll each (``cablebench.extclient``,
shared with ``restore_storm.py``); stdlib only, plus redis-py to read and remove the keys of
this run's ``--redis_prefix``. Prints one line of figures; ``--json`` writes all of them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shlex
import signal
import sys
import time
import uuid
from collections import Counter
from multiprocessing import Pipe, Process
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cablebench import wsframe  # noqa: E402
from cablebench.extclient import Clients, Conn  # noqa: E402
from cablebench.procfs import ProcessTree, cpu_seconds, descendants, raise_nofile  # noqa: E402
from cablebench.server import ManagedServer, free_port, parse_cpus  # noqa: E402
from cablebench.stats import summary  # noqa: E402

STREAM = "capacity"
PING = b'"type":"ping"'
SEQ = b'"seq":'
# the tail of a stream message's frame: ...,"stream_id":"capacity","epoch":"…","offset":N}
POSITION_RE = re.compile(rb'"epoch":"([^"]*)","offset":(\d+)')


# --------------------------------------------------------------------------- load generator process


class Loadgen:
    """One process's share of the clients: connect, hold (count pings and receipts), restore."""

    def __init__(self, offset: int, n: int, args: argparse.Namespace, pipe: Connection) -> None:
        u = urlsplit(args.url)
        self.args, self.pipe = args, pipe
        self.conns = [Conn(offset + i, STREAM) for i in range(n)]
        addrs = [a for a in (args.local_addrs or "").split(",") if a]
        self.clients = Clients(u.hostname or "127.0.0.1", u.port or 80, u.path or "/cable", None, addrs, self.on_data)
        self.clients.watch(pipe.fileno(), self.on_command)
        self.pings = 0
        self.receipts: dict[int, list[float]] = {}
        self.seen: dict[int, int] = {}  # client → bitmap of the seqs it has
        self.duplicates = 0
        self.last: dict[Conn, bytes] = {}
        self.tails: dict[Conn, bytes] = {}
        self.dropped: Counter[str] = Counter()  # before the kill
        self.armed = False
        self.deadline = 0.0
        self.running = True
        # restore bookkeeping
        self.queue: list[Conn] = []  # dropped, waiting for their (next) attempt
        self.retry_at: dict[int, float] = {}
        self.in_flight = 0
        self.errors: Counter[str] = Counter()
        self.finished = 0
        #: the clients to restore: those subscribed when armed (set then)
        self.target = 0
        self.first_drop = 0.0

    # -- what connections that are done (subscribed or restored) receive, scanned raw
    def on_data(self, c: Conn, data: bytes, now: float) -> None:
        tail = self.tails.pop(c, None)
        if tail:
            data = tail + data
        self.pings += data.count(PING)
        if SEQ in data:
            for m in wsframe.SEQ_RE.finditer(data):
                seq = int(m.group(1))
                bit = 1 << seq
                have = self.seen.get(c.i, 0)
                if have & bit:
                    self.duplicates += 1
                    continue
                self.seen[c.i] = have | bit
                self.receipts.setdefault(seq, []).append(now)
            self.last[c] = data  # its epoch and offset are read later, off the timed path
        if data[-1] in wsframe.TAIL_BYTES:  # a "seq":N or "type":"ping" may be cut by this read
            self.tails[c] = wsframe.carry_tail(data)

    def note_positions(self) -> None:
        """Each client's last stream position, for its history request after a restore."""
        for c, data in self.last.items():
            found = POSITION_RE.findall(data)
            if found:
                epoch, offset = found[-1]
                c.epoch, c.offset = epoch.decode(), int(offset)
        self.last = {}

    def on_command(self) -> None:
        cmd = self.pipe.recv()
        if cmd == "stats":
            t = os.times()
            received = sum(map(len, self.receipts.values()))
            self.pipe.send(("stats", self.pings, received, dict(self.dropped), t.user, t.system))
        elif cmd == "receipts":
            self.pipe.send(("receipts", self.receipts, self.duplicates))
            self.receipts, self.seen, self.duplicates = {}, {}, 0
            self.note_positions()
        elif cmd == "arm":
            self.armed = True
            self.target = sum(c.stage == "done" for c in self.conns)
            self.deadline = time.monotonic() + self.args.restore_timeout
            self.pipe.send("armed")
        elif cmd == "quit":
            self.running = False

    # -- phases
    def connect(self) -> None:
        todo = list(reversed(self.conns))
        limit = max(1, self.args.connect_concurrency // self.args.procs)
        in_flight, left = 0, len(self.conns)
        errors: Counter[str] = Counter()
        deadline = time.monotonic() + self.args.connect_timeout
        while left and time.monotonic() < deadline:
            while todo and in_flight < limit:
                self.clients.open(todo.pop(), False)
                in_flight += 1
            for c in self.clients.poll(0.2):
                if c.stage == "dropped":  # was done, counted then
                    continue
                in_flight -= 1
                left -= 1
                if c.stage != "done":
                    errors[c.error] += 1
        ok = sum(c.stage == "done" for c in self.conns)
        handshake = [1000 * (c.done_at - c.started_at) for c in self.conns if c.stage == "done"]
        self.pipe.send(("connected", ok, dict(errors), handshake))

    def hold(self) -> None:
        """Until told to quit: read everything; once armed, reconnect dropped clients with their sids."""
        while self.running:
            for c in self.clients.poll(0.1):
                self.changed(c)
            if self.armed:
                self.start_attempts()
                if self.finished == self.target or time.monotonic() > self.deadline:
                    self.report_restore()
                    self.armed = False

    def changed(self, c: Conn) -> None:
        if c.stage == "dropped":
            if not self.armed:
                self.dropped[c.error] += 1
                return
            if not self.first_drop:
                self.first_drop = time.monotonic()
            if c.restoring:  # restored, then dropped again
                self.finished -= 1
            self.queue.append(c)  # the first attempt at once, as a client seeing its socket close
        elif c.stage == "failed":  # an attempt to restore failed: try again a little later
            self.in_flight -= 1
            self.errors[c.error] += 1
            delay = self.args.retry_delay * random.uniform(0.5, 1.5)
            self.retry_at[c.i] = time.monotonic() + delay
            self.queue.append(c)
        elif c.stage == "done" and c.restoring:
            self.in_flight -= 1
            self.finished += 1

    def start_attempts(self) -> None:
        limit = self.args.restore_concurrency // self.args.procs if self.args.restore_concurrency else 1 << 30
        now = time.monotonic()
        waiting = []
        for c in self.queue:
            if self.in_flight < limit and self.retry_at.get(c.i, 0.0) <= now:
                self.in_flight += 1
                self.clients.open(c, True)
            else:
                waiting.append(c)
        self.queue = waiting

    def report_restore(self) -> None:
        done = [c for c in self.conns if c.stage == "done" and c.restoring]
        self.pipe.send(
            (
                "restored",
                [c.done_at for c in done],
                sum(c.restored for c in done),
                self.target - len(done),
                sum(c.attempts - 1 for c in self.conns),  # attempts after the first connect
                dict(self.errors),
                self.first_drop,
            )
        )


def loadgen_main(offset: int, n: int, args: argparse.Namespace, pipe: Connection) -> None:
    lg = Loadgen(offset, n, args, pipe)
    lg.connect()
    lg.hold()


# --------------------------------------------------------------------------- parent


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipes: list[Connection] = []
        self.procs: list[Process] = []
        self.server: ManagedServer | None = None
        self.server_cmd = ""
        self.root_pid = args.server_pid or 0
        self.figures: dict[str, Any] = {}

    # -- server
    def start_server(self) -> None:
        a = self.args
        port, bport = free_port(), free_port()
        a.url = f"ws://127.0.0.1:{port}/cable"
        a.broadcast_url = f"http://127.0.0.1:{bport}/_broadcast"
        parts = [
            shlex.quote(sys.executable),
            "-m anycable_gevent --host=127.0.0.1",
            f"--port={port} --http_broadcast_port={bport}",
            "--public_streams --noauth --log_level=warn --max_conn=0",
            f"--ping_interval={a.ping_interval:g} --broker={a.broker} --workers={a.workers}",
        ]
        if a.pubsub:
            parts.append(f"--pubsub={a.pubsub}")
        if a.uses_redis:
            parts.append(f"--redis_url={shlex.quote(a.redis_url)} --redis_prefix={shlex.quote(a.redis_prefix)}")
        if a.reuseport:
            parts.append("--reuseport")
        parts += [shlex.quote(x) for x in a.server_arg]
        self.server_cmd = " ".join(parts)
        self.server_addrs = [("127.0.0.1", port), ("127.0.0.1", bport)]
        self.server = self._launch(a.server_log)

    def _launch(self, log: str | None) -> ManagedServer:
        cpus = parse_cpus(self.args.server_cpus) if self.args.server_cpus else None
        server = ManagedServer(self.server_cmd, cpus, log)
        server.start(self.server_addrs, 30.0)
        self.root_pid = server.pid
        if self.args.workers > 1:  # wait for the workers to be forked and serving
            deadline = time.monotonic() + 30
            while len(descendants(server.pid)) < self.args.workers + 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        return server

    def workers(self) -> list[int]:
        pids = descendants(self.root_pid)
        return [p for p in pids if p != self.root_pid] or [self.root_pid]

    # -- load generator
    def start_loadgen(self) -> None:
        a = self.args
        share = [a.clients // a.procs + (1 if i < a.clients % a.procs else 0) for i in range(a.procs)]
        offset = 0
        for n in share:
            mine, theirs = Pipe()
            proc = Process(target=loadgen_main, args=(offset, n, a, theirs), daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
            offset += n

    def ask(self, cmd: str) -> list[Any]:
        for p in self.pipes:
            p.send(cmd)
        return [p.recv() for p in self.pipes]

    def loadgen_cpu(self) -> float:
        return cpu_seconds([os.getpid(), *(p.pid for p in self.procs if p.pid)])

    # -- phases
    def run(self) -> dict[str, Any]:
        a = self.args
        tree = ProcessTree(self.root_pid)
        time.sleep(a.settle)
        rss0 = tree.rss() or 0
        t0 = time.monotonic()
        cpu0 = tree.cpu()
        lcpu0 = cpu_seconds([os.getpid()])
        self.start_loadgen()
        got = [p.recv() for p in self.pipes]
        subscribed = sum(g[1] for g in got)
        errors: Counter[str] = Counter()
        handshake: list[float] = []
        for g in got:
            errors.update(g[2])
            handshake += g[3]
        connect_s = time.monotonic() - t0
        cpu1 = tree.cpu()
        lcpu1 = self.loadgen_cpu()
        self.figures["connect"] = {
            "subscribed": subscribed,
            "failed": a.clients - subscribed,
            "errors": dict(errors),
            "wall_s": round(connect_s, 3),
            "rate_per_s": round(subscribed / connect_s, 1),
            "handshake_ms": summary(handshake),
            "server_cpu_s": round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None,
            "loadgen_cpu_s": round(lcpu1 - lcpu0, 3),
        }
        log(f"connected {subscribed}/{a.clients} in {connect_s:.1f} s {dict(errors) or ''}")
        time.sleep(a.settle)
        rss1 = tree.rss() or 0
        self.figures["memory"] = {
            "baseline_rss_kb": rss0,
            "rss_kb": rss1,
            "rss_kb_per_conn": round((rss1 - rss0) / subscribed, 2) if subscribed else None,
            "processes": len(tree.pids()),
        }
        self.figures["redis"] = redis_figures(a)
        self.idle(tree)
        self.deliver(subscribed, 1, a.broadcasts, "delivery")
        if not a.skip_restore and self.server is None and self.workers() == [self.root_pid]:
            log("restore skipped: the server at --url has no workers that its master would replace")
        elif not a.skip_restore:
            self.restore(subscribed)
        for p in self.pipes:
            p.send("quit")
        for proc in self.procs:
            proc.join(10)
        return self.figures

    def idle(self, tree: ProcessTree) -> None:
        a = self.args
        pings0 = sum(s[1] for s in self.ask("stats"))
        c0, l0, t0 = tree.cpu(), self.loadgen_cpu(), time.monotonic()
        log(f"holding idle for {a.idle:g} s")
        time.sleep(a.idle)
        c1, l1, t1 = tree.cpu(), self.loadgen_cpu(), time.monotonic()
        stats = self.ask("stats")
        pings = sum(s[1] for s in stats) - pings0
        dropped: Counter[str] = Counter()
        for s in stats:
            dropped.update(s[3])
        dt = t1 - t0
        self.figures["idle"] = {
            "seconds": round(dt, 2),
            "server_cpu_pct": round(100 * (c1 - c0) / dt, 2) if c0 is not None and c1 is not None else None,
            "loadgen_cpu_pct": round(100 * (l1 - l0) / dt, 2),
            "pings_per_s": round(pings / dt, 1),
            "pings_expected_per_s": round(self.figures["connect"]["subscribed"] / a.ping_interval, 1),
            "dropped": dict(dropped),
        }

    def deliver(self, clients: int, first: int, count: int, name: str) -> None:
        a = self.args
        u = urlsplit(a.broadcast_url)
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=10)
        sent: dict[int, float] = {}
        status: Counter[int] = Counter()
        pad = "x" * a.payload
        tree = ProcessTree(self.root_pid)
        cpu0, lcpu0 = tree.cpu(), self.loadgen_cpu()
        us0 = self.ask("stats")
        start = time.monotonic()
        log(f"{name}: {count} broadcasts at {a.rate:g}/s")
        for k in range(count):
            seq = first + k
            delay = start + k / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = json.dumps({"stream": STREAM, "data": json.dumps({"seq": seq, "pad": pad})})
            sent[seq] = time.monotonic()
            conn.request("POST", u.path or "/_broadcast", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            status[resp.status] += 1
        conn.close()
        expected = clients * sum(status[s] for s in (200, 201, 202))
        deadline = time.monotonic() + a.wait
        while time.monotonic() < deadline:
            if sum(s[2] for s in self.ask("stats")) >= expected:
                break
            time.sleep(0.05)
        wall = time.monotonic() - start
        cpu1, lcpu1 = tree.cpu(), self.loadgen_cpu()
        us1 = self.ask("stats")
        user = sum(b[4] - a[4] for a, b in zip(us0, us1, strict=True))
        system = sum(b[5] - a[5] for a, b in zip(us0, us1, strict=True))
        merged: dict[int, list[float]] = {}
        duplicates = 0
        for _, receipts, dup in self.ask("receipts"):
            duplicates += dup
            for seq, times in receipts.items():
                if seq in sent:
                    merged.setdefault(seq, []).extend(times)
        latency = [1000 * (t - sent[seq]) for seq, times in merged.items() for t in times]
        # per broadcast, until the last client has it (only broadcasts that reached everybody)
        fanout = [1000 * (max(times) - sent[seq]) for seq, times in merged.items() if len(times) >= clients]
        self.figures[name] = {
            "broadcasts": count,
            "post_status": {str(k): v for k, v in status.items()},
            "expected": expected,
            "delivered": len(latency),
            "duplicates": duplicates,
            "latency_ms": summary(latency),
            "fanout_complete_ms": summary(fanout),
            "fanout_incomplete": len(sent) - len(fanout),
            "wall_s": round(wall, 3),
            "server_cpu_ms_per_1k": round(1e6 * (cpu1 - cpu0) / len(latency), 2)
            if latency and cpu0 is not None and cpu1 is not None
            else None,
            "loadgen_cpu_ms_per_1k": round(1e6 * (lcpu1 - lcpu0) / len(latency), 2) if latency else None,
            "loadgen_clients_user_sys_s": [round(user, 2), round(system, 2)],
        }

    def restore(self, subscribed: int) -> None:
        a = self.args
        for r in self.ask("arm"):
            assert r == "armed", r
        victims = self.workers()
        master_cpu = cpu_seconds([self.root_pid]) if self.root_pid not in victims else 0.0
        log(f"SIGKILL {victims}; {subscribed} clients reconnect with their sids")
        net0 = tcp_counters()
        lcpu0 = self.loadgen_cpu()
        t_kill = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        boot_s = None
        if self.server is not None and victims == [self.root_pid]:
            # one worker: it was the server; start it again as a supervisor would (Restart=always)
            self.server.stop()  # reaps it (and its log)
            log_path = f"{a.server_log}.restarted" if a.server_log else None
            self.server = self._launch(log_path)
            boot_s = round(time.monotonic() - t_kill, 3)
        results = [p.recv() for p in self.pipes]
        cpu = ProcessTree(self.root_pid).cpu()
        net1 = tcp_counters()
        lcpu1 = self.loadgen_cpu()
        done_at: list[float] = []
        restored = not_finished = retries = 0
        errors: Counter[str] = Counter()
        first_drop = min((r[6] for r in results if r[6]), default=0.0)
        for _, times, rest, nf, rt, errs, _fd in results:
            done_at += times
            restored += rest
            not_finished += nf
            retries += rt
            errors.update(errs)
        since_kill = [t - t_kill for t in done_at]
        self.figures["restore"] = {
            "clients": subscribed,
            "restored": restored,
            "new_session": len(done_at) - restored,
            "not_finished": not_finished,
            "all_done_s": round(max(since_kill), 3) if since_kill else None,
            "done_s": summary(since_kill),
            "first_drop_s": round(first_drop - t_kill, 3) if first_drop else None,
            "server_restart_s": boot_s,
            "failed_attempts": sum(errors.values()),
            "errors": dict(errors.most_common(8)),
            "reconnects": retries,
            # system-wide (other processes' connections count too): SYNs dropped on a full
            # accept queue, and SYNs sent again after a drop (1 s, then 3 s, 7 s … later)
            "tcp": {k: net1.get(k, 0) - net0.get(k, 0) for k in TCP_COUNTERS},
            "server_cpu_s": round(cpu - master_cpu, 3) if cpu is not None else None,
            "loadgen_cpu_s": round(lcpu1 - lcpu0, 3),
            "killed": victims,
        }
        # every restored client still receives broadcasts
        self.deliver(subscribed, a.broadcasts + 1, 1, "after_restore")

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        if self.server is not None:
            self.server.stop()


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")


def tcp_counters() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (for the whole network namespace)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            out.update(zip(head.split()[1:], map(int, values.split()[1:]), strict=False))
    return out


def redis_figures(a: argparse.Namespace) -> dict[str, Any] | None:
    if not a.count_redis_keys:
        return None
    import redis

    r = redis.Redis.from_url(a.redis_url)
    keys = [k for k in r.scan_iter(match=f"{a.redis_prefix}*", count=1000)]
    sessions = [k for k in keys if k.startswith(f"{a.redis_prefix}sess:".encode())]
    sample = random.sample(sessions, min(200, len(sessions)))
    usage = [r.memory_usage(k) or 0 for k in sample]
    return {
        "keys": len(keys),
        "session_keys": len(sessions),
        "session_bytes_avg": round(sum(usage) / len(usage), 1) if usage else None,
    }


def redis_cleanup(a: argparse.Namespace) -> int:
    import redis

    r = redis.Redis.from_url(a.redis_url)
    removed = 0
    batch: list[bytes] = []
    for k in r.scan_iter(match=f"{a.redis_prefix}*", count=1000):
        batch.append(k)
        if len(batch) >= 1000:
            removed += r.unlink(*batch)
            batch = []
    if batch:
        removed += r.unlink(*batch)
    return removed


def log(msg: str) -> None:
    print(f"capacity: {msg}", file=sys.stderr, flush=True)


def line(f: dict[str, Any], a: argparse.Namespace) -> str:
    topo = f"{a.clients:,} clients, {a.workers} worker{'s' if a.workers > 1 else ''}, broker {a.broker}"
    con, mem, idle, dl = f["connect"], f["memory"], f["idle"], f["delivery"]
    parts = [
        f"{topo}: subscribed {con['subscribed']:,} ({con['rate_per_s']:,.0f}/s)",
        f"{mem['rss_kb_per_conn']} KB/conn",
        f"idle CPU {idle['server_cpu_pct']} % ({idle['pings_per_s']:,.0f} pings/s)",
        f"delivery p50/p99 {dl['latency_ms']['p50']}/{dl['latency_ms']['p99']} ms "
        f"(fan-out max {dl['fanout_complete_ms']['max']} ms, {dl['delivered']:,}/{dl['expected']:,})",
    ]
    if "restore" in f:
        r = f["restore"]
        parts.append(
            f"restore: {r['restored']:,} restored, {r['new_session']:,} new sessions, {r['not_finished']:,} failed, "
            f"all in {r['all_done_s']} s (p50 {r['done_s']['p50']} s, {r['failed_attempts']:,} failed attempts retried)"
        )
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--clients", type=int, default=10000)
    p.add_argument("--workers", type=int, default=1, help="server --workers")
    p.add_argument("--broker", default="redis", help="server --broker (redis: restore after a kill works)")
    p.add_argument("--pubsub", default="", help="server --pubsub (its default: redis with the Redis broker)")
    p.add_argument("--reuseport", action="store_true", help="server --reuseport")
    p.add_argument("--ping-interval", type=float, default=3.0, help="server --ping_interval")
    p.add_argument("--server-arg", action="append", default=[], help="one more server option (repeat)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-prefix", default="", help="server --redis_prefix (default: a fresh one; removed after)")
    p.add_argument("--server-cpus", help="pin the started server (taskset -c style)")
    p.add_argument("--loadgen-cpus", help="pin the load generator")
    p.add_argument("--server-log", help="the started server's log (default: a temporary file)")
    p.add_argument("--url", help="an already running server's cable URL (ws://); then --server-pid too")
    p.add_argument("--broadcast-url", help="its broadcast endpoint (default: port 8090 of the --url host)")
    p.add_argument("--server-pid", type=int, help="root pid of that server (RSS and CPU of its process tree)")
    p.add_argument("--procs", type=int, default=4, help="load generator processes")
    p.add_argument("--local-addrs", help="source addresses by turns, e.g. 127.0.0.2,127.0.0.3")
    p.add_argument("--connect-concurrency", type=int, default=200, help="handshakes in flight while connecting")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--restore-concurrency", type=int, default=0, help="reconnects in flight (0: all at once)")
    p.add_argument("--retry-delay", type=float, default=0.5, help="mean seconds before a failed reconnect retries")
    p.add_argument("--restore-timeout", type=float, default=120.0)
    p.add_argument("--skip-restore", action="store_true", help="no kill (e.g. with --broker=memory)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds before each memory sample")
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle holding for the CPU figure")
    p.add_argument("--broadcasts", type=int, default=10)
    p.add_argument("--rate", type=float, default=1.0, help="broadcasts per second")
    p.add_argument("--payload", type=int, default=200, help="pad bytes per broadcast")
    p.add_argument("--wait", type=float, default=15.0, help="seconds to wait for deliveries after the last POST")
    p.add_argument("--json", help="write every figure here")
    a = p.parse_args()
    if a.url and not a.server_pid:
        p.error("--url needs --server-pid (memory and CPU come from its process tree)")
    if a.url:
        u = urlsplit(a.url)
        a.broadcast_url = a.broadcast_url or f"http://{u.hostname}:8090/_broadcast"
    fresh_prefix = not a.redis_prefix
    external = bool(a.url)  # (start_server sets a.url)
    a.redis_prefix = a.redis_prefix or f"capacity-{uuid.uuid4().hex[:8]}:"
    a.uses_redis = a.broker == "redis" or a.pubsub == "redis" or a.workers > 1
    # an external server's keys are only counted under the prefix it was given
    a.count_redis_keys = a.broker == "redis" and not (external and fresh_prefix)
    soft, _ = raise_nofile()
    if soft < a.clients // a.procs + 100:
        p.error(f"open files limit {soft} is too low for {a.clients // a.procs} clients per process: raise --procs")
    if a.loadgen_cpus:
        os.sched_setaffinity(0, parse_cpus(a.loadgen_cpus))
    run = Run(a)
    try:
        if not external:
            run.start_server()
        figures = run.run()
    finally:
        run.close()
        if not external and fresh_prefix and a.uses_redis:
            redis_cleanup(a)
    figures["config"] = {
        "clients": a.clients,
        "workers": a.workers,
        "broker": a.broker,
        "server_command": run.server_cmd or None,
        "url": a.url,
        "procs": a.procs,
        "connect_concurrency": a.connect_concurrency,
        "restore_concurrency": a.restore_concurrency,
        "ping_interval": a.ping_interval,
        "redis_prefix": a.redis_prefix if a.uses_redis else None,
        "redis_prefix_removed": not external and fresh_prefix,
        "server_cpus": a.server_cpus,
        "loadgen_cpus": a.loadgen_cpus,
    }
    print(line(figures, a))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    ok = figures["connect"]["failed"] == 0 and figures["delivery"]["delivered"] == figures["delivery"]["expected"]
    if "restore" in figures:
        ok = ok and figures["restore"]["not_finished"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
