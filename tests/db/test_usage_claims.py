"""A usage batch claims its events with a plain INSERT and falls back to ON CONFLICT
DO NOTHING only when a concurrent request claimed one of them in between (schema.sql,
tl_record_usage_batch): each event is still recorded once, and the other events of
the batch are recorded all the same."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from service import db as service_db

CTX: dict[str, Any] = {"actor": "test", "request_id": "claims", "now": None}


def _event(event_id: str) -> dict[str, Any]:
    return {
        "source": "gw",
        "event_id": event_id,
        "account": "employee:e1",
        "model": "m1",
        "input_tokens": 1000,
        "cached_input_tokens": 0,
        "output_tokens": 100,
        "occurred_at": None,
        "reservation": None,
        "project": None,
        "tags": None,
    }


async def _setup(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT tl_op_put_department($1, $2)", {"id": "eng", "name": "E"}, CTX)
    await conn.fetchval(
        "SELECT tl_op_put_employee($1, $2)",
        {"id": "e1", "name": "E", "email": "e1@example.com", "department": "eng"},
        CTX,
    )
    await conn.fetchval(
        "SELECT tl_op_add_price($1, $2)",
        {
            "model": "m1",
            "effective_from": "2020-01-01T00:00:00Z",
            "input_per_mtok": 2_000_000,
            "cached_input_per_mtok": 1_000_000,
            "output_per_mtok": 8_000_000,
        },
        CTX,
    )
    await conn.fetchval(
        "SELECT tl_execute('test', NULL, NULL, 'grant', 201, $1, $2)",
        {"employee": "e1", "amount": 1_000_000, "reason": "spot_bonus"},
        CTX,
    )


async def _batch(conn: asyncpg.Connection, events: list[dict[str, Any]]) -> dict[str, str]:
    out = await conn.fetchval("SELECT tl_record_usage_batch($1, $2)", events, CTX)
    return {r["event_id"]: r["status"] for r in out["results"]}


async def _waits_for_lock(conn: asyncpg.Connection, pid: int) -> bool:
    """Whether the backend `pid` comes to wait for a lock within about 4 s (asked
    every 20 ms on `conn`)."""
    for _ in range(200):
        if await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_event_claimed_concurrently_is_a_duplicate_and_the_rest_record(
    database_url: str,
) -> None:
    """Request A claims event x and has not committed; request B sends x and y: B's plain
    INSERT waits for A, meets x's key when A commits, and is run again with ON CONFLICT.
    x answers duplicate to B, y is recorded, and each is charged once."""
    a = await service_db.connect(database_url)
    b = await service_db.connect(database_url)
    try:
        await _setup(a)
        async with a.transaction():
            assert await _batch(a, [_event("x")]) == {"x": "recorded"}
            b_pid = await b.fetchval("SELECT pg_backend_pid()")
            answer_b = asyncio.create_task(_batch(b, [_event("x"), _event("y")]))
            # (until B waits for A's claim of x)
            assert await _waits_for_lock(a, b_pid), "B never waited for A's uncommitted claim"
        assert await asyncio.wait_for(answer_b, 30) == {"x": "duplicate", "y": "recorded"}
        rows = await a.fetch(
            "SELECT event_id, transaction_id IS NOT NULL AS charged FROM usage_events "
            "ORDER BY event_id"
        )
        assert [(r["event_id"], r["charged"]) for r in rows] == [("x", True), ("y", True)]
        charged = await a.fetchval(
            "SELECT sum(-amount) FROM entries e JOIN accounts a ON a.id = e.account_id "
            "WHERE a.address = 'employee:e1' AND amount < 0"
        )
        cost = 2 * (1000 * 2 + 100 * 8)  # two events at 2 + 8 credits per 1k tokens
        assert charged == cost
    finally:
        await a.close()
        await b.close()


async def test_batch_planned_on_a_small_table_probes_recorded_events_by_key(
    database_url: str,
) -> None:
    """The look-up of events recorded before (a repeat answers their stored
    result) reads usage_events by (source, event_id), one probe per event,
    whatever the statistics said when the session's generic plan was made.
    A plan made while the table was small turned the look-up into a hash
    join fed by the whole table, kept for the session: a fresh database's
    first batches slowed with every event recorded (290 ms a batch of 500
    at 10,000 events, against 29 ms), until the background analysis made
    the connections plan again. Counted: rows fetched by index scans in one
    batch of 10, after 3,000 events, on the connection that planned the
    statement when the table held 10."""
    a = await service_db.connect(database_url)
    try:
        await _setup(a)
        await a.execute("ANALYZE usage_events")
        await _batch(a, [_event(f"first-{n}") for n in range(10)])
        # 3,000 more events, recorded the way the service would (another connection).
        b = await service_db.connect(database_url)
        try:
            for start in range(0, 3000, 500):
                await _batch(b, [_event(f"bulk-{n}") for n in range(start, start + 500)])
        finally:
            await b.close()
        await a.execute("SELECT pg_stat_force_next_flush()")
        before = await a.fetchval(
            "SELECT idx_tup_fetch FROM pg_stat_user_tables WHERE relname = 'usage_events'"
        )
        assert await _batch(a, [_event(f"last-{n}") for n in range(10)]) == {
            f"last-{n}": "recorded" for n in range(10)
        }
        await a.execute("SELECT pg_stat_force_next_flush()")
        after = await a.fetchval(
            "SELECT idx_tup_fetch FROM pg_stat_user_tables WHERE relname = 'usage_events'"
        )
        assert after - before <= 50, f"one batch of 10 fetched {after - before} usage_events rows"
    finally:
        await a.close()
