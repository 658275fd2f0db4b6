"""Run the official JS client driver (``tests/js/stream_client.mjs``) from a test and read its events.

The driver prints one JSON object per line (``{"event": ...}``); a reader thread collects them so a
test can wait for the next event of a kind, look at the frames the client sent and received, and
send control commands (``--control``) such as dropping the socket.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from helpers import EXT, ROOT

JS_DIR = ROOT / "tests" / "js"
DRIVER = JS_DIR / "stream_client.mjs"

Event = dict[str, Any]


class JSClientError(AssertionError):
    """The driver did not do what the test waited for (the message includes its output)."""


def node_binary(js_dir: Path = JS_DIR) -> str:
    """Path of ``node``; fails loudly (never skips) when the JS test toolchain is missing."""
    node = shutil.which("node")
    if node is None:
        raise JSClientError("`node` is not on PATH: install Node.js 20 to run the JS client tests")
    modules = js_dir / "node_modules"
    if not (modules / "@anycable" / "core").is_dir() or not (modules / "ws").is_dir():
        raise JSClientError(
            f"{modules} is missing @anycable/core or ws: run `npm ci` in tests/js (scripts/test does it)"
        )
    return node


class JSClient:
    """One ``stream_client.mjs`` process subscribed to one stream (other drivers: subclass, call ``_spawn``).

    ``wait_for(name)`` returns the next event of that name not returned before, so a test can
    walk through a sequence (the first ``subscribed``, then the one after a reconnect).
    """

    def __init__(
        self,
        url: str,
        stream: str | None = None,
        signed: str | None = None,
        count: int = 1,
        timeout: float = 20,
        protocol: str = EXT,
        frames: bool = False,
        control: bool = True,
        reconnect_delay: int | None = None,
        linger: float | None = None,
        script: Path = DRIVER,
    ) -> None:
        if (stream is None) == (signed is None):
            raise ValueError("pass exactly one of stream and signed")
        args = [f"--url={url}", f"--count={count}", f"--timeout={timeout}", f"--protocol={protocol}"]
        args.append(f"--stream={stream}" if stream is not None else f"--signed={signed}")
        if frames:
            args.append("--frames")
        if control:
            args.append("--control")
        if reconnect_delay is not None:
            args.append(f"--reconnect-delay={reconnect_delay}")
        if linger is not None:
            args.append(f"--linger={linger}")
        self._spawn(script, args, control)

    def _spawn(self, script: Path, args: list[str], control: bool) -> None:
        """Start ``node <script> <args>`` and the reader of its event lines (shared by driver subclasses)."""
        self.cmd = [node_binary(), str(script), *args]
        self.events: list[Event] = []
        self._seen: dict[str, int] = {}
        self._cond = threading.Condition()
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=JS_DIR,
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._reader = threading.Thread(target=self._read, name="jsclient-stdout", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ reading
    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "garbage", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    _eof = False

    def _snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def wait_until(self, check: Callable[[list[Event]], Any], timeout: float, what: str) -> Any:
        """Block until ``check(events)`` returns something truthy, and return that."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = check(self.events)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    break
                self._cond.wait(min(left, 0.5))
        raise JSClientError(f"JS client: no {what} within {timeout}s\n{self.report()}")

    def wait_for(self, name: str, timeout: float = 10, **fields: Any) -> Event:
        """The next ``name`` event (matching ``fields``) after those already returned for ``name``."""
        start = self._seen.get(name, 0)

        def check(events: list[Event]) -> tuple[int, Event] | None:
            for i in range(start, len(events)):
                ev = events[i]
                if ev.get("event") == name and all(ev.get(k) == v for k, v in fields.items()):
                    return i, ev
            return None

        index, event = self.wait_until(check, timeout, f"{name!r} event {fields or ''}".strip())
        self._seen[name] = index + 1
        return event  # type: ignore[no-any-return]

    def wait_messages(self, n: int, timeout: float = 10) -> list[Event]:
        """All message events, once there are at least ``n``."""
        return self.wait_until(  # type: ignore[no-any-return]
            lambda evs: (m := [e for e in evs if e.get("event") == "message"]) and len(m) >= n and m,
            timeout,
            f"{n} messages",
        )

    def of(self, name: str) -> list[Event]:
        return [e for e in self._snapshot() if e.get("event") == name]

    def messages(self) -> list[Any]:
        """The ``data`` of every message the app received, in order."""
        return [e["data"] for e in self.of("message")]

    def frames(self, direction: str | None = None) -> list[Any]:
        """Frames recorded with ``frames=True`` (``"in"``: from the server, ``"out"``: sent)."""
        return [e["data"] for e in self.of("frame") if direction is None or e["dir"] == direction]

    def frames_since(self, event: Event, direction: str | None = None) -> list[Any]:
        """Frames recorded after ``event`` (an object returned by ``wait_for``)."""
        events = self._snapshot()
        after = next(i for i, e in enumerate(events) if e is event)
        return [
            e["data"]
            for e in events[after + 1 :]
            if e.get("event") == "frame" and (direction is None or e["dir"] == direction)
        ]

    # ------------------------------------------------------------------ control
    def send(self, cmd: str, **fields: Any) -> None:
        """A control command (needs ``control=True``): drop, offline, online, whisper, join, leave, presence, exit."""
        assert self.proc.stdin is not None, "started without control"
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise JSClientError(f"JS client did not exit within {timeout}s\n{self.report()}") from None

    def stop(self) -> int:
        """Ask the driver to exit (or kill it); returns its exit code."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.send("exit")
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()
        return self.proc.returncode

    def stderr(self) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def report(self) -> str:
        lines = "\n".join(json.dumps(e) for e in self._snapshot())
        return (
            f"command: {' '.join(self.cmd)}\nexit code: {self.proc.poll()}\nevents:\n{lines}\nstderr:\n{self.stderr()}"
        )

    def __enter__(self) -> JSClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


CHAT_DRIVER = JS_DIR / "chat_client.mjs"


class ChatJSClient(JSClient):
    """One ``chat_client.mjs`` process: the official client subscribed to ``ChatChannel`` {room}.

    ``send("speak", text=..., to_others=...)`` performs the action; events are as for
    :class:`JSClient` (``connected``, ``subscribed``, ``message``, ``error``, ``close``).
    """

    def __init__(
        self, url: str, room: str, cookie: str | None = None, timeout: float = 20, protocol: str = EXT
    ) -> None:
        args = [f"--url={url}", f"--room={room}", f"--timeout={timeout}", f"--protocol={protocol}"]
        if cookie is not None:
            args.append(f"--cookie={cookie}")
        self._spawn(CHAT_DRIVER, args, control=True)
