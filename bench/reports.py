"""The usage-report benchmark: one month of usage at scale, then report timings.

    python -m bench.reports [--employees N] [--events N] [--runs N]
                            [--database-url DSN] [--json PATH]

1. A database of its own (bench.harness.provision: DATABASE_URL's server, or a
   throwaway one from tests.pg), with schema.sql applied.
2. Set-based SQL (generate_series): N employees in 20 departments, their
   accounts and the department accounts, four priced models, and N events in
   March 2026 (5% charged to department accounts, a project on 8 in 9), then
   usage_daily filled from them with one INSERT ... SELECT ... GROUP BY, the
   same rows tl_usage_rollup keeps one event at a time.
3. For every single grouping key, two combinations, a tag key alone and with
   the department, and the third-of-a-million-row export, the month's report
   (usage events and the journal's debits) through the service's SQL path
   (service.reports.usage_report on a Ledger: the `usage_report` named query)
   for the roll-up path (from and to at UTC midnights) and the raw-events path
   (a microsecond later), and through HTTP (the app in-process over ASGI, as
   finance, JSON and CSV). Each timing is the median of --runs after one
   warm-up run.

4. Every finance report (liability by department, month and employee,
   compensation, efficiency by employee and department, forecasts) over
   HTTP: the first JSON page of 500 and the whole CSV export.

The figures go to stdout as a table and as JSON (and to --json when given).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.harness import print_summary, provision
from service import db, errors, migrate, reports
from service.app import create_app
from service.auth import new_key
from service.config import Config
from service.journal import Ledger, database_clock
from service.observability import Metrics

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
    # Tags (a usage event's, a debit's metadata key) are read from the events.
    ("tag:team",),
    ("department", "tag:team"),
)

SETUP_SQL = """
INSERT INTO departments (id, name)
    SELECT 'dept-' || g, 'Department ' || g FROM generate_series(1, {departments}) g;
INSERT INTO employees (id, name, email, department)
    SELECT 'emp-' || g, 'Employee ' || g, 'emp-' || g || '@example.com',
           'dept-' || (g % {departments} + 1)
    FROM generate_series(1, {employees}) g;
INSERT INTO accounts (address, type, ref)
    SELECT 'department:' || id, 'department', id FROM departments
    UNION ALL SELECT 'employee:' || id, 'employee', id FROM employees;
INSERT INTO prices (id, model, effective_from, input_per_mtok, cached_input_per_mtok,
                    output_per_mtok, source)
    VALUES (gen_random_uuid(), 'gpt-4o', '2026-01-01', 2500000, 1250000, 10000000, 'bench'),
           (gen_random_uuid(), 'gpt-4o-mini', '2026-01-01', 150000, 75000, 600000, 'bench'),
           (gen_random_uuid(), 'claude-sonnet', '2026-01-01', 3000000, 300000, 15000000, 'bench'),
           (gen_random_uuid(), 'o3', '2026-01-01', 2000000, 500000, 8000000, 'bench');
CREATE TEMP TABLE bench_accounts AS
    SELECT row_number() OVER (ORDER BY id) AS n, id, type FROM accounts;
CREATE TEMP TABLE bench_models AS
    SELECT row_number() OVER (ORDER BY model) - 1 AS n, * FROM prices;
"""

EVENTS_SQL = """
WITH g AS (
    SELECT g AS n,
           CASE WHEN random() < 0.05 THEN 1 + floor(random() * {departments})::int
                ELSE {departments} + 1 + floor(random() * {employees})::int END AS account_n,
           floor(random() * 4)::int AS model_n,
           floor(random() * 9)::int AS project_n,
           $1::timestamptz + random() * ($2::timestamptz - $1::timestamptz) AS occurred_at,
           floor(random() * 20000)::bigint AS input_tokens,
           floor(random() * 2000)::bigint AS output_tokens
    FROM generate_series($3::bigint, $4::bigint) g
)
INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                          cached_input_tokens, output_tokens, cost, project, occurred_at,
                          recorded_at, tags)
SELECT gen_random_uuid(), 'bench', g.n::text, a.id, m.model, m.id, g.input_tokens,
       g.input_tokens / 4, g.output_tokens,
       ceil(((g.input_tokens - g.input_tokens / 4) * m.input_per_mtok
             + (g.input_tokens / 4) * m.cached_input_per_mtok
             + g.output_tokens * m.output_per_mtok) / 1e6)::bigint,
       CASE WHEN g.project_n > 0 THEN 'project-' || g.project_n END,
       least(g.occurred_at, $2::timestamptz - interval '1 microsecond'), g.occurred_at,
       CASE WHEN g.project_n > 1 THEN jsonb_build_object('team', 'team-' || g.project_n)
            ELSE '{{}}'::jsonb END
