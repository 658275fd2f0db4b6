"""The controller used when there is no RPC backend: it rejects what nothing else accepted."""

from __future__ import annotations

from anycable_gevent import protocol
from anycable_gevent.controllers.base import CommandResult, Connection, ConnectResult, Controller, Interest, Status


class NullController(Controller):
    """anycable-go's ``NullController`` (SPEC §9.1)."""

    def announce(self) -> str:
        return "none (connections must be identified by JWT or --noauth; channels by $pubsub/Turbo)"

    def connect(self, conn: Connection) -> ConnectResult:
        return ConnectResult(
            Status.FAILURE,
            transmissions=[protocol.disconnect(protocol.UNAUTHORIZED, False)],
            error="no RPC backend configured",
            interest=Interest.NONE,
        )

    def subscribe(self, conn: Connection, identifier: str) -> CommandResult:
        return CommandResult(Status.FAILURE, transmissions=[protocol.reject(identifier)], interest=Interest.NONE)

    def unsubscribe(self, conn: Connection, identifier: str) -> CommandResult:
        return CommandResult(Status.SUCCESS, stop_streams=True, interest=Interest.NONE)

    def perform(self, conn: Connection, identifier: str, data: str) -> CommandResult:
        return CommandResult(Status.ERROR, error="no RPC backend configured", interest=Interest.NONE)

    def disconnect(self, conn: Connection, subscriptions: list[str], istates: dict[str, dict[str, str]]) -> None:
        return None
