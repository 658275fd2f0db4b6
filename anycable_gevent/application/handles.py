"""What channel code works with during one RPC call: a connection handle and a channel handle.

A handle collects the application's decisions (identifiers, rejections, streams,
transmissions, state changes, presence) and :mod:`~anycable_gevent.application.app`
turns them into the RPC reply. Handles live for one request and are not thread-safe;
nothing in them is shared between requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from anycable_gevent import signer
from anycable_gevent.application.protocol import DisconnectReason, channel_message
from anycable_gevent.application.request import Request
from anycable_gevent.application.state import State, encode

#: Channel state keys the server reads itself (SPEC §4.8): the whisper and presence streams.
WHISPER_KEY = "$w"
PRESENCE_KEY = "$p"


def decode_identifiers(raw: str) -> dict[str, Any]:
    """Connection identifiers as a dict: ``{}`` when empty or not a JSON object (e.g. a JWT ``ext`` of another shape)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class PresenceChange:
    """A join or leave asked for by the channel (``presence`` of the Command reply)."""

    type: str
    id: str
    info: Any = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id}
        if self.type == "join" and self.info is not None:
            out["info"] = encode(self.info)  # the RPC carries info JSON-encoded
        return out


class ConnectionHandle:
    """One connection during a Connect, Command or Disconnect call.

    Attributes:
        sid: the server's session id (``x-anycable-meta-sid``); ``""`` if the server sent none.
        request: the WebSocket request (URL, headers, cookies, address, query params).
        identifiers: who is connected, as given to :meth:`identified_by` at connect time.
        raw_identifiers: the identifiers string exactly as the server holds it.
        state: connection state (AnyCable ``cstate``), kept by the server for the
            connection's lifetime and restored with its session.
    """

    def __init__(
        self, sid: str, request: Request, raw_identifiers: str = "", cstate: dict[str, str] | None = None
    ) -> None:
        self.sid = sid
        self.request = request
        self.raw_identifiers = raw_identifiers
        self.identifiers: dict[str, Any] = decode_identifiers(raw_identifiers)
        self.state = State(cstate)
        self.transmissions: list[str] = []
        self.rejected = False
        self.reject_reason = DisconnectReason.UNAUTHORIZED
        self.reject_reconnect = False
        self.closed = False

    def identified_by(self, **identifiers: Any) -> None:
        """Accept the connection as these identifiers (JSON values; e.g. ``user_id=42``).

        They come back in every later call (``handle.identifiers``) and name the
        connection for remote disconnects. Not calling it accepts an anonymous connection.
        """
        self.identifiers = dict(identifiers)
        self.raw_identifiers = encode(self.identifiers) if identifiers else ""

    def reject(self, reason: str = DisconnectReason.UNAUTHORIZED, *, reconnect: bool = False) -> None:
        """Refuse the connection: the client gets ``{"type":"disconnect","reason":…}`` and is closed."""
        self.rejected = True
        self.reject_reason = reason
        self.reject_reconnect = reconnect

    def transmit(self, message: Any) -> None:
        """Send a frame to this client: a string as is, anything else JSON-encoded.

        Raises:
            TypeError: ``message`` is not JSON-serializable.
        """
        self.transmissions.append(message if isinstance(message, str) else encode(message))

    def close(self) -> None:
        """Close the connection after this command (``disconnect: true`` in the reply)."""
        self.closed = True


