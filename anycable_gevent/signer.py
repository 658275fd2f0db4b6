"""Rails ``ActiveSupport::MessageVerifier`` (SHA256, JSON) for signed stream names."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json


def sign(value: str, secret: str) -> str:
    """``base64(json(value)) + "--" + hex(HMAC-SHA256(secret, base64 part))``, as Rails does."""
    encoded = base64.b64encode(json.dumps(value).encode()).decode()
    digest = hmac.new(secret.encode(), encoded.encode(), hashlib.sha256).hexdigest()
    return f"{encoded}--{digest}"


def verify(signed: str, secret: str) -> str | None:
    """The signed string, or ``None`` when the signature or the payload is not valid."""
    if not secret:
        return None
    parts = signed.split("--")
    if len(parts) != 2:
        return None
    encoded, digest = parts
    expected = hmac.new(secret.encode(), encoded.encode(), hashlib.sha256).hexdigest()
    # bytes: compare_digest refuses non-ASCII str, and the digest comes from the client.
    # Lowercase hex only, as Rails and anycable-go compare it: one spelling per signed name.
    if not hmac.compare_digest(expected.encode(), digest.encode()):
        return None
    try:
        value = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        return None
    return value if isinstance(value, str) else None
