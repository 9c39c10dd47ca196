"""Authentication and authorization: the role table of API.md, route by route."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from litestar.testing import AsyncTestClient

from service import db, roles
from service.app import create_app
from service.auth import new_key
from service.config import Config
from service.openapi import served
from tests.api.conftest import JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET, Api, key, problem

ROLES = ("admin", "hr", "finance", "meter", "employee")
_n = itertools.count()


def employee_token(sub: str, *, roles: list[str] | None = None, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    if roles is not None:
        claims["tokenledger_roles"] = roles
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def sql(database_url: str, query: str, *args: Any) -> Any:
    """Run one named query on the test's database on a connection of our own
    (the app's pool lives on the test client's event loop)."""
    conn = await db.connect(database_url)
    try:
        return await conn.fetchrow(db.load_queries()[query], *args)
    finally:
        await conn.close()


async def service_key(database_url: str, role: str) -> str:
    k = new_key()
    await sql(database_url, "create_key", k.id, k.prefix, k.secret_hash, f"test-{role}", role, "t")
    return k.secret


@dataclass
class World:
    """Two employees with credits, and a bearer token per caller."""

    api: Api
    tokens: dict[str, str]
    database_url: str

    def auth(self, caller: str) -> dict[str, str]:
        # An empty header overrides the client's default admin token.
        return {"Authorization": f"Bearer {self.tokens[caller]}" if caller != "none" else ""}


@pytest.fixture
async def world(api: Api, database_url: str) -> World:
    await api.department("eng")
    for emp in ("e-own", "e-other"):
        await api.employee(emp)
        await api.grant(emp, 10_000)
    tokens = {
        role: await service_key(database_url, role) for role in ("admin", "hr", "finance", "meter")
    }
    tokens["employee"] = employee_token("e-own")
    return World(api, tokens, database_url)


# --- the matrix -----------------------------------------------------------------


class CsvBody(str):
    """A request body sent as text/csv (the imports), not JSON."""


async def _approval(w: World, caller: str) -> tuple[str, Any]:
    """A fresh pending approval requested by someone else than any caller here."""
    conn = await db.connect(w.database_url)
    try:
        made = await conn.fetchval(
            "SELECT tl_op_request_approval($1, $2)",
            {
                "kind": "grant",
                "request": {"employee": "e-other", "amount": 1, "reason": "spot_bonus"},
            },
            {"actor": "key:someone-else", "request_id": "matrix", "now": None},
        )
    finally:
        await conn.close()
    return made["approval"]["id"], None


def _approval_op(op: str) -> Maker:
    async def make(w: World, caller: str) -> tuple[str, Any]:
        approval, _ = await _approval(w, caller)
        return f"/v1/approvals/{approval}/{op}", {}

    return make


async def _approval_get(w: World, caller: str) -> tuple[str, Any]:
    approval, _ = await _approval(w, caller)
    return f"/v1/approvals/{approval}", None


PERIOD = "from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z"

Maker = Callable[[World, str], Awaitable[tuple[str, Any]]]


@dataclass(frozen=True)
class Case:
    """How to call one route, which roles may, and what success answers."""

    roles: frozenset[str]  # besides admin
    ok: int
    make: Maker
    own: bool = False  # an employee may call it on their own wallet
    admin: int | None = None  # what admin gets, when not `ok`


def fixed(path: str, body: Any = None) -> Maker:
    async def make(w: World, caller: str) -> tuple[str, Any]:
        return path, body

    return make


def own_path(template: str) -> Maker:
    """A path on the employee's own wallet (or, for "employee-other", someone else's)."""

    async def make(w: World, caller: str) -> tuple[str, Any]:
        emp = "e-other" if caller == "employee-other" else "e-own"
        return template.format(address=f"employee:{emp}"), None

    return make


async def _fresh_employee(w: World, caller: str) -> str:
    emp = f"e-{next(_n)}"
    await w.api.employee(emp)
    return emp


async def _lot(w: World, caller: str) -> tuple[str, Any]:
    emp = await _fresh_employee(w, caller)
    grant = await w.api.grant(emp, 100)
    return f"/v1/lots/{grant['lot']['id']}/void", {}


async def _offboard(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/employees/{await _fresh_employee(w, caller)}/offboard", {}


async def _txn(w: World, caller: str) -> tuple[str, Any]:
    grant = await w.api.grant("e-other", 5)
    return f"/v1/transactions/{grant['transaction']['id']}", None


async def _reverse(w: World, caller: str) -> tuple[str, Any]:
    grant = await w.api.grant("e-other", 5)
    return f"/v1/transactions/{grant['transaction']['id']}/reverse", {}


PROGRAM = {
    "amount": 10,
    "reason": "monthly_allotment",
    "cadence": {"every": "month", "day": 1},
    "audience": {"employees": ["e-other"]},
    "expiry": {"at": "end_of_cycle"},
    "starts_on": "2026-01-01",
    "active": True,
}


async def _program(w: World) -> str:
    program = f"p-{next(_n)}"
    r = await w.api.c.put(f"/v1/grant-programs/{program}", json=PROGRAM)
    assert r.status_code == 201, r.text
    return program


async def _program_put(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/grant-programs/p-new-{next(_n)}", PROGRAM


async def _program_get(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/grant-programs/{await _program(w)}", None


async def _program_run(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/grant-programs/{await _program(w)}/runs", {"cycle": "2026-01"}


async def _program_runs(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/grant-programs/{await _program(w)}/runs", None


async def _employee_put(w: World, caller: str) -> tuple[str, Any]:
    return f"/v1/employees/e-new-{next(_n)}", {
        "name": "N",
        "email": "n@example.com",
        "department": "eng",
    }


async def _grant(w: World, caller: str) -> tuple[str, Any]:
    return "/v1/grants", {"employee": "e-other", "amount": 1, "reason": "spot_bonus"}


async def _batch(w: World, caller: str) -> tuple[str, Any]:
    item = {"key": f"b-{next(_n)}", "employee": "e-other", "amount": 1, "reason": "spot_bonus"}
    return "/v1/grants:batch", {"grants": [item]}


async def _reservation(w: World, emp: str = "e-own", by: str = "admin") -> str:
    r = await w.api.c.post(
        "/v1/reservations",
        json={"account": f"employee:{emp}", "amount": 1},
        headers={**w.auth(by), **key()},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _reservation_op(op: str, body: Any) -> Maker:
    async def make(w: World, caller: str) -> tuple[str, Any]:
        # Only the key that made a reservation (or an admin) may act on it.
        by = "meter" if caller == "meter" else "admin"
        return f"/v1/reservations/{await _reservation(w, by=by)}/{op}", body

    return make


async def _reservation_get(w: World, caller: str) -> tuple[str, Any]:
    emp = "e-other" if caller == "employee-other" else "e-own"
    return f"/v1/reservations/{await _reservation(w, emp)}", None


_PRICE = {
    "model": "gpt-4o",
    "effective_from": "2026-01-01T00:00:00Z",
    "input_per_mtok": 2_500_000,
    "cached_input_per_mtok": 1_250_000,
    "output_per_mtok": 10_000_000,
}


async def _usage_event(w: World) -> dict[str, Any]:
    r = await w.api.c.post("/v1/prices", json=_PRICE, headers={**w.auth("admin"), **key()})
    assert r.status_code == 201, r.text
    return {
        "source": "gw",
        "event_id": f"evt-{next(_n)}",
        "account": "employee:e-other",
        "model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 1,
    }


async def _usage(w: World, caller: str) -> tuple[str, Any]:
    return "/v1/usage", await _usage_event(w)


async def _usage_batch(w: World, caller: str) -> tuple[str, Any]:
    return "/v1/usage:batch", {"events": [await _usage_event(w)]}


async def _webhook(w: World) -> str:
    r = await w.api.c.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/x", "events": ["grant.created"]},
        headers={**w.auth("admin"), **key()},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _webhook_path(suffix: str = "") -> Maker:
    async def make(w: World, caller: str) -> tuple[str, Any]:
        return f"/v1/webhooks/{await _webhook(w)}{suffix}", None

    return make


async def _delivery_retry(w: World, caller: str) -> tuple[str, Any]:
    """A webhook with one delivery (its dispatcher is off here: fanned out by hand)."""
    hook = await _webhook(w)
    await w.api.grant("e-other", 1)
    conn = await db.connect(w.database_url)
    try:
        await conn.fetchval("SELECT tl_webhook_fanout(100, interval '1 day')")
        delivery = await conn.fetchval(
            "SELECT id FROM webhook_deliveries WHERE webhook_id = $1",
            uuid.UUID(hook.removeprefix("wh_")),
        )
    finally:
        await conn.close()
    return f"/v1/webhooks/{hook}/deliveries/dlv_{delivery.hex}/retry", None


def _own_alerts(w: World, caller: str) -> Awaitable[tuple[str, Any]]:
    async def make() -> tuple[str, Any]:
        emp = "e-other" if caller == "employee-other" else "e-own"
        return f"/v1/accounts/employee:{emp}/alerts", {"low_balance": [5]}

    return make()


HR, FIN, METER, EMP = "hr", "finance", "meter", "employee"
MATRIX: dict[tuple[str, str], Case] = {
    ("PUT", "/v1/departments/{department_id}"): Case(
        frozenset({HR}), 200, fixed("/v1/departments/eng", {"name": "Engineering"})
    ),
    ("GET", "/v1/departments/{department_id}"): Case(
        frozenset({HR, FIN}), 200, fixed("/v1/departments/eng")
    ),
    ("PUT", "/v1/employees/{employee_id}"): Case(frozenset({HR}), 201, _employee_put),
    ("GET", "/v1/employees/{employee_id}"): Case(
        frozenset({HR, FIN}), 200, fixed("/v1/employees/e-other")
    ),
    ("POST", "/v1/employees/{employee_id}/offboard"): Case(frozenset({HR}), 200, _offboard),
    ("PUT", "/v1/grant-programs/{program_id}"): Case(frozenset({HR}), 201, _program_put),
    ("GET", "/v1/grant-programs"): Case(frozenset({HR, FIN}), 200, fixed("/v1/grant-programs")),
    ("GET", "/v1/grant-programs/{program_id}"): Case(frozenset({HR, FIN}), 200, _program_get),
    ("POST", "/v1/grant-programs/{program_id}/runs"): Case(frozenset({HR}), 200, _program_run),
    ("GET", "/v1/grant-programs/{program_id}/runs"): Case(frozenset({HR, FIN}), 200, _program_runs),
    ("GET", "/v1/accounts/{address}"): Case(
        frozenset({HR, FIN, METER, EMP}), 200, own_path("/v1/accounts/{address}"), own=True
    ),
    # A service key has no wallet of its own.
    ("GET", "/v1/me"): Case(frozenset({EMP}), 200, fixed("/v1/me"), admin=404),
    ("GET", "/v1/accounts/{address}/entries"): Case(
        frozenset({HR, FIN, EMP}), 200, own_path("/v1/accounts/{address}/entries"), own=True
    ),
    ("GET", "/v1/accounts/{address}/balance"): Case(
        frozenset({HR, FIN, METER, EMP}), 200, own_path("/v1/accounts/{address}/balance"), own=True
    ),
    ("GET", "/v1/accounts/{address}/series"): Case(
        frozenset({HR, FIN, EMP}),
        200,
        own_path("/v1/accounts/{address}/series?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z"),
        own=True,
    ),
    ("GET", "/v1/accounts/{address}/lots"): Case(
        frozenset({HR, FIN, EMP}), 200, own_path("/v1/accounts/{address}/lots"), own=True
    ),
    ("GET", "/v1/accounts/{address}/policy"): Case(
        frozenset({HR, FIN, EMP}), 200, own_path("/v1/accounts/{address}/policy"), own=True
    ),
    ("PUT", "/v1/accounts/{address}/policy"): Case(
        frozenset({HR, FIN}),
        200,
        fixed("/v1/accounts/employee:e-other/policy", {"limits": [{"window": "day", "amount": 5}]}),
    ),
    ("GET", "/v1/accounts/{address}/spend"): Case(
        frozenset({HR, FIN, EMP}),
        200,
        own_path("/v1/accounts/{address}/spend?from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z"),
        own=True,
    ),
    ("POST", "/v1/grants"): Case(frozenset({HR}), 201, _grant),
    ("POST", "/v1/grants:batch"): Case(frozenset({HR}), 200, _batch),
    ("POST", "/v1/lots/{lot_id}/void"): Case(frozenset({HR}), 200, _lot),
    ("POST", "/v1/debits"): Case(
        frozenset({METER}), 201, fixed("/v1/debits", {"account": "employee:e-other", "amount": 1})
    ),
    ("POST", "/v1/transfers"): Case(
        frozenset({HR}),
        201,
        fixed("/v1/transfers", {"from": "employee:e-other", "to": "employee:e-own", "amount": 1}),
    ),
    ("GET", "/v1/transactions/{transaction_id}"): Case(frozenset({HR, FIN}), 200, _txn),
    ("GET", "/v1/transactions"): Case(frozenset({HR, FIN}), 200, fixed("/v1/transactions")),
    ("POST", "/v1/transactions/{transaction_id}/reverse"): Case(frozenset({FIN}), 201, _reverse),
    ("POST", "/v1/reservations"): Case(
        frozenset({METER}),
        201,
        fixed("/v1/reservations", {"account": "employee:e-own", "amount": 1}),
    ),
    ("POST", "/v1/reservations/{reservation_id}/capture"): Case(
        frozenset({METER}), 200, _reservation_op("capture", {"amount": 1})
    ),
    ("POST", "/v1/reservations/{reservation_id}/release"): Case(
        frozenset({METER}), 200, _reservation_op("release", {})
    ),
    ("POST", "/v1/reservations/{reservation_id}/extend"): Case(
        frozenset({METER}), 200, _reservation_op("extend", {"ttl_seconds": 60})
    ),
    ("GET", "/v1/reservations/{reservation_id}"): Case(
        frozenset({METER, HR, FIN, EMP}), 200, _reservation_get, own=True
    ),
    ("GET", "/v1/accounts/{address}/reservations"): Case(
        frozenset({METER, HR, FIN, EMP}),
        200,
        own_path("/v1/accounts/{address}/reservations"),
        own=True,
    ),
    # Every caller adds the same version: after the first, a no-op answering it.
    ("POST", "/v1/prices"): Case(
        frozenset({FIN}),
        201,
        fixed(
            "/v1/prices",
            {
                "model": "gpt-4o",
                "effective_from": "2026-01-01T00:00:00Z",
                "input_per_mtok": 2_500_000,
                "cached_input_per_mtok": 1_250_000,
                "output_per_mtok": 10_000_000,
            },
        ),
    ),
    ("GET", "/v1/prices"): Case(frozenset({FIN, HR, METER}), 200, fixed("/v1/prices")),
    ("POST", "/v1/usage"): Case(frozenset({METER}), 201, _usage),
    ("POST", "/v1/usage:batch"): Case(frozenset({METER}), 200, _usage_batch),
    ("GET", "/v1/employees"): Case(frozenset({HR, FIN}), 200, fixed("/v1/employees?q=e-")),
    ("GET", "/v1/departments"): Case(frozenset({HR, FIN}), 200, fixed("/v1/departments")),
    ("GET", "/v1/approvals"): Case(frozenset({HR}), 200, fixed("/v1/approvals?status=pending")),
    ("GET", "/v1/approvals/{approval_id}"): Case(frozenset({HR}), 200, _approval_get),
    ("POST", "/v1/approvals/{approval_id}/approve"): Case(
        frozenset({HR}), 200, _approval_op("approve")
    ),
    ("POST", "/v1/approvals/{approval_id}/reject"): Case(
        frozenset({HR}), 200, _approval_op("reject")
    ),
    ("POST", "/v1/imports/employees"): Case(
        frozenset({HR}),
        200,
        fixed("/v1/imports/employees", CsvBody("id,name,email,department\ne-own,O,o@x.io,eng\n")),
    ),
    ("POST", "/v1/imports/grants"): Case(
        frozenset({HR}),
        200,
        fixed(
            "/v1/imports/grants?dry_run=true",
            CsvBody("key,employee,amount,reason\nk,e-own,1,spot_bonus\n"),
        ),
    ),
    ("GET", "/v1/reports/liability"): Case(
        frozenset({FIN, HR}), 200, fixed(f"/v1/reports/liability?{PERIOD}&group_by=department")
    ),
    ("GET", "/v1/reports/compensation"): Case(
        frozenset({FIN, HR}), 200, fixed(f"/v1/reports/compensation?{PERIOD}")
    ),
    ("GET", "/v1/reports/forecast"): Case(
        frozenset({FIN, HR, EMP}), 200, own_path("/v1/reports/forecast?account={address}"), own=True
    ),
    ("GET", "/v1/reports/funding"): Case(
        frozenset({FIN, HR}), 200, fixed(f"/v1/reports/funding?{PERIOD}")
    ),
    ("GET", "/v1/reports/efficiency"): Case(
        frozenset({FIN, HR}), 200, fixed(f"/v1/reports/efficiency?{PERIOD}&group_by=employee")
    ),
    ("GET", "/v1/reports/usage"): Case(
        frozenset({FIN, HR}),
        200,
        fixed("/v1/reports/usage?from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z&group_by=model"),
    ),
    # Alerts and webhooks (issue 14): webhooks are admin's alone.
    ("PUT", "/v1/accounts/{address}/alerts"): Case(
        frozenset({HR, EMP}), 200, _own_alerts, own=True
    ),
    ("GET", "/v1/accounts/{address}/alerts"): Case(
        frozenset({HR, FIN, EMP}), 200, own_path("/v1/accounts/{address}/alerts"), own=True
    ),
    ("POST", "/v1/webhooks"): Case(
        frozenset(),
        201,
        fixed("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "events": ["grant.created"]}),
    ),
    ("GET", "/v1/webhooks"): Case(frozenset(), 200, fixed("/v1/webhooks")),
    ("GET", "/v1/webhooks/{webhook_id}"): Case(frozenset(), 200, _webhook_path()),
    ("DELETE", "/v1/webhooks/{webhook_id}"): Case(frozenset(), 204, _webhook_path()),
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): Case(
        frozenset(), 200, _webhook_path("/deliveries")
    ),
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry"): Case(
        frozenset(), 200, _delivery_retry
    ),
}

CALLERS = ("none", "admin", "hr", "finance", "meter", "employee", "employee-other")


def app_routes() -> set[tuple[str, str]]:
    app = create_app(Config(environment="development", database_url="postgresql://unused/x"))
    found = set()
    for route in app.routes:
        if not route.path.startswith("/v1/"):
            continue
        for handler in route.route_handlers:  # type: ignore[union-attr]
            for method in handler.http_methods:
                if method != "OPTIONS":
                    template = route.path.replace(":str", "")
                    found.add((method, template))
    return found


def test_matrix_covers_every_route() -> None:
    """A /v1 route added without a row in the authorization matrix fails this test."""
    assert app_routes() == set(MATRIX)


def expected(case: Case, caller: str) -> int:
    if caller == "none":
        return 401
    if caller == "admin":
        return case.admin or case.ok
    if caller in ("employee", "employee-other"):
        if EMP not in case.roles:
            return 403
        if caller == "employee-other":
            return 404 if case.own else case.ok
        return case.ok
    return case.ok if caller in case.roles else 403


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
async def test_authorization_matrix(world: World, route: tuple[str, str]) -> None:
    """Every route answers every caller with the exact status the role table gives."""
    method, _ = route
    case = MATRIX[route]
    for caller in CALLERS:
        path, body = await case.make(world, caller)
        token_of = "employee" if caller == "employee-other" else caller
        headers = {**world.auth(token_of), **key()}
        if isinstance(body, CsvBody):
            r = await world.api.c.request(
                method,
                path,
                content=body.encode(),
                headers={**headers, "Content-Type": "text/csv"},
            )
        else:
            r = await world.api.c.request(
                method, path, json=body if method != "GET" else None, headers=headers
            )
        want = expected(case, caller)
        assert r.status_code == want, f"{caller} {method} {path}: {r.status_code} {r.text}"
        if want == 401:
            assert r.json()["code"] == "unauthenticated"
            assert r.headers["www-authenticate"].startswith("Bearer")
        elif want == 403:
            assert r.json()["code"] == "forbidden"
        elif want == 404:
            code = "account_not_found" if caller == "admin" else "employee_not_found"
            if "/v1/reservations/" in path:
                code = "reservation_not_found"
            assert r.json()["code"] == code


def test_served_schema_names_the_roles_the_guard_enforces() -> None:
    """Each operation's `x-roles` in the served schema is the matrix's roles (plus admin): the
    schema is generated from the same table the guard decides by."""
    app = create_app(Config(environment="development", database_url="postgresql://unused/x"))
    schema = served(app)
    for (method, path), case in MATRIX.items():
        operation = schema["paths"][path][method.lower()]
        # Finance passes the transfer route's guard to fund departments; the handler
        # refuses it every other transfer (the matrix's 403).
        funding = {FIN} if path == "/v1/transfers" else set()
        assert set(operation["x-roles"]) == case.roles | {"admin"} | funding, (method, path)
        assert "Roles: " in operation["description"], (method, path)


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_role_tables_in_the_docs_are_generated_from_the_code(doc: str) -> None:
    """The role table in the README and in the HTTP contract is exactly what
    `python -m service.roles` prints."""
    text = (Path(__file__).parents[2] / doc).read_text()
    begin = text.index("<!-- roles:begin")
    table = text[text.index("\n", begin) + 1 : text.index("\n<!-- roles:end -->")]
    assert table == roles.markdown()


async def test_finance_funds_a_department_and_nothing_else(world: World) -> None:
    """Finance may transfer from system:issuance to a department (funding a budget); any
    other transfer is 403 and moves nothing."""
    fin = {**world.auth("finance"), **key()}
    r = await world.api.c.post(
        "/v1/transfers",
        json={"from": "system:issuance", "to": "department:eng", "amount": 500},
        headers=fin,
    )
    assert r.status_code == 201, r.text
    assert (await world.api.account("department:eng"))["posted"] == 500
    for src, dst in (
        ("department:eng", "system:issuance"),
        ("system:issuance", "employee:e-own"),
        ("employee:e-other", "department:eng"),
    ):
        r = await world.api.c.post(
            "/v1/transfers", json={"from": src, "to": dst, "amount": 1}, headers=fin
        )
        assert problem(r, 403, "forbidden")
    assert (await world.api.account("department:eng"))["posted"] == 500
    assert await world.api.available("employee:e-own") == 10_000


# --- tokens ----------------------------------------------------------------------


async def test_public_routes_need_no_token(client: AsyncTestClient[Any]) -> None:
    """Health, readiness, metrics and the schema docs answer without a token."""
    client.headers.pop("Authorization")
    for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json"):
        assert (await client.get(path)).status_code == 200, path


async def test_employee_sees_own_wallet_through_me(world: World) -> None:
    """GET /v1/me answers the calling employee's wallet."""
    r = await world.api.c.get("/v1/me", headers=world.auth("employee"))
    assert r.status_code == 200 and r.json()["address"] == "employee:e-own"
    assert r.json()["available"] == 10_000


