"""A chat application for anycable-gevent, written with the Python kit (no Ruby, no JS backend).

Run it next to the server, with the same secret on both sides::

    ANYCABLE_SECRET=change-me python scripts/examples/chat/app.py --port 3000
    ANYCABLE_SECRET=change-me anycable-gevent --rpc_host=http://127.0.0.1:3000/_anycable

What it serves (one WSGI app, here under the standard library's threaded wsgiref server;
gunicorn, uWSGI or any other WSGI server works the same):

* ``POST /login`` ``{"name": "ann"}``: a stand-in for your real login. Answers
  ``{"user": "ann", "token": "<JWT>"}`` and sets the cookie ``chat_user`` (signed). A
  client connects either with the cookie, or with ``?jid=<token>`` (the server checks
  the JWT itself and never calls ``/connect``);
* ``POST /_anycable/{connect,command,disconnect}``: AnyCable RPC for the server;
* ``ChatChannel`` ``{room}``: streams from ``chat:<room>``; the action ``speak``
  ``{text, to_others?}`` broadcasts ``{user, text}`` to the room, skipping the sender when
  ``to_others`` is true.

With a shared secret, the broadcast endpoint is on the server's main port:
``--broadcast-url`` defaults to ``http://127.0.0.1:8080/_broadcast``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import falcon

from anycable_gevent import signer
from anycable_gevent.application import Application, Channel, ChannelHandle, ConnectionHandle
from anycable_gevent.keys import derive_key
from anycable_gevent.publisher import HTTPPublisher, Publisher

COOKIE = "chat_user"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_TEXT = 1000


class ChatApplication(Application):
    """Identifies connections by the signed ``chat_user`` cookie (JWT clients never get here)."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.cookie_key = derive_key(secret, "chat-example-cookie")

    def connect(self, handle: ConnectionHandle) -> None:
        user = signer.verify(handle.request.cookies.get(COOKIE, ""), self.cookie_key)
        if user is None:
            handle.reject()
        else:
            handle.identified_by(user=user)

    def login_cookie(self, user: str) -> str:
        return signer.sign(user, self.cookie_key)


class ChatChannel(Channel):
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def subscribed(self, handle: ChannelHandle, params: dict[str, Any]) -> None:
        room = params.get("room")
        if not isinstance(room, str) or not NAME.match(room) or "user" not in handle.identifiers:
            handle.reject()
            return
        handle.stream_from(f"chat:{room}")
        handle.state["room"] = room

    def speak(self, handle: ChannelHandle, params: dict[str, Any], data: dict[str, Any]) -> None:
        text = data.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            handle.reject()  # FAILURE: nothing is sent
            return
        message = {"user": handle.identifiers["user"], "text": text}
        exclude = handle.sid if data.get("to_others") else None
        self.publisher.broadcast(f"chat:{handle.state['room']}", message, exclude_socket=exclude)


class Login:
    """``POST /login {"name": …}``: the token and the cookie for that name (demo only: no password)."""

    def __init__(self, cable: ChatApplication) -> None:
        self.cable = cable

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = req.get_media(default_when_empty={})
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not NAME.match(name):
            raise falcon.HTTPUnprocessableEntity(title="bad name", description="1-32 letters, digits, _ or -")
        resp.set_cookie(COOKIE, self.cable.login_cookie(name), http_only=True, secure=False, same_site="Lax", path="/")
        resp.media = {"user": name, "token": self.cable.issue_token({"user": name}, expires_in=3600)}


def create_app(secret: str, broadcast_url: str) -> falcon.App:
    """The whole application: AnyCable RPC under ``/_anycable`` and ``/login``."""
    cable = ChatApplication(secret)
    cable.register("ChatChannel", ChatChannel(HTTPPublisher(broadcast_url, secret=secret)))
    app = cable.wsgi(prefix="/_anycable")
    app.add_route("/login", Login(cable))
    return app


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description="AnyCable chat example (Python RPC application)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--broadcast-url", default=os.environ.get("ANYCABLE_BROADCAST_URL", ""))
    args = parser.parse_args()
    secret = os.environ.get("ANYCABLE_SECRET", "")
    if not secret:
        sys.exit("set ANYCABLE_SECRET (the same value as the server's --secret)")
    broadcast_url = args.broadcast_url or "http://127.0.0.1:8080/_broadcast"
    server = make_server(args.host, args.port, create_app(secret, broadcast_url), ThreadingWSGIServer)
    print(json.dumps({"event": "listening", "url": f"http://{args.host}:{server.server_port}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