class ChannelHandle:
    """One subscription during a subscribe, message or unsubscribe command (or a disconnect).

    Attributes:
        identifier: the subscription identifier, as the client sent it.
        params: the identifier's fields other than ``channel`` (e.g. ``{"room": "42"}``).
        connection: the connection handle (identifiers, cstate, request, close).
        state: channel state (AnyCable ``istate``): kept by the server for this
            subscription between commands, seen again in ``unsubscribed``.
    """

    def __init__(
        self,
        connection: ConnectionHandle,
        identifier: str,
        params: dict[str, Any],
        istate: dict[str, str] | None = None,
        streams_secret: str = "",
    ) -> None:
        self.connection = connection
        self.identifier = identifier
        self.params = params
        self.state = State(istate, reserved="$")
        self.transmissions: list[str] = []
        self.streams: list[str] = []
        self.stopped_streams: list[str] = []
        self.stop_streams = False
        self.rejected = False
        self.presence: PresenceChange | None = None
        self._streams_secret = streams_secret
        self._server_state = {k: v for k, v in (istate or {}).items() if k in (WHISPER_KEY, PRESENCE_KEY) and v}
        self._server_changes: dict[str, str] = {}

    # ------------------------------------------------------------------ shortcuts
    @property
    def identifiers(self) -> dict[str, Any]:
        return self.connection.identifiers

    @property
    def sid(self) -> str:
        return self.connection.sid

    @property
    def request(self) -> Request:
        return self.connection.request

    # ------------------------------------------------------------------ decisions
    def reject(self) -> None:
        """Refuse the subscription (subscribe: ``reject_subscription``; other commands: FAILURE)."""
        self.rejected = True

    def transmit(self, message: Any) -> None:
        """Send ``message`` (any JSON value) to this subscription only.

        Raises:
            TypeError: ``message`` is not JSON-serializable.
        """
        self.transmissions.append(channel_message(self.identifier, message))

    def stream_from(self, stream: str, *, whisper: bool = False) -> None:
        """Deliver the broadcasts of ``stream`` to this subscription.

        ``whisper=True`` also makes it the subscription's whisper stream: the client's
        ``whisper`` commands are relayed to the stream's other subscribers (ext protocol).
        """
        if not isinstance(stream, str) or not stream:
            raise ValueError("stream_from needs a non-empty stream name")
        if stream not in self.streams:
            self.streams.append(stream)
        if whisper:
            self._set_server_state(WHISPER_KEY, stream)

    def stream_from_signed(self, signed: str, *, whisper: bool = False) -> str | None:
        """Verify a signed stream name (see :func:`~anycable_gevent.application.tokens.sign_stream`)
        and stream from it. The stream name, or ``None`` (nothing done) when the signature
        is not valid or the application has no streams secret.
        """
        stream = signer.verify(signed, self._streams_secret) if isinstance(signed, str) else None
        if stream:
            self.stream_from(stream, whisper=whisper)
        return stream or None

    def stop_stream_from(self, stream: str) -> None:
        """Stop delivering ``stream`` to this subscription (and stop whispering on it)."""
        if stream in self.streams:
            self.streams.remove(stream)
        if stream not in self.stopped_streams:
            self.stopped_streams.append(stream)
        if self.whisper_stream == stream:
            self._set_server_state(WHISPER_KEY, "")

    def stop_all_streams(self) -> None:
        """Stop every stream of this subscription (streams started after this call stay)."""
        self.stop_streams = True
        self.streams.clear()
        self.stopped_streams.clear()
        if self.whisper_stream:
            self._set_server_state(WHISPER_KEY, "")

    def join_presence(self, id: str | int, info: Any = None, *, stream: str | None = None) -> None:
        """Join the presence set of ``stream`` as ``id`` with ``info`` (any JSON value).

        ``stream`` defaults to the subscription's presence stream, else the first stream
        started in this call. Subscribers of the stream get presence ``join`` events; the
        server leaves the set when the subscription ends.

        Raises:
            ValueError: no stream to track presence on.
        """
        target = stream or self.presence_stream or (self.streams[0] if self.streams else "")
        if not target:
            raise ValueError("join_presence needs a stream: call stream_from() first or pass stream=")
        self._set_server_state(PRESENCE_KEY, target)
        self.presence = PresenceChange("join", str(id), info)

    def leave_presence(self, id: str | int = "") -> None:
        """Leave the presence set of the subscription's presence stream."""
        self.presence = PresenceChange("leave", str(id))

    @property
    def whisper_stream(self) -> str:
        return self._server_state.get(WHISPER_KEY, "")

    @property
    def presence_stream(self) -> str:
        return self._server_state.get(PRESENCE_KEY, "")

    def _set_server_state(self, key: str, value: str) -> None:
        if value:
            self._server_state[key] = value
        else:
            self._server_state.pop(key, None)
        self._server_changes[key] = value

    def state_changes(self) -> dict[str, str]:
        """The reply's ``env.istate``: changed channel state and the server keys set in this call."""
        return {**self.state.changes(), **self._server_changes}
