"""Webhook signing secrets: made, kept encrypted at rest, and used to sign
each delivery the Standard Webhooks way."""

from __future__ import annotations

import base64
import os
import secrets
import uuid
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from standardwebhooks import Webhook

from service.config import Config

SECRET_PREFIX = "whsec_"  # noqa: S105  # why: the Standard Webhooks prefix, not a secret
# Standard Webhooks secrets are 24 to 64 random bytes; 32 is what we make.
SECRET_BYTES = 32
NONCE_BYTES = 12


class SecretBox:
    """Encrypts webhook signing secrets at rest with AES-256-GCM.

    Signing needs the secret itself, so it cannot be hashed like a service
    key; the database holds nonce + ciphertext, and the key lives only in
    the service's configuration. The webhook's id is the associated data,
    so a ciphertext copied onto another webhook does not decrypt."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("TOKENLEDGER_WEBHOOK_SECRET_KEY must be 32 bytes in base64")
        self._aead = AESGCM(key)

    @classmethod
    def from_config(cls, config: Config) -> SecretBox | None:
        if not config.webhook_secret_key:
            return None
        try:
            key = base64.b64decode(config.webhook_secret_key, validate=True)
        except ValueError:
            raise ValueError("TOKENLEDGER_WEBHOOK_SECRET_KEY must be base64") from None
        return cls(key)

    def seal(self, webhook_id: uuid.UUID, secret: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), webhook_id.bytes)

    def open(self, webhook_id: uuid.UUID, sealed: bytes) -> str:
        try:
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], webhook_id.bytes)
        except InvalidTag:
            raise AssertionError(
                f"webhook {webhook_id}: its secret does not decrypt with the configured key"
            ) from None
        return plain.decode()


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value: `v1,<base64 HMAC-SHA256>` of
    "{msg_id}.{timestamp}.{body}" keyed by the secret's bytes."""
    return Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)
