"""Process-tree helpers for tests of forked workers (Linux /proc)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "bench"))

from cablebench import procfs  # noqa: E402
from cablebench.procfs import connection_states  # noqa: E402,F401  (re-exported for the tests)


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies excluded)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            out.append(int(entry.name))
    return sorted(out)


def sockets(pid: int) -> int:
    """Open sockets of a process."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        return 0
    return n


def wait_children(pid: int, n: int, timeout: float = 15.0, exclude: set[int] | None = None) -> list[int]:
    """Wait until ``pid`` has ``n`` children (none of ``exclude``); returns them."""
    deadline = time.monotonic() + timeout
    kids: list[int] = []
    while time.monotonic() < deadline:
        kids = [k for k in children(pid) if not exclude or k not in exclude]
        if len(kids) == n and len(children(pid)) == n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"expected {n} workers, found {kids}")


def worker_of(server_port: int, client_port: int, pids: list[int]) -> int:
    """The worker holding the server side of the connection from ``client_port``."""
    pid = procfs.worker_of(server_port, client_port, pids)
    assert pid, f"no worker holds the server side of port {client_port}"
    return pid
