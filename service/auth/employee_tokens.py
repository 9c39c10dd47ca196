"""Employee tokens: JWTs from the company's identity provider, verified
against configured keys with pinned algorithms (RS256/ES256 for a JWKS file
or PEM keys, HS256 for a shared secret), requiring `exp`, `iss`, `aud` and
`sub`. `sub` is the employee id; an optional claim adds roles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import structlog

from service import errors
from service.auth.principal import Principal
from service.config import Config
from service.roles import ROLES

log = structlog.get_logger("tokenledger.auth")

JWKS_REFRESH_SECONDS = 300.0
JWKS_UNKNOWN_KID_SECONDS = 10.0


class _Rejected(Exception):
    """Why an employee token was refused: logged, never answered."""


@dataclass
class JwtVerifier:
    """Verifies employee tokens. Each configured key is bound to exactly one
    algorithm, so a token cannot choose how it is checked: `alg: none` is
    never accepted and an HS256 token signed with a public key fails."""

    issuer: str
    audience: str
    roles_claim: str
    leeway_seconds: int
    allowed_roles: frozenset[str] = frozenset({"employee"})
    keys: dict[str | None, tuple[Any, str]] = field(default_factory=dict)
    # The JWKS file is read again every JWKS_REFRESH_SECONDS, and when a token
    # names an unknown kid, at most every JWKS_UNKNOWN_KID_SECONDS: the
    # identity provider rotates keys without our restart, and a flood of
    # made-up kids costs at most one file read per interval.
    jwks_file: str | None = None
    clock: Callable[[], float] = time.monotonic
    _jwks_read_at: float = float("-inf")
    _unknown_kid_read_at: float = float("-inf")

    @classmethod
    def from_config(cls, config: Config) -> JwtVerifier | None:
        if not (config.jwt_issuer and config.jwt_audience):
            return None
        allowed = frozenset(r.strip() for r in config.jwt_allowed_roles.split(",") if r.strip())
        if not allowed <= set(ROLES):
            raise ValueError(
                f"TOKENLEDGER_JWT_ALLOWED_ROLES names unknown roles {sorted(allowed - set(ROLES))}"
                f"; known: {', '.join(ROLES)}"
            )
        verifier = cls(
            config.jwt_issuer,
            config.jwt_audience,
            config.jwt_roles_claim,
            config.jwt_leeway_seconds,
            allowed,
        )
        if config.jwt_jwks_file:
            verifier.jwks_file = config.jwt_jwks_file
            verifier.read_jwks()
        if config.jwt_public_key_file:
            verifier.add_pem(Path(config.jwt_public_key_file).read_bytes())
        if config.jwt_hs256_secret:
            if len(config.jwt_hs256_secret) < 32:
                raise ValueError("TOKENLEDGER_JWT_HS256_SECRET must be at least 32 characters")
            verifier.keys.setdefault(None, (config.jwt_hs256_secret.encode(), "HS256"))
        if not verifier.keys:
            raise ValueError("JWT issuer/audience are set but no verification key is configured")
        return verifier

    def read_jwks(self) -> None:
        """(Re)load the JWKS file: its keys replace the JWKS keys held before
        (a PEM key or HS256 secret stays). A file that cannot be read or
        parsed after start-up keeps the keys there were, and is logged."""
        assert self.jwks_file is not None
        self._jwks_read_at = self.clock()
        try:
            jwks = json.loads(Path(self.jwks_file).read_text())
        except (OSError, ValueError) as exc:
            if not self.keys:
                raise
            log.warning("jwks_unreadable", path=self.jwks_file, error=repr(exc))
            return
        fallback = self.keys.get(None)
        self.keys = {}
        self.add_jwks(jwks)
        if fallback is not None:
            self.keys.setdefault(None, fallback)

    def _refresh(self, kid: str | None) -> None:
        if self.jwks_file is None:
            return
        now = self.clock()
        unknown = (
            kid not in self.keys and now - self._unknown_kid_read_at >= JWKS_UNKNOWN_KID_SECONDS
        )
        if unknown:
            self._unknown_kid_read_at = now
        if unknown or now - self._jwks_read_at >= JWKS_REFRESH_SECONDS:
            self.read_jwks()

    def add_jwks(self, jwks: dict[str, Any]) -> None:
        for jwk in jwks.get("keys", []):
            alg = {"RSA": "RS256", "EC": "ES256"}.get(jwk.get("kty", ""))
            if alg is None or jwk.get("alg", alg) != alg:
                continue
            self.keys[jwk.get("kid")] = (jwt.PyJWK(jwk, algorithm=alg).key, alg)

    def add_pem(self, pem: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(pem)
        if isinstance(key, rsa.RSAPublicKey):
            self.keys.setdefault(None, (key, "RS256"))
        elif isinstance(key, ec.EllipticCurvePublicKey):
            self.keys.setdefault(None, (key, "ES256"))
        else:
            raise ValueError("only RSA and EC public keys are supported")

    def verify(self, token: str) -> Principal:
        """The token's principal, or 401 with the same detail whatever was
        wrong with it: why a token failed helps whoever forges one, so the
        reason goes to the log (never the token) instead."""
        try:
            return self._verify(token)
        except _Rejected as exc:
            log.info("token_rejected", reason=str(exc))
            raise errors.Unauthenticated("invalid token") from None

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _Rejected(f"malformed token: {exc}") from None
        # A token naming a kid must match a JWKS key of that kid; one without
        # a kid uses the PEM key or HS256 secret.
        self._refresh(header.get("kid"))
        entry = self.keys.get(header.get("kid"))
        if entry is None:
            raise _Rejected("unknown signing key")
        key, alg = entry
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise _Rejected(f"invalid token: {exc}") from None
        sub = str(claims["sub"])
        extra = claims.get(self.roles_claim, [])
        if not isinstance(extra, list) or not all(isinstance(r, str) for r in extra):
            raise _Rejected(f"{self.roles_claim} is not a list of roles")
        roles = {"employee"} | (set(extra) & self.allowed_roles)
        return Principal(id=f"employee:{sub}", roles=frozenset(roles), employee=sub)
