"""HTTP RPC controller: asks an AnyCable RPC backend over HTTP (SPEC §8).

The backend is anything that speaks AnyCable's RPC-over-HTTP: anycable-rails with
``http_rpc: true`` (mounted at ``/_anycable``), ``@anycable/serverless-js``, anycable-laravel,
and so on. Each question is one ``POST <rpc_host>/{connect,command,disconnect}`` with
the JSON shapes of SPEC §8.3 and these headers: ``Content-Type: application/json``,
``x-anycable-meta-sid`` (the backend puts it into the welcome, which makes the session
restorable), ``x-anycable-meta-protov: v1``, and ``Authorization: Bearer <secret>`` when
an RPC secret is configured.

Robustness, in the order a call meets it:

1. a concurrency limit (``--rpc_concurrency``, a ``BoundedSemaphore``); callers waiting
   for a slot are the ``rpc_pending_num`` gauge, and they wait at most one call budget;
2. a circuit breaker (:mod:`~anycable_gevent.controllers.breaker`): when the backend is
   down, calls fail at once and clients are closed with 1011 ``Auth Error`` quickly;
3. a per-request timeout (``--http_rpc_timeout`` / ``--rpc_request_timeout``, 3 s), which
   covers connecting, sending and reading the whole response;
4. retries with exponential backoff only when the backend is unavailable (connection
   refused or reset) or overloaded (HTTP 429/503), within a total budget per call;
5. a cap on the response body (:data:`MAX_RESPONSE_BYTES`) and strict-but-tolerant
   parsing: ``null`` is accepted wherever a value may be missing, wrong types are an error.

A failure never raises out of :class:`HTTPController`: connect and command calls return
``Status.ERROR`` with the reason in ``error`` (the node logs it and closes with 1011 or
ignores the command, as SPEC §3.3-3.7 say); a failed Disconnect is logged here. Reasons
and log lines name a connection by :func:`~anycable_gevent.log.conn_ref` (``conn=``),
never by its sid, and never contain a secret.

Concurrency contract: every method may be called from any greenlet (connection readers,
the Disconnect queue); calls block only the calling greenlet. The HTTP pool is created in
:meth:`HTTPController.start`, i.e. in the serving process after any fork.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import gevent
import urllib3
from gevent.lock import BoundedSemaphore
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, SSLError
from urllib3.exceptions import TimeoutError as URLLib3Timeout

from anycable_gevent import __version__
from anycable_gevent.config import Config
from anycable_gevent.controllers.base import (
    CommandResult,
    Connection,
    ConnectResult,
    Controller,
    Env,
    Presence,
    Status,
)
from anycable_gevent.controllers.breaker import CircuitBreaker
from anycable_gevent.errors import RPCError
from anycable_gevent.log import conn_ref
from anycable_gevent.metrics import Metrics

log = logging.getLogger(__name__)

#: The RPC protocol version announced to the backend (``x-anycable-meta-protov``).
PROTO_VERSION = "v1"
#: Largest response body read from the backend; a bigger one is an error (never buffered).
MAX_RESPONSE_BYTES = 4 << 20
#: Minimum total time for one call including retries (anycable-go's rpc_command_timeout).
CALL_BUDGET = 3.0
#: First backoff delay after "unavailable" (refused/reset) and after "overloaded" (429/503);
#: each retry doubles it (anycable-go: 100 ms and 10 ms), capped at MAX_BACKOFF.
BACKOFF_UNAVAILABLE = 0.1
BACKOFF_OVERLOADED = 0.05
MAX_BACKOFF = 1.0
#: Default concurrency when ``--rpc_concurrency=0`` (adaptive concurrency is not implemented).
DEFAULT_CONCURRENCY = 28
#: Bytes of a non-200 response body kept for the log line.
ERROR_SNIPPET = 200
#: Internal request headers the server reads itself and does not forward to the backend.
INTERNAL_HEADERS = ("x-anycable-restore-sid",)


# ---------------------------------------------------------------------- errors


class Unavailable(RPCError):
    """The backend could not be reached (refused, reset, DNS): retried."""


class Overloaded(RPCError):
    """The backend said it is busy (HTTP 429 or 503): retried."""


class CallTimeout(RPCError):
    """A request did not complete within the request timeout: not retried."""


class BadResponse(RPCError):
    """The backend answered something unusable (HTTP error, bad JSON, wrong shape, too big)."""


class _AttemptTimeout(BaseException):
    """Raised by the per-request gevent timer. A BaseException on purpose, so no
    ``except Exception`` inside urllib3 can swallow it; converted to CallTimeout."""


# ---------------------------------------------------------------------- response parsing


def _field_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadResponse(f"{key} must be a string, got {type(value).__name__}")
    return value


def _field_strs(obj: Mapping[str, Any], key: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadResponse(f"{key} must be a list of strings")
    return value


def _field_bool(obj: Mapping[str, Any], key: str) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadResponse(f"{key} must be a boolean, got {type(value).__name__}")
    return value


def _status(obj: Mapping[str, Any]) -> Status:
    """Numeric status; missing means ERROR (Go omits 0 when it sends one)."""
    value = obj.get("status")
    if value is None:
        return Status.ERROR
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadResponse(f"status must be a number (0, 1 or 2), got {value!r:.40}")
    try:
        return Status(value)
    except ValueError:
        raise BadResponse(f"unknown status {value}") from None


def _state_map(env: Mapping[str, Any], key: str) -> dict[str, str] | None:
    """A state map of the reply's ``env``. A ``null`` value deletes its key, like Go's decoder."""
    value = env.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadResponse(f"env.{key} must be an object")
    out: dict[str, str] = {}
    for k, v in value.items():
        if v is None:
            out[k] = ""
        elif isinstance(v, str):
            out[k] = v
        else:
            raise BadResponse(f"env.{key} values must be strings")
    return out


def _env_changes(obj: Mapping[str, Any]) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    env = obj.get("env")
    if env is None:
        return None, None
    if not isinstance(env, dict):
        raise BadResponse("env must be an object")
    return _state_map(env, "cstate"), _state_map(env, "istate")


def _presence(obj: Mapping[str, Any]) -> Presence | None:
    value = obj.get("presence")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadResponse("presence must be an object")
    kind, pid = _field_str(value, "type"), _field_str(value, "id")
    if not kind:
        return None
    info: Any = value.get("info")
    if isinstance(info, str) and info:
        # the RPC carries info as a JSON string; clients send (and expect) a JSON value
        try:
            info = json.loads(info)
        except ValueError:
            pass
    return Presence(kind, pid, info)


def parse_connect(obj: Mapping[str, Any]) -> ConnectResult:
    cstate, _ = _env_changes(obj)
    return ConnectResult(
        _status(obj),
        identifiers=_field_str(obj, "identifiers"),
        transmissions=_field_strs(obj, "transmissions"),
        cstate=cstate,
        error=_field_str(obj, "error_msg"),
    )


def parse_command(obj: Mapping[str, Any]) -> CommandResult:
    cstate, istate = _env_changes(obj)
    return CommandResult(
        _status(obj),
        transmissions=_field_strs(obj, "transmissions"),
        streams=_field_strs(obj, "streams"),
        stopped_streams=_field_strs(obj, "stopped_streams"),
        stop_streams=_field_bool(obj, "stop_streams"),
        disconnect=_field_bool(obj, "disconnect"),
        istate=istate,
        cstate=cstate,
        presence=_presence(obj),
        error=_field_str(obj, "error_msg"),
    )


# ---------------------------------------------------------------------- the controller


class HTTPController(Controller):
    """AnyCable RPC over HTTP."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else Metrics()
        url = urlsplit(cfg.rpc_host)
        self.base_url = f"{url.scheme}://{url.hostname or ''}" + (f":{url.port}" if url.port else "")
        base_path = url.path.rstrip("/")
        query = f"?{url.query}" if url.query else ""
        self.paths = {m: f"{base_path}/{m}{query}" for m in ("connect", "command", "disconnect")}
        #: What the banner and logs show: scheme, host, port, path (never userinfo or query).
        self.display = f"{self.base_url}{base_path}"
        if cfg.rpc_concurrency == 0:
            log.warning("--rpc_concurrency=0 (adaptive concurrency) is not supported; using %d", DEFAULT_CONCURRENCY)
        self.concurrency = cfg.rpc_concurrency or DEFAULT_CONCURRENCY
        self.timeout = cfg.rpc_timeout
        self.budget = max(self.timeout, CALL_BUDGET)
        self.secret = cfg.rpc_secret
        self.forward_internal = {h for h in INTERNAL_HEADERS if h in {x.lower() for x in cfg.headers}}
        self.breaker = CircuitBreaker()
        self._slots = BoundedSemaphore(self.concurrency)
        self._waiting = 0
        self._pool: urllib3.HTTPConnectionPool | None = None
        self.metrics.gauge("rpc_pending_num", lambda: self._waiting)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._pool is None:
            self._pool = urllib3.connection_from_url(
                self.base_url,
                maxsize=self.concurrency,
                block=False,
                retries=False,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
            )

    def shutdown(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for calls in flight, then close the pool."""
        deadline = time.monotonic() + timeout
        busy = self.concurrency - self._slots.counter
        if busy:
            log.info("waiting for %d RPC calls in flight", busy)
        while self._slots.counter < self.concurrency and time.monotonic() < deadline:
            gevent.sleep(0.02)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def announce(self) -> str:
        secret = "with a secret" if self.secret else "without a secret"
        return f"http {self.display} (concurrency: {self.concurrency}, timeout: {self.timeout * 1000:.0f}ms, {secret})"

    # ------------------------------------------------------------------ RPC methods
    def connect(self, conn: Connection) -> ConnectResult:
        try:
            return parse_connect(self._call("connect", conn.sid, {"env": self._env(conn.env)}, self.budget))
        except RPCError as exc:
            return ConnectResult(Status.ERROR, error=self._failed(exc))

    def subscribe(self, conn: Connection, identifier: str) -> CommandResult:
        return self._command(conn, "subscribe", identifier)

    def unsubscribe(self, conn: Connection, identifier: str) -> CommandResult:
        return self._command(conn, "unsubscribe", identifier)

    def perform(self, conn: Connection, identifier: str, data: str) -> CommandResult:
        return self._command(conn, "message", identifier, data)

    def _command(self, conn: Connection, command: str, identifier: str, data: str | None = None) -> CommandResult:
        payload: dict[str, Any] = {"command": command, "identifier": identifier}
        if conn.identifiers:
            payload["connection_identifiers"] = conn.identifiers
        if data is not None:
            payload["data"] = data
        payload["env"] = self._env(conn.env, conn.env.istate)
        try:
            return parse_command(self._call("command", conn.sid, payload, self.budget))
        except RPCError as exc:
            return CommandResult(Status.ERROR, error=self._failed(exc))

    def disconnect(self, conn: Connection, subscriptions: list[str], istates: dict[str, dict[str, str]]) -> None:
        # Disconnect env.istate: identifier -> JSON-encoded state map (Command sends the flat map)
        istate = {ident: json.dumps(state, separators=(",", ":")) for ident, state in istates.items() if state}
        payload: dict[str, Any] = {"env": self._env(conn.env, istate)}
        if conn.identifiers:
            payload["identifiers"] = conn.identifiers
        if subscriptions:
            payload["subscriptions"] = subscriptions
        try:
            # Disconnect calls are never given up for want of a slot: the queue bounds them
            status = _status(self._call("disconnect", conn.sid, payload, None))
        except RPCError as exc:
            # nobody else reports a failed Disconnect (the connection is gone): log it here
            log.warning("RPC disconnect failed conn=%s error=%s", conn_ref(conn.sid), self._failed(exc))
            return
        if status == Status.ERROR:
            log.warning("RPC disconnect: the backend returned an error conn=%s", conn_ref(conn.sid))

    def _failed(self, exc: RPCError) -> str:
        """Count a failed call; its message for the caller's log line (the node logs connect/command errors)."""
        self.metrics.inc("rpc_error_total")
        if isinstance(exc, CallTimeout):
            self.metrics.inc("rpc_timeout_total")
        return str(exc)

    # ------------------------------------------------------------------ requests
    def _env(self, env: Env, istate: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The request ``env``; empty parts are omitted, as anycable-go does."""
        out: dict[str, Any] = {"url": env.url}
        headers = {k: v for k, v in env.headers.items() if k not in INTERNAL_HEADERS or k in self.forward_internal}
        if headers:
            out["headers"] = headers
        if env.cstate:
            out["cstate"] = dict(env.cstate)
        if istate:
            out["istate"] = dict(istate)
        return out

    def _call(self, method: str, sid: str, payload: dict[str, Any], slot_timeout: float | None) -> dict[str, Any]:
        """One RPC call with limits, breaker and retries: the decoded response object.

        ``slot_timeout``: how long to wait for a concurrency slot; ``None`` = as long as it takes.

        Raises:
            RPCError: the call failed (the message says why, without secrets or sids).
        """
        self.metrics.inc("rpc_call_total")
        self._waiting += 1
        try:
            acquired = self._slots.acquire(timeout=slot_timeout)
        finally:
            self._waiting -= 1
        if not acquired:
            raise Overloaded(f"no free RPC slot within {slot_timeout:.1f}s (the backend is slow or overloaded)")
        try:
            return self._attempts(method, sid, payload)
        except gevent.GreenletExit:
            self.metrics.inc("rpc_canceled_total")
            raise
        except RPCError:
            raise
        except Exception as exc:  # a bug here must cost one call, not the connection's greenlet
            log.exception("RPC %s failed unexpectedly conn=%s", method, conn_ref(sid))
            raise RPCError(f"unexpected {type(exc).__name__}") from None
        finally:
            self._slots.release()

    def _attempts(self, method: str, sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"anycable-gevent/{__version__}",
            "x-anycable-meta-sid": sid,
            "x-anycable-meta-protov": PROTO_VERSION,
        }
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        deadline = time.monotonic() + self.budget
        attempt = 0
        last_kind: type[RPCError] | None = None
        while True:
            generation = self.breaker.allow()  # raises CircuitOpen
            timeout = max(min(self.timeout, deadline - time.monotonic()), 0.001)
            reported = False
            try:
                result = self._request(method, body, headers, timeout)
                self.breaker.record(generation, True)
                reported = True
                return result
            except (Unavailable, CallTimeout) as exc:
                self.breaker.record(generation, False)
                reported = True
                if isinstance(exc, CallTimeout):
                    raise CallTimeout(f"{method} timed out after {timeout:.1f}s") from None
                error: RPCError = exc
            except Overloaded as exc:
                self.breaker.record(generation, True)  # it answered: it is reachable
                reported = True
                error = exc
            except RPCError:
                self.breaker.record(generation, True)
                reported = True
                raise
            finally:
                if not reported:
                    self.breaker.abandon(generation)
            # unavailable or overloaded: back off and retry, within the budget
            base = BACKOFF_OVERLOADED if isinstance(error, Overloaded) else BACKOFF_UNAVAILABLE
            if type(error) is not last_kind:
                attempt, last_kind = 0, type(error)
            delay = min(base * (2**attempt), MAX_BACKOFF) * random.uniform(0.8, 1.2)
            attempt += 1
            if time.monotonic() + delay >= deadline:
                raise error
            self.metrics.inc("rpc_retries_total")
            log.debug("RPC %s: %s; retrying in %.2fs conn=%s", method, error, delay, conn_ref(sid))
            gevent.sleep(delay)

    def _request(self, method: str, body: bytes, headers: dict[str, str], timeout: float) -> dict[str, Any]:
        """One HTTP request; the decoded JSON object, or an RPCError subclass."""
        pool = self._pool
        if pool is None:
            raise Unavailable("RPC client is not started")
        timer = gevent.Timeout(timeout, _AttemptTimeout)
        timer.start()
        try:
            try:
                resp = pool.urlopen(
                    "POST",
                    self.paths[method],
                    body=body,
                    headers=headers,
                    retries=False,
                    redirect=False,
                    preload_content=False,
                    timeout=urllib3.Timeout(connect=timeout, read=timeout),
                )
            except NewConnectionError as exc:
                raise Unavailable(f"cannot connect to {self.display}: {_reason(exc)}") from None
            except URLLib3Timeout:
                raise CallTimeout("request timed out") from None
            except SSLError as exc:
                raise BadResponse(f"TLS error talking to {self.display}: {exc}") from None
            except (ProtocolError, OSError) as exc:
                raise Unavailable(f"connection to {self.display} lost: {_reason(exc)}") from None
            except HTTPError as exc:
                raise BadResponse(f"HTTP error: {exc}") from None
            return self._response(resp)
        except _AttemptTimeout:
            raise CallTimeout("request timed out") from None
        finally:
            timer.close()

    def _response(self, resp: urllib3.BaseHTTPResponse) -> dict[str, Any]:
        complete = False
        try:
            status = resp.status
            if status != 200:
                snippet = _read(resp, ERROR_SNIPPET, truncate=True)
                text = snippet.decode("utf-8", "replace").strip()
                if status in (429, 503):
                    raise Overloaded(f"backend overloaded (HTTP {status})")
                if status == 401:
                    raise BadResponse("backend refused the RPC secret (HTTP 401); check --http_rpc_secret or --secret")
                raise BadResponse(f"HTTP {status}: {_short(text)!r}")
            raw = _read(resp, MAX_RESPONSE_BYTES)
            complete = True
        except URLLib3Timeout:
            raise CallTimeout("response timed out") from None
        except (ProtocolError, OSError) as exc:
            raise BadResponse(f"response cut short: {_reason(exc)}") from None
        finally:
            if not complete:
                resp.close()  # never reuse a connection with unread bytes
            resp.release_conn()
        try:
            obj = json.loads(raw)
        except ValueError:
            raise BadResponse(f"response is not JSON: {_short(raw.decode('utf-8', 'replace'))!r}") from None
        if not isinstance(obj, dict):
            raise BadResponse(f"response must be a JSON object, got {type(obj).__name__}")
        return obj


def _read(resp: urllib3.BaseHTTPResponse, cap: int, truncate: bool = False) -> bytes:
    """Read the body, at most ``cap`` bytes; more is an error unless ``truncate``."""
    length = resp.headers.get("content-length", "")
    if not truncate and length.isdigit() and int(length) > cap:
        raise BadResponse(f"response too large ({length} bytes, limit {cap})")
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = resp.read(min(65536, cap + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    if truncate:
        return b"".join(chunks)[:cap]
    raise BadResponse(f"response too large (over {cap} bytes)")


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a urllib3/socket error."""
    reason = getattr(exc, "reason", None) or (exc.args[-1] if exc.args else exc)
    if isinstance(reason, BaseException) and reason is not exc:
        return _reason(reason)
    text = str(reason)
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text


def _short(value: Any, limit: int = ERROR_SNIPPET) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= limit else text[:limit] + "…"
