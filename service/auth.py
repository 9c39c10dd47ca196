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

Routes declare the permission they need with `opt=access(...)`; the roles
behind it come from the one table in `service.roles`, and `authorize` is the
only place that decides. An employee reaches only their own wallet and what
hangs off it; anything else answers 404 so that ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import jwt
import structlog
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service import errors
from service.config import Config
from service.roles import KEY_ROLES, ROLES, own_allowed, roles_for

__all__ = ["KEY_ROLES", "ROLES"]

Role = Literal["admin", "hr", "finance", "meter", "employee"]
KEY_PREFIX = "tlk_"
WWW_AUTHENTICATE = 'Bearer realm="tokenledger"'
# The channel the api_keys trigger notifies on (schema.sql).
KEYS_CHANNEL = "tl_api_keys"

log = structlog.get_logger("tokenledger.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `id` scopes idempotency keys and is recorded
    as the actor of every transaction it writes."""

    id: str
    roles: frozenset[str]
    employee: str | None = None
    name: str | None = None
    # A service key's scopes (None: unrestricted): the usage sources it may send and the
    # account types it may charge.
    sources: frozenset[str] | None = None
    account_types: frozenset[str] | None = None
    # The departments whose accounts it may charge, and its spend rate cap (credits per
    # minute). Both are checked in the operation's own database call (schema.sql, "Key
    # scopes by department"): an employee's department is only known there, and the cap
    # must count what all of the key's concurrent calls spend.
    departments: tuple[str, ...] | None = None
    rate_limit: int | None = None

    def check_scope(self, account: str, source: str | None = None) -> None:
        """Refuses (403 `forbidden`) a charge outside the key's scopes, before anything is
        read or held: the scope is in the key, the account type in the address."""
        kind = account.partition(":")[0]
        if self.account_types is not None and kind not in self.account_types:
            raise errors.Forbidden(f"this key may not charge {kind} accounts", account=account)
        if source is not None and self.sources is not None and source not in self.sources:
            raise errors.Forbidden(f"this key may not record usage from {source!r}", source=source)


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call a route. `own` names the path parameter that must be the
    calling employee's own wallet when the caller is only an employee;
    `public` routes (health, readiness, metrics, the schema docs) need no
    token."""

    roles: frozenset[str]
    own: str | None = None
    public: bool = False
    permissions: tuple[str, ...] = ()


PUBLIC = Access(frozenset(), public=True)


def access(*permissions: str, own: str | None = None) -> dict[str, Any]:
    """Route option: the permissions of `service.roles.PERMISSIONS` the route needs (any one
    of them); the roles come from that table alone. `own` names the path parameter an
    employee must own."""
    roles = roles_for(*permissions)
    if own_allowed(*permissions):
        roles |= {"employee"}
    else:
        assert own is None, f"{permissions} are not for employees, yet own={own!r}"
    return {"access": Access(roles, own, permissions=permissions)}


def public() -> dict[str, Any]:
    """Route option: no token needed."""
    return {"access": PUBLIC}


# --- service keys -----------------------------------------------------------


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


class KeyCache:
    """Service keys this replica verified recently: digest -> Principal.

    An entry is trusted for at most `ttl_seconds` after the database said
    yes. `KeyListener` clears the whole cache whenever api_keys changes
    (revocations are rare; a cleared cache costs one look-up per key), and
    turns the cache off while its channel is down, so that a replica that
    may have missed a notification never answers from memory. A key the
    database did not know is remembered as unknown (UNKNOWN_SECONDS) until
    api_keys changes; a revoked one asks the database every time."""

    # Unknown keys remembered, at most this many and this long: a flood of
    # one made-up key costs one look-up, and any change to api_keys (a key
    # created, above all) forgets them all at once, by NOTIFY.
    UNKNOWN_MAX = 10_000
    UNKNOWN_SECONDS = 60.0

    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        # Off until the listener is connected (and always when ttl is 0).
        self.enabled = False
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        self._unknown: dict[bytes, float] = {}
        self._in_flight: dict[bytes, asyncio.Future[Principal | None]] = {}

    def knows_unknown(self, digest: bytes) -> bool:
        """Whether this key was looked up lately and the database did not know it."""
        until = self._unknown.get(digest)
        if until is None:
            return False
        if not self.enabled or self.clock() >= until:
            del self._unknown[digest]
            return False
        return True

    def put_unknown(self, digest: bytes, since: float) -> None:
        if self.enabled and self.ttl_seconds > 0:
            if len(self._unknown) >= self.UNKNOWN_MAX:
                self._unknown.clear()
            self._unknown[digest] = since + self.UNKNOWN_SECONDS

    def get(self, digest: bytes) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, until = entry
        if not self.enabled or self.clock() >= until:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: bytes, principal: Principal, since: float) -> None:
        """Remember a verified key; `since` is when the look-up was sent, so
        a revocation that raced it is still bounded by the TTL."""
        if self.enabled and self.ttl_seconds > 0:
            self._entries[digest] = (principal, since + self.ttl_seconds)

    def clear(self) -> None:
        self._entries.clear()
        self._unknown.clear()

    def in_flight(self, digest: bytes) -> asyncio.Future[Principal | None] | None:
        """The look-up of this key already on its way to the database, if any."""
        return self._in_flight.get(digest)

    def start_lookup(self, digest: bytes) -> asyncio.Future[Principal | None]:
        """Marks a look-up of this key as sent: requests that miss the cache
        meanwhile wait for its answer instead of sending their own (when an
        entry expires under load, every request of that key missed at once,
        one database round trip each)."""
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._in_flight[digest] = future
        return future

    def end_lookup(self, digest: bytes, future: asyncio.Future[Principal | None]) -> None:
        if self._in_flight.get(digest) is future:
            del self._in_flight[digest]

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled and self.ttl_seconds > 0
        self.clear()


