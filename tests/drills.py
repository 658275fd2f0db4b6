"""Drills: many official JS clients, a steady stream of numbered messages, and an invariant.

:class:`Drill` runs ``tests/js/drill_client.mjs`` (N clients in one node process);
:class:`Publisher` POSTs ``{"n": k}`` messages to one or more broadcast endpoints from a
thread, retrying a publication the server did not accept (503) and recording what it
did accept; :func:`check_exactly_once` says what every client should have.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from helpers import http_call
from jsclient import JS_DIR, node_binary


class Drill:
    def __init__(self, urls: list[str], clients: int, *args: str) -> None:
        cmd = [node_binary(), str(JS_DIR / "drill_client.mjs"), f"--url={','.join(urls)}", f"--clients={clients}"]
        self.proc = subprocess.Popen(
            [*cmd, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "text": line.rstrip()}
            with self._cond:
                self.lines.append(event)
                self._cond.notify_all()

    def wait(self, name: str, timeout: float = 30.0, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.lines[after:]:
                    if event.get("event") == name:
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no {name!r} from the drill client: {self.lines[-20:]}")
                self._cond.wait(left)

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def report(self) -> list[dict[str, Any]]:
        mark = len(self.lines)
        self.send({"cmd": "report"})
        return self.wait("report", after=mark)["clients"]  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Drill:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Publisher:
    """POSTs ``{"n": k}`` to every stream in turn, ``rate`` publications a second, spread over
    ``urls``; a publication answered 503 (or not answered) is retried until accepted."""

    def __init__(self, urls: list[str], streams: list[str], rate: float = 50.0, key: str | None = None) -> None:
        self.urls = urls
        self.streams = streams
        self.rate = rate
        self.key = key
        self.accepted: dict[str, list[int]] = {s: [] for s in streams}
        #: per stream, the numbers that took more than one POST, and how many
        self.attempts: dict[str, dict[int, int]] = {s: {} for s in streams}
        self.retries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _post(self, url: str, body: dict[str, Any]) -> int:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            status, _ = http_call(req)
        except (urllib.error.URLError, OSError):
            return 0
        return status

    def _run(self) -> None:
        k = 0
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            stream = self.streams[k % len(self.streams)]
            n = len(self.accepted[stream]) + 1
            url = self.urls[k % len(self.urls)]
            while self._post(url, {"stream": stream, "data": json.dumps({"n": n})}) != 201:
                self.retries += 1
                self.attempts[stream][n] = self.attempts[stream].get(n, 1) + 1
                if self._stop.wait(0.1):
                    return
            self.accepted[stream].append(n)
            k += 1
            self._stop.wait(interval)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.accepted.values())


def check_exactly_once(
    clients: list[dict[str, Any]],
    expected: dict[str, list[int]],
    stream_of: Any,
    attempts: dict[str, dict[int, int]] | None = None,
) -> list[str]:
    """Problems found: every client must have every accepted number of its stream, once, in
    order, and no (epoch, offset) twice.

    ``attempts`` (:attr:`Publisher.attempts`): a publication that got no clear answer (no
    reply, or a 503 after Redis went away mid-round-trip) may have been registered all the
    same; the publisher's retry then registers it again, under a new offset. Such a number
    may arrive once per attempt (each copy with its own offset), as AnyCable promises no
    idempotent publication; every other number exactly once.
    """
    problems = []
    for c in clients:
        stream = stream_of(c)
        want = expected[stream]
        tries = (attempts or {}).get(stream, {})
        got = c["got"]
        kept: list[int] = []
        seen: dict[int, int] = {}
        for n in got:
            seen[n] = seen.get(n, 0) + 1
            # a later copy of a retried publication (registered once per attempt, each under
            # its own offset) is allowed; any other repeat stays and makes kept differ from want
            if seen[n] == 1 or seen[n] > tries.get(n, 1):
                kept.append(n)
        metas = [tuple(m) for m in c.get("metas") or [] if m]
        offsets_repeated = len(metas) != len(set(metas))
        if kept != want or offsets_repeated:
            missing = sorted(set(want) - set(got))
            dups = sorted({n for n in got if got.count(n) > tries.get(n, 1)})
            problems.append(
                f"client {c['i']} ({c['stream']}): {len(got)} of {len(want)}, missing {missing[:10]}, "
                f"duplicates {dups[:10]}, out of order {kept != sorted(kept)}, offsets repeated {offsets_repeated}"
            )
    return problems
