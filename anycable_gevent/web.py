"""HTTP surface besides the broadcasters: WSGI dispatch by path, health and metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from anycable_gevent.broadcast.base import StartResponse, WSGIApp
from anycable_gevent.metrics import Metrics

log = logging.getLogger(__name__)

HEALTH_BODY = b"Ah, ha, ha, ha, stayin' alive, stayin' alive."


class Dispatcher:
    """Top-level WSGI app of one listening port: routes by path, no framework on the hot paths."""

    def __init__(
        self,
        routes: dict[str, WSGIApp] | None = None,
        ws_paths: Iterable[str] = (),
        websocket: Callable[[dict[str, Any], Any], None] | None = None,
    ) -> None:
        self.routes: dict[str, WSGIApp] = dict(routes or {})
        self.ws_paths: set[str] = set(ws_paths)
        self.websocket = websocket

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


def health_app(problems: Callable[[], list[str]]) -> WSGIApp:
    """``/health``: 200 with anycable-go's body while everything works; 503 naming what
    does not (Redis unreachable, a pub/sub listener that went deaf, ...)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        found = problems()
        if not found:
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HEALTH_BODY)))])
            return [HEALTH_BODY]
        body = ("unhealthy: " + "; ".join(found)).encode()
        start_response(
            "503 Service Unavailable",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Retry-After", "1")],
        )
        return [body]

    return app


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
