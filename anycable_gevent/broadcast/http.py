"""HTTP broadcaster: ``POST /_broadcast`` (SPEC §6.2), a Falcon app.

One publication, a batch (all-or-nothing) or a remote command per request. The key is
compared in constant time and the body is bounded in size (and, by the transport, in
time). Answers: 201 accepted; 401 wrong or missing key; 408 body too slow; 413 body too
large; 422 not a publication (the details say why); 503 the broker or pub/sub is down,
so nothing was accepted and the publisher may retry (every error is JSON
``{"error":…,"details":…}``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping

import falcon

from anycable_gevent import protocol
from anycable_gevent.broadcast.base import Broadcaster, Handler, WSGIApp
from anycable_gevent.config import Config
from anycable_gevent.errors import BrokerError, ProtocolError
from anycable_gevent.metrics import Metrics
from anycable_gevent.redis_client import RedisConnector
from anycable_gevent.transport import BodyTimeout

log = logging.getLogger("anycable_gevent.broadcast")


#: ``<``, ``>`` and ``&`` as JSON escapes (what Go's encoder does by default): details may
#: quote what a client sent, and no error answer carries markup, whoever renders it.
_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def _error(resp: falcon.Response, status: str, error: str, details: str = "") -> None:
    resp.status = status
    body: dict[str, str] = {"error": error}
    if details:
        body["details"] = details
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body).translate(_HTML_SAFE)


class BroadcastResource:
    """``POST /_broadcast``: one publication, a batch, or a remote command (SPEC §6.2)."""

    def __init__(self, handler: Handler, key: str, max_body: int, metrics: Metrics) -> None:
        self.handler = handler
        self.key = key
        self.expected = f"Bearer {key}".encode()
        self.max_body = max_body
        self.metrics = metrics

    def _authorized(self, req: falcon.Request) -> bool:
        if not self.key:
            return True
        given = (req.get_header("Authorization") or "").encode()
        return hmac.compare_digest(given, self.expected)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._authorized(req):
            _error(resp, falcon.HTTP_401, "unauthorized", "send Authorization: Bearer <broadcast key>")
            return
        length = req.content_length
        if length is not None and length > self.max_body:
            _error(resp, falcon.HTTP_413, "body too large", f"limit is {self.max_body} bytes")
            return
        # Without Content-Length (chunked upload) falcon's bounded stream reads nothing;
        # the server's input stream decodes the chunks, and the limit still applies.
        stream = req.bounded_stream if length is not None else req.stream
        try:
            body = stream.read(self.max_body + 1)
        except BodyTimeout:
            resp.set_header("Connection", "close")
            _error(resp, falcon.HTTP_408, "request timeout", "the body did not arrive in time")
            return
        except (OSError, ValueError) as exc:
            # a broken chunked encoding, a body shorter than its Content-Length: nobody
            # knows where the next request would start, so the connection ends here
            resp.set_header("Connection", "close")
            _error(resp, falcon.HTTP_400, "bad request", f"the body could not be read: {exc}")
            return
        if len(body) > self.max_body:
            _error(resp, falcon.HTTP_413, "body too large", f"limit is {self.max_body} bytes")
            return
        try:
            publication = protocol.decode_publication(body)
        except ProtocolError as exc:
            self.metrics.inc("failed_broadcast_msg_total")
            log.info("invalid publication: %s", exc)
            _error(resp, falcon.HTTP_422, "invalid publication", str(exc))
            return
        try:
            self.handler.handle_publication(publication)
        except BrokerError as exc:
            log.warning("publication not accepted: %s", exc)
            resp.set_header("Retry-After", "1")
            _error(resp, falcon.HTTP_503, "unavailable", f"not accepted, retry later: {exc}")
            return
        resp.status = falcon.HTTP_201

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _error(resp, falcon.HTTP_422, "method not allowed", "use POST")

    on_put = on_patch = on_delete = on_get


def create_broadcast_app(cfg: Config, handler: Handler, metrics: Metrics) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route(
        cfg.http_broadcast_path,
        BroadcastResource(handler, cfg.broadcast_auth_key, cfg.http_broadcast_max_body, metrics),
    )
    return app


class HTTPBroadcaster(Broadcaster):
    """Publications POSTed to ``--http_broadcast_path`` on the broadcast port."""

    def __init__(self, cfg: Config, handler: Handler, metrics: Metrics, redis: RedisConnector | None = None) -> None:
        super().__init__(cfg, handler, metrics, redis)
        self.app = create_broadcast_app(cfg, handler, metrics)

    def announce(self) -> str:
        cfg = self.cfg
        scheme = "https" if cfg.ssl_cert else "http"
        host = cfg.host
        key = "requires Authorization: Bearer <broadcast key>" if cfg.broadcast_auth_key else "no key required"
        return f"Accept broadcasts at {scheme}://{host}:{cfg.broadcast_port}{cfg.http_broadcast_path} ({key})"

    def routes(self) -> Mapping[str, WSGIApp]:
        return {self.cfg.http_broadcast_path: self.app}
