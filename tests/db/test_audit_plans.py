"""The audit at scale: on a year of history (bench/year.py, small), the
complete checks are planned set-based, a routine audit reads only what came
after its checkpoints, and neither finds anything wrong with a ledger the
service could have written.

A nested loop over history is what made `audit` quadratic (issue 21: the
usage check looped over every usage transaction and re-read a materialized
sum of every event for each). Here a check's plan fails when any nested loop
or correlated subplan has a history table on either side, so that form
cannot come back unnoticed; EXPLAIN runs under the audit's own session
settings (service.audit.full_settings)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from bench.year import build_year, chain_all
from service import db as service_db
from service import migrate
from service.audit import CHECKS, audit, full_settings
from service.chain import verify_chain_since

# Tables that grow with history (not with the number of employees).
HISTORY = {
    "entries",
    "transactions",
    "lot_movements",
    "lot_settled",
    "lots",
    "reservations",
    "reservation_holds",
    "usage_events",
    "usage_events_archive",
    "program_grants",
    "chain",
}


@pytest.fixture
async def year(db: asyncpg.Connection) -> asyncpg.Connection:
    """A year of history for 60 employees, about 12,000 entries, chained and analyzed."""
    await migrate.migrate(db)
    await build_year(db, employees=60, entries=12_000, log=lambda _: None)
    await chain_all(db, log=lambda _: None)
    await db.execute("ANALYZE")
    return db


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def relations(node: dict[str, Any]) -> set[str]:
    """The tables a plan subtree reads."""
    return {n["Relation Name"] for n in walk(node) if "Relation Name" in n}


def looped_over_history(plan: dict[str, Any]) -> list[str]:
    """Nested loops and correlated subplans with a history table in them."""
    found = []
    for node in walk(plan):
        if node["Node Type"] == "Nested Loop":
            touched = relations(node) & HISTORY
            if touched:
                found.append(f"Nested Loop over {sorted(touched)}")
        for child in node.get("Plans", []):
            if child.get("Parent Relationship") == "SubPlan" and relations(child) & HISTORY:
                found.append(f"SubPlan over {sorted(relations(child) & HISTORY)}")
    return found


async def full_plans(year: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    """Each complete check's plan, made under the settings `audit --full` runs it with."""
    queries = service_db.load_queries()
    plans = {}
    for name in CHECKS:
        async with year.transaction():
            for setting, value in full_settings(name):
                await year.execute(f"SET LOCAL {setting} = '{value}'")
            raw = await year.fetchval(f"EXPLAIN (FORMAT JSON) {queries[name]}")
        plans[name] = json.loads(raw)[0]["Plan"]
    return plans


async def test_full_checks_never_loop_over_history(year: asyncpg.Connection) -> None:
    """Every complete check is planned as scans joined by hash or merge: no
    nested loop and no correlated subplan touches a table that grows with history."""
    bad: dict[str, list[str]] = {}
    for name, plan in (await full_plans(year)).items():
        if looped := looped_over_history(plan):
            bad[name] = looped
    assert bad == {}


async def test_full_checks_read_entries_in_heap_order(year: asyncpg.Connection) -> None:
    """No complete check reads all of `entries` through an index whose order is not the
    table's: an index scan in account order fetches the entries' rows at random, and once
    the table outgrows the cache every entry costs a buffer miss. audit_2_running_balance
    and audit_2_posted were planned so (entries_account_version_key) and took 2.4x and
    2.6x the CPU per entry at 10M entries that they took at 1M; with a sequential scan
    (and a sort, or a hash) 0.93x and 0.98x. An index whose leading column follows the
    rows' order (transaction_id: time-ordered ids, entries written in time order) is
    fine, as is an index-only scan."""
    await year.execute("ANALYZE entries")
    correlation = {
        r["attname"]: abs(float(r["correlation"]))
        for r in await year.fetch(
            "SELECT attname, correlation FROM pg_stats WHERE tablename = 'entries' "
            "AND correlation IS NOT NULL"
        )
    }
    assert correlation["transaction_id"] > 0.9 and correlation["account_id"] < 0.5
    leading = {
        r["index"]: r["column"]
        for r in await year.fetch(
            "SELECT i.indexrelid::regclass::text AS index, a.attname AS column "
            "FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
            "WHERE i.indrelid = 'entries'::regclass"
        )
    }
    bad: dict[str, list[str]] = {}
    for name, plan in (await full_plans(year)).items():
        for node in walk(plan):
            index = node.get("Index Name")
            if node["Node Type"] == "Index Scan" and node.get("Relation Name") == "entries":
                if "Index Cond" not in node and correlation[leading[index]] < 0.9:
                    bad.setdefault(name, []).append(index)
    assert bad == {}


