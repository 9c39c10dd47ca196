"""A year of ledger history, built set-based (generate_series, INSERT ...
SELECT, one window pass for running balances), for `make bench-scale` and
for the tests that need history at some size (tests/db/test_audit_plans.py).

    await build_year(conn, employees=10_000, entries=1_000_000)

year_database() builds one in a database of its own on a server (schema
applied, checkpointed), or finds the one an earlier run left with --keep:
bench.scale and bench.audit_scale measure on it.

What it writes, every invariant of DESIGN.md holding (the audit passes):

- `employees` employees in 20 departments, their wallets, four priced models;
- a grant program `monthly` (amount GRANT, rollover ROLLOVER, expiry at the
  end of each cycle) with a run and a program grant per employee and cycle
  for the 12 months before the current one and the current one: a `grant`
  transaction and lot at each cycle's start;
- at each cycle's end, per employee, the `rollover` transaction (ROLLOVER
  credits of the cycle's lot into a new lot expiring at the next cycle's end)
  and the `expiry` transaction of what is left (to system:expired);
- spend in between, skewed toward a few heavy users (employee emp-1 spends
  most; the n-th about 1/n^0.9 of that): `usage` transactions charging 1..5
  usage events each, `capture` transactions of reservations (captured in
  full, holds on the lots they drew on), and `debit` transactions; each
  draws from the rollover lot first and then the cycle's lot, never more
  than the wallet holds;
- entries with running balances and versions per account and system-account
  shard (one window pass over all legs), lot movements, lots' remaining,
  accounts' and shards' posted balances, the usage roll-ups summed from the
  events, and idempotency keys for the spend of the last 35 days;
- optionally the hash chain (chain_all): content hashes by the database's
  own tl_canonical_many, chained in Python, COPY'd in.

The number of spend transactions follows from `entries`: every transaction
has two entries, and grants, rollovers and expiries take 6 per employee and
cycle. Sizes are approximate (within a few percent).

Rows are loaded with session_replication_role = replica (no triggers, no
foreign-key checks): the audit checks the result instead. Needs a superuser,
as the bench's own throwaway server gives.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.postgres import dsn_for
from service import db, migrate

DEPARTMENTS = 20
MONTHS = 12
GRANT = 1_000_000
ROLLOVER = 200_000
CHAIN_BATCH = 20_000
SQL_FILE = Path(__file__).with_name("year.sql")
# Its roll-ups are built by the reports bench's SQL.
REPORTS_SQL_FILE = Path(__file__).with_name("reports.sql")


def sections(path: Path = SQL_FILE) -> dict[str, str]:
    """The sections of a bench SQL file (bench/year.sql unless named) by name."""
    found: dict[str, str] = {}
    name = None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("-- section:"):
            name = line.removeprefix("-- section:").strip()
            found[name] = ""
        elif name is not None:
            found[name] += line
    return found


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def build_year(
    conn: asyncpg.Connection,
    *,
    employees: int,
    entries: int,
    months: int = MONTHS,
    now: datetime | None = None,
    log: Callable[[str], None] = log,
) -> dict[str, float]:
    """Build the history (schema already applied, database empty) and
    return the seconds each step took. `entries` is the size to aim at."""
    seconds: dict[str, float] = {}
    if now is None:
        now = await conn.fetchval("SELECT now()")
    assert now is not None
    start: datetime = await conn.fetchval(
        "SELECT date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' "
        "- make_interval(months => $2)",
        now,
        months,
    )
    fixed = employees * (2 * (months + 1) + 4 * months)
    spends = max(0, (entries - fixed) // 2)
    spend_until = await conn.fetchval("SELECT $1::timestamptz - interval '1 hour'", now)
    # Spend per cycle, the current (partial) cycle counting as the fraction elapsed.
    elapsed = float(
        await conn.fetchval(
            "SELECT extract(epoch FROM $1::timestamptz - c) "
            "/ extract(epoch FROM c + interval '1 month' - c) "
            "FROM (SELECT $2::timestamptz + make_interval(months => $3) AS c) x",
            spend_until,
            start,
            months,
        )
    )
    cycles = months + max(elapsed, 0.01)
    sql = sections()
    fmt = {"grant": GRANT, "rollover": ROLLOVER, "departments": DEPARTMENTS, "employees": employees}

    async def step(name: str, sql: str, *args: object) -> None:
        began = time.perf_counter()
        await conn.execute(sql, *args, timeout=7200)
        seconds[name] = time.perf_counter() - began
        log(f"bench.year: {name} in {seconds[name]:.1f}s")

    await conn.execute("SET session_replication_role = replica")
    await conn.execute("SET maintenance_work_mem = '512MB'")
    await conn.execute("SET work_mem = '256MB'")
    await conn.execute("SET jit = off")
    try:
        await _script(conn, sql["directory"].format(**fmt), start)
        began = time.perf_counter()
        await _script(conn, sql["stage"].format(**fmt), start, months, spends, spend_until, cycles)
        seconds["stage"] = time.perf_counter() - began
        log(f"bench.year: staged {spends} spend transactions in {seconds['stage']:.1f}s")
        began = time.perf_counter()
        await _script(conn, sql["journal"].format(**fmt), months)
        seconds["journal"] = time.perf_counter() - began
        log(f"bench.year: journal in {seconds['journal']:.1f}s")
        await step("rollups", sections(REPORTS_SQL_FILE)["rollup"])
        await conn.execute("DROP TABLE IF EXISTS y_em, y_spend, y_legs")
    finally:
        await conn.execute("RESET session_replication_role")
    began = time.perf_counter()
    await conn.execute("VACUUM ANALYZE", timeout=7200)
    seconds["vacuum_analyze"] = time.perf_counter() - began
    log(f"bench.year: vacuum analyze in {seconds['vacuum_analyze']:.1f}s")
    return seconds


async def _script(conn: asyncpg.Connection, sql: str, *params: object) -> None:
    """Run a script statement by statement (none of ours has ";\n" inside a
    literal); the statements that name $1 get the parameters."""
    for statement in sql.split(";\n"):
        if statement.strip():
            args = params if "$1" in statement else ()
            began = time.perf_counter()
            await conn.execute(statement, *args, timeout=7200)
            seconds = time.perf_counter() - began
            if seconds > 5:
                first = next(
                    line for line in statement.strip().splitlines() if not line.startswith("--")
                )
                log(f"bench.year:   {seconds:.0f}s {first[:70]}")


async def chain_all(conn: asyncpg.Connection, log: Callable[[str], None] = log) -> int:
    """Chain every transaction, in (created_at, id) order as the chainer
    does: content hashes by tl_canonical_many in the database, the chain
    hashes folded here, rows COPY'd in. Returns how many."""
    hash_sql = (
        "SELECT k.transaction_id, sha256(convert_to(k.canonical, 'UTF8')) AS h "
        "FROM unnest($1::uuid[]) WITH ORDINALITY u (id, n) "
        "JOIN tl_canonical_many($1::uuid[]) k ON k.transaction_id = u.id ORDER BY u.n"
    )
    page_sql = (
        "SELECT id, created_at FROM transactions "
        "WHERE (created_at, id) > ($1::timestamptz, $2::uuid) ORDER BY created_at, id LIMIT $3"
    )
    # Each batch planned for its own ids (chain.verify_chain_since says why).
    await conn.execute("SET plan_cache_mode = force_custom_plan")
    seq = 0
    prev = bytes(32)
    cursor_at = await conn.fetchval("SELECT '-infinity'::timestamptz")
    cursor_id = "00000000-0000-0000-0000-000000000000"
    began = time.perf_counter()
    while True:
        rows = await conn.fetch(page_sql, cursor_at, cursor_id, CHAIN_BATCH)
        if not rows:
            break
        cursor_at, cursor_id = rows[-1]["created_at"], rows[-1]["id"]
        hashed = await conn.fetch(hash_sql, [r["id"] for r in rows])
        records = []
        for r in hashed:
            content = bytes(r["h"])
            chain_hash = hashlib.sha256(prev + content).digest()
            seq += 1
            records.append((seq, r["transaction_id"], content, prev, chain_hash))
            prev = chain_hash
        await conn.copy_records_to_table(
            "chain",
            records=records,
            columns=["seq", "transaction_id", "content_hash", "prev_hash", "chain_hash"],
        )
        if seq % 200_000 < CHAIN_BATCH:
            log(f"bench.year: chained {seq} in {time.perf_counter() - began:.0f}s")
    await conn.execute("RESET plan_cache_mode")
    return seq


