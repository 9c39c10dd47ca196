"""A year of ledger history, built set-based (generate_series, INSERT ...
SELECT, one window pass for running balances), for `make bench-scale` and
for the tests that need history at some size (tests/db/test_audit_plans.py).

    await build_year(conn, employees=10_000, entries=1_000_000)

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
import time
from collections.abc import Callable
from datetime import datetime

import asyncpg

from bench.reports import ROLLUP_SQL

DEPARTMENTS = 20
MONTHS = 12
GRANT = 1_000_000
ROLLOVER = 200_000
CHAIN_BATCH = 20_000

# Staging: one row per (employee, cycle), then one per spend transaction.
STAGE_SQL = """
DROP TABLE IF EXISTS y_em, y_spend, y_legs;
CREATE UNLOGGED TABLE y_em AS
WITH emp AS (
    SELECT row_number() OVER (ORDER BY a.id) AS e, a.id AS account_id, a.ref AS employee_id
    FROM accounts a WHERE a.type = 'employee'),
months AS (
    SELECT m, $1::timestamptz + make_interval(months => m) AS start,
           $1::timestamptz + make_interval(months => m + 1) AS next_start
    FROM generate_series(0, $2::int) m),
weights AS (SELECT sum(power(e, -0.9)) AS total FROM emp)
SELECT emp.e, emp.account_id, emp.employee_id, months.m, months.start, months.next_start,
       to_char(months.start AT TIME ZONE 'UTC', 'YYYY-MM') AS cycle,
       -- The current cycle is spent only up to $4 (an hour ago).
       CASE WHEN months.m < $2 THEN months.next_start ELSE $4::timestamptz END AS spend_end,
       CASE WHEN $3::bigint = 0 THEN 0
            ELSE greatest(1, round($3::numeric * power(emp.e, -0.9) / weights.total / $5::numeric
                                   * CASE WHEN months.m < $2 THEN 1
                                          ELSE extract(epoch FROM $4::timestamptz - months.start)
                                               / extract(epoch FROM months.next_start - months.start) END))
       END::bigint AS n,
       -- What the cycle spends: 35% to 95% of what the cycle's lot may give
       -- and still roll over its ROLLOVER credits.
       floor((0.35 + 0.6 * random()) * ({grant} - {rollover}))::bigint AS budget,
       CASE WHEN months.m = 0 THEN 0 ELSE {rollover} END::bigint AS a,
       gen_random_uuid() AS lot_a, gen_random_uuid() AS lot_b, gen_random_uuid() AS grant_txn,
       gen_random_uuid() AS roll_txn, gen_random_uuid() AS exp_txn
FROM emp CROSS JOIN months CROSS JOIN weights;
ALTER TABLE y_em ADD COLUMN x bigint, ADD COLUMN spent bigint, ADD COLUMN sa bigint, ADD COLUMN sb bigint;
UPDATE y_em SET x = CASE WHEN n = 0 THEN 0 ELSE greatest(1, budget / n) END;
UPDATE y_em SET spent = n * x;
UPDATE y_em SET sa = least(spent, a), sb = spent - least(spent, a);
CREATE INDEX ON y_em (e, m);
ANALYZE y_em;

CREATE UNLOGGED TABLE y_spend AS
SELECT em.e, em.m, em.account_id, i,
       em.start + interval '5 seconds'
           + ((i - 0.5 + 0.8 * (random() - 0.5)) / em.n)
             * (em.spend_end - em.start - interval '10 seconds') AS t,
       em.x,
       greatest(0, least(i * em.x, em.a) - (i - 1) * em.x) AS from_a,
       em.x - greatest(0, least(i * em.x, em.a) - (i - 1) * em.x) AS from_b,
       em.lot_a, em.lot_b,
       CASE WHEN r < 0.7 THEN 'usage' WHEN r < 0.9 THEN 'capture' ELSE 'debit' END AS kind,
       gen_random_uuid() AS txn, gen_random_uuid() AS rsv,
       least(em.x, 1 + floor(random() * 5))::int AS k
