"""`tokenledger audit`: it passes on every ledger the service writes, and it
catches each kind of corruption that someone with superuser rights could
make behind the service's back, naming the invariant that broke."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service import db as service_db
from service.audit import CHECKS, Violation, run_audit
from service.audit import audit as service_audit

REPO = Path(__file__).resolve().parents[2]
T = datetime(2030, 1, 1, tzinfo=UTC)

JOURNAL_TRIGGERS = [
    ("transactions", "transactions_immutable"),
    ("transactions", "transactions_no_truncate"),
    ("entries", "entries_immutable"),
    ("entries", "entries_no_truncate"),
    ("entries", "entries_balanced"),
    ("lot_movements", "lot_movements_immutable"),
    ("lot_movements", "lot_movements_no_truncate"),
    ("reservations", "reservations_resolve_once"),
    ("reservation_holds", "reservation_holds_immutable"),
    ("usage_events", "usage_events_refs"),
]


async def audit(database_url: str) -> list[Violation]:
    conn = await service_db.connect(database_url)
    try:
        return await run_audit(conn)
    finally:
        await conn.close()


def checks(violations: list[Violation]) -> set[str]:
    return {v.check for v in violations}


def public(prefix: str, value: uuid.UUID) -> str:
    return prefix + value.hex


class Ledger:
    """Drives the SQL write functions directly, with an injected clock, the way the service does."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.now = T - timedelta(days=10)

    def ctx(self) -> dict[str, Any]:
        return {"actor": "test", "request_id": "audit-test", "now": self.now.isoformat()}

    async def op(self, op: str, args: dict[str, Any], status: int = 201) -> Any:
        result = await self.conn.fetchval(
            "SELECT tl_execute('test', NULL, NULL, $1, $2, $3, $4)", op, status, args, self.ctx()
        )
        assert result["status"] == status, result
        return result["body"]

    async def department(self, dept: str) -> None:
        await self.conn.fetchval(
            "SELECT tl_op_put_department($1, $2)", {"id": dept, "name": dept}, self.ctx()
        )

    async def employee(self, emp: str, dept: str = "eng") -> None:
        body = {"id": emp, "name": emp, "email": f"{emp}@example.com", "department": dept}
        await self.conn.fetchval("SELECT tl_op_put_employee($1, $2)", body, self.ctx())

    async def grant(self, emp: str, amount: int, **extra: Any) -> Any:
        return await self.op(
            "grant", {"employee": emp, "amount": amount, "reason": "spot_bonus", **extra}
        )

    async def debit(self, account: str, amount: int) -> Any:
        return await self.op("debit", {"account": account, "amount": amount})

    async def transfer(self, src: str, dst: str, amount: int) -> Any:
        return await self.op("transfer", {"from": src, "to": dst, "amount": amount})

    async def reverse(self, txn_public_id: str) -> Any:
        txn = uuid.UUID(hex=txn_public_id.removeprefix("txn_"))
        return await self.op("reverse", {"transaction": txn_public_id, "transaction_id": str(txn)})

    async def void_lot(self, lot_public_id: str) -> Any:
        lot = uuid.UUID(hex=lot_public_id.removeprefix("lot_"))
        return await self.op("void_lot", {"lot": lot_public_id, "lot_id": str(lot)}, status=200)

    async def offboard(self, emp: str) -> Any:
        return await self.op("offboard", {"employee": emp}, status=200)

    async def reserve(self, account: str, amount: int, ttl_seconds: int = 600) -> Any:
        return await self.op(
            "reserve", {"account": account, "amount": amount, "ttl_seconds": ttl_seconds}
        )

    async def capture(self, reservation_public_id: str, amount: int) -> Any:
        rsv = uuid.UUID(hex=reservation_public_id.removeprefix("rsv_"))
        args = {"reservation": reservation_public_id, "reservation_id": str(rsv), "amount": amount}
        return await self.op("capture", args, status=200)

    async def release(self, reservation_public_id: str) -> Any:
        rsv = uuid.UUID(hex=reservation_public_id.removeprefix("rsv_"))
        args = {"reservation": reservation_public_id, "reservation_id": str(rsv)}
        return await self.op("release", args, status=200)

    async def usage(self, event_id: str, account: str, **counts: Any) -> Any:
        body = {"source": "gw", "event_id": event_id, "account": account, "model": "m1", **counts}
        result = await self.conn.fetchval("SELECT tl_record_usage($1, $2)", body, self.ctx())
        assert result["status"] == 201, result
        return result["body"]

    async def usage_batch(self, events: list[dict[str, Any]]) -> Any:
        return await self.conn.fetchval("SELECT tl_record_usage_batch($1, $2)", events, self.ctx())

    async def sweep(self) -> Any:
        return await self.conn.fetchval("SELECT tl_sweep_expired(1000, $1)", self.ctx())


