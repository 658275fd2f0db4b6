"""A private nginx for tests: conf/nginx.conf (the shipped site) in front of real servers.

nginx runs privately: its own prefix, pid, logs and temp dirs, a free loopback port,
``daemon off;`` as a child process. It is installed from Debian packages when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, free_port, request

SITE = ROOT / "conf" / "nginx.conf"

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
    text, n = re.subn(
        r"^(\s*)server 127\.0\.0\.1:8080( [^;]*)?;", rf"\1server 127.0.0.1:{upstream_port}\2;", text, flags=re.M
    )
    assert n == 1, "conf/nginx.conf: expected one `server 127.0.0.1:8080 ...;` in the upstream"
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


def upstream_of(site: str, ports: list[int]) -> str:
    """A rendered site (:func:`render_site` with ``ports[0]``) with every port in its upstream,
    each with the same parameters as the first."""
    first, *more = ports
    found = re.search(rf"^(\s*)server 127\.0\.0\.1:{first}( [^;]*)?;$", site, flags=re.M)
    assert found, "the rendered site has no upstream server line"
    indent, params = found.group(1), found.group(2) or ""
    extra = "".join(f"\n{indent}server 127.0.0.1:{p}{params};" for p in more)
    return site[: found.end()] + extra + site[found.end() :]
