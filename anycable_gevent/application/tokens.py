"""Credentials the server checks without RPC: JWT identification tokens and signed stream names.

* :func:`issue_token` mints what the server's JWT identification accepts (SPEC §9.3):
  HS256, the connection identifiers as a JSON string in ``ext``, and ``exp``. The client
  connects with ``?jid=<token>`` (or the ``x-jid`` header); the server then identifies it
  with no Connect call, and later Command calls carry those identifiers.
* :func:`sign_stream` signs a stream name the way Rails' ``MessageVerifier`` does
  (``base64(json)--hexdigest``, SPEC §9.2), for ``cable.streamFromSigned(name)`` or for
  :meth:`~anycable_gevent.application.handles.ChannelHandle.stream_from_signed`.

PyJWT is imported only when a token is minted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from anycable_gevent import signer
from anycable_gevent.application.state import encode


def issue_token(
    identifiers: Mapping[str, Any] | str,
    secret: str,
    *,
    expires_in: float = 3600,
    clock: Callable[[], float] = time.time,
) -> str:
    """A JWT for ``identifiers`` (a mapping, JSON-encoded like Connect's, or the exact string), valid ``expires_in`` s.

    ``secret`` is the server's ``--jwt_secret`` (default: its ``--secret``).
    """
    if not secret:
        raise ValueError("issue_token needs the server's JWT secret")
    if expires_in <= 0:
        raise ValueError("expires_in must be positive")
    import jwt

    ext = identifiers if isinstance(identifiers, str) else encode(dict(identifiers))
    # no "iat": verifiers (PyJWT, used by the server) refuse an iat in the future, so a
    # backend clock slightly ahead of the server's would make fresh tokens fail
    return jwt.encode({"ext": ext, "exp": int(clock()) + int(expires_in)}, secret, algorithm="HS256")


def sign_stream(stream: str, secret: str) -> str:
    """``stream`` signed with ``secret`` (the server's ``--streams_secret``, default ``--secret``)."""
    if not secret:
        raise ValueError("sign_stream needs the server's streams secret")
    if not stream:
        raise ValueError("sign_stream needs a non-empty stream name")
    return signer.sign(stream, secret)


def verify_stream(signed: str, secret: str) -> str | None:
    """The stream name inside ``signed``, or ``None`` when the signature is not valid."""
    return signer.verify(signed, secret)
