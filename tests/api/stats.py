"""Table statistics of the service's own connections, made visible now.

A backend publishes its table counters (seq_scan, idx_tup_fetch, ...) when
it goes idle, at most once a second, and when it is idle with counters left
over, about ten seconds later: a test that reads pg_stat_user_tables right
after requests to the service sees none of them (they were read as zero
before this helper existed). pg_stat_force_next_flush() run ON a connection
makes it publish as soon as that statement ends, before the answer reaches
the caller; so this runs it on every connection of the service's pool."""

from __future__ import annotations

from typing import Any

import asyncpg


async def flush_service_stats(client: Any) -> None:
    """Every pool connection of the app behind `client` publishes its counters."""
    pool: asyncpg.Pool = client.app.state.ledger.pool
    held = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        for conn in held:
            await conn.execute("SELECT pg_stat_force_next_flush()")
    finally:
        for conn in held:
            await pool.release(conn)


async def table_counters(
    db: asyncpg.Connection, client: Any, tables: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """(sequential scans, rows fetched by index scans) of each table so far,
    the service's connections' counters included."""
    await flush_service_stats(client)
    return await own_table_counters(db, tables)


async def own_table_counters(
    db: asyncpg.Connection, tables: tuple[str, ...]
) -> dict[str, tuple[int, int]]:
    """The same, with only `db`'s own counters flushed (when the statements
    counted ran on `db` itself)."""
    await db.execute("SELECT pg_stat_force_next_flush()")
    rows = await db.fetch(
        "SELECT relname, seq_scan, coalesce(idx_tup_fetch, 0) AS fetched"
        " FROM pg_stat_user_tables WHERE relname = ANY ($1::text[])",
        list(tables),
    )
    return {r["relname"]: (int(r["seq_scan"]), int(r["fetched"])) for r in rows}
