"""anycable-gevent: an AnyCable-compatible real-time server on gevent.

The package from the top down: each group uses the groups below it, never those above,
with two exceptions: :mod:`config` takes the backend names from the backend packages'
registries (data only, no backend is imported), and the HTTP broadcaster uses the
transport's request-body deadline.

Processes
    :mod:`cli` (parse, check, bind; stdlib only), :mod:`arbiter` (the master of
    ``--workers N``; never imports gevent), :mod:`worker` (the one module that
    monkey-patches), :mod:`server` (one worker: HTTP servers on its sockets, signals).
Composition
    :mod:`graph` builds one worker's components from the configuration;
    :mod:`backends` names every broker, pub/sub and broadcaster without importing them;
    :mod:`web` routes health, metrics and the broadcasters' endpoints.
Connections
    :mod:`transport` (pywsgi and gevent-websocket with the upgrade rules and bounds),
    :mod:`ws` (an upgraded connection's reader loop).
Behaviour
    :mod:`node` (connect, commands, disconnect, broadcasts), :mod:`repair` (gap repair
    of pub/sub), :mod:`pinger`, :mod:`disconnector`, :mod:`session` (one connection's
    state and writes), :mod:`hub` (fan-out), :mod:`controllers` (who may connect and
    subscribe: JWT, streams, HTTP RPC).
Backends, each behind a small interface (:mod:`component` is their shared lifecycle)
    :mod:`broker` (memory, redis), :mod:`pubsub` (local, redis),
    :mod:`broadcast` (http, redisx, redis); :mod:`redis_client` holds a worker's
    Redis clients and key names.
Foundations
    :mod:`protocol` (frames and messages), :mod:`config`, :mod:`errors`, :mod:`log`,
    :mod:`metrics`, :mod:`history`, :mod:`ids`, :mod:`keys`, :mod:`signer`,
    :mod:`ticker`, :mod:`backoff`, :mod:`heartbeat`, :mod:`listeners`, :mod:`banner`.
For applications
    :mod:`application` (write channels in Python, served over AnyCable's HTTP RPC) and
    :mod:`publisher` (publish from application code).
"""

__version__ = "0.1.0"
