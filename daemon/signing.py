"""Standard Webhooks signatures (standardwebhooks.com), with the stdlib.

``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, keyed with the
base64 part of a ``whsec_...`` secret; several signatures are space-separated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ``ValueError`` (never echoing it) if bad."""
    raw = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not a whsec_<base64> secret") from None
    if not key:
        raise ValueError("is empty")
    return key


def sign(key: bytes, event_id: str, timestamp: int, body: str) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    digest = hmac.new(key, f"{event_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Sequence[bytes], event_id: str, timestamp: int, body: str) -> str:
    """One signature per key, space-separated (secret rotation)."""
    return " ".join(sign(key, event_id, timestamp, body) for key in keys)
