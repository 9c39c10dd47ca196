"""Expiry (DESIGN.md, Expiry): credits die at the exact instant of
`expires_at`, whether or not the sweeper has run; the sweeper only writes the
`expiry` transaction, once, however many run at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from service import db as service_db
from service.background import Background
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, posted, ts

T = datetime(2030, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def ts6(when: datetime) -> str:
    """The service's rendering of a time: UTC with six fractional digits."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def sweep(client: AsyncTestClient[Any]) -> int:
    """Run one sweeper pass the way the service's background task does."""
    return await Background(client.app.state.ledger).sweep_expired()


async def entries(api: Api, address: str) -> list[dict[str, Any]]:
    r = await api.c.get(f"/v1/accounts/{address}/entries")
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def transactions(api: Api, kind: str) -> list[dict[str, Any]]:
    r = await api.c.get("/v1/transactions", params={"kind": kind, "limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def balance_at(api: Api, address: str, at: datetime) -> int:
    r = await api.c.get(f"/v1/accounts/{address}/balance", params={"at": ts6(at)})
    assert r.status_code == 200, r.text
    return int(r.json()["posted"])


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the service's jsonb codecs, for calling tl_sweep_expired directly."""
    conn = await service_db.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def test_lot_is_spendable_until_the_instant_it_expires(api: Api, clock: FakeClock) -> None:
    """A lot expiring at T covers a debit of its whole amount at T-1µs and nothing at T, with no
    sweeper run."""
    clock.set(T - timedelta(days=1))
    for emp in ("a", "b"):
        await api.employee(emp)
        await api.grant(emp, 100, expires_at=ts(T))

    clock.set(T - US)
    r = await api.debit("employee:a", 100)
    assert r.status_code == 201, r.text
    assert await api.available("employee:b") == 100

    clock.set(T)
    r = await api.debit("employee:b", 100)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "insufficient_credits"
    assert r.json()["available"] == 0
    r = await api.debit("employee:b", 1)
    assert r.status_code == 409 and r.json()["code"] == "insufficient_credits"
    assert await api.available("employee:b") == 0


async def test_account_view_at_expiry_and_the_expiry_entry_after_a_write(
    api: Api, clock: FakeClock
) -> None:
    """At T the balance view already excludes the expired lot; the journal shows the expiry
    transaction once a write touches the wallet."""
    clock.set(T - timedelta(days=1))
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(T))
    await api.grant("e1", 50)

    clock.set(T - US)
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["available"]) == (150, 150)
    assert acct["expiring"] == [{"amount": 100, "expires_at": ts6(T)}]

    clock.set(T)
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["available"]) == (50, 50)
    assert acct["expiring"] == []
    r = await api.c.get("/v1/accounts/employee:e1/lots")
    assert [lot["amount"] for lot in r.json()["items"]] == [50]
    # Nothing has written the expiry yet.
    assert [e["kind"] for e in await entries(api, "employee:e1")] == ["grant", "grant"]

    r = await api.debit("employee:e1", 10)
    assert r.status_code == 201, r.text
    items = await entries(api, "employee:e1")
    assert [(e["kind"], e["amount"]) for e in items] == [
        ("debit", -10),
        ("expiry", -100),
        ("grant", 50),
        ("grant", 100),
    ]
    assert items[1]["created_at"] == ts6(T)
    assert items[0]["balance_after"] == 40
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["available"]) == (40, 40)
    assert await posted(api, "system:expired") == 100


