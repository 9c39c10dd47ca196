"""Database access: the pool, named queries and retries (migrations: service/migrate.py).

Everything that talks to PostgreSQL goes through here so that timeouts,
codecs and the retry policy are decided in one place.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

SQL_DIR = Path(__file__).resolve().parent / "sql"

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})

T = TypeVar("T")

if TYPE_CHECKING:
    # A connection of the pool, as pool.acquire() hands it out (not
    # subscriptable at run time).
    Pooled: TypeAlias = PoolConnectionProxy[asyncpg.Record]


def load_queries() -> dict[str, str]:
    """Read the named queries of service/sql/*.sql.

    A query starts with a line `-- name: some_name` and runs to the next such
    line; the lines after the name that start with `--` describe it.
    """
    queries: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        name: str | None = None
        lines: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("-- name:"):
                if name is not None:
                    queries[name] = "\n".join(lines).strip()
                name = line.removeprefix("-- name:").strip()
                if name in queries:
                    raise ValueError(f"duplicate query name {name} in {path}")
                lines = []
            elif name is not None and not (line.startswith("--") and not lines):
                lines.append(line)
        if name is not None:
            queries[name] = "\n".join(lines).strip()
    # usage_report over the accounts $10 only (a JSON page of a report led by the
    # employee: service/reports.py, _employee_pages), made from usage_report's own
    # text so that the two never differ in anything else. The condition joins the
    # first aggregation, and PostgreSQL pushes it into each source's branch.
    mark = "    -- @accounts (usage_report_accounts restricts the accounts here: service/db.py)"
    assert queries["usage_report"].count(mark) == 1, "usage_report lost its @accounts line"
    # The events' and the journal's branches sum by the asked keys, so the account
    # is a key there only when asked: they take the condition themselves, on the
    # column their indexes have.
    queries["usage_report_accounts"] = re.sub(
        r"-- @accounts: (\w\.account_id)",
        r"AND \1 = ANY ($10::bigint[])",
        queries["usage_report"].replace(mark, "    WHERE r.account_id = ANY ($10::bigint[])"),
    )
    assert queries["usage_report_accounts"].count("account_id = ANY ($10::bigint[])") == 4
    # And a window of its rows ($10 rows from row $11 on; $10 null: all of them): read
    # with a plain query, which PostgreSQL may run with parallel workers, where it
    # never does for a cursor (service/reports.py, _window_plan).
    assert queries["usage_report"].endswith(";")
    queries["usage_report_window"] = (
        queries["usage_report"].removesuffix(";") + "\nLIMIT $10::bigint OFFSET $11::bigint;"
    )

    # And over the rows whose model ($12 'model'), project ('project') or first tag
    # key ('tag') is one of $10, or null with $11 (a chunk of a report led by that
    # key: _value_pages). A project is '' in the sources where the answer has null;
    # the tag is tag1 as each source reads it (`raw`).
    def lead(kind: str) -> str:
        """The leading key's value of a row of `raw`, the key named by parameter `kind`."""
        return (
            f"CASE {kind}::text WHEN 'model' THEN r.model WHEN 'project' THEN nullif(r.project, '')"
            " ELSE r.tag1 END"
        )

    value = lead("$12")
    queries["usage_report_values"] = queries["usage_report"].replace(
        mark, f"    WHERE {value} = ANY ($10::text[]) OR ($11::boolean AND {value} IS NULL)"
    )
    # And over the rows whose value is from $10 on in byte order, up to $11 (both
    # included; null $11: no end; null $10: none), or null with $12 ($13 the key as
    # above), $14 rows from row $15 on ($14 null: all of them): a chunk of a report
    # led by that key read from the events and the journal themselves
    # (_value_range_plan), with a plain query (parallel workers) and a comparison
    # or two a row however many values the chunk has.
    value = lead("$13")
    ranged = (
        f'({value}) COLLATE "C" >= ($10::text COLLATE "C")'
        f' AND (({value}) COLLATE "C" <= ($11::text COLLATE "C") OR $11::text IS NULL)'
    )
    in_range = f"({ranged}) OR ($12::boolean AND {value} IS NULL)"

    def windowed(where: str) -> str:
        return (
            queries["usage_report"].replace(mark, f"    WHERE {where}").removesuffix(";")
            + "\nLIMIT $14::bigint OFFSET $15::bigint;"
        )

    queries["usage_report_range"] = windowed(in_range)
    # And the same over the accounts $16 only: a page's read of its cursor's value
    # alone, from the cursor's employee on (report_accounts_after).
    queries["usage_report_range_accounts"] = windowed(
        f"({in_range}) AND r.account_id = ANY ($16::bigint[])"
    )
    return queries


def _json_text(value: object) -> str:
    return _json_encoder.encode(value).decode()


_json_encoder = msgspec.json.Encoder()


async def _init_connection(conn: asyncpg.Connection, *, pooled: bool = False) -> None:
    # jsonb in and out as Python objects; the service never builds JSON text
    # by hand.
    # msgspec rather than the json module: every operation's arguments and
    # answer cross here, and msgspec is several times faster both ways.
    for name in ("jsonb", "json"):
        await conn.set_type_codec(
            name, encoder=_json_text, decoder=msgspec.json.decode, schema="pg_catalog"
        )
    if not pooled and conn.get_server_version() >= (14, 0):
        # A statement whose client has gone (a replica stopped past its
        # shutdown grace, or killed) is cancelled within a second instead of
        # running on, and committing, after nobody waits for its answer.
        # Once per connection, not per request; PostgreSQL 14 and later.
        # Behind pgbouncer a SET reaches one server connection of many: the
        # role's defaults carry it there (README, "Behind pgbouncer").
        await conn.execute("SET client_connection_check_interval = 1000")


# Statement cache size of connections made by connect() (the CLI sets 0
# from TOKENLEDGER_DB_POOLER behind pgbouncer).
connect_statement_cache_size = 100


async def connect(
    dsn: str, *, connect_timeout_seconds: float = 10.0, statement_cache_size: int | None = None
) -> asyncpg.Connection:
    """A single connection with the same codecs as the pool's (for the CLI)."""
    cache = connect_statement_cache_size if statement_cache_size is None else statement_cache_size
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout_seconds,
        server_settings={"TimeZone": "UTC"},
        statement_cache_size=cache,
    )
    await _init_connection(conn, pooled=cache == 0)
    return conn


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 5,
    base_delay_seconds: float = 0.005,
    max_delay_seconds: float = 0.2,
) -> T:
    """Run a whole database transaction again on serialization failures and
    deadlocks (SQLSTATE 40001/40P01), bounded and with full jitter.

    Only whole transactions are retried: `fn` must open and commit its own.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except asyncpg.PostgresError as exc:
            if exc.sqlstate not in RETRYABLE_SQLSTATES or attempt == attempts:
                raise
            cap = min(max_delay_seconds, base_delay_seconds * (2**attempt))
            # why S311: jitter spreads retries; it protects nothing secret.
            await asyncio.sleep(random.uniform(0, cap))  # noqa: S311
    raise AssertionError("unreachable: the loop returns or raises")


def client_timeout(timeout_ms: int) -> float:
    """The client-side bound of a statement allowed `timeout_ms` on the server: as
    long as the server may run it and a little more (the pool's command timeout,
    twice the usual statement timeout, would cut it off first and answer 503)."""
    return timeout_ms / 1000 + max(1.0, timeout_ms / 1000 * 0.1)


async def set_local(
    conn: asyncpg.Connection | Pooled, timeout_ms: int, *, jit: bool = True, work_mem_mb: int = 0
) -> None:
    """The settings of a long statement, for its transaction only (SET LOCAL),
    so the connection goes back to the pool with the usual ones."""
    await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
    # Planned for its own arguments every time. asyncpg keeps each statement
    # prepared on its connection, and PostgreSQL plans the sixth execution of a
    # prepared statement generically (default selectivities) when that looks
    # no dearer: compensation's export then estimated one grant where there were
    # 10,000 and joined its page to them by nested loop, 8 to 15 s instead of
    # 0.2 s (README, Reports). A report's planning is milliseconds.
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    if not jit:
        await conn.execute("SET LOCAL jit = off")
    if work_mem_mb:
        await conn.execute(f"SET LOCAL work_mem = '{int(work_mem_mb)}MB'")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, in place of asyncpg's default (a round
    trip of `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`
    per release, a third of the database calls of a debit): the service
    leaves no session state behind. Its settings are SET LOCAL, it takes no
    session advisory locks on pool connections, opens no cursors outside a
    transaction and LISTENs on a connection of its own. An open transaction
    is still rolled back by asyncpg before this runs."""


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    statement_timeout_ms: int,
    lock_timeout_ms: int,
    idle_in_transaction_timeout_ms: int,
    connect_timeout_seconds: float,
    application_name: str = "tokenledger",
    role: str | None = None,
    pgbouncer: bool = False,
) -> asyncpg.Pool:
    """A pool whose every connection carries the service's timeouts.

    Timeouts are server settings on each connection so that no statement, row
    lock wait or forgotten transaction can hold a connection forever. Behind
    pgbouncer they cannot be (it refuses startup parameters it does not
    track, and a SET reaches one server connection of many): the role's
    defaults carry them, and check_pooled_timeouts() verifies that.
    """
    settings = {
        "application_name": application_name,
        "statement_timeout": str(statement_timeout_ms),
        "lock_timeout": str(lock_timeout_ms),
        "idle_in_transaction_session_timeout": str(idle_in_transaction_timeout_ms),
        "TimeZone": "UTC",
    }
    if role:
        # Least privilege: the session runs as the given role from its start.
        settings["role"] = role
    if pgbouncer:
        settings = {k: settings[k] for k in ("application_name", "TimeZone")}

    async def init(conn: asyncpg.Connection) -> None:
        await _init_connection(conn, pooled=pgbouncer)

    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout_seconds,
        command_timeout=max(1.0, statement_timeout_ms / 1000 * 2),
        init=init,
        reset=_keep_session,
        server_settings=settings,
        # Behind pgbouncer each statement is parsed again on whichever server
        # connection runs it (asyncpg re-sends Parse with the Bind when the
        # cache is off); no named prepared statement outlives its call.
        statement_cache_size=0 if pgbouncer else 100,
    )
    assert pool is not None
    return pool


async def check_pooled_timeouts(pool: asyncpg.Pool) -> None:
    """Behind pgbouncer: refuse to start when the role gives the server
    connections no statement, lock or idle-in-transaction timeout (the pool
    cannot set them), naming the statements that fix it."""
    row = await pool.fetchrow(load_queries()["session_timeouts"])
    assert row is not None
    missing = [name for name, value in row.items() if value in ("0", None)]
    if missing:
        fixes = "; ".join(f"ALTER ROLE <role> SET {name} = '...'" for name in missing)
        raise RuntimeError(
            f"behind pgbouncer the database role must carry {', '.join(missing)} "
            f"(0 means unlimited): {fixes} (README, Behind pgbouncer)"
        )
