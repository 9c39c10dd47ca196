"""The background loop analyzes hot tables that grew (tl_analyze_grown), so the generic
plans each connection keeps are made again with statistics that know the tables' size."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.background import Background


async def test_background_pass_analyzes_a_table_that_doubled(
    client: Any, database_url: str
) -> None:
    sql = await asyncpg.connect(database_url)
    try:
        await sql.execute("ANALYZE idempotency_keys")
        await sql.execute(
            "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
            "SELECT 'c', 'k' || g, '\\x00', 200, 'null' FROM generate_series(1, 600) g"
        )
        await sql.execute("SELECT pg_stat_force_next_flush()")
        background = Background(client.app.state.ledger)
        assert "idempotency_keys" in await background.analyze_grown()
        reltuples = await sql.fetchval(
            "SELECT reltuples FROM pg_class WHERE relname = 'idempotency_keys'"
        )
        assert reltuples >= 600  # the client's own keys may be there too
        await sql.execute("SELECT pg_stat_force_next_flush()")
        assert "idempotency_keys" not in await background.analyze_grown()
    finally:
        await sql.close()