async def test_usage_check_groups_by_sorting(year: asyncpg.Connection) -> None:
    """audit_6_usage_charged_once sums the events and the system:usage entries of
    every usage transaction: millions of groups at a year. Hashed, they outgrow
    work_mem and spill in batches (at 10M entries 36 s against 16.8 s sorted, 3.7
    against 1.7 us of CPU per usage event, where 1M took 2.3 and 1.7); so it is
    planned with sorts and a merge join, no HashAggregate over a history table."""
    plan = (await full_plans(year))["audit_6_usage_charged_once"]
    hashed = [
        sorted(relations(node) & HISTORY)
        for node in walk(plan)
        if node["Node Type"] == "Aggregate"
        and node.get("Strategy") == "Hashed"
        and relations(node) & HISTORY
    ]
    assert hashed == []


async def test_quadratic_usage_check_would_be_caught(year: asyncpg.Connection) -> None:
    """The check above fails on the old form of the usage check (a nested
    loop over usage transactions, per-transaction sums of every event)."""
    old = """
        SELECT t.id FROM transactions t
        LEFT JOIN (SELECT transaction_id, sum(cost) AS cost FROM usage_events
                   GROUP BY transaction_id) u ON u.transaction_id = t.id
        WHERE t.kind = 'usage' AND coalesce(u.cost, 0) <> 1 LIMIT 1"""
    async with year.transaction():
        await year.execute("SET LOCAL enable_hashjoin = off")
        await year.execute("SET LOCAL enable_mergejoin = off")
        plan = json.loads(await year.fetchval(f"EXPLAIN (FORMAT JSON) {old}"))[0]["Plan"]
    assert looped_over_history(plan)


# Partial indexes whose rows are bounded by the present (live lots, active
# reservations), not by history: reading one whole is fine.
PRESENT = {
    "lots_live_consumption_idx",
    "lots_live_due_idx",
    "lots_voided_live_idx",
    "lots_rollover_due_idx",
    "reservations_due_idx",
}
# Partial indexes of rare rows of a history table, which a routine check may
# read whole: the usage transactions that overdrew an account (spend
# policy), summed per account by audit_4_lots_cover_posted.
RARE = {"transactions_overdraft_idx"}


def reads_all_history(plan: dict[str, Any]) -> list[str]:
    """Scans that read a history table whole: a sequential scan, or an index
    scan with no condition on an index that is not one of the present."""
    found = []
    for node in walk(plan):
        relation = node.get("Relation Name")
        index = node.get("Index Name")
        if node["Node Type"] == "Seq Scan" and relation in HISTORY:
            found.append(f"Seq Scan on {relation}")
        if index and "Index Cond" not in node and index not in PRESENT | RARE:
            owner = relation or index
            if any(owner.startswith(t) for t in HISTORY):
                found.append(f"{node['Node Type']} on {index} without a condition")
    return found


