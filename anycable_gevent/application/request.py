"""The WebSocket request as an RPC backend sees it (``env`` of SPEC §8.3).

The server forwards the connection URL and the headers listed in its ``--headers``
option (``cookie`` by default; only the cookies of ``--proxy-cookies`` when that is
set), plus the client address as the pseudo-header ``REMOTE_ADDR``. Nothing else of the
browser's request reaches the backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import parse_qsl, urlsplit

#: The pseudo-header carrying the client's address.
REMOTE_ADDR = "REMOTE_ADDR"


@dataclass(frozen=True)
class Request:
    """Read-only view of the connection request.

    ``headers`` has lower-case names and no ``REMOTE_ADDR`` (see :attr:`remote_addr`).
    """

    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    remote_addr: str = ""

    @classmethod
    def from_env(cls, url: str, headers: Mapping[str, str]) -> Request:
        remote = ""
        names: dict[str, str] = {}
        for name, value in headers.items():
            if name == REMOTE_ADDR:
                remote = value
            else:
                names[name.lower()] = value
        return cls(url, names, remote)

    @cached_property
    def path(self) -> str:
        return urlsplit(self.url).path

    @cached_property
    def params(self) -> Mapping[str, str]:
        """Query parameters of the URL; the last value of a repeated name wins (as in the server)."""
        return dict(parse_qsl(urlsplit(self.url).query, keep_blank_values=True))

    @cached_property
    def cookies(self) -> Mapping[str, str]:
        """Cookies of the ``cookie`` header, values as sent (not URL-decoded); the first of a repeated name wins.

        Browsers send the most specific cookie first (RFC 6265 §5.4), hence first-wins.
        """
        jar: dict[str, str] = {}
        for part in self.headers.get("cookie", "").split(";"):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not name or name in jar:
                continue
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            jar[name] = value
        return jar
