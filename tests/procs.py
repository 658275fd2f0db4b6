"""Process-tree helpers for tests of forked workers (Linux /proc)."""

from __future__ import annotations

import os
import time
from pathlib import Path


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
    """The worker holding the server side of the connection from ``client_port``.

    ``/proc/net/tcp`` may list tens of thousands of sockets on a shared machine: the line is
    found by its addresses (local, remote) as bytes, not parsed line by line.
    """
    with open("/proc/net/tcp", "rb") as f:
        table = f.read()
    at = table.find(b"0100007F:%04X 0100007F:%04X " % (server_port, client_port))
    inode = table[at : table.find(b"\n", at)].split()[8].decode() if at >= 0 else ""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                pass
    raise AssertionError(f"no worker holds the server side of port {client_port}")
