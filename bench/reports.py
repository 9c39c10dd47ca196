"""The usage-report benchmark: one month of usage at scale, then report timings.

    python -m bench.reports [--employees N] [--events N] [--runs N]
                            [--database-url DSN] [--keep] [--reuse] [--json PATH]
                            [--tags NAMES] [--only GROUP_BY ...]

--keep leaves the database (named after --employees and --events) on the
server of --database-url, and --reuse measures on it again without building
it (the schema is applied again first, so a changed schema's new objects
exist), for measuring one change after another on the same data.

--tags declares the report tag keys (TOKENLEDGER_REPORT_TAGS; default `team`,
the events' and debits' tag) once the data is built or reused:
tl_report_tags_sync rebuilds their roll-ups, and reports by them read those;
`--tags ''` declares none (reports by a tag read the events and the journal).
--only GROUP_BY (repeatable, e.g. `--only tag:team --only department,tag:team`)
times only those groupings, and no finance report.

1. A database of its own (bench.postgres.provision: DATABASE_URL's server, or a
   throwaway one from service/devdb.py), with schema.sql applied.
2. Set-based SQL (generate_series): N employees in 20 departments, their
   accounts and the department accounts, four priced models, and N events in
   March 2026 (5% charged to department accounts, a project on 8 in 9), then
   usage_daily filled from them with one INSERT ... SELECT ... GROUP BY, the
   same rows tl_usage_rollup keeps one event at a time.
3. For every single grouping key, two combinations, a tag key alone and with
   the department, and the third-of-a-million-row export, the month's report
   (usage events and the journal's debits) through the service's SQL path
   (service.reports.usage_report on a Database: the `usage_report` named query)
   over the periods of PERIODS (UTC midnights, a microsecond later, six hours
   in at each end), and through HTTP (the app in-process over ASGI, as
   finance, JSON and CSV, and the JSON pages of 500 from the first row and from
   the middle one, the latter also from the cursor the page before it handed out:
   `walked s`), and the first rows of the whole answer (`first s`: the
   first batch the HTTP answer reads before it starts to send; the in-process
   client buffers whole bodies, so the HTTP figures are the whole answer's, to
   its last byte, read as bytes: the bench client parses neither JSON nor CSV,
   which took it about a second more for 76 MB of JSON; before 2026-12-07's
   last session it did). Each timing is the median of --runs after one warm-up
   run.

4. Every finance report (liability by department, month and employee,
   compensation, efficiency by employee and department, forecasts) over
   HTTP: the first JSON page of 500 and the whole CSV export.

The figures go to stdout as a table and as JSON (and to --json when given).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import inprocess
from bench.postgres import Database as BenchDatabase
from bench.postgres import dsn_for, provision
from bench.report import run_side_bench
from bench.year import sections
from service import db, errors, migrate, reports
from service.api.common import encode_cursor
from service.auth import new_key
from service.journal import Database, database_clock
from service.observability import Metrics

SQL = sections(Path(__file__).with_name("reports.sql"))
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)
DEPARTMENTS = 20
GROUPINGS: tuple[tuple[str, ...], ...] = (
    ("employee",),
    ("department",),
    ("model",),
    ("project",),
    ("day",),
    ("month",),
    ("department", "model"),
    ("employee", "model", "project"),
    # Tags (a usage event's, a debit's metadata key): from the tag roll-ups
    # when `team` is declared (--tags), else from the events and the journal.
    ("tag:team",),
    ("department", "tag:team"),
)


# The periods each grouping is timed over: (path, from, to). `rollup`: the month
# between UTC midnights (the roll-ups alone); `shifted`: a microsecond later
# (the roll-ups of the nearest midnights, less the events and debits of that
# microsecond: service/reports.py usage_span); `hours`: from 06:00 on the first
# to 18:00 on the last day (the roll-ups, less six hours of events and debits
# at each end).
PERIODS: tuple[tuple[str, datetime, datetime], ...] = (
    ("rollup", MONTH_START, MONTH_END),
    ("shifted", MONTH_START + timedelta(microseconds=1), MONTH_END),
    ("hours", MONTH_START + timedelta(hours=6), MONTH_END - timedelta(hours=6)),
)


# The journal (reports.sql, section journal): debits per employee, and amounts.
JOURNAL_DEBITS = 30
GRANT_AMOUNT = 100_000
DEBIT_AMOUNT = 100

# The finance reports (issue 16) timed over HTTP as finance, JSON (one page)
# and CSV (every row, streamed): (name, path, query).
FINANCE_REPORTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("liability by department", "/v1/reports/liability", {"group_by": "department"}),
    ("liability by month", "/v1/reports/liability", {"group_by": "month"}),
    ("liability by employee", "/v1/reports/liability", {"group_by": "employee"}),
    ("compensation", "/v1/reports/compensation", {}),
    ("efficiency by employee", "/v1/reports/efficiency", {"group_by": "employee"}),
    ("efficiency by department", "/v1/reports/efficiency", {"group_by": "department"}),
    ("forecast of a department", "/v1/reports/forecast", {"department": "dept-1"}),
    ("forecast of an account", "/v1/reports/forecast", {"account": "employee:emp-1"}),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def build(dsn: str, employees: int, events: int) -> dict[str, float]:
    """Schema, directory, prices, events and roll-up; the seconds each took."""
    seconds: dict[str, float] = {}
    conn = await db.connect(dsn)
    try:
        started = time.perf_counter()
        await migrate.migrate(conn)
        seconds["schema"] = time.perf_counter() - started

        started = time.perf_counter()
        await conn.execute(SQL["setup"].format(departments=DEPARTMENTS, employees=employees))
        seconds["directory"] = time.perf_counter() - started
        log(f"bench.reports: {employees} employees in {DEPARTMENTS} departments")

        started = time.perf_counter()
        chunk = 250_000
        sql = SQL["events"].format(departments=DEPARTMENTS, employees=employees)
        for first in range(1, events + 1, chunk):
            last = min(first + chunk - 1, events)
            await conn.execute(sql, MONTH_START, MONTH_END, first, last, timeout=1800)
            log(f"bench.reports: {last} events")
        seconds["events"] = time.perf_counter() - started

        started = time.perf_counter()
        await conn.execute(SQL["rollup"], timeout=1800)
        await vacuum_analyze(
            conn,
            "usage_events",
            "usage_daily",
            "usage_monthly",
            "usage_monthly_models",
            "usage_daily_models",
        )
        seconds["rollup_and_analyze"] = time.perf_counter() - started

        started = time.perf_counter()
        await conn.execute(
            SQL["journal"].format(
                grant=GRANT_AMOUNT,
                debits=JOURNAL_DEBITS,
                debit=DEBIT_AMOUNT,
                start=MONTH_START.isoformat(),
                end=MONTH_END.isoformat(),
            ),
            timeout=1800,
        )
        # The journal was written with triggers off: its debits' roll-ups
        # (spend_daily, spend_monthly) are built as the schema's backfill
        # builds them.
        await conn.execute("SELECT tl_spend_rollup_rebuild()", timeout=1800)
        await vacuum_analyze(
            conn, "transactions", "entries", "lots", "spend_daily", "spend_monthly"
        )
        seconds["journal"] = time.perf_counter() - started
        log(f"bench.reports: journal of {JOURNAL_DEBITS} debits per employee")
    finally:
        await conn.close()
    return seconds


async def vacuum_analyze(conn: asyncpg.Connection, *tables: str) -> None:
    """VACUUM ANALYZE the tables just filled, then ANALYZE the rest, so the
    reports are planned on fresh statistics."""
    for table in tables:
        await conn.execute(f"VACUUM ANALYZE {table}", timeout=1800)
    await conn.execute("ANALYZE", timeout=1800)


async def timed(runs: int, fn: Any) -> tuple[float | str, int]:
    """The median seconds of `runs` calls after one warm-up, and the last result's
    size; or the error, when a call fails (a 503 is the statement timeout)."""
    try:
        size = len(await fn())
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            size = len(await fn())
            samples.append(time.perf_counter() - started)
    except (httpx.HTTPStatusError, asyncpg.PostgresError, errors.LedgerError) as exc:
        return f"error: {type(exc).__name__}", -1
    return statistics.median(samples), size


async def declare_tags(dsn: str, names: list[str]) -> float:
    """TOKENLEDGER_REPORT_TAGS as the service syncs it at start-up (tl_report_tags_sync:
    the tag roll-ups rebuilt from the events and the journal when the set changed); the
    seconds it took."""
    conn = await db.connect(dsn)
    try:
        started = time.perf_counter()
        if names or await conn.fetchval("SELECT to_regproc('tl_report_tags_sync') IS NOT NULL"):
            await conn.execute("SELECT tl_report_tags_sync($1::text[])", names, timeout=1800)
            await vacuum_analyze(
                conn, "usage_tag_daily", "usage_tag_monthly", "spend_tag_daily", "spend_tag_monthly"
            )
        return time.perf_counter() - started
    finally:
        await conn.close()


async def measure(
    dsn: str, runs: int, only: list[tuple[str, ...]] | None = None, tags: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    # The app syncs its TOKENLEDGER_REPORT_TAGS at start-up: the same keys as
    # declare_tags, or it would undeclare them.
    config = inprocess.bench_config(
        dsn, pool_min_size=1, pool_max_size=4, report_tags=",".join(tags)
    )
    pool = await db.create_pool(
        dsn,
        min_size=1,
        max_size=4,
        statement_timeout_ms=config.statement_timeout_ms,
        lock_timeout_ms=config.lock_timeout_ms,
        idle_in_transaction_timeout_ms=config.idle_in_transaction_timeout_ms,
        connect_timeout_seconds=config.connect_timeout_seconds,
    )
    results = []
    try:
        ledger = Database(pool, config, Metrics(), database_clock)
        async with inprocess.client(config, timeout_seconds=120, pool=pool) as client:
            secret = new_key()
            await ledger.fetchval(
                "create_key", secret.id, secret.prefix, secret.secret_hash, "bench", "finance", "b"
            )
            client.headers["Authorization"] = f"Bearer {secret.secret}"
            for keys in only or GROUPINGS:
                for path, start, end in PERIODS:
                    row: dict[str, Any] = {"group_by": ",".join(keys), "path": path}

                    async def sql(
                        s: datetime = start, e: datetime = end, k: tuple[str, ...] = keys
                    ) -> Any:
                        return await reports.usage_report(ledger, s, e, k)

                    row["sql_seconds"], row["rows"] = await timed(runs, sql)
                    params = {
                        "from": start.isoformat(),
                        "to": end.isoformat(),
                        "group_by": ",".join(keys),
                    }
                    for fmt, accept in (("json", "application/json"), ("csv", "text/csv")):

                        async def http(p: dict[str, str] = params, a: str = accept) -> Any:
                            # The whole body read as bytes, not parsed: the service's
                            # answer, not the bench client's JSON decoding (76 MB of
                            # `employee,model,project` took it about a second more).
                            # (Its size: the body's bytes.)
                            size = 0
                            async with client.stream(
                                "GET", "/v1/reports/usage", params=p, headers={"Accept": a}
                            ) as r:
                                r.raise_for_status()
                                async for chunk in r.aiter_raw():
                                    size += len(chunk)
                            return range(size)

                        row[f"http_{fmt}_seconds"], _ = await timed(runs, http)

                    # The first rows of the whole answer, as the HTTP answer reads them
                    # before it starts (a first batch of usage_report_after): its first
                    # bytes. (The in-process client buffers a whole body, so the HTTP
                    # figures above are the whole answer's, to its last byte.)
                    async def first(
                        s: datetime = start, e: datetime = end, k: tuple[str, ...] = keys
                    ) -> Any:
                        rows = reports.usage_report_after(ledger, s, e, k, None)
                        try:
                            return await anext(rows, [])
                        finally:
                            await rows.aclose()

                    row["first_rows_seconds"], _ = await timed(runs, first)
                    # JSON pages of 500: the first, and the one after the middle row.
                    whole = await reports.usage_report(ledger, start, end, keys)
                    middle = whole[len(whole) // 2] if whole else None
                    mark = reports.page_fingerprint(start, end, keys)
                    for name, after in (("page", None), ("mid_page", middle)):
                        page = {**params, "limit": "500"}
                        if after is not None:
                            page["cursor"] = encode_cursor([mark, [after[k] for k in keys]])

                        async def http_page(p: dict[str, str] = page) -> Any:
                            r = await client.get("/v1/reports/usage", params=p)
                            r.raise_for_status()
                            return r.json()["items"]

                        row[f"http_{name}_seconds"], _ = await timed(runs, http_page)
                    # The page after the middle row from the cursor the page before it
                    # handed out, as a client walking the pages has it (it may carry
                    # what that page learnt of the values ahead: reports.Lookahead).
                    if len(whole) > 1000:
                        before = whole[len(whole) // 2 - 500]
                        prior = {**params, "limit": "500"}
                        prior["cursor"] = encode_cursor([mark, [before[k] for k in keys]])

                        async def prior_page(p: dict[str, str] = prior) -> Any:
                            r = await client.get("/v1/reports/usage", params=p)
                            r.raise_for_status()
                            return r.json()

                        # (That page pays for what it learns: JSON only, not in the table.)
                        row["http_walk_prior_seconds"], _ = await timed(runs, prior_page)
                        nxt = (await prior_page())["next_cursor"]
                        walked = {**params, "limit": "500", "cursor": nxt}

                        async def walk_page(p: dict[str, str] = walked) -> Any:
                            r = await client.get("/v1/reports/usage", params=p)
                            r.raise_for_status()
                            return r.json()["items"]

                        row["http_walk_page_seconds"], _ = await timed(runs, walk_page)
                    log(f"bench.reports: {row}")
                    results.append(row)
            if not only:
                results += await measure_finance(client, runs)
    finally:
        await pool.close()
    return results


async def measure_finance(client: httpx.AsyncClient, runs: int) -> list[dict[str, Any]]:
    """The finance reports over the bench month, JSON (first page, limit 500) and CSV."""
    results = []
    period = {"from": MONTH_START.isoformat(), "to": MONTH_END.isoformat()}
    for name, path, query in FINANCE_REPORTS:
        params = {**(period if "forecast" not in path else {}), **query}
        row: dict[str, Any] = {"group_by": name, "path": "journal", "sql_seconds": "-"}
        for fmt, accept in (("json", "application/json"), ("csv", "text/csv")):
            if fmt == "csv" and "forecast" in path:
                row["http_csv_seconds"] = "-"
                continue

            async def http(p: dict[str, str] = params, a: str = accept, u: str = path) -> Any:
                r = await client.get(u, params={**p, "limit": "500"}, headers={"Accept": a})
                r.raise_for_status()
                return r.content.splitlines() if a == "text/csv" else r.json()["items"]

            row[f"http_{fmt}_seconds"], size = await timed(runs, http)
            if fmt == "json":
                row["rows"] = size
        log(f"bench.reports: {row}")
        results.append(row)
    return results


def table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'group_by':<26} {'path':<7} {'rows':>8} {'sql s':>8} "
        f"{'http json s':>12} {'http csv s':>11} {'first s':>8} {'page s':>7} {'mid page s':>10}"
        f" {'walked s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        sql, js, cs, fr, pg, mid, walk = (
            f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in (
                r["sql_seconds"],
                r["http_json_seconds"],
                r["http_csv_seconds"],
                r.get("first_rows_seconds", "-"),
                r.get("http_page_seconds", "-"),
                r.get("http_mid_page_seconds", "-"),
                r.get("http_walk_page_seconds", "-"),
            )
        )
        lines.append(
            f"{r['group_by']:<26} {r['path']:<7} {r['rows']:>8} {sql:>8} {js:>12} {cs:>11}"
            f" {fr:>8} {pg:>7} {mid:>10} {walk:>8}"
        )
    return "\n".join(lines)


def kept_name(employees: int, events: int) -> str:
    """The database --keep leaves behind and --reuse measures on."""
    return f"tokenledger_reports_kept_{employees}_{events}"


async def main(args: argparse.Namespace) -> dict[str, Any]:
    # --keep and --reuse are optional for callers that build their own
    # arguments (the bench smoke test).
    keep, reuse = getattr(args, "keep", False), getattr(args, "reuse", False)
    if reuse:
        database = reused(args.database_url, kept_name(args.employees, args.events))
    else:
        name = (
            kept_name(args.employees, args.events) if keep else f"tokenledger_reports_{os.getpid()}"
        )
        database = await provision(args.database_url, name)
    try:
        log(f"bench.reports: database {database.name} ({database.source})")
        if reuse:
            build_seconds = await rebuild_schema(database.dsn)
        else:
            build_seconds = await build(database.dsn, args.employees, args.events)
        # (--tags' default too for callers that build their own arguments.)
        tags = [t for t in getattr(args, "tags", "team").split(",") if t]
        declare_seconds = await declare_tags(database.dsn, tags)
        conn = await db.connect(database.dsn)
        try:
            daily_rows = int(await conn.fetchval("SELECT count(*) FROM usage_daily"))
        finally:
            await conn.close()
        only = [tuple(g.split(",")) for g in getattr(args, "only", None) or []]
        loadavg_start = [round(x, 2) for x in os.getloadavg()]
        results = await measure(database.dsn, args.runs, only or None, tuple(tags))
        loadavg_end = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not (keep or reuse):
            await database.drop()
    return {
        "employees": args.employees,
        "departments": DEPARTMENTS,
        "events": args.events,
        "usage_daily_rows": daily_rows,
        "report_tags": tags,
        "declare_tags_seconds": round(declare_seconds, 3),
        "month": [MONTH_START.isoformat(), MONTH_END.isoformat()],
        "runs": args.runs,
        "server_version": database.server_version,
        # The machine is shared: its load average (1, 5, 15 min) when the
        # timings started and ended.
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg_end,
        "build_seconds": {k: round(v, 3) for k, v in build_seconds.items()},
        "results": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in results
        ],
    }


def reused(database_url: str | None, name: str) -> BenchDatabase:
    """The database a --keep run left on database_url's server."""
    if database_url is None:
        raise SystemExit("--reuse needs --database-url: a throwaway server is gone")
    return BenchDatabase(
        dsn=dsn_for(database_url, name),
        admin_dsn=database_url,
        name=name,
        source="database-url, reused",
        server_version="",
        settings={},
    )


async def rebuild_schema(dsn: str) -> dict[str, float]:
    """A reused database: the schema applied again (idempotent), so that the
    objects of a changed schema exist and are filled, then fresh statistics."""
    conn = await db.connect(dsn)
    try:
        started = time.perf_counter()
        await migrate.migrate(conn)
        await conn.execute("ANALYZE", timeout=1800)
        return {"schema": time.perf_counter() - started}
    finally:
        await conn.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--employees", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the database behind for a later --reuse (needs --database-url)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="measure on the database a --keep run left"
    )
    parser.add_argument(
        "--tags",
        default="team",
        help="report tag keys to declare (TOKENLEDGER_REPORT_TAGS); '' declares none",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="GROUP_BY",
        help="time only this grouping (repeatable); no finance report",
    )
    run_side_bench(parser, main, table=table)


if __name__ == "__main__":
    cli()