FROM g
JOIN bench_accounts a ON a.n = g.account_n
JOIN bench_models m ON m.n = g.model_n
"""

# The same rows the service's tl_usage_rollup_many keeps, built in bulk.
ROLLUP_SQL = """
INSERT INTO usage_daily (day, account_id, model, project, events, input_tokens,
                         cached_input_tokens, output_tokens, credits)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, account_id, model, coalesce(project, ''),
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3, 4;
INSERT INTO usage_monthly (month, account_id, model, project, events, input_tokens,
                           cached_input_tokens, output_tokens, credits)
SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, account_id, model,
       coalesce(project, ''), count(*), sum(input_tokens), sum(cached_input_tokens),
       sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3, 4;
INSERT INTO usage_monthly_models (month, account_id, model, events, input_tokens,
                                  cached_input_tokens, output_tokens, credits)
SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, account_id, model,
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3;
INSERT INTO usage_daily_models (day, model, project, shard, events, input_tokens,
                                cached_input_tokens, output_tokens, credits)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, model, coalesce(project, ''), 0,
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3;
"""


# The journal the finance reports read (issue 16): a grant per employee a
# minute into the month (a lot expiring after it), and JOURNAL_DEBITS debits
# per employee spread over the month, with consistent balance_after and
# versions (two in three with a model and a team in their metadata, which
# usage reports group by); usage events above stay outside the journal. Written
# set-based with triggers off (session_replication_role = replica), so the
# deferred balance check does not run per row; the bench does not audit.
JOURNAL_DEBITS = 30
GRANT_AMOUNT = 100_000
DEBIT_AMOUNT = 100
JOURNAL_SQL = """
SET session_replication_role = replica;
CREATE TEMP TABLE bench_wallets AS
    SELECT id, ref, row_number() OVER (ORDER BY id) AS n FROM accounts WHERE type = 'employee';
INSERT INTO transactions (id, kind, details, actor, created_at)
    SELECT md5('g' || id)::uuid, 'grant', '{{"reason": "monthly_allotment"}}', 'bench',
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets;
INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                  grant_transaction_id, funded_by, created_at)
    SELECT md5('l' || id)::uuid, id, {grant}, {grant} - {debits} * {debit}, 100,
           '{start}'::timestamptz + interval '1 minute', '{end}'::timestamptz + interval '10 days',
           md5('g' || id)::uuid, (SELECT id FROM accounts WHERE address = 'system:issuance'),
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets;
INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version,
                     created_at)
    SELECT md5('g' || id)::uuid, id, 0, 'CREDIT', {grant}, {grant}, 1,
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets
    UNION ALL
    SELECT md5('g' || w.id)::uuid, i.id, 0, 'CREDIT', -{grant}, -{grant} * w.n, w.n,
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets w, accounts i WHERE i.address = 'system:issuance';
INSERT INTO transactions (id, kind, metadata, actor, created_at)
    SELECT md5('d' || w.id || '-' || k)::uuid, 'debit',
           CASE WHEN k % 3 = 0 THEN '{{}}'::jsonb
                ELSE jsonb_build_object('model', 'batch-job', 'team', 'team-' || k % 7) END,
           'bench',
           '{start}'::timestamptz
               + (k - 0.5) * ('{end}'::timestamptz - '{start}'::timestamptz) / {debits}
    FROM bench_wallets w, generate_series(1, {debits}) k;
INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version,
                     created_at)
    SELECT md5('d' || w.id || '-' || k)::uuid, w.id, 0, 'CREDIT', -{debit},
           {grant} - {debit} * k, 1 + k,
           '{start}'::timestamptz
               + (k - 0.5) * ('{end}'::timestamptz - '{start}'::timestamptz) / {debits}
    FROM bench_wallets w, generate_series(1, {debits}) k;
UPDATE accounts SET posted = {grant} - {debits} * {debit}, version = 1 + {debits}
    WHERE type = 'employee';
INSERT INTO employee_departments (employee_id, department, since)
    SELECT id, department, '-infinity' FROM employees ON CONFLICT DO NOTHING;