async def test_extra_roles_claim(world: World) -> None:
    """An employee token whose roles claim adds hr may grant like HR does."""
    token = employee_token("e-own", roles=["hr"])
    r = await world.api.c.post(
        "/v1/grants",
        json={"employee": "e-other", "amount": 1, "reason": "spot_bonus"},
        headers={"Authorization": f"Bearer {token}", **key()},
    )
    assert r.status_code == 201, r.text
    assert r.json()["transaction"]["actor"] == "employee:e-own"


def _rsa_pem() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem_private = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem_private, pem_public


@pytest.fixture
async def rsa_client(config: Config, tmp_path: Any, admin_key: str) -> Any:
    """An app that verifies employee tokens with an RSA JWKS (kid "k1")."""
    import json

    from jwt.algorithms import RSAAlgorithm

    private, public = _rsa_pem()
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    jwk = json.loads(RSAAlgorithm.to_jwk(load_pem_public_key(public)))
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    import msgspec

    cfg = msgspec.structs.replace(config, jwt_hs256_secret=None, jwt_jwks_file=str(jwks))
    app = create_app(cfg)
    async with AsyncTestClient(app=app, timeout=30) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        await Api(c).employee("e-rsa")
        yield c, private, public


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "e-rsa", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 300, "nbf": now}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


