"""Upgrading a database written by an older schema version."""

from __future__ import annotations

import asyncpg

from service import db as service_db


async def test_versions_6_and_7_fill_the_new_roll_ups_from_usage_daily(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A database from before version 6 holds usage only in usage_daily: applying
    the schema fills usage_monthly, usage_monthly_models and usage_daily_models
    from it once, so whole-month and model reports over old months are not empty."""
    await db.execute("INSERT INTO departments (id, name) VALUES ('eng', 'Eng')")
    await db.execute(
        "INSERT INTO accounts (address, type, ref) VALUES "
        "('employee:a', 'employee', 'a'), ('employee:b', 'employee', 'b')"
    )
    await db.execute(
        """INSERT INTO usage_daily (day, account_id, model, project, events, input_tokens,
                                    cached_input_tokens, output_tokens, credits)
           SELECT d, a.id, m, p, 2, 100, 10, 50, 7
           FROM generate_series('2026-01-30'::date, '2026-02-02'::date, '1 day') d,
                accounts a, unnest(ARRAY['m1', 'm2']) m, unnest(ARRAY['', 'x']) p
           WHERE a.type = 'employee'"""
    )
    # As a version 5 database: no version 6/7 rows, the new tables empty.
    await db.execute("DELETE FROM schema_version WHERE version >= 6")
    await db.execute("TRUNCATE usage_monthly, usage_monthly_models, usage_daily_models")
    conn = await service_db.connect(database_url)
    try:
        await service_db.apply_schema(conn)
        await service_db.apply_schema(conn)  # a second apply changes nothing
    finally:
        await conn.close()
    daily = await db.fetchrow(
        "SELECT sum(events) AS e, sum(credits) AS c, count(*) AS n FROM usage_daily"
    )
    monthly = await db.fetch(
        "SELECT month, sum(events) AS e, sum(credits) AS c FROM usage_monthly "
        "GROUP BY month ORDER BY month"
    )
    assert [(str(r["month"]), r["e"], r["c"]) for r in monthly] == [
        ("2026-01-01", 32, 112),
        ("2026-02-01", 32, 112),
    ]
    models = await db.fetchrow(
        "SELECT sum(events) AS e, sum(credits) AS c, count(*) AS n FROM usage_daily_models"
    )
    assert (models["e"], models["c"]) == (daily["e"], daily["c"]) == (64, 224)
    assert models["n"] == 4 * 2 * 2  # days x models x projects
    per_model = await db.fetchrow(
        "SELECT sum(events) AS e, sum(credits) AS c, count(*) AS n FROM usage_monthly_models"
    )
    assert (per_model["e"], per_model["c"], per_model["n"]) == (64, 224, 2 * 2 * 2)
    assert await db.fetchval("SELECT max(version) FROM schema_version") == 7