async def scripted_scenario(conn: asyncpg.Connection) -> None:
    """Grants (issuance- and department-funded, expiring and not), debits,
    transfers, voids, reversals, reservations (captured, released, expired,
    still active), expiry (sweeper and write-path) and an offboarding: every
    kind of journal the service writes."""
    ledger = Ledger(conn)
    await ledger.department("eng")
    for emp in ("e1", "e2", "e3", "e4", "e5"):
        await ledger.employee(emp)
    await ledger.transfer("system:issuance", "department:eng", 1000)
    await ledger.grant("e1", 500, expires_at=T.isoformat())
    await ledger.grant("e1", 80, priority=10)
    dept_grant = await ledger.grant("e2", 300, funded_by="department:eng")
    await ledger.grant("e3", 200)
    e4_grant = await ledger.grant("e4", 100)
    await ledger.grant("e5", 60, expires_at=(T + timedelta(days=1)).isoformat())

    ledger.now += timedelta(hours=1)
    d1 = await ledger.debit("employee:e1", 120)
    await ledger.debit("employee:e3", 50)
    await ledger.debit("employee:e2", 100)
    t1 = await ledger.transfer("employee:e3", "employee:e1", 40)
    await ledger.transfer("employee:e1", "employee:e5", 30)
    await ledger.void_lot(e4_grant["lot"]["id"])  # back to system:issuance
    await ledger.void_lot(dept_grant["lot"]["id"])  # back to the department, as a new lot
    await ledger.reverse(d1["id"])
    await ledger.reverse(t1["id"])
    r1 = await ledger.reserve("employee:e1", 50)
    await ledger.capture(r1["id"], 30)  # the other 20 are released
    r2 = await ledger.reserve("employee:e5", 20)
    await ledger.release(r2["id"])
    await ledger.reserve("employee:e5", 15, ttl_seconds=60)  # left to expire
    await ledger.conn.fetchval(
        "SELECT tl_op_add_price($1, $2)",
        {
            "model": "m1",
            "effective_from": "2020-01-01T00:00:00Z",
            "input_per_mtok": 1_000_000,
            "cached_input_per_mtok": 100_000,
            "output_per_mtok": 4_000_000,
        },
        ledger.ctx(),
    )
    await ledger.usage("u1", "employee:e1", input_tokens=10, cached_input_tokens=5, output_tokens=2)
    batch = await ledger.usage_batch(
        [
            {
                "source": "gw",
                "event_id": f"b{i}",
                "account": "employee:e1",
                "model": "m1",
                "input_tokens": 3,
                "output_tokens": 1,
            }
            for i in range(3)
        ]
    )
    assert [r["status"] for r in batch["results"]] == ["recorded"] * 3, batch

    ledger.now = T + timedelta(hours=1)
    swept = await ledger.sweep()
    assert swept["credits"] > 0
    await ledger.debit("employee:e5", 10)  # from e5's own lot, which expires a day later
    ledger.now = T + timedelta(days=2)
    await ledger.grant("e5", 5)  # expires the rest of e5's lot on the write path
    await ledger.offboard("e3")
    await ledger.reserve("employee:e1", 10)  # still active at the end


@pytest.fixture
async def scenario(database_url: str) -> AsyncIterator[str]:
    """A database holding the scripted scenario; yields its DSN."""
    conn = await service_db.connect(database_url)
    try:
        await scripted_scenario(conn)
    finally:
        await conn.close()
    yield database_url


async def test_audit_passes_on_a_fresh_database(database_url: str) -> None:
    """A database with only schema.sql applied has no violations."""
    assert await audit(database_url) == []