FROM y_em em
CROSS JOIN LATERAL generate_series(1, em.n) i
CROSS JOIN LATERAL (SELECT random() + 0 * i AS r) rr
WHERE em.n > 0;
ANALYZE y_spend;
"""

DIRECTORY_SQL = """
INSERT INTO departments (id, name)
    SELECT 'dept-' || g, 'Department ' || g FROM generate_series(1, {departments}) g;
INSERT INTO employees (id, name, email, department)
    SELECT 'emp-' || g, 'Employee ' || g, 'emp-' || g || '@example.com', 'dept-' || (g % {departments} + 1)
    FROM generate_series(1, {employees}) g;
INSERT INTO accounts (address, type, ref)
    SELECT 'department:' || id, 'department', id FROM departments
    UNION ALL SELECT 'employee:' || id, 'employee', id FROM employees ORDER BY 1;
INSERT INTO prices (id, model, effective_from, input_per_mtok, cached_input_per_mtok,
                    output_per_mtok, source)
    VALUES (gen_random_uuid(), 'gpt-4o', '2020-01-01', 2500000, 1250000, 10000000, 'bench'),
           (gen_random_uuid(), 'gpt-4o-mini', '2020-01-01', 150000, 75000, 600000, 'bench'),
           (gen_random_uuid(), 'claude-sonnet', '2020-01-01', 3000000, 300000, 15000000, 'bench'),
           (gen_random_uuid(), 'o3', '2020-01-01', 2000000, 500000, 8000000, 'bench');
INSERT INTO grant_programs (id, amount, reason, cadence_day, time_zone, audience, expiry, rollover_max,
                            funded_by, starts_on, active, activated_at, created_at, updated_at)
    SELECT 'monthly', {grant}, 'monthly_allotment', 1, 'UTC', '{{"all": true}}', '{{"at": "end_of_cycle"}}',
           {rollover}, tl_account_id('system:issuance'), ($1::timestamptz AT TIME ZONE 'UTC')::date, true,
           $1::timestamptz, $1::timestamptz, $1::timestamptz;
"""

# The journal, lots and everything that hangs off them, from the staging rows.
JOURNAL_SQL = """
CREATE TEMP TABLE y_sys AS SELECT
    tl_account_id('system:issuance') AS issuance, tl_account_id('system:usage') AS usage,
    tl_account_id('system:expired') AS expired;
CREATE TEMP TABLE y_models AS SELECT row_number() OVER (ORDER BY model) - 1 AS n, id, model FROM prices;

INSERT INTO program_runs (id, program_id, cycle, trigger, issued, credits, actor, request_id, ran_at,
                          completed_at)
SELECT gen_random_uuid(), 'monthly', cycle, 'scheduler', count(*), count(*) * {grant}, 'system:scheduler',
       'scheduler', min(start) + interval '3 ms', min(start) + interval '4 ms'
FROM y_em GROUP BY cycle;

INSERT INTO transactions (id, kind, metadata, details, actor, request_id, created_at)
SELECT grant_txn, 'grant', '{{}}'::jsonb, jsonb_build_object('program', 'monthly', 'cycle', cycle,
       'reason', 'monthly_allotment'), 'system:scheduler', 'scheduler', start + interval '3 ms'
FROM y_em
UNION ALL
SELECT roll_txn, 'rollover', '{{}}'::jsonb, jsonb_build_object('from_lot', tl_public_id('lot_', lot_b),
       'rollover_max', {rollover}), 'system:sweeper', 'sweeper', next_start + interval '1 ms'
FROM y_em WHERE m < $1
UNION ALL
SELECT exp_txn, 'expiry', '{{}}'::jsonb, '{{}}'::jsonb, 'system:sweeper', 'sweeper', next_start + interval '2 ms'
FROM y_em WHERE m < $1
UNION ALL
SELECT txn, kind, jsonb_build_object('model', 'bench'),
       CASE WHEN kind = 'capture' THEN jsonb_build_object('reservation_id', tl_public_id('rsv_', rsv))
            ELSE '{{}}'::jsonb END,
       'gateway', 'req-' || i, t
FROM y_spend
ORDER BY 7;

