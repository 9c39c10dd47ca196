"""The per-test database: a clone of the schema template, isolated from others."""

from __future__ import annotations

import asyncpg

from tests.pg import Server, cloned_database, execute, run_sync


async def test_clone_has_the_template_schema(db: asyncpg.Connection) -> None:
    """A test's database starts with the tables that schema.sql creates."""
    assert await db.fetchval("SELECT to_regclass('schema_migrations')") is not None


async def _has_table(dsn: str, table: str) -> bool:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
    finally:
        await conn.close(timeout=30)


def test_clones_are_isolated(pg_server: Server, template_database: str, database_url: str) -> None:
    """A table created in one test's database does not appear in another's."""
    with cloned_database(pg_server, template_database) as other_url:
        run_sync(execute(database_url, "CREATE TABLE only_in_first (id int)"))
        assert run_sync(_has_table(database_url, "only_in_first"))
        assert not run_sync(_has_table(other_url, "only_in_first"))