async def test_audit_passes_after_the_scripted_scenario(
    scenario: str, db: asyncpg.Connection
) -> None:
    """Every kind of operation leaves a ledger that passes every check."""
    kinds = {r["kind"] for r in await db.fetch("SELECT DISTINCT kind FROM transactions")}
    assert {"grant", "debit", "transfer", "void", "reversal", "expiry", "capture"} <= kinds
    statuses = {r["status"] for r in await db.fetch("SELECT status FROM reservations")}
    assert statuses == {"captured", "released", "expired", "active"}
    # Two by the sweeper (e1's and e5's lots due at T), one on the write path (e5's lot due at
    # T+1d).
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE kind = 'expiry'") == 3
    assert (
        await db.fetchval("SELECT status FROM accounts WHERE address = 'employee:e3'") == "closed"
    )
    assert await audit(scenario) == []


# ---------------------------------------------------------------------------
# Tampering, as a superuser, behind the service's back
# ---------------------------------------------------------------------------


async def _wallet_debit_entry(db: asyncpg.Connection) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT e.id, e.transaction_id, a.address FROM entries e "
        "JOIN transactions t ON t.id = e.transaction_id JOIN accounts a ON a.id = e.account_id "
        "WHERE t.kind = 'debit' AND a.address = 'employee:e2'"
    )
    assert row is not None
    return row


