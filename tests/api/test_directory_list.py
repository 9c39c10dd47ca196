"""Directory listing, search and re-hire (issue 16, API.md "Directory and bulk import")."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, FakeClock, key, problem


async def test_list_employees_filters_and_search(api: Api, client: AsyncTestClient[Any]) -> None:
    """GET /v1/employees filters by department and status, and q matches the start of the id,
    the name or the email, ignoring case."""
    await api.department("eng")
    await api.department("ops")
    people = [
        ("e-1", "Ada Lovelace", "ada@example.com", "eng"),
        ("e-2", "Alan Turing", "alan@corp.example", "eng"),
        ("e-3", "Grace Hopper", "grace@example.com", "ops"),
        ("x-9", "Linus", "torvalds@example.com", "ops"),
    ]
    for emp, name, email, dept in people:
        r = await client.put(
            f"/v1/employees/{emp}", json={"name": name, "email": email, "department": dept}
        )
        assert r.status_code == 201, r.text
    r = await client.post("/v1/employees/e-2/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text

    async def ids(query: str) -> list[str]:
        r = await client.get(f"/v1/employees{query}")
        assert r.status_code == 200, r.text
        return [item["id"] for item in r.json()["items"]]

    assert await ids("") == ["e-1", "e-2", "e-3", "x-9"]
    assert await ids("?department=ops") == ["e-3", "x-9"]
    assert await ids("?status=offboarded") == ["e-2"]
    assert await ids("?status=active&department=eng") == ["e-1"]
    assert await ids("?q=AL") == ["e-2"]  # name prefix, any case
    assert await ids("?q=torv") == ["x-9"]  # email prefix
    assert await ids("?q=e-") == ["e-1", "e-2", "e-3"]  # id prefix
    assert await ids("?q=grace%40") == ["e-3"]
    assert await ids("?q=%25") == []  # % is a character, not a wildcard
    assert await ids("?q=_") == []
    problem(await client.get("/v1/employees?status=gone"), 400, "invalid_request")
    problem(await client.get("/v1/employees?department=Bad!"), 400, "invalid_request")
    problem(await client.get("/v1/employees?cursor=%%%"), 400, "invalid_request")


async def test_list_departments_paginates(api: Api, client: AsyncTestClient[Any]) -> None:
    """GET /v1/departments pages by id with an opaque cursor."""
    for dept in ("a", "b", "c"):
        await api.department(dept)
    r = await client.get("/v1/departments?limit=2")
    assert r.status_code == 200, r.text
    first = r.json()
    assert [d["id"] for d in first["items"]] == ["a", "b"] and first["next_cursor"]
    r = await client.get(f"/v1/departments?limit=2&cursor={first['next_cursor']}")
    assert [d["id"] for d in r.json()["items"]] == ["c"] and r.json()["next_cursor"] is None


async def test_pagination_stable_under_concurrent_inserts(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Paging through employees while others are inserted concurrently never repeats or skips
    one that existed before the walk began."""
    await api.department("eng")
    before = [f"e-{i:03d}" for i in range(0, 120, 2)]
    await asyncio.gather(*(api.employee(emp) for emp in before))

    async def insert_more() -> None:
        for i in range(1, 120, 2):
            await api.employee(f"e-{i:03d}")

    async def walk() -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            query = "?limit=7&q=e-" + (f"&cursor={cursor}" if cursor else "")
            r = await client.get(f"/v1/employees{query}")
            assert r.status_code == 200, r.text
            seen += [item["id"] for item in r.json()["items"]]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return seen
            await asyncio.sleep(0)

    seen, _ = await asyncio.gather(walk(), insert_more())
    assert len(seen) == len(set(seen)), "an employee appeared twice"
    assert seen == sorted(seen)
    assert set(before) <= set(seen), "an employee that existed before the walk was skipped"


async def test_rehire_keeps_history(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """PUT with status "active" re-hires an offboarded employee: the wallet reopens empty, the old
    entries stay, and the as-of balance before the offboarding is unchanged."""
    clock.set(datetime(2026, 3, 1, 9, tzinfo=UTC))
    await api.employee("e-1")
    await api.grant("e-1", 500)
    assert (await api.debit("employee:e-1", 120)).status_code == 201
    clock.set(datetime(2026, 3, 2, 9, tzinfo=UTC))
    r = await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    before_at = "2026-03-01T12:00:00Z"
    r = await client.get(f"/v1/accounts/employee:e-1/balance?at={before_at}")
    assert r.json()["posted"] == 380
    entries_before = (await client.get("/v1/accounts/employee:e-1/entries")).json()["items"]

    body = {"name": "e-1", "email": "e-1@example.com", "department": "eng"}
    problem(await client.put("/v1/employees/e-1", json=body), 409, "account_closed")
    clock.set(datetime(2026, 4, 1, 9, tzinfo=UTC))
    r = await client.put("/v1/employees/e-1", json={**body, "status": "active"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active" and r.json()["offboarded_at"] is None
    assert r.json()["wallet"]["status"] == "open" and r.json()["wallet"]["posted"] == 0

    r = await client.get(f"/v1/accounts/employee:e-1/balance?at={before_at}")
    assert r.json()["posted"] == 380
    assert (await client.get("/v1/accounts/employee:e-1/entries")).json()["items"] == entries_before
    # The wallet works again.
    await api.grant("e-1", 50)
    assert (await api.debit("employee:e-1", 50)).status_code == 201
    assert (await api.account("employee:e-1"))["posted"] == 0
