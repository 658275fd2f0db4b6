"""One soak run: clients, publications and chaos for a while, then the verdict.

Phases: start (or find) the servers; connect every client and subscribe; publish; after
the warm-up, pause the chaos, wait until every client is back and subscribed, and take the
first sample (RSS, fds, Redis keys); resume until the end; stop the chaos, resubscribe
everything, take the last sample in the same state, stop publishing, wait until every
client has caught up, check.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

from soaktool import probes, topology
from soaktool.client import Client, Counters
from soaktool.publisher import Publisher
from soaktool.topology import Deployment
from soaktool.tracks import Track, Verdict, analyse

#: the arbiter slows respawning down for workers that die within 10 s of booting
WORKER_MIN_AGE = 11.0


@dataclass
class Options:
    duration: float
    topology: str | None
    urls: list[str]
    broadcast_urls: list[str]
    broadcast_key: str
    server_pids: list[int]
    logs: list[Path]
    redis_url: str
    redis_prefix: str
    clients: int
    streams: int
    streams_per_client: int
    rate: float
    pad: int
    kill_rate: float
    fresh_fraction: float
    toggle_rate: float
    kill_workers_every: float
    warmup: float
    sessions_ttl: int
    max_reject_history: int
    max_restore_failures: int
    max_log_errors: int
    max_fd_growth: int
    max_rss_growth_mb: float
    seed: int
    workdir: Path
    keep_keys: bool
    server_args: list[str] = field(default_factory=list)
    say: Callable[[str], None] = print


@dataclass
class Check:
    name: str
    value: Any
    limit: str
    ok: bool


class Chaos:
    """Socket kills, unsubscribe/resubscribe and worker kills, at random, while enabled."""

    def __init__(self, opts: Options, clients: list[Client], dep: Deployment, rng: random.Random) -> None:
        self.opts = opts
        self.clients = clients
        self.dep = dep
        self.rng = rng
        self.enabled = Event()
        self.worker_kills = 0
        self.killed: list[int] = []
        self._resubscribe: dict[tuple[Client, Track], gevent.Greenlet] = {}
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        self.enabled.set()
        if self.opts.kill_rate > 0:
            self._greenlets.append(gevent.spawn(self._every, self.opts.kill_rate, self._kill_socket))
        if self.opts.toggle_rate > 0:
            self._greenlets.append(gevent.spawn(self._every, self.opts.toggle_rate, self._toggle))
        if self.opts.kill_workers_every > 0:
            self._greenlets.append(gevent.spawn(self._workers))

    def pause(self) -> None:
        """Stop causing trouble and resubscribe every stream now."""
        self.enabled.clear()
        for (client, track), timer in list(self._resubscribe.items()):
            timer.kill(block=False)
            client.want(track)
        self._resubscribe.clear()

    def resume(self) -> None:
        self.enabled.set()

    def stop(self) -> None:
        self.pause()
        for g in self._greenlets:
            g.kill(block=False)

    def _every(self, rate: float, action: Callable[[], None]) -> None:
        while True:
            gevent.sleep(self.rng.expovariate(rate))
            self.enabled.wait()
            action()

    def _kill_socket(self) -> None:
        for _ in range(5):
            if self.rng.choice(self.clients).kill(forget=self.rng.random() < self.opts.fresh_fraction):
                return

    def _toggle(self) -> None:
        client = self.rng.choice(self.clients)
        track = client.toggle()
        if track is not None:
            timer = gevent.spawn_later(self.rng.uniform(0.3, 3.0), self._want, client, track)
            self._resubscribe[(client, track)] = timer

    def _want(self, client: Client, track: Track) -> None:
        self._resubscribe.pop((client, track), None)
        client.want(track)

    def _workers(self) -> None:
        while True:
            gevent.sleep(self.opts.kill_workers_every)
            self.enabled.wait()
            ages = {pid: probes.age(pid) or 0.0 for pid in self.dep.workers()}
            old = [pid for pid, age in ages.items() if age >= WORKER_MIN_AGE]
            if not old:
                continue
            victim = max(old, key=lambda pid: ages[pid])
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                continue
            self.worker_kills += 1
            self.killed.append(victim)


def _wait(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        gevent.sleep(step)
    return cond()


def _proc_figures(before: dict[int, probes.ProcSample], after: dict[int, probes.ProcSample]) -> dict[str, Any]:
    survivors = sorted(set(before) & set(after))
    rss_growth = {pid: after[pid].rss_kb - before[pid].rss_kb for pid in survivors}
    return {
        "warmup": {str(p): asdict(s) for p, s in before.items()},
        "end": {str(p): asdict(s) for p, s in after.items()},
        "rss_kb_total": [sum(s.rss_kb for s in before.values()), sum(s.rss_kb for s in after.values())],
        "fds_total": [sum(s.fds for s in before.values()), sum(s.fds for s in after.values())],
        "rss_growth_kb": {str(p): g for p, g in rss_growth.items()},
        "fd_growth": {str(p): after[p].fds - before[p].fds for p in survivors},
        "replaced": [p for p in before if p not in after],
        "new": [p for p in after if p not in before],
    }


def run(opts: Options) -> tuple[dict[str, Any], list[Check]]:
    rng = random.Random(opts.seed)
    random.seed(opts.seed)
    say = opts.say
    dep: Deployment
    if opts.topology:
        opts.workdir.mkdir(parents=True, exist_ok=True)
        dep = topology.start(opts.topology, opts.workdir, opts.redis_url, opts.redis_prefix, opts.server_args)
        for cmd in dep.commands:
            say(f"started: {cmd}")
    else:
        dep = Deployment(
            opts.urls, opts.broadcast_urls, opts.broadcast_key, opts.server_pids, opts.logs, opts.redis_url
        )
        dep.redis_prefix = opts.redis_prefix
    try:
        return _soak(opts, dep, rng)
    finally:
        dep.stop()
        if opts.topology and dep.redis_url and not opts.keep_keys:
            probes.delete_prefix(dep.redis_url, dep.redis_prefix)


def _soak(opts: Options, dep: Deployment, rng: random.Random) -> tuple[dict[str, Any], list[Check]]:
    say = opts.say
    run_id = uuid.uuid4().hex[:6]
    streams = [f"soak/{run_id}/{i}" for i in range(opts.streams)]
    counters = Counters()
    clients = []
    for i in range(opts.clients):
        mine = rng.sample(streams, min(opts.streams_per_client, len(streams)))
        clients.append(Client(i, dep.ws_urls, mine, counters))
    t0 = time.monotonic()
    for i, c in enumerate(clients):
        c.start()
        if i % 50 == 49:
            gevent.sleep(0.1)
    if not _wait(lambda: all(c.settled for c in clients), 60):
        raise RuntimeError(f"only {sum(c.settled for c in clients)} of {len(clients)} clients subscribed within 60 s")
    say(f"{len(clients)} clients subscribed in {time.monotonic() - t0:.1f}s; publishing {opts.rate:g}/s")
    publisher = Publisher(dep.broadcast_urls, streams, opts.rate, dep.broadcast_key, opts.pad)
    publisher.start()
    chaos = Chaos(opts, clients, dep, rng)
    chaos.start()
    started = time.monotonic()
    end_at = started + opts.duration

    gevent.sleep(min(opts.warmup, opts.duration / 2))
    chaos.pause()
    settled_warm = _wait(lambda: all(c.settled for c in clients), 30)
    gevent.sleep(3.0)  # connections the clients reset are gone on the server's side too
    warm_procs = probes.sample_processes(dep.pids)
    marker = f"{{soak/{run_id}/"
    warm_keys = probes.census(dep.redis_url, dep.redis_prefix, marker) if dep.redis_url else None
    say(f"warm-up sample at {time.monotonic() - started:.0f}s (all clients back: {settled_warm})")
    chaos.resume()

    last_report = time.monotonic()
    while time.monotonic() < end_at:
        gevent.sleep(min(1.0, max(end_at - time.monotonic(), 0)))
        if time.monotonic() - last_report >= 60:
            last_report = time.monotonic()
            say(
                f"{last_report - started:.0f}s: published {publisher.accepted}, reconnects {counters.reconnects}, "
                f"restores {counters.restores}, worker kills {chaos.worker_kills}"
            )

    chaos.stop()
    _wait(lambda: all(c.settled for c in clients), 60)
    gevent.sleep(3.0)
    # the last sample in the state of the first one: every client back, publications going on
    end_procs = probes.sample_processes(dep.pids)
    end_keys = probes.census(dep.redis_url, dep.redis_prefix, marker) if dep.redis_url else None
    ttl = opts.sessions_ttl + 5
    recent_ends = sum(1 for t in counters.ended_at if t > time.monotonic() - ttl)
    publisher.stop()
    published = publisher.published

    def caught_up() -> bool:
        return all(
            not t.desired
            or not published[t.stream].numbers
            or (t.received and t.received[-1] >= published[t.stream].last)
            for c in clients
            for t in c.tracks.values()
        )

    caught = _wait(caught_up, 20)
    elapsed = time.monotonic() - started
    verdict = analyse([(c.index, t) for c in clients for t in c.tracks.values()], published)
    unsettled = sum(not c.settled for c in clients)
    for c in clients:
        c.stop()
    exit_codes = dep.stop() if dep.procs else []
    logs = probes.scan_logs(dep.logs)  # the shutdown included

    figures: dict[str, Any] = {
        "topology": opts.topology or "external",
        "servers": dep.commands or dep.ws_urls,
        "seconds": round(elapsed, 1),
        "clients": len(clients),
        "streams": len(streams),
        "streams_per_client": opts.streams_per_client,
        "published_accepted": publisher.accepted,
        "published_not_accepted": publisher.not_accepted,
        "publish_rejected_by_status": publisher.rejected,
        "publish_errors": publisher.errors,
        **{k: v for k, v in asdict(counters).items() if k != "ended_at"},
        "worker_kills": chaos.worker_kills,
        "killed_workers": chaos.killed,
        **{k: v for k, v in asdict(verdict).items() if k != "examples"},
        "problem_examples": verdict.examples,
        "settled_at_warmup": settled_warm,
        "unsettled_at_end": unsettled,
        "caught_up": caught,
        "log_errors": logs.errors,
        "log_warnings": logs.warnings,
        "log_unexpected_warnings": logs.unexpected_warnings,
        "log_examples": logs.examples,
        "server_exit_codes": exit_codes,
        "server_ttls": topology.SERVER_TTLS if opts.topology else None,
    }
    if warm_procs and end_procs:
        figures["processes"] = _proc_figures(warm_procs, end_procs)
    if warm_keys is not None and end_keys is not None:
        figures["redis_keys"] = {
            "warmup": warm_keys.counts,
            "end": end_keys.counts,
            "growth": end_keys.total - warm_keys.total,
            "persistent": end_keys.persistent[:10],
            "max_ttl_end": end_keys.max_ttl,
        }
    checks = _checks(opts, figures, verdict, end_keys, counters, len(clients) + recent_ends, len(streams))
    figures["checks"] = [asdict(c) for c in checks]
    figures["ok"] = all(c.ok for c in checks)
    return figures, checks


def _checks(
    opts: Options,
    f: dict[str, Any],
    v: Verdict,
    keys: probes.KeyCensus | None,
    counters: Counters,
    session_bound: int,
    n_streams: int,
) -> list[Check]:
    out = [
        Check("messages checked", v.checked, "> 0", v.checked > 0),
        Check("duplicates", v.duplicates, "0", v.duplicates == 0),
        Check("gaps", v.gaps, "0", v.gaps == 0),
        Check("out of order", v.out_of_order, "0", v.out_of_order == 0),
        Check("offset jumps", v.offset_jumps, "0", v.offset_jumps == 0),
        Check("epoch changes", v.epoch_changes, "0", v.epoch_changes == 0),
        Check("messages without offset", v.no_offset, "0", v.no_offset == 0),
        Check(
            "reject_history",
            v.reject_history,
            f"<= {opts.max_reject_history}" if opts.max_reject_history >= 0 else "any",
            opts.max_reject_history < 0 or v.reject_history <= opts.max_reject_history,
        ),
        Check(
            "failed restores",
            counters.restore_failed,
            f"<= {opts.max_restore_failures}" if opts.max_restore_failures >= 0 else "any",
            opts.max_restore_failures < 0 or counters.restore_failed <= opts.max_restore_failures,
        ),
        Check("protocol errors", counters.protocol_errors, "0", counters.protocol_errors == 0),
        Check("rejected subscriptions", counters.reject_subscription, "0", counters.reject_subscription == 0),
        Check("clients not back at the end", f["unsettled_at_end"], "0", f["unsettled_at_end"] == 0),
        Check("caught up at the end", f["caught_up"], "true", bool(f["caught_up"])),
        Check("log errors", f["log_errors"], f"<= {opts.max_log_errors}", f["log_errors"] <= opts.max_log_errors),
    ]
    if f["server_exit_codes"]:
        codes = f["server_exit_codes"]
        out.append(Check("server exit codes", codes, "all 0", all(c == 0 for c in codes)))
    procs = f.get("processes")
    if procs:
        fd = procs["fds_total"][1] - procs["fds_total"][0]
        out.append(Check("fd growth (all processes)", fd, f"<= {opts.max_fd_growth}", fd <= opts.max_fd_growth))
        worst = max(procs["rss_growth_kb"].values(), default=0)
        limit = opts.max_rss_growth_mb * 1024
        out.append(Check("RSS growth, largest (KB)", worst, f"<= {limit:.0f}", worst <= limit))
    if keys is not None:
        out.append(Check("Redis keys without TTL", len(keys.persistent), "0", not keys.persistent))
        # :m and :h per stream of this run (other keys of a shared prefix are not ours to judge)
        ours = keys.ours
        out.append(Check("Redis keys of this run's streams", ours, f"<= {2 * n_streams}", ours <= 2 * n_streams))
        if opts.topology:  # a prefix of our own: every key is this run's
            # a snapshot per live session, plus those of connections that ended within one TTL
            n = keys.counts["session"]
            out.append(Check("Redis session keys", n, f"<= {session_bound}", n <= session_bound))
            n = keys.counts["presence"] + keys.counts["other"]
            out.append(Check("Redis presence and other keys", n, "0", n == 0))
    return out
