"""CSV imports of employees and grants (issue 16, API.md "Directory and bulk import")."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service.config import Config
from tests.api.conftest import Api, assert_audit_clean, problem

CSV = {"Content-Type": "text/csv"}


@pytest.fixture
def config(config: Config) -> Config:
    return msgspec.structs.replace(config, approval_threshold=10_000)


async def upload(client: AsyncTestClient[Any], what: str, text: str, dry_run: bool = False) -> Any:
    path = f"/v1/imports/{what}" + ("?dry_run=true" if dry_run else "")
    return await client.post(path, content=text.encode(), headers=CSV)


EMPLOYEES = (
    "id,name,email,department\n"
    "e-1,Ada,ada@example.com,eng\n"  # 2 created
    "e-2,Alan,alan@example.com,eng\n"  # 3 updated (exists with another name)
    "e-3,Grace,grace@example.com,eng\n"  # 4 duplicate (exists, same values)
    "e-1,Ada,ada@example.com,eng\n"  # 5 duplicate of line 2
    "e-1,Ada L,ada@example.com,eng\n"  # 6 rejected: line 2 says otherwise
    "e-4,Bad,not-an-email,eng\n"  # 7 rejected: email
    "e-5,Lost,lost@example.com,nowhere\n"  # 8 rejected: department
    "e-6,Short,short@example.com\n"  # 9 rejected: a field missing
    "e-7,Gone,gone@example.com,eng\n"  # 10 rejected: offboarded
    "\n"
    'e-8,"Hopper, Grace",g8@example.com,eng\n'  # 12 created
)


async def directory(client: AsyncTestClient[Any]) -> list[Any]:
    r = await client.get("/v1/employees?limit=500")
    return [
        (e["id"], e["name"], e["email"], e["department"], e["status"]) for e in r.json()["items"]
    ]


async def seed(api: Api, client: AsyncTestClient[Any]) -> None:
    await api.department("eng")
    r = await client.put(
        "/v1/employees/e-2", json={"name": "Old", "email": "alan@example.com", "department": "eng"}
    )
    assert r.status_code == 201
    await api.employee("e-3")
    r = await client.put(
        "/v1/employees/e-3",
        json={"name": "Grace", "email": "grace@example.com", "department": "eng"},
    )
    await api.employee("e-7")
    r = await client.post(
        "/v1/employees/e-7/offboard", json={}, headers={"Idempotency-Key": "off-7"}
    )
    assert r.status_code == 200, r.text


async def test_import_employees_per_row_results(api: Api, client: AsyncTestClient[Any]) -> None:
    """Good rows, duplicates, bad emails, unknown departments, short rows and offboarded
    employees each get the right per-row result; a dry run reports the same and changes nothing;
    uploading again changes nothing."""
    await seed(api, client)
    before = await directory(client)

    dry = await upload(client, "employees", EMPLOYEES, dry_run=True)
    assert dry.status_code == 200, dry.text
    assert await directory(client) == before
    assert problem(await client.get("/v1/accounts/employee:e-1"), 404, "employee_not_found")

    r = await upload(client, "employees", EMPLOYEES)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == dry.json()
    assert (body["rows"], body["created"], body["updated"], body["duplicate"]) == (10, 2, 1, 2)
    codes = {x["line"]: x["code"] for x in body["rejected"]}
    assert codes == {
        6: "invalid_request",
        7: "invalid_request",
        8: "department_not_found",
        9: "invalid_request",
        10: "account_closed",
    }
    assert "$.email" in next(x["detail"] for x in body["rejected"] if x["line"] == 7)
    after = await directory(client)
    assert ("e-1", "Ada", "ada@example.com", "eng", "active") in after
    assert ("e-2", "Alan", "alan@example.com", "eng", "active") in after
    assert ("e-8", "Hopper, Grace", "g8@example.com", "eng", "active") in after
    assert (await api.account("employee:e-8"))["status"] == "open"

    again = await upload(client, "employees", EMPLOYEES)
    assert again.status_code == 200
    assert (again.json()["created"], again.json()["updated"]) == (0, 0)
    assert again.json()["duplicate"] == 5
    assert await directory(client) == after


async def test_import_wrong_columns(api: Api, client: AsyncTestClient[Any]) -> None:
    """An unknown, missing or repeated column, or a body that is not text/csv, answers 400 and
    imports nothing."""
    await api.department("eng")
    for text in (
        "id,name,email,department,colour\ne-1,A,a@example.com,eng,blue\n",
        "id,name,department\ne-1,A,eng\n",
        "id,name,email,email,department\ne-1,A,a@example.com,a@example.com,eng\n",
        "",
    ):
        problem(await upload(client, "employees", text), 400, "invalid_request")
    r = await client.post("/v1/imports/employees", json={"id": "e-1"})
    problem(r, 400, "invalid_request")
    assert await directory(client) == []


GRANTS = (
    "key,employee,amount,reason,expires_at\n"
    "g-1,e-1,100,spot_bonus,\n"  # 2 created
    "g-2,e-2,200,signing_bonus,2030-01-01T00:00:00Z\n"  # 3 created
    "g-1,e-1,100,spot_bonus,\n"  # 4 duplicate of line 2
    "g-1,e-1,999,spot_bonus,\n"  # 5 rejected: key reused
    "g-3,e-404,100,spot_bonus,\n"  # 6 rejected: no such employee
    "g-4,e-1,-5,spot_bonus,\n"  # 7 rejected: amount
    "g-5,e-1,100,gift,\n"  # 8 rejected: reason
    "g-6,e-2,50000,spot_bonus,\n"  # 9 approval required
)


async def test_import_grants(api: Api, client: AsyncTestClient[Any]) -> None:
    """Grant rows are idempotent by key: the right per-row results, a dry run changes nothing, a
    re-upload changes nothing, and a row above the approval threshold waits for an approval."""
    await api.employee("e-1")
    await api.employee("e-2")
    dry = await upload(client, "grants", GRANTS, dry_run=True)
    assert dry.status_code == 200, dry.text
    assert (await api.account("employee:e-1"))["posted"] == 0
    assert (await client.get("/v1/approvals")).json()["items"] == []

    r = await upload(client, "grants", GRANTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["rows"], body["created"], body["updated"], body["duplicate"]) == (8, 2, 0, 1)
    codes = {x["line"]: x["code"] for x in body["rejected"]}
    assert codes == {
        5: "idempotency_key_reused",
        6: "employee_not_found",
        7: "invalid_request",
        8: "invalid_request",
        9: "approval_required",
    }
    held = next(x for x in body["rejected"] if x["line"] == 9)
    assert held["approval"].startswith("apr_")
    # The dry run said the same, except that it stored no approval.
    assert [{k: v for k, v in x.items() if k != "approval"} for x in dry.json()["rejected"]] == [
        {k: v for k, v in x.items() if k != "approval"} for x in body["rejected"]
    ]
    assert (await api.account("employee:e-1"))["posted"] == 100
    assert (await api.account("employee:e-2"))["posted"] == 200

    again = await upload(client, "grants", GRANTS)
    assert (again.json()["created"], again.json()["duplicate"]) == (0, 3)
    assert (
        next(x for x in again.json()["rejected"] if x["line"] == 9)["approval"] == held["approval"]
    )
    assert (await api.account("employee:e-1"))["posted"] == 100
    assert (await api.account("employee:e-2"))["posted"] == 200
    approvals = (await client.get("/v1/approvals")).json()["items"]
    assert [a["id"] for a in approvals] == [held["approval"]]
    # An imported key means the same grant to POST /v1/grants:batch.
    batch = {"grants": [{"key": "g-1", "employee": "e-1", "amount": 100, "reason": "spot_bonus"}]}
    r = await client.post("/v1/grants:batch", json=batch)
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["status"] == "duplicate" and result["transaction_id"].startswith("txn_")
    assert (await api.account("employee:e-1"))["posted"] == 100


async def test_import_grants_emit_grant_created_once_each(
    api: Api, client: AsyncTestClient[Any], database_url: str
) -> None:
    """Each imported grant puts one grant.created event in the outbox (written set-based, by a
    statement trigger over the inserted lots), with its lot, account and reason; a re-upload
    emits nothing more."""
    from service import db as service_db

    for n in range(3):
        await api.employee(f"g-{n}")
    text = "key,employee,amount,reason,expires_at\n" + "".join(
        f"k-{n},g-{n},{10 + n},signing_bonus,2030-01-01T00:00:00Z\n" for n in range(3)
    )
    r = await upload(client, "grants", text)
    assert r.status_code == 200 and r.json()["created"] == 3, r.text
    r = await upload(client, "grants", text)
    assert r.json()["duplicate"] == 3, r.text
    conn = await service_db.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT data, dedup_key FROM outbox WHERE type = 'grant.created' ORDER BY seq"
        )
        lots = {
            f"lot_{rec['id'].hex}": rec
            for rec in await conn.fetch("SELECT id, amount, account_id FROM lots")
        }
    finally:
        await conn.close()
    assert len(rows) == 3
    got = sorted((r["data"]["account"], r["data"]["amount"], r["data"]["reason"]) for r in rows)
    assert got == [(f"employee:g-{n}", 10 + n, "signing_bonus") for n in range(3)]
    for r in rows:
        assert r["data"]["lot_id"] in lots and r["dedup_key"] == "grant.created:" + str(
            lots[r["data"]["lot_id"]]["id"]
        )
        assert r["data"]["expires_at"] == "2030-01-01T00:00:00.000000Z"
        assert r["data"]["transaction_id"].startswith("txn_")


async def test_import_grants_chunks_posted_concurrently(
    api: Api, client: AsyncTestClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of one import post two at a time; chunks granting to the same wallets (locked
    in id order) all post, each row once, and the balances are the sums."""
    import service.api.imports as api_imports

    monkeypatch.setattr(api_imports, "GRANT_CHUNK_ROWS", 2)
    for n in range(3):
        await api.employee(f"c-{n}")
    text = "key,employee,amount,reason\n" + "".join(
        f"ck-{i},c-{i % 3},{i + 1},spot_bonus\n" for i in range(11)
    )
    r = await upload(client, "grants", text)
    assert r.status_code == 200, r.text
    assert (r.json()["created"], r.json()["rejected"]) == (11, [])
    for n in range(3):
        want = sum(i + 1 for i in range(11) if i % 3 == n)
        assert (await api.account(f"employee:c-{n}"))["posted"] == want
    r = await upload(client, "grants", text)
    assert r.json()["duplicate"] == 11 and r.json()["created"] == 0


