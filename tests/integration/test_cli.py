"""The real ``anycable-gevent`` process: command lines that must work, errors, --help, sources."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import EXT, ROOT, Client, free_port, jwt_token, port_is_free, pubsub_id, request, signed_id

from anycable_gevent import __version__
from anycable_gevent.config import SECTIONS, derive_key
from anycable_gevent.signer import sign

SCRIPT = str(Path(sys.executable).parent / "anycable-gevent")

pytestmark = pytest.mark.filterwarnings("ignore:The HMAC key is")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that configures the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCABLE_") and k not in ("PORT", "REDIS_URL")}
    env.update(extra)
    return env


@contextmanager
def running(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The console script with exactly ``args``, serving on ``port`` until the block ends."""
    proc = subprocess.Popen(
        [SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or clean_env(), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"exited with {proc.returncode}: {out}")
            try:
                if request("GET", f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def fails(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the script expecting it to exit by itself: (exit code, stdout, stderr)."""
    result = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env or clean_env(), timeout=20)
    return result.returncode, result.stdout, result.stderr


def broadcast(port: int, stream: str, data: object, key: str = "") -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = json.dumps({"stream": stream, "data": json.dumps(data)}).encode()
    return request("POST", f"http://127.0.0.1:{port}/_broadcast", body, headers)[0]


# ---------------------------------------------------------------------- the documented command line


def documented(port: int, bport: int) -> list[str]:
    return [
        "--host=127.0.0.1",
        f"--port={port}",
        "--broadcast_adapter=http",
        f"--http_broadcast_port={bport}",
        "--broker=memory",
        "--public_streams",
        "--noauth",
        "--turbo_streams",
        "--headers=cookie,x-api-token",
        "--sessions_ttl=5",
        "--history_ttl=5",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "--streams_secret=x",
        "--jwt_secret=x",
        "--broadcast_key=x",
        "--secret=x",
        "--rpc_host=http://127.0.0.1:{dead}/_anycable",
    ],
)
def test_documented_command_line_starts_a_working_server(extra: str) -> None:
    port, bport, dead = free_port(), free_port(), free_port()
    args = documented(port, bport) + ([extra.format(dead=dead)] if extra else [])
    key = {"--broadcast_key=x": "x", "--secret=x": derive_key("x", "broadcast-cable")}.get(extra, "")
    with running(args, port):
        client = Client(f"ws://127.0.0.1:{port}/cable")
        try:
            welcome = client.expect_welcome()
            assert welcome["sid"] and client.subprotocol == EXT
            ident = pubsub_id("cli/public")
            assert client.subscribe(ident) == {"identifier": ident, "type": "confirm_subscription"}
            if key:
                assert broadcast(bport, "cli/public", "no key") == 401
            assert broadcast(bport, "cli/public", {"n": 1}, key) == 201
            msg = client.recv()
            assert msg["message"] == {"n": 1} and msg["stream_id"] == "cli/public" and msg["offset"] == 1

            if extra in ("--streams_secret=x", "--secret=x"):
                # signed $pubsub and Turbo streams work with that secret
                signed = sign("cli/signed", "x")
                assert client.subscribe(signed_id(signed))["type"] == "confirm_subscription"
                turbo = signed_id(signed, channel="Turbo::StreamsChannel")
                assert client.subscribe(turbo)["type"] == "confirm_subscription"
        finally:
            client.close()

        if extra in ("--jwt_secret=x", "--secret=x"):
            token = jwt_token({"ext": '{"id":"1"}', "exp": int(time.time()) + 60}, "x")
            with Client(f"ws://127.0.0.1:{port}/cable?jid={token}") as c:
                assert c.expect_welcome()["sid"]
            with Client(f"ws://127.0.0.1:{port}/cable?jid=bad") as c:
                code, frames = c.closed()
                assert frames == [{"type": "disconnect", "reason": "unauthorized", "reconnect": False}]


def test_default_broadcast_port_follows_the_key() -> None:
    """With a key and no --http_broadcast_port, broadcasts are served on the main port."""
    port = free_port()
    with running(["--host=127.0.0.1", f"--port={port}", "--noauth", "--public_streams", "--broadcast_key=k"], port):
        assert broadcast(port, "cli/x", 1, "k") == 201
        assert broadcast(port, "cli/x", 1) == 401


def test_broadcast_port_may_be_the_main_port() -> None:
    port = free_port()
    args = ["--host=127.0.0.1", f"--port={port}", f"--http_broadcast_port={port}", "--noauth", "--public_streams"]
    with running(args, port):
        with Client(f"ws://127.0.0.1:{port}/cable") as c:
            c.expect_welcome()
            c.subscribe(pubsub_id("cli/same-port"))
            assert broadcast(port, "cli/same-port", "one port") == 201
            assert c.recv()["message"] == "one port"


# ---------------------------------------------------------------------- sources in the real process


def test_env_beats_config_file_and_cli_beats_env(tmp_path: Path) -> None:
    conf = tmp_path / "anycable.conf"
    conf.write_text("noauth = true\npublic_streams = true\nhost = 127.0.0.1\n")
    port = free_port()
    base = ["--config", str(conf), f"--port={port}", f"--http_broadcast_port={free_port()}"]

    with running(base, port):  # the file alone: connections are accepted
        with Client(f"ws://127.0.0.1:{port}/cable") as c:
            c.expect_welcome()

    with running(base, port, clean_env(ANYCABLE_NOAUTH="false")):  # env over file: no auth, no RPC
        with Client(f"ws://127.0.0.1:{port}/cable") as c:
            code, frames = c.closed()
            assert frames == [{"type": "disconnect", "reason": "unauthorized", "reconnect": False}]

    with running([*base, "--noauth"], port, clean_env(ANYCABLE_NOAUTH="false")):  # flag over env
        with Client(f"ws://127.0.0.1:{port}/cable") as c:
            c.expect_welcome()


def test_port_from_env_alias() -> None:
    port = free_port()
    env = clean_env(PORT=str(port), ANYCABLE_HOST="127.0.0.1", ANYCABLE_NOAUTH="1")
    with running([f"--http_broadcast_port={free_port()}"], port, env):
        with Client(f"ws://127.0.0.1:{port}/cable") as c:
            c.expect_welcome()


# ---------------------------------------------------------------------- errors


@pytest.fixture
def bad_conf(tmp_path: Path) -> str:
    path = tmp_path / "bad.conf"
    path.write_text("noauth = true\nbogus_key = 1\n")
    return str(path)


ERRORS = [
    (["--port=abc"], {}, ["--port"]),
    (["--port=70000"], {}, ["--port"]),
    ([], {"PORT": "abc"}, ["--port"]),
    (["--broker=foo"], {}, ["--broker"]),
    (["--broker=nats"], {}, ["--broker", "nats"]),
    (["--broadcast_adapter=nats"], {}, ["--broadcast_adapter"]),
    (["--workers=2"], {}, ["--workers"]),
    (["--rpc_host=localhost:50051"], {}, ["--rpc_host"]),
    (["--config=/nonexistent/anycable.conf"], {}, ["--config"]),
    (["--config={bad_conf}"], {}, ["bogus_key"]),
    (["--ssl_cert=/etc/hostname"], {}, ["--ssl_cert", "--ssl_key"]),
    (["--noauth=maybe"], {}, ["--noauth"]),
    ([], {"ANYCABLE_PING_INTERVAL": "often"}, ["--ping_interval"]),
    (["--enforce_jwt"], {}, ["--enforce_jwt"]),
    (["--no_such_option"], {}, ["--no_such_option"]),
    (["--redis_tls_ca_cert_path=/nonexistent/ca.pem"], {}, ["--redis_tls_ca_cert_path", "file not found"]),
    (["--redis_tls_client_cert_path={bad_conf}"], {}, ["--redis_tls_client_key_path", "together"]),
    (["--redis_sentinels=127.0.0.1:notaport"], {}, ["--redis_sentinels", "invalid sentinel address"]),
    (["--redis_sentinels=127.0.0.1", "--redis_url=unix:///tmp/r.sock"], {}, ["--redis_url", "names the master"]),
    ([], {"ANYCABLE_REDIS_SENTINELS": "h1,rediss://h2"}, ["--redis_sentinels", "mix of redis:// and rediss://"]),
]


@pytest.mark.parametrize(("args", "env", "names"), ERRORS)
def test_bad_configuration_exits_with_one_line(args, env, names, bad_conf: str) -> None:
    port, bport = free_port(), free_port()
    argv = [f"--port={port}", f"--http_broadcast_port={bport}", *[a.format(bad_conf=bad_conf) for a in args]]
    if "PORT" in env:
        argv = argv[1:]
    code, out, err = fails(["--host=127.0.0.1", *argv], clean_env(**env))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0]
    assert out == ""
    assert port_is_free(port) and port_is_free(bport)


def test_port_in_use_exits_with_one_line() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bport = taken.getsockname()[1]
        code, _, err = fails(["--host=127.0.0.1", f"--port={port}", f"--http_broadcast_port={bport}", "--noauth"])
        assert code == 2
        assert len(err.splitlines()) == 1 and str(bport) in err
    assert port_is_free(port)


# ---------------------------------------------------------------------- help and version


def test_help_lists_options_by_section() -> None:
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, env=clean_env(), timeout=20)
    assert result.returncode == 0
    assert result.stderr == ""
    text = result.stdout
    positions = [text.index(f"\n{title}:\n") for title in SECTIONS.values()]
    assert positions == sorted(positions)
    sections = dict(zip(SECTIONS, positions, strict=True))
    assert sections["server"] < text.index("  --port PORT") < sections["ws"]
    assert sections["auth"] < text.index("  --jwt_secret") < sections["broadcast"]
    assert sections["broker"] < text.index("  --history_ttl") < sections["pubsub"]
    assert "ANYCABLE_PORT" in text and "default: 8080" in text


def test_version() -> None:
    result = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, env=clean_env(), timeout=20)
    assert result.returncode == 0
    assert __version__ in result.stdout
