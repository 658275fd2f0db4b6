"""``--workers N``: the master forks, watches and replaces workers (the real CLI, real signals).

These run with Redis pub/sub and no broker (fan-out), which is all the process model
needs; restores and exactly-once drills across workers with the Redis broker are in
tests/system/test_worker_drills.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import EXT, ROOT, Server, close_of, connected, free_port, metric, pubsub_id, wait_for
from procs import children, sockets, wait_children
from redis_helpers import REDIS_URL

#: Rolling restarts in the HUP test (a reset used to happen in about every other one).
ROLLS = 5


def worker_args(prefix: str, *extra: str) -> list[str]:
    return [
        "--workers=2",
        "--public_streams",
        "--noauth",
        "--broker=none",
        f"--redis_url={REDIS_URL}",
        f"--redis_prefix={prefix}",
        "--metrics_http=/metrics",
        *extra,
    ]


def serving(srv: Server) -> int:
    return srv.output().count("worker serving index=")


def start(srv: Server, workers: int = 2) -> list[int]:
    srv.start()
    assert srv.proc is not None
    kids = wait_children(srv.proc.pid, workers)
    wait_for(lambda: serving(srv) >= workers, what="every worker to serve")
    return kids


def test_the_master_forks_two_workers_that_share_broadcasts(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix, "--stats_refresh_interval=1"))
    kids = start(srv)
    assert len(kids) == 2
    clients = [connected(srv, protocol=EXT) for _ in range(24)]
    opened = [c.__enter__() for c in clients]
    try:
        for c in opened:
            assert c.subscribe(pubsub_id("fanout"))["type"] == "confirm_subscription"
        per_worker = {pid: sockets(pid) for pid in kids}
        # any worker answers for all of them (the others' figures are at most a refresh old)
        wait_for(lambda: metric(srv, "clients_num") == 24, timeout=5, what="clients_num of every worker")
        for n in range(3):
            srv.publish("fanout", n)
        for c in opened:
            assert [c.recv()["message"] for _ in range(3)] == [0, 1, 2]
            c.nothing(0.2)
        print(f"\nsockets per worker with 24 clients: {per_worker}")
    finally:
        for c in clients:
            c.__exit__(None, None, None)


def test_the_master_never_imports_gevent_or_redis(prefix: str, tmp_path: Path) -> None:
    """The real master code path, in a fresh interpreter: what it imported by the time it forked."""
    out = tmp_path / "modules.json"
    port, bport = free_port(), free_port()
    script = f"""
import json, sys
from anycable_gevent import arbiter, cli
spawn = arbiter.Arbiter._spawn
def spy(self):
    proc = spawn(self)
    open({str(out)!r}, "w").write(json.dumps(sorted(sys.modules)))
    self._queue.append(15)  # then stop
    return proc
arbiter.Arbiter._spawn = spy
cli.main({worker_args(prefix) + ["--host=127.0.0.1", f"--port={port}", f"--http_broadcast_port={bport}"]!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modules = set(json.loads(out.read_text()))
    banned = {"gevent", "redis", "falcon", "geventwebsocket", "urllib3", "concurrent.futures", "jwt"}
    assert not (banned & modules), sorted(banned & modules)
    assert "anycable_gevent.arbiter" in modules


def test_workers_with_the_memory_broker_are_refused(make_server: type[Server]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "anycable_gevent", "--workers=2", "--broker=memory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--broker=redis" in lines[0], proc.stderr


def test_a_busy_port_fails_before_any_fork(prefix: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "anycable_gevent", "--host=127.0.0.1", f"--port={port}", *worker_args(prefix)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert "cannot listen" in proc.stderr
    assert "worker started" not in proc.stdout


@pytest.fixture
def broken_install(tmp_path: Path) -> Path:
    """A directory that, once ``break_it`` is called, shadows gevent-websocket with a broken
    package: the master never imports it, each new worker does (a bad deploy)."""
    return tmp_path


def break_install(directory: Path) -> None:
    pkg = directory / "geventwebsocket"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('broken install (test)')\n")


def test_a_worker_that_cannot_boot_stops_the_master(
    make_server: type[Server], prefix: str, broken_install: Path
) -> None:
    break_install(broken_install)
    srv = make_server(*worker_args(prefix), env={"PYTHONPATH": str(broken_install)})
    with pytest.raises(RuntimeError, match="exited with 3"):
        srv.start()
    out = srv.output()
    assert "broken install (test)" in out
    assert "worker failed to boot" in out
    assert out.count("worker started") <= 3  # no respawn loop


def test_a_killed_worker_is_replaced_within_a_second(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix))
    kids = start(srv)
    os.kill(kids[0], signal.SIGKILL)
    t0 = time.monotonic()
    assert srv.proc is not None
    new = wait_children(srv.proc.pid, 2, exclude={kids[0]})
    assert time.monotonic() - t0 < 1.5
    assert kids[1] in new
    wait_for(lambda: serving(srv) >= 3, what="the replacement to serve")
    with connected(srv, protocol=EXT) as c:
        assert c.subscribe(pubsub_id("after-kill"))["type"] == "confirm_subscription"


def test_a_hung_worker_is_killed_and_replaced(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix, "--worker_timeout=2"))
    kids = start(srv)
    os.kill(kids[0], signal.SIGSTOP)  # its event loop stops: no more heartbeats
    assert srv.proc is not None
    wait_children(srv.proc.pid, 2, timeout=10, exclude={kids[0]})
    assert "worker hangs" in srv.output()


def test_ttin_adds_a_worker_and_ttou_removes_the_oldest(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix))
    kids = start(srv)
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGTTIN)
    three = wait_children(srv.proc.pid, 3)
    assert set(kids) < set(three)
    os.kill(srv.proc.pid, signal.SIGTTOU)
    two = wait_children(srv.proc.pid, 2)
    assert min(kids) not in two or max(kids) not in two  # an old one left
    assert set(two) - set(kids)  # the new one stays


