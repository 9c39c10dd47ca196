"""`tokenledger audit`: check the invariants of DESIGN.md on a database.

Each check is a named query in service/sql/audit.sql returning the first
violation it finds. The audit reads with a REPEATABLE READ snapshot so that
all checks see one consistent state even while the service keeps writing.

A routine audit is incremental. Every check that passes records a
checkpoint in `audit_checkpoints`: the instant before which every
transaction has been verified. The next routine run checks only the
transactions created since (the `__since` form of each query), together
with the current state of accounts and live lots, so its time grows with new
traffic, not with history. The checkpoint is the snapshot's start less the
settle interval (TOKENLEDGER_CHAIN_SETTLE_SECONDS, which exceeds
statement_timeout): every write is one statement, so a transaction created
before it has committed and is in the snapshot; nothing can appear behind a
checkpoint later. `full=True` (`audit --full`) runs the complete,
set-based checks over all history, and a check without a checkpoint yet
does too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from service import db

# The order in which checks run; the first failure is the one reported.
CHECKS: tuple[str, ...] = (
    "audit_1_unbalanced",
    "audit_1_too_few_entries",
    "audit_2_running_balance",
    "audit_2_posted",
    "audit_2_orphan_entries",
    "audit_3_available",
    "audit_4_lot_movements",
    "audit_4_settled_lots",
    "audit_4_lots_cover_posted",
    "audit_4_closed_or_voided_holds_credits",
    "audit_4_lot_reserved",
    "audit_4_hold_earmarks",
    "audit_4_reservations_cover_reserved",
    "audit_5_resolved_once",
    "audit_6_usage_charged_once",
    "audit_7_triggers",
    "audit_7_reversals",
    "audit_8_program_grants",
    "audit_9_overage",
    "audit_9_policy_windows",
    "audit_9_policy_bound",
)

# Session settings of the complete checks. Each of them is written to be
# planned as scans joined by hash or merge; with enable_nestloop off the
# planner keeps to that even where a LIMIT 1 makes a nested loop of index
# look-ups over all history look cheap (it is, only when a violation is
# found early). work_mem lets the hashes of millions of rows stay in memory
# longer before they spill. tests/db/test_audit_plans.py plans the checks
# under these settings.
FULL_SETTINGS: tuple[tuple[str, str], ...] = (
    ("enable_nestloop", "off"),
    ("work_mem", "64MB"),
)

# More settings of single complete checks. The two checks that read every
# entry grouped by account would be planned as a scan of
# entries_account_version_key, which is in account order while the rows are
# in time order: each entry is a fetch from another heap page, and once the
# table outgrows the cache a buffer miss. At 10M entries they took 2.4x
# (running balance) and 2.6x (posted) the CPU per entry they took at 1M, and
# were a third of the audit; read in the table's order and sorted (or
# hashed) instead, 0.93x and 0.98x (make bench-audit, README). The other
# checks' whole-index scans follow the rows' order (transaction ids are
# time-ordered) and stay: without them audit_1_unbalanced took 2.3x the CPU.
CHECK_SETTINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "audit_2_running_balance": (("enable_indexscan", "off"),),
    "audit_2_posted": (("enable_indexscan", "off"),),
    # The usage check sums the events and the system:usage entries per
    # transaction, millions of groups each at a year. Hashed, those groups
    # outgrow work_mem and spill in batches (at 10M entries: 36 s, 3.7 us of
    # CPU per usage event against 2.3 at 1M); sorted and merged they stream
    # at the same cost per event at both sizes (16.8 s at 10M, 0.75 s at 1M:
    # 1.7 us per usage event). EXPLAIN ANALYZE on make bench-audit's years.
    "audit_6_usage_charged_once": (("enable_hashagg", "off"),),
}


def full_settings(check: str) -> tuple[tuple[str, str], ...]:
    """The session settings a complete check runs under."""
    return FULL_SETTINGS + CHECK_SETTINGS.get(check, ())


@dataclass(frozen=True)
class Violation:
    check: str
    problem: str

    def __str__(self) -> str:
        invariant = self.check.split("_")[1]
        return f"invariant {invariant} ({self.check}): {self.problem}"


@dataclass
class AuditRun:
    """What one audit found and how: the checks run in full and those run
    since a checkpoint (check name to the checkpoint it started from)."""

    violations: list[Violation] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    since: dict[str, datetime] = field(default_factory=dict)
    cutoff: datetime | None = None
    # Wall seconds of each check, in check order: which invariant a slow
    # audit spends its time on (make bench-audit compares them by size).
    seconds: dict[str, float] = field(default_factory=dict)


async def run_audit(conn: asyncpg.Connection) -> list[Violation]:
    """All violations found by the complete checks, at most one per check,
    in check order."""
    return (await audit(conn, full=True)).violations


async def audit(
    conn: asyncpg.Connection,
    *,
    full: bool = False,
    settle_seconds: float = 10.0,
    on_check: Callable[[str], None] | None = None,
) -> AuditRun:
    """Run every check, in full or since its checkpoint, then advance the
    checkpoints of the checks that passed (in a transaction of their own,
    after the read-only snapshot). `on_check(name)` is called as each check
    ends, before the next begins: a bench reads the server's CPU there."""
    queries = db.load_queries()
    run = AuditRun()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cutoff: datetime = await conn.fetchval(
            queries["audit_cutoff"], timedelta(seconds=settle_seconds)
        )
        run.cutoff = cutoff
        marks = {
            r["check_name"]: r["verified_to"]
            for r in await conn.fetch(queries["audit_checkpoints"])
        }
        for name in CHECKS:
            started = time.perf_counter()
            since = marks.get(name)
            if not full and since is not None and f"{name}__since" in queries:
                run.since[name] = since
                sql = queries[f"{name}__since"]
                # A __since form of the current state alone takes no bounds.
                bounds = (since, cutoff) if "$1" in sql else ()
                problem = await conn.fetchval(sql, *bounds)
            elif not full and since is not None:
                # A check of the current state only (accounts, live lots,
                # active reservations, and the rare usage transactions that
                # overdrew, by their partial index): its size does not grow
                # with history.
                run.since[name] = since
                problem = await conn.fetchval(queries[name])
            else:
                run.full.append(name)
                for setting, value in full_settings(name):
                    await conn.execute(f"SET LOCAL {setting} = '{value}'")
                problem = await conn.fetchval(queries[name])
                for setting, _ in full_settings(name):
                    await conn.execute(f"SET LOCAL {setting} TO DEFAULT")
            if problem is not None:
                run.violations.append(Violation(name, str(problem)))
            run.seconds[name] = time.perf_counter() - started
            if on_check is not None:
                on_check(name)
    failed = {v.check for v in run.violations}
    async with conn.transaction():
        for name in CHECKS:
            if name not in failed:
                await conn.execute(queries["audit_checkpoint_save"], name, cutoff)
    return run
