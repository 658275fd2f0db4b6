"""An AnyCable RPC backend built on the Python kit (anycable_gevent.application), for the test suite.

    python tests/kit_backend.py [--port N] [--mount /_anycable] [--broadcast-url URL]
           [--broadcast-key KEY] [--rpc-secret SECRET] [--streams-secret SECRET]

The same application as ``tests/js/rpc_server.mjs`` (the serverless-js backend), with the
same read-only test API, so that one test suite runs against both:

    GET /_test/calls    every RPC request received: {method, sid, protov, content_type, authorization, body}
    GET /_test/events   what the application callbacks saw (connect, unsubscribed, disconnect, ...)

It is served by the standard library's wsgiref with a thread per request (no gevent):
the kit must work in any WSGI stack. Prints {"event":"listening","port":N} on stdout once
it accepts connections.

The application (see rpc_server.mjs for the shared part):
  connect      cookie ``username=<name>``, header ``x-api-token: tok-<name>`` or ``?token=tok-<name>``;
               otherwise rejected; "ghost" is accepted without identifiers; connection state ``via``.
  ChatChannel  {room}: "forbidden" rejects; streams from chat_<room>, transmits {"hello": user},
               channel state {room, count}. Actions speak {text, to_others?}, follow/unfollow
               {stream}, stop_all, tick {by}, remember {city}, whoami, kick, boom; ``unsubscribed``
               broadcasts {"left": user}. Beyond the JS backend: ``speak`` with ``to_others``
               skips the sender (exclude_socket = its sid).
  KitChannel   kit-only features: {stream?, signed?, whisper?, presence?} streams from a plain or
               signed stream (rejects a bad signature), optionally with whispers and joining
               presence as the user; actions leave (presence), disconnect_me {reconnect}
               (remote disconnect of the caller's identifiers through the publisher).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anycable_gevent.application import Application, Channel, ChannelHandle, ConnectionHandle  # noqa: E402
from anycable_gevent.publisher import HTTPPublisher, PublishError  # noqa: E402

StartResponse = Callable[..., Any]


class Recorder:
    """Thread-safe lists of RPC calls and callback events."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def call(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(entry)

    def event(self, **event: Any) -> None:
        with self.lock:
            self.events.append({**event, "at": int(time.time() * 1000)})


def identify(handle: ConnectionHandle) -> dict[str, str] | None:
    req = handle.request
    if "username" in req.cookies:
        return {"user": unquote(req.cookies["username"]), "via": "cookie"}
    token = req.headers.get("x-api-token", "")
    if token.startswith("tok-"):
        return {"user": token[4:], "via": "header"}
    param = req.params.get("token", "")
    if param.startswith("tok-"):
        return {"user": param[4:], "via": "param"}
    return None


class CableApplication(Application):
    def __init__(self, recorder: Recorder, **secrets: Any) -> None:
        super().__init__(**secrets)
        self.recorder = recorder

    def connect(self, handle: ConnectionHandle) -> None:
        found = identify(handle)
        headers = {**handle.request.headers, "REMOTE_ADDR": handle.request.remote_addr}
        self.recorder.event(event="connect", sid=handle.sid, url=handle.request.url, headers=headers, found=found)
        if found is None:
            handle.reject()
            return
        if found["user"] != "ghost":
            handle.identified_by(user=found["user"])
        handle.state["via"] = found["via"]

    def disconnect(self, handle: ConnectionHandle) -> None:
        self.recorder.event(
            event="disconnect",
            sid=handle.sid,
            identifiers=handle.identifiers or None,
            cstate=dict(handle.state) or None,
            url=handle.request.url,
        )


