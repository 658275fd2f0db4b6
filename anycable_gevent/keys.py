"""Derived secrets: the keys anycable-go computes from the one application secret.

Both ends of every authenticated channel derive the same key from ``--secret`` (the
server, anycable-rails, serverless-js, and this package's application kit and
publisher), so one shared secret configures them all. Stdlib only: safe to import from
any WSGI stack.
"""

from __future__ import annotations

import hashlib
import hmac

#: Phrase of the HTTP RPC secret (``Authorization: Bearer <key>`` on RPC calls).
RPC_PHRASE = "rpc-cable"
#: Phrase of the HTTP broadcast key (``Authorization: Bearer <key>`` on ``/_broadcast``).
BROADCAST_PHRASE = "broadcast-cable"


def derive_key(secret: str, phrase: str) -> str:
    """anycable-go's derived keys: lowercase hex HMAC-SHA256(key=secret, msg=phrase)."""
    return hmac.new(secret.encode(), phrase.encode(), hashlib.sha256).hexdigest()