async def test_year_passes_the_audit_and_routine_reads_only_new_rows(
    year: asyncpg.Connection,
) -> None:
    """The built year passes every check in full; the routine form of each
    check reads history tables only through an index condition or an index of
    present rows (never whole); after a debit, the routine audit checks it from
    the checkpoints, and the routine chain verification starts after the last
    verified row."""
    full = await audit(year, full=True, settle_seconds=0)
    assert full.violations == []
    assert full.full == list(CHECKS)
    assert full.cutoff is not None
    problem, verified = await verify_chain_since(year, None)
    assert problem is None and verified is not None
    await year.execute(service_db.load_queries()["audit_chain_checkpoint_save"], *verified)

    queries = service_db.load_queries()
    bad: dict[str, list[str]] = {}
    # On tables this small a sequential scan can be the cheaper plan; with
    # it priced out, one is left only where no index reaches the rows.
    await year.execute("SET enable_seqscan = off")
    for name in CHECKS:
        sql = queries.get(f"{name}__since", queries[name])
        if "$1" in sql:
            at = full.cutoff.isoformat()
            await year.execute(f"PREPARE routine (timestamptz, timestamptz) AS {sql}")
            raw = await year.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE routine ('{at}', '{at}')")
            await year.execute("DEALLOCATE routine")
        else:
            raw = await year.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
        if whole := reads_all_history(json.loads(raw)[0]["Plan"]):
            bad[name] = whole
    await year.execute("RESET enable_seqscan")
    assert bad == {}

    await year.fetchval(
        "SELECT tl_execute('t', 'k-audit', '\\x00', 'debit', 201, "
        "jsonb_build_object('account', 'employee:emp-7', 'amount', 5), "
        "jsonb_build_object('actor', 'test', 'request_id', 'r'))"
    )
    await year.execute("SELECT tl_chain_pending(100, '0 seconds', false)")
    routine = await audit(year, full=False, settle_seconds=0)
    assert routine.violations == []
    assert routine.full == [] and set(routine.since) == set(CHECKS)

    problem, last = await verify_chain_since(year, verified)
    assert problem is None
    assert last is not None and last[0] == verified[0] + 1


async def test_routine_audit_finds_a_broken_new_transaction(year: asyncpg.Connection) -> None:
    """A routine audit still finds what is wrong in what came after its
    checkpoints: a new entry whose running balance does not follow."""
    assert (await audit(year, full=True, settle_seconds=0)).violations == []
    await year.fetchval(
        "SELECT tl_execute('t', 'k-audit', '\\x00', 'debit', 201, "
        "jsonb_build_object('account', 'employee:emp-3', 'amount', 5), "
        "jsonb_build_object('actor', 'test', 'request_id', 'r'))"
    )
    await year.execute("ALTER TABLE entries DISABLE TRIGGER entries_immutable")
    await year.execute(
        "UPDATE entries SET balance_after = balance_after + 1 WHERE id = "
        "(SELECT max(id) FROM entries WHERE account_id = tl_account_id('employee:emp-3'))"
    )
    await year.execute("ALTER TABLE entries ENABLE TRIGGER entries_immutable")
    routine = await audit(year, full=False, settle_seconds=0)
    assert [v.check for v in routine.violations] == [
        "audit_2_running_balance",
        "audit_2_posted",
    ]


async def test_routine_lots_cover_posted_reads_only_the_overdrafts(
    year: asyncpg.Connection,
) -> None:
    """A routine audit runs audit_4_lots_cover_posted whole, as a check of the current state
    (accounts, live lots): the only history it reads is the usage transactions that overdrew
    an account, through their partial index. It read every usage transaction before: 78 s of
    a 115 s routine audit on a year of 10M entries."""
    query = service_db.load_queries()["audit_4_lots_cover_posted"]
    plan = json.loads(await year.fetchval(f"EXPLAIN (FORMAT JSON) {query}"))[0]["Plan"]
    reads = [
        (node["Node Type"], node.get("Index Name"))
        for node in walk(plan)
        if node.get("Relation Name") == "transactions"
    ]
    assert reads, plan
    assert all(index == "transactions_overdraft_idx" for _, index in reads), reads