def test_hup_replaces_every_worker_while_always_serving(make_server: type[Server], prefix: str) -> None:
    """Rolling restarts under a steady load of health checks and publications (four threads,
    no pause): every request is answered, none is refused or reset, in every round. A
    draining worker answers what it accepted before it exits (it used to exit with requests
    in flight: about one reset per roll)."""
    srv = make_server(*worker_args(prefix))
    kids = start(srv)
    assert srv.proc is not None
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def poll(publish: bool) -> None:
        while not stop.is_set():
            try:
                if publish:
                    status, _ = srv.broadcast({"stream": "hup-load", "data": "{}"})
                    ok = status == 201
                else:
                    status, _ = srv.get("/health")
                    ok = status == 200
                answered[0] += 1
                if not ok:
                    failures.append(str(status))
            except OSError as exc:
                failures.append(repr(exc))

    pollers = [threading.Thread(target=poll, args=(i % 2 == 1,), daemon=True) for i in range(4)]
    for t in pollers:
        t.start()
    old = set(kids)
    for roll in range(1, ROLLS + 1):
        os.kill(srv.proc.pid, signal.SIGHUP)
        new = wait_children(srv.proc.pid, 2, timeout=20, exclude=old)
        wait_for(lambda: srv.output().count("rolling restart done") >= roll, what="the roll to finish")  # noqa: B023
        assert not set(new) & old
        old = set(new)
    stop.set()
    for t in pollers:
        t.join(5)
    assert answered[0] > 100
    assert failures == [], failures[:5]


def test_hup_with_a_bad_config_keeps_the_old_workers(make_server: type[Server], prefix: str, tmp_path: Path) -> None:
    conf = tmp_path / "anycable.conf"
    conf.write_text("ping_interval = 3\n")
    srv = make_server(*worker_args(prefix), f"--config={conf}")
    kids = start(srv)
    conf.write_text("ping_interval = often\n")
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in srv.output(), what="the refusal")
    assert "--ping_interval" in srv.output()
    assert children(srv.proc.pid) == kids
    assert srv.get("/health")[0] == 200


def test_hup_with_a_worker_that_cannot_boot_keeps_the_old_workers(
    make_server: type[Server], prefix: str, broken_install: Path
) -> None:
    srv = make_server(*worker_args(prefix), env={"PYTHONPATH": str(broken_install)})
    kids = start(srv)
    break_install(broken_install)  # a deploy that broke the installation
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGHUP)
    wait_for(lambda: "rolling restart stopped" in srv.output(), what="the roll to stop")
    assert "old workers keep serving" in srv.output()
    time.sleep(0.5)
    assert children(srv.proc.pid) == kids
    with connected(srv, protocol=EXT) as c:
        assert c.subscribe(pubsub_id("still"))["type"] == "confirm_subscription"


@pytest.mark.parametrize("restorable", [False, True])
def test_term_closes_every_client_and_exits_0(make_server: type[Server], prefix: str, restorable: bool) -> None:
    extra = ["--restorable_shutdown"] if restorable else []
    srv = make_server(*worker_args(prefix, *extra))
    start(srv)
    with connected(srv, protocol=EXT) as c1, connected(srv, protocol=EXT) as c2:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        for c in (c1, c2):
            code, _, frames = close_of(c)
            assert code == 1001
            expected = [] if restorable else [{"type": "disconnect", "reason": "server_restart", "reconnect": True}]
            assert frames == expected
    assert srv.proc.wait(20) == 0


def test_logs_carry_each_workers_pid_and_the_banner_is_printed_once(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix))
    kids = start(srv)
    out = srv.output()
    assert out.count("Starting anycable-gevent") == 1
    assert "workers: 2" in out
    for pid in kids:
        assert f"pid={pid}" in out
    assert out.count("INF broker: none") == 1  # the first worker announces the components


def test_reuseport_gives_each_worker_a_listening_socket(make_server: type[Server], prefix: str) -> None:
    srv = make_server(*worker_args(prefix, "--reuseport"))
    kids = start(srv)
    before = {pid: sockets(pid) for pid in kids}
    clients = [connected(srv, protocol=EXT) for _ in range(40)]
    opened = [c.__enter__() for c in clients]
    try:
        per_worker = {pid: sockets(pid) - before[pid] for pid in kids}
        assert sum(per_worker.values()) >= 40
        for c in opened:
            assert c.subscribe(pubsub_id("rp"))["type"] == "confirm_subscription"
        srv.publish("rp", "both")
        for c in opened:
            assert c.recv()["message"] == "both"
        # the master holds a reservation that does not listen: every client is on a worker
        assert srv.proc is not None
        assert all(n >= 5 for n in per_worker.values()), per_worker  # the kernel spreads them
    finally:
        for c in clients:
            c.__exit__(None, None, None)
    os.kill(kids[0], signal.SIGKILL)
    wait_children(srv.proc.pid, 2, exclude={kids[0]})
    wait_for(lambda: serving(srv) >= 3, what="the replacement to serve")
    for _ in range(10):
        with connected(srv, protocol=EXT) as c:
            assert c.welcome is not None
