"""Service keys as records: making one, checking the shape of one presented or
configured, and finding its principal in the database.

A key is `tlk_<prefix>_<secret>`; the database keeps only the SHA-256 of the
whole secret, found by its prefix (service/sql, `authenticate_key`).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from service.auth.principal import Principal

KEY_PREFIX = "tlk_"


@dataclass(frozen=True, slots=True)
class NewKey:
    id: uuid.UUID
    prefix: str
    secret: str
    secret_hash: bytes


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_key() -> NewKey:
    """A fresh key: `tlk_<8 hex prefix>_<256-bit secret>`."""
    prefix = secrets.token_hex(4)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(uuid.uuid4(), prefix, secret, hash_secret(secret))


# A configured key's secret part must be at least this long: new_key() makes
# 43 characters (256 bits) and a bootstrap key is an admin key.
MIN_SECRET_CHARS = 40


def check_strong(secret: str, setting: str) -> None:
    """A key given in configuration must be a tlk_ key with a secret as long
    as a generated one's and not one repeated character."""
    rest = secret[len(KEY_PREFIX) + 9 :]
    if not well_formed(secret) or len(rest) < MIN_SECRET_CHARS or len(set(rest)) < 16:
        raise ValueError(
            f"{setting} must be a tlk_<8 hex>_<secret> key with a random secret of "
            f"{MIN_SECRET_CHARS}+ characters; make one with "
            "`python -c 'from service.auth import new_key; print(new_key().secret)'`"
        )


# The shape of a key this service makes: tlk_, 8 hex digits, _, the secret in
# URL-safe base64 (43 characters from new_key(); a configured one has at
# least MIN_SECRET_CHARS). A token of any other shape is refused without a
# database look-up.
_KEY_SHAPE = re.compile(r"^tlk_[0-9a-f]{8}_[A-Za-z0-9_-]{40,128}$")


def parse_key(token: str) -> tuple[str, bytes] | None:
    """(prefix, hash) of a presented service key, or None if it is not one."""
    if not token.startswith(KEY_PREFIX):
        return None
    prefix, sep, rest = token[len(KEY_PREFIX) :].partition("_")
    if not sep or len(prefix) != 8 or not rest:
        return None
    return prefix, hash_secret(token)


def well_formed(token: str) -> bool:
    """Whether a tlk_ token could be a key this service made."""
    return _KEY_SHAPE.match(token) is not None


async def look_up_key(ledger: Any, parsed: tuple[str, bytes]) -> Principal | None:
    """The key's principal from the database; None when it is unknown or revoked."""
    row = await ledger.fetchrow("authenticate_key", parsed[0], parsed[1])
    if row is None:
        return None
    return Principal(
        id=f"key:{row['id']}",
        roles=frozenset({row["role"]}),
        name=row["name"],
        sources=None if row["sources"] is None else frozenset(row["sources"]),
        account_types=None if row["account_types"] is None else frozenset(row["account_types"]),
        departments=None if row["departments"] is None else tuple(sorted(row["departments"])),
        rate_limit=row["rate_limit"],
    )
