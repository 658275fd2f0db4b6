"""CPU time and resident memory of process trees, and which process holds a connection,
read from /proc (Linux only)."""

from __future__ import annotations

import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it (forked workers, a shell's children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) summed over ``pids``; processes that are gone count 0."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return ticks / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    """VmRSS summed over ``pids`` (shared pages of forked workers are counted in each)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def alive(pid: int) -> bool:
    return _stat_fields(pid) is not None


class ProcessTree:
    """The server under test: a root pid whose descendants are looked up again at every sample."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        return descendants(self.root) if alive(self.root) else []

    def cpu(self) -> float | None:
        """CPU seconds of the tree, or None once the server is gone (a delta would be meaningless)."""
        pids = self.pids()
        return cpu_seconds(pids) if pids else None

    def rss(self) -> int | None:
        pids = self.pids()
        return rss_kb(pids) if pids else None


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def worker_of(server_port: int, client_port: int, pids: list[int]) -> int:
    """The worker holding the server side of the connection from ``client_port`` (0: none).

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
    return 0


#: ``/proc/net/tcp`` state codes, by name.
TCP_STATES = {
    "01": "ESTABLISHED",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0B": "CLOSING",
}


def connection_states(server_port: int) -> dict[str, int]:
    """Loopback TCP connections of ``server_port`` by side and state, e.g.
    ``{"server ESTABLISHED": 4, "server CLOSE_WAIT": 2, "client FIN_WAIT2": 2}``: a server
    side in CLOSE_WAIT is a connection its client closed and the server has not."""
    port = b":%04X" % server_port
    states: dict[str, int] = {}
    with open("/proc/net/tcp", "rb") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            local, remote, state = fields[1], fields[2], fields[3].decode()
            side = "server" if local.endswith(port) else "client" if remote.endswith(port) else ""
            if side and state in TCP_STATES:
                key = f"{side} {TCP_STATES[state]}"
                states[key] = states.get(key, 0) + 1
    return states
