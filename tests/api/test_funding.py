"""GET /v1/reports/funding: each department's funding against its spend over
a period (issue 15, the finance page), checked against the journal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.api.conftest import Api, FakeClock, key, problem
from tests.api.test_usage import add_price, event, recorded

SPEND = ("debit", "usage", "capture")
FUNDING = ("transfer", "grant")


async def ledger_figures(
    client: Any, dept: str, members: list[str], frm: str, to: str
) -> dict[str, int]:
    """The department's funded and spent credits over [frm, to), added up from
    the journal's entries as the API lists them (a reversal counts as what it
    reverses, negated)."""

    async def entries(address: str) -> list[dict[str, Any]]:
        r = await client.get(
            f"/v1/accounts/{address}/entries", params={"from": frm, "to": to, "limit": 500}
        )
        assert r.status_code == 200, r.text
        assert r.json()["next_cursor"] is None
        return r.json()["items"]  # type: ignore[no-any-return]

    async def reversed_kind(transaction_id: str) -> str:
        txn = (await client.get(f"/v1/transactions/{transaction_id}")).json()
        return (await client.get(f"/v1/transactions/{txn['reverses']}")).json()["kind"]  # type: ignore[no-any-return]

    funded = 0
    for e in await entries(f"department:{dept}"):
        if e["kind"] in FUNDING and e["amount"] > 0:
            funded += e["amount"]
        elif e["kind"] == "reversal" and e["amount"] < 0:
            if await reversed_kind(e["transaction_id"]) in FUNDING:
                funded += e["amount"]
    spent = 0
    for address in [f"department:{dept}", *(f"employee:{m}" for m in members)]:
        for e in await entries(address):
            if e["kind"] in SPEND or (
                e["kind"] == "reversal" and await reversed_kind(e["transaction_id"]) in SPEND
            ):
                spent -= e["amount"]
    return {"funded": funded, "spent": spent}


async def test_funding_against_spend_equals_the_ledger(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """Over a constructed period: transfers and grants into a department count
    as its funding (less their reversals; its own grants and transfers out do
    not), debits, usage and captures of its account and its employees count
    as its spend (less their reversals); nothing before or after the period
    counts; the figures equal the journal's, and the CSV is the same report."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)
    end = start + timedelta(days=10)
    clock.set(start - timedelta(days=1))
    for dept in ("eng", "ops", "sales"):
        await api.department(dept)
    await api.employee("e-1", "eng")
    await api.employee("e-2", "eng")
    await api.employee("e-3", "sales")
    await add_price(client, start - timedelta(days=30))
    for emp in ("e-1", "e-2", "e-3"):
        await api.grant(emp, 100_000)

    async def transfer(src: str, dst: str, amount: int) -> dict[str, Any]:
        r = await api.transfer(src, dst, amount)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def debit(account: str, amount: int) -> dict[str, Any]:
        r = await api.debit(account, amount)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def reverse(txn: dict[str, Any]) -> None:
        r = await client.post(f"/v1/transactions/{txn['id']}/reverse", json={}, headers=key())
        assert r.status_code == 201, r.text

    # Before the period: funding and spend that must not count.
    await transfer("system:issuance", "department:eng", 1_000)
    await debit("employee:e-1", 11)
    # In the period.
    clock.set(start + timedelta(hours=1))
    await transfer("system:issuance", "department:eng", 50_000)
    await transfer("system:issuance", "department:sales", 20_000)
    undone = await transfer("system:issuance", "department:sales", 5_000)
    await reverse(undone)
    await api.grant("e-2", 3_000, funded_by="department:eng")
    await transfer("department:eng", "department:sales", 1_000)
    clock.set(start + timedelta(days=2))
    await debit("employee:e-1", 700)
    used = await recorded(client, event("f-1", account="employee:e-1", project="alpha"))
    await reverse(await debit("employee:e-2", 300))
    await debit("department:eng", 400)
    await debit("employee:e-3", 250)
    rsv = await client.post(
        "/v1/reservations", json={"account": "employee:e-2", "amount": 90}, headers=key()
    )
    assert rsv.status_code == 201, rsv.text
    r = await client.post(
        f"/v1/reservations/{rsv.json()['id']}/capture", json={"amount": 60}, headers=key()
    )
    assert r.status_code == 200, r.text
    # After the period.
    clock.set(end + timedelta(hours=1))
    await transfer("system:issuance", "department:sales", 7_000)
    await debit("employee:e-3", 13)
    clock.now = None

    frm, to = start.isoformat(), end.isoformat()
    r = await client.get("/v1/reports/funding", params={"from": frm, "to": to})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert items == [
        {"department": "eng", "funded": 50_000, "spent": 700 + used["cost"] + 400 + 60},
        {"department": "ops", "funded": 0, "spent": 0},
        {"department": "sales", "funded": 21_000, "spent": 250},
    ]
    members = {"eng": ["e-1", "e-2"], "ops": [], "sales": ["e-3"]}
    for item in items:
        dept = item["department"]
        assert await ledger_figures(client, dept, members[dept], frm, to) == {
            "funded": item["funded"],
            "spent": item["spent"],
        }, dept
    csv = await client.get(
        "/v1/reports/funding", params={"from": frm, "to": to}, headers={"Accept": "text/csv"}
    )
    assert csv.status_code == 200
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text == "department,funded,spent\r\n" + "".join(
        f"{i['department']},{i['funded']},{i['spent']}\r\n" for i in items
    )


async def test_funding_counts_spend_in_the_department_of_its_day(
    client: Any, api: Api, clock: FakeClock
) -> None:
    """An employee who moves counts in the old department for the days before
    the move and in the new one after it."""
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=10
    )
    clock.set(start + timedelta(hours=1))
    await api.department("eng")
    await api.department("sales")
    await api.employee("e-1", "eng")
    await api.grant("e-1", 10_000)
    r = await api.debit("employee:e-1", 100)
    assert r.status_code == 201, r.text
    clock.set(start + timedelta(days=3, hours=1))
    moved = await client.put(
        "/v1/employees/e-1",
        json={"name": "e-1", "email": "e-1@example.com", "department": "sales"},
    )
    assert moved.status_code == 200, moved.text
    clock.set(start + timedelta(days=4, hours=1))
    r = await api.debit("employee:e-1", 40)
    assert r.status_code == 201, r.text
    clock.now = None
    r = await client.get(
        "/v1/reports/funding",
        params={"from": start.isoformat(), "to": (start + timedelta(days=8)).isoformat()},
    )
    assert r.status_code == 200, r.text
    assert {i["department"]: i["spent"] for i in r.json()["items"]} == {"eng": 100, "sales": 40}


async def test_funding_period_is_checked(client: Any) -> None:
    """A period that ends before it starts is refused."""
    r = await client.get(
        "/v1/reports/funding",
        params={"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    )
    problem(r, 400, "invalid_request")
