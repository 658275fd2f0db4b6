"""The HTTP side of the kit: a falcon WSGI app serving AnyCable's RPC-over-HTTP.

``POST <prefix>/connect``, ``<prefix>/command`` and ``<prefix>/disconnect`` take and
return SPEC §8.3's JSON. Answers:

=====  ====================================================================
200    the RPC reply (its ``status`` says SUCCESS, FAILURE or ERROR)
400    ``{"error":"invalid JSON","details":…}``
401    ``{"error":"unauthorized",…}``: missing or wrong ``Authorization: Bearer``
404    unknown path; 405: a method other than POST
413    ``{"error":"body too large",…}``
422    ``{"error":"invalid request","details":"command must be one of …"}``
=====  ====================================================================

The secret is compared in constant time, before the body is read. Mount the app at its
prefix, or with ``prefix=""`` under any WSGI dispatcher (falcon routes on ``PATH_INFO``,
so ``SCRIPT_NAME`` may hold the mount point). The app is thread-safe.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import falcon

from anycable_gevent.application.app import Application, Reply
from anycable_gevent.application.protocol import BadRequest
from anycable_gevent.application.state import encode

log = logging.getLogger(__name__)

#: Largest request body accepted by default (the server's requests are a few KB).
MAX_BODY = 1 << 20
#: Header carrying the server's session id.
SID_HEADER = "x-anycable-meta-sid"


class HTTPJSONError(falcon.HTTPError):
    """An error answered as ``{"error": …, "details": …}`` (the server's own error shape)."""

    def __init__(self, status: str, error: str, details: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(status, title=error, description=details or None, headers=headers)


def _serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    body: dict[str, str] = {"error": exc.title or str(exc.status)}
    if exc.description:
        body["details"] = exc.description
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)


class RPCResource:
    """One RPC method: authenticate, read and decode the body, ask the application."""

    def __init__(self, handler: Callable[[Any, str], Reply], secret: str, max_body: int) -> None:
        self.handler = handler
        self.expected = f"Bearer {secret}".encode() if secret else b""
        self.max_body = max_body

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self.expected:
            given = (req.get_header("Authorization") or "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, self.expected):
                raise HTTPJSONError(
                    falcon.HTTP_401,
                    "unauthorized",
                    "send Authorization: Bearer <RPC secret> (the server's --http_rpc_secret, or derived from --secret)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        body = self._read(req)
        try:
            decoded = json.loads(body)
        except ValueError as exc:
            raise HTTPJSONError(falcon.HTTP_400, "invalid JSON", str(exc)) from None
        try:
            reply = self.handler(decoded, req.get_header(SID_HEADER) or "")
        except BadRequest as exc:
            raise HTTPJSONError(falcon.HTTP_422, "invalid request", str(exc)) from None
        resp.content_type = falcon.MEDIA_JSON
        resp.text = encode(reply)

    def _read(self, req: falcon.Request) -> bytes:
        length = req.content_length
        if length is not None and length > self.max_body:
            raise HTTPJSONError(falcon.HTTP_413, "body too large", f"limit is {self.max_body} bytes")
        # without Content-Length (chunked) the bounded stream reads nothing: read the raw one
        stream = req.bounded_stream if length is not None else req.stream
        body: bytes = stream.read(self.max_body + 1)
        if len(body) > self.max_body:
            raise HTTPJSONError(falcon.HTTP_413, "body too large", f"limit is {self.max_body} bytes")
        return body


def create_wsgi_app(app: Application, *, prefix: str = "", max_body: int = MAX_BODY) -> falcon.App:
    """A falcon app serving ``app`` at ``<prefix>/connect``, ``/command`` and ``/disconnect``.

    Args:
        app: the application; its ``rpc_secret`` is required on every request (when set).
        prefix: path the three routes are under, e.g. ``"/_anycable"`` (the server's
            ``--rpc_host`` is then ``http://host:port/_anycable``).
        max_body: largest request body in bytes (413 above).
    """
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if not app.rpc_secret:
        log.warning("AnyCable RPC endpoints at %s/* are not authenticated: pass secret= to Application()", prefix)
    api = falcon.App(media_type=falcon.MEDIA_JSON)
    api.req_options.strip_url_path_trailing_slash = False
    api.set_error_serializer(_serialize_error)
    handlers = {"connect": app.handle_connect, "command": app.handle_command, "disconnect": app.handle_disconnect}
    for method, handler in handlers.items():
        api.add_route(f"{prefix}/{method}", RPCResource(handler, app.rpc_secret, max_body))
    return api