async def test_rs256_token_accepted(rsa_client: Any) -> None:
    """A well-formed RS256 token with a known kid reaches the employee's own wallet."""
    c, private, _ = rsa_client
    token = jwt.encode(_claims(), private, algorithm="RS256", headers={"kid": "k1"})
    r = await c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


def _forge_alg_none(claims: dict[str, Any]) -> str:
    import base64
    import json

    def b64(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{b64(claims)}."


def _tamper(token: str) -> str:
    import base64
    import json

    head, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def _hs256_with_public_key(public: bytes) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps(_claims()).encode())
    sig = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.mark.parametrize(
    "name",
    [
        "expired",
        "not_yet_valid",
        "wrong_iss",
        "wrong_aud",
        "alg_none",
        "hs256_with_public_key",
        "tampered_payload",
        "unknown_kid",
        "missing_exp",
        "garbage",
    ],
)
async def test_bad_jwts_are_401(rsa_client: Any, name: str) -> None:
    """Each kind of bad employee token answers 401 unauthenticated."""
    c, private, public = rsa_client
    now = int(time.time())

    def sign(claims: dict[str, Any], kid: str = "k1") -> str:
        return jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})

    token = {
        "expired": lambda: sign(_claims(exp=now - 3600, nbf=now - 7200)),
        "not_yet_valid": lambda: sign(_claims(nbf=now + 3600, exp=now + 7200)),
        "wrong_iss": lambda: sign(_claims(iss="https://evil.test")),
        "wrong_aud": lambda: sign(_claims(aud="someone-else")),
        "alg_none": lambda: _forge_alg_none(_claims()),
        "hs256_with_public_key": lambda: _hs256_with_public_key(public),
        "tampered_payload": lambda: _tamper(sign(_claims())),
        "unknown_kid": lambda: sign(_claims(), kid="k2"),
        "missing_exp": lambda: sign(_claims(exp=None)),
        "garbage": lambda: "not.a.jwt",
    }[name]()
    r = await c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "unauthenticated"


