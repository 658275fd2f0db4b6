"""Controllers: build the chain from the configuration."""

from __future__ import annotations

import importlib

from anycable_gevent import protocol
from anycable_gevent.config import Config
from anycable_gevent.controllers.base import ChannelController, Controller, Identifier
from anycable_gevent.controllers.chain import ControllerChain
from anycable_gevent.controllers.identity import JWTIdentifier, PublicIdentifier
from anycable_gevent.controllers.streams import PubSubChannel, SignedChannel
from anycable_gevent.metrics import Metrics

#: Default controllers by name ("module:Class"), imported lazily.
BACKENDS = {
    "none": "anycable_gevent.controllers.null:NullController",
    "http": "anycable_gevent.controllers.rpc:HTTPController",
}


def _load(name: str) -> type[Controller]:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def build_controller(cfg: Config, metrics: Metrics | None = None) -> Controller:
    """The controller chain for ``cfg`` (constructed only; ``start()`` connects).

    ``metrics`` receives the RPC counters and the ``rpc_pending_num`` gauge.
    """
    identifiers: list[Identifier] = []
    if cfg.jwt_key:
        identifiers.append(JWTIdentifier(cfg.jwt_key, cfg.jwt_param, cfg.enforce_jwt))
    if cfg.accept_unauthenticated:
        identifiers.append(PublicIdentifier())
    channels: dict[str, ChannelController] = {
        protocol.PUBSUB_CHANNEL: PubSubChannel(
            cfg.streams_key, cfg.allow_public_streams, cfg.streams_whisper, cfg.streams_presence
        )
    }
    if cfg.turbo_streams and cfg.turbo_key:
        channels[protocol.TURBO_CHANNEL] = SignedChannel(cfg.turbo_key, "signed_stream_name")
    if cfg.cable_ready and cfg.cable_ready_key:
        channels[protocol.CABLE_READY_CHANNEL] = SignedChannel(cfg.cable_ready_key, "identifier")
    if cfg.rpc_enabled:
        default = _load("http")(cfg, metrics)  # type: ignore[call-arg]
    else:
        default = _load("none")()
    return ControllerChain(default, identifiers, channels)
