"""Finance reports: liability, compensation, forecast, efficiency (issue 16, API.md "Reports")."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from service import db as service_db
from service.config import Config
from service.finance import depletion
from tests.api.conftest import Api, FakeClock, key, problem
from tests.api.test_report_periods import archive_before

T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def config(config: Config) -> Config:
    return msgspec.structs.replace(config, credit_value="EUR 0.0125")


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def balance_at(client: AsyncTestClient[Any], address: str, at: datetime) -> int:
    r = await client.get(f"/v1/accounts/{address}/balance", params={"at": iso(at)})
    assert r.status_code == 200, r.text
    return int(r.json()["posted"])


async def all_pages(client: AsyncTestClient[Any], path: str, params: dict[str, Any]) -> list[Any]:
    items: list[Any] = []
    cursor = None
    while True:
        q = {**params, "limit": 3, **({"cursor": cursor} if cursor else {})}
        r = await client.get(path, params=q)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items


async def test_liability_outstanding_equals_balances_after_random_run(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """After a randomized run of grants, debits, expiries, voids, reversals and transfers, the
    liability report's outstanding equals the sum of wallet balances at `to` (per employee and in
    total, whatever the grouping), opening equals the balances at `from`, and each row adds up."""
    rng = random.Random(16)  # noqa: S311  # why: reproducible test data
    emps = [f"e-{i}" for i in range(6)]
    clock.set(T0 - timedelta(days=3))
    for i, emp in enumerate(emps):
        await api.employee(emp, "eng" if i % 2 else "ops")
        await api.grant(emp, 500, expires_at=iso(T0 + timedelta(days=5)))
    grants: list[str] = []
    lots: list[str] = []
    for step in range(60):
        clock.set(T0 + timedelta(hours=6 * step + 1))
        emp = rng.choice(emps)
        op = rng.choice(
            ("grant", "grant", "debit", "debit", "transfer", "void", "reverse", "sweep")
        )
        if op == "grant":
            expires = rng.choice((None, clock.now + timedelta(days=rng.randint(1, 10))))  # type: ignore[operator]
            body = {"expires_at": iso(expires)} if expires else {}
            g = await api.grant(emp, rng.randint(10, 300), **body)
            grants.append(g["transaction"]["id"])
            lots.append(g["lot"]["id"])
        elif op == "debit":
            await api.debit(f"employee:{emp}", rng.randint(1, 120))
        elif op == "transfer":
            await api.transfer(
                f"employee:{emp}", f"employee:{rng.choice(emps)}", rng.randint(1, 50)
            )
        elif op == "void" and lots:
            await client.post(
                f"/v1/lots/{lots.pop(rng.randrange(len(lots)))}/void", json={}, headers=key()
            )
        elif op == "reverse" and grants:
            await client.post(
                f"/v1/transactions/{grants.pop(rng.randrange(len(grants)))}/reverse",
                json={},
                headers=key(),
            )
        elif op == "sweep":
            await client.app.state.ledger.fetchval(
                "sweep_expired", 100, {"actor": "t", "now": iso(clock.now)}
            )  # type: ignore[attr-defined,arg-type]
    clock.set(T0 + timedelta(days=20))
    start, end = T0 + timedelta(days=1, hours=3), T0 + timedelta(days=12)
    wallets = {emp: await balance_at(client, f"employee:{emp}", end) for emp in emps}
    opening = {emp: await balance_at(client, f"employee:{emp}", start) for emp in emps}
    params = {"from": iso(start), "to": iso(end)}

    rows = await all_pages(client, "/v1/reports/liability", {**params, "group_by": "employee"})
    assert {r["employee"]: r["outstanding"] for r in rows} == wallets
    assert {r["employee"]: r["opening"] for r in rows} == opening
    for r in rows:
        assert (
            r["opening"] + r["granted"] + r["adjusted"] - r["spent"] - r["expired"] - r["voided"]
            == r["outstanding"]
        ), r
        assert min(r["granted"], r["spent"], r["expired"], r["voided"]) >= 0, r
    assert sum(r["expired"] for r in rows) > 0 and sum(r["spent"] for r in rows) > 0
    for group_by in ("department", "month"):
        r = await client.get("/v1/reports/liability", params={**params, "group_by": group_by})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        if group_by == "month":
            assert [i["month"] for i in items] == ["2026-03"]
        assert sum(i["outstanding"] for i in items) == sum(wallets.values())
        assert sum(i["spent"] for i in items) == sum(r["spent"] for r in rows)
    r = await client.get(
        "/v1/reports/liability",
        params={**params, "group_by": "employee"},
        headers={"Accept": "text/csv"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert {t["employee"]: int(t["outstanding"]) for t in table} == wallets
    problem(
        await client.get("/v1/reports/liability", params={**params, "group_by": "model"}),
        400,
        "invalid_request",
    )


async def test_liability_months(api: Api, client: AsyncTestClient[Any], clock: FakeClock) -> None:
    """By month, each UTC month has its own opening and outstanding, chained."""
    clock.set(datetime(2026, 1, 15, tzinfo=UTC))
    await api.employee("e-1")
    await api.grant("e-1", 1000)
    clock.set(datetime(2026, 2, 10, tzinfo=UTC))
    await api.debit("employee:e-1", 300)
    await api.grant("e-1", 50)
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    r = await client.get(
        "/v1/reports/liability",
        params={"from": "2026-01-10T00:00:00Z", "to": "2026-03-01T00:00:00Z", "group_by": "month"},
    )
    items = r.json()["items"]
    assert [
        (i["month"], i["opening"], i["granted"], i["spent"], i["outstanding"]) for i in items
    ] == [
        ("2026-01", 0, 1000, 0, 1000),
        ("2026-02", 1000, 50, 300, 750),
    ]


async def test_compensation_totals_and_exact_money(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """Compensation sums the grants posted in the period per employee, month and reason, values
    them exactly at TOKENLEDGER_CREDIT_VALUE (decimal strings), counts a reversal against its
    reason, and its CSV is the same rows."""
    posted: dict[tuple[str, str, str], int] = {}
    await api.department("eng")
    for emp in ("e-1", "e-2", "e-3"):
        await api.employee(emp)
    rng = random.Random(7)  # noqa: S311  # why: reproducible test data
    reversed_one = None
    for day in range(0, 50, 3):
        clock.set(datetime(2026, 1, 2, tzinfo=UTC) + timedelta(days=day))
        emp = rng.choice(("e-1", "e-2", "e-3"))
        reason = rng.choice(("spot_bonus", "signing_bonus", "monthly_allotment"))
        amount = rng.randint(1, 999)
        g = await api.grant(emp, amount, reason=reason)
        month = clock.now.strftime("%Y-%m")  # type: ignore[union-attr]
        posted[(emp, month, reason)] = posted.get((emp, month, reason), 0) + amount
        if reversed_one is None:
            reversed_one = (g["transaction"]["id"], emp, month, reason, amount)
    assert reversed_one is not None
    txn, emp, month, reason, amount = reversed_one
    r = await client.post(f"/v1/transactions/{txn}/reverse", json={}, headers=key())
    assert r.status_code == 201, r.text
    rev_month = clock.now.strftime("%Y-%m")  # type: ignore[union-attr]
    posted[(emp, rev_month, reason)] = posted.get((emp, rev_month, reason), 0) - amount
    posted = {k: v for k, v in posted.items() if v != 0}

    params = {"from": "2026-01-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}
    items = await all_pages(client, "/v1/reports/compensation", params)
    got = {(i["employee"], i["month"], i["reason"]): i["credits"] for i in items}
    assert got == posted
    for i in items:
        assert i["currency"] == "EUR" and isinstance(i["value"], str)
        assert Decimal(i["value"]) == Decimal("0.0125") * i["credits"]
    assert sum(Decimal(i["value"]) for i in items) == Decimal("0.0125") * sum(posted.values())
    r = await client.get("/v1/reports/compensation", params=params, headers={"Accept": "text/csv"})
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert list(table[0]) == ["employee", "month", "reason", "credits", "currency", "value"]
    assert [
        (t["employee"], t["month"], t["reason"], int(t["credits"]), t["value"]) for t in table
    ] == [(i["employee"], i["month"], i["reason"], i["credits"], i["value"]) for i in items]
    only = (
        await client.get("/v1/reports/compensation", params={**params, "employee": "e-2"})
    ).json()
    assert {i["employee"] for i in only["items"]} <= {"e-2"}


async def test_forecast_known_answer(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """100 credits a day for the trailing 30 days with 1,000 left depletes in 10 days; with no
    spend depletes_at is null; a lot that expires first shortens it."""
    start = datetime(2026, 5, 1, 12, tzinfo=UTC)
    clock.set(start - timedelta(days=31))
    await api.employee("e-1")
    await api.employee("e-2")
    await api.grant("e-1", 4000)
    await api.grant("e-2", 500)
    for day in range(30):
        clock.set(start - timedelta(days=30) + timedelta(days=day, hours=1))
        assert (await api.debit("employee:e-1", 100)).status_code == 201
    clock.set(start)
    r = await client.get("/v1/reports/forecast", params={"account": "employee:e-1"})
    assert r.status_code == 200, r.text
    item = r.json()["items"][0]
    assert item["available"] == 1000 and item["burn_rate_per_day"] == 100.0
    assert item["depletes_at"] == (start + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r = await client.get("/v1/reports/forecast", params={"account": "employee:e-2"})
    assert r.json()["items"][0]["depletes_at"] is None
    # 300 more that expire in 2 days: 200 of them are spent first, 100 expire.
    await api.grant("e-1", 300, priority=10, expires_at=iso(start + timedelta(days=2)))
    item = (await client.get("/v1/reports/forecast", params={"account": "employee:e-1"})).json()[
        "items"
    ][0]
    assert item["expiring"] == [
        {"amount": 300, "expires_at": (start + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    ]
    assert item["depletes_at"] == (start + timedelta(days=12)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r = await client.get("/v1/reports/forecast", params={"department": "eng"})
    assert [i["account"] for i in r.json()["items"]] == ["employee:e-1", "employee:e-2"]
    problem(await client.get("/v1/reports/forecast"), 400, "invalid_request")


def test_depletion_rules() -> None:
    """The depletion walk: zero spend never depletes; lots expired before spending reaches them
    are lost; a lot without expiry lasts amount/rate days."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert depletion(now, Decimal(0), [(1000, None)]) is None
    assert depletion(now, Decimal(100), [(1000, None)]) == now + timedelta(days=10)
    soon = now + timedelta(days=1)
    assert depletion(now, Decimal(100), [(500, soon), (100, None)]) == soon + timedelta(days=1)
    assert depletion(now, Decimal(100), []) == now


