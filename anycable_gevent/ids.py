"""Session ids: the bearer credential of a connection, so only the server makes them."""

from __future__ import annotations

import base64
import os

_SID_BYTES = 18
_entropy = b""
_entropy_pos = 0


def _forget_entropy() -> None:
    # a forked child must never hand out the parent's pre-drawn bytes
    global _entropy, _entropy_pos
    _entropy, _entropy_pos = b"", 0


os.register_at_fork(after_in_child=_forget_entropy)


def new_sid() -> str:
    """A session id: 144 random bits from the OS CSPRNG, URL-safe, never taken from the request.

    Random bytes are drawn from ``os.urandom`` 512 sids at a time (one system call
    instead of one per connection); the pool is discarded in a forked child.
    """
    global _entropy, _entropy_pos
    pos = _entropy_pos
    if pos + _SID_BYTES > len(_entropy):
        _entropy, pos = os.urandom(_SID_BYTES * 512), 0
    _entropy_pos = pos + _SID_BYTES
    return base64.urlsafe_b64encode(_entropy[pos : pos + _SID_BYTES]).decode()
