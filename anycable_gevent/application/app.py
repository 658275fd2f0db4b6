"""The application: connection hooks, the channel registry, and the three RPC calls.

:class:`Application` turns decoded RPC requests into replies (plain dicts, SPEC §8.3)
without any I/O, so it can sit behind any HTTP layer; :mod:`.wsgi` is the one provided.

Error containment: an exception raised by application code (a hook, an action, a state
value that is not JSON) never escapes. It is logged with a short traceback and
answered with status ERROR and the generic message ``internal error``; the exception
text is not sent, since the server may log it next to client data.

Thread safety: register channels before serving. After that an application holds no
mutable state, and requests may be handled concurrently from any number of threads
(or greenlets).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from anycable_gevent.application import protocol
from anycable_gevent.application.channel import Channel
from anycable_gevent.application.handles import ChannelHandle, ConnectionHandle
from anycable_gevent.application.protocol import Status
from anycable_gevent.application.request import Request
from anycable_gevent.keys import RPC_PHRASE, derive_key
from anycable_gevent.log import conn_ref

if TYPE_CHECKING:
    import falcon

log = logging.getLogger(__name__)

#: ``error_msg`` of an ERROR reply (the details are in the backend's log, not on the wire).
INTERNAL_ERROR = "internal error"
#: Frames of the traceback logged for an application error (the innermost ones).
TRACEBACK_FRAMES = 5

C = TypeVar("C", bound=type[Channel])
Reply = dict[str, Any]


def _specific(value: str | None, fallback: str) -> str:
    """A specific secret, as the server resolves it: unset inherits ``fallback``; ``"none"`` turns it off."""
    if value == "none":
        return ""
    return value or fallback


class Application:
    """An AnyCable RPC application (serverless-js ``Application``, Rails' ``ApplicationCable``).

    Subclass it to identify connections::

        class Cable(Application):
            def connect(self, handle):
                user = find_user(handle.request.cookies.get("session"))
                if user is None:
                    handle.reject()
                else:
                    handle.identified_by(user_id=user.id)

    Args:
        secret: the server's ``--secret``. Derives the RPC secret (checked on every
            request), and is the default streams and JWT secret, as in the server.
        rpc_secret: the server's ``--http_rpc_secret``, used as is; ``"none"`` = no check.
        streams_secret: the server's ``--streams_secret``; ``"none"`` = no signed streams.
        jwt_secret: the server's ``--jwt_secret``; ``"none"`` = no tokens.
    """

    def __init__(
        self,
        secret: str = "",
        *,
        rpc_secret: str | None = None,
        streams_secret: str | None = None,
        jwt_secret: str | None = None,
    ) -> None:
        secret = "" if secret == "none" else secret
        #: The expected ``Authorization: Bearer`` value of RPC requests ("" = not checked).
        self.rpc_secret = _specific(rpc_secret, derive_key(secret, RPC_PHRASE) if secret else "")
        self.streams_secret = _specific(streams_secret, secret)
        self.jwt_secret = _specific(jwt_secret, secret)
        self.channels: dict[str, Channel] = {}

    # ------------------------------------------------------------------ registry
    def register(self, name: str, channel: Channel | type[Channel]) -> None:
        """Serve channel ``name`` (the identifier's ``channel`` field) with ``channel``.

        A class is instantiated once, without arguments; pass an instance to give it
        collaborators (``ChatChannel(publisher)``).
        """
        instance = channel() if isinstance(channel, type) else channel
        if not isinstance(instance, Channel):
            raise TypeError(f"{name}: a channel must be a Channel subclass or instance, not {type(instance).__name__}")
        if name in self.channels:
            raise ValueError(f"channel {name!r} is already registered")
        self.channels[name] = instance

    def channel(self, name: str) -> Callable[[C], C]:
        """Decorator form of :meth:`register`: ``@app.channel("ChatChannel")`` on a Channel subclass."""

        def decorate(cls: C) -> C:
            self.register(name, cls)
            return cls

        return decorate

    # ------------------------------------------------------------------ hooks
    def connect(self, handle: ConnectionHandle) -> None:
        """A client connects: call ``handle.identified_by(...)`` or ``handle.reject()``.

        The default accepts everyone, without identifiers.
        """

    def disconnect(self, handle: ConnectionHandle) -> None:
        """A connection that was accepted has gone; runs once per connection, after
        every subscription's ``unsubscribed``. Transmissions are not delivered.

        A session restored by the server (ext protocol, ``?sid=``) gets no new Connect call,
        but the connection it came from still gets this one.
        """

    # ------------------------------------------------------------------ helpers
    def sign_stream(self, stream: str) -> str:
        """A signed stream name for ``cable.streamFromSigned`` (needs a streams secret)."""
        from anycable_gevent.application.tokens import sign_stream

        return sign_stream(stream, self._need(self.streams_secret, "streams_secret"))

    def issue_token(self, identifiers: Mapping[str, Any], *, expires_in: float = 3600) -> str:
        """A JWT identifying a connection without RPC (``?jid=<token>``; needs a JWT secret)."""
        from anycable_gevent.application.tokens import issue_token

        return issue_token(identifiers, self._need(self.jwt_secret, "jwt_secret"), expires_in=expires_in)

    @staticmethod
    def _need(secret: str, name: str) -> str:
        if not secret:
            raise ValueError(f"the application has no {name}: pass secret= or {name}= to Application()")
        return secret

    def wsgi(self, prefix: str = "", **options: Any) -> falcon.App:
        """The WSGI app serving ``POST <prefix>/connect``, ``/command``, ``/disconnect``
        (see :func:`~anycable_gevent.application.wsgi.create_wsgi_app`)."""
        from anycable_gevent.application.wsgi import create_wsgi_app  # wsgi imports this module

        return create_wsgi_app(self, prefix=prefix, **options)

    # ------------------------------------------------------------------ RPC calls
    def handle_connect(self, body: Any, sid: str = "") -> Reply:
        """Answer a Connect request (decoded JSON). Raises: :class:`~.protocol.BadRequest`."""
        req = protocol.parse_connect(body)
        conn = ConnectionHandle(sid, Request.from_env(req.env.url, req.env.headers), "", req.env.cstate)
        try:
            self.connect(conn)
            cstate = conn.state.changes()
        except Exception as exc:
            self._report(exc, "connect", sid)
            return {"status": Status.ERROR, "identifiers": "", "transmissions": [], "error_msg": INTERNAL_ERROR}
        if conn.rejected:
            frame = protocol.disconnect(conn.reject_reason, conn.reject_reconnect)
            log.info("connection rejected conn=%s reason=%s", conn_ref(sid), conn.reject_reason)
            return {
                "status": Status.FAILURE,
                "identifiers": "",
                "transmissions": [*conn.transmissions, frame],
                "error_msg": "Auth failed",
            }
        return {
            "status": Status.SUCCESS,
            "identifiers": conn.raw_identifiers,
            "transmissions": [*conn.transmissions, protocol.welcome(sid)],
            "error_msg": "",
            "env": {"cstate": cstate},
        }

    def handle_command(self, body: Any, sid: str = "") -> Reply:
        """Answer a Command request (subscribe, unsubscribe, message). Raises: :class:`~.protocol.BadRequest`."""
        req = protocol.parse_command(body)
        conn = ConnectionHandle(
            sid, Request.from_env(req.env.url, req.env.headers), req.connection_identifiers, req.env.cstate
        )
        subscribe = req.command == "subscribe"
        found = self._find(req.identifier, sid)
        if found is None:
            return _failure([protocol.subscription(req.identifier, False)] if subscribe else [])
        name, channel, params = found
        handle = ChannelHandle(conn, req.identifier, params, req.env.istate, self.streams_secret)
        where = f"{name}#{'subscribed' if subscribe else 'unsubscribed'}"
        try:
            if subscribe:
                channel.subscribed(handle, params)
            elif req.command == "unsubscribe":
                channel.unsubscribed(handle, params)
            else:
                action = _action(req.data)
                method = channel.find_action(action[0]) if action else None
                if action is None or method is None:
                    log.warning("no such action: %s#%s conn=%s", name, action[0][:60] if action else "?", conn_ref(sid))
                    return _failure([])
                where = f"{name}#{action[0]}"
                method(handle, params, action[1])
            return _command_reply(req, conn, handle)
        except Exception as exc:
            self._report(exc, where, sid)
            return {"status": Status.ERROR, "transmissions": [], "error_msg": INTERNAL_ERROR}

    def handle_disconnect(self, body: Any, sid: str = "") -> Reply:
        """Answer a Disconnect request: ``unsubscribed`` of every subscription, then :meth:`disconnect`.

        One failing hook does not stop the others; the reply is ERROR if any failed.
        Raises: :class:`~.protocol.BadRequest`.
        """
        req = protocol.parse_disconnect(body)
        conn = ConnectionHandle(sid, Request.from_env(req.env.url, req.env.headers), req.identifiers, req.env.cstate)
        ok = True
        for identifier in req.subscriptions:
            found = self._find(identifier, sid)
            if found is None:
                continue
            name, channel, params = found
            istate = _disconnect_state(req.env.istate.get(identifier, ""))
            try:
                channel.unsubscribed(ChannelHandle(conn, identifier, params, istate, self.streams_secret), params)
            except Exception as exc:
                self._report(exc, f"{name}#unsubscribed", sid)
                ok = False
        try:
            self.disconnect(conn)
        except Exception as exc:
            self._report(exc, "disconnect", sid)
            ok = False
        return {"status": Status.SUCCESS if ok else Status.ERROR, "error_msg": "" if ok else INTERNAL_ERROR}

    # ------------------------------------------------------------------ internals
    def _find(self, identifier: str, sid: str) -> tuple[str, Channel, dict[str, Any]] | None:
        """The channel named by an identifier, and the identifier's other fields (its params)."""
        try:
            fields = json.loads(identifier)
        except ValueError:
            fields = None
        if not isinstance(fields, dict) or not isinstance(fields.get("channel"), str):
            log.warning("bad channel identifier %r conn=%s", identifier[:100], conn_ref(sid))
            return None
        name = fields.pop("channel")
        channel = self.channels.get(name)
        if channel is None:
            log.warning("unknown channel %r conn=%s", name[:100], conn_ref(sid))
            return None
        return name, channel, fields

    def _report(self, exc: Exception, where: str, sid: str) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES))
        log.error("%s failed conn=%s: %s: %s\n%s", where, conn_ref(sid), type(exc).__name__, exc, tb.rstrip())


