"""The as-of balance of a heavy user reads what it needs, not the account's
history (issue 21), and stays exact.

tl_balance_at subtracts, for every lot that had expired by the instant, what
it still held then. It used to sum every movement of every such lot: a heavy
user's year is tens of thousands of movements per point, and a 30-day series
passed the statement timeout. A lot marked in lot_settled (tl_settle_lots,
run by the background loop) held nothing from its settled_at on and is
skipped; a lot given credits back loses its mark (trigger lots_unsettle).

Each answer is compared with FULL_BALANCE_AT, the formula as it was (every
lot summed), which the marks may only make faster."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from bench.year import build_year
from service import db as service_db
from service import migrate
from service.audit import audit
from service.background import Background
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key, ts

T = datetime(2026, 3, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)

# The as-of balance before lot_settled: every lot expired by the instant is
# summed from its movements and holds. A reference for exactness only.
FULL_BALANCE_AT = """
CREATE FUNCTION pg_temp.full_balance_at(p_account bigint, p_at timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (
        SELECT coalesce(sum(x.balance_after), 0)
        FROM generate_series(0, (SELECT shard_count - 1 FROM accounts WHERE id = p_account)) s
        CROSS JOIN LATERAL (
            SELECT e.balance_after FROM entries e
            WHERE e.account_id = p_account AND e.shard = s AND e.created_at <= p_at
            ORDER BY e.created_at DESC, e.version DESC LIMIT 1) x
    )::bigint - (
        SELECT coalesce(sum(greatest(0, y.remaining - y.held)
                            - CASE WHEN y.rollover_max IS NOT NULL AND y.rollover_until > p_at
                                   THEN least(y.rollover_max, greatest(0, y.remaining - y.held))
                                   ELSE 0 END), 0)
        FROM (SELECT l.rollover_max, l.rollover_until,
                (SELECT coalesce(sum(m.amount), 0) FROM lot_movements m
                 JOIN transactions t ON t.id = m.transaction_id
                 WHERE m.lot_id = l.id AND t.created_at <= p_at) AS remaining,
                (SELECT coalesce(sum(h.amount), 0) FROM reservation_holds h
                 JOIN reservations r ON r.id = h.reservation_id
                 WHERE h.lot_id = l.id AND r.created_at <= p_at
                   AND coalesce(r.resolved_at, r.expires_at) > p_at) AS held
              FROM lots l
              WHERE l.account_id = p_account AND l.expires_at <= p_at AND l.created_at <= p_at) y
    )::bigint
$$
"""

# Tables whose rows the old formula read per expired lot and per point.
HISTORY = ("lot_movements", "reservation_holds")


async def rows_read(db: asyncpg.Connection) -> int:
    """Rows of lot_movements and reservation_holds read so far (both scan kinds)."""
    await db.execute("SELECT pg_stat_force_next_flush()")
    return int(
        await db.fetchval(
            "SELECT sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)) "
            "FROM pg_stat_user_tables WHERE relname = ANY ($1::text[])",
            list(HISTORY),
        )
    )


async def test_as_of_balance_of_a_heavy_user_reads_no_lot_history(db: asyncpg.Connection) -> None:
    """On a year of history, an as-of balance and a 30-day series of the heaviest user read no
    lot movement and no hold (the old formula read thousands for the same points), and answer
    what the old formula answers, at instants around every monthly expiry too."""
    await migrate.migrate(db)
    now = datetime.now(UTC)
    await build_year(db, employees=150, entries=30_000, now=now, log=lambda _: None)
    await db.execute("VACUUM ANALYZE")
    await db.execute(FULL_BALANCE_AT)
    heavy = await db.fetchval("SELECT id FROM accounts WHERE address = 'employee:emp-1'")
    history = await db.fetchval(
        "SELECT count(*) FROM lot_movements m JOIN lots l ON l.id = m.lot_id "
        "WHERE l.account_id = $1",
        heavy,
    )
    assert history > 1000  # a history worth reading, for the comparison below to mean something
    queries = service_db.load_queries()

    points = [now - timedelta(days=d, hours=5) for d in range(1, 330, 7)]
    before = await rows_read(db)
    for at in points:
        await db.fetchval(queries["balance_at"], heavy, at)
    await db.fetch(
        queries["balance_series"], heavy, now - timedelta(days=30), now, timedelta(days=1)
    )
    assert await rows_read(db) - before == 0

    before = await rows_read(db)
    for at in points[:3]:
        await db.fetchval("SELECT pg_temp.full_balance_at($1, $2)", heavy, at)
    assert await rows_read(db) - before > 500

    # Exact: every month's expiry instant, and just around it (the year's
    # rollover is written 1 ms after a cycle's end and its expiry 2 ms after).
    starts = await db.fetch(
        "SELECT DISTINCT expires_at FROM lots WHERE account_id = $1 AND expires_at <= $2",
        heavy,
        now,
    )
    instants = [*points]
    for row in starts:
        e = row["expires_at"]
        instants += [e - MS, e, e + MS, e + MS * 1.5, e + 2 * MS, e + 3 * MS]
    accounts = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM accounts WHERE address = ANY ($1::text[])",
            ["employee:emp-1", "employee:emp-2", "employee:emp-150", "system:expired"],
        )
    ]
    mismatched = await db.fetch(
        "SELECT a, p, tl_balance_at(a, p) AS fast, pg_temp.full_balance_at(a, p) AS full "
        "FROM unnest($1::bigint[]) a CROSS JOIN unnest($2::timestamptz[]) p "
        "WHERE tl_balance_at(a, p) <> pg_temp.full_balance_at(a, p)",
        accounts,
        instants,
    )
    assert [dict(r) for r in mismatched] == []


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await service_db.connect(database_url)
    try:
        await conn.execute(FULL_BALANCE_AT)
        yield conn
    finally:
        await conn.close()


async def settle(client: AsyncTestClient[Any]) -> None:
    """Two background passes: a movement is looked at on the pass after the one that saw it."""
    background = Background(client.app.state.ledger)
    await background.settle_lots()
    await background.settle_lots()


async def assert_exact(sql: asyncpg.Connection, address: str, instants: list[datetime]) -> None:
    account = await sql.fetchval("SELECT id FROM accounts WHERE address = $1", address)
    for at in instants:
        assert await sql.fetchval(
            "SELECT tl_balance_at($1, $2)", account, at
        ) == await sql.fetchval("SELECT pg_temp.full_balance_at($1, $2)", account, at), at


async def test_a_spent_lot_is_settled_and_a_reversal_unsettles_it(
    api: Api,
    client: AsyncTestClient[Any],
    clock: FakeClock,
    sql: asyncpg.Connection,
    database_url: str,
) -> None:
    """A lot spent to 0 is marked settled at its last movement by the background loop; a reversal
    after it expired gives it credits back, which drops the mark in the same statement, and it is
    settled again (at the reversal) on the next passes; as-of balances stay exact throughout."""
    clock.set(T - timedelta(days=2))
    await api.employee("e1")
    lot = (await api.grant("e1", 100, expires_at=ts(T)))["lot"]["id"]
    await api.grant("e1", 20)
    spent_at = T - timedelta(days=1)
    clock.set(spent_at)
    r = await api.debit("employee:e1", 100)
    assert r.status_code == 201, r.text
    debit = r.json()["id"]
    lot_id = lot.removeprefix("lot_")

    await settle(client)
    marks = await sql.fetch("SELECT lot_id::text, settled_at FROM lot_settled")
    assert [(str(m["lot_id"]).replace("-", ""), m["settled_at"]) for m in marks] == [
        (lot_id, spent_at)
    ]
    instants = [T - timedelta(days=3), spent_at - MS, spent_at, T - MS, T, T + timedelta(hours=1)]
    await assert_exact(sql, "employee:e1", instants)

    reversed_at = T + timedelta(hours=2)
    clock.set(reversed_at)
    r = await api.c.post(f"/v1/transactions/{debit}/reverse", json={}, headers=key())
    assert r.status_code == 201, r.text
    assert await sql.fetchval("SELECT count(*) FROM lot_settled") == 0
    await assert_exact(sql, "employee:e1", [*instants, reversed_at - MS, reversed_at])

    await settle(client)
    assert await sql.fetchval("SELECT settled_at FROM lot_settled") == reversed_at
    await assert_exact(sql, "employee:e1", [*instants, reversed_at - MS, reversed_at])
    await assert_audit_clean(database_url)


async def test_audit_finds_a_lot_settled_before_its_last_movement(
    api: Api, client: AsyncTestClient[Any], clock: FakeClock, sql: asyncpg.Connection
) -> None:
    """A settled mark earlier than the lot's last movement (the as-of balance would skip credits
    the lot held) fails audit_4_settled_lots, in full and in the routine audit after it."""
    # Checkpoints first (at the wall clock), then the history after them.
    assert (await audit(sql, full=True, settle_seconds=0)).violations == []
    start = datetime.now(UTC) + timedelta(days=1)
    clock.set(start)
    await api.employee("e1")
    await api.grant("e1", 100, expires_at=ts(start + timedelta(days=2)))
    clock.set(start + timedelta(days=1))
    assert (await api.debit("employee:e1", 100)).status_code == 201
    await settle(client)
    assert await sql.fetchval("SELECT count(*) FROM lot_settled") == 1
    assert (await audit(sql, full=False, settle_seconds=0)).violations == []

    await sql.execute("UPDATE lot_settled SET settled_at = settled_at - interval '1 hour'")
    routine = await audit(sql, full=False, settle_seconds=0)
    assert "audit_4_settled_lots" in routine.since
    assert [v.check for v in routine.violations] == ["audit_4_settled_lots"]
    full = await audit(sql, full=True, settle_seconds=0)
    assert [v.check for v in full.violations] == ["audit_4_settled_lots"]
    assert "settled lot lot_" in full.violations[0].problem


async def blocks_of_one_call(db: asyncpg.Connection, account: int, at: datetime) -> int:
    """Shared buffers one as-of balance touches in this session (hit or read), its own plan's
    and, when it plans its statement again, the planner's: EXPLAIN counts both inside the call."""
    plan = await db.fetchval(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT tl_balance_at($1, $2)", account, at
    )
    top = json.loads(plan)[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


async def test_as_of_balance_costs_the_same_however_long_the_history(
    db: asyncpg.Connection,
) -> None:
    """The as-of balance touches as many buffers for the heaviest user as for one with a
    tenth of its entries, at every instant of the year: a few per lot expired by then
    (monthly grants, the same for both) and an index descent, nothing that grows with the
    account's history. And it plans nothing per call: as a SQL function its body was planned
    again at every call (once per statement), which touched 23 buffers on a fresh database and
    48 on a year of 1M entries, and cost five times its execution's CPU (0.65 against 0.13 ms)."""
    await migrate.migrate(db)
    now = datetime.now(UTC)
    await build_year(db, employees=150, entries=30_000, now=now, log=lambda _: None)
    await db.execute("VACUUM ANALYZE")
    accounts = {
        r["address"]: (r["id"], r["n"])
        for r in await db.fetch(
            "SELECT a.address, a.id, (SELECT count(*) FROM entries e WHERE e.account_id = a.id) n "
            "FROM accounts a WHERE a.address IN ('employee:emp-1', 'employee:emp-150')"
        )
    }
    (heavy, heavy_entries), (light, light_entries) = (
        accounts["employee:emp-1"],
        accounts["employee:emp-150"],
    )
    assert heavy_entries > 10 * light_entries  # far apart, for the comparison to mean something
    for account in (heavy, light):  # the session's caches (catalogs, the function's plans)
        for days in (1, 2, 3, 4, 5, 6, 7):
            await blocks_of_one_call(db, account, now - timedelta(days=days))
    for days in range(1, 340, 13):
        at = now - timedelta(days=days, hours=3)
        expired = await db.fetchval(
            "SELECT count(*) FROM lots WHERE account_id = $1 AND expires_at <= $2", heavy, at
        )
        costs = [await blocks_of_one_call(db, account, at) for account in (heavy, light)]
        assert abs(costs[0] - costs[1]) <= 3, (days, costs)
        # Per lot expired by then: its index entry and row, its lot_settled probe (index and
        # row); then the last entry's index descent and row, the account's row. 4 per lot and
        # 8 here (100 at 23 lots); the SQL function's planning added 38 at every call.
        assert costs[0] <= 4 * expired + 12, (days, expired, costs)
