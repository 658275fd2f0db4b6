"""Redis for tests: the shared server (a prefix of its own per test) and private servers.

The shared Redis at ``REDIS_URL`` is never stopped or flushed: each test gets a unique
key prefix and its keys are deleted afterwards. A test that needs Redis to fail or
restart starts a :class:`PrivateRedis` on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
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


class PrivateRedis:
    """A ``redis-server`` of the test's own, on a free loopback port.

    Args:
        persistence: keep data across :meth:`restart` (an AOF fsynced on every write,
            in a temporary directory); without it a restart loses everything.
    """

    def __init__(self, persistence: bool = False) -> None:
        self.port = free_port()
        self.persistence = persistence
        self.dir = tempfile.mkdtemp(prefix="anycable-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistence else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
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
        return redis.Redis.from_url(self.url)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
