"""Write AnyCable channels in Python: an RPC application kit for any WSGI stack.

The server (``--rpc_host=http://app:3000/_anycable``) asks the application to
authenticate connections and to run channel commands over AnyCable's HTTP RPC; this
package answers, the way ``@anycable/serverless-js`` does for JavaScript and
anycable-rails for Ruby::

    from anycable_gevent.application import Application, Channel

    app = Application(secret=os.environ["ANYCABLE_SECRET"])

    @app.channel("ChatChannel")
    class ChatChannel(Channel):
        def subscribed(self, handle, params):
            handle.stream_from(f"chat_{params['room']}")

        def speak(self, handle, params, data):
            publisher.broadcast(f"chat_{params['room']}", {"text": data["text"]})

    wsgi_app = app.wsgi(prefix="/_anycable")

Dependencies: the standard library and falcon (PyJWT when a token is minted). Nothing
here imports gevent or redis: it runs under gunicorn sync workers, uWSGI, Flask's or
Django's servers alike.
"""

from __future__ import annotations

from anycable_gevent.application.app import Application
from anycable_gevent.application.channel import Channel
from anycable_gevent.application.handles import ChannelHandle, ConnectionHandle
from anycable_gevent.application.protocol import BadRequest, DisconnectReason, Status
from anycable_gevent.application.request import Request
from anycable_gevent.application.state import State
from anycable_gevent.application.tokens import issue_token, sign_stream, verify_stream
from anycable_gevent.application.wsgi import create_wsgi_app

__all__ = [
    "Application",
    "BadRequest",
    "Channel",
    "ChannelHandle",
    "ConnectionHandle",
    "DisconnectReason",
    "Request",
    "State",
    "Status",
    "create_wsgi_app",
    "issue_token",
    "sign_stream",
    "verify_stream",
]