CREATE UNLOGGED TABLE y_legs AS
SELECT grant_txn AS txn, account_id, 0 AS shard, {grant}::bigint AS amount, start + interval '3 ms' AS at, 1 AS ord
FROM y_em
UNION ALL SELECT grant_txn, (SELECT issuance FROM y_sys), floor(random() * 16)::int, -{grant},
                 start + interval '3 ms', 2 FROM y_em
UNION ALL SELECT roll_txn, account_id, 0, -{rollover}, next_start + interval '1 ms', 1 FROM y_em WHERE m < $1
UNION ALL SELECT roll_txn, account_id, 0, {rollover}, next_start + interval '1 ms', 2 FROM y_em WHERE m < $1
UNION ALL SELECT exp_txn, account_id, 0, -((a - sa) + ({grant} - sb) - {rollover}), next_start + interval '2 ms', 1
FROM y_em WHERE m < $1
UNION ALL SELECT exp_txn, (SELECT expired FROM y_sys), floor(random() * 16)::int,
                 (a - sa) + ({grant} - sb) - {rollover}, next_start + interval '2 ms', 2 FROM y_em WHERE m < $1
UNION ALL SELECT txn, account_id, 0, -x, t, 1 FROM y_spend
UNION ALL SELECT txn, (SELECT usage FROM y_sys), floor(random() * 16)::int, x, t, 2 FROM y_spend;

INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
SELECT txn, account_id, shard, 'CREDIT', amount, sum(amount) OVER w, row_number() OVER w, at
FROM y_legs
WINDOW w AS (PARTITION BY account_id, shard ORDER BY at, txn, ord)
ORDER BY at, txn, ord;

UPDATE accounts a SET posted = s.total, version = s.n
FROM (SELECT account_id, sum(amount) AS total, count(*) AS n FROM y_legs WHERE shard = 0 GROUP BY 1) s
WHERE a.id = s.account_id AND a.shard_count = 1;
UPDATE account_shards sh SET posted = s.total, version = s.n
FROM (SELECT account_id, shard, sum(amount) AS total, count(*) AS n FROM y_legs GROUP BY 1, 2) s
WHERE sh.account_id = s.account_id AND sh.shard = s.shard;

-- Lots: each cycle's grant lot (b) and, from the second cycle on, the lot
-- the previous cycle rolled over into (a).
INSERT INTO lots (id, account_id, amount, remaining, reserved, priority, effective_at, expires_at,
                  grant_transaction_id, funded_by, source_lot_id, status, created_at, rollover_max,
                  rollover_until, rolled_at)
SELECT lot_b, account_id, {grant}, CASE WHEN m < $1 THEN 0 ELSE {grant} - sb END, 0, 100, start, next_start,
       grant_txn, (SELECT issuance FROM y_sys), NULL, 'active', start + interval '3 ms', {rollover},
       next_start + (next_start - start), CASE WHEN m < $1 THEN next_start + interval '1 ms' END
FROM y_em
UNION ALL
SELECT em.lot_a, em.account_id, {rollover}, CASE WHEN em.m < $1 THEN 0 ELSE {rollover} - em.sa END, 0, 100,
       em.start, em.next_start, prev.roll_txn, (SELECT issuance FROM y_sys), prev.lot_b, 'active',
       em.start + interval '1 ms', NULL, NULL, NULL
FROM y_em em JOIN y_em prev ON prev.e = em.e AND prev.m = em.m - 1;

INSERT INTO lot_movements (transaction_id, lot_id, amount)
SELECT grant_txn, lot_b, {grant} FROM y_em
UNION ALL SELECT em.roll_txn, em.lot_b, -{rollover} FROM y_em em WHERE em.m < $1
UNION ALL SELECT em.roll_txn, nx.lot_a, {rollover} FROM y_em em JOIN y_em nx ON nx.e = em.e AND nx.m = em.m + 1
UNION ALL SELECT exp_txn, lot_a, -(a - sa) FROM y_em WHERE m < $1 AND m > 0 AND a - sa > 0
UNION ALL SELECT exp_txn, lot_b, -(({grant} - sb) - {rollover}) FROM y_em WHERE m < $1
UNION ALL SELECT txn, lot_a, -from_a FROM y_spend WHERE from_a > 0
UNION ALL SELECT txn, lot_b, -from_b FROM y_spend WHERE from_b > 0;

