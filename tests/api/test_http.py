"""HTTP plumbing: request ids, problem+json, limits, health, metrics and the OpenAPI schema."""

from __future__ import annotations

import re
import time
from typing import Any

import asyncpg
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from service import migrate
from service.api.common import ADDRESS_PATTERN, WALLET_PATTERN
from tests.api.conftest import Api, key

PROBLEM_JSON = "application/problem+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}


def assert_problem(r: Any, status: int, code: str) -> dict[str, Any]:
    """Assert a complete RFC 9457 problem+json body with this status and code."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert PROBLEM_FIELDS <= set(body), body
    assert body["status"] == status and body["code"] == code, body
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


async def test_every_response_carries_request_id(api: Api, client: AsyncTestClient[Any]) -> None:
    """Successes, client errors and problem answers all carry X-Request-Id, the caller's one when
    sent."""
    await api.employee("e-1")
    sends = {
        "get 200": lambda h: client.get("/v1/accounts/employee:e-1", headers=h),
        "post 201": lambda h: client.post(
            "/v1/grants",
            json={"employee": "e-1", "amount": 1, "reason": "spot_bonus"},
            headers={**h, **key()},
        ),
        "400": lambda h: client.post(
            "/v1/debits", json={"account": "employee:e-1", "amount": 0}, headers={**h, **key()}
        ),
        "404": lambda h: client.get("/v1/employees/nobody", headers=h),
        "409": lambda h: client.post(
            "/v1/debits", json={"account": "employee:e-1", "amount": 99}, headers={**h, **key()}
        ),
        "unknown route": lambda h: client.get("/v1/nothing-here", headers=h),
        "405": lambda h: client.delete("/v1/departments/eng", headers=h),
        "healthz": lambda h: client.get("/healthz", headers=h),
        "metrics": lambda h: client.get("/metrics", headers=h),
    }
    wrong: dict[str, tuple[str | None, str | None]] = {}
    generated: set[str] = set()
    for name, send in sends.items():
        mine = f"caller-{name.replace(' ', '-')}-1"
        echoed = (await send({"X-Request-Id": mine})).headers.get("x-request-id")
        fresh = (await send({})).headers.get("x-request-id")
        if echoed != mine or not fresh:
            wrong[name] = (echoed, fresh)
        elif fresh:
            generated.add(fresh)
    assert wrong == {}, "(echoed, generated) X-Request-Id of the answers that lack it"
    assert len(generated) == len(sends), "generated request ids must be unique"


async def test_problem_for_unknown_route(client: AsyncTestClient[Any]) -> None:
    """An unknown route answers 404 as a complete problem+json body."""
    assert_problem(await client.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await client.post("/v2/grants", json={}), 404, "not_found")


async def test_problem_for_wrong_method(client: AsyncTestClient[Any]) -> None:
    """A known route with an unsupported method answers 405 as a complete problem+json body."""
    assert_problem(await client.delete("/v1/departments/eng"), 405, "method_not_allowed")
    assert_problem(await client.get("/v1/grants"), 405, "method_not_allowed")


async def test_problem_for_validation_error(client: AsyncTestClient[Any]) -> None:
    """A 400 is a complete problem+json body with an errors list of paths."""
    r = await client.post(
        "/v1/debits", json={"account": "employee:e-1", "amount": "5"}, headers=key()
    )
    body = assert_problem(r, 400, "invalid_request")
    assert [e["path"] for e in body["errors"]] == ["$.amount"], body


async def test_body_over_limit(api: Api, client: AsyncTestClient[Any]) -> None:
    """A request body over 1 MiB answers 413 as problem+json and changes nothing."""
    await api.employee("e-1")
    padding = "x" * (1024 * 1024)
    content = (
        '{"employee": "e-1", "amount": 5, "reason": "spot_bonus", "memo": "' + padding + '"}'
    ).encode()
    assert len(content) > 1024 * 1024
    r = await client.post(
        "/v1/grants", content=content, headers={**key(), "content-type": "application/json"}
    )
    assert_problem(r, 413, "payload_too_large")
    assert "x-request-id" in r.headers
    assert await api.available("employee:e-1") == 0


async def test_health_and_readiness(client: AsyncTestClient[Any]) -> None:
    """/healthz answers 200 and /readyz answers 200 with the current schema_version, both without a
    token."""
    client.headers.pop("Authorization", None)
    r = await client.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    r = await client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert r.json()["schema_version"] == migrate.latest_version()


async def test_readiness_fails_while_the_schema_is_behind(
    client: AsyncTestClient[Any], db: asyncpg.Connection
) -> None:
    """/readyz answers 503 "schema behind" while this release's schema.sql has not been applied
    to the database (as `tokenledger migrate --check` exits 1), so no traffic reaches a replica
    whose functions are not there yet."""
    await db.execute("DELETE FROM schema_applied")
    r = await client.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.json()["reason"] == "schema behind"
    assert r.json()["required"] == migrate.latest_version()


async def test_metrics_use_route_templates(api: Api, client: AsyncTestClient[Any]) -> None:
    """/metrics exposes the request-duration histogram labelled by route template, never by account
    id."""
    await api.employee("e-secret-77")
    await api.grant("e-secret-77", 10)
    assert (await client.get("/v1/accounts/employee:e-secret-77")).status_code == 200
    assert (await client.get("/v1/accounts/employee:e-secret-77/entries")).status_code == 200
    assert (await client.get("/v1/employees/e-secret-77")).status_code == 200
    client.headers.pop("Authorization", None)
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE tokenledger_http_request_duration_seconds histogram" in text
    routes = set(
        re.findall(r'tokenledger_http_request_duration_seconds_count\{[^}]*route="([^"]*)"', text)
    )
    assert "/v1/accounts/{address}" in routes, routes
    assert "/v1/accounts/{address}/entries" in routes, routes
    assert "/v1/employees/{employee_id}" in routes, routes
    assert "/v1/grants" in routes, routes
    assert "e-secret-77" not in text


async def test_openapi_lists_every_route(client: AsyncTestClient[Any]) -> None:
    """/schema/openapi.json is OpenAPI 3.1 and documents every /v1 route and method the app
    serves."""
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.path_format, method.lower())
        for route in client.app.routes
        if isinstance(route, HTTPRoute) and route.path.startswith("/v1/")
        for handler in route.route_handlers
        for method in handler.http_methods
        if method not in ("OPTIONS", "HEAD")
    }
    assert len(served) >= 19
    documented = {
        (path, method)
        for path, ops in doc["paths"].items()
        for method in ops
        if method in ("get", "put", "post", "patch", "delete")
    }
    assert served - documented == set()
    for path, method in served:
        op = doc["paths"][path][method]
        assert op.get("summary"), (path, method)


async def test_public_endpoints_cost_the_database_little_under_a_flood(client: Any) -> None:
    """/readyz and /metrics need no token, so a flood of them must not become
    a flood of database queries: each asks the database at most once a second."""
    ledger = client.app.state.ledger
    calls = []
    fetchval, fetchrow = ledger.fetchval, ledger.fetchrow

    async def counting(query: str, *args: Any) -> Any:
        calls.append(query)
        return await fetchval(query, *args)

    async def counting_row(query: str, *args: Any) -> Any:
        calls.append(query)
        return await fetchrow(query, *args)

    ledger.fetchval = counting
    ledger.fetchrow = counting_row
    started = time.monotonic()
    for _ in range(50):
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    # Once a second: on a loaded machine the 100 requests may span more than one.
    seconds = int(time.monotonic() - started) + 2
    assert 1 <= calls.count("schema_state") <= seconds, calls
    assert calls.count("active_reservations") <= seconds, calls


async def test_policy_routes_state_that_they_take_wallets_only(
    client: AsyncTestClient[Any],
) -> None:
    """A spend policy belongs to an employee wallet or a department: the served schema says so
    for `address` (schemathesis found `system:` addresses schema-valid but answered 400), and a
    `system:` address is the 400 the schema now predicts."""
    doc = (await client.get("/schema/openapi.json")).json()
    for method in ("get", "put"):
        (param,) = [
            p
            for p in doc["paths"]["/v1/accounts/{address}/policy"][method]["parameters"]
            if p["name"] == "address"
        ]
        assert param["schema"]["pattern"] == WALLET_PATTERN, (method, param)
    other = doc["paths"]["/v1/accounts/{address}"]["get"]["parameters"]
    assert [p["schema"]["pattern"] for p in other if p["name"] == "address"] == [ADDRESS_PATTERN]
    r = await client.get("/v1/accounts/system:usage/policy")
    assert r.status_code == 400, r.text
