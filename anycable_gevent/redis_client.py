"""The Redis clients of one worker, and the names of everything this server keeps there.

One :class:`RedisConnector` per worker, shared by the broker, the pub/sub and the Redis
broadcasters. Clients are created in :meth:`RedisConnector.start`, i.e. in the worker
after any fork (a connection pool must never cross a fork). Every error of redis-py is
turned into :class:`~anycable_gevent.errors.BrokerError` by the callers, with the
target named by :meth:`RedisConnector.describe`, which never shows credentials.

Key layout (``P`` = ``--redis_prefix``; every key of one stream shares the hash tag
``{stream}``, so each script touches one Redis Cluster slot):

====================  =========================================================
``P{S}:m``            hash: ``e`` the stream's epoch, ``s`` its last offset
``P{S}:h``            stream: history entries, ID ``<offset>-0``, fields ``d`` ``t``
``P{S}:pz`` …         presence of the stream (see :mod:`anycable_gevent.broker.redis`)
``P{S}:c``            pub/sub channel of the stream's registered messages
``Pinternal``         pub/sub channel of remote commands
``Pnode:<id>``        pub/sub channel of one worker (liveness probes)
``Psess:<sid>``       string: a session snapshot, expiring ``--sessions_ttl``
``Ppresence``         sorted set: presence streams by their next expiry
====================  =========================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from anycable_gevent.config import Config, safe_url

log = logging.getLogger("anycable_gevent.redis")

#: Seconds to connect, and for a command to be answered (a deaf Redis must not hang a worker).
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
#: A pooled connection idle this long is checked (PING) before use: after a Redis restart
#: the first command must not fail on a dead connection.
HEALTH_CHECK_INTERVAL = 1
#: Connections of a worker's pool; more callers wait (up to COMMAND_TIMEOUT) for one.
POOL_SIZE = 32


class Batcher:
    """Auto-pipelining: what every greenlet asks of Redis in one turn of the event loop
    goes in one pipeline, one round trip (a reconnect storm of thousands of sessions
    becomes a few dozen round trips instead of thousands).

    Each caller's ``build(pipe)`` queues commands on a shared non-transactional pipeline;
    the caller gets its own results, in order (errors of its commands as exception
    objects), or the exception that failed the whole round trip. One flushing greenlet
    runs while callers wait; what arrives during a round trip goes in the next one.
    Atomic units must therefore be single commands (a script for anything larger).
    """

    def __init__(self, client: Callable[[], Any]) -> None:
        self._client = client
        self._queue: list[tuple[Callable[[Any], None], AsyncResult]] = []
        self._flusher: gevent.Greenlet | None = None

    def run(self, build: Callable[[Any], None]) -> list[Any]:
        done: AsyncResult = AsyncResult()
        self._queue.append((build, done))
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush)
        results: list[Any] = done.get()  # type: ignore[assignment]
        return results

    def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    pipe = self._client().pipeline(transaction=False)
                    counts = []
                    for build, _ in batch:
                        before = len(pipe.command_stack)
                        build(pipe)
                        counts.append(len(pipe.command_stack) - before)
                    results = list(pipe.execute(raise_on_error=False))
                except Exception as exc:  # the round trip failed: every caller learns it
                    for _, done in batch:
                        done.set_exception(exc)
                    continue
                except BaseException:  # killed in the round trip: nobody must wait for ever
                    for _, done in batch:
                        done.set_exception(ConnectionError("the Redis round trip was interrupted"))
                    raise
                at = 0
                for (_, done), n in zip(batch, counts, strict=True):
                    done.set(results[at : at + n])
                    at += n
        finally:
            # after a kill, what was queued meanwhile still gets its round trip
            self._flusher = gevent.spawn(self._flush) if self._queue else None


class Keys:
    """Names of keys and channels under one prefix."""

    __slots__ = ("prefix", "internal", "presence_index")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.internal = f"{prefix}internal"
        self.presence_index = f"{prefix}presence"

    def stream(self, stream: str, kind: str) -> str:
        return f"{self.prefix}{{{stream}}}:{kind}"

    def channel(self, stream: str) -> str:
        return f"{self.prefix}{{{stream}}}:c"

    def node(self, name: str) -> str:
        return f"{self.prefix}node:{name}"

    def session(self, sid: str) -> str:
        return f"{self.prefix}sess:{sid}"


def describe_error(exc: BaseException) -> str:
    """A Redis or socket error as one short line (for logs and ``/health``)."""
    return (str(exc) or type(exc).__name__)[:200]


def close_quietly(conn: Any, what: str) -> None:
    """Disconnect a dedicated connection; a failure to close is only logged at debug."""
    if conn is None:
        return
    try:
        conn.disconnect()
    except Exception:
        log.debug("closing %s failed", what, exc_info=True)


def tls_options(cfg: Config) -> dict[str, Any]:
    """redis-py keyword arguments of a TLS connection (``rediss://``) from the options.

    Like anycable-go, the server's certificate is not checked unless asked for
    (``--redis_tls_verify``) or a CA is given (``--redis_tls_ca_cert_path``): managed
    Redis services often present self-signed certificates.
    """
    verify = cfg.redis_tls_verified
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required" if verify else "none",
        "ssl_check_hostname": verify,
    }
    if cfg.redis_tls_ca_cert_path:
        options["ssl_ca_certs"] = cfg.redis_tls_ca_cert_path
    if cfg.redis_tls_client_cert_path:
        options["ssl_certfile"] = cfg.redis_tls_client_cert_path
        options["ssl_keyfile"] = cfg.redis_tls_client_key_path
    return options


class RedisConnector:
    """Redis clients for one worker (constructed pre-fork without I/O; :meth:`start` connects lazily)."""

    def __init__(self, cfg: Config) -> None:
        self.url = cfg.redis_url
        self.sentinels = cfg.redis_sentinel_spec
        self.tls = tls_options(cfg)
        self.keys = Keys(cfg.redis_prefix)
        self._client: Any = None
        self._sentinel: Any = None
        #: auto-pipelined commands of every greenlet of the worker (see Batcher)
        self.batcher = Batcher(lambda: self.client)

    def describe(self) -> str:
        if self.sentinels is None:
            return safe_url(self.url)
        nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels.nodes)
        return f"{safe_url(self.url)} via sentinels {nodes}"

    def start(self) -> None:
        import redis

        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": COMMAND_TIMEOUT,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
            "retry_on_timeout": False,
            "protocol": 2,  # RESP2: pub/sub messages are plain replies (RESP3 hands them to push callbacks)
            "client_name": self.client_name(),
        }
        if self.sentinels is None:
            tls = self.tls if self.url.startswith("rediss://") else {}
            pool = redis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=POOL_SIZE,
                timeout=COMMAND_TIMEOUT,  # waiting for a free connection (a storm), not failing
                **common,
                **tls,
            )
        else:
            pool = self._sentinel_pool(common)
        self._client = redis.Redis(connection_pool=pool)

    def _sentinel_pool(self, common: dict[str, Any]) -> Any:
        """A blocking pool whose connections ask the sentinels for the master when they
        connect (and again after a failover: a write to a demoted master fails the
        command, drops the connection, and the next one finds the new master)."""
        import redis
        from redis.connection import parse_url
        from redis.sentinel import (
            Sentinel,
            SentinelConnectionPoolProxy,
            SentinelManagedConnection,
            SentinelManagedSSLConnection,
        )

        spec = self.sentinels
        assert spec is not None
        master = parse_url(self.url)  # host = the master's name; credentials, db, TLS
        tls_master = master.pop("connection_class", None) is redis.SSLConnection
        name = master.pop("host")
        master.pop("port", None)
        if master.get("password") is None and spec.password is not None:
            master["username"], master["password"] = spec.username, spec.password
        sentinel_kwargs = {k: common[k] for k in ("socket_connect_timeout", "socket_timeout", "protocol")}
        sentinel_kwargs["client_name"] = self.client_name("sentinel")
        if spec.tls:
            sentinel_kwargs.update(ssl=True, **self.tls)
        self._sentinel = Sentinel(list(spec.nodes), sentinel_kwargs=sentinel_kwargs)
        pool = redis.BlockingConnectionPool(
            max_connections=POOL_SIZE,
            timeout=COMMAND_TIMEOUT,
            connection_class=SentinelManagedSSLConnection if tls_master else SentinelManagedConnection,
            **common,
            **master,
            **(self.tls if tls_master else {}),
        )
        pool.connection_kwargs["connection_pool"] = SentinelConnectionPoolProxy(
            connection_pool=pool,
            is_master=True,
            check_connection=False,
            service_name=name,
            sentinel_manager=self._sentinel,
        )
        return pool

    @staticmethod
    def client_name(role: str = "") -> str:
        """What ``CLIENT LIST`` shows for this worker's connections: ``anycable-gevent:<pid>``,
        with ``:<role>`` for a dedicated one (``pubsub``, ``redisx``...)."""
        name = f"anycable-gevent:{os.getpid()}"
        return f"{name}:{role}" if role else name

    @property
    def client(self) -> Any:
        """The shared command client (a connection pool); after :meth:`start`."""
        if self._client is None:
            raise RuntimeError("RedisConnector.start() has not been called")
        return self._client

    def dedicated(self, socket_timeout: float | None, role: str) -> Any:
        """A connection of its own (pub/sub listeners, blocking stream reads), not pooled."""
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["socket_timeout"] = socket_timeout
        kwargs["client_name"] = self.client_name(role)
        kwargs["health_check_interval"] = 0
        return pool.connection_class(**kwargs)

    def shutdown(self) -> None:
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:
            try:
                sentinel.close()
            except Exception:
                log.debug("closing the sentinel clients failed", exc_info=True)
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a pool must not fail a shutdown
                log.debug("closing the Redis pool failed", exc_info=True)
