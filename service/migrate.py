"""Schema migrations: versioned, forward-only files, then schema.sql as a
repeatable step (the model of Flyway's versioned and repeatable migrations).

* ``service/migrations/NNNN_name.sql`` changes what re-running a script cannot
  change safely: a new or altered column of an existing table, a back-fill,
  a dropped index, a renamed constraint. Each runs once, in version order,
  and is recorded in ``schema_migrations`` with its checksum; editing one
  after it was applied is refused.
* ``schema.sql`` (top level, shipped in the package) is the readable whole
  current schema: tables as they are now, functions, triggers and grants,
  all written to be safe to run again. After the pending migrations it is
  applied when its content (checksum) has not been applied before, or when
  a migration ran (one may drop what only schema.sql makes), so a new
  function, trigger, grant or table needs no migration at all.
* A fresh database gets schema.sql alone, and every migration is recorded as
  already contained in it. The test that upgrades a database of the last
  release (tests/db/test_migrations.py) compares the result with a fresh
  install, object by object, so a change missing its migration shows up
  there by name.

Everything runs in one database transaction under a transaction-level
advisory lock: replicas starting together migrate once (the others wait,
then find nothing to do), a failure leaves the database as it was, and it
works through pgbouncer's transaction pooling. Why not alembic or yoyo:
both would still need schema.sql as a repeatable step kept in step with
their scripts; the runner is the ~100 lines below, its rules are the ones
written here, and it adds no dependency.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import asyncpg

from service import db

# Legacy releases recorded their schema in `schema_version` (1 to 7);
# versioned migrations continue from there. A database below this version
# must first be upgraded by the release that shipped version 7.
LEGACY_VERSION = 7

# "tokenled" as a bigint: one migrator at a time.
LOCK_KEY = 0x746F6B656E6C6564

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database cannot be migrated by this release (said why)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass
class Status:
    """Where a database stands against this release's migrations."""

    version: int | None  # the newest migration applied (None: an empty database)
    pending: list[Migration] = field(default_factory=list)
    schema_applied: bool = False
    ahead: bool = False  # it has migrations this release does not know

    @property
    def current(self) -> bool:
        return not self.pending and self.schema_applied and self.version is not None


@dataclass
class Report:
    """What one migrate() call did (nothing, when another replica did it)."""

    applied: list[str] = field(default_factory=list)
    fresh: bool = False
    version: int = LEGACY_VERSION


def schema_sql() -> str:
    return resources.files("service").joinpath("schema.sql").read_text(encoding="utf-8")


@cache
def schema_checksum() -> str:
    return hashlib.sha256(schema_sql().encode()).hexdigest()


@cache
def migrations() -> tuple[Migration, ...]:
    """The migration files of this release, in version order."""
    found: dict[int, Migration] = {}
    for path in resources.files("service").joinpath("migrations").iterdir():
        if not path.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name} is not named NNNN_lower_case.sql")
        version = int(match["version"])
        if version <= LEGACY_VERSION or version in found:
            raise MigrationError(
                f"migration {path.name}: its version is taken or not above {LEGACY_VERSION}"
            )
        found[version] = Migration(version, match["name"], path.read_text(encoding="utf-8"))
    return tuple(found[v] for v in sorted(found))


def latest_version() -> int:
    """The version a database must have reached for this release (readiness)."""
    return max((m.version for m in migrations()), default=LEGACY_VERSION)


async def _schema_applied(conn: asyncpg.Connection) -> bool:
    """Whether this content of schema.sql has been applied (ever: a replica of
    the previous release stays ready while the next one rolls out); the query
    readiness asks too (schema_state)."""
    state = await conn.fetchrow(db.load_queries()["schema_state"], schema_checksum())
    assert state is not None
    return bool(state["schema_applied"])


async def status(conn: asyncpg.Connection) -> Status:
    """Read-only: what migrate() would do (`tokenledger migrate --check`)."""
    q = db.load_queries()
    state = await conn.fetchrow(q["migrate_state"])
    assert state is not None
    if not state["tracked"]:
        if state["legacy"]:
            legacy = await conn.fetchval(q["migrate_legacy_version"])
            return Status(version=legacy, pending=list(migrations()))
        return Status(version=None, pending=list(migrations()))
    applied = {r["version"]: r for r in await conn.fetch(q["migrate_applied"])}
    _check_applied(applied)
    version = max(applied, default=None)
    return Status(
        version=version,
        pending=[m for m in migrations() if m.version not in applied],
        schema_applied=await _schema_applied(conn),
        ahead=version is not None and version > latest_version(),
    )


async def migrate(conn: asyncpg.Connection, *, reapply: bool = False) -> Report:
    """Bring the database to this release, in one transaction, once.

    `reapply` runs schema.sql even when its content was applied before (after
    going back to an older schema.sql, say)."""
    q = db.load_queries()
    report = Report(version=latest_version())
    async with conn.transaction():
        await conn.execute(q["migrate_lock"], LOCK_KEY)
        state = await conn.fetchrow(q["migrate_state"])
        assert state is not None
        fresh = not state["tracked"] and not state["legacy"] and not state["populated"]
        if not fresh and not state["tracked"] and not state["legacy"]:
            raise MigrationError(
                "the database has tables but no schema_migrations or schema_version: "
                "not a tokenledger database, or one older than every release"
            )
        legacy = None
        if state["legacy"] and not state["tracked"]:
            legacy = await conn.fetchval(q["migrate_legacy_version"])
            if legacy != LEGACY_VERSION:
                raise MigrationError(
                    f"the database is at legacy schema version {legacy}: upgrade it with the "
                    f"release that shipped version {LEGACY_VERSION} first"
                )
        await conn.execute(q["migrate_bookkeeping"])
        if fresh:
            await conn.execute(schema_sql())
            for m in migrations():
                await conn.execute(q["migrate_record"], m.version, m.name, m.checksum, "schema.sql")
            await conn.execute(q["migrate_record_schema"], schema_checksum())
            report.fresh = True
            report.applied.append("schema.sql (fresh install)")
            return report
        if legacy is not None:
            for version in range(1, LEGACY_VERSION + 1):
                await conn.execute(q["migrate_record"], version, "legacy", "", "legacy")
        applied = {r["version"]: r for r in await conn.fetch(q["migrate_applied"])}
        _check_applied(applied)
        if max(applied) > latest_version():
            raise MigrationError(
                f"the database is at migration {max(applied)}, newer than this release "
                f"({latest_version()}): not migrating it back"
            )
        for m in migrations():
            if m.version in applied:
                continue
            await conn.execute(m.sql)
            await conn.execute(q["migrate_record"], m.version, m.name, m.checksum, "migration")
            report.applied.append(f"{m.version:04d}_{m.name}")
        # After any migration too: a migration may drop what only schema.sql
        # makes again (0012 drops policy_links), and schema.sql is safe to rerun.
        if reapply or report.applied or not await _schema_applied(conn):
            await conn.execute(schema_sql())
            await conn.execute(q["migrate_record_schema"], schema_checksum())
            report.applied.append("schema.sql")
    return report


def _check_applied(applied: dict[int, asyncpg.Record]) -> None:
    """A migration that changed after it ran would leave databases that ran
    the old text and databases that ran the new one: refused."""
    for m in migrations():
        row = applied.get(m.version)
        if row is not None and row["checksum"] != m.checksum and row["checksum"]:
            raise MigrationError(
                f"migration {m.version:04d}_{m.name} was changed after it was applied; "
                "add a new migration instead"
            )
