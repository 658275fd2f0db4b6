"""Controller interface: who decides whether a connection or a subscription is accepted.

A controller answers AnyCable's three RPC questions (connect, command, disconnect).
The HTTP RPC backend is one implementation; the RPC-less features (JWT, public
connections, signed/public streams, Turbo Streams) are others, combined by
:class:`~anycable_gevent.controllers.chain.ControllerChain`.

Concurrency contract: every method is called from the connection's own greenlet, one
call at a time per connection; a method may block (an HTTP call yields to the hub).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class Status(enum.IntEnum):
    """AnyCable RPC status (numeric on the wire)."""

    ERROR = 0
    SUCCESS = 1
    FAILURE = 2


class Interest(enum.IntEnum):
    """Whether the controller wants a Disconnect call for this connection (SPEC §8.5)."""

    NONE = -1
    UNKNOWN = 0


@dataclass
class Env:
    """The request environment an RPC backend sees (SPEC §8.3)."""

    url: str
    headers: dict[str, str]
    cstate: dict[str, str] = field(default_factory=dict)
    istate: dict[str, str] | None = None


@dataclass
class ConnectResult:
    status: Status
    identifiers: str = ""
    transmissions: list[str] = field(default_factory=list)
    #: Connection state changes (``env.cstate`` of the reply).
    cstate: dict[str, str] | None = None
    error: str = ""
    interest: Interest = Interest.UNKNOWN
    #: JWT expiry (Unix seconds) when the identity came from a token; checked on restore.
    expires_at: int = 0


@dataclass
class Presence:
    type: str
    id: str
    info: Any = None


@dataclass
class CommandResult:
    status: Status
    transmissions: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    stopped_streams: list[str] = field(default_factory=list)
    stop_streams: bool = False
    disconnect: bool = False
    #: Channel state changes for this identifier (``env.istate``).
    istate: dict[str, str] | None = None
    #: Connection state changes (``env.cstate``).
    cstate: dict[str, str] | None = None
    presence: Presence | None = None
    error: str = ""
    interest: Interest = Interest.UNKNOWN


@dataclass
class Connection:
    """What a controller knows about a connection when it is asked a question."""

    sid: str
    env: Env
    identifiers: str = ""
    #: Query parameters of the connection URL (the last value of a repeated key wins).
    query: dict[str, str] = field(default_factory=dict)


class Controller(ABC):
    """The default controller at the end of the chain (RPC backend or the null one)."""

    def start(self) -> None:
        """Acquire resources (called in the worker, after fork)."""

    def shutdown(self, timeout: float) -> None:
        """Finish in-flight work within ``timeout`` seconds."""

    def announce(self) -> str:
        return type(self).__name__

    @abstractmethod
    def connect(self, conn: Connection) -> ConnectResult:
        """Authenticate a new connection."""

    @abstractmethod
    def subscribe(self, conn: Connection, identifier: str) -> CommandResult:
        """Subscribe to a channel."""

    @abstractmethod
    def unsubscribe(self, conn: Connection, identifier: str) -> CommandResult:
        """Unsubscribe from a channel."""

    @abstractmethod
    def perform(self, conn: Connection, identifier: str, data: str) -> CommandResult:
        """Run a channel action."""

    @abstractmethod
    def disconnect(self, conn: Connection, subscriptions: list[str], istates: dict[str, dict[str, str]]) -> None:
        """Tell the backend that an authenticated connection went away."""


class Identifier(ABC):
    """Connect-time identification without RPC (JWT, public). ``None`` = not mine."""

    @abstractmethod
    def identify(self, conn: Connection) -> ConnectResult | None: ...


class ChannelController(ABC):
    """A channel served without RPC ($pubsub, Turbo Streams, CableReady)."""

    @abstractmethod
    def subscribe(self, conn: Connection, identifier: str, params: dict[str, Any]) -> CommandResult | None:
        """``None`` = decline (the default controller is asked instead)."""

    def unsubscribe(self, conn: Connection, identifier: str) -> CommandResult:
        return CommandResult(Status.SUCCESS, stop_streams=True, interest=Interest.NONE)
