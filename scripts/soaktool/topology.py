"""The servers under test: started here in one of three topologies, or given by URL.

* ``memory``: one process, ``--broker=memory``;
* ``workers``: a master with two forked workers, ``--workers=2 --broker=redis
  --pubsub=redis --reuseport``;
* ``nodes``: two single-process servers sharing Redis (``--broker=redis --pubsub=redis``);
  clients and publications are spread over both.

Every self-started server runs with ``--public_streams --noauth`` on loopback and the
TTLs of :data:`SERVER_TTLS`, chosen so that a kill is always recoverable within a run:
sessions live 120 s after their last touch (a client is back within seconds), history keeps
1,000 messages per stream for 600 s (a client misses at most a few seconds of one stream).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from soaktool.probes import children

#: Server options of the self-started topologies (see the module docstring).
SERVER_TTLS = {"sessions_ttl": 120, "history_ttl": 600, "history_limit": 1000}

TOPOLOGIES = ("memory", "workers", "nodes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """Where the clients connect and publications go, and what can be measured."""

    ws_urls: list[str]
    broadcast_urls: list[str]
    broadcast_key: str = ""
    #: root pids of the server process trees (a master's workers are found under it)
    pids: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    redis_url: str = ""
    redis_prefix: str = ""
    #: (kind, command line) of each self-started server, for the report
    commands: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def workers(self) -> list[int]:
        """Worker pids (children of the roots); empty for single-process servers."""
        return [kid for pid in self.pids for kid in children(pid)]

    def stop(self) -> list[int]:
        """Stop the self-started servers (SIGTERM, then SIGKILL after 30 s); their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYCABLE_") and k not in ("REDIS_URL", "PORT")}
    root = Path(__file__).resolve().parents[2]
    if (root / "anycable_gevent").is_dir():  # run from a checkout: serve its code
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer /health within {timeout:g}s:\n{log.read_text(errors='replace')[-3000:]}")


def start(topology: str, workdir: Path, redis_url: str, redis_prefix: str, extra: list[str]) -> Deployment:
    """Start the servers of ``topology``, logs in ``workdir``; wait until they serve."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}")
    common = ["--host=127.0.0.1", "--public_streams", "--noauth", *(f"--{k}={v}" for k, v in SERVER_TTLS.items())]
    redis = ["--broker=redis", "--pubsub=redis", f"--redis_url={redis_url}", f"--redis_prefix={redis_prefix}"]
    if topology == "memory":
        variants = [["--broker=memory"]]
    elif topology == "workers":
        variants = [["--workers=2", *redis, "--reuseport"]]
    else:
        variants = [redis, redis]
    dep = Deployment([], [], redis_url="" if topology == "memory" else redis_url, redis_prefix=redis_prefix)
    try:
        for i, variant in enumerate(variants):
            port, bport = free_port(), free_port()
            args = [*common, f"--port={port}", f"--http_broadcast_port={bport}", *variant, *extra]
            log = workdir / f"server-{i}.log"
            cmd = [sys.executable, "-m", "anycable_gevent", *args]
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_server_env())
            dep.procs.append(proc)
            dep.pids.append(proc.pid)
            dep.logs.append(log)
            dep.commands.append("anycable-gevent " + " ".join(args))
            dep.ws_urls.append(f"ws://127.0.0.1:{port}/cable")
            dep.broadcast_urls.append(f"http://127.0.0.1:{bport}/_broadcast")
            _wait_healthy(proc, port, log)
        if topology == "workers":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = dep.logs[0].read_text(errors="replace")
                if text.count("worker serving index=") >= 2 and len(dep.workers()) == 2:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the two workers did not start serving")
    except BaseException:
        dep.stop()
        raise
    return dep
