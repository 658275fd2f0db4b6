"""Redis for tests: the shared server (a prefix of its own per test) and private servers.

The shared Redis at ``REDIS_URL`` is never stopped or flushed: each test gets a unique
key prefix and its keys are deleted afterwards. A test that needs Redis to fail or
restart starts a :class:`PrivateRedis` on a free port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from helpers import free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:10]}:"


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass
    finally:
        client.close()


def kill_pubsub_connections(url: str, pid: int) -> int:
    """CLIENT KILL the pub/sub connections of one server process (by the name it gives them),
    never anybody else's on the shared Redis; returns how many were killed."""
    client = redis.Redis.from_url(url)
    try:
        ours = [c for c in client.client_list(_type="pubsub") if c.get("name") == f"anycable-gevent:{pid}:pubsub"]
        for c in ours:
            client.client_kill_filter(_id=c["id"])
        return len(ours)
    finally:
        client.close()


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a certificate it signed (for 127.0.0.1), as PEM files."""

    ca: str
    cert: str
    key: str


def make_tls_files(directory: str, name: str = "redis") -> TLSFiles:
    """A CA of its own and a certificate for 127.0.0.1 signed by it (``openssl``)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ca, ca_key = f"{directory}/{name}-ca.crt", f"{directory}/{name}-ca.key"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}-ca",
        "-keyout", ca_key, "-out", ca,
    )  # fmt: skip
    key, csr, cert = f"{directory}/{name}.key", f"{directory}/{name}.csr", f"{directory}/{name}.crt"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr)
    ext = f"{directory}/{name}.ext"
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
        "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return TLSFiles(ca, cert, key)


class PrivateRedis:
    """A ``redis-server`` of the test's own, on a free loopback port.

    Args:
        persistence: keep data across :meth:`restart` (an AOF fsynced on every write,
            in a temporary directory); without it a restart loses everything.
        tls: serve TLS only (``rediss://``) with these files; ``client_certs`` asks
            clients for a certificate signed by the same CA (mutual TLS).
        replica_of: the port of a master (on 127.0.0.1) to replicate.
    """

    def __init__(
        self,
        persistence: bool = False,
        tls: TLSFiles | None = None,
        client_certs: bool = False,
        replica_of: int | None = None,
    ) -> None:
        self.port = free_port()
        self.persistence = persistence
        self.tls = tls
        self.client_certs = client_certs
        self.replica_of = replica_of
        self.dir = tempfile.mkdtemp(prefix="anycable-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            t = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", t.cert, "--tls-key-file", t.key]
            args += ["--tls-ca-cert-file", t.ca, "--tls-auth-clients", "yes" if self.client_certs else "no"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistence else ["--appendonly", "no"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.ping():
                        return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def client(self) -> Any:
        if self.tls is None:
            return redis.Redis.from_url(self.url, socket_timeout=2)
        t = self.tls
        certs = {"ssl_certfile": t.cert, "ssl_keyfile": t.key} if self.client_certs else {}
        return redis.Redis.from_url(self.url, socket_timeout=2, ssl_ca_certs=t.ca, **certs)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateSentinel:
    """A Redis Sentinel of the test's own, watching a :class:`PrivateRedis` master as
    ``name`` (quorum 1, down after 1 s), on a free loopback port."""

    def __init__(self, master_port: int, name: str = "mymaster") -> None:
        self.port = free_port()
        self.name = name
        self.master_port = master_port
        self.dir = tempfile.mkdtemp(prefix="anycable-sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateSentinel:
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:  # the sentinel rewrites its file: it must be its own
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1\n"
                f"sentinel down-after-milliseconds {self.name} 1000\n"
                f"sentinel failover-timeout {self.name} 5000\n"
            )
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.master() == self.master_port:
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis sentinel did not start")

    def client(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def master(self) -> int:
        """The port of the master this sentinel names now."""
        with self.client() as c:
            _, port = c.sentinel_get_master_addr_by_name(self.name)
        return int(port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> PrivateSentinel:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