def _action(data: str) -> tuple[str, dict[str, Any]] | None:
    """``(action, payload)`` of a message's data (``{"action": "speak", ...}``), or None."""
    try:
        payload = json.loads(data)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    action = payload.pop("action", None)
    return (action, payload) if isinstance(action, str) and action else None


def _disconnect_state(raw: str) -> dict[str, str]:
    """Disconnect carries each subscription's state map JSON-encoded (SPEC §8.3)."""
    if not raw:
        return {}
    try:
        state = json.loads(raw)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        log.warning("Disconnect: a channel state is not a JSON object; ignored")
        return {}
    return {k: v for k, v in state.items() if isinstance(v, str)}


def _failure(transmissions: list[str]) -> Reply:
    return {
        "status": Status.FAILURE,
        "disconnect": False,
        "stop_streams": False,
        "streams": [],
        "stopped_streams": [],
        "transmissions": transmissions,
        "error_msg": "",
        "env": {"cstate": {}, "istate": {}},
    }


def _command_reply(req: protocol.CommandRequest, conn: ConnectionHandle, handle: ChannelHandle) -> Reply:
    """The Command reply; encodes state, so it may raise TypeError (reported as ERROR by the caller)."""
    cstate = conn.state.changes()
    if req.command == "subscribe" and handle.rejected:
        # a rejected subscription gets its rejection and nothing else
        refusal = _failure([protocol.subscription(req.identifier, False), *conn.transmissions])
        refusal["env"]["cstate"] = cstate
        refusal["disconnect"] = conn.closed
        return refusal
    transmissions = list(handle.transmissions)
    if req.command == "subscribe":
        transmissions.insert(0, protocol.subscription(req.identifier, True))
    reply: Reply = {
        "status": Status.FAILURE if handle.rejected else Status.SUCCESS,
        "disconnect": conn.closed,
        "stop_streams": handle.stop_streams,
        "streams": handle.streams,
        "stopped_streams": handle.stopped_streams,
        "transmissions": [*transmissions, *conn.transmissions],
        "error_msg": "",
        "env": {"cstate": cstate, "istate": handle.state_changes()},
    }
    if handle.presence is not None:
        reply["presence"] = handle.presence.to_wire()
    return reply
