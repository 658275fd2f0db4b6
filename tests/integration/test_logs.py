"""Logs of the real server: the text and JSON formats, levels, --debug frames and access
lines, and no sid, token or secret at info level or above."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import Client, Server, connected, free_port, jwt_token, pubsub_id

from anycable_gevent.config import derive_key
from anycable_gevent.log import conn_ref

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DBG|INF|WRN|ERR) .*context=[a-z_]+ nodeid=[0-9a-f]{6} pid=\d+$"
)


def wait_output(s: Server, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in s.output():
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{s.output()}"
        time.sleep(0.05)
    return s.output()


def test_text_format_banner(make_server: type[Server]) -> None:
    s = make_server("--public_streams", "--noauth").start()
    lines = s.output().splitlines()
    assert lines, "no output"
    for line in lines:
        assert TEXT_LINE.match(line), line
    text = s.output()
    assert re.search(r"INF Starting anycable-gevent \S+ \(pid: \d+, workers: 1, open file limit: \S+,", text)
    assert "INF broker: memory (epoch: " in text
    assert f"INF Handle WebSocket connections at ws://127.0.0.1:{s.port}/cable" in text
    assert f"INF Accept broadcasts at http://127.0.0.1:{s.broadcast_port}/_broadcast (no key required)" in text
    assert f"INF Handle health checks at http://127.0.0.1:{s.port}/health" in text
    assert "WRN --noauth: every connection is accepted without authentication" in text
    # the harness polled /health to see the server up: access lines are debug only
    assert "GET /health" not in text


def test_json_format(make_server: type[Server]) -> None:
    s = make_server(
        "--noauth", "--log_format=json", "--metrics_log", "--metrics_rotate_interval=1", "--max_message_size=100"
    ).start()
    with connected(s) as c:
        sid = c.welcome["sid"] if c.welcome else ""
        c.send("z" * 300)
        assert c.closed()[0] == 1009
    wait_output(s, '"context": "metrics"')
    wait_output(s, conn_ref(sid))
    records = [json.loads(line) for line in s.output().splitlines()]
    for r in records:
        assert {"time", "level", "msg", "context", "nodeid", "pid"} <= set(r), r
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", r["time"])
        assert r["level"] in ("debug", "info", "warn", "error")
    assert {r["nodeid"] for r in records} == {records[0]["nodeid"]}
    assert isinstance(records[0]["nodeid"], str) and isinstance(records[0]["pid"], int)
    starting = next(r for r in records if r["msg"].startswith("Starting anycable-gevent"))
    assert starting["level"] == "info" and starting["context"] == "main"
    assert any(r["level"] == "warn" and r["msg"].startswith("--noauth") for r in records)
    closing = next(r for r in records if r.get("conn") == conn_ref(sid))
    # the trailing key=value pairs of a message become fields; the text before them is msg
    assert (closing["level"], closing["context"]) == ("info", "ws")
    assert closing["msg"] == "closing: message of 300 bytes or more"
    metrics = next(r for r in records if r["context"] == "metrics")
    assert metrics["msg"] == ""
    assert metrics["clients_num"] == 0 and isinstance(metrics["publications_total"], int)


def test_node_id_is_used(make_server: type[Server]) -> None:
    s = make_server("--noauth", "--node_id=ab12cd").start()
    assert "nodeid=ab12cd" in s.output().splitlines()[0]


def test_log_level_warn_hides_info(make_server: type[Server]) -> None:
    s = make_server("--noauth", "--log_level=warn").start()
    text = s.output()
    assert " WRN --noauth" in text
    assert " INF " not in text


def test_no_sid_token_or_secret_at_info(make_server: type[Server]) -> None:
    secret = "s3cr3t-" + "x" * 32
    s = make_server(f"--secret={secret}", "--public_streams", "--max_message_size=200").start()
    token = jwt_token({"ext": json.dumps({"user": "u1"}), "exp": int(time.time()) + 600}, secret)
    c = Client(s.url + "?jid=" + token)
    try:
        sid = c.expect_welcome()["sid"]
        c.subscribe(pubsub_id("logs"))
        c.send("y" * 500)  # over --max_message_size: closed, logged at info with the connection ref
        code, _ = c.closed()
        assert code == 1009
    finally:
        c.close()
    text = wait_output(s, f"conn={conn_ref(sid)}")
    line = next(line for line in text.splitlines() if f"conn={conn_ref(sid)}" in line)
    assert " INF closing: message of " in line
    for forbidden in (
        sid,
        token,
        secret,
        derive_key(secret, "broadcast-cable"),
        derive_key(secret, "rpc-cable"),
    ):
        assert forbidden not in text
    assert "requires Authorization: Bearer <broadcast key>" in text


def test_debug_logs_every_frame_and_access(make_server: type[Server]) -> None:
    s = make_server("--public_streams", "--noauth", "--debug").start()
    ident = pubsub_id("dbg")
    with connected(s) as c:
        sid = c.welcome["sid"] if c.welcome else ""
        c.subscribe(ident)
        c.send("bad\nframe")
        s.publish("dbg", {"hello": "debug"})
        assert c.recv()["message"] == {"hello": "debug"}
    text = wait_output(s, "incoming frame")
    wait_output(s, '"hello": "debug"')
    text = s.output()
    out_lines = [line for line in text.splitlines() if "outgoing frame" in line]
    assert any(f"sid={sid}" in line and '"type":"welcome"' in line for line in out_lines)
    assert any("confirm_subscription" in line for line in out_lines)
    assert any('"hello": "debug"' in line for line in out_lines)
    assert any(f"sid={sid}" in line and "incoming frame" in line and "subscribe" in line for line in text.splitlines())
    # a newline in client input cannot start a forged log line
    assert any("frame=bad\\nframe" in line for line in text.splitlines())
    assert not any(line.startswith("frame") for line in text.splitlines())
    with urllib.request.urlopen(f"{s.http}/health", timeout=5):
        pass
    wait_output(s, '"GET /health HTTP/1.1" 200')
    for line in s.output().splitlines():
        if "GET /health" in line:
            assert " DBG " in line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_config_error_is_one_line_on_stderr(fmt: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "anycable_gevent", "--port=0", f"--log_format={fmt}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("anycable-gevent: error: --port")
    assert "--help" in lines[0]
    assert proc.stdout == ""


def test_busy_port_error_names_the_option() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "anycable_gevent",
                "--noauth",
                "--host=127.0.0.1",
                f"--port={free_port()}",  # the default 8080 may be taken on a developer's machine
                f"--http_broadcast_port={port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"anycable-gevent: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "stop what uses it or choose another --http_broadcast_port"
    ]


def test_banner_names_the_rpc_target_without_credentials(make_server: type[Server]) -> None:
    port = free_port()  # nothing listens there: the banner is printed before any call
    secret = "banner-secret-" + "z" * 32
    s = make_server(f"--rpc_host=http://admin:hunter2pass@127.0.0.1:{port}/_anycable", f"--secret={secret}").start()
    text = s.output()
    line = next(line for line in text.splitlines() if " INF controller: " in line)
    assert f"http://127.0.0.1:{port}/_anycable" in line and "with a secret" in line
    for forbidden in ("hunter2pass", "admin:", secret, derive_key(secret, "rpc-cable")):
        assert forbidden not in text