class KeyListener:
    """LISTENs on KEYS_CHANNEL on a connection of its own, outside the pool,
    and clears `cache` on every notification. When the connection is lost it
    turns the cache off and reconnects every `retry_seconds`."""

    def __init__(
        self,
        dsn: str,
        cache: KeyCache,
        *,
        connect_timeout_seconds: float,
        retry_seconds: float = 1.0,
        role: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.cache = cache
        self.connect_timeout_seconds = connect_timeout_seconds
        self.retry_seconds = retry_seconds
        self.role = role
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def start(self) -> None:
        if self.cache.ttl_seconds > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="tokenledger-key-listener")

    async def wait_connected(self, within_seconds: float) -> bool:
        """True once listening (start-up waits briefly, so that the cache
        works from the first request when the database is there)."""
        if self._task is None:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_seconds):
                await self._connected.wait()
        return self._connected.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.cache.set_enabled(False)

    def _notified(self, *_: Any) -> None:
        self.cache.clear()

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                settings = {"application_name": "tokenledger-keys"}
                if self.role:
                    settings["role"] = self.role
                conn = await asyncpg.connect(
                    self.dsn, timeout=self.connect_timeout_seconds, server_settings=settings
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(KEYS_CHANNEL, self._notified)
                # Listening from here on: anything committed before this
                # point is already visible to the look-ups that fill the cache.
                self.cache.set_enabled(True)
                self._connected.set()
                await lost.wait()
                log.warning("key_listener_lost")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("key_listener_unavailable", error=repr(exc))
            finally:
                self.cache.set_enabled(False)
                self._connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(self.retry_seconds)


# --- JWTs -----------------------------------------------------------------

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


# --- the guard --------------------------------------------------------------


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization")
    if not header:
        proxied = proxied_token(connection)
        if proxied is not None:
            return proxied
        raise unauthenticated("missing Authorization: Bearer <token>")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthenticated("Authorization must be `Bearer <token>`")
    return token.strip()


# Methods for which the SSO proxy's token header authenticates (below).
PROXIED_METHODS = frozenset({"GET", "HEAD"})


def proxied_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The employee JWT the company's SSO proxy put in the configured header
    (TOKENLEDGER_PAGES_TOKEN_HEADER, oauth2-proxy style), for reads only.
    The browser sends whatever the proxy adds on every request, wanted or not,
    as it does a cookie: accepting it for a POST would let any other site make
    the employee's browser change things (CSRF). A service key is never taken
    from it: keys are for programs, which send Authorization."""
    name = connection.app.state.get("pages_token_header")
    if not name or connection.scope.get("method") not in PROXIED_METHODS:
        return None
    value = connection.headers.get(name, "").strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    if not value or value.startswith(KEY_PREFIX):
        return None
    return value


def unauthenticated(detail: str) -> errors.Unauthenticated:
    exc = errors.Unauthenticated(detail)
    exc.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return exc


async def authorize(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Authenticate the caller and check the route's `access` option. The
    decision is the route's own, never the URL's: a route that declares
    nothing is closed (create_app refuses to build such an app anyway), and
    an app mounted under a prefix guards the same routes."""
    rule = handler.opt.get("access")
    if not isinstance(rule, Access):
        raise unauthenticated("this route declares no access rule")
    if rule.public:
        return
    state = connection.app.state
    failures = state.auth_failures
    address = connection.client.host if connection.client else "unknown"
    try:
        token = bearer(connection)
    except errors.Unauthenticated:
        failures.check(address, b"")  # past the limit, 429 comes first here too
        failures.failed(address)
        raise
    # The header is read and the token hashed once: a key's digest is also
    # what the failure limiter vouches for.
    parsed = parse_key(token)
    digest = parsed[1] if parsed is not None else hash_secret(token)
    failures.check(address, digest)
    try:
        principal = await authenticate(
            token, parsed, state.ledger, state.jwt_verifier, state.key_cache
        )
    except errors.Unauthenticated:
        failures.failed(address)
        raise
    failures.vouch(digest)
    connection.state.principal = principal
    await state.rate_limiter.check(principal)
    if principal.roles & (rule.roles - {"employee"}):
        return
    if "employee" in principal.roles and "employee" in rule.roles:
        if rule.own is None:
            return
        if rule.own == "reservation_id":
            await _require_own_reservation(connection, principal)
            return
        if _is_own(connection, principal, rule.own):
            return
        # Someone else's wallet: indistinguishable from one that does not exist.
        raise errors.not_found_for(
            str(connection.path_params.get(rule.own, connection.query_params.get(rule.own, "")))
        )
    raise errors.Forbidden(f"the {', '.join(sorted(principal.roles))} role may not do this")


async def _require_own_reservation(
    connection: ASGIConnection[Any, Any, Any, Any], principal: Principal
) -> None:
    """An employee may see a reservation only on their own wallet; any other
    answers exactly like one that does not exist."""
    public_id = str(connection.path_params.get("reservation_id", ""))
    missing = errors.ReservationNotFound(f"no reservation {public_id}", reservation=public_id)
    try:
        rid = (
            uuid.UUID(hex=public_id.removeprefix("rsv_")) if public_id.startswith("rsv_") else None
        )
    except ValueError:
        rid = None
    if rid is None:
        raise missing
    address = await connection.app.state.ledger.fetchval("reservation_account", rid)
    if address != f"employee:{principal.employee}":
        raise missing


def _is_own(
    connection: ASGIConnection[Any, Any, Any, Any], principal: Principal, param: str
) -> bool:
    # A path parameter, or (the forecast report) a query parameter of that name.
    value = connection.path_params.get(param, connection.query_params.get(param))
    return value is not None and value == f"employee:{principal.employee}"


async def authenticate(
    token: str,
    parsed: tuple[str, bytes] | None,
    ledger: Any,
    verifier: JwtVerifier | None,
    cache: KeyCache | None = None,
) -> Principal:
    """The principal of a bearer token; `parsed` is parse_key(token)."""
    if parsed is not None:
        if not well_formed(token):
            raise unauthenticated("unknown or revoked key")
        if cache is None:
            principal = await _look_up_key(ledger, parsed)
        else:
            principal = cache.get(parsed[1])
            if principal is not None:
                return principal
            if cache.knows_unknown(parsed[1]):
                raise unauthenticated("unknown or revoked key")
            pending = cache.in_flight(parsed[1])
            if pending is not None:
                # The same key's look-up, sent just before: its answer, no older
                # than a cached one would be. If it failed, ask on our own.
                await asyncio.wait({pending})
                if not pending.cancelled() and pending.exception() is None:
                    principal = pending.result()
                else:
                    principal = await _look_up_key(ledger, parsed)
            else:
                since = cache.clock()
                future = cache.start_lookup(parsed[1])
                try:
                    principal = await _look_up_key(ledger, parsed)
                except BaseException:
                    future.cancel()
                    raise
                else:
                    future.set_result(principal)
                finally:
                    cache.end_lookup(parsed[1], future)
                if principal is None:
                    cache.put_unknown(parsed[1], since)
                else:
                    cache.put(parsed[1], principal, since)
        if principal is None:
            raise unauthenticated("unknown or revoked key")
        return principal
    if verifier is None:
        raise unauthenticated("employee tokens are not configured on this service")
    try:
        return verifier.verify(token)
    except errors.Unauthenticated as exc:
        exc.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        raise


async def _look_up_key(ledger: Any, parsed: tuple[str, bytes]) -> Principal | None:
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
