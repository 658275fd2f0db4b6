"""AnyCable HTTP RPC on the backend side: request parsing and the frames a backend sends.

Requests are checked field by field against SPEC §8.3. ``null`` stands for a missing
value everywhere (anycable-go omits empty fields; other servers send ``null``), unknown
fields are ignored, and a wrong type is a :class:`BadRequest` naming the field. What the
*client* put inside strings (the channel identifier, the action data) is not checked
here: that is the application's business, answered with a FAILURE status, not an HTTP
error.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from anycable_gevent.application.state import encode

#: The RPC commands a server sends to ``/command``.
COMMANDS = ("subscribe", "unsubscribe", "message")


class Status(enum.IntEnum):
    """RPC status, numeric on the wire."""

    ERROR = 0
    SUCCESS = 1
    FAILURE = 2


class DisconnectReason:
    """Reasons of ``{"type":"disconnect"}`` frames that clients understand (SPEC §3.11).

    A connection rejected with ``reconnect: false`` stays closed in the official JS client;
    ``token_expired`` makes it refresh its token first.
    """

    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    INVALID_REQUEST = "invalid_request"
    SERVER_RESTART = "server_restart"
    REMOTE = "remote"


class BadRequest(ValueError):
    """An RPC request that does not have SPEC §8.3's shape (answered with HTTP 422)."""


# ---------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Env:
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    cstate: dict[str, str] = field(default_factory=dict)
    #: Command: this subscription's flat map. Disconnect: identifier -> JSON-encoded flat map.
    istate: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectRequest:
    env: Env


@dataclass(frozen=True)
class CommandRequest:
    command: str
    identifier: str
    connection_identifiers: str
    data: str
    env: Env


@dataclass(frozen=True)
class DisconnectRequest:
    identifiers: str
    subscriptions: list[str]
    env: Env


def _str(obj: Mapping[str, Any], key: str, where: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{where}{key} must be a string, not {_kind(value)}")
    return value


def _str_map(obj: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}{key} must be an object, not {_kind(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if v is None:
            continue
        if not isinstance(v, str):
            raise BadRequest(f"{where}{key}[{k!r}] must be a string, not {_kind(v)}")
        out[k] = v
    return out


def _env(obj: Mapping[str, Any]) -> Env:
    value = obj.get("env")
    if value is None:
        return Env()
    if not isinstance(value, dict):
        raise BadRequest(f"env must be an object, not {_kind(value)}")
    return Env(
        url=_str(value, "url", "env."),
        headers=_str_map(value, "headers", "env."),
        cstate=_str_map(value, "cstate", "env."),
        istate=_str_map(value, "istate", "env."),
    )


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_kind(body)}")
    return body


def parse_connect(body: Any) -> ConnectRequest:
    """Raises: BadRequest."""
    return ConnectRequest(_env(_object(body)))


def parse_command(body: Any) -> CommandRequest:
    """Raises: BadRequest (also for an unknown command, a missing identifier, a message without data)."""
    obj = _object(body)
    command = _str(obj, "command")
    if command not in COMMANDS:
        raise BadRequest(f"command must be one of {', '.join(COMMANDS)}, not {command[:40]!r}")
    identifier = _str(obj, "identifier")
    if not identifier:
        raise BadRequest("identifier is missing")
    data = _str(obj, "data")
    if command == "message" and "data" not in obj:
        raise BadRequest("a message command needs data")
    return CommandRequest(command, identifier, _str(obj, "connection_identifiers"), data, _env(obj))


def parse_disconnect(body: Any) -> DisconnectRequest:
    """Raises: BadRequest."""
    obj = _object(body)
    subscriptions = obj.get("subscriptions")
    if subscriptions is None:
        subscriptions = []
    if not isinstance(subscriptions, list) or not all(isinstance(s, str) for s in subscriptions):
        raise BadRequest("subscriptions must be a list of strings")
    return DisconnectRequest(_str(obj, "identifiers"), subscriptions, _env(obj))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


# ---------------------------------------------------------------------- frames


def welcome(sid: str) -> str:
    """The welcome; with a sid, the server can restore the session later (SPEC §4.2)."""
    return encode({"type": "welcome", "sid": sid} if sid else {"type": "welcome"})


def disconnect(reason: str, reconnect: bool) -> str:
    return encode({"type": "disconnect", "reason": reason, "reconnect": reconnect})


def subscription(identifier: str, confirmed: bool) -> str:
    kind = "confirm_subscription" if confirmed else "reject_subscription"
    return encode({"identifier": identifier, "type": kind})


def channel_message(identifier: str, message: Any) -> str:
    return encode({"identifier": identifier, "message": message})