async def test_sweeper_writes_one_expiry_per_account_and_is_idempotent(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """The sweeper moves each account's due remainder to system:expired in one expiry transaction,
    and a second pass does nothing."""
    clock.set(T - timedelta(days=1))
    for emp in ("e1", "e2", "e3"):
        await api.employee(emp)
    await api.grant("e1", 100, expires_at=ts(T))
    await api.grant("e1", 30, expires_at=ts(T + timedelta(hours=1)))
    await api.grant("e1", 20)
    await api.grant("e2", 70, expires_at=ts(T))
    await api.grant("e3", 5, expires_at=ts(T + timedelta(days=1)))
    clock.set(T - timedelta(hours=1))
    assert (await api.debit("employee:e2", 25)).status_code == 201

    clock.set(T + timedelta(hours=2))
    assert await sweep(client) == 130 + 45

    expiries = await transactions(api, "expiry")
    assert len(expiries) == 2
    by_account = {}
    for txn in expiries:
        legs = {e["account"]: e["amount"] for e in txn["entries"]}
        wallet = next(a for a in legs if a.startswith("employee:"))
        by_account[wallet] = (legs, sorted(m["amount"] for m in txn["lots"]), txn["created_at"])
    assert by_account["employee:e1"] == (
        {"employee:e1": -130, "system:expired": 130},
        [-100, -30],
        ts6(T + timedelta(hours=2)),
    )
    assert by_account["employee:e2"] == (
        {"employee:e2": -45, "system:expired": 45},
        [-45],
        ts6(T + timedelta(hours=2)),
    )
    assert await posted(api, "system:expired") == 175
    assert [await posted(api, f"employee:{e}") for e in ("e1", "e2", "e3")] == [20, 0, 5]

    assert await sweep(client) == 0
    assert len(await transactions(api, "expiry")) == 2
    assert await posted(api, "system:expired") == 175
    await assert_audit_clean(database_url)


async def _many_expiring_wallets(api: Api, clock: FakeClock, n: int) -> int:
    clock.set(T - timedelta(days=1))
    total = 0
    for i in range(n):
        await api.employee(f"w{i}")
        await api.grant(f"w{i}", 10 + i, expires_at=ts(T))
        total += 10 + i
    return total


async def test_two_sweepers_at_once_expire_credits_exactly_once(
    api: Api, clock: FakeClock, database_url: str, sql: asyncpg.Connection
) -> None:
    """Two sweeps running concurrently on two connections expire every due credit exactly once."""
    total = await _many_expiring_wallets(api, clock, 30)
    ctx = {
        "actor": "system:sweeper",
        "request_id": "sweeper",
        "now": (T + timedelta(minutes=1)).isoformat(),
    }
    other = await service_db.connect(database_url)
    try:
        results = await asyncio.gather(
            sql.fetchval("SELECT tl_sweep_expired(1000, $1)", ctx),
            other.fetchval("SELECT tl_sweep_expired(1000, $1)", ctx),
        )
    finally:
        await other.close()
    assert sum(r["credits"] for r in results) == total
    assert sum(r["accounts"] for r in results) == 30
    assert len(await transactions(api, "expiry")) == 30
    assert await posted(api, "system:expired") == total
    again = await sql.fetchval("SELECT tl_sweep_expired(1000, $1)", ctx)
    assert again == {"accounts": 0, "credits": 0}
    await assert_audit_clean(database_url)


async def test_sweeper_skips_accounts_another_sweeper_holds(
    api: Api, clock: FakeClock, database_url: str, sql: asyncpg.Connection
) -> None:
    """While one sweep holds some accounts uncommitted, a second sweep takes only the others, so the
    two together expire each account once."""
    total = await _many_expiring_wallets(api, clock, 30)
    ctx = {
        "actor": "system:sweeper",
        "request_id": "sweeper",
        "now": (T + timedelta(minutes=1)).isoformat(),
    }
    other = await service_db.connect(database_url)
    watcher = await service_db.connect(database_url)
    try:
        txn = sql.transaction()
        await txn.start()
        first = await sql.fetchval("SELECT tl_sweep_expired(10, $1)", ctx)
        assert first["accounts"] == 10
        second_task = asyncio.create_task(other.fetchval("SELECT tl_sweep_expired(1000, $1)", ctx))
        # Let the second sweep get as far as it can while the first still holds its rows:
        # either finished, or waiting on a lock the first holds.
        pid = other.get_server_pid()
        for _ in range(5000):
            if second_task.done():
                break
            waiting = await watcher.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            )
            if waiting:
                break
        await txn.commit()
        second = await asyncio.wait_for(second_task, timeout=20)
    finally:
        await other.close()
        await watcher.close()
    assert second["accounts"] == 20
    assert first["credits"] + second["credits"] == total
    assert len(await transactions(api, "expiry")) == 30
    assert await posted(api, "system:expired") == total
    await assert_audit_clean(database_url)


