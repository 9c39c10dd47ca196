"""Grants, batch grants and lot voids (API.md, Grants)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient

from tests.api.conftest import (
    Api,
    FakeClock,
    assert_audit_clean,
    key,
    mismatch,
    posted,
    problem,
    ts,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)


async def grant(client: AsyncTestClient[Any], **body: Any) -> Any:
    return await client.post(
        "/v1/grants",
        json={"employee": "e-1", "amount": 100, "reason": "spot_bonus", **body},
        headers=key(),
    )


# Single grants -----------------------------------------------------------------


async def test_grant_creates_lot(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """A grant answers 201 with a grant transaction (issuance -X, wallet +X) and a lot carrying its
    defaults."""
    clock.set(T0)
    await api.employee("e-1")
    r = await grant(
        client,
        amount=500,
        reason="signing_bonus",
        expires_at="2031-06-01T12:00:00+02:00",
        memo="welcome",
        metadata={"ticket": "HR-1"},
    )
    assert r.status_code == 201, r.text
    txn, lot = r.json()["transaction"], r.json()["lot"]
    assert txn["id"].startswith("txn_") and txn["kind"] == "grant"
    assert txn["memo"] == "welcome" and txn["metadata"] == {"ticket": "HR-1"}
    assert txn["details"]["reason"] == "signing_bonus"
    assert txn["created_at"] == ts(T0)
    legs = [(e["account"], e["amount"]) for e in txn["entries"]]
    assert sorted(legs) == [("employee:e-1", 500), ("system:issuance", -500)]
    wallet_leg = next(e for e in txn["entries"] if e["account"] == "employee:e-1")
    assert (wallet_leg["balance_after"], wallet_leg["version"]) == (500, 1)
    assert txn["lots"] == [{"lot_id": lot["id"], "amount": 500}]

    assert lot["id"].startswith("lot_") and len(lot["id"]) == 4 + 32
    assert lot["account"] == "employee:e-1"
    assert (lot["amount"], lot["remaining"], lot["reserved"]) == (500, 500, 0)
    assert lot["priority"] == 100
    assert lot["effective_at"] == ts(T0)
    assert lot["expires_at"] == "2031-06-01T10:00:00.000000Z"
    assert lot["funded_by"] == "system:issuance"
    assert lot["status"] == "active"
    assert lot["grant_transaction_id"] == txn["id"]

    assert await api.available("employee:e-1") == 500
    assert await posted(api, "system:issuance") == -500


async def test_grant_explicit_priority_and_effective_at(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A grant's priority and a past effective_at are stored on its lot, which is spendable at
    once."""
    clock.set(T0)
    await api.employee("e-1")
    r = await grant(client, priority=0, effective_at="2029-12-31T00:00:00Z")
    assert r.status_code == 201, r.text
    lot = r.json()["lot"]
    assert lot["priority"] == 0 and lot["effective_at"] == "2029-12-31T00:00:00.000000Z"
    assert lot["expires_at"] is None
    assert await api.available("employee:e-1") == 100


INVALID_GRANTS: list[tuple[str, dict[str, Any]]] = [
    ("amount zero", {"amount": 0}),
    ("amount negative", {"amount": -5}),
    ("amount fractional", {"amount": 1.5}),
    ("amount as string", {"amount": "5"}),
    ("amount above 2^53", {"amount": 2**53 + 1}),
    ("unknown reason", {"reason": "birthday"}),
    ("priority above 1000", {"priority": 1001}),
    ("priority negative", {"priority": -1}),
    ("expires_at without offset", {"expires_at": "2099-01-01T00:00:00"}),
    ("expires_at in the past", {"expires_at": "2029-12-31T23:59:59Z"}),
    ("expires_at equal to now", {"expires_at": "2030-01-01T00:00:00Z"}),
    (
        "expires_at before effective_at",
        {"effective_at": "2030-02-01T00:00:00Z", "expires_at": "2030-01-15T00:00:00Z"},
    ),
    ("unknown field", {"amout": 5}),
    ("funded_by not an address", {"funded_by": "issuance"}),
]