INSERT INTO program_grants (program_id, cycle, employee_id, amount, transaction_id, lot_id, run_id, created_at)
SELECT 'monthly', em.cycle, em.employee_id, {grant}, em.grant_txn, em.lot_b, r.id, em.start + interval '3 ms'
FROM y_em em JOIN program_runs r ON r.program_id = 'monthly' AND r.cycle = em.cycle;

INSERT INTO reservations (id, account_id, amount, captured, status, expires_at, capture_transaction_id, actor,
                          request_id, created_at, resolved_at)
SELECT rsv, account_id, x, x, 'captured', t + interval '5 minutes', txn, 'gateway', 'req-' || i,
       t - interval '2 seconds', t
FROM y_spend WHERE kind = 'capture';
INSERT INTO reservation_holds (reservation_id, lot_id, amount)
SELECT rsv, lot_a, from_a FROM y_spend WHERE kind = 'capture' AND from_a > 0
UNION ALL SELECT rsv, lot_b, from_b FROM y_spend WHERE kind = 'capture' AND from_b > 0;

INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens, cached_input_tokens,
                          output_tokens, cost, transaction_id, project, tags, occurred_at, recorded_at)
SELECT gen_random_uuid(), 'gateway', s.txn::text || '-' || j, s.account_id, mo.model, mo.id,
       3 * c.cost, c.cost / 2, c.cost, c.cost, s.txn,
       CASE WHEN s.e % 9 > 0 THEN 'project-' || (s.e % 9) END, '{{}}', s.t - make_interval(secs => j), s.t
FROM y_spend s
CROSS JOIN LATERAL generate_series(1, s.k) j
CROSS JOIN LATERAL (SELECT s.x / s.k + CASE WHEN j = s.k THEN s.x % s.k ELSE 0 END AS cost) c
JOIN y_models mo ON mo.n = (s.e + j) % 4
WHERE s.kind = 'usage'
ORDER BY s.t;

INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body, created_at)
SELECT 'gateway', 'k-' || txn, '\\x00', 201, jsonb_build_object('id', tl_public_id('txn_', txn)), t
FROM y_spend WHERE kind <> 'usage' AND t > (SELECT max(t) FROM y_spend) - interval '35 days';
"""


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


async def build_year(
    conn: asyncpg.Connection,
    *,
    employees: int,
    entries: int,
    months: int = MONTHS,
    now: datetime | None = None,
    log: Callable[[str], None] = _log,
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
    fmt = {"grant": GRANT, "rollover": ROLLOVER, "departments": DEPARTMENTS, "employees": employees}

    async def step(name: str, sql: str, *args: object) -> None:
        began = time.perf_counter()
        await conn.execute(sql, *args, timeout=7200)
        seconds[name] = time.perf_counter() - began
        log(f"bench.year: {name} in {seconds[name]:.1f}s")

    await conn.execute("SET session_replication_role = replica")
    await conn.execute("SET maintenance_work_mem = '512MB'")
    await conn.execute("SET work_mem = '256MB'")
    try:
        await _script(conn, DIRECTORY_SQL.format(**fmt), start)
        began = time.perf_counter()
        await _script(conn, STAGE_SQL.format(**fmt), start, months, spends, spend_until, cycles)
        seconds["stage"] = time.perf_counter() - began
        log(f"bench.year: staged {spends} spend transactions in {seconds['stage']:.1f}s")
        began = time.perf_counter()
        await _script(conn, JOURNAL_SQL.format(**fmt), months)
        seconds["journal"] = time.perf_counter() - began
        log(f"bench.year: journal in {seconds['journal']:.1f}s")
        await step("rollups", ROLLUP_SQL)
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
            await conn.execute(statement, *args, timeout=7200)


async def chain_all(conn: asyncpg.Connection, log: Callable[[str], None] = _log) -> int:
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
    return seq
