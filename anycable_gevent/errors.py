"""Exception hierarchy: one root, one subclass per layer (callers catch by layer)."""

from __future__ import annotations


class AnyCableError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(AnyCableError):
    """A bad option value or an impossible combination; reported before anything starts."""


class ProtocolError(AnyCableError):
    """A client frame that cannot be understood (dropped and counted, never fatal)."""


class MessageTooBig(ProtocolError):
    """A client frame over ``--max_message_size`` (closes the socket with 1009)."""


class BrokerError(AnyCableError):
    """The broker could not serve a request."""


class HistoryError(BrokerError):
    """A history request that must be answered with ``reject_history``."""


class RPCError(AnyCableError):
    """The RPC backend failed (transport error, timeout, bad response)."""
