"""The balance series (GET /v1/accounts/{a}/series, tl_balance_series) answers at
every point exactly what the as-of balance (tl_balance_at) answers there (issue 21).

tl_balance_series computes a chart in one pass: the account's expired lots and
their settled marks read once, and the movements and holds of the lots that
count at some point read once, attributed to the points by a running sum. The
as-of balance is the reference: the histories below are randomized (seeded,
so a failure replays) and made through the API with the clock pinned: grants
with and without expiries, a grant-program lot rolling over each month,
debits, usage events, transfers (to a department too), reservations alive
across points and captured, released, extended or left to expire, lot voids,
reversals (which give credits back to lots that had expired), expiries written
late by the sweeper and settled marks written late by the background loop.
Every account is compared, the sharded system accounts included, on series
whose points fall on the history's instants (whole hours), between them, and
on each side of single instants microsecond by microsecond."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from service import db as service_db
from service.background import Background
from tests.api.conftest import Api, FakeClock, key, ts

T0 = datetime(2026, 1, 5, tzinfo=UTC)
US = timedelta(microseconds=1)
EMPLOYEES = ("e1", "e2", "e3", "e4")
MODEL = "gpt-4o-mini"
# The accounts compared: wallets, a department budget, sharded system accounts.
ACCOUNTS = (
    *(f"employee:{e}" for e in EMPLOYEES),
    "department:eng",
    "system:issuance",
    "system:expired",
    "system:usage",
)

# Points of the series and of tl_balance_at that differ, for one account.
MISMATCHES = """
SELECT s.at, s.posted AS series, tl_balance_at($1, s.at) AS as_of
FROM tl_balance_series($1, $2, $3, $4) s
WHERE s.posted IS DISTINCT FROM tl_balance_at($1, s.at)
"""


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await service_db.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


class History:
    """A randomized history made through the API, and what it remembers of it
    (reservations, transactions, lots) to act on later."""

    def __init__(self, api: Api, client: AsyncTestClient[Any], clock: FakeClock, seed: int):
        self.api = api
        self.background = Background(client.app.state.ledger)  # type: ignore[attr-defined]  # why: the tests' client carries its app
        self.clock = clock
        self.rng = random.Random(seed)  # noqa: S311  # why: a test's history, not a secret
        self.reservations: list[str] = []
        self.transactions: list[str] = []
        self.lots: list[str] = []
        self.cycles_run: set[str] = set()

    @property
    def now(self) -> datetime:
        assert self.clock.now is not None
        return self.clock.now

    def wallet(self) -> str:
        return f"employee:{self.rng.choice(EMPLOYEES)}"

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """POST with a fresh key; None for a business rejection (409), which changes nothing."""
        r = await self.api.c.post(path, json=body or {}, headers=key())
        if r.status_code == 409:
            return None
        assert r.status_code in (200, 201), (path, body, r.text)
        return dict(r.json())

    async def setup(self) -> None:
        self.clock.set(T0)
        for emp in EMPLOYEES:
            await self.api.employee(emp)
        r = await self.api.c.post(
            "/v1/prices",
            json={
                "model": MODEL,
                "effective_from": ts(T0 - timedelta(days=1)),
                "input_per_mtok": 150_000,
                "cached_input_per_mtok": 75_000,
                "output_per_mtok": 600_000,
            },
            headers=key(),
        )
        assert r.status_code == 201, r.text
        r = await self.api.c.put(
            "/v1/grant-programs/monthly",
            json={
                "amount": 400,
                "reason": "monthly_allotment",
                "cadence": {"every": "month", "day": 1},
                "audience": {"all": True},
                "expiry": {"at": "end_of_cycle"},
                "rollover_max": 150,
                "starts_on": "2026-01-01",
                "active": True,
            },
        )
        assert r.status_code in (200, 201), r.text
        await self.run_cycle()
        await self.post(
            "/v1/transfers", {"from": "system:issuance", "to": "department:eng", "amount": 500}
        )

    async def run_cycle(self) -> None:
        cycle = self.now.strftime("%Y-%m")
        if cycle not in self.cycles_run:
            self.cycles_run.add(cycle)
            r = await self.api.c.post("/v1/grant-programs/monthly/runs", json={"cycle": cycle})
            assert r.status_code == 200, r.text

    def advance(self) -> None:
        """Mostly whole hours, so that hourly points fall on the history's instants; now and
        then an odd number of seconds, or exactly the instant a lot expires."""
        roll = self.rng.random()
        if roll < 0.7:
            self.clock.advance(hours=self.rng.choice((1, 1, 2, 3, 5, 8, 13, 24, 30)))
        elif roll < 0.9:
            self.clock.advance(seconds=self.rng.randint(1, 5000))
        else:
            self.clock.advance(hours=1)
            self.clock.set(self.now.replace(minute=0, second=0, microsecond=0))

    async def step(self) -> None:
        """One operation, drawn with weights; a rejection (insufficient credits, a reservation
        no longer active, a transaction reversed already) is part of the history too."""
        self.advance()
        if self.rng.random() < 0.3:
            await self.run_cycle()  # sometimes late: the program's scheduler is not running
        op = self.rng.choices(
            (
                "grant",
                "debit",
                "usage",
                "transfer",
                "reserve",
                "capture",
                "release",
                "extend",
                "reverse",
                "void",
                "sweep",
                "settle",
            ),
            weights=(12, 14, 8, 6, 12, 8, 4, 2, 5, 1, 4, 4),
        )[0]
        await getattr(self, op)()

    async def grant(self) -> None:
        emp = self.wallet().removeprefix("employee:")
        body: dict[str, Any] = {"employee": emp, "amount": self.rng.randint(20, 300)}
        if self.rng.random() < 0.8:
            hours = self.rng.choice((1, 2, 3, 6, 12, 24, 48, 100, 300))
            body["expires_at"] = ts(
                self.now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=hours)
            )
        if self.rng.random() < 0.1:
            body["effective_at"] = ts(self.now + timedelta(hours=self.rng.randint(1, 10)))
            if "expires_at" in body:
                body["expires_at"] = ts(self.now + timedelta(hours=self.rng.randint(11, 60)))
        if self.rng.random() < 0.15:
            body["funded_by"] = "department:eng"
        result = await self.post("/v1/grants", {"reason": "spot_bonus", **body})
        if result is not None:
            self.lots.append(result["lot"]["id"])
            self.transactions.append(result["transaction"]["id"])

    async def debit(self) -> None:
        body = {"account": self.wallet(), "amount": self.rng.randint(1, 120)}
        if self.rng.random() < 0.1:
            body["account"] = "department:eng"
        result = await self.post("/v1/debits", body)
        if result is not None:
            self.transactions.append(result["id"])

    async def usage(self) -> None:
        r = await self.api.c.post(
            "/v1/usage",
            json={
                "source": "test",
                "event_id": uuid.uuid4().hex,
                "account": self.wallet(),
                "model": MODEL,
                "input_tokens": self.rng.randint(1, 200) * 1000,
                "output_tokens": self.rng.randint(0, 50) * 1000,
            },
        )
        assert r.status_code in (200, 201, 409), r.text

    async def transfer(self) -> None:
        source = self.wallet()
        target = "department:eng" if self.rng.random() < 0.3 else self.wallet()
        if target == source:
            return
        result = await self.post(
            "/v1/transfers", {"from": source, "to": target, "amount": self.rng.randint(1, 80)}
        )
        if result is not None:
            self.transactions.append(result["id"])

    async def reserve(self) -> None:
        ttl = self.rng.choice((600, 3600, 7200, 3 * 3600, 86_400, 1234))
        result = await self.post(
            "/v1/reservations",
            {"account": self.wallet(), "amount": self.rng.randint(1, 150), "ttl_seconds": ttl},
        )
        if result is not None:
            self.reservations.append(result["id"])

    def reservation(self) -> str | None:
        return self.rng.choice(self.reservations) if self.reservations else None

    async def capture(self) -> None:
        if (rid := self.reservation()) is not None:
            result = await self.post(
                f"/v1/reservations/{rid}/capture", {"amount": self.rng.randint(1, 160)}
            )
            if result is not None:
                self.transactions.append(result["transaction"]["id"])

    async def release(self) -> None:
        if (rid := self.reservation()) is not None:
            await self.post(f"/v1/reservations/{rid}/release")

    async def extend(self) -> None:
        if (rid := self.reservation()) is not None:
            await self.post(f"/v1/reservations/{rid}/extend", {"ttl_seconds": 7200})

    async def reverse(self) -> None:
        if self.transactions:
            txn = self.rng.choice(self.transactions)
            r = await self.api.c.post(f"/v1/transactions/{txn}/reverse", json={}, headers=key())
            assert r.status_code in (201, 409, 422), r.text

    async def void(self) -> None:
        if self.lots:
            lot = self.rng.choice(self.lots)
            r = await self.api.c.post(f"/v1/lots/{lot}/void", json={}, headers=key())
            assert r.status_code in (200, 409, 422), r.text

    async def sweep(self) -> None:
        await self.background.sweep_expired()

    async def settle(self) -> None:
        # Two passes: a movement is looked at on the pass after the one that saw it.
        await self.background.settle_lots()
        await self.background.settle_lots()


async def instants(sql: asyncpg.Connection) -> list[datetime]:
    """Instants where the balance or what counts against it changes: transactions, lots'
    expiries and settled marks, reservations' starts and ends."""
    rows = await sql.fetch(
        "SELECT created_at AS at FROM transactions "
        "UNION SELECT expires_at FROM lots WHERE expires_at IS NOT NULL "
        "UNION SELECT rollover_until FROM lots WHERE rollover_until IS NOT NULL "
        "UNION SELECT settled_at FROM lot_settled "
        "UNION SELECT created_at FROM reservations "
        "UNION SELECT coalesce(resolved_at, expires_at) FROM reservations"
    )
    return sorted(r["at"] for r in rows)