# --- A year as a database of its own (bench.scale, bench.audit_scale) ------------


def size(text: str) -> int:
    """10000, 1M, 10M, 2.5M."""
    text = text.strip().upper()
    factor = 1
    if text.endswith("M"):
        factor, text = 1_000_000, text[:-1]
    elif text.endswith("K"):
        factor, text = 1_000, text[:-1]
    return int(float(text) * factor)


async def build(
    admin_dsn: str, name: str, employees: int, entries: int, months: int, chain: bool
) -> dict[str, Any]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = dsn_for(admin_dsn, name)
    conn = await db.connect(dsn)
    try:
        await migrate.migrate(conn)
        started = time.perf_counter()
        seconds = await build_year(conn, employees=employees, entries=entries, months=months)
        chained_started = time.perf_counter()
        chained = await chain_all(conn) if chain else 0
        seconds["chain"] = time.perf_counter() - chained_started
        seconds["total"] = time.perf_counter() - started
        database_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        # The build leaves gigabytes of dirty pages: written out now, not by
        # the checkpointer during the hot path, whose server CPU it inflated
        # (a 1M run measured 3x the fresh CPU per debit without this).
        await conn.execute("CHECKPOINT", timeout=3600)
    finally:
        await conn.close()
    log(f"bench.scale: {name} built in {seconds['total']:.0f}s ({chained} transactions chained)")
    return {"dsn": dsn, "build_seconds": seconds, "database_bytes": database_bytes}


