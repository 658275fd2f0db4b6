"""HTTP surface: the broadcast endpoint (Falcon), health, metrics, and WSGI dispatch."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import falcon

from anycable_gevent import protocol
from anycable_gevent.config import Config
from anycable_gevent.errors import ProtocolError
from anycable_gevent.metrics import Metrics
from anycable_gevent.transport import BodyTimeout

log = logging.getLogger(__name__)

HEALTH_BODY = b"Ah, ha, ha, ha, stayin' alive, stayin' alive."

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _error(resp: falcon.Response, status: str, error: str, details: str = "") -> None:
    resp.status = status
    body: dict[str, str] = {"error": error}
    if details:
        body["details"] = details
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)


class BroadcastResource:
    """``POST /_broadcast``: one publication, a batch, or a remote command (SPEC §6.2)."""

    def __init__(
        self, handle: Callable[[protocol.Publication], None], key: str, max_body: int, metrics: Metrics
    ) -> None:
        self.handle = handle
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
        self.handle(publication)
        resp.status = falcon.HTTP_201

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _error(resp, falcon.HTTP_422, "method not allowed", "use POST")

    on_put = on_patch = on_delete = on_get


def create_broadcast_app(cfg: Config, handle: Callable[[protocol.Publication], None], metrics: Metrics) -> falcon.App:
    app = falcon.App(media_type=falcon.MEDIA_JSON)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route(
        cfg.http_broadcast_path,
        BroadcastResource(handle, cfg.broadcast_auth_key, cfg.http_broadcast_max_body, metrics),
    )
    return app


class Dispatcher:
    """Top-level WSGI app of one listening port: routes by path, no framework on the hot paths."""

    def __init__(self) -> None:
        self.routes: dict[str, WSGIApp] = {}
        self.websocket: Callable[[dict[str, Any], Any], None] | None = None
        self.ws_paths: set[str] = set()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in self.ws_paths:
            ws = environ.get("wsgi.websocket")
            if ws is not None and self.websocket is not None:
                self.websocket(environ, ws)
                return []
            start_response("400 Bad Request", [("Content-Type", "text/plain"), ("Content-Length", "11")])
            return [b"Bad Request"]
        app = self.routes.get(path)
        if app is not None:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
        return [b"Not Found"]


def health_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HEALTH_BODY)))])
    return [HEALTH_BODY]


def metrics_app(metrics: Metrics, tags: dict[str, str]) -> WSGIApp:
    """``--metrics_http``: Prometheus text of every worker's metrics, with ``--metrics_tags`` labels."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = metrics.prometheus(tags).encode()
        start_response(
            "200 OK",
            [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else []

    return app
