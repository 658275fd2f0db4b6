"""Starting the server under test for a run (``--start-server``): pinned, logged, stopped afterwards.

The command runs in its own session, so stopping it signals exactly the process group this
tool created. Before starting, the ports it should listen on must be free: a benchmark that
silently measured some other process already bound there would be worse than no benchmark.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO


class ServerError(Exception):
    """The server could not be started as asked."""


def parse_cpus(spec: str) -> set[int]:
    """``"1"``, ``"0,2"`` or ``"0-3"`` (taskset -c style) to a CPU set."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {spec!r}")
    return cpus


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepting(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.5):
            return True
    except OSError:
        return False


def _resolve(argv: list[str]) -> list[str]:
    """Find the program on PATH, or next to this Python (a virtualenv's bin/)."""
    if argv and os.sep not in argv[0] and shutil.which(argv[0]) is None:
        beside = os.path.join(os.path.dirname(sys.executable), argv[0])
        if os.access(beside, os.X_OK):
            return [beside, *argv[1:]]
    return argv


class ManagedServer:
    def __init__(self, command: str, cpus: set[int] | None = None, log_path: str | None = None) -> None:
        self.argv = _resolve(shlex.split(command))
        self.cpus = cpus
        if log_path:
            self.log: IO[bytes] = open(log_path, "wb")  # closed in stop()
        else:
            self.log = tempfile.NamedTemporaryFile(prefix="cablebench-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> str:
        return self.log.name

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, addrs: list[tuple[str, int]], timeout: float) -> None:
        """Start the command and wait until every address in ``addrs`` accepts TCP connections."""
        taken = [f"{h}:{p}" for h, p in addrs if accepting((h, p))]
        if taken:
            raise ServerError(f"something already listens on {', '.join(taken)}; stop it or pick other ports")
        cpus = self.cpus

        def pin() -> None:  # runs in the child between fork and exec
            if cpus:
                os.sched_setaffinity(0, cpus)

        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin
            )
        except OSError as exc:
            raise ServerError(f"cannot run {self.argv[0]!r}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        waiting = list(addrs)
        while waiting:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with status {self.proc.returncode}; log: {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"server did not listen on {waiting} within {timeout:g} s; log: {self.log_path}")
            waiting = [a for a in waiting if not accepting(a)]
            if waiting:
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it if it lingers; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
