"""Publish to AnyCable from an application: broadcasts, batches and remote disconnects.

Three backends, one interface (:class:`Publisher`), picked like the server's
``--broadcast_adapter``:

* :class:`HTTPPublisher` (``http``): ``POST /_broadcast`` with ``Authorization: Bearer
  <broadcast key>``; timeouts, retries with backoff when the server is unreachable or
  answers 503, and typed errors carrying the server's ``error``/``details``;
* :class:`RedisStreamPublisher` (``redisx``): ``XADD <stream> * payload <json>``, consumed
  by exactly one server node;
* :class:`RedisPublisher` (``redis``, legacy): ``PUBLISH <channel> <json>``, fanned out to
  every node subscribed at that moment (nobody listening = the message is lost).

The payloads are SPEC §6.1's publications: ``{"stream", "data", "meta"}``, an array of
them (a batch, delivered in order), or ``{"command":"disconnect","payload":{…}}``.

Every failure is a :class:`PublishError`. Publishers are thread-safe (urllib3 and
redis-py pools) and import neither gevent nor anything that needs it; under gevent's
monkey-patching they cooperate like any other socket code. redis-py is imported only
by the Redis publishers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError
from urllib3.exceptions import TimeoutError as URLLib3Timeout

from anycable_gevent.errors import AnyCableError
from anycable_gevent.keys import BROADCAST_PHRASE, derive_key

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

P = TypeVar("P", bound="Publisher")

#: The server's defaults (SPEC §6.2, §6.4, §6.5).
DEFAULT_HTTP_URL = "http://localhost:8090/_broadcast"
DEFAULT_REDIS_URL = "redis://localhost:6379"
DEFAULT_REDIS_CHANNEL = "__anycable__"


# ---------------------------------------------------------------------- errors


class PublishError(AnyCableError):
    """A publication was not accepted (root of the publisher's errors)."""


class PublisherUnavailable(PublishError):
    """The server or Redis could not be reached in time (after the retries); try again later."""


class PublicationRejected(PublishError):
    """The server refused the publication (HTTP 4xx/5xx): retrying the same request will not help.

    Attributes:
        status: the HTTP status.
        error: the server's ``error`` field (or the response text).
        details: the server's ``details`` field ("" when absent).
    """

    def __init__(self, status: int, error: str, details: str = "") -> None:
        self.status = status
        self.error = error
        self.details = details
        text = f"HTTP {status}: {error}" + (f" ({details})" if details else "")
        super().__init__(text)


class Unauthorized(PublicationRejected):
    """401: wrong or missing broadcast key (``--broadcast_key``, or derived from ``--secret``)."""


class PayloadTooLarge(PublicationRejected):
    """413: over the server's ``--http_broadcast_max_body``; send smaller batches."""


class InvalidPublication(PublicationRejected):
    """422: the server could not accept the body; ``details`` says why."""


_REJECTIONS: dict[int, type[PublicationRejected]] = {
    401: Unauthorized,
    413: PayloadTooLarge,
    422: InvalidPublication,
}


# ---------------------------------------------------------------------- payloads


def encode(value: Any) -> str:
    """Compact JSON (ASCII, so that every transport carries it unchanged)."""
    return json.dumps(value, separators=(",", ":"))


def encode_data(data: Any) -> str:
    """A broadcast's ``data``: a string as is, anything else JSON-encoded (Rails' rule).

    Raises:
        TypeError: ``data`` is not JSON-serializable.
    """
    return data if isinstance(data, str) else encode(data)


def encode_identifiers(identifiers: Mapping[str, Any] | str) -> str:
    """A connection's identifiers string: a mapping is encoded like the application kit's
    ``identified_by`` (compact JSON, insertion order), a string is used as is. A remote
    disconnect matches it byte for byte against what the connection was identified with."""
    if isinstance(identifiers, str):
        return identifiers
    return json.dumps(dict(identifiers), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Broadcast:
    """One message for a stream. ``data`` follows :func:`encode_data`."""

    stream: str
    data: Any
    #: Skip the connection with this session id (e.g. the sender's: Rails' ``to_others``).
    exclude_socket: str | None = None
    #: Deliver live only: not stored in the stream's history, no offset.
    transient: bool = False

    def to_publication(self) -> dict[str, Any]:
        """SPEC §6.1's message object.

        Raises:
            ValueError: the stream name is empty.
            TypeError: ``data`` is not JSON-serializable.
        """
        if not isinstance(self.stream, str) or not self.stream:
            raise ValueError("a broadcast needs a non-empty stream name")
        out: dict[str, Any] = {"stream": self.stream, "data": encode_data(self.data)}
        meta: dict[str, Any] = {}
        if self.exclude_socket:
            meta["exclude_socket"] = self.exclude_socket
        if self.transient:
            meta["transient"] = True
        if meta:
            out["meta"] = meta
        return out


def disconnect_command(identifiers: Mapping[str, Any] | str, reconnect: bool) -> dict[str, Any]:
    """SPEC §6.1's remote disconnect command."""
    identifier = encode_identifiers(identifiers)
    if not identifier:
        raise ValueError("disconnect needs the connection identifiers")
    return {"command": "disconnect", "payload": {"identifier": identifier, "reconnect": reconnect}}


class Batch:
    """Messages collected by :meth:`Publisher.batch`, sent as one publication on exit."""

    def __init__(self) -> None:
        self.messages: list[Broadcast] = []

    def broadcast(self, stream: str, data: Any, *, exclude_socket: str | None = None, transient: bool = False) -> None:
        self.messages.append(Broadcast(stream, data, exclude_socket, transient))


# ---------------------------------------------------------------------- the interface


class Publisher(ABC):
    """Publishes to AnyCable. Subclasses only deliver a JSON body (:meth:`send`)."""

    def broadcast(self, stream: str, data: Any, *, exclude_socket: str | None = None, transient: bool = False) -> None:
        """Send ``data`` to every subscriber of ``stream``.

        Args:
            data: a string is sent as is (clients get it parsed if it is JSON), anything
                else is JSON-encoded.
            exclude_socket: session id of a connection that must not get it (the sender's,
                ``handle.sid`` in a channel).
            transient: do not store it in the stream's history.

        Raises:
            PublishError: not accepted (see the subclasses).
        """
        self.send(encode(Broadcast(stream, data, exclude_socket, transient).to_publication()))

    def broadcast_many(self, messages: Iterable[Broadcast]) -> None:
        """Send several messages as one batch (one request), delivered in order; nothing if empty."""
        batch = [m.to_publication() for m in messages]
        if batch:
            self.send(encode(batch))

    @contextmanager
    def batch(self) -> Iterator[Batch]:
        """Collect broadcasts and send them as one batch when the block ends without an exception::

        with publisher.batch() as batch:
            batch.broadcast("chat_1", {"text": "hi"})
            batch.broadcast("chat_2", {"text": "hi"})
        """
        collected = Batch()
        yield collected
        self.broadcast_many(collected.messages)

    def disconnect(self, identifiers: Mapping[str, Any] | str, *, reconnect: bool = True) -> None:
        """Close every connection identified by ``identifiers`` (Rails' ``remote_connections.where(...).disconnect``).

        The clients get ``{"type":"disconnect","reason":"remote","reconnect":<reconnect>}``.
        """
        self.send(encode(disconnect_command(identifiers, reconnect)))

    @abstractmethod
    def send(self, body: str) -> None:
        """Deliver one publication (JSON text). Raises: PublishError."""

    def close(self) -> None:
        """Release connections (the publisher may not be used afterwards)."""

    def __enter__(self: P) -> P:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- HTTP


class HTTPPublisher(Publisher):
    """``POST`` to the server's broadcast endpoint (``/_broadcast``).

    Args:
        url: the endpoint; the server's banner prints it (port 8090 without a key, the
            main port with one).
        key: the broadcast key (``--broadcast_key``), used as is.
        secret: the server's ``--secret``, from which the key is derived when ``key`` is
            not given (as anycable-rails does).
        timeout: seconds for connecting, and again for the answer, per attempt.
        retries: further attempts after a connection failure or an HTTP 503. A request
            whose answer timed out is not retried (the server may have delivered it); a
            connection that breaks while the server answers is, so delivery is at least once.
        backoff: delay before the first retry; it doubles each time (with ±20 % jitter),
            up to ``max_backoff``.
        http: a ``urllib3.PoolManager`` to use (and not close) instead of the publisher's own.
        sleep: how to wait between attempts (``time.sleep``; gevent-patched if gevent is).
    """

    def __init__(
        self,
        url: str = DEFAULT_HTTP_URL,
        *,
        key: str | None = None,
        secret: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        http: urllib3.PoolManager | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the broadcast URL must start with http:// or https://, not {url[:40]!r}")
        self.url = url
        key = key if key is not None else (derive_key(secret, BROADCAST_PHRASE) if secret else "")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self.retries = max(retries, 0)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._own_http = http is None
        self.http = http if http is not None else urllib3.PoolManager(retries=False, timeout=self.timeout)
        self.sleep = sleep

    def send(self, body: str) -> None:
        data = body.encode()
        attempt = 0
        while True:
            error = self._attempt(data)
            if error is None:
                return
            if attempt >= self.retries:
                raise error
            delay = min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.8, 1.2)
            attempt += 1
            log.warning("broadcast failed (%s); retry %d of %d in %.2fs", error, attempt, self.retries, delay)
            self.sleep(delay)

    def _attempt(self, data: bytes) -> PublisherUnavailable | None:
        """One request: ``None`` when accepted, the error when it may be retried.

        Raises:
            PublicationRejected: the server refused it.
            PublisherUnavailable: a failure that must not be retried (a timeout).
        """
        try:
            resp = self.http.request(
                "POST", self.url, body=data, headers=self.headers, timeout=self.timeout, retries=False, redirect=False
            )
        except NewConnectionError as exc:
            return PublisherUnavailable(f"cannot connect to {self.url}: {_reason(exc)}")
        except ConnectTimeoutError:  # nothing was sent: safe to retry
            return PublisherUnavailable(f"cannot connect to {self.url} within {self.timeout.connect_timeout}s")
        except URLLib3Timeout:
            raise PublisherUnavailable(f"{self.url} did not answer within {self.timeout.read_timeout}s") from None
        except (ProtocolError, OSError) as exc:
            return PublisherUnavailable(f"connection to {self.url} lost: {_reason(exc)}")
        except HTTPError as exc:
            raise PublisherUnavailable(f"HTTP error talking to {self.url}: {exc}") from None
        if 200 <= resp.status < 300:
            return None
        if resp.status == 503:
            return PublisherUnavailable(f"{self.url} is unavailable (HTTP 503)")
        error, details = _error_fields(resp.data)
        raise _REJECTIONS.get(resp.status, PublicationRejected)(resp.status, error, details)

    def close(self) -> None:
        if self._own_http:
            self.http.clear()


def _error_fields(body: bytes) -> tuple[str, str]:
    """The server's ``{"error", "details"}``, or the start of whatever else it said."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        details = obj.get("details")
        return obj["error"], details if isinstance(details, str) else ""
    return (text[:200] or "no details"), ""


def _reason(exc: BaseException) -> str:
    """The innermost message of a urllib3/socket error."""
    reason = getattr(exc, "reason", None) or (exc.args[-1] if exc.args else exc)
    if isinstance(reason, BaseException) and reason is not exc:
        return _reason(reason)
    return str(reason)


# ---------------------------------------------------------------------- Redis


class _RedisPublisher(Publisher):
    """Shared by the Redis publishers: the client, and errors mapped to PublishError."""

    def __init__(self, url: str, client: redis.Redis | None) -> None:
        import redis

        self._redis_errors = (redis.ConnectionError, redis.TimeoutError)
        self._error = redis.RedisError
        self._own = client is None
        self.client: redis.Redis = client if client is not None else redis.Redis.from_url(url)

    def send(self, body: str) -> None:
        try:
            self._send(body)
        except self._redis_errors as exc:
            raise PublisherUnavailable(f"Redis is unreachable: {exc}") from None
        except self._error as exc:
            raise PublishError(f"Redis refused the publication: {exc}") from None

    @abstractmethod
    def _send(self, body: str) -> None: ...

    def close(self) -> None:
        if self._own:
            self.client.close()


class RedisStreamPublisher(_RedisPublisher):
    """``XADD <stream> * payload <json>``: the server's ``redisx`` broadcast adapter.

    Each entry is taken by exactly one server node, which stores it in the stream's history
    and fans it out (SPEC §6.5). The server deletes entries it has handled.

    Args:
        url: Redis URL (used when ``client`` is not given).
        stream: the server's ``--redisx_stream``.
        maxlen: cap the Redis stream at about this many entries (``XADD MAXLEN ~``), so that
            it cannot grow without bound while no server consumes it; ``None`` = no cap.
        client: a ``redis.Redis`` to use (and not close) instead of the publisher's own.
    """

    def __init__(
        self,
        url: str = DEFAULT_REDIS_URL,
        *,
        stream: str = DEFAULT_REDIS_CHANNEL,
        maxlen: int | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        super().__init__(url, client)
        self.stream = stream
        self.maxlen = maxlen

    def _send(self, body: str) -> None:
        self.client.xadd(self.stream, {"payload": body}, maxlen=self.maxlen, approximate=True)


class RedisPublisher(_RedisPublisher):
    """``PUBLISH <channel> <json>``: the server's legacy ``redis`` broadcast adapter.

    Fan-out: every node subscribed at that moment delivers it; the message is not stored
    in history, and is lost if no node listens (SPEC §6.4).

    Args:
        url: Redis URL (used when ``client`` is not given).
        channel: the server's ``--redis_channel``.
        client: a ``redis.Redis`` to use (and not close) instead of the publisher's own.
    """

    def __init__(
        self, url: str = DEFAULT_REDIS_URL, *, channel: str = DEFAULT_REDIS_CHANNEL, client: redis.Redis | None = None
    ) -> None:
        super().__init__(url, client)
        self.channel = channel

    def _send(self, body: str) -> None:
        receivers = self.client.publish(self.channel, body)
        if not receivers:
            log.debug("published to %s, but no server is subscribed", self.channel)


#: Publisher classes by broadcast adapter name (the server's ``--broadcast_adapter``).
ADAPTERS: dict[str, type[Publisher]] = {
    "http": HTTPPublisher,
    "redisx": RedisStreamPublisher,
    "redis": RedisPublisher,
}


def create_publisher(adapter: str = "http", **options: Any) -> Publisher:
    """The publisher for a broadcast adapter name; ``options`` go to its constructor.

    Raises:
        ValueError: unknown adapter.
    """
    try:
        cls = ADAPTERS[adapter]
    except KeyError:
        raise ValueError(f"unknown broadcast adapter {adapter!r} (choose from {', '.join(ADAPTERS)})") from None
    return cls(**options)
