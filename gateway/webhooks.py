"""Webhook keys and signatures, as Standard Webhooks specifies them (https://www.standardwebhooks.com).

One server secret (SEGSERVE_WEBHOOK_SECRET, a ``whsec_`` key) derives each API key's own signing key, so a
receiver verifies with the key its caller got from GET /v1/webhooks/secret and no caller can sign for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime

from standardwebhooks import Webhook

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signing_key(server_secret: str, owner: str) -> str:
    """The ``whsec_`` key that signs the deliveries of ``owner``'s jobs ("" when API keys are off)."""
    try:
        root = base64.b64decode(server_secret.removeprefix(PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError("SEGSERVE_WEBHOOK_SECRET is not a whsec_ key (whsec_ and base64)") from exc
    if len(root) < 16:
        raise ValueError("SEGSERVE_WEBHOOK_SECRET is too short: use at least 16 random bytes")
    derived = hmac.new(root, b"segserve webhook key for " + owner.encode(), hashlib.sha256).digest()
    return PREFIX + base64.b64encode(derived).decode()


def signed_headers(key: str, message_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The headers of one delivery attempt: the same id every time, a fresh timestamp and signature."""
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(key).sign(message_id, at, body.decode()),
    }