async def test_consumption_order_across_priorities_and_expiries(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Debits take lots by priority, then soonest expiry (never-expiring last), then earliest
    effective_at, and skip lots that have expired."""
    t0 = T - timedelta(days=10)
    clock.set(t0)
    await api.employee("e1")
    lots = {}
    lots["forever"] = (await api.grant("e1", 10))["lot"]["id"]
    lots["in_2d"] = (await api.grant("e1", 10, expires_at=ts(t0 + timedelta(days=2))))["lot"]["id"]
    lots["in_1d"] = (await api.grant("e1", 10, expires_at=ts(t0 + timedelta(days=1))))["lot"]["id"]
    lots["urgent"] = (await api.grant("e1", 10, priority=50))["lot"]["id"]
    lots["in_1d_older"] = (
        await api.grant(
            "e1",
            10,
            expires_at=ts(t0 + timedelta(days=1)),
            effective_at=ts(t0 - timedelta(hours=1)),
        )
    )["lot"]["id"]
    order = ["urgent", "in_1d_older", "in_1d", "in_2d", "forever"]

    r = await api.c.get("/v1/accounts/employee:e1/lots")
    assert [lot["id"] for lot in r.json()["items"]] == [lots[n] for n in order]

    def movements(txn: dict[str, Any]) -> dict[str, int]:
        names = {v: k for k, v in lots.items()}
        return {names[m["lot_id"]]: m["amount"] for m in txn["lots"]}

    r = await api.debit("employee:e1", 15)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {"urgent": -10, "in_1d_older": -5}
    r = await api.debit("employee:e1", 10)
    assert movements(r.json()) == {"in_1d_older": -5, "in_1d": -5}

    # in_1d (5 left) expires: the next debit skips it and takes the 2-day lot.
    clock.set(t0 + timedelta(days=1))
    r = await api.debit("employee:e1", 7)
    assert r.status_code == 201, r.text
    assert movements(r.json()) == {"in_2d": -7}
    r = await api.debit("employee:e1", 6)
    assert movements(r.json()) == {"in_2d": -3, "forever": -3}
    assert await api.available("employee:e1") == 7
    r = await api.debit("employee:e1", 8)
    assert r.status_code == 409 and r.json()["code"] == "insufficient_credits"
    await assert_audit_clean(database_url)


async def test_balance_at_just_before_and_after_an_expiry_swept_on_time(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock
) -> None:
    """With the expiry written at T, balance?at= shows the credits at T-1µs and not at T."""
    clock.set(T - timedelta(days=1))
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(T))
    await api.grant("e1", 20)
    clock.set(T)
    assert await sweep(client) == 100
    assert await balance_at(api, "employee:e1", T - US) == 120
    assert await balance_at(api, "employee:e1", T) == 20
    assert await balance_at(api, "system:expired", T - US) == 0
    assert await balance_at(api, "system:expired", T) == 100


@pytest.mark.parametrize("sweeper_ran", [False, True], ids=["before_sweep", "after_late_sweep"])
async def test_balance_at_after_expiry_agrees_with_the_account_view(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, sweeper_ran: bool
) -> None:
    """balance?at= an instant after expires_at excludes the expired credits, as GET account at that
    instant does, whenever the sweeper runs."""
    clock.set(T - timedelta(days=1))
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(T))
    await api.grant("e1", 20)
    clock.set(T + timedelta(seconds=1))
    view = await posted(api, "employee:e1")
    assert view == 20
    if sweeper_ran:
        clock.set(T + timedelta(hours=1))
        assert await sweep(client) == 100
    assert await balance_at(api, "employee:e1", T - US) == 120
    assert await balance_at(api, "employee:e1", T + timedelta(seconds=1)) == view


async def test_reversing_a_debit_whose_lot_expired_restores_then_expires_at_once(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Reversing a debit after its lot expired puts the credits back into the lot and expires them
    in the same operation."""
    clock.set(T - timedelta(days=1))
    await api.employee("e1")
    lot = (await api.grant("e1", 100, expires_at=ts(T)))["lot"]["id"]
    clock.set(T - timedelta(hours=1))
    r = await api.debit("employee:e1", 30)
    assert r.status_code == 201, r.text
    debit = r.json()["id"]

    clock.set(T + timedelta(hours=1))
    r = await api.c.post(f"/v1/transactions/{debit}/reverse", json={}, headers=key())
    assert r.status_code == 201, r.text
    reversal = r.json()
    assert reversal["kind"] == "reversal" and reversal["reverses"] == debit
    assert {e["account"]: e["amount"] for e in reversal["entries"]} == {
        "employee:e1": 30,
        "system:usage": -30,
    }
    assert reversal["lots"] == [{"lot_id": lot, "amount": 30}]

    items = await entries(api, "employee:e1")
    assert [(e["kind"], e["amount"]) for e in items] == [
        ("expiry", -30),
        ("reversal", 30),
        ("expiry", -70),
        ("debit", -30),
        ("grant", 100),
    ]
    assert items[0]["balance_after"] == 0
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["available"]) == (0, 0)
    r = await api.c.get("/v1/accounts/employee:e1/lots")
    assert r.json()["items"] == []
    assert await posted(api, "system:expired") == 100
    assert await posted(api, "system:usage") == 0
    await assert_audit_clean(database_url)


