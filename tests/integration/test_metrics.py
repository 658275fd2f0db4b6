"""Metrics over real sockets: the Prometheus endpoint, what is counted, the log line, and
several processes summed through a shared snapshot directory."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Client, Server, connected, free_port, pubsub_id
from prometheus_client.parser import text_string_to_metric_families

from anycable_gevent.metrics import COUNTERS, DIR_ENV, GAUGES


def scrape(url: str) -> dict[str, tuple[str, float, dict[str, str]]]:
    """sample name -> (type, value, labels), parsed by prometheus-client."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = (fam.type, s.value, s.labels)
    return out


def values(url: str) -> dict[str, float]:
    return {name.removeprefix("anycable_go_"): v for name, (_, v, _) in scrape(url).items()}


def wait_for(url: str, name: str, want: float, timeout: float = 10.0) -> dict[str, float]:
    """Scrape until metric ``name`` equals ``want`` (for values that settle asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        got = values(url)
        if got[name] == want or time.monotonic() > deadline:
            assert got[name] == want, (name, got[name], want)
            return got
        time.sleep(0.1)


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server(
        "--public_streams",
        "--noauth",
        "--metrics_http=/metrics",
        "--metrics_tags=env:test,region:eu-1",
        "--max_message_size=1000",
    ) as s:
        yield s


def metrics_url(s: Server) -> str:
    return f"{s.http}/metrics"


def test_every_anycable_go_metric_is_exported_with_tags(srv: Server) -> None:
    parsed = scrape(metrics_url(srv))
    for name in COUNTERS:
        kind, _, labels = parsed["anycable_go_" + name]
        assert kind == "counter"
        assert labels == {"env": "test", "region": "eu-1"}
    for name in GAUGES:
        kind, _, labels = parsed["anycable_go_" + name]
        assert kind == "gauge"
        assert labels == {"env": "test", "region": "eu-1"}
    assert parsed["anycable_go_mem_sys_bytes"][1] > 0
    assert parsed["anycable_go_goroutines_num"][1] > 0


def test_clients_num_follows_connections(srv: Server) -> None:
    url = metrics_url(srv)
    base = wait_for(url, "clients_num", 0)
    assert base["clients_uniq_num"] == 0
    with connected(srv), connected(srv):
        got = values(url)
        assert got["clients_num"] == 2
        assert got["clients_uniq_num"] == 2  # --noauth: every connection has its own identifiers
    wait_for(url, "clients_num", 0)


def test_client_frames_are_counted(srv: Server) -> None:
    url = metrics_url(srv)
    with connected(srv) as c:
        before = values(url)
        frame = json.dumps({"command": "subscribe", "identifier": pubsub_id("m-frames")})
        c.send(frame)
        c.recv()
        c.send("not json")
        c.send({"command": "ping"})
        assert c.recv() == {"type": "pong"}
        after = values(url)
    assert after["client_msg_total"] - before["client_msg_total"] == 3
    assert after["failed_client_msg_total"] - before["failed_client_msg_total"] == 1
    sent = len(frame) + len("not json") + len('{"command": "ping"}')
    assert after["data_rcvd_total"] - before["data_rcvd_total"] == sent


def test_broadcasts_are_counted(srv: Server) -> None:
    url = metrics_url(srv)
    ident = pubsub_id("m-broadcast")
    with connected(srv) as a, connected(srv) as b:
        for c in (a, b):
            assert c.subscribe(ident)["type"] == "confirm_subscription"
        before = values(url)
        assert before["broadcast_streams_num"] >= 1
        srv.publish("m-broadcast", {"n": 1})
        frames = [c.recv() for c in (a, b)]
        after = values(url)
    assert all(f["message"] == {"n": 1} for f in frames)
    assert after["publications_total"] - before["publications_total"] == 1
    assert after["broadcast_msg_total"] - before["broadcast_msg_total"] == 1
    assert after["server_msg_total"] - before["server_msg_total"] >= 2
    assert after["data_sent_total"] - before["data_sent_total"] >= 2 * len(json.dumps(frames[0], separators=(",", ":")))


def test_invalid_publication_is_counted(srv: Server) -> None:
    url = metrics_url(srv)
    before = values(url)
    status, _ = srv.broadcast({"stream": "x", "data": {"not": "a string"}})
    assert status == 422
    after = values(url)
    assert after["failed_broadcast_msg_total"] - before["failed_broadcast_msg_total"] == 1
    assert after["publications_total"] == before["publications_total"]


def test_oversized_frame_is_counted_as_failed(srv: Server) -> None:
    url = metrics_url(srv)
    before = values(url)
    with connected(srv) as c:
        c.send("x" * 2000)
        code, _ = c.closed()
    assert code == 1009
    assert values(url)["failed_client_msg_total"] - before["failed_client_msg_total"] == 1


def test_head_request_has_no_body(srv: Server) -> None:
    req = urllib.request.Request(metrics_url(srv), method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
        assert resp.read() == b""


# ---------------------------------------------------------------- a port of its own


def test_metrics_on_their_own_port_and_host(make_server: type[Server]) -> None:
    """--metrics_port with --metrics_host: only there; not on the main port. Also: failed auths."""
    port = free_port()
    s = make_server("--norpc", "--metrics_http=/prom", f"--metrics_port={port}", "--metrics_host=127.0.0.2").start()
    assert s.get("/prom")[0] == 404
    url = f"http://127.0.0.2:{port}/prom"
    before = values(url)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/prom", timeout=2)
    # without --noauth or RPC nothing identifies a client: it is refused and counted
    c = Client(s.url)
    code, frames = c.closed()
    c.close()
    assert frames == [{"type": "disconnect", "reason": "unauthorized", "reconnect": False}]
    assert code == 1000
    assert values(url)["failed_auths_total"] - before["failed_auths_total"] == 1
    assert f"Serve metrics at http://127.0.0.2:{port}/prom" in s.output()


def test_no_metrics_endpoint_unless_asked(make_server: type[Server]) -> None:
    s = make_server("--noauth").start()
    assert s.get("/metrics")[0] == 404


# ---------------------------------------------------------------- the log line

_LINE = re.compile(r" INF (\S+=\S+(?: \S+=\S+)*) context=metrics ")


def metric_lines(s: Server) -> list[dict[str, int]]:
    out = []
    for line in s.output().splitlines():
        m = _LINE.search(line)
        if m:
            out.append({k: int(v) for k, v in (p.split("=") for p in m.group(1).split())})
    return out


def test_metrics_log_line_has_deltas_and_filter(make_server: type[Server]) -> None:
    s = make_server(
        "--public_streams",
        "--noauth",
        "--metrics_log",
        "--metrics_rotate_interval=1",
        "--metrics_log_filter=publications_total,clients_num,client_msg_total",
    ).start()
    with connected(s) as c:
        c.subscribe(pubsub_id("m-log"))
        s.publish("m-log", 1)
        s.publish("m-log", 2)
        c.recv()
        c.recv()
        deadline = time.monotonic() + 15
        # the publications show up as a delta once, then as zero deltas
        while time.monotonic() < deadline:
            lines = metric_lines(s)
            seen = [i for i, line in enumerate(lines) if line["publications_total"] == 2]
            if seen and len(lines) > seen[0] + 1:
                break
            time.sleep(0.2)
    assert seen, s.output()
    for line in lines:
        assert list(line) == ["client_msg_total", "clients_num", "publications_total"]  # filtered, sorted
    assert sum(line["publications_total"] for line in lines) == 2
    assert sum(line["client_msg_total"] for line in lines) == 1
    assert lines[seen[0] + 1]["publications_total"] == 0
    assert lines[seen[0] + 1]["clients_num"] == 1  # a gauge is a value, not a delta
    assert "Log metrics every 1s" in s.output()


# ---------------------------------------------------------------- several processes


def test_processes_sharing_a_metrics_directory_are_summed(make_server: type[Server], tmp_path: Path) -> None:
    env = {DIR_ENV: str(tmp_path)}
    flags = ("--public_streams", "--noauth", "--metrics_http=/metrics", "--stats_refresh_interval=1")
    a = make_server(*flags, env=env).start()
    b = make_server(*flags, env=env).start()
    url_b = metrics_url(b)
    with connected(a) as c:
        c.subscribe(pubsub_id("m-sum"))
        a.publish("m-sum", "x")
        c.recv()
        # b counts nothing itself: what it reports comes from a's snapshot file
        got = wait_for(url_b, "publications_total", 1)
        assert got["clients_num"] == 1
        assert values(metrics_url(a))["publications_total"] == 1
        b.publish("m-sum", "y")
        assert values(url_b)["publications_total"] == 2  # b adds its own live count at once
        wait_for(metrics_url(a), "publications_total", 2)
    assert a.stop() == 0
    # a stopped: its clients are gone from the gauges, its counts stay in the totals
    got = wait_for(url_b, "clients_num", 0)
    assert got["publications_total"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"worker-{s.proc.pid}.json" for s in (a, b) if s.proc is not None
    )
