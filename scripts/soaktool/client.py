"""One extended-protocol client: connects, subscribes, survives kills, restores, accounts.

Each client runs in its own greenlet: connect (with ``?sid=`` once it has one), read the
welcome, bring its subscriptions in line with what it wants, then read until the
connection ends, and start again after a short random delay. The chaos greenlets of
:mod:`soaktool.run` call :meth:`Client.kill` and :meth:`Client.toggle`.

After a ``welcome`` with ``restored: true`` the server already has the subscriptions it
lists in ``restored_ids`` (held until the client asks for history): the client sends a
``history`` command for each of them from its last position, subscribes (with history)
to what it wants and was not restored, and unsubscribes what was restored but is not
wanted any more (the snapshot can lag behind the last command). Without a restore it
subscribes to everything it wants, with history.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import gevent

from soaktool.tracks import LIVE, OFF, SUBSCRIBING, Track
from soaktool.wsclient import WSConn

EXT = "actioncable-v1-ext-json"


def identifier(stream: str) -> str:
    return json.dumps({"channel": "$pubsub", "stream_name": stream}, separators=(",", ":"))


@dataclass
class Counters:
    """Totals over every client (one instance shared by all)."""

    connects: int = 0
    reconnects: int = 0
    restores: int = 0
    restore_failed: int = 0
    connect_errors: int = 0
    socket_kills: int = 0
    #: reconnects without ``?sid=`` (a new session resubscribing with history from its offsets)
    fresh_sessions: int = 0
    server_closes: int = 0
    disconnect_messages: int = 0
    unsubscribes: int = 0
    resubscribes: int = 0
    reject_subscription: int = 0
    protocol_errors: int = 0
    #: monotonic time each connection ended (its session may stay stored for one TTL)
    ended_at: list[float] = field(default_factory=list)


class Client:
    def __init__(self, index: int, urls: list[str], streams: list[str], counters: Counters) -> None:
        self.index = index
        self.urls = urls
        self.url = urls[index % len(urls)]
        self.tracks = {identifier(s): Track(s, identifier(s)) for s in streams}
        self.counters = counters
        self.sid = ""
        self.conn: WSConn | None = None
        self.connected = False
        self.welcomed = False
        self.stopped = False
        #: reconnect as a new session next time
        self.forget = False
        self._greenlet: gevent.Greenlet | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self.stopped = True
        if self.conn is not None:
            self.conn.close()
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    @property
    def settled(self) -> bool:
        """Connected, and every wanted subscription live with no history request pending."""
        if not self.welcomed:
            return False
        return all(
            (t.state == LIVE and not t.history_pending) if t.desired else t.state == OFF for t in self.tracks.values()
        )

    def _run(self) -> None:
        first = True
        backoff = 0.1
        while not self.stopped:
            if not first:
                gevent.sleep(random.uniform(0.05, 0.5) if backoff <= 0.1 else backoff)
            if self.forget:
                self.sid, self.forget = "", False
                self.counters.fresh_sessions += 1
            target = self.url + (f"?sid={self.sid}" if self.sid else "")
            try:
                conn = WSConn(target, EXT)
            except OSError:
                self.counters.connect_errors += 1
                backoff = min(max(backoff * 2, 0.2), 2.0)
                first = False
                if len(self.urls) > 1:
                    self.url = random.choice(self.urls)
                continue
            backoff = 0.1
            self.conn, self.connected = conn, True
            self.counters.connects += 1
            if not first:
                self.counters.reconnects += 1
            first = False
            try:
                self._read(conn)
            except (OSError, ValueError):
                pass
            finally:
                self.connected = self.welcomed = False
                self.counters.ended_at.append(time.monotonic())
                self.conn = None
                conn.close()
                for t in self.tracks.values():
                    t.state, t.history_pending = OFF, False
            if len(self.urls) > 1:
                self.url = random.choice(self.urls)

    def _read(self, conn: WSConn) -> None:
        while True:
            text = conn.recv()
            if text is None:
                self.counters.server_closes += 1
                return
            msg: dict[str, Any] = json.loads(text)
            kind = msg.get("type")
            if kind == "ping":
                continue
            if kind is None and "message" in msg:
                self._message(msg)
            elif kind == "welcome":
                self._welcome(conn, msg)
            elif kind == "disconnect":
                self.counters.disconnect_messages += 1
                return
            else:
                self._reply(kind, msg)

    # ------------------------------------------------------------------ frames
    def _message(self, msg: dict[str, Any]) -> None:
        t = self.tracks.get(msg.get("identifier", ""))
        data = msg.get("message")
        if t is None or not isinstance(data, dict) or not isinstance(data.get("n"), int):
            self.counters.protocol_errors += 1
            return
        t.deliver(data["n"], str(msg.get("epoch") or ""), int(msg.get("offset") or 0))

    def _welcome(self, conn: WSConn, msg: dict[str, Any]) -> None:
        presented = bool(self.sid)
        self.sid = str(msg.get("sid") or "")
        self.welcomed = True
        restored = set(msg.get("restored_ids") or ()) if msg.get("restored") else None
        if restored is not None:
            self.counters.restores += 1
        elif presented:
            self.counters.restore_failed += 1
        for t in self.tracks.values():
            if restored is not None and t.identifier in restored:
                if t.desired:
                    t.state = LIVE
                    self._send(conn, {"command": "history", "identifier": t.identifier, "history": t.history()})
                    t.requested()
                else:
                    self._send(conn, {"command": "unsubscribe", "identifier": t.identifier})
            elif t.desired:
                self._subscribe(conn, t)

    def _reply(self, kind: Any, msg: dict[str, Any]) -> None:
        t = self.tracks.get(msg.get("identifier", ""))
        if t is None:
            self.counters.protocol_errors += 1
            return
        if kind == "confirm_subscription":
            if t.state == SUBSCRIBING:
                t.state = LIVE
        elif kind == "confirm_history":
            t.confirmed()
        elif kind == "reject_history":
            t.rejected()
        elif kind == "reject_subscription":
            self.counters.reject_subscription += 1
            t.state = OFF
        else:
            self.counters.protocol_errors += 1

    def _send(self, conn: WSConn, frame: dict[str, Any]) -> None:
        conn.send_text(json.dumps(frame))

    def _subscribe(self, conn: WSConn, t: Track) -> None:
        if not t.received and not t.epoch:
            t.seg_start = time.time()
        t.state = SUBSCRIBING
        self._send(conn, {"command": "subscribe", "identifier": t.identifier, "history": t.history()})
        t.requested()

    # ------------------------------------------------------------------ chaos
    def kill(self, forget: bool = False) -> bool:
        """Drop the connection with a reset; the client reconnects by itself (``forget``:
        without its sid, so as a new session)."""
        conn = self.conn
        if conn is None or not self.welcomed:
            return False
        self.counters.socket_kills += 1
        self.forget = forget
        conn.kill()
        return True

    def toggle(self) -> Track | None:
        """Unsubscribe one live stream (resubscribed by :meth:`want`); None if none is live."""
        conn = self.conn
        live = [t for t in self.tracks.values() if t.desired and t.state == LIVE and not t.history_pending]
        if conn is None or not self.welcomed or not live:
            return None
        t = random.choice(live)
        t.desired, t.state = False, OFF
        try:
            self._send(conn, {"command": "unsubscribe", "identifier": t.identifier})
        except OSError:
            pass
        self.counters.unsubscribes += 1
        return t

    def want(self, t: Track) -> None:
        """Subscribe again (with history from the last offset seen)."""
        if t.desired:
            return
        t.desired = True
        self.counters.resubscribes += 1
        conn = self.conn
        if conn is not None and self.welcomed:
            try:
                self._subscribe(conn, t)
            except OSError:
                pass  # the reconnect subscribes it
