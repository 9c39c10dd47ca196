"""The guard: one check before every /v1 route, deciding who is calling and
whether they may.

Routes declare the permission they need with `opt=access(...)`; the roles
behind it come from the one table in `service.roles`, and `authorize` is the
only place that decides. An employee reaches only their own wallet and what
hangs off it; anything else answers 404 so that ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service import errors
from service.auth.employee_tokens import JwtVerifier
from service.auth.key_cache import KeyCache
from service.auth.keys import KEY_PREFIX, hash_secret, look_up_key, parse_key, well_formed
from service.auth.principal import Principal
from service.roles import own_allowed, roles_for

WWW_AUTHENTICATE = 'Bearer realm="tokenledger"'


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
            principal = await look_up_key(ledger, parsed)
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
                    principal = await look_up_key(ledger, parsed)
            else:
                since = cache.clock()
                future = cache.start_lookup(parsed[1])
                try:
                    principal = await look_up_key(ledger, parsed)
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
