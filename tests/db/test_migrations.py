"""Versioned migrations and schema.sql as the repeatable step (service/migrate.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service import db as service_db
from service import migrate
from service.audit import run_audit
from tests.pg import Server, cloned_database
from tests.schema_dump import differences, schema_objects

FIXTURES = Path(__file__).parent / "fixtures"
# Every versioned migration, in order: a release-7 database runs them all.
SINCE_RELEASE_7 = [f"{m.version:04d}_{m.name}" for m in migrate.migrations()]


@pytest.fixture
def empty_url(pg_server: Server) -> Iterator[str]:
    """DSN of a new, empty database."""
    with cloned_database(pg_server, "template0") as dsn:
        yield dsn


@pytest.fixture
def empty_url_2(pg_server: Server) -> Iterator[str]:
    """DSN of a second new, empty database."""
    with cloned_database(pg_server, "template0") as dsn:
        yield dsn


async def _release_7(dsn: str, *, data: bool = True) -> None:
    """Build the database as the last release before versioned migrations did."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute((FIXTURES / "schema_release_7.sql").read_text())
        if data:
            await conn.execute((FIXTURES / "release_7_data.sql").read_text())
    finally:
        await conn.close()


async def _migrate(dsn: str) -> migrate.Report:
    conn = await service_db.connect(dsn)
    try:
        return await migrate.migrate(conn)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_release_7_database_with_data_migrates_to_what_a_fresh_install_is(
    empty_url: str, empty_url_2: str
) -> None:
    """A filled database of the last release, migrated, passes the audit, takes writes, and its
    `pg_dump --schema-only` equals a fresh install's object by object (a change to schema.sql that
    lacks its migration fails here, naming the object and the difference)."""
    await _release_7(empty_url)
    report = await _migrate(empty_url)
    assert report.applied == [*SINCE_RELEASE_7, "schema.sql"]
    assert (await _migrate(empty_url)).applied == []  # once
    await _migrate(empty_url_2)

    diff = differences(schema_objects(empty_url_2), schema_objects(empty_url))
    assert not diff, "the migrated schema differs from a fresh install:\n\n" + "\n\n".join(diff)

    conn = await service_db.connect(empty_url)
    try:
        assert await run_audit(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM lots") == 8
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 2
        # The statistics schema.sql adds to a table that has rows are filled at once,
        # not at autovacuum's next analysis.
        filled = await conn.fetch(
            "SELECT statistics_name, n_distinct FROM pg_stats_ext_exprs"
            " WHERE tablename = 'usage_events' ORDER BY 1"
        )
        assert [r["statistics_name"] for r in filled] == ["usage_events_buckets"] * 2, filled
        assert None not in [r["n_distinct"] for r in filled], filled
        # Expiry, spending and chaining work on the old rows with the new functions.
        await conn.fetchval(service_db.load_queries()["sweep_expired"], 100, {"actor": "t"})
        answer = await conn.fetchval(
            "SELECT tl_execute('meter', 'after-1', '\\x0d', 'debit', 201, $1, $2)",
            {"account": "employee:e-1", "amount": 100},
            {"actor": "t", "request_id": "r-after"},
        )
        assert answer["status"] == 201, answer
        assert await conn.fetchval("SELECT tl_chain_pending(1000, '0 seconds')") > 0
        assert await run_audit(conn) == []
        state = await migrate.status(conn)
        assert state.current and state.version == migrate.latest_version()
    finally:
        await conn.close()


async def test_fresh_install_records_every_migration_as_contained_in_schema_sql(
    empty_url: str,
) -> None:
    """An empty database gets schema.sql alone, every migration is recorded as already in it, and
    migrating again does nothing."""
    report = await _migrate(empty_url)
    assert report.fresh and report.applied == ["schema.sql (fresh install)"]
    conn = await asyncpg.connect(empty_url)
    try:
        rows = await conn.fetch("SELECT version, how FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["how"]) for r in rows] == [
            (m.version, "schema.sql") for m in migrate.migrations()
        ]
        assert await conn.fetchval("SELECT to_regclass('schema_version')") is None
    finally:
        await conn.close()
    assert (await _migrate(empty_url)).applied == []


async def test_policy_links_as_arrays_become_rows(empty_url: str) -> None:
    """A database at migration 0011 kept each bound account's limits as arrays in one
    policy_links row; 0012 drops that table and schema.sql, run after it, makes one row
    per limit from the policies: the audit finds them equal to the policies. schema.sql
    runs again after any migration, even one whose schema.sql content was applied before
    (0012 drops a table only schema.sql makes)."""
    await _migrate(empty_url)
    conn = await service_db.connect(empty_url)
    try:
        ctx = {"actor": "test", "request_id": "r", "now": None}
        await conn.execute("INSERT INTO departments (id, name) VALUES ('eng', 'Eng')")
        for emp in ("a", "b"):
            await conn.fetchval(
                "SELECT tl_op_put_employee($1, $2)",
                {"id": emp, "name": emp, "email": f"{emp}@example.com", "department": "eng"},
                ctx,
            )
        policy = {
            "limits": [
                {"window": "day", "amount": 100},
                {"window": "month", "amount": 1000, "mode": "soft"},
            ]
        }
        await conn.fetchval(
            "SELECT tl_op_put_policy($1, $2)", {"account": "employee:a", **policy}, ctx
        )
        rows = await conn.fetch("SELECT * FROM policy_links ORDER BY account_id, rank")
        assert [(r["rank"], r["period"], r["amount"], r["hard"]) for r in rows] == [
            (1, "day", 100, True),
            (2, "month", 1000, False),
        ]
        await conn.execute(
            "DROP TABLE policy_links;"
            " CREATE TABLE policy_links (account_id bigint PRIMARY KEY REFERENCES accounts (id),"
            " own_department text, owner text[] NOT NULL, ord integer[] NOT NULL,"
            " department text[] NOT NULL, period text[] NOT NULL, time_zone text[] NOT NULL,"
            " amount bigint[] NOT NULL, hard boolean[] NOT NULL);"
            " INSERT INTO policy_links SELECT a.id, 'eng', ARRAY['employee:a', 'employee:a'],"
            " ARRAY[1, 2], ARRAY[NULL, NULL]::text[], ARRAY['day', 'month'], ARRAY['UTC', 'UTC'],"
            " ARRAY[100, 1000], ARRAY[true, false] FROM accounts a WHERE a.address = 'employee:a';"
            " DELETE FROM schema_migrations WHERE version = 12"
        )
    finally:
        await conn.close()
    report = await _migrate(empty_url)
    assert report.applied == ["0012_policy_links_as_rows", "schema.sql"]
    conn = await service_db.connect(empty_url)
    try:
        after = await conn.fetch("SELECT * FROM policy_links ORDER BY account_id, rank")
        assert [dict(r) for r in after] == [dict(r) for r in rows]
        assert await run_audit(conn) == []
    finally:
        await conn.close()


async def test_three_replicas_starting_at_once_migrate_once(empty_url: str) -> None:
    """Three `tokenledger migrate` processes started together on an empty database: one applies
    schema.sql, the other two wait for its lock and then find nothing to do."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            "migrate",
            "--database-url",
            empty_url,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [(await p.communicate())[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    applied = [o for o in outputs if "applied schema.sql" in o]
    assert len(applied) == 1, outputs
    conn = await asyncpg.connect(empty_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_applied") == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE how = 'schema.sql'"
        ) == len(migrate.migrations())
    finally:
        await conn.close()


async def test_concurrent_upgrades_of_a_release_7_database_run_each_migration_once(
    empty_url: str,
) -> None:
    """Three migrators on a release-7 database at once: each migration since release 7 and
    schema.sql run once in all."""
    await _release_7(empty_url, data=False)
    reports = await asyncio.gather(*(_migrate(empty_url) for _ in range(3)))
    steps = sorted(step for r in reports for step in r.applied)
    assert steps == sorted([*SINCE_RELEASE_7, "schema.sql"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603  # why: our own CLI with arguments the test built
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_migrate_check_is_a_readiness_gate(empty_url: str) -> None:
    """`migrate --check` changes nothing and exits 1 naming what is pending while the database is
    behind, and 0 once `migrate` has run."""
    await _release_7(empty_url, data=False)
    behind = _cli("migrate", "--check", "--database-url", empty_url)
    assert behind.returncode == 1, behind
    assert "pending 0008_from_release_7" in behind.stdout
    assert "pending schema.sql" in behind.stdout
    conn = await asyncpg.connect(empty_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()
    done = _cli("migrate", "--database-url", empty_url)
    assert done.returncode == 0, done
    current = _cli("migrate", "--check", "--database-url", empty_url)
    assert current.returncode == 0 and "current" in current.stdout, current


async def test_older_legacy_and_edited_migrations_are_refused(empty_url: str) -> None:
    """A database below legacy version 7, and one whose applied migration has another checksum,
    are refused with a reason, and nothing is changed."""
    await _release_7(empty_url, data=False)
    conn = await service_db.connect(empty_url)
    try:
        await conn.execute("DELETE FROM schema_version WHERE version = 7")
        with pytest.raises(migrate.MigrationError, match="legacy schema version 6"):
            await migrate.migrate(conn)
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
        await conn.execute("INSERT INTO schema_version (version) VALUES (7)")
        await migrate.migrate(conn)
        await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 8")
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await migrate.migrate(conn)
    finally:
        await conn.close()


async def test_schema_sql_changes_are_applied_once_per_content(empty_url: str) -> None:
    """schema.sql runs again when its content is new to the database (a new function needs no
    migration), and not when it was applied before (a replica of the previous release starting
    during a rollout does not put its old functions back)."""
    await _migrate(empty_url)
    conn = await service_db.connect(empty_url)
    try:
        await conn.execute("UPDATE schema_applied SET checksum = 'older'")
        assert (await migrate.migrate(conn)).applied == ["schema.sql"]
        assert await conn.fetchval("SELECT count(*) FROM schema_applied") == 2
        assert (await migrate.migrate(conn)).applied == []
        assert (await migrate.migrate(conn, reapply=True)).applied == ["schema.sql"]
    finally:
        await conn.close()
