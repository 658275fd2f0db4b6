"""Channels served without RPC: ``$pubsub`` signed/public streams, Turbo Streams, CableReady."""

from __future__ import annotations

from typing import Any

from anycable_gevent import protocol, signer
from anycable_gevent.controllers.base import (
    ChannelController,
    CommandResult,
    Connection,
    Interest,
    Status,
)


def _reject(identifier: str) -> CommandResult:
    return CommandResult(Status.FAILURE, transmissions=[protocol.reject(identifier)], interest=Interest.NONE)


def _confirm(identifier: str, stream: str, istate: dict[str, str] | None = None) -> CommandResult:
    return CommandResult(
        Status.SUCCESS,
        transmissions=[protocol.confirm(identifier)],
        streams=[stream],
        istate=istate,
        interest=Interest.NONE,
    )


class PubSubChannel(ChannelController):
    """``{"channel":"$pubsub","signed_stream_name":…}`` or ``"stream_name"`` (SPEC §9.2)."""

    def __init__(self, secret: str, public: bool, whisper: bool, presence: bool) -> None:
        self.secret = secret
        self.public = public
        self.whisper = whisper
        self.presence = presence

    def subscribe(self, conn: Connection, identifier: str, params: dict[str, Any]) -> CommandResult:
        signed = params.get("signed_stream_name")
        name = params.get("stream_name")
        public = False
        if isinstance(signed, str) and signed:
            stream = signer.verify(signed, self.secret)
        elif isinstance(name, str) and name and self.public:
            stream, public = name, True
        else:
            stream = None
        if not stream:
            return _reject(identifier)
        istate: dict[str, str] = {}
        if self.whisper or public:
            istate[protocol.WHISPER_STATE_KEY] = stream
        if self.presence or public:
            istate[protocol.PRESENCE_STATE_KEY] = stream
        return _confirm(identifier, stream, istate or None)


class SignedChannel(ChannelController):
    """Turbo::StreamsChannel (field ``signed_stream_name``) or CableReady::Stream (``identifier``)."""

    def __init__(self, secret: str, field: str) -> None:
        self.secret = secret
        self.field = field

    def subscribe(self, conn: Connection, identifier: str, params: dict[str, Any]) -> CommandResult:
        signed = params.get(self.field)
        stream = signer.verify(signed, self.secret) if isinstance(signed, str) and signed else None
        if not stream:
            return _reject(identifier)
        return _confirm(identifier, stream)
