"""Who is calling, and what they may do: one guard layer for every /v1 route.

Two kinds of callers present `Authorization: Bearer <token>`:

* **Service keys** (`tlk_<prefix>_<secret>`) for HR tools, finance tools and
  metering services. The database keeps only the SHA-256 of the secret. A
  replica remembers a key it has verified for at most a second (`KeyCache`),
  so the hot path costs no round trip to authenticate; a revocation reaches
  every replica at once by NOTIFY, and within that second even when the
  notification channel is silently broken.
* **Employee tokens**: JWTs from the company's identity provider, verified
  against configured keys with pinned algorithms (RS256/ES256 for a JWKS file
  or PEM keys, HS256 for a shared secret), requiring `exp`, `iss`, `aud` and
  `sub`. `sub` is the employee id; an optional claim adds roles.

Every route declares who may call it, and one guard decides (`guard` says
how); an employee reaches only their own wallet and what hangs off it.

The modules, each one responsibility:

* `principal`: `Principal`, the authenticated caller;
* `keys`: service keys as records (making, shape, hashing, look-up);
* `key_cache`: `KeyCache` and the `KeyListener` that clears it by NOTIFY;
* `employee_tokens`: `JwtVerifier`;
* `guard`: the route rules (`access`, `public`) and `authorize`.

Callers import from `service.auth`; the names below are its interface.
"""

from service.auth.employee_tokens import JwtVerifier
from service.auth.guard import (
    PUBLIC,
    Access,
    access,
    authenticate,
    authorize,
    bearer,
    public,
    unauthenticated,
)
from service.auth.key_cache import KEYS_CHANNEL, KeyCache, KeyListener
from service.auth.keys import (
    KEY_PREFIX,
    NewKey,
    check_strong,
    hash_secret,
    new_key,
    parse_key,
    well_formed,
)
from service.auth.principal import Principal

__all__ = [
    "KEYS_CHANNEL",
    "KEY_PREFIX",
    "PUBLIC",
    "Access",
    "JwtVerifier",
    "KeyCache",
    "KeyListener",
    "NewKey",
    "Principal",
    "access",
    "authenticate",
    "authorize",
    "bearer",
    "check_strong",
    "hash_secret",
    "new_key",
    "parse_key",
    "public",
    "unauthenticated",
    "well_formed",
]