SET session_replication_role = origin;
"""

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
        await conn.execute(SETUP_SQL.format(departments=DEPARTMENTS, employees=employees))
        seconds["directory"] = time.perf_counter() - started
        log(f"bench.reports: {employees} employees in {DEPARTMENTS} departments")

        started = time.perf_counter()
        chunk = 250_000
        sql = EVENTS_SQL.format(departments=DEPARTMENTS, employees=employees)
        for first in range(1, events + 1, chunk):
            last = min(first + chunk - 1, events)
            await conn.execute(sql, MONTH_START, MONTH_END, first, last, timeout=1800)
            log(f"bench.reports: {last} events")
        seconds["events"] = time.perf_counter() - started

        started = time.perf_counter()
        await conn.execute(ROLLUP_SQL, timeout=1800)
        await conn.execute("VACUUM ANALYZE usage_events", timeout=1800)
        await conn.execute("VACUUM ANALYZE usage_daily", timeout=1800)
        await conn.execute("VACUUM ANALYZE usage_monthly", timeout=1800)
        await conn.execute("VACUUM ANALYZE usage_monthly_models", timeout=1800)
        await conn.execute("VACUUM ANALYZE usage_daily_models", timeout=1800)
        await conn.execute("ANALYZE", timeout=1800)
        seconds["rollup_and_analyze"] = time.perf_counter() - started

        started = time.perf_counter()
        await conn.execute(
            JOURNAL_SQL.format(
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
        await conn.execute("VACUUM ANALYZE transactions", timeout=1800)
        await conn.execute("VACUUM ANALYZE entries", timeout=1800)
        await conn.execute("VACUUM ANALYZE lots", timeout=1800)
        await conn.execute("VACUUM ANALYZE spend_daily", timeout=1800)
        await conn.execute("VACUUM ANALYZE spend_monthly", timeout=1800)
        await conn.execute("ANALYZE", timeout=1800)
        seconds["journal"] = time.perf_counter() - started
        log(f"bench.reports: journal of {JOURNAL_DEBITS} debits per employee")
    finally:
        await conn.close()
    return seconds


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


async def measure(dsn: str, runs: int) -> list[dict[str, Any]]:
    admin = new_key().secret
    config = Config(
        database_url=dsn,
        apply_schema=False,
        background_enabled=False,
        pool_min_size=1,
        pool_max_size=4,
        log_level="warning",
        environment="development",
        bootstrap_admin_key=admin,
        rate_limits="",
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
        ledger = Ledger(pool, config, Metrics(), database_clock)
        app = create_app(config, pool=pool)
        async with (
            app.lifespan(),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://bench.local",
                headers={"Authorization": f"Bearer {admin}"},
                timeout=120,
            ) as client,
        ):
            secret = new_key()
            await ledger.fetchval(
                "create_key", secret.id, secret.prefix, secret.secret_hash, "bench", "finance", "b"
            )
            client.headers["Authorization"] = f"Bearer {secret.secret}"
            for keys in GROUPINGS:
                for path, start in (
                    ("rollup", MONTH_START),
                    ("events", MONTH_START + timedelta(microseconds=1)),
                ):
                    row: dict[str, Any] = {"group_by": ",".join(keys), "path": path}

                    async def sql(s: datetime = start, k: tuple[str, ...] = keys) -> Any:
                        return await reports.usage_report(ledger, s, MONTH_END, k)

                    row["sql_seconds"], row["rows"] = await timed(runs, sql)
                    params = {
                        "from": start.isoformat(),
                        "to": MONTH_END.isoformat(),
                        "group_by": ",".join(keys),
                    }
                    for fmt, accept in (("json", "application/json"), ("csv", "text/csv")):

                        async def http(p: dict[str, str] = params, a: str = accept) -> Any:
                            r = await client.get(
                                "/v1/reports/usage", params=p, headers={"Accept": a}
                            )
                            r.raise_for_status()
                            return r.content.splitlines() if a == "text/csv" else r.json()["items"]

                        row[f"http_{fmt}_seconds"], _ = await timed(runs, http)
                    log(f"bench.reports: {row}")
                    results.append(row)
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
        f"{'http json s':>12} {'http csv s':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        sql, js, cs = (
            f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in (r["sql_seconds"], r["http_json_seconds"], r["http_csv_seconds"])
        )
        lines.append(
            f"{r['group_by']:<26} {r['path']:<7} {r['rows']:>8} {sql:>8} {js:>12} {cs:>11}"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    database = await provision(args.database_url, f"tokenledger_reports_{os.getpid()}")
    try:
        log(f"bench.reports: database {database.name} ({database.source})")
        build_seconds = await build(database.dsn, args.employees, args.events)
        conn = await db.connect(database.dsn)
        try:
            daily_rows = int(await conn.fetchval("SELECT count(*) FROM usage_daily"))
        finally:
            await conn.close()
        results = await measure(database.dsn, args.runs)
    finally:
        await database.drop()
    return {
        "employees": args.employees,
        "departments": DEPARTMENTS,
        "events": args.events,
        "usage_daily_rows": daily_rows,
        "month": [MONTH_START.isoformat(), MONTH_END.isoformat()],
        "runs": args.runs,
        "server_version": database.server_version,
        "build_seconds": {k: round(v, 3) for k, v in build_seconds.items()},
        "results": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in results
        ],
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--employees", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    summary = asyncio.run(main(args))
    print(table(summary["results"]))
    print_summary(summary, args.json)


if __name__ == "__main__":
    cli()
