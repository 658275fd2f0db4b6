"""One benchmark run: fork the workers, connect, measure memory, run the phases, build the report.

The parent process holds no WebSocket clients. It forks ``procs`` workers (each with its
share of the clients), prints connect progress from their shared counters, sends the POSTs
itself (see poster.py) and samples CPU and RSS of the server tree and of the load generator
at phase boundaries. Receipt times come back from the workers only at the end.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cablebench import __version__, procfs, stats
from cablebench.poster import Poster, PostLog
from cablebench.worker import Counters, WorkerSpec, recv_msg, send_msg, worker_main


class BenchError(Exception):
    """The run cannot go on (bad option, unreachable server, a worker died); one line for the user."""


@dataclass
class Options:
    url: str = "ws://127.0.0.1:8080/cable"
    broadcast_url: str = "http://127.0.0.1:8090/_broadcast"
    clients: int = 1000
    broadcasts: int = 50
    burst_broadcasts: int | None = None  # None: as many as the latency phase
    rate: float = 5.0
    burst_rate: float = 1000.0
    payload: int = 200
    procs: int = 1
    stream: str = "bench"
    identifier: str | None = None
    subprotocols: list[str] = field(default_factory=lambda: ["actioncable-v1-json"])
    headers: list[str] = field(default_factory=list)
    broadcast_auth: str | None = None
    connect_concurrency: int = 100
    wait: float = 30.0
    settle: float = 1.0
    handshake_timeout: float = 30.0
    local_addrs: list[str] = field(default_factory=list)
    server_pid: int | None = None
    progress: bool = True

    @property
    def burst_count(self) -> int:
        if self.burst_rate <= 0:
            return 0
        return self.broadcasts if self.burst_broadcasts is None else self.burst_broadcasts

    def resolved_identifier(self) -> str:
        if self.identifier is not None:
            return self.identifier
        return json.dumps({"channel": "$pubsub", "stream_name": self.stream}, separators=(",", ":"))


@dataclass
class PhaseRaw:
    name: str
    rate: float
    seqs: list[int]
    posts: PostLog
    t0: float
    t1: float
    server_cpu: float | None
    loadgen_cpu: float
    workers_cpu: float
    busiest_cpu: float  # the load generator process (parent or one worker) that used the most CPU
    server_rss: int | None
    wakeups: int


def _say(opts: Options, text: str) -> None:
    if opts.progress:
        print(text, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.server = procfs.ProcessTree(opts.server_pid) if opts.server_pid else None
        self.workers: list[tuple[int, socket.socket]] = []
        self.counters = Counters(opts.procs)
        self.connect_reports: list[dict[str, Any]] = []
        self.connect_cpu: dict[str, float | None] = {"server_cpu_s": None, "loadgen_cpu_s": None}

    # ------------------------------------------------------------------ setup
    def _target(self) -> tuple[int, tuple[Any, ...], str, str]:
        parts = urlsplit(self.opts.url)
        if parts.scheme != "ws":
            raise BenchError(f"--url must be ws://host:port/path (wss:// is not supported), got {self.opts.url!r}")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 80
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except OSError as exc:
            raise BenchError(f"cannot resolve {host!r}: {exc}") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return family, sockaddr, parts.netloc, path

    def _fork_workers(self) -> None:
        opts = self.opts
        family, sockaddr, host_header, path = self._target()
        total_seqs = opts.broadcasts + opts.burst_count
        per_conc = max(1, -(-opts.connect_concurrency // opts.procs))
        for i in range(opts.procs):
            share = opts.clients // opts.procs + (1 if i < opts.clients % opts.procs else 0)
            spec = WorkerSpec(
                index=i,
                clients=share,
                concurrency=per_conc,
                family=family,
                sockaddr=sockaddr,
                host_header=host_header,
                path=path,
                subprotocols=opts.subprotocols,
                headers=opts.headers,
                identifier=opts.resolved_identifier(),
                max_seq=total_seqs,
                handshake_timeout=opts.handshake_timeout,
                local_addrs=opts.local_addrs,
            )
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # child: keep only its own control socket
                parent_end.close()
                for _, other in self.workers:
                    other.close()
                worker_main(spec, child_end, self.counters)
            child_end.close()
            self.workers.append((pid, parent_end))

    def _loadgen_cpu(self) -> list[float]:
        """CPU seconds of the parent, then of each worker."""
        return [procfs.cpu_seconds([pid]) for pid in (os.getpid(), *(pid for pid, _ in self.workers))]

    # ------------------------------------------------------------------ connect
    def _connect(self) -> None:
        opts = self.opts
        c = self.counters
        t_start = time.monotonic()
        last_print, last_subscribed = t_start, 0
        waiting = {sock.fileno(): sock for _, sock in self.workers}
        while waiting:
            ready, _, _ = select.select(list(waiting.values()), [], [], 1.0)
            for sock in ready:
                msg = recv_msg(sock)
                if msg is None:
                    raise BenchError("a load-generator worker died while connecting")
                if "error" in msg:
                    raise BenchError(msg["error"])
                self.connect_reports.append(msg)
                del waiting[sock.fileno()]
            now = time.monotonic()
            if now - last_print >= 1.0 and waiting:
                subscribed = c.total("subscribed")
                rate = (subscribed - last_subscribed) / (now - last_print)
                _say(
                    opts,
                    f"connect  {subscribed:>7,}/{opts.clients:,} subscribed  {c.total('connected'):>7,} upgraded  "
                    f"{c.total('failed'):,} failed  {rate:,.0f} subscribed/s",
                )
                last_print, last_subscribed = now, subscribed

    # ------------------------------------------------------------------ phases
    def _phase(self, name: str, seqs: list[int], rate: float, poster: Poster, subscribed: int) -> PhaseRaw:
        opts = self.opts
        _say(opts, f"{name}: {len(seqs)} broadcasts at {rate:g}/s to {subscribed:,} clients")
        try:
            poster.warm_up()
        except OSError:
            pass  # the run records each POST that cannot connect
        received0 = self.counters.total("received")
        wakeups0 = self.counters.total("wakeups")
        server_cpu0 = self.server.cpu() if self.server else None
        loadgen_cpu0 = self._loadgen_cpu()
        t0 = time.monotonic()
        log = poster.run(seqs, rate)
        target = received0 + subscribed * len(log.ok())
        deadline = time.monotonic() + opts.wait
        received = self.counters.total("received")
        while received < target and time.monotonic() < deadline:
            time.sleep(0.002)
            received = self.counters.total("received")
        t1 = time.monotonic()
        server_cpu1 = self.server.cpu() if self.server else None
        server_cpu = server_cpu1 - server_cpu0 if server_cpu0 is not None and server_cpu1 is not None else None
        used = [after - before for before, after in zip(loadgen_cpu0, self._loadgen_cpu(), strict=True)]
        server_rss = self.server.rss() if self.server else None
        got = received - received0
        late = "" if received >= target else f" (gave up after --wait {opts.wait:g} s)"
        _say(opts, f"{name}: {got:,}/{target - received0:,} delivered in {t1 - t0:.2f} s{late}")
        return PhaseRaw(
            name,
            rate,
            seqs,
            log,
            t0,
            t1,
            server_cpu,
            sum(used),
            sum(used[1:]),
            max(used),
            server_rss,
            self.counters.total("wakeups") - wakeups0,
        )

    def _collect(self, phases: list[PhaseRaw]) -> list[dict[str, Any]]:
        out = []
        for _, sock in self.workers:
            send_msg(sock, ("collect", [p.posts.ok() for p in phases]))
        for _, sock in self.workers:
            msg = recv_msg(sock)
            if msg is None or "error" in msg:
                raise BenchError(msg["error"] if msg else "a load-generator worker died")
            out.append(msg)
        return out

    def _stop_workers(self) -> None:
        for _, sock in self.workers:
            try:
                send_msg(sock, ("exit",))
            except OSError:
                pass
            sock.close()
        for pid, _ in self.workers:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.workers = []

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        opts = self.opts
        if self.server and not procfs.alive(self.server.root):
            raise BenchError(f"--server-pid {self.server.root}: no such process")
        soft, _ = procfs.raise_nofile()
        per_proc = -(-opts.clients // opts.procs)
        if per_proc + 64 > soft:
            raise BenchError(
                f"{per_proc:,} clients per process need more than the open-files limit ({soft:,}); use more --procs"
            )
        self._target()  # a bad --url fails here, before anything starts
        try:
            poster = Poster(opts.broadcast_url, opts.stream, opts.payload, opts.broadcast_auth)
            poster.warm_up()
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        except OSError as exc:
            raise BenchError(f"broadcast URL {opts.broadcast_url}: {exc}") from None
        baseline_rss = self.server.rss() if self.server else None
        _say(opts, f"connecting {opts.clients:,} clients to {opts.url} ({opts.procs} proc(s))")
        server_cpu0 = self.server.cpu() if self.server else None
        parent_cpu0 = procfs.cpu_seconds([os.getpid()])
        try:
            self._fork_workers()
            self._connect()
            server_cpu1 = self.server.cpu() if self.server else None
            if server_cpu0 is not None and server_cpu1 is not None:
                self.connect_cpu["server_cpu_s"] = round(server_cpu1 - server_cpu0, 3)
            self.connect_cpu["loadgen_cpu_s"] = round(sum(self._loadgen_cpu()) - parent_cpu0, 3)
            subscribed = sum(r["subscribed"] for r in self.connect_reports)
            if opts.settle > 0:
                time.sleep(opts.settle)
            idle_rss = self.server.rss() if self.server else None
            phases: list[PhaseRaw] = []
            if subscribed:
                m = opts.broadcasts
                phases.append(self._phase("latency", list(range(1, m + 1)), opts.rate, poster, subscribed))
                if opts.burst_count:
                    time.sleep(min(opts.settle, 0.5))
                    burst = list(range(m + 1, m + opts.burst_count + 1))
                    phases.append(self._phase("burst", burst, opts.burst_rate, poster, subscribed))
            results = self._collect(phases) if phases else []
        finally:
            poster.close()
            self._stop_workers()
        return self._report(subscribed, baseline_rss, idle_rss, phases, results)

    # ------------------------------------------------------------------ report
    def _report(
        self,
        subscribed: int,
        baseline_rss: int | None,
        idle_rss: int | None,
        phases: list[PhaseRaw],
        results: list[dict[str, Any]],
    ) -> dict[str, Any]:
        opts = self.opts
        reports = self.connect_reports
        handshakes: list[float] = []
        errors: dict[str, int] = {}
        for r in reports:
            handshakes.extend(array("d", r["handshake_ms"]))
            for err, n in r["errors"].items():
                errors[err] = errors.get(err, 0) + n
        t_first = min((r["t_first"] for r in reports if r["t_first"]), default=0.0)
        t_last = max((r["t_last"] for r in reports), default=0.0)
        wall = max(0.0, t_last - t_first)
        connect = {
            "requested": opts.clients,
            "connected": sum(r["connected"] for r in reports),
            "subscribed": subscribed,
            "failed": sum(r["failed"] for r in reports),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
            "wall_s": round(wall, 4),
            "rate_per_s": round(subscribed / wall, 1) if wall > 0 else None,
            "handshake_ms": stats.summary(handshakes),
            **self.connect_cpu,
        }
        memory: dict[str, Any] = {"baseline_rss_kb": baseline_rss, "idle_rss_kb": idle_rss, "rss_kb_per_conn": None}
        if baseline_rss is not None and idle_rss is not None and subscribed:
            memory["rss_kb_per_conn"] = round((idle_rss - baseline_rss) / subscribed, 2)

        # Merge the workers' receipt times per seq.
        receipts: dict[int, list[float]] = {}
        for res in results:
            for seq, raw in enumerate(res["times"]):
                if raw:
                    receipts.setdefault(seq, []).extend(array("d", raw))
        lost: dict[str, int] = {}
        for res in results:
            for why, n in res["lost"].items():
                lost[why] = lost.get(why, 0) + n

        out_phases: dict[str, Any] = {}
        for i, ph in enumerate(phases):
            out_phases[ph.name] = self._phase_report(i, ph, subscribed, receipts, results)
        return {
            "tool": f"cablebench {__version__}",
            "config": {
                "url": opts.url,
                "broadcast_url": opts.broadcast_url,
                "clients": opts.clients,
                "broadcasts": opts.broadcasts,
                "burst_broadcasts": opts.burst_count,
                "rate": opts.rate,
                "burst_rate": opts.burst_rate,
                "payload": opts.payload,
                "procs": opts.procs,
                "stream": opts.stream,
                "identifier": opts.resolved_identifier(),
                "subprotocols": opts.subprotocols,
                "connect_concurrency": opts.connect_concurrency,
                "local_addrs": opts.local_addrs,
                "server_pid": opts.server_pid,
                "loadgen_cpus": sorted(os.sched_getaffinity(0)),
            },
            "connect": connect,
            "memory": memory,
            "phases": out_phases,
            "disconnects": lost,
            "duplicates": sum(r["duplicates"] for r in results),
            "unexpected_frames_with_seq": sum(r["unexpected"] for r in results),
        }

    def _phase_report(
        self,
        index: int,
        ph: PhaseRaw,
        subscribed: int,
        receipts: dict[int, list[float]],
        results: list[dict[str, Any]],
    ) -> dict[str, Any]:
        ok = ph.posts.ok()
        latencies: list[float] = []
        fanout: list[float] = []
        incomplete = 0
        last = 0.0
        for seq in ok:
            sent = ph.posts.sent[seq]
            got = receipts.get(seq, [])
            latencies.extend((t - sent) * 1000.0 for t in got)
            if got:
                last = max(last, max(got))
            if len(got) >= subscribed and got:
                fanout.append((max(got) - sent) * 1000.0)
            else:
                incomplete += 1
        delivered = len(latencies)
        expected = subscribed * len(ok)
        first_post = min(ph.posts.sent.values(), default=ph.t0)
        span = last - first_post if last > first_post else 0.0
        window = ph.t1 - ph.t0
        complete = sum(res["complete"][index] for res in results)
        clients = sum(res["clients"] for res in results)
        return {
            "rate": ph.rate,
            "broadcasts": len(ph.seqs),
            "posts_ok": len(ok),
            "expected": expected,
            "delivered": delivered,
            "delivered_pct": round(100.0 * delivered / expected, 3) if expected else None,
            "clients_missing": clients - complete,
            "latency_ms": stats.summary(latencies),
            "fanout_complete_ms": stats.summary(fanout),
            "fanout_incomplete": incomplete,
            "span_s": round(span, 4),
            "delivered_msgs_per_s": round(delivered / span, 1) if span > 0 else None,
            "window_s": round(window, 4),
            "post": {
                "connections": ph.posts.conns,
                "status": _count(ph.posts.status.values()),
                "errors": ph.posts.errors,
                "reply_ms": stats.summary(ph.posts.rtt_ms),
                "schedule_lag_ms_max": round(max(ph.posts.lag_ms, default=0.0), 3),
            },
            "server_cpu_s": _round(ph.server_cpu),
            "server_cpu_ms_per_1k": _per_1k(ph.server_cpu, delivered),
            "server_cpu_pct": _pct(ph.server_cpu, window),
            "loadgen_cpu_s": round(ph.loadgen_cpu, 3),
            "loadgen_cpu_ms_per_1k": _per_1k(ph.loadgen_cpu, delivered),
            "loadgen_cpu_pct": _pct(ph.loadgen_cpu, window),
            "loadgen_workers_cpu_s": round(ph.workers_cpu, 3),
            "loadgen_saturation_pct": self._saturation(ph, window),
            "loadgen_wakeups": ph.wakeups,
            "server_rss_kb": ph.server_rss,
        }

    def _saturation(self, ph: PhaseRaw, window: float) -> float | None:
        """How close the load generator came to its ceiling: its busiest process's share of one
        core, or its total share of the cores it may use, whichever is higher (percent)."""
        if window <= 0:
            return None
        cores = min(len(os.sched_getaffinity(0)), self.opts.procs + 1)
        return round(100.0 * max(ph.busiest_cpu / window, ph.loadgen_cpu / (window * cores)), 1)


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _per_1k(cpu_s: float | None, delivered: int) -> float | None:
    return None if cpu_s is None or not delivered else round(cpu_s * 1e6 / delivered, 3)


def _pct(cpu_s: float | None, window: float) -> float | None:
    return None if cpu_s is None or window <= 0 else round(100.0 * cpu_s / window, 1)
