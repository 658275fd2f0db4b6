"""conf/nginx.conf in front of the real server: the official JS client works through it,
/health is proxied, /_broadcast and /metrics are not reachable from outside.

nginx runs privately: its own prefix, pid, logs and temp dirs, a free loopback port,
``daemon off;`` as a child process. It is installed from Debian packages when missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, Client, Server, free_port, pubsub_id, request
from jsclient import JSClient

from anycable_gevent.web import HEALTH_BODY

SITE = ROOT / "conf" / "nginx.conf"
KEY = "nginx-test-broadcast-key"

MAIN_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/site.conf;
}}
"""


def nginx_binary() -> str:
    """nginx, installed from Debian packages if it is not there (fails, never skips)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None:
        pytest.fail("nginx is missing and installing it needs root: run `apt-get install nginx` (scripts/test does)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"]):
        proc = subprocess.run([*sudo, *cmd], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(found), "nginx was installed but is not on PATH"
    return found


def render_site(upstream_port: int, listen_port: int) -> str:
    """conf/nginx.conf with our upstream address and a loopback listen port."""
    text = SITE.read_text()
    text, n = re.subn(r"^(\s*)server 127\.0\.0\.1:8080;", rf"\1server 127.0.0.1:{upstream_port};", text, flags=re.M)
    assert n == 1, "conf/nginx.conf: expected one `server 127.0.0.1:8080;` in the upstream"
    text, n = re.subn(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert n == 1, "conf/nginx.conf: expected one `listen 80;`"
    return text


class Nginx:
    def __init__(self, binary: str, prefix: Path, upstream_port: int) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        (prefix / "tmp").mkdir(parents=True)
        (prefix / "site.conf").write_text(render_site(upstream_port, self.port))
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(MAIN_CONF.format(prefix=prefix))
        self.args = [binary, "-p", str(prefix), "-c", str(self.conf), "-e", str(prefix / "error.log")]
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.args, "-t"], capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        with open(self.prefix / "stdout.log", "wb") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"nginx exited:\n{self.errors()}"
            try:
                status, _, _ = request("GET", f"{self.http}/health")
                if status == 200:
                    return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"nginx did not come up:\n{self.errors()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/cable"


@pytest.fixture(scope="module")
def backend() -> Iterator[Server]:
    """A broadcast key puts /_broadcast on the main port (the case nginx must guard), metrics too."""
    with Server(
        "--public_streams", "--noauth", f"--broadcast_key={KEY}", "--http_broadcast_port=0", "--metrics_http=/metrics"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def nginx(backend: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(nginx_binary(), tmp_path_factory.mktemp("nginx"), backend.port)
    checked = proxy.check()
    assert checked.returncode == 0, checked.stderr
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def publish(backend: Server, stream: str, data: object) -> int:
    body = json.dumps({"stream": stream, "data": json.dumps(data)}).encode()
    status, _, _ = request(
        "POST",
        f"{backend.http}/_broadcast",
        body,
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    return status


def test_official_js_client_through_nginx(nginx: Nginx, backend: Server) -> None:
    with JSClient(nginx.ws, stream="through-nginx", count=2, control=False) as js:
        js.wait_for("connected")
        js.wait_for("subscribed")
        assert publish(backend, "through-nginx", {"n": 1}) == 201
        assert publish(backend, "through-nginx", {"n": 2}) == 201
        messages = js.wait_messages(2)
        assert js.wait_exit() == 0
    assert [m["data"] for m in messages] == [{"n": 1}, {"n": 2}]
    metas = [m["meta"] for m in messages]
    assert [meta["stream"] for meta in metas] == ["through-nginx"] * 2
    assert metas[1]["offset"] == metas[0]["offset"] + 1 and metas[0]["epoch"] == metas[1]["epoch"]


def test_subprotocol_headers_and_pings_pass_through(nginx: Nginx, backend: Server) -> None:
    c = Client(nginx.ws)
    try:
        assert c.subprotocol == "actioncable-v1-ext-json"
        assert c.ws.getheaders().get("x-anycable-version")
        assert "sid" in c.expect_welcome()
        ident = pubsub_id("nginx-py")
        assert c.subscribe(ident)["type"] == "confirm_subscription"
        assert c.recv(6, pings=True)["type"] == "ping"  # nothing buffers or drops server frames
        assert publish(backend, "nginx-py", "hello") == 201
        assert c.recv()["message"] == "hello"
    finally:
        c.close()


def test_health_is_proxied(nginx: Nginx) -> None:
    status, _, body = request("GET", f"{nginx.http}/health")
    assert (status, body) == (200, HEALTH_BODY)


@pytest.mark.parametrize("path", ["/_broadcast", "/_broadcast/", "/_broadcast?x=1", "/metrics"])
def test_broadcast_and_metrics_are_not_reachable_through_nginx(nginx: Nginx, backend: Server, path: str) -> None:
    with Client(backend.url) as c:
        c.expect_welcome()
        c.subscribe(pubsub_id("nginx-guard"))
        body = json.dumps({"stream": "nginx-guard", "data": json.dumps("leaked")}).encode()
        for method in ("POST", "GET"):
            status, _, _ = request(
                method, nginx.http + path, body if method == "POST" else None, {"Authorization": f"Bearer {KEY}"}
            )
            assert status == 404, (method, path, status)
        c.nothing(0.3)
    # the endpoints are there on the server itself: it is nginx that keeps them private
    assert request("GET", f"{backend.http}/metrics")[0] == 200
    assert publish(backend, "nginx-guard", "direct") == 201
