"""Exception hierarchy: one root, one subclass per layer (callers catch by layer)."""

from __future__ import annotations

#: Exit code of a bad configuration (or a port that cannot be bound): not worth a restart.
EXIT_CONFIG = 2
#: Exit code of a worker that failed before it served: the master stops instead of respawning.
EXIT_BOOT = 3


class AnyCableError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(AnyCableError):
    """A bad option value or an impossible combination; reported before anything starts."""


class ProtocolError(AnyCableError):
    """A client frame that cannot be understood (dropped and counted, never fatal)."""


class ConnectionFailure(ProtocolError):
    """The client broke RFC 6455 or a connection limit: the server closes with :attr:`code`.

    ``resync`` says how many unread bytes of the offending frame follow (so that frames
    can be parsed again while the close handshake completes), or -1 when frame
    boundaries are lost and the rest of the input can only be discarded.
    """

    code = 1002
    reason = "Protocol error"
    #: the counter incremented for this failure ('' = none)
    counter = ""

    def __init__(self, message: str, resync: int = -1) -> None:
        super().__init__(message)
        self.resync = resync


class MessageTooBig(ConnectionFailure):
    """A client message over ``--max_message_size`` (1009)."""

    code = 1009
    reason = "Message too big"
    counter = "ws_message_too_big_total"


class TooManyFragments(ConnectionFailure):
    """A fragmented client message of more than ``--ws_max_fragments`` frames (1008)."""

    code = 1008
    reason = "Too many fragments"
    counter = "ws_fragment_limit_total"


class FrameTimeout(ConnectionFailure):
    """A frame (or fragmented message) not finished within ``--ws_frame_timeout`` (1008)."""

    code = 1008
    reason = "Frame timeout"
    counter = "ws_frame_timeouts_total"


class InvalidText(ConnectionFailure):
    """A text message that is not UTF-8 (1007, RFC 6455 §8.1)."""

    code = 1007
    reason = "Invalid UTF-8"


class BrokerError(AnyCableError):
    """The broker could not serve a request."""


class HistoryError(BrokerError):
    """A history request that must be answered with ``reject_history``."""


class RPCError(AnyCableError):
    """The RPC backend failed (transport error, timeout, bad response)."""