async def mismatches(
    sql: asyncpg.Connection,
    accounts: dict[str, int],
    start: datetime,
    end: datetime,
    step: timedelta,
) -> list[dict[str, Any]]:
    found = []
    for address, account in accounts.items():
        rows = await sql.fetch(MISMATCHES, account, start, end, step)
        found += [{"account": address, **dict(r)} for r in rows]
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_series_is_the_as_of_balance_at_every_point(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, sql: asyncpg.Connection, seed: int
) -> None:
    """Over a randomized history of about two months, every point of a daily, an hourly and an
    odd-stepped series, and of microsecond series around each instant where something
    changed, is what tl_balance_at answers there, for every kind of account; the expired lots
    that counted at a point exist in the history, so the comparison covers that part too."""
    history = History(api, client, clock, seed)
    await history.setup()
    for _ in range(220):
        await history.step()
    clock.advance(hours=40)  # some lots and reservations end after the last operation
    accounts = {
        r["address"]: r["id"]
        for r in await sql.fetch(
            "SELECT address, id FROM accounts WHERE address = ANY ($1::text[])", list(ACCOUNTS)
        )
    }
    assert len(accounts) == len(ACCOUNTS)
    start, end = T0 - timedelta(days=1), history.now + timedelta(days=1)

    # The comparison means something: at some points lots that had expired unwritten or
    # unsettled, or with holds, counted against the balance.
    counted = await sql.fetchval(
        "SELECT count(*) FROM lots l LEFT JOIN lot_settled s ON s.lot_id = l.id "
        "WHERE l.expires_at < $1 AND (s.settled_at IS NULL OR s.settled_at > l.expires_at)",
        history.now,
    )
    assert counted > 0

    assert await mismatches(sql, accounts, start, end, timedelta(days=1)) == []
    assert await mismatches(sql, accounts, start, end, timedelta(hours=1)) == []
    odd = timedelta(minutes=37, seconds=13, microseconds=7)
    assert await mismatches(sql, accounts, start + timedelta(seconds=11), end, odd) == []
    moments = await instants(sql)
    sample = random.Random(seed).sample(moments, min(60, len(moments)))  # noqa: S311  # why: a sample of instants
    for at in sample:
        assert await mismatches(sql, accounts, at - 2 * US, at + 2 * US, US) == [], at


async def test_series_over_http_is_the_as_of_balance(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """The endpoint serves tl_balance_series: each point of a daily series is what GET .../balance
    answers at that instant, across a lot's expiry before the sweeper wrote it and after."""
    history = History(api, client, clock, seed=7)
    await history.setup()
    for _ in range(60):
        await history.step()
    start = T0 + timedelta(hours=5)
    end = start + timedelta(days=12)
    for address in ("employee:e1", "employee:e2", "system:issuance"):
        r = await api.c.get(
            f"/v1/accounts/{address}/series",
            params={"from": ts(start), "to": ts(end), "interval": "day"},
        )
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 13
        for item in items:
            b = await api.c.get(f"/v1/accounts/{address}/balance", params={"at": item["at"]})
            assert b.status_code == 200, b.text
            assert b.json()["posted"] == item["posted"], (address, item)
