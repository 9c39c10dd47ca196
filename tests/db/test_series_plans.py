"""A balance series of a heavy user with a year of history (tl_balance_series)
reads by index only, and reads the account's expired lots once, not once per
point (issue 21).

Counted like tests/db/test_plans.py, with the server's table statistics
(flushed by pg_stat_force_next_flush()): no sequential scan of the history's
tables, whether or not a lot that counts against some point (expired, not yet
settled) makes it read that lot's movements and holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from bench.year import build_year
from service import db as service_db
from service import migrate
from tests.api.stats import own_table_counters

WATCHED = ("lots", "entries", "lot_movements", "transactions", "reservation_holds")


async def table_reads(db: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """Per watched table: sequential scans started, and rows fetched by index."""
    return await own_table_counters(db, WATCHED)


async def blocks(db: asyncpg.Connection, statement: str, *args: object) -> int:
    """Shared buffers a statement touched (hit or read), its functions' included."""
    plan = await db.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", *args)
    top = json.loads(plan)[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


@pytest.fixture
async def year(db: asyncpg.Connection) -> tuple[int, datetime]:
    """A year of history (150 employees, 30k entries), analyzed; the heaviest wallet and now."""
    await migrate.migrate(db)
    now = datetime.now(UTC)
    await build_year(db, employees=150, entries=30_000, now=now, log=lambda _: None)
    await db.execute("VACUUM ANALYZE")
    heavy = await db.fetchval("SELECT id FROM accounts WHERE address = 'employee:emp-1'")
    return int(heavy), now


async def test_series_reads_no_history_table_sequentially(
    db: asyncpg.Connection, year: tuple[int, datetime]
) -> None:
    """A 30-day series of the heaviest user starts no sequential scan of lots, entries,
    lot_movements, transactions or reservation_holds: when every lot expired by then is
    settled (it reads no movement at all), and when the month's expired lot is not settled
    yet (the background loop behind: it reads that lot's movements, by index); both times
    it answers tl_balance_at's balance at every point."""
    heavy, now = year
    series = service_db.load_queries()["balance_series"]
    args = (heavy, now - timedelta(days=30), now, timedelta(days=1))

    before = await table_reads(db)
    for _ in range(3):
        rows = await db.fetch(series, *args)
    after = await table_reads(db)
    assert len(rows) == 31
    assert {t: after[t][0] - before[t][0] for t in WATCHED} == dict.fromkeys(WATCHED, 0)
    assert after["lot_movements"][1] == before["lot_movements"][1]  # none read

    unmarked = await db.execute(
        "DELETE FROM lot_settled WHERE lot_id IN (SELECT id FROM lots "
        "WHERE account_id = $1 AND expires_at BETWEEN $2 AND $3)",
        heavy,
        now - timedelta(days=30),
        now,
    )
    assert unmarked != "DELETE 0"
    before = await table_reads(db)
    for _ in range(3):
        rows = await db.fetch(series, *args)
    after = await table_reads(db)
    assert {t: after[t][0] - before[t][0] for t in WATCHED} == dict.fromkeys(WATCHED, 0)
    assert after["lot_movements"][1] > before["lot_movements"][1]  # that lot's, by index
    as_of = [await db.fetchval("SELECT tl_balance_at($1, $2)", heavy, r["at"]) for r in rows]
    assert [r["posted"] for r in rows] == as_of


async def test_series_reads_the_expired_lots_once(
    db: asyncpg.Connection, year: tuple[int, datetime]
) -> None:
    """A 30-day series of the heaviest user touches fewer buffers than four as-of balances,
    and a tenth of what an as-of balance per point touches (221, 92 and 2,900 when written):
    it reads the account's expired lots and their settled marks once, then probes the
    entries once per point, where an as-of read per point read the lots again each time."""
    heavy, now = year
    start = now - timedelta(days=30)
    series = "SELECT * FROM tl_balance_series($1, $2, $3, $4)"
    for _ in range(3):  # the session's caches: catalogs, the functions' plans
        await blocks(db, series, heavy, start, now, timedelta(days=1))
        await blocks(db, "SELECT tl_balance_at($1, $2)", heavy, start)
    one_pass = await blocks(db, series, heavy, start, now, timedelta(days=1))
    as_of = await blocks(db, "SELECT tl_balance_at($1, $2)", heavy, start)
    per_point = await blocks(
        db,
        "SELECT tl_balance_at($1, g) FROM generate_series($2::timestamptz, $3, $4) g",
        heavy,
        start,
        now,
        timedelta(days=1),
    )
    assert one_pass < 4 * as_of, (one_pass, as_of, per_point)
    assert per_point > 10 * one_pass, (one_pass, as_of, per_point)


async def test_series_starts_no_parallel_worker(
    db: asyncpg.Connection, year: tuple[int, datetime]
) -> None:
    """The series' statements, as auto_explain logs them, start no parallel worker and scan
    no history table, even where the planner is told workers cost nothing: on the 10M year
    its generic plan read the movements of the lots that count (none, as a rule) with a
    parallel worker, whose start took 6 to 16 ms of a 1 ms series (a p50 5x the fresh
    database's in bench.scale)."""
    heavy, now = year
    await db.execute(
        "DELETE FROM lot_settled WHERE lot_id IN (SELECT id FROM lots "
        "WHERE account_id = $1 AND expires_at BETWEEN $2 AND $3)",
        heavy,
        now - timedelta(days=30),
        now,
    )
    for setting in (
        "parallel_setup_cost = 0",
        "parallel_tuple_cost = 0",
        "min_parallel_table_scan_size = 0",
        "min_parallel_index_scan_size = 0",
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_level = notice",
        "client_min_messages = notice",
    ):
        await db.execute(f"SET {setting}")
    await db.execute("LOAD 'auto_explain'")
    plans: list[str] = []
    db.add_log_listener(lambda _conn, message: plans.append(str(message.message)))
    await db.fetch(
        "SELECT * FROM tl_balance_series($1, $2, $3, $4)",
        heavy,
        now - timedelta(days=30),
        now,
        timedelta(days=1),
    )
    nested = [p for p in plans if "lot_movements" in p]
    assert nested, plans  # the statement that reads the lots' movements was logged
    text = "\n".join(plans)
    assert "Gather" not in text and "Parallel" not in text, text
    for table in ("lots", "entries", "lot_movements"):
        assert f"Seq Scan on {table} " not in text, text
