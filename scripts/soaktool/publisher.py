"""Numbered publications at a steady rate, one greenlet per stream.

Each stream's greenlet POSTs ``{"stream": S, "data": "{\\"n\\": k}"}`` to the broadcast
endpoint(s) in turn, one publication at a time (so ``n`` order is offset order), at
``rate / streams`` a second. A publication answered 2xx is *accepted* and expected by
every subscriber; any other answer, or none, is counted as not accepted and the next
publication gets the next number (the server may have registered it all the same: a
client receiving it is not an error, see :mod:`soaktool.tracks`).
"""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import gevent

from soaktool.tracks import Published


class Publisher:
    def __init__(self, urls: list[str], streams: list[str], rate: float, key: str = "", pad: int = 0) -> None:
        self.targets = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme != "http":
                raise ValueError(f"only http:// broadcast URLs are supported: {url}")
            self.targets.append((parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/_broadcast"))
        self.streams = streams
        self.rate = rate
        self.key = key
        self.pad = "x" * pad
        self.published = {s: Published() for s in streams}
        self.rejected: dict[int, int] = {}
        self.errors = 0
        self._greenlets: list[gevent.Greenlet] = []
        self.running = False

    @property
    def accepted(self) -> int:
        return sum(len(p.numbers) for p in self.published.values())

    @property
    def not_accepted(self) -> int:
        return sum(self.rejected.values()) + self.errors

    def start(self) -> None:
        self.running = True
        period = len(self.streams) / self.rate
        for i, stream in enumerate(self.streams):
            # spread the streams' schedules over one period
            self._greenlets.append(gevent.spawn(self._run, stream, period, i * period / len(self.streams), i))

    def stop(self) -> None:
        self.running = False
        gevent.joinall(self._greenlets, timeout=10)

    def _run(self, stream: str, period: float, delay: float, turn: int) -> None:
        gevent.sleep(delay)
        conns: dict[int, http.client.HTTPConnection] = {}
        pub = self.published[stream]
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        next_at = time.monotonic()
        while self.running:
            pub.attempts += 1
            n = pub.attempts
            body: dict[str, object] = {"n": n}
            if self.pad:
                body["pad"] = self.pad
            payload = json.dumps({"stream": stream, "data": json.dumps(body)}).encode()
            which = turn % len(self.targets)
            turn += 1
            host, port, path = self.targets[which]
            status = 0
            try:
                conn = conns.get(which)
                if conn is None:
                    conn = conns[which] = http.client.HTTPConnection(host, port, timeout=10)
                conn.request("POST", path, payload, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    conns.pop(which, None)
            except (OSError, http.client.HTTPException):
                self.errors += 1
                bad = conns.pop(which, None)
                if bad is not None:
                    bad.close()
            if 200 <= status < 300:
                pub.numbers.append(n)
                pub.times.append(time.time())
            elif status:
                self.rejected[status] = self.rejected.get(status, 0) + 1
            next_at = max(next_at + period, time.monotonic() - period)  # no catch-up bursts
            gevent.sleep(max(next_at - time.monotonic(), 0))
        for conn in conns.values():
            conn.close()
