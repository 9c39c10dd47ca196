"""`tokenledger audit`: check the invariants of DESIGN.md on a database.

Each check is a named query in service/sql/audit.sql returning the first
violation it finds. The audit reads with a REPEATABLE READ snapshot so that
all checks see one consistent state even while the service keeps writing.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Violation:
    check: str
    problem: str

    def __str__(self) -> str:
        invariant = self.check.split("_")[1]
        return f"invariant {invariant} ({self.check}): {self.problem}"


async def run_audit(conn: asyncpg.Connection) -> list[Violation]:
    """All violations found, at most one per check, in check order."""
    queries = db.load_queries()
    found: list[Violation] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for name in CHECKS:
            problem = await conn.fetchval(queries[name])
            if problem is not None:
                found.append(Violation(name, str(problem)))
    return found
