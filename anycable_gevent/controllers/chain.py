"""Combines identifiers, local channels and the default controller (SPEC §9.1).

Connect: the first identifier that answers wins (JWT, then public), else the default
controller (RPC or null). Subscribe/unsubscribe: routed by the identifier's ``channel``
to a local channel controller when one is registered and does not decline. Perform and
disconnect always go to the default controller.
"""

from __future__ import annotations

from typing import Any

from anycable_gevent import protocol
from anycable_gevent.controllers.base import (
    ChannelController,
    CommandResult,
    Connection,
    ConnectResult,
    Controller,
    Identifier,
)


def channel_params(identifier: str) -> dict[str, Any] | None:
    try:
        params = protocol.loads(identifier)  # untrusted: ValueError covers too-deep nesting
    except ValueError:
        return None
    return params if isinstance(params, dict) else None


class ControllerChain(Controller):
    def __init__(
        self,
        default: Controller,
        identifiers: list[Identifier] | None = None,
        channels: dict[str, ChannelController] | None = None,
    ) -> None:
        self.default = default
        self.identifiers = identifiers or []
        self.channels = channels or {}

    def start(self) -> None:
        self.default.start()

    def shutdown(self, timeout: float) -> None:
        self.default.shutdown(timeout)

    def announce(self) -> str:
        parts = [type(i).__name__.replace("Identifier", "").lower() for i in self.identifiers]
        local = ", ".join(self.channels)
        return (
            f"identification: {', '.join(parts) or 'rpc'}; local channels: {local or 'none'}; "
            f"rpc: {self.default.announce()}"
        )

    def _route(self, identifier: str) -> tuple[ChannelController | None, dict[str, Any]]:
        if not self.channels:
            return None, {}
        params = channel_params(identifier)
        if params is None:
            return None, {}
        channel = params.get("channel")
        return (self.channels.get(channel) if isinstance(channel, str) else None), params

    def connect(self, conn: Connection) -> ConnectResult:
        if self.identifiers:
            for ident in self.identifiers:
                result = ident.identify(conn)
                if result is not None:
                    return result
        return self.default.connect(conn)

    def subscribe(self, conn: Connection, identifier: str) -> CommandResult:
        route, params = self._route(identifier)
        if route is not None:
            result = route.subscribe(conn, identifier, params)
            if result is not None:
                return result
        return self.default.subscribe(conn, identifier)

    def unsubscribe(self, conn: Connection, identifier: str) -> CommandResult:
        route, _ = self._route(identifier)
        if route is not None:
            return route.unsubscribe(conn, identifier)
        return self.default.unsubscribe(conn, identifier)

    def perform(self, conn: Connection, identifier: str, data: str) -> CommandResult:
        return self.default.perform(conn, identifier, data)

    def disconnect(self, conn: Connection, subscriptions: list[str], istates: dict[str, dict[str, str]]) -> None:
        self.default.disconnect(conn, subscriptions, istates)