async def record_usage(
    client: AsyncTestClient[Any],
    clock: FakeClock,
    event_id: str,
    account: str,
    model: str,
    when: datetime,
    cached: int,
) -> None:
    clock.set(when)
    r = await client.post(
        "/v1/usage",
        json={
            "source": "gw",
            "event_id": event_id,
            "account": account,
            "model": model,
            "input_tokens": 1000,
            "cached_input_tokens": cached,
            "output_tokens": 100,
            "occurred_at": iso(when),
        },
    )
    assert r.status_code == 201, r.text


async def test_efficiency_and_department_at_the_time(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Efficiency gives cached and premium shares and per-event figures; moving an employee to
    another department does not move their past spend in it. The same once the retention job
    moved the events to usage_events_archive (the events path reads it too)."""
    clock.set(datetime(2026, 6, 1, tzinfo=UTC))
    for model, tier in (("std", "standard"), ("big", "premium")):
        r = await client.post(
            "/v1/prices",
            json={
                "model": model,
                "effective_from": "2026-01-01T00:00:00Z",
                "input_per_mtok": 1_000_000,
                "cached_input_per_mtok": 1_000_000,
                "output_per_mtok": 10_000_000,
                "tier": tier,
            },
            headers=key(),
        )
        assert r.status_code == 201, r.text
    await api.employee("e-1", "eng")
    await api.grant("e-1", 1_000_000)
    await record_usage(
        client, clock, "u1", "employee:e-1", "std", datetime(2026, 6, 1, 10, tzinfo=UTC), 500
    )
    await record_usage(
        client, clock, "u2", "employee:e-1", "big", datetime(2026, 6, 1, 11, tzinfo=UTC), 0
    )
    clock.set(datetime(2026, 6, 2, 9, tzinfo=UTC))
    await api.employee("e-1", "ops")  # moved
    await record_usage(
        client, clock, "u3", "employee:e-1", "std", datetime(2026, 6, 2, 10, tzinfo=UTC), 1000
    )
    clock.set(datetime(2026, 6, 3, tzinfo=UTC))
    for archived in (False, True):
        if archived:
            conn = await service_db.connect(database_url)
            try:
                assert await archive_before(conn, "2026-07-01") == 3
            finally:
                await conn.close()
        for start, end in (
            ("2026-06-01T00:00:00Z", "2026-06-03T00:00:00Z"),  # daily roll-up
            ("2026-06-01T00:00:01Z", "2026-06-03T00:00:00Z"),  # events
            ("2026-06-01T00:00:00Z", "2026-07-01T00:00:00Z"),  # a month with a move: daily
        ):
            params = {"from": start, "to": end}
            r = await client.get(
                "/v1/reports/efficiency", params={**params, "group_by": "department"}
            )
            assert r.status_code == 200, r.text
            by_dept = {i["department"]: i for i in r.json()["items"]}
            assert set(by_dept) == {"eng", "ops"}
            assert by_dept["eng"]["events"] == 2 and by_dept["ops"]["events"] == 1
            assert by_dept["eng"]["cached_input_share"] == 0.25
            assert by_dept["eng"]["premium_share"] == 0.5  # 2000 credits each: one premium
            assert (
                by_dept["ops"]["cached_input_share"] == 1.0
                and by_dept["ops"]["premium_share"] == 0.0
            )
            r = await client.get(
                "/v1/reports/efficiency", params={**params, "group_by": "employee"}
            )
            (item,) = r.json()["items"]
            assert item["employee"] == "e-1" and item["events"] == 3
            assert item["credits_per_event"] == 2000.0 and item["tokens_per_event"] == 1100.0
    # The usage report too: by department, the department of the time of the spend, whether
    # the employee moved within the period or after it.
    for start, end in (
        ("2026-06-01T00:00:00Z", "2026-06-03T00:00:00Z"),
        ("2026-06-01T00:00:00Z", "2026-07-01T00:00:00Z"),
        ("2026-06-01T00:00:01Z", "2026-06-03T00:00:00Z"),
        ("2026-06-01T00:00:00Z", "2026-06-02T00:00:00Z"),  # before the move only
    ):
        r = await client.get(
            "/v1/reports/usage", params={"from": start, "to": end, "group_by": "department,month"}
        )
        assert r.status_code == 200, r.text
        got = {i["department"]: i["events"] for i in r.json()["items"]}
        assert got == ({"eng": 2} if end.startswith("2026-06-02") else {"eng": 2, "ops": 1})
    # The liability view puts the wallet in its department at `to`.
    r = await client.get(
        "/v1/reports/liability",
        params={
            "from": "2026-05-01T00:00:00Z",
            "to": "2026-06-01T12:00:00Z",
            "group_by": "department",
        },
    )
    assert [i["department"] for i in r.json()["items"]] == ["eng"]


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/reports/liability", {"group_by": "employee"}),
        ("/v1/reports/compensation", {}),
        ("/v1/reports/efficiency", {"group_by": "employee"}),
    ],
)
async def test_csv_exports_stream_one_query(
    api: Api,
    client: AsyncTestClient[Any],
    clock: FakeClock,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    query: dict[str, str],
) -> None:
    """A CSV export by employee is one query read through a cursor STREAM_BATCH rows at a
    time (not a query per page of 500, which re-read the period each time), and holds
    exactly the rows of every JSON page, in the same order; from a cursor, the rest."""
    from service.finance import queries
    from service.journal import Database
    from tests.api.test_reports import make_events

    await make_events(api, database_url, count=40)  # e-a..e-d's usage in Jan and Feb
    clock.set(datetime(2026, 1, 5, tzinfo=UTC))
    for n in range(7):
        await api.employee(f"s-{n}", "eng")
        await api.grant(f"s-{n}", 100 + n)
        await api.grant(f"s-{n}", 5, reason="signing_bonus")
    for emp in ("e-a", "e-b", "e-c"):
        await api.grant(emp, 50)
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))
    monkeypatch.setattr(queries, "STREAM_BATCH", 2)
    batches: list[int] = []
    original = Database.stream_slow

    async def counting(self: Database, *args: Any, **kw: Any) -> Any:
        batches.append(0)
        async for rows in original(self, *args, **kw):
            assert len(rows) <= 2
            batches[-1] += 1
            yield rows

    monkeypatch.setattr(Database, "stream_slow", counting)
    params = {"from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z", **query}
    pages = await all_pages(client, path, params)
    assert len(pages) >= 3
    r = await client.get(path, params=params, headers={"Accept": "text/csv"})
    assert r.status_code == 200, r.text
    table = list(csv.DictReader(io.StringIO(r.text)))
    key_column = "employee"
    assert [t[key_column] for t in table] == [p[key_column] for p in pages]
    assert [int(t["credits" if "credits" in t else "granted"]) for t in table] == [
        p["credits" if "credits" in p else "granted"] for p in pages
    ]
    assert len(batches) == 1 and batches[0] > 1  # one query, several reads
    # From a JSON page's cursor on: the rest of the rows.
    r = await client.get(path, params={**params, "limit": 1})
    rest = await client.get(
        path,
        params={**params, "cursor": r.json()["next_cursor"]},
        headers={"Accept": "text/csv"},
    )
    rows = list(csv.DictReader(io.StringIO(rest.text)))
    first = r.json()["items"][0][key_column]
    assert [t[key_column] for t in rows] == [p[key_column] for p in pages if p[key_column] != first]