# ---------------------------------------------------------------------------
# Reservations and expiry (DESIGN.md: a reservation is a promise)
# ---------------------------------------------------------------------------


async def _reserve(api: Api, account: str, amount: int, ttl_seconds: int) -> dict[str, Any]:
    body = {"account": account, "amount": amount, "ttl_seconds": ttl_seconds}
    r = await api.c.post("/v1/reservations", json=body, headers=key())
    assert r.status_code == 201, r.text
    return r.json()


async def test_held_credits_stay_capturable_after_their_lot_expires(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, database_url: str
) -> None:
    """Credits a reservation holds survive their lot's expiry and the sweeper, and are captured from
    that lot."""
    clock.set(T - timedelta(minutes=1))
    await api.employee("e1")
    lot = (await api.grant("e1", 100, expires_at=ts(T)))["lot"]["id"]
    rsv = await _reserve(api, "employee:e1", 40, ttl_seconds=3600)

    clock.set(T + timedelta(minutes=1))
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["reserved"], acct["available"]) == (40, 40, 0)
    assert await sweep(client) == 60
    assert await posted(api, "employee:e1") == 40

    r = await api.c.post(
        f"/v1/reservations/{rsv['id']}/capture", json={"amount": 40}, headers=key()
    )
    assert r.status_code == 200, r.text
    txn = r.json()["transaction"]
    assert txn["lots"] == [{"lot_id": lot, "amount": -40}]
    assert {e["account"]: e["amount"] for e in txn["entries"]} == {
        "employee:e1": -40,
        "system:usage": 40,
    }
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["reserved"], acct["available"]) == (0, 0, 0)
    assert await posted(api, "system:expired") == 60
    await assert_audit_clean(database_url)


async def test_released_credits_of_an_expired_lot_expire_at_once(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Releasing a hold whose lot has expired meanwhile expires the released credits in the same
    operation."""
    clock.set(T - timedelta(minutes=1))
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(T))
    await api.grant("e1", 5)
    rsv = await _reserve(api, "employee:e1", 40, ttl_seconds=3600)

    clock.set(T + timedelta(minutes=1))
    r = await api.c.post(f"/v1/reservations/{rsv['id']}/release", json={}, headers=key())
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "released"
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["reserved"], acct["available"]) == (5, 0, 5)
    assert await posted(api, "system:expired") == 100
    expired = [e["amount"] for e in await entries(api, "employee:e1") if e["kind"] == "expiry"]
    assert sum(expired) == -100
    await assert_audit_clean(database_url)


async def test_expired_reservation_frees_its_credits_at_its_instant(
    api: Api, clock: FakeClock
) -> None:
    """A reservation's hold counts until its expires_at and not from that instant on, with nothing
    run in between."""
    t0 = T - timedelta(hours=1)
    clock.set(t0)
    await api.employee("e1")
    await api.grant("e1", 100)
    rsv = await _reserve(api, "employee:e1", 30, ttl_seconds=60)

    clock.set(t0 + timedelta(seconds=60) - US)
    assert await api.available("employee:e1") == 70
    clock.set(t0 + timedelta(seconds=60))
    acct = await api.account("employee:e1")
    assert (acct["posted"], acct["reserved"], acct["available"]) == (100, 0, 100)
    r = await api.debit("employee:e1", 100)
    assert r.status_code == 201, r.text
    r = await api.c.post(f"/v1/reservations/{rsv['id']}/capture", json={"amount": 1}, headers=key())
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "reservation_not_active", r.text
    # 409 reservation_not_active carries the reservation's state as `reservation_status`;
    # `status` is the HTTP status (RFC 9457).
    assert r.json()["reservation_status"] == "expired", r.text
    assert r.json()["status"] == 409, r.text