async def test_grant_invalid_body(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """Each malformed grant answers 400 invalid_request and moves no credits."""
    clock.set(T0)
    await api.employee("e-1")
    bad = {}
    for name, change in INVALID_GRANTS:
        why = mismatch(await grant(client, **change), 400, "invalid_request")
        if why:
            bad[name] = why
    assert bad == {}
    assert await posted(api, "employee:e-1") == 0
    assert await posted(api, "system:issuance") == 0
    r = await client.get("/v1/transactions", params={"account": "employee:e-1"})
    assert r.json()["items"] == []


async def test_grant_missing_reason(api: Api, client: AsyncTestClient[Any]) -> None:
    """A grant without a reason answers 400 invalid_request naming $.reason."""
    await api.employee("e-1")
    r = await client.post("/v1/grants", json={"employee": "e-1", "amount": 5}, headers=key())
    body = problem(r, 400, "invalid_request")
    assert any("reason" in e["path"] or "reason" in e.get("message", "") for e in body["errors"]), (
        body
    )
    assert await posted(api, "employee:e-1") == 0


async def test_grant_malformed_json(api: Api, client: AsyncTestClient[Any]) -> None:
    """A body that is not JSON answers 400 invalid_request."""
    await api.employee("e-1")
    r = await client.post(
        "/v1/grants",
        content=b'{"employee": "e-1", "amount": ',
        headers={**key(), "content-type": "application/json"},
    )
    problem(r, 400, "invalid_request")
    assert await posted(api, "employee:e-1") == 0


async def test_grant_largest_amount(api: Api, client: AsyncTestClient[Any]) -> None:
    """An amount of exactly 2^53 is accepted."""
    await api.employee("e-1")
    r = await grant(client, amount=2**53)
    assert r.status_code == 201, r.text
    assert await posted(api, "employee:e-1") == 2**53


async def test_grant_unknown_employee(api: Api, client: AsyncTestClient[Any]) -> None:
    """A grant to an unknown employee answers 404 employee_not_found."""
    problem(await grant(client, employee="nobody"), 404, "employee_not_found")
    assert await posted(api, "system:issuance") == 0


async def test_grant_funded_by_unknown_department(api: Api, client: AsyncTestClient[Any]) -> None:
    """A grant funded by an unknown department answers 404 department_not_found."""
    await api.employee("e-1")
    problem(await grant(client, funded_by="department:nope"), 404, "department_not_found")
    assert await posted(api, "employee:e-1") == 0


async def test_grant_funded_by_non_funder(api: Api, client: AsyncTestClient[Any]) -> None:
    """A grant funded by an employee wallet or a system account other than issuance answers 400
    invalid_request."""
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-2", 500)
    bad = {}
    for funder in ["employee:e-2", "system:usage", "system:expired"]:
        why = mismatch(await grant(client, funded_by=funder), 400, "invalid_request")
        if why:
            bad[funder] = why
    assert bad == {}
    assert await posted(api, "employee:e-1") == 0
    assert await posted(api, "employee:e-2") == 500


# Department funding ------------------------------------------------------------


async def test_department_funds_grants_up_to_its_balance(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """A department funded from system:issuance can grant what it holds; beyond that 409
    insufficient_credits changes nothing."""
    await api.employee("e-1")
    problem(await grant(client, amount=1, funded_by="department:eng"), 409, "insufficient_credits")
    assert (await api.transfer("system:issuance", "department:eng", 500)).status_code == 201
    assert await api.available("department:eng") == 500

    r = await grant(client, amount=300, funded_by="department:eng")
    assert r.status_code == 201, r.text
    assert r.json()["lot"]["funded_by"] == "department:eng"
    assert sorted((e["account"], e["amount"]) for e in r.json()["transaction"]["entries"]) == [
        ("department:eng", -300),
        ("employee:e-1", 300),
    ]
    assert await api.available("department:eng") == 200

    body = problem(
        await grant(client, amount=201, funded_by="department:eng"), 409, "insufficient_credits"
    )
    assert body["available"] == 200 and body["requested"] == 201
    assert await api.available("department:eng") == 200
    assert await posted(api, "employee:e-1") == 300
    assert await posted(api, "system:issuance") == -500

    r = await grant(client, amount=200, funded_by="department:eng")
    assert r.status_code == 201, r.text
    assert await api.available("department:eng") == 0
    assert await api.available("employee:e-1") == 500


async def test_department_lot_expiry_caps_grant_expiry(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A grant funded by expiring department credits expires no later than them."""
    clock.set(T0)
    await api.employee("e-1")
    await api.employee("e-2")
    dept_expiry = T0 + timedelta(days=30)
    await api.grant("e-2", 300, expires_at=dept_expiry.isoformat())
    assert (await api.transfer("employee:e-2", "department:eng", 300)).status_code == 201
    lots = (await client.get("/v1/accounts/department:eng/lots")).json()["items"]
    assert [lot["expires_at"] for lot in lots] == [ts(dept_expiry)]

    # No expiry asked: the lot takes the department credits' expiry.
    r = await grant(client, amount=100, funded_by="department:eng")
    assert r.status_code == 201, r.text
    assert r.json()["lot"]["expires_at"] == ts(dept_expiry)
    # A later expiry asked: capped at the department credits' expiry.
    r = await grant(
        client,
        amount=100,
        funded_by="department:eng",
        expires_at=(T0 + timedelta(days=90)).isoformat(),
    )
    assert r.status_code == 201, r.text
    assert r.json()["lot"]["expires_at"] == ts(dept_expiry)
    # An earlier expiry asked: kept.
    earlier = T0 + timedelta(days=10)
    r = await grant(client, amount=100, funded_by="department:eng", expires_at=earlier.isoformat())
    assert r.status_code == 201, r.text
    assert r.json()["lot"]["expires_at"] == ts(earlier)

    acct = await api.account("employee:e-1")
    assert acct["expiring"] == [
        {"amount": 100, "expires_at": ts(earlier)},
        {"amount": 200, "expires_at": ts(dept_expiry)},
    ]


# Pending lots ------------------------------------------------------------------


async def test_future_effective_at_makes_pending_lot(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """A grant with a future effective_at is pending, not spendable, until that instant, then
    spendable."""
    clock.set(T0)
    await api.employee("e-1")
    start = T0 + timedelta(days=1)
    r = await grant(client, amount=100, effective_at=start.isoformat())
    assert r.status_code == 201, r.text
    assert r.json()["lot"]["effective_at"] == ts(start)

    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["pending"], acct["available"]) == (100, 100, 0)
    lots = (await client.get("/v1/accounts/employee:e-1/lots")).json()["items"]
    assert [lot["remaining"] for lot in lots] == [100]

    body = problem(await api.debit("employee:e-1", 10), 409, "insufficient_credits")
    assert body["available"] == 0 and body["requested"] == 10

    clock.set(start - timedelta(microseconds=1))
    problem(await api.debit("employee:e-1", 10), 409, "insufficient_credits")
    assert (await api.account("employee:e-1"))["pending"] == 100

    clock.set(start)
    acct = await api.account("employee:e-1")
    assert (acct["posted"], acct["pending"], acct["available"]) == (100, 0, 100)
    r = await api.debit("employee:e-1", 10)
    assert r.status_code == 201, r.text
    assert await api.available("employee:e-1") == 90


# Batch grants ------------------------------------------------------------------


def item(k: str, emp: str = "e-1", amount: int = 10, **extra: Any) -> dict[str, Any]:
    return {"key": k, "employee": emp, "amount": amount, "reason": "monthly_allotment", **extra}


async def test_grant_batch_mixed_results(api: Api, client: AsyncTestClient[Any]) -> None:
    """A batch answers per-item created, duplicate and rejected results, in order, and only created
    items move credits."""
    await api.employee("e-1")
    await api.employee("e-2")
    assert (await api.transfer("system:issuance", "department:eng", 50)).status_code == 201

    r = await client.post(
        "/v1/grants:batch", json={"grants": [item("a", amount=10), item("b", amount=20)]}
    )
    assert r.status_code == 200, r.text
    first = r.json()["results"]
    assert [(x["key"], x["status"]) for x in first] == [("a", "created"), ("b", "created")]
    assert all(
        x["transaction_id"].startswith("txn_") and x["lot_id"].startswith("lot_") for x in first
    )
    assert await posted(api, "employee:e-1") == 30

    r = await client.post(
        "/v1/grants:batch",
        json={
            "grants": [
                item("a", amount=10),  # same key, same body
                item("b", amount=99),  # same key, different body
                item("c", emp="nobody"),  # unknown employee
                item(
                    "d", emp="e-2", amount=60, funded_by="department:eng"
                ),  # more than the department holds
                item("e", emp="e-2", amount=40, funded_by="department:eng"),
                item("f", emp="e-1", amount=5),
            ]
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["key"] for x in results] == ["a", "b", "c", "d", "e", "f"]
    assert [x["status"] for x in results] == [
        "duplicate",
        "rejected",
        "rejected",
        "rejected",
        "created",
        "created",
    ]
    assert results[0]["transaction_id"] == first[0]["transaction_id"]
    assert results[0]["lot_id"] == first[0]["lot_id"]
    assert results[1]["code"] == "idempotency_key_reused"
    assert results[2]["code"] == "employee_not_found"
    assert results[3]["code"] == "insufficient_credits"
    for x in results[1:4]:
        assert x.get("transaction_id") is None and x.get("lot_id") is None

    assert await posted(api, "employee:e-1") == 35
    assert await posted(api, "employee:e-2") == 40
    assert await api.available("department:eng") == 10
    assert await posted(api, "system:issuance") == -85

    got = await client.get(f"/v1/transactions/{results[4]['transaction_id']}")
    assert got.status_code == 200 and got.json()["kind"] == "grant"


async def test_grant_batch_of_1000_to_one_wallet(
    api: Api, client: AsyncTestClient[Any], database_url: str
) -> None:
    """1,000 grants to one wallet in one batch all succeed within the statement timeout (15 s in
    these tests; one row update per item made this O(n^2) and over 5 s), each once: a replay of
    the batch answers 1,000 duplicates and moves nothing."""
    await api.employee("e-1")
    items = [item(f"k{i}", amount=i + 1, priority=i % 7) for i in range(1000)]
    r = await client.post("/v1/grants:batch", json={"grants": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["key"] for x in results] == [f"k{i}" for i in range(1000)]
    assert {x["status"] for x in results} == {"created"}
    assert len({x["transaction_id"] for x in results}) == 1000
    assert len({x["lot_id"] for x in results}) == 1000
    total = sum(range(1, 1001))
    assert await posted(api, "employee:e-1") == total
    assert await api.available("employee:e-1") == total
    assert await posted(api, "system:issuance") == -total

    got = await client.get(f"/v1/transactions/{results[999]['transaction_id']}")
    assert got.status_code == 200, got.text
    assert [(e["account"], e["amount"]) for e in got.json()["entries"]] == [
        ("system:issuance", -1000),
        ("employee:e-1", 1000),
    ]

    again = await client.post("/v1/grants:batch", json={"grants": items})
    assert again.status_code == 200, again.text
    replayed = again.json()["results"]
    assert {x["status"] for x in replayed} == {"duplicate"}
    assert [x["transaction_id"] for x in replayed] == [x["transaction_id"] for x in results]
    assert await posted(api, "employee:e-1") == total
    await assert_audit_clean(database_url)


async def test_grant_batch_empty(client: AsyncTestClient[Any]) -> None:
    """An empty batch answers 400 invalid_request."""
    problem(await client.post("/v1/grants:batch", json={"grants": []}), 400, "invalid_request")


async def test_grant_batch_too_many(api: Api, client: AsyncTestClient[Any]) -> None:
    """A batch of 1001 items answers 400 invalid_request and grants nothing."""
    await api.employee("e-1")
    items = [item(f"k{i}", amount=1) for i in range(1001)]
    problem(await client.post("/v1/grants:batch", json={"grants": items}), 400, "invalid_request")
    assert await posted(api, "employee:e-1") == 0


async def test_grant_batch_duplicate_keys(api: Api, client: AsyncTestClient[Any]) -> None:
    """A batch that repeats a key answers 400 invalid_request and grants nothing."""
    await api.employee("e-1")
    r = await client.post(
        "/v1/grants:batch", json={"grants": [item("x"), item("y"), item("x", amount=11)]}
    )
    problem(r, 400, "invalid_request")
    assert await posted(api, "employee:e-1") == 0


async def test_grant_batch_invalid_item(api: Api, client: AsyncTestClient[Any]) -> None:
    """A malformed item fails the whole batch with 400 invalid_request naming its path."""
    await api.employee("e-1")
    r = await client.post("/v1/grants:batch", json={"grants": [item("x"), item("y", amount=0)]})
    body = problem(r, 400, "invalid_request")
    assert body["errors"][0]["path"] == "$.grants[1].amount", body
    assert await posted(api, "employee:e-1") == 0


# Lot voids ---------------------------------------------------------------------


async def test_void_lot_returns_remainder_to_issuance(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Voiding a lot answers 200 with a void transaction that returns its unspent remainder to
    system:issuance."""
    await api.employee("e-1")
    lot = (await api.grant("e-1", 100))["lot"]
    other = (await api.grant("e-1", 5, priority=500))["lot"]
    assert (await api.debit("employee:e-1", 30)).status_code == 201

    r = await client.post(f"/v1/lots/{lot['id']}/void", json={"memo": "mistake"}, headers=key())
    assert r.status_code == 200, r.text
    txn = r.json()
    assert txn["kind"] == "void" and txn["memo"] == "mistake"
    assert sorted((e["account"], e["amount"]) for e in txn["entries"]) == [
        ("employee:e-1", -70),
        ("system:issuance", 70),
    ]
    assert txn["lots"] == [{"lot_id": lot["id"], "amount": -70}]

    assert await posted(api, "employee:e-1") == 5
    assert await posted(api, "system:issuance") == -35
    lots = (await client.get("/v1/accounts/employee:e-1/lots")).json()["items"]
    assert [x["id"] for x in lots] == [other["id"]]

    problem(
        await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key()),
        409,
        "lot_not_active",
    )
    assert await posted(api, "system:issuance") == -35


async def test_void_department_funded_lot_returns_to_department(
    api: Api, client: AsyncTestClient[Any]
) -> None:
    """Voiding a department-funded lot returns its remainder to the department, which can spend it
    again."""
    await api.employee("e-1")
    assert (await api.transfer("system:issuance", "department:eng", 100)).status_code == 201
    lot = (await api.grant("e-1", 80, funded_by="department:eng"))["lot"]
    assert (await api.debit("employee:e-1", 30)).status_code == 201
    assert await api.available("department:eng") == 20

    r = await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key())
    assert r.status_code == 200, r.text
    legs = {e["account"]: e["amount"] for e in r.json()["entries"]}
    assert legs == {"employee:e-1": -50, "department:eng": 50}
    assert await api.available("department:eng") == 70
    assert await api.available("employee:e-1") == 0
    assert await posted(api, "system:issuance") == -100
    r = await grant(client, amount=70, funded_by="department:eng")
    assert r.status_code == 201, r.text


async def test_void_expired_lot(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """Voiding a lot that has expired answers 409 lot_not_active."""
    clock.set(T0)
    await api.employee("e-1")
    lot = (await api.grant("e-1", 100, expires_at=(T0 + timedelta(hours=1)).isoformat()))["lot"]
    clock.set(T0 + timedelta(hours=1))
    body = problem(
        await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key()),
        409,
        "lot_not_active",
    )
    # The lot's state is `lot_status`; `status` is the HTTP status.
    assert (body["lot_status"], body["status"]) == ("expired", 409), body
    assert await posted(api, "system:issuance") == -100
    assert await api.available("employee:e-1") == 0


async def test_void_fully_spent_lot(api: Api, client: AsyncTestClient[Any]) -> None:
    """Voiding a lot with nothing left answers 409 lot_not_active."""
    await api.employee("e-1")
    lot = (await api.grant("e-1", 10))["lot"]
    assert (await api.debit("employee:e-1", 10)).status_code == 201
    body = problem(
        await client.post(f"/v1/lots/{lot['id']}/void", json={}, headers=key()),
        409,
        "lot_not_active",
    )
    assert body["lot_status"] == "depleted", body


async def test_void_unknown_lot(client: AsyncTestClient[Any]) -> None:
    """Voiding an unknown or malformed lot id answers 404 lot_not_found."""
    bad = {}
    for lot_id in [
        "lot_" + "0" * 32,
        "lot_0123456789abcdef0123456789abcdef",
        "garbage",
        "lot_xyz",
        "txn_" + "0" * 32,
    ]:
        why = mismatch(
            await client.post(f"/v1/lots/{lot_id}/void", json={}, headers=key()),
            404,
            "lot_not_found",
        )
        if why:
            bad[lot_id] = why
    assert bad == {}