async def test_import_grants_settle_what_is_due_first(
    api: Api, client: AsyncTestClient[Any], clock: Any, database_url: str
) -> None:
    """An imported grant to a wallet with something due settles it first, as a single grant
    does: a lot past its expiry is expired (in the journal, before the grant), a reservation
    past its expiry expires; wallets with nothing due in the same file are left alone."""
    from datetime import UTC, datetime, timedelta

    from tests.api.conftest import key

    start = datetime(2026, 3, 1, tzinfo=UTC)
    clock.set(start)
    for emp in ("d-lot", "d-held", "d-none"):
        await api.employee(emp)
    await api.grant("d-lot", 30, expires_at=(start + timedelta(days=1)).isoformat())
    await api.grant("d-held", 50)
    await api.grant("d-none", 70)
    r = await client.post(
        "/v1/reservations",
        json={"account": "employee:d-held", "amount": 20, "ttl_seconds": 60},
        headers=key(),
    )
    assert r.status_code == 201, r.text
    held = r.json()["id"]
    clock.set(start + timedelta(days=2))
    text = "key,employee,amount,reason\n" + "".join(
        f"due-{emp},{emp},5,spot_bonus\n" for emp in ("d-lot", "d-held", "d-none")
    )
    r = await upload(client, "grants", text)
    assert r.status_code == 200 and r.json()["created"] == 3, r.text
    expired = (await client.get("/v1/transactions", params={"kind": "expiry"})).json()["items"]
    assert len(expired) == 1
    assert [e["account"] for e in expired[0]["entries"] if e["amount"] < 0] == ["employee:d-lot"]
    assert (await client.get(f"/v1/reservations/{held}")).json()["status"] == "expired"
    assert await api.available("employee:d-lot") == 5
    assert await api.available("employee:d-held") == 55
    assert await api.available("employee:d-none") == 75
    await assert_audit_clean(database_url)