# --- service keys -------------------------------------------------------------------


async def test_revoked_key_fails_immediately(world: World) -> None:
    """A revoked key answers 401 on the very next request."""
    c = world.api.c
    headers = world.auth("meter")
    assert (await c.get("/v1/accounts/employee:e-other", headers=headers)).status_code == 200
    prefix = world.tokens["meter"].split("_")[1]
    await sql(world.database_url, "revoke_key", prefix)
    r = await c.get("/v1/accounts/employee:e-other", headers=headers)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"


async def test_unknown_and_malformed_keys_are_401(world: World) -> None:
    """A made-up key, a wrong secret for a real prefix and a non-Bearer scheme are all 401."""
    c = world.api.c
    real = world.tokens["meter"]
    for auth in (
        f"Bearer {new_key().secret}",
        f"Bearer {real[:-3]}abc",
        f"Basic {real}",
        "Bearer ",
    ):
        r = await c.get("/v1/accounts/employee:e-other", headers={"Authorization": auth})
        assert r.status_code == 401, auth


async def test_key_secret_never_logged(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither a key's secret nor a JWT appears in the service's logs."""
    c = world.api.c
    await c.get("/v1/accounts/employee:e-other", headers=world.auth("meter"))
    await c.get("/v1/accounts/employee:e-other", headers={"Authorization": "Bearer tlk_00000000_x"})
    await c.get("/v1/me", headers=world.auth("employee"))
    out = capsys.readouterr()
    logs = out.out + out.err
    assert "request" in logs
    for secret in (world.tokens["meter"], world.tokens["admin"]):
        assert secret not in logs
        # The secret part (after tlk_<prefix>_; it may itself hold "_", so split twice
        # only: the last "_" piece could be a character or two, found in any log).
        assert secret.split("_", 2)[2] not in logs
    jwt_token = world.tokens["employee"]
    assert jwt_token not in logs
    assert jwt_token.rsplit(".", 1)[1] not in logs  # its signature


async def test_idempotency_keys_are_scoped_per_caller(world: World) -> None:
    """The same Idempotency-Key from two callers makes two effects."""
    c = world.api.c
    body = {"account": "employee:e-other", "amount": 7}
    before = await world.api.available("employee:e-other")
    meter2 = await service_key(world.database_url, "meter")
    shared = {"Idempotency-Key": "same-key"}
    r1 = await c.post("/v1/debits", json=body, headers={**world.auth("meter"), **shared})
    r2 = await c.post(
        "/v1/debits", json=body, headers={"Authorization": f"Bearer {meter2}", **shared}
    )
    assert r1.status_code == r2.status_code == 201
    assert r1.json()["id"] != r2.json()["id"]
    assert "idempotent-replayed" not in r2.headers
    assert await world.api.available("employee:e-other") == before - 14


async def test_transaction_records_actor_and_request_id(world: World) -> None:
    """A transaction shows the key that wrote it and the request id it came with."""
    c = world.api.c
    r = await c.post(
        "/v1/debits",
        json={"account": "employee:e-other", "amount": 1},
        headers={**world.auth("meter"), **key(), "X-Request-Id": "req-actor-test"},
    )
    assert r.status_code == 201
    txn = r.json()
    assert txn["actor"].startswith("key:") and txn["request_id"] == "req-actor-test"


# --- limits ----------------------------------------------------------------------------


async def test_rate_limit_per_caller(config: Config, admin_key: str) -> None:
    """Past its role's burst a caller gets 429 rate_limited with Retry-After; others do not."""
    import msgspec

    cfg = msgspec.structs.replace(
        config, rate_limits="meter=2,admin=1000", rate_limit_burst_seconds=2.0
    )
    async with AsyncTestClient(app=create_app(cfg), timeout=30) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        await Api(c).employee("e-1")
        meter = await service_key(config.database_url or "", "meter")
        statuses = [
            (await c.get("/v1/accounts/employee:e-1", headers={"Authorization": f"Bearer {meter}"}))
            for _ in range(6)
        ]
        codes = [r.status_code for r in statuses]
        assert codes[:4] == [200] * 4 and 429 in codes[4:]
        limited = next(r for r in statuses if r.status_code == 429)
        assert limited.json()["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert (await c.get("/v1/accounts/employee:e-1")).status_code == 200


async def test_production_refuses_to_start_without_auth(database_url: str) -> None:
    """In production the service will not start without employee-token verification."""
    with pytest.raises(RuntimeError, match="refusing to start"):
        create_app(Config(database_url=database_url, environment="production"))


async def test_app_under_a_root_path_still_authenticates(config: Config, admin_key: str) -> None:
    """Mounted under a prefix (ASGI root_path), every /v1 route still needs a
    token: the guard decides from the route's declared access, not the URL."""
    from tests.api.conftest import running

    app = create_app(config)
    async with running(app):
        transport = httpx.ASGITransport(app=app, root_path="/ledger")
        async with httpx.AsyncClient(transport=transport, base_url="http://mounted.local") as c:
            anonymous = await c.get("/ledger/v1/accounts/system:usage")
            assert anonymous.status_code == 401, anonymous.text
            ok = await c.get(
                "/ledger/v1/accounts/system:usage",
                headers={"Authorization": f"Bearer {admin_key}"},
            )
            assert ok.status_code == 200, ok.text
            assert (await c.get("/ledger/healthz")).status_code == 200


def test_every_route_declares_its_access(config: Config) -> None:
    """Every route handler, the schema docs and operations routes included,
    carries an access rule (public or roles), so none falls through."""
    app = create_app(config)
    missing = [
        f"{sorted(h.http_methods)} {route.path}"
        for route in app.routes
        for h in getattr(route, "route_handlers", [])
        if h.http_methods != {"OPTIONS"} and "access" not in h.opt
    ]
    assert missing == []


async def test_role_claim_grants_only_allowed_roles(world: World) -> None:
    """A roles claim naming a role outside TOKENLEDGER_JWT_ALLOWED_ROLES (here
    employee and hr) adds nothing: the token is an employee's, and admin-only
    routes answer 403."""
    token = employee_token("e-own", roles=["admin", "finance"])
    headers = {"Authorization": f"Bearer {token}"}
    r = await world.api.c.post(
        "/v1/prices",
        json={
            "model": "m-x",
            "input_per_mtok": 1,
            "cached_input_per_mtok": 1,
            "output_per_mtok": 1,
        },
        headers={**headers, **key()},
    )
    assert r.status_code == 403, r.text
    assert (await world.api.c.get("/v1/me", headers=headers)).status_code == 200


async def test_role_claim_must_be_a_list_of_strings(world: World) -> None:
    """A roles claim that is an object or a string is refused (401), not read
    for its keys or characters."""
    for claim in ({"admin": True}, "admin", ["hr", 1]):
        token = employee_token("e-own", roles=claim)  # type: ignore[arg-type]
        r = await world.api.c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (claim, r.text)


def test_unknown_allowed_role_refuses_to_start() -> None:
    """TOKENLEDGER_JWT_ALLOWED_ROLES naming no known role is a configuration error."""
    with pytest.raises(ValueError, match="TOKENLEDGER_JWT_ALLOWED_ROLES"):
        create_app(
            Config(
                jwt_issuer="i",
                jwt_audience="a",
                jwt_hs256_secret="x" * 40,
                jwt_allowed_roles="employee,superuser",
            )
        )


async def test_401_does_not_say_why_a_token_failed(world: World) -> None:
    """An expired, wrongly signed or malformed token answers the same 401
    detail; the reason goes to the log, not to the caller."""
    now = int(time.time())
    expired = employee_token("e-own", exp=now - 3600, iat=now - 7200, nbf=now - 7200)
    forged = jwt.encode(
        {"sub": "e-own", "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 60},
        "another-secret-another-secret-another-secret",
        algorithm="HS256",
    )
    details = set()
    for token in (expired, forged, "not.a.jwt", employee_token("e-own", roles={"admin": 1})):  # type: ignore[arg-type]
        r = await world.api.c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, r.text
        details.add(r.json()["detail"])
    assert len(details) == 1, details
    assert not any(word in next(iter(details)).lower() for word in ("expired", "signature"))


def test_a_weak_bootstrap_key_refuses_to_start(config: Config) -> None:
    """TOKENLEDGER_BOOTSTRAP_ADMIN_KEY must carry a secret as strong as a
    generated key's (256 bits): a short or guessable one is refused."""
    import msgspec

    for weak in ("tlk_00000000_admin", "tlk_abcdef01_" + "a" * 20):
        with pytest.raises(ValueError, match="TOKENLEDGER_BOOTSTRAP_ADMIN_KEY"):
            create_app(msgspec.structs.replace(config, bootstrap_admin_key=weak))


async def test_changing_the_bootstrap_key_revokes_the_previous_one(
    config: Config, database_url: str
) -> None:
    """Restarted with another bootstrap key, the service revokes the one it
    was started with before: rotating it takes the old one out."""
    import msgspec

    from tests.api.conftest import running

    first, second = new_key().secret, new_key().secret
    for secret in (first, second):
        app = create_app(msgspec.structs.replace(config, bootstrap_admin_key=secret))
        async with running(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t.local") as c:
                r = await c.get(
                    "/v1/accounts/system:usage", headers={"Authorization": f"Bearer {secret}"}
                )
                assert r.status_code == 200, r.text
                if secret == second:
                    r = await c.get(
                        "/v1/accounts/system:usage", headers={"Authorization": f"Bearer {first}"}
                    )
                    assert r.status_code == 401, r.text


def _rsa_jwk(kid: str) -> tuple[bytes, dict[str, Any]]:
    import json

    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from jwt.algorithms import RSAAlgorithm

    private, public = _rsa_pem()
    jwk = json.loads(RSAAlgorithm.to_jwk(load_pem_public_key(public)))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return private, jwk


async def test_jwks_rotation_needs_no_restart(
    config: Config, tmp_path: Any, admin_key: str
) -> None:
    """The JWKS file is read again on a schedule (5 min) and, at most every
    10 s, when a token names an unknown kid: a key added by the identity
    provider works without a restart, and a key it removed stops working."""
    import json

    import msgspec

    first, jwk1 = _rsa_jwk("k1")
    second, jwk2 = _rsa_jwk("k2")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk1]}))
    cfg = msgspec.structs.replace(config, jwt_hs256_secret=None, jwt_jwks_file=str(jwks))
    app = create_app(cfg)
    verifier = app.state.jwt_verifier
    now = [1000.0]
    verifier.clock = lambda: now[0]
    token1 = jwt.encode(_claims(), first, algorithm="RS256", headers={"kid": "k1"})
    token2 = jwt.encode(_claims(), second, algorithm="RS256", headers={"kid": "k2"})
    async with AsyncTestClient(app=app, timeout=30) as c:
        c.headers["Authorization"] = f"Bearer {admin_key}"
        await Api(c).employee("e-rsa")

        async def me(token: str) -> int:
            r = await c.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
            return r.status_code

        assert await me(token1) == 200
        assert await me(token2) == 401  # unknown: read again, still unknown
        jwks.write_text(json.dumps({"keys": [jwk1, jwk2]}))
        now[0] += 5
        assert await me(token2) == 401  # another read within 10 s is not allowed
        now[0] += 6
        assert await me(token2) == 200  # read again: the new key works
        jwks.write_text(json.dumps({"keys": [jwk2]}))
        now[0] += 100
        assert await me(token1) == 200  # known kid: no read before the schedule
        now[0] += 300
        assert await me(token1) == 401  # the scheduled read removed it
        assert await me(token2) == 200