async def test_changed_entry_amount_breaks_invariants_1_and_2(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An entry amount edited with triggers bypassed is caught as an unbalanced transaction and a
    broken running balance."""
    entry = await _wallet_debit_entry(db)
    await db.execute("SET session_replication_role = replica")
    await db.execute("UPDATE entries SET amount = amount - 1 WHERE id = $1", entry["id"])
    violations = await audit(scenario)
    assert {"audit_1_unbalanced", "audit_2_running_balance", "audit_2_posted"} <= checks(violations)
    first = violations[0]
    assert first.check == "audit_1_unbalanced"
    assert public("txn_", entry["transaction_id"]) in first.problem


async def test_changed_posted_balance_breaks_invariant_2(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An account whose posted no longer equals the sum of its entries is caught by invariant 2,
    naming the account."""
    await db.execute("UPDATE accounts SET posted = posted + 7 WHERE address = 'employee:e1'")
    violations = await audit(scenario)
    assert "audit_2_posted" in checks(violations)
    assert not checks(violations) & {
        "audit_1_unbalanced",
        "audit_1_too_few_entries",
        "audit_2_running_balance",
    }
    assert "employee:e1" in next(v.problem for v in violations if v.check == "audit_2_posted")


async def test_changed_system_shard_balance_breaks_invariant_2(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A system account's shard row whose posted drifts from its entries is caught by
    invariant 2."""
    await db.execute(
        "UPDATE account_shards SET posted = posted + 1 WHERE (account_id, shard) = "
        "(SELECT account_id, shard FROM account_shards s JOIN accounts a ON a.id = s.account_id "
        " WHERE a.address = 'system:usage' ORDER BY shard LIMIT 1)"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_2_posted"}
    assert "system:usage" in violations[0].problem


async def test_deleted_entry_breaks_invariants_1_and_2(
    scenario: str, db: asyncpg.Connection
) -> None:
    """Deleting one leg of a transaction is caught as a one-entry, unbalanced transaction and a
    posted mismatch."""
    entry = await _wallet_debit_entry(db)
    await db.execute("ALTER TABLE entries DISABLE TRIGGER USER")
    await db.execute("DELETE FROM entries WHERE id = $1", entry["id"])
    await db.execute("ALTER TABLE entries ENABLE TRIGGER USER")
    violations = await audit(scenario)
    assert {"audit_1_unbalanced", "audit_1_too_few_entries", "audit_2_posted"} <= checks(violations)
    assert "audit_7_triggers" not in checks(violations)


async def test_changed_lot_remaining_breaks_invariant_4(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A lot whose remaining no longer equals the sum of its movements is caught by invariant 4."""
    lot = await db.fetchval(
        "SELECT l.id FROM lots l JOIN accounts a ON a.id = l.account_id "
        "WHERE a.address = 'employee:e1' AND l.remaining > 0 LIMIT 1"
    )
    await db.execute("UPDATE lots SET remaining = remaining - 1 WHERE id = $1", lot)
    violations = await audit(scenario)
    assert {"audit_4_lot_movements", "audit_4_lots_cover_posted"} <= checks(violations)
    assert not checks(violations) & {"audit_1_unbalanced", "audit_2_posted", "audit_3_available"}
    assert public("lot_", lot) in next(
        v.problem for v in violations if v.check == "audit_4_lot_movements"
    )


async def test_lot_settled_while_it_holds_credits_breaks_invariant_4(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A lot marked settled (the as-of balance would skip it) while it still holds credits is
    caught by audit_4_settled_lots."""
    lot = await db.fetchval(
        "SELECT l.id FROM lots l JOIN accounts a ON a.id = l.account_id "
        "WHERE a.address = 'employee:e1' AND l.remaining > 0 LIMIT 1"
    )
    await db.execute("INSERT INTO lot_settled (lot_id, settled_at) VALUES ($1, now())", lot)
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_settled_lots"}
    assert public("lot_", lot) in violations[0].problem


async def test_credits_left_in_a_closed_account_or_voided_lot_break_invariant_4(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A closed account that still holds credits, and a voided lot keeping
    credits no reservation holds, are caught by invariant 4 (offboarding once
    stranded both)."""
    await db.execute("UPDATE accounts SET status = 'closed' WHERE address = 'employee:e1'")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_closed_or_voided_holds_credits"}
    assert "employee:e1" in violations[0].problem
    await db.execute("UPDATE accounts SET status = 'open' WHERE address = 'employee:e1'")
    lot = await db.fetchval(
        "SELECT l.id FROM lots l JOIN accounts a ON a.id = l.account_id "
        "WHERE a.address = 'employee:e1' AND l.remaining > l.reserved LIMIT 1"
    )
    await db.execute("UPDATE lots SET status = 'voided' WHERE id = $1", lot)
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_closed_or_voided_holds_credits"}
    assert public("lot_", lot) in violations[0].problem


async def test_changed_reserved_breaks_invariant_4(scenario: str, db: asyncpg.Connection) -> None:
    """An account reserved amount that its lots do not earmark is caught by invariant 4."""
    await db.execute("UPDATE accounts SET reserved = reserved + 5 WHERE address = 'employee:e1'")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_lot_reserved", "audit_4_reservations_cover_reserved"}
    assert all("employee:e1" in v.problem for v in violations)


async def _active_reservation(db: asyncpg.Connection) -> uuid.UUID:
    rsv = await db.fetchval("SELECT id FROM reservations WHERE status = 'active'")
    assert rsv is not None
    return rsv


async def test_changed_hold_breaks_invariant_4(scenario: str, db: asyncpg.Connection) -> None:
    """A hold edited behind the service's back no longer matches its lot's earmark or its
    reservation, and invariant 4 says so."""
    rsv = await _active_reservation(db)
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "UPDATE reservation_holds SET amount = amount + 1 WHERE reservation_id = $1", rsv
    )
    violations = await audit(scenario)
    assert {"audit_4_hold_earmarks", "audit_4_reservations_cover_reserved"} <= checks(violations)
    assert public("rsv_", rsv) in next(
        v.problem for v in violations if v.check == "audit_4_reservations_cover_reserved"
    )


async def test_changed_reservation_amount_breaks_invariant_4(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An active reservation whose amount no longer matches the account's reserved credits is caught
    by invariant 4."""
    rsv = await _active_reservation(db)
    await db.execute("UPDATE reservations SET amount = amount + 1 WHERE id = $1", rsv)
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_reservations_cover_reserved"}
    assert "employee:e1" in violations[0].problem


async def test_capture_pointing_elsewhere_breaks_invariant_5(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A captured reservation re-pointed at another transaction is caught by invariant 5 (and its
    capture left unclaimed)."""
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "UPDATE reservations SET capture_transaction_id = (SELECT id FROM transactions WHERE kind "
        "= 'debit' LIMIT 1) "
        "WHERE status = 'captured'"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_5_resolved_once"}
    assert "does not record it" in violations[0].problem


async def test_unclaimed_capture_breaks_invariant_5(scenario: str, db: asyncpg.Connection) -> None:
    """A capture transaction that no reservation records as its capture is caught by invariant 5."""
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "UPDATE reservations SET status = 'released', captured = NULL, capture_transaction_id = "
        "NULL "
        "WHERE status = 'captured'"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_5_resolved_once"}
    assert "resolves no reservation" in violations[0].problem


async def test_uncharged_usage_breaks_invariant_6(scenario: str, db: asyncpg.Connection) -> None:
    """A usage event whose cost no longer matches its transaction is caught by invariant 6."""
    await db.execute("SET session_replication_role = replica")
    await db.execute("UPDATE usage_events SET cost = cost + 1 WHERE event_id = 'u1'")
    violations = await audit(scenario)
    assert "audit_6_usage_charged_once" in checks(violations)


async def test_usage_event_naming_a_missing_transaction_breaks_invariant_6(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An event whose transaction does not exist (no foreign key checks it per row: the batch
    writes the transaction after claiming its events) is caught by invariant 6, in full and in
    the routine run since a checkpoint."""
    conn = await service_db.connect(scenario)
    try:
        assert (await service_audit(conn)).violations == []  # checkpoints now
        await db.execute(
            "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, "
            "input_tokens, cached_input_tokens, output_tokens, cost, occurred_at, recorded_at, "
            "transaction_id, result) SELECT tl_uuid7(), 's', 'dangling', account_id, model, "
            "price_id, 1, 0, 1, 0, now(), now(), gen_random_uuid(), '{}' FROM usage_events "
            "WHERE event_id = 'u1'"
        )
        routine = await service_audit(conn, settle_seconds=0)
        assert "audit_6_usage_charged_once" in routine.since
        assert checks(routine.violations) == {"audit_6_usage_charged_once"}
        assert "s/dangling names transaction" in routine.violations[0].problem
    finally:
        await conn.close()
    violations = await audit(scenario)
    assert checks(violations) == {"audit_6_usage_charged_once"}
    assert "s/dangling names transaction" in violations[0].problem


async def test_posted_below_zero_breaks_invariant_3(scenario: str, db: asyncpg.Connection) -> None:
    """With the CHECK dropped, a wallet pushed below -overdraft_limit is caught by invariant 3."""
    await db.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_available_within_limit")
    await db.execute("UPDATE accounts SET posted = -5 WHERE address = 'employee:e4'")
    violations = await audit(scenario)
    assert "audit_3_available" in checks(violations)
    problem = next(v.problem for v in violations if v.check == "audit_3_available")
    assert "employee:e4" in problem and "-5" in problem


async def test_reserved_above_posted_breaks_invariant_3(
    scenario: str, db: asyncpg.Connection
) -> None:
    """With the CHECK dropped, reserving more than a wallet holds is caught by invariant 3."""
    await db.execute("ALTER TABLE accounts DROP CONSTRAINT accounts_available_within_limit")
    await db.execute("UPDATE accounts SET reserved = posted + 1 WHERE address = 'employee:e1'")
    assert "audit_3_available" in checks(await audit(scenario))


async def test_entry_on_a_missing_shard_breaks_invariant_2(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A system-account entry moved to a shard that does not exist is caught as an orphan."""
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "UPDATE entries SET shard = 99 WHERE id = (SELECT e.id FROM entries e JOIN accounts a ON "
        "a.id = e.account_id "
        "WHERE a.address = 'system:usage' LIMIT 1)"
    )
    violations = await audit(scenario)
    assert "audit_2_orphan_entries" in checks(violations)
    assert "system:usage" in next(
        v.problem for v in violations if v.check == "audit_2_orphan_entries"
    )


async def test_tampered_reversal_breaks_invariant_7(scenario: str, db: asyncpg.Connection) -> None:
    """A reversal whose legs no longer negate the original (though still balanced) is caught by
    invariant 7."""
    rows = await db.fetch(
        "SELECT e.id, e.amount FROM entries e JOIN transactions r ON r.id = e.transaction_id "
        "JOIN transactions o ON o.id = r.reverses WHERE r.kind = 'reversal' AND o.kind = 'debit' "
        "ORDER BY e.id"
    )
    assert len(rows) == 2
    await db.execute("SET session_replication_role = replica")
    for row in rows:
        await db.execute(
            "UPDATE entries SET amount = amount + $2 WHERE id = $1",
            row["id"],
            1 if row["amount"] > 0 else -1,
        )
    violations = await audit(scenario)
    assert "audit_7_reversals" in checks(violations)
    assert "audit_1_unbalanced" not in checks(violations)


@pytest.mark.parametrize(
    ("table", "trigger"), JOURNAL_TRIGGERS, ids=[t for _, t in JOURNAL_TRIGGERS]
)
async def test_disabled_trigger_breaks_invariant_7(
    scenario: str, db: asyncpg.Connection, table: str, trigger: str
) -> None:
    """A journal trigger that is disabled is reported by name by invariant 7."""
    await db.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_7_triggers"}
    assert trigger in violations[0].problem


@pytest.mark.parametrize(
    ("table", "trigger"), JOURNAL_TRIGGERS, ids=[t for _, t in JOURNAL_TRIGGERS]
)
async def test_dropped_trigger_breaks_invariant_7(
    scenario: str, db: asyncpg.Connection, table: str, trigger: str
) -> None:
    """A journal trigger that was dropped is reported by name by invariant 7."""
    await db.execute(f"DROP TRIGGER {trigger} ON {table}")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_7_triggers"}
    assert trigger in violations[0].problem


async def test_all_user_triggers_disabled_breaks_invariant_7(
    scenario: str, db: asyncpg.Connection
) -> None:
    """ALTER TABLE ... DISABLE TRIGGER USER on the journal is caught by invariant 7."""
    await db.execute("ALTER TABLE lot_movements DISABLE TRIGGER USER")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_7_triggers"}
    assert "lot_movements_" in violations[0].problem


async def _program_run(db: asyncpg.Connection) -> None:
    ctx = {"actor": "test", "request_id": "audit", "now": "2026-01-05T00:00:00Z"}
    await db.fetchval(
        "SELECT tl_op_put_program($1::jsonb, $2::jsonb)",
        json.dumps(
            {
                "id": "monthly",
                "amount": 10,
                "reason": "monthly_allotment",
                "cadence": {"every": "month", "day": 1},
                "time_zone": "UTC",
                "audience": {"employees": ["e1"]},
                "expiry": {"at": "end_of_cycle"},
                "funded_by": "system:issuance",
                "starts_on": "2026-01-01",
                "active": True,
            }
        ),
        json.dumps(ctx),
    )
    run = await db.fetchval(
        "SELECT tl_program_run('monthly', '2026-01', 'api', NULL, $1::jsonb)", json.dumps(ctx)
    )
    assert json.loads(run)["run"]["issued"] == 1, run


async def test_program_grant_amount_mismatch_breaks_invariant_8(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A program grant whose record no longer matches its lot is caught by invariant 8."""
    await _program_run(db)
    assert await audit(scenario) == []
    await db.execute("UPDATE program_grants SET amount = amount + 1")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_8_program_grants"}
    assert "does not match" in violations[0].problem


async def test_second_program_grant_breaks_invariant_8(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A grant transaction for a program and cycle that program_grants does not
    name (a second grant slipped past the key) is caught by invariant 8."""
    await _program_run(db)
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        'UPDATE transactions SET details = details || \'{"program": "monthly", '
        '"cycle": "2026-01"}\' WHERE id = (SELECT id FROM transactions WHERE kind = \'grant\' '
        "AND NOT details ? 'program' ORDER BY id LIMIT 1)"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_8_program_grants"}
    assert "is not its recorded grant" in violations[0].problem


async def _policy_usage(db: asyncpg.Connection) -> None:
    """A wallet under a spend policy (daily limit, overdraft 5) that records usage beyond
    its balance: a window row, an overdraft and a shortfall on system:overage."""
    ctx = json.dumps({"actor": "test", "request_id": "audit", "now": "2030-01-05T12:00:00Z"})
    await db.fetchval(
        "SELECT tl_op_put_department($1::jsonb, $2::jsonb)",
        json.dumps({"id": "pol", "name": "p"}),
        ctx,
    )
    employee = {"id": "pe", "name": "pe", "email": "pe@example.com", "department": "pol"}
    await db.fetchval("SELECT tl_op_put_employee($1::jsonb, $2::jsonb)", json.dumps(employee), ctx)
    await db.fetchval(
        "SELECT tl_op_grant($1::jsonb, $2::jsonb)",
        json.dumps({"employee": "pe", "amount": 10, "reason": "spot_bonus"}),
        ctx,
    )
    policy = {
        "account": "employee:pe",
        "limits": [{"window": "day", "amount": 100}],
        "overdraft_limit": 5,
    }
    await db.fetchval("SELECT tl_op_put_policy($1::jsonb, $2::jsonb)", json.dumps(policy), ctx)
    price = {
        "model": "pm",
        "effective_from": "2029-01-01T00:00:00Z",
        "input_per_mtok": 0,
        "cached_input_per_mtok": 0,
        "output_per_mtok": 1_000_000,
    }
    await db.fetchval("SELECT tl_op_add_price($1::jsonb, $2::jsonb)", json.dumps(price), ctx)
    usage = {
        "source": "s",
        "event_id": "u1",
        "account": "employee:pe",
        "model": "pm",
        "input_tokens": 0,
        "output_tokens": 30,
    }
    result = json.loads(
        await db.fetchval(
            "SELECT tl_record_usage($1::jsonb, $2::jsonb)::text", json.dumps(usage), ctx
        )
    )
    assert result["body"]["shortfall"] == 15, result


async def test_overage_mismatch_breaks_the_overage_check(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An event whose recorded shortfall no longer matches what system:overage carried is caught."""
    await _policy_usage(db)
    assert await audit(scenario) == []
    await db.execute("UPDATE usage_events SET shortfall = shortfall - 1 WHERE shortfall > 0")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_9_overage"}


async def test_window_row_off_the_journal_breaks_the_window_check(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A spend window row that no longer equals the journal's spend in it is caught."""
    await _policy_usage(db)
    await db.execute("UPDATE policy_spend SET spent = spent - 1")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_9_policy_windows"}
    assert "counts 29 spent, the journal 30" in violations[0].problem


async def test_wrong_policy_binding_breaks_the_binding_check(
    scenario: str, db: asyncpg.Connection
) -> None:
    """An account marked bound that no policy binds (or the reverse) is caught: a bound
    account skipping its checks would let spend pass its limits."""
    await _policy_usage(db)
    await db.execute("UPDATE accounts SET policy_bound = true WHERE address = 'employee:e1'")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_9_policy_bound"}


async def test_resolved_limits_off_the_policies_break_the_binding_check(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A wallet's resolved limits (policy_links, what a coalesced batch checks) that
    no longer match its policy are caught: a batch would check the wrong amount. So
    is a bound wallet whose row is missing."""
    await _policy_usage(db)
    assert await audit(scenario) == []
    await db.execute(
        "UPDATE policy_links SET amount = 101"
        " WHERE account_id = (SELECT id FROM accounts WHERE address = 'employee:pe')"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_9_policy_bound"}
    assert "employee:pe: policy_links" in violations[0].problem
    await db.execute("DELETE FROM policy_links")
    violations = await audit(scenario)
    assert checks(violations) == {"audit_9_policy_bound"}
    assert "policy_links none" in violations[0].problem


async def test_overdraft_beyond_its_limit_breaks_invariant_4(
    scenario: str, db: asyncpg.Connection
) -> None:
    """A usage transaction whose recorded overdraft no longer explains what the wallet's
    posted balance lacks against its lots is caught by invariant 4."""
    await _policy_usage(db)
    await db.execute("SET session_replication_role = replica")
    await db.execute(
        "UPDATE transactions SET details = details || '{\"overdraft\": 6}' "
        "WHERE details ? 'overdraft'"
    )
    violations = await audit(scenario)
    assert checks(violations) == {"audit_4_lots_cover_posted"}
    assert "overdrew it by 6" in violations[0].problem


def test_every_check_is_exercised() -> None:
    """Each check the audit runs has at least one tampering test above that expects it."""
    source = Path(__file__).read_text(encoding="utf-8")
    assert [c for c in CHECKS if f'"{c}"' not in source] == []


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def _cli_audit(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603  # why: our own CLI, fixed arguments
        [sys.executable, "-m", "service", "audit", "--database-url", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_audit_exits_0_on_a_clean_database(scenario: str) -> None:
    """`python -m service audit` exits 0 and says ok on a ledger that holds its invariants."""
    result = _cli_audit(scenario)
    assert result.returncode == 0, result.stdout + result.stderr
    numbers = sorted({int(check.split("_")[1]) for check in CHECKS})
    assert result.stdout.startswith(f"ok: invariants {numbers[0]} to {numbers[-1]} hold\n"), (
        result.stdout
    )


async def test_cli_audit_exits_1_naming_the_violation(
    scenario: str, db: asyncpg.Connection
) -> None:
    """`python -m service audit` exits 1 and prints each violation on a tampered ledger."""
    await db.execute(
        "UPDATE lots SET remaining = remaining - 1 WHERE id = (SELECT id FROM lots WHERE "
        "remaining > 0 LIMIT 1)"
    )
    result = _cli_audit(scenario)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("FAIL invariant 4 (audit_4_lot_movements): lot lot_") for line in lines
    ), result.stdout
    # Every line is a violation, but the last, which says what was checked and how long it took.
    assert all(line.startswith("FAIL ") for line in lines[:-1]), result.stdout
    assert lines[-1].startswith(f"checked {len(CHECKS)} invariants in full"), result.stdout