class ChatChannel(Channel):
    def __init__(self, recorder: Recorder, publisher: HTTPPublisher | None) -> None:
        self.recorder = recorder
        self.publisher = publisher

    def broadcast(self, stream: str, data: Any, exclude_socket: str | None = None) -> None:
        if self.publisher is None:
            raise RuntimeError("no --broadcast-url given")
        self.publisher.broadcast(stream, data, exclude_socket=exclude_socket)

    def subscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        room = params.get("room")
        if not room or room == "forbidden":
            handle.reject()
            return
        handle.stream_from(f"chat_{room}")
        handle.transmit({"hello": handle.identifiers.get("user")})
        handle.state.update(room=room, count=0)

    def unsubscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        user = handle.identifiers.get("user")
        self.recorder.event(
            event="unsubscribed", sid=handle.sid, identifier=handle.identifier, state=dict(handle.state), user=user
        )
        try:
            self.broadcast(f"chat_{params.get('room')}", {"left": user})
        except (PublishError, RuntimeError) as exc:
            self.recorder.event(event="broadcast_failed", error=str(exc))

    def speak(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        exclude = handle.sid if data.get("to_others") else None
        self.broadcast(f"chat_{params['room']}", {"user": handle.identifiers["user"], "text": data["text"]}, exclude)
        handle.transmit({"echo": data["text"]})

    def follow(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.stream_from(data["stream"])

    def unfollow(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.stop_stream_from(data["stream"])

    def stop_all(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.stop_all_streams()

    def tick(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.state["count"] = handle.state.get("count", 0) + (data.get("by") or 1)
        handle.transmit({"count": handle.state["count"], "user": handle.identifiers["user"]})

    def remember(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.connection.state["city"] = data["city"]

    def whoami(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.transmit(
            {
                "identifiers": handle.identifiers or None,
                "cstate": dict(handle.connection.state) or None,
                "state": dict(handle.state),
            }
        )

    def kick(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.connection.close()

    def boom(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        raise RuntimeError("boom")


class KitChannel(Channel):
    def __init__(self, publisher: HTTPPublisher | None) -> None:
        self.publisher = publisher

    def subscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        whisper = bool(params.get("whisper"))
        if params.get("signed"):
            if handle.stream_from_signed(params["signed"], whisper=whisper) is None:
                handle.reject()
                return
        elif params.get("stream"):
            handle.stream_from(params["stream"], whisper=whisper)
        else:
            handle.reject()
            return
        if params.get("presence"):
            user = handle.identifiers.get("user", "")
            handle.join_presence(user, {"name": user.title()})

    def leave(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        handle.leave_presence(handle.identifiers.get("user", ""))

    def disconnect_me(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        assert self.publisher is not None, "no --broadcast-url given"
        self.publisher.disconnect(handle.identifiers, reconnect=bool(data.get("reconnect")))


def recording(app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], recorder: Recorder, mount: str) -> Any:
    """Record every RPC request (before the kit checks it) and serve the /_test API."""

    def wsgi(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] == "GET" and path in ("/_test/calls", "/_test/events"):
            with recorder.lock:
                body = json.dumps(recorder.calls if path.endswith("calls") else recorder.events).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        raw = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(raw)
        if path.startswith(mount + "/"):
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            recorder.call(
                {
                    "method": path[len(mount) + 1 :],
                    "sid": environ.get("HTTP_X_ANYCABLE_META_SID"),
                    "protov": environ.get("HTTP_X_ANYCABLE_META_PROTOV"),
                    "content_type": environ.get("CONTENT_TYPE"),
                    "authorization": environ.get("HTTP_AUTHORIZATION"),
                    "body": parsed,
                }
            )
        return app(environ, start_response)

    return wsgi


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def build(args: argparse.Namespace, recorder: Recorder) -> Any:
    publisher = HTTPPublisher(args.broadcast_url, key=args.broadcast_key) if args.broadcast_url else None
    app = CableApplication(recorder, rpc_secret=args.rpc_secret or "none", streams_secret=args.streams_secret or None)
    app.register("ChatChannel", ChatChannel(recorder, publisher))
    app.register("KitChannel", KitChannel(publisher))
    return recording(app.wsgi(prefix=args.mount), recorder, args.mount)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mount", default="/_anycable")
    parser.add_argument("--broadcast-url", default="")
    parser.add_argument("--broadcast-key", default="")
    parser.add_argument("--rpc-secret", default="")
    parser.add_argument("--streams-secret", default="")
    args = parser.parse_args()
    server = make_server("127.0.0.1", args.port, build(args, Recorder()), ThreadingServer, QuietHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(json.dumps({"event": "listening", "port": server.server_port}), flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
