"""The broadcast benchmark (scripts/bench/broadcast) against the real server: its report, not its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Server

TOOL = ROOT / "scripts" / "bench" / "broadcast"
N, M = 20, 5
FAST = ["--rate", "200", "--burst-rate", "2000", "--settle", "0", "--connect-concurrency", "8"]


def run_bench(
    tmp_path: Path, *args: str, timeout: float = 50
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [str(TOOL), "-q", "--json", str(out), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc, report


def assert_latency_summary(summary: dict[str, Any]) -> None:
    values = [summary[k] for k in ("p50", "p90", "p95", "p99", "max", "mean")]
    assert all(isinstance(v, (int, float)) and v >= 0 for v in values), summary
    assert summary["p50"] <= summary["p90"] <= summary["p95"] <= summary["p99"] <= summary["max"], summary


@pytest.fixture(scope="module")
def bench_server() -> Iterator[Server]:
    with Server("--public_streams", "--noauth", "--broker=memory", "--broadcast_key=bench-key") as srv:
        yield srv


def test_report_counts_every_delivery(bench_server: Server, tmp_path: Path) -> None:
    assert bench_server.proc is not None
    proc, report = run_bench(
        tmp_path,
        f"--url={bench_server.url}",
        f"--broadcast-url={bench_server.broadcast_url}",
        "--broadcast-auth=Bearer bench-key",
        f"--server-pid={bench_server.proc.pid}",
        "--stream=bench-report",
        "-n",
        str(N),
        "-m",
        str(M),
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout

    con = report["connect"]
    assert con["requested"] == con["connected"] == con["subscribed"] == N
    assert con["failed"] == 0 and con["errors"] == {}
    assert con["rate_per_s"] > 0
    assert con["server_cpu_s"] >= 0 and con["loadgen_cpu_s"] >= 0
    assert_latency_summary(con["handshake_ms"])

    mem = report["memory"]
    assert mem["baseline_rss_kb"] > 0 and mem["idle_rss_kb"] > 0
    assert mem["rss_kb_per_conn"] == pytest.approx((mem["idle_rss_kb"] - mem["baseline_rss_kb"]) / N, abs=0.01)

    assert list(report["phases"]) == ["latency", "burst"]
    for name, phase in report["phases"].items():
        assert phase["broadcasts"] == phase["posts_ok"] == M, name
        assert phase["post"]["status"] == {"201": M}, phase["post"]
        assert phase["expected"] == phase["delivered"] == N * M, name
        assert phase["delivered_pct"] == 100.0
        assert phase["clients_missing"] == 0
        assert phase["fanout_incomplete"] == 0
        assert_latency_summary(phase["latency_ms"])
        # Fan-out completion is the slowest client per broadcast: never below the median delivery.
        fan = phase["fanout_complete_ms"]
        assert fan["max"] == phase["latency_ms"]["max"]
        assert phase["latency_ms"]["p50"] <= fan["max"]
        assert phase["delivered_msgs_per_s"] > 0
        for key in (
            "server_cpu_ms_per_1k",
            "server_cpu_pct",
            "loadgen_cpu_ms_per_1k",
            "loadgen_cpu_pct",
            "loadgen_saturation_pct",
        ):
            assert isinstance(phase[key], (int, float)) and phase[key] >= 0, (name, key, phase[key])
        assert phase["loadgen_workers_cpu_s"] <= phase["loadgen_cpu_s"]
        assert phase["server_rss_kb"] > 0
    assert report["duplicates"] == 0 and report["disconnects"] == {}
    assert report["config"]["server_pid"] == bench_server.proc.pid
    assert "delivered" in proc.stdout and f"{N * M}/{N * M}" in proc.stdout


def test_without_the_broadcast_key_nothing_is_delivered(bench_server: Server, tmp_path: Path) -> None:
    proc, report = run_bench(
        tmp_path,
        f"--url={bench_server.url}",
        f"--broadcast-url={bench_server.broadcast_url}",
        "--stream=bench-nokey",
        "-n",
        "3",
        "-m",
        "2",
        "--burst-rate=0",
        "--wait=0.2",
        *FAST[:2],
    )
    assert proc.returncode == 1, proc.stderr
    phase = report["phases"]["latency"]
    assert phase["posts_ok"] == 0 and phase["post"]["status"] == {"401": 2}
    assert phase["expected"] == phase["delivered"] == 0
    assert list(report["phases"]) == ["latency"]


def test_messages_that_never_arrive_are_reported_missing(bench_server: Server, tmp_path: Path) -> None:
    # Subscribed to one stream, broadcasting on another: the tool must count nothing.
    ident = json.dumps({"channel": "$pubsub", "stream_name": "bench-elsewhere"})
    proc, report = run_bench(
        tmp_path,
        f"--url={bench_server.url}",
        f"--broadcast-url={bench_server.broadcast_url}",
        "--broadcast-auth=Bearer bench-key",
        "--stream=bench-here",
        f"--identifier={ident}",
        "-n",
        "4",
        "-m",
        "3",
        "--wait=0.3",
        *FAST,
    )
    assert proc.returncode == 1, proc.stderr
    assert report["connect"]["subscribed"] == 4
    for phase in report["phases"].values():
        assert phase["posts_ok"] == 3 and phase["expected"] == 12
        assert phase["delivered"] == 0 and phase["delivered_pct"] == 0.0
        assert phase["clients_missing"] == 4 and phase["fanout_incomplete"] == 3
        assert phase["latency_ms"]["p50"] is None and phase["delivered_msgs_per_s"] is None


def test_refused_upgrades_are_counted_as_failed_connects(bench_server: Server, tmp_path: Path) -> None:
    proc, report = run_bench(
        tmp_path,
        f"--url=ws://127.0.0.1:{bench_server.port}/not-the-cable",
        f"--broadcast-url={bench_server.broadcast_url}",
        "-n",
        "5",
        *FAST,
    )
    assert proc.returncode == 1, proc.stderr
    con = report["connect"]
    assert con["subscribed"] == 0 and con["failed"] == 5
    assert [err.split(":")[0] for err in con["errors"]] == ["upgrade refused"]
    assert report["phases"] == {}


def test_start_server_with_several_workers(tmp_path: Path) -> None:
    command = (
        f"{sys.executable} -m anycable_gevent --host=127.0.0.1 --port={{port}} "
        "--http_broadcast_port={broadcast_port} --broker=none --public_streams --noauth"
    )
    proc, report = run_bench(
        tmp_path, "--start-server", command, "--procs=3", "-n", "21", "-m", "4", "--burst-broadcasts=7", *FAST
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert report["config"]["procs"] == 3
    assert report["connect"]["subscribed"] == 21
    assert report["phases"]["latency"]["delivered"] == report["phases"]["latency"]["expected"] == 21 * 4
    assert report["phases"]["burst"]["delivered"] == report["phases"]["burst"]["expected"] == 21 * 7
    pid = report["config"]["server_pid"]
    assert "--broker=none" in report["config"]["server_command"]
    assert not Path(f"/proc/{pid}").exists(), "the started server must be stopped after the run"


def test_start_server_with_one_port_for_both(tmp_path: Path) -> None:
    command = (
        f"{sys.executable} -m anycable_gevent --host=127.0.0.1 --port={{port}} --http_broadcast_port={{port}} "
        "--public_streams --noauth"
    )
    proc, report = run_bench(
        tmp_path,
        "--start-server",
        command,
        "--broadcast-url=http://127.0.0.1:{port}/_broadcast",
        "-n",
        "3",
        "-m",
        "2",
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cfg = report["config"]
    port = cfg["url"].split(":")[2].split("/")[0]
    assert cfg["broadcast_url"] == f"http://127.0.0.1:{port}/_broadcast"
    assert f"--http_broadcast_port={port}" in cfg["server_command"]
    assert report["phases"]["burst"]["delivered"] == 6


def test_setup_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    proc, report = run_bench(tmp_path, "--url=http://127.0.0.1:1/cable", "-n", "1")
    assert proc.returncode == 2 and report == {}
    assert proc.stderr.strip().count("\n") == 0 and "--url must be ws://" in proc.stderr


CAPACITY = ROOT / "scripts" / "bench" / "capacity.py"


@pytest.mark.parametrize("workers", [1, 2])
def test_capacity_prints_its_figures(tmp_path: Path, workers: int) -> None:
    import redis
    from redis_helpers import REDIS_URL, delete_prefix, unique_prefix

    # one worker: the run's own prefix (removed by the tool); two: the test's
    prefix = unique_prefix()
    own = ["--redis-prefix", prefix] if workers == 2 else []
    out = tmp_path / "capacity.json"
    small = ["-n", "12", "--procs", "2", "--idle", "1.2", "--ping-interval", "0.5"]
    small += ["--broadcasts", "2", "--rate", "20", "--settle", "0.2"]
    args = [*small, f"--workers={workers}", f"--redis-url={REDIS_URL}", *own]
    try:
        proc = subprocess.run(
            [sys.executable, str(CAPACITY), *args, "--json", str(out)], capture_output=True, text=True, timeout=90
        )
    finally:
        delete_prefix(REDIS_URL, prefix)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "KB/conn" in proc.stdout and "idle CPU" in proc.stdout and "delivery p50/p99" in proc.stdout
    assert "restore: 12 restored, 0 new sessions, 0 failed" in proc.stdout
    report = json.loads(out.read_text())
    assert report["connect"]["subscribed"] == 12
    assert report["memory"]["rss_kb_per_conn"] is not None
    assert report["idle"]["pings_per_s"] > 0 and report["idle"]["server_cpu_pct"] is not None
    assert report["delivery"]["delivered"] == report["delivery"]["expected"] == 24
    assert report["restore"]["restored"] == 12 and report["after_restore"]["delivered"] == 12
    assert len(report["restore"]["killed"]) == workers
    if not own:
        assert report["config"]["redis_prefix_removed"]
        client = redis.Redis.from_url(REDIS_URL)
        assert not list(client.scan_iter(match=f"{report['config']['redis_prefix']}*")), "its keys must be removed"
        client.close()
