"""Worker liveness without shared memory: an unlinked temporary file per worker.

The worker stamps the file's times with its monotonic clock (one system-wide clock on
Linux) every second from a greenlet, so the stamp stops when the worker's event loop
is blocked, not merely when it is busy. The master reads the stamp with ``fstat``: 0
means "not booted yet" (the master creates the file with times 0 before the fork).
Stdlib only (gunicorn's ``WorkerTmp``).
"""

from __future__ import annotations

import os
import tempfile
import time


class Heartbeat:
    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="heartbeat-", dir=directory)
        os.unlink(path)  # only the descriptor lives: nothing to clean up
        self.fd = fd
        os.utime(fd, (0, 0))

    def notify(self) -> None:
        """The worker is alive (called by the worker)."""
        now = time.monotonic()
        os.utime(self.fd, (now, now))

    def last(self) -> float:
        """The monotonic time of the last :meth:`notify` (0.0: never)."""
        return os.fstat(self.fd).st_mtime

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