async def test_failed_authentication_is_rate_limited_per_address(
    config: Config, admin_key: str, database_url: str
) -> None:
    """An address that fails authentication faster than
    TOKENLEDGER_AUTH_FAILURES_PER_SECOND allows gets 429 with Retry-After
    instead of more look-ups; a caller that authenticated lately is never
    limited by it, whatever the address does."""
    import msgspec

    from tests.api.conftest import running

    app = create_app(
        msgspec.structs.replace(config, auth_failures_per_second=2.0, auth_failure_burst=4)
    )
    async with running(app):
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t.local") as c:
            good = {"Authorization": f"Bearer {admin_key}"}
            assert (await c.get("/v1/accounts/system:usage", headers=good)).status_code == 200
            statuses = []
            for _ in range(8):
                bad = {"Authorization": f"Bearer {new_key().secret}"}
                statuses.append((await c.get("/v1/accounts/system:usage", headers=bad)).status_code)
            assert statuses[:4] == [401] * 4 and set(statuses[4:]) == {429}, statuses
            r = await c.get("/v1/accounts/system:usage", headers={"Authorization": "Bearer x"})
            problem(r, 429, "rate_limited")
            assert int(r.headers["Retry-After"]) >= 1
            assert (await c.get("/v1/accounts/system:usage", headers=good)).status_code == 200
        other = httpx.ASGITransport(app=app, client=("10.9.9.9", 4000))
        async with httpx.AsyncClient(transport=other, base_url="http://t.local") as c:
            bad = {"Authorization": f"Bearer {new_key().secret}"}
            assert (await c.get("/v1/accounts/system:usage", headers=bad)).status_code == 401


async def test_only_the_reserving_key_or_an_admin_acts_on_a_reservation(
    world: World, database_url: str
) -> None:
    """Another meter key cannot capture, release or extend a reservation, nor
    settle it with a usage event: to it the reservation does not exist (404).
    The key that made it and an admin can."""
    c = world.api.c
    other = {"Authorization": f"Bearer {await service_key(database_url, 'meter')}"}
    mine = world.auth("meter")
    rid = await _reservation(world, by="meter")
    for op, body in (("capture", {"amount": 1}), ("release", {}), ("extend", {"ttl_seconds": 60})):
        r = await c.post(f"/v1/reservations/{rid}/{op}", json=body, headers={**other, **key()})
        problem(r, 404, "reservation_not_found")
    r = await c.post(
        f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60}, headers={**mine, **key()}
    )
    assert r.status_code == 200, r.text
    r = await c.post(
        f"/v1/reservations/{rid}/capture", json={"amount": 1}, headers={**mine, **key()}
    )
    assert r.status_code == 200, r.text
    rid2 = await _reservation(world, by="meter")
    r = await c.post(
        f"/v1/reservations/{rid2}/release", json={}, headers={**world.auth("admin"), **key()}
    )
    assert r.status_code == 200, r.text
