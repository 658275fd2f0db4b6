"""RPC backends for the tests: two real ones (subprocesses) and a scriptable one.

``JSBackend`` runs ``tests/js/rpc_server.mjs`` (an AnyCable RPC application built on
``@anycable/serverless-js``) and ``KitBackend`` runs ``tests/kit_backend.py`` (the same
application built on this package's Python kit), each on a free loopback port; both let a
test read what they received and what their callbacks saw through their ``/_test/*``
endpoints.

``PyBackend`` is a stdlib HTTP server in a thread whose answers a test scripts, for what a
well-behaved backend never does: HTTP 500, a body that is not JSON, a string status, a huge
body, a hang, HTTP 503 then success, a connection reset. It records every request (method,
headers, parsed body) and the most requests it ever had in flight at once.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from helpers import ROOT
from jsclient import node_binary

JS_DIR = ROOT / "tests" / "js"
MOUNT = "/_anycable"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# ---------------------------------------------------------------------- real backends in a subprocess


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SubprocessBackend:
    """A real RPC application in a child process, on a free port, with the ``/_test/*`` read-back API.

    Subclasses say how to start it and how it writes state and rejections on the wire, so
    that one suite can assert each backend's exact RPC payloads.
    """

    #: Name in test ids.
    name = ""
    #: The frame a rejected connection gets.
    reject_frame: dict[str, Any] = {}

    def __init__(self, broadcast_url: str = "", broadcast_key: str = "", rpc_secret: str = "") -> None:
        self.args = ["--port", "0", "--mount", MOUNT]
        if broadcast_url:
            self.args += ["--broadcast-url", broadcast_url]
        if broadcast_key:
            self.args += ["--broadcast-key", broadcast_key]
        if rpc_secret:
            self.args += ["--rpc-secret", rpc_secret]
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def command(self) -> tuple[list[str], Path]:
        """The command line and its working directory."""
        raise NotImplementedError

    def wire_istate(self, identifier: str, state: dict[str, Any]) -> dict[str, str]:
        """The ``env.istate`` a Command carries for a subscription whose channel state is ``state``."""
        raise NotImplementedError

    def wire_cstate(self, state: dict[str, Any]) -> dict[str, str]:
        """The ``env.cstate`` the server holds for a connection state ``state``."""
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> SubprocessBackend:
        cmd, cwd = self.command()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in out:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"RPC backend did not start: {out.decode(errors='replace')}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue
                out += chunk
        line = out.split(b"\n", 1)[0]
        try:
            self.port = int(json.loads(line)["port"])
        except (ValueError, KeyError) as exc:
            self.stop()
            raise RuntimeError(f"RPC backend said {out.decode(errors='replace')!r}") from exc
        # keep draining its output so that it can never block on a full pipe
        threading.Thread(target=self._drain, args=(fd,), daemon=True).start()
        return self

    def _drain(self, fd: int) -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass

    @property
    def rpc_host(self) -> str:
        return f"http://127.0.0.1:{self.port}{MOUNT}"

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def calls(self, method: str | None = None, sid: str | None = None) -> list[dict[str, Any]]:
        """RPC requests received, oldest first: {method, sid, protov, content_type, authorization, body}."""
        return [
            c
            for c in self._get("/_test/calls")
            if (method is None or c["method"] == method) and (sid is None or c["sid"] == sid)
        ]

    def events(self, event: str | None = None, sid: str | None = None) -> list[dict[str, Any]]:
        """What the application callbacks saw: {event, sid, ...}."""
        return [
            e
            for e in self._get("/_test/events")
            if (event is None or e["event"] == event) and (sid is None or e.get("sid") == sid)
        ]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> SubprocessBackend:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class JSBackend(SubprocessBackend):
    """``node tests/js/rpc_server.mjs`` (@anycable/serverless-js 0.1.0).

    On the wire serverless-js 0.1.0 keeps a channel's whole state JSON-encoded under the
    identifier, stores connection state values as plain strings, and rejects without
    ``reconnect``.
    """

    name = "js"
    reject_frame = {"type": "disconnect", "reason": "unauthorized"}

    def command(self) -> tuple[list[str], Path]:
        return [node_binary(), str(JS_DIR / "rpc_server.mjs"), *self.args], JS_DIR

    def wire_istate(self, identifier: str, state: dict[str, Any]) -> dict[str, str]:
        return {identifier: compact(state)}

    def wire_cstate(self, state: dict[str, Any]) -> dict[str, str]:
        return dict(state)


class KitBackend(SubprocessBackend):
    """``python tests/kit_backend.py``: the same application on the Python kit (wsgiref, threads).

    On the wire it follows AnyCable's conventions (SPEC §8.3): every state value is
    JSON-encoded under its own key, and a rejection says ``reconnect: false``.
    """

    name = "python"
    reject_frame = {"type": "disconnect", "reason": "unauthorized", "reconnect": False}

    def __init__(
        self, broadcast_url: str = "", broadcast_key: str = "", rpc_secret: str = "", streams_secret: str = ""
    ) -> None:
        super().__init__(broadcast_url, broadcast_key, rpc_secret)
        if streams_secret:
            self.args += ["--streams-secret", streams_secret]

    def command(self) -> tuple[list[str], Path]:
        return [sys.executable, str(ROOT / "tests" / "kit_backend.py"), *self.args], ROOT

    def wire_istate(self, identifier: str, state: dict[str, Any]) -> dict[str, str]:
        return {k: compact(v) for k, v in state.items()}

    def wire_cstate(self, state: dict[str, Any]) -> dict[str, str]:
        return {k: compact(v) for k, v in state.items()}


#: The real backends by name (the parameters of the RPC suite).
BACKENDS: dict[str, type[SubprocessBackend]] = {"js": JSBackend, "python": KitBackend}


# ---------------------------------------------------------------------- scriptable Python backend


@dataclass
class Reply:
    """One scripted answer. ``body`` may be an object (sent as JSON) or raw bytes."""

    body: Any = None
    status: int = 200
    delay: float = 0.0
    #: Reset the TCP connection instead of answering.
    reset: bool = False
    #: Block until this event is set before answering.
    gate: threading.Event | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    headers: dict[str, str]
    body: Any


Script = Callable[[Request], Reply]


def welcome_script(req: Request) -> Reply:
    """A minimal well-behaved backend: accept everyone, confirm every subscription."""
    sid = req.headers.get("x-anycable-meta-sid", "")
    if req.method == "connect":
        return Reply(
            {"status": 1, "identifiers": '{"id":1}', "transmissions": [json.dumps({"type": "welcome", "sid": sid})]}
        )
    if req.method == "command":
        ident = req.body.get("identifier", "")
        if req.body.get("command") == "subscribe":
            return Reply(
                {"status": 1, "transmissions": [json.dumps({"identifier": ident, "type": "confirm_subscription"})]}
            )
        return Reply({"status": 1})
    return Reply({"status": 1})


class PyBackend:
    """A scriptable RPC backend: ``script(request) -> Reply`` decides every answer."""

    def __init__(self, script: Script = welcome_script) -> None:
        self.script = script
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                method = self.path.rsplit("/", 1)[-1]
                req = Request(method, {k.lower(): v for k, v in self.headers.items()}, body)
                with backend._lock:
                    backend.requests.append(req)
                    backend.in_flight += 1
                    backend.max_in_flight = max(backend.max_in_flight, backend.in_flight)
                try:
                    reply = backend.script(req)
                    if reply.gate is not None:
                        reply.gate.wait(10)
                    if reply.delay:
                        time.sleep(reply.delay)
                    if reply.reset:
                        # SO_LINGER 0: close() sends RST instead of FIN
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        return
                    data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                    try:
                        self.send_response(reply.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        for k, v in reply.headers.items():
                            self.send_header(k, v)
                        self.end_headers()
                        self.wfile.write(data)
                    except OSError:
                        self.close_connection = True  # the client gave up (timeout): fine
                finally:
                    with backend._lock:
                        backend.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def rpc_host(self) -> str:
        return f"http://127.0.0.1:{self.port}{MOUNT}"

    def of(self, method: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == method]

    def start(self) -> PyBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> PyBackend:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
