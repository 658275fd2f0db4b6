"""Connect-time identification without RPC: JWT tokens and public (``--noauth``) connections."""

from __future__ import annotations

import warnings

import jwt

from anycable_gevent import protocol
from anycable_gevent.controllers.base import Connection, ConnectResult, Identifier, Interest, Status


def _failure(reason: str) -> ConnectResult:
    return ConnectResult(
        Status.FAILURE,
        transmissions=[protocol.disconnect(reason, False)],
        error=reason,
        interest=Interest.NONE,
    )


class JWTIdentifier(Identifier):
    """AnyCable JWT identification (SPEC §9.3): HMAC-signed token with ``ext`` identifiers."""

    ALGORITHMS = ["HS256", "HS384", "HS512"]

    def __init__(self, secret: str, param: str, enforce: bool) -> None:
        self.secret = secret
        self.param = param
        self.header = "x-" + param.lower()
        self.enforce = enforce
        # anycable-go accepts any HMAC key length; a short key is reported once in the
        # startup banner instead of a Python warning on every decode.
        warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)

    def token(self, conn: Connection) -> str:
        return conn.env.headers.get(self.header) or conn.query.get(self.param, "")

    def identify(self, conn: Connection) -> ConnectResult | None:
        token = self.token(conn)
        if not token:
            return _failure(protocol.UNAUTHORIZED) if self.enforce else None
        try:
            claims = jwt.decode(token, self.secret, algorithms=self.ALGORITHMS, options={"require": []})
        except jwt.ExpiredSignatureError:
            return _failure(protocol.TOKEN_EXPIRED)
        except jwt.PyJWTError:
            return _failure(protocol.UNAUTHORIZED)
        ext = claims.get("ext")
        if not isinstance(ext, str):
            return ConnectResult(Status.ERROR, error="JWT ext claim must be a string", interest=Interest.NONE)
        exp = claims.get("exp")
        return ConnectResult(
            Status.SUCCESS,
            identifiers=ext,
            transmissions=[protocol.welcome(conn.sid)],
            interest=Interest.NONE,
            expires_at=int(exp) if isinstance(exp, int | float) else 0,
        )


class PublicIdentifier(Identifier):
    """``--noauth`` / ``--public``: everybody is welcome, identified by their sid."""

    def identify(self, conn: Connection) -> ConnectResult | None:
        return ConnectResult(
            Status.SUCCESS,
            identifiers=protocol.dumps({"sid": conn.sid}),
            transmissions=[protocol.welcome(conn.sid)],
            interest=Interest.NONE,
        )