def year_name(entries: int, chain: bool) -> str:
    """The database of a year at that size (shared by bench.scale and bench.audit_scale)."""
    return f"bench_year_{entries}" + ("_chained" if chain else "")


def year_marker(entries: int, employees: int, chain: bool) -> str:
    return json.dumps({"bench": "year", "entries": entries, "employees": employees, "chain": chain})


async def year_database(
    admin_dsn: str, entries: int, employees: int, *, chain: bool, reuse: bool
) -> dict[str, Any]:
    """A year of `entries` on admin_dsn's server: built now, or with `reuse`
    the one an earlier run built with the same parameters (they are in the
    database's comment; a 10M year takes about 25 minutes to build)."""
    name = year_name(entries, chain)
    conn = await asyncpg.connect(admin_dsn)
    try:
        comment = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            name,
        )
    finally:
        await conn.close()
    if reuse and comment == year_marker(entries, employees, chain):
        log(f"bench: reusing the year in database {name}")
        conn = await asyncpg.connect(dsn_for(admin_dsn, name))
        try:
            size = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
        finally:
            await conn.close()
        return {
            "dsn": dsn_for(admin_dsn, name),
            "build_seconds": {"reused": 0.0},
            "database_bytes": size,
        }
    built = await build(admin_dsn, name, employees, entries, 12, chain)
    conn = await asyncpg.connect(admin_dsn)
    try:
        marker = year_marker(entries, employees, chain).replace("'", "''")
        await conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{marker}'")
    finally:
        await conn.close()
    return built
