"""Departments, employees and offboarding (API.md, Directory)."""

from __future__ import annotations

from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import Api, key, mismatch, posted, problem

# Departments ------------------------------------------------------------------


async def test_put_department_creates_then_updates(client: AsyncTestClient[Any]) -> None:
    """The first PUT of a department answers 201 and opens its account; a second PUT answers 200
    with the new name."""
    r = await client.put("/v1/departments/eng", json={"name": "Engineering"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == "eng" and body["name"] == "Engineering" and body["parent"] is None
    assert body["account"] == "department:eng"
    r = await client.get("/v1/accounts/department:eng")
    assert r.status_code == 200, r.text
    assert r.json()["posted"] == 0 and r.json()["status"] == "open"

    r = await client.put("/v1/departments/eng", json={"name": "Engineering & Research"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Engineering & Research"
    assert r.json()["created_at"] == body["created_at"]

    r = await client.get("/v1/departments/eng")
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Engineering & Research" and r.json()["account"] == "department:eng"


async def test_put_department_with_parent(client: AsyncTestClient[Any]) -> None:
    """A department may name an existing parent, and GET returns it."""
    assert (await client.put("/v1/departments/eng", json={"name": "Eng"})).status_code == 201
    r = await client.put("/v1/departments/eng.platform", json={"name": "Platform", "parent": "eng"})
    assert r.status_code == 201, r.text
    r = await client.get("/v1/departments/eng.platform")
    assert r.status_code == 200 and r.json()["parent"] == "eng"


async def test_put_department_unknown_parent(client: AsyncTestClient[Any]) -> None:
    """A parent that does not exist answers 404 department_not_found and creates nothing."""
    r = await client.put("/v1/departments/eng", json={"name": "Eng", "parent": "nope"})
    problem(r, 404, "department_not_found")
    problem(await client.get("/v1/departments/eng"), 404, "department_not_found")


async def test_put_department_parent_cycle(client: AsyncTestClient[Any]) -> None:
    """A parent chain leading back to the department itself answers 400 invalid_request and changes
    nothing."""
    assert (await client.put("/v1/departments/a", json={"name": "A"})).status_code == 201
    assert (
        await client.put("/v1/departments/b", json={"name": "B", "parent": "a"})
    ).status_code == 201
    assert (
        await client.put("/v1/departments/c", json={"name": "C", "parent": "b"})
    ).status_code == 201
    problem(
        await client.put("/v1/departments/a", json={"name": "A", "parent": "c"}),
        400,
        "invalid_request",
    )
    problem(
        await client.put("/v1/departments/a", json={"name": "A", "parent": "a"}),
        400,
        "invalid_request",
    )
    assert (await client.get("/v1/departments/a")).json()["parent"] is None


async def test_put_department_bad_id(client: AsyncTestClient[Any]) -> None:
    """A department id that does not match the ref pattern answers 400 invalid_request."""
    bad = {}
    for dept_id in ["Eng", "-eng", "eng!", "a" * 65]:
        why = mismatch(
            await client.put(f"/v1/departments/{dept_id}", json={"name": "X"}),
            400,
            "invalid_request",
        )
        if why:
            bad[dept_id] = why
    assert bad == {}


async def test_put_department_unknown_field(client: AsyncTestClient[Any]) -> None:
    """An unknown field in a department body answers 400 invalid_request."""
    r = await client.put("/v1/departments/eng", json={"name": "Eng", "colour": "blue"})
    problem(r, 400, "invalid_request")
    problem(await client.get("/v1/departments/eng"), 404, "department_not_found")


async def test_get_department_not_found(client: AsyncTestClient[Any]) -> None:
    """GET of an unknown department answers 404 department_not_found."""
    problem(await client.get("/v1/departments/nope"), 404, "department_not_found")


# Employees --------------------------------------------------------------------


async def test_put_employee_creates_then_updates(api: Api, client: AsyncTestClient[Any]) -> None:
    """The first PUT of an employee answers 201 and opens a wallet; a second PUT answers 200 with
    the changes."""
    await api.department("eng")
    await api.department("ops")
    body = {"name": "Ada", "email": "ada@example.com", "department": "eng"}
    r = await client.put("/v1/employees/e-1", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert (
        created["id"] == "e-1"
        and created["status"] == "active"
        and created["offboarded_at"] is None
    )
    assert created["wallet"]["address"] == "employee:e-1" and created["wallet"]["posted"] == 0

    r = await client.put(
        "/v1/employees/e-1", json={**body, "email": "ada@corp.example", "department": "ops"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["email"] == "ada@corp.example" and r.json()["department"] == "ops"
    assert r.json()["created_at"] == created["created_at"]


async def test_put_employee_unknown_department(client: AsyncTestClient[Any]) -> None:
    """An employee in an unknown department answers 404 department_not_found and opens no wallet."""
    r = await client.put(
        "/v1/employees/e-1", json={"name": "A", "email": "a@example.com", "department": "nope"}
    )
    problem(r, 404, "department_not_found")
    problem(await client.get("/v1/accounts/employee:e-1"), 404, "employee_not_found")


async def test_put_employee_bad_email(api: Api, client: AsyncTestClient[Any]) -> None:
    """A malformed email answers 400 invalid_request whose errors[] name the $.email path."""
    await api.department("eng")
    paths = {}
    for email in ["not-an-email", "a@b@c", "a b@example.com"]:
        r = await client.put(
            "/v1/employees/e-1", json={"name": "A", "email": email, "department": "eng"}
        )
        body = problem(r, 400, "invalid_request")
        assert isinstance(body.get("errors"), list) and body["errors"], body
        paths[email] = [e["path"] for e in body["errors"]]
    problem(await client.get("/v1/employees/e-1"), 404, "employee_not_found")
    assert paths == {email: ["$.email"] for email in paths}


async def test_put_employee_unknown_field(api: Api, client: AsyncTestClient[Any]) -> None:
    """An unknown field in an employee body answers 400 invalid_request."""
    await api.department("eng")
    r = await client.put(
        "/v1/employees/e-1",
        json={"name": "A", "email": "a@example.com", "department": "eng", "role": "x"},
    )
    problem(r, 400, "invalid_request")
    problem(await client.get("/v1/employees/e-1"), 404, "employee_not_found")


async def test_put_employee_bad_id(api: Api, client: AsyncTestClient[Any]) -> None:
    """An employee id that does not match the ref pattern answers 400 invalid_request."""
    await api.department("eng")
    r = await client.put(
        "/v1/employees/E_1", json={"name": "A", "email": "a@example.com", "department": "eng"}
    )
    problem(r, 400, "invalid_request")


async def test_get_employee_with_wallet(api: Api, client: AsyncTestClient[Any]) -> None:
    """GET of an employee returns their record with the current wallet balance."""
    await api.employee("e-1")
    await api.grant("e-1", 250)
    assert (await api.debit("employee:e-1", 50)).status_code == 201
    r = await client.get("/v1/employees/e-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "e-1" and body["department"] == "eng" and body["status"] == "active"
    wallet = body["wallet"]
    assert wallet["address"] == "employee:e-1"
    assert (wallet["posted"], wallet["reserved"], wallet["available"]) == (200, 0, 200)
    assert wallet["status"] == "open"


async def test_get_employee_not_found(client: AsyncTestClient[Any]) -> None:
    """GET of an unknown employee answers 404 employee_not_found."""
    problem(await client.get("/v1/employees/nobody"), 404, "employee_not_found")


# Offboarding ------------------------------------------------------------------


async def test_offboard_requires_idempotency_key(api: Api, client: AsyncTestClient[Any]) -> None:
    """Offboarding without an Idempotency-Key answers 400 idempotency_key_required and leaves the
    wallet open."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    problem(
        await client.post("/v1/employees/e-1/offboard", json={}), 400, "idempotency_key_required"
    )
    acct = await api.account("employee:e-1")
    assert acct["status"] == "open" and acct["posted"] == 100


async def test_offboard_voids_lots_back_to_issuance(api: Api, client: AsyncTestClient[Any]) -> None:
    """Offboarding voids the wallet's remaining credits back to system:issuance in one void
    transaction and closes it."""
    await api.employee("e-1")
    await api.grant("e-1", 100)
    await api.grant("e-1", 50, expires_at="2099-01-01T00:00:00Z")
    assert (await api.debit("employee:e-1", 30)).status_code == 201
    assert await posted(api, "system:issuance") == -150

    r = await client.post("/v1/employees/e-1/offboard", json={"memo": "left"}, headers=key())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "offboarded" and body["offboarded_at"] is not None
    assert body["wallet"]["status"] == "closed" and body["wallet"]["posted"] == 0

    # 120 left in the wallet went back: issuance is down only by what was spent.
    assert await posted(api, "system:issuance") == -30
    assert await posted(api, "system:usage") == 30
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["available"], acct["status"]) == (0, 0, "closed")
    assert (await client.get("/v1/accounts/employee:e-1/lots")).json()["items"] == []

    void = await client.get(f"/v1/transactions/{body['void_transaction_id']}")
    assert void.status_code == 200, void.text
    assert void.json()["kind"] == "void"
    legs = {(e["account"], e["amount"]) for e in void.json()["entries"]}
    assert ("employee:e-1", -120) in legs
    assert sum(a for acc, a in legs if acc == "system:issuance") == 120

    r = await client.get("/v1/employees/e-1")
    assert r.status_code == 200 and r.json()["status"] == "offboarded"


async def test_offboard_returns_department_funded_lots_to_department(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Offboarding returns the remainder of a department-funded lot to the department account."""
    await api.employee("e-1")
    assert (await api.transfer("system:issuance", "department:eng", 1000)).status_code == 201
    await api.grant("e-1", 300, funded_by="department:eng")
    await api.grant("e-1", 40)
    assert (await api.debit("employee:e-1", 100)).status_code == 201
    assert await api.available("department:eng") == 700

    r = await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    # The debit took 100 from the department lot (same priority, both never expire, it is older).
    assert await api.available("department:eng") == 900
    assert await posted(api, "department:eng") == 900
    assert await posted(api, "system:issuance") == -1000
    assert await api.available("employee:e-1") == 0

    # The department can spend what came back.
    assert (await api.transfer("department:eng", "system:issuance", 900)).status_code == 201
    assert await api.available("department:eng") == 0


async def test_offboarded_wallet_refuses_writes(api: Api, client: AsyncTestClient[Any]) -> None:
    """After offboarding, grants, debits and transfers to or from the wallet answer 409
    account_closed."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 100)
    await api.grant("e-2", 100)
    assert (
        await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    ).status_code == 200

    r = await client.post(
        "/v1/grants", json={"employee": "e-1", "amount": 10, "reason": "spot_bonus"}, headers=key()
    )
    problem(r, 409, "account_closed")
    problem(await api.debit("employee:e-1", 1), 409, "account_closed")
    problem(await api.transfer("employee:e-2", "employee:e-1", 10), 409, "account_closed")
    problem(await api.transfer("employee:e-1", "employee:e-2", 10), 409, "account_closed")

    assert await api.available("employee:e-2") == 100
    assert (await api.account("employee:e-1"))["posted"] == 0
    assert await posted(api, "system:issuance") == -100


async def test_second_offboard_is_account_closed(api: Api, client: AsyncTestClient[Any]) -> None:
    """A second offboard with a new Idempotency-Key answers 409 account_closed."""
    await api.employee("e-1")
    assert (
        await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    ).status_code == 200
    problem(
        await client.post("/v1/employees/e-1/offboard", json={}, headers=key()),
        409,
        "account_closed",
    )


async def test_put_offboarded_employee_is_account_closed(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """PUT on an offboarded employee answers 409 account_closed and leaves them offboarded."""
    await api.employee("e-1")
    assert (
        await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    ).status_code == 200
    r = await client.put(
        "/v1/employees/e-1", json={"name": "Back", "email": "e-1@example.com", "department": "eng"}
    )
    problem(r, 409, "account_closed")
    r = await client.get("/v1/employees/e-1")
    assert r.json()["status"] == "offboarded" and r.json()["name"] == "e-1"


async def test_offboard_unknown_employee(client: AsyncTestClient[Any]) -> None:
    """Offboarding an unknown employee answers 404 employee_not_found."""
    problem(
        await client.post("/v1/employees/nobody/offboard", json={}, headers=key()),
        404,
        "employee_not_found",
    )


async def test_offboarding_returns_credits_a_released_hold_frees_on_a_voided_lot(
    api: Api, client: AsyncTestClient[Any], database_url: str
) -> None:
    """Grant 100, reserve 40, void the lot (60 go back), offboard: the 40 the
    released reservation frees go back to the funder too, the closed wallet
    holds nothing, and the audit agrees."""
    from tests.api.conftest import assert_audit_clean

    await api.employee("e-1")
    lot = (await api.grant("e-1", 100))["lot"]
    r = await client.post(
        "/v1/reservations", json={"account": "employee:e-1", "amount": 40}, headers=key()
    )
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert await posted(api, "system:issuance") == -40

    r = await client.post("/v1/employees/e-1/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["reserved"], acct["status"]) == (0, 0, "closed")
    assert await posted(api, "system:issuance") == 0
    await assert_audit_clean(database_url)
