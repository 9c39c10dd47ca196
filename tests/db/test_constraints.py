"""Every named CHECK/UNIQUE constraint and every trigger of schema.sql, made to fire.

The database is the last line of defence for the invariants of DESIGN.md:
these tests write the bad rows directly, as a superuser, and pin the exact
constraint name or SQLSTATE that refuses them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from service import db as service_db
from service import migrate

CTX: dict[str, Any] = {"actor": "test", "request_id": "constraints", "now": None}


@dataclass(frozen=True)
class World:
    """Ids of a small valid ledger: department eng, employee e1 with a wallet
    holding a 100-credit lot, one grant and one debit."""

    acc: int  # employee:e1
    usage: int  # system:usage
    grant_txn: uuid.UUID
    debit_txn: uuid.UUID
    lot: uuid.UUID
    # A reservation still active and one already released (each holding 5 of the lot).
    res_active: uuid.UUID = uuid.UUID(int=1)
    res_resolved: uuid.UUID = uuid.UUID(int=2)


@pytest.fixture
async def world(database_url: str, db: asyncpg.Connection) -> AsyncIterator[World]:
    """A department, an employee, a grant of 100 and a debit of 10, written by the SQL functions."""
    conn = await service_db.connect(database_url)
    try:
        await conn.fetchval(
            "SELECT tl_op_put_department($1, $2)", {"id": "eng", "name": "Eng"}, CTX
        )
        await conn.fetchval(
            "SELECT tl_op_put_employee($1, $2)",
            {"id": "e1", "name": "E One", "email": "e1@example.com", "department": "eng"},
            CTX,
        )
        grant = await conn.fetchval(
            "SELECT tl_execute('test', NULL, NULL, 'grant', 201, $1, $2)",
            {"employee": "e1", "amount": 100, "reason": "spot_bonus"},
            CTX,
        )
        assert grant["status"] == 201, grant
        debit = await conn.fetchval(
            "SELECT tl_execute('test', NULL, NULL, 'debit', 201, $1, $2)",
            {"account": "employee:e1", "amount": 10},
            CTX,
        )
        assert debit["status"] == 201, debit
    finally:
        await conn.close()
    acc = await db.fetchval("SELECT id FROM accounts WHERE address = 'employee:e1'")
    usage = await db.fetchval("SELECT id FROM accounts WHERE address = 'system:usage'")
    grant_txn = await db.fetchval("SELECT id FROM transactions WHERE kind = 'grant'")
    debit_txn = await db.fetchval("SELECT id FROM transactions WHERE kind = 'debit'")
    lot = await db.fetchval("SELECT id FROM lots WHERE account_id = $1", acc)
    if await db.fetchval("SELECT to_regclass('chain') IS NOT NULL"):
        # The grant as the first link of the tamper-evidence chain (only the hash lengths matter
        # here).
        await db.execute(
            "INSERT INTO chain (seq, transaction_id, content_hash, prev_hash, chain_hash) "
            "VALUES (1, $1, sha256('content'), sha256('prev'), sha256('chain'))",
            grant_txn,
        )
    w = World(acc=acc, usage=usage, grant_txn=grant_txn, debit_txn=debit_txn, lot=lot)
    if await db.fetchval("SELECT to_regclass('reservations') IS NOT NULL"):
        await db.execute(
            "INSERT INTO reservations (id, account_id, amount, status, expires_at, created_at, "
            "resolved_at) "
            "VALUES ($1, $3, 5, 'active', now() + interval '1 hour', now(), NULL), "
            "       ($2, $3, 5, 'released', now() + interval '1 hour', now(), now())",
            w.res_active,
            w.res_resolved,
            acc,
        )
        await db.execute(
            "INSERT INTO reservation_holds (reservation_id, lot_id, amount) VALUES ($1, $3, 5), "
            "($2, $3, 5)",
            w.res_active,
            w.res_resolved,
            lot,
        )
    yield w


def _sql(template: str, w: World) -> str:
    return template.format(
        acc=w.acc,
        usage=w.usage,
        txn=w.grant_txn,
        debit=w.debit_txn,
        lot=w.lot,
        active=w.res_active,
        resolved=w.res_resolved,
    )


_NEW_ENTRY = (
    "INSERT INTO entries (transaction_id, account_id, asset, amount, balance_after, version, "
    "created_at) "
    "VALUES ('{txn}', {acc}, 'CREDIT', %s, 100, %s, now())"
)
_NEW_LOT = (
    "INSERT INTO lots (id, account_id, amount, remaining, effective_at, grant_transaction_id, "
    "funded_by, created_at) "
    "VALUES (gen_random_uuid(), {acc}, %s, 0, now(), '{txn}', {acc}, now())"
)
_NEW_RESERVATION = (
    "INSERT INTO reservations (id, account_id, amount, status, captured, capture_transaction_id, "
    "expires_at, created_at, resolved_at) VALUES "
)
_NEW_PRICE = (
    "INSERT INTO prices (id, model, tier, effective_from, input_per_mtok, cached_input_per_mtok, "
    "output_per_mtok, source) VALUES "
)
# A usage event with these (event id, input, cached, output, cost, transaction, result).
_NEW_USAGE = (
    "WITH p AS (INSERT INTO prices (id, model, tier, effective_from, input_per_mtok, "
    "cached_input_per_mtok, output_per_mtok, source) VALUES (gen_random_uuid(), 'um', 'standard', "
    "'2020-01-01Z', 1, 1, 1, 'test') RETURNING id) "
    "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens, "
    "cached_input_tokens, output_tokens, cost, occurred_at, recorded_at, transaction_id, result) "
    "SELECT gen_random_uuid(), 's', e.id, {acc}, 'um', p.id, e.i, e.c, e.o, e.cost, now(), now(), "
    "e.txn::uuid, e.result::jsonb FROM p, (VALUES %s) AS e (id, i, c, o, cost, txn, result)"
)
# A usage event of cost 5 with this (shortfall, violation) (spend policy).
_NEW_POLICY_USAGE = (
    "WITH p AS (INSERT INTO prices (id, model, tier, effective_from, input_per_mtok, "
    "cached_input_per_mtok, output_per_mtok, source) VALUES (gen_random_uuid(), 'um', 'standard', "
    "'2020-01-01Z', 1, 1, 1, 'test') RETURNING id) "
    "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens, "
    "cached_input_tokens, output_tokens, cost, occurred_at, recorded_at, transaction_id, result, "
    "shortfall, violation) "
    "SELECT gen_random_uuid(), 's', 'e1', {acc}, 'um', p.id, 1, 0, 1, 5, now(), now(), "
    "'{txn}', '{{}}', %s, %s FROM p"
)
_NEW_SPEND = (
    "INSERT INTO policy_spend (account_id, period, time_zone, starts_at, spent) "
    "VALUES ({acc}, %s, 'UTC', '2030-01-01Z', %s)"
)
_NEW_LINK = (
    "INSERT INTO chain (seq, transaction_id, content_hash, prev_hash, chain_hash) "
    "VALUES (%s, %s, %s, %s, %s)"
)

# (constraint name, asyncpg exception, a statement that breaks exactly that constraint)
# A grant program row: (id, "amount, cadence_day, expiry, rollover_max, ends_on").
_NEW_PROGRAM = (
    "INSERT INTO grant_programs (id, amount, cadence_day, expiry, rollover_max, ends_on, reason, "
    "audience, funded_by, starts_on, active, created_at, updated_at) "
    "SELECT %s, %s, 'monthly_allotment', '{{\"all\": true}}', a.id, '2026-01-01', true, "
    "now(), now() "
    "FROM accounts a WHERE a.address = 'system:issuance'"
)
_WITH_PROGRAM = (
    "WITH p AS (" + _NEW_PROGRAM % ("'p'", "100, 1, NULL, NULL, NULL") + " RETURNING id) "
)
# A run of program p (which _WITH_PROGRAM creates): (cycle, trigger).
_NEW_RUN = (
    "INSERT INTO program_runs (id, program_id, cycle, trigger, ran_at) "
    "SELECT gen_random_uuid(), p.id, %s, %s, now() FROM p"
)

# A webhook: url, events, description.
_NEW_WEBHOOK = (
    "INSERT INTO webhooks (id, url, events, description, secret_encrypted) "
    "VALUES (gen_random_uuid(), %s, %s, %s, '\\x00')"
)
# A webhook and an event, then the delivery rows (status, attempts, completed_at).
_WITH_DELIVERY = (
    "WITH w AS (INSERT INTO webhooks (id, url, events, secret_encrypted) "
    "VALUES (gen_random_uuid(), 'https://x.example', ARRAY['grant.created'], '\\x00') "
    "RETURNING id), "
    "o AS (INSERT INTO outbox (type, data) VALUES ('grant.created', '{{}}') RETURNING seq), "
    "v (status, attempts, completed_at) AS (VALUES (%s, %s, %s::timestamptz)"
)
_NEW_DELIVERIES = (
    "INSERT INTO webhook_deliveries (id, webhook_id, event_seq, status, attempts, "
    "next_attempt_at, retry_until, created_at, completed_at) "
    "SELECT gen_random_uuid(), w.id, o.seq, v.status, v.attempts, now(), now(), now(), "
    "v.completed_at FROM w, o, v"
)

CONSTRAINT_CASES: list[tuple[str, type[asyncpg.PostgresError], str]] = [
    # departments
    (
        "departments_id_format",
        asyncpg.CheckViolationError,
        "INSERT INTO departments (id, name) VALUES ('Bad Id', 'x')",
    ),
    (
        "departments_name_length",
        asyncpg.CheckViolationError,
        "INSERT INTO departments (id, name) VALUES ('d2', '')",
    ),
    (
        "departments_not_own_parent",
        asyncpg.CheckViolationError,
        "UPDATE departments SET parent = id WHERE id = 'eng'",
    ),
    # employees
    (
        "employees_id_format",
        asyncpg.CheckViolationError,
        "INSERT INTO employees (id, name, email, department) VALUES ('-bad', 'n', 'n@x.io', 'eng')",
    ),
    (
        "employees_name_length",
        asyncpg.CheckViolationError,
        "INSERT INTO employees (id, name, email, department) VALUES ('e2', repeat('x', 201), "
        "'n@x.io', 'eng')",
    ),
    (
        "employees_email_format",
        asyncpg.CheckViolationError,
        "INSERT INTO employees (id, name, email, department) VALUES ('e2', 'n', 'not an email', "
        "'eng')",
    ),
    (
        "employees_status_valid",
        asyncpg.CheckViolationError,
        "UPDATE employees SET status = 'gone' WHERE id = 'e1'",
    ),
    (
        "employees_offboarded_at_set",
        asyncpg.CheckViolationError,
        "UPDATE employees SET status = 'offboarded' WHERE id = 'e1'",
    ),
    # accounts
    (
        "accounts_address_key",
        asyncpg.UniqueViolationError,
        "INSERT INTO accounts (address, type, ref) VALUES ('employee:e1', 'employee', 'e1')",
    ),
    (
        "accounts_type_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (address, type, ref) VALUES ('robot:r1', 'robot', 'r1')",
    ),
    (
        "accounts_address_matches",
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (address, type, ref) VALUES ('employee:x1', 'employee', 'x2')",
    ),
    (
        "accounts_ref_format",
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (address, type, ref) VALUES ('employee:X', 'employee', 'X')",
    ),
    (
        "accounts_ref_format",
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (address, type, ref) "
        "VALUES ('employee:' || repeat('a', 65), 'employee', repeat('a', 65))",
    ),
    (
        "accounts_status_valid",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET status = 'frozen' WHERE id = {acc}",
    ),
    (
        "accounts_reserved_nonnegative",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET reserved = -1 WHERE id = {acc}",
    ),
    (
        "accounts_overdraft_nonnegative",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET overdraft_limit = -1 WHERE id = {acc}",
    ),
    (
        "accounts_available_within_limit",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET reserved = posted + 1 WHERE id = {acc}",
    ),
    (
        "accounts_posted_within_limit",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET posted = 4611686018427387905 WHERE id = {acc}",
    ),
    (
        "accounts_shards_only_system",
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (address, type, ref, shard_count) VALUES ('employee:e9', "
        "'employee', 'e9', 2)",
    ),
    (
        "accounts_sharded_row_unused",
        asyncpg.CheckViolationError,
        "UPDATE accounts SET posted = 1 WHERE id = {usage}",
    ),
    # account_shards
    (
        "account_shards_posted_within_limit",
        asyncpg.CheckViolationError,
        "UPDATE account_shards SET posted = -4611686018427387905 WHERE account_id = {usage}",
    ),
    (
        "account_shards_shard_nonnegative",
        asyncpg.CheckViolationError,
        "INSERT INTO account_shards (account_id, shard) VALUES ({usage}, -1)",
    ),
    # transactions
    (
        "transactions_kind_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO transactions (id, kind, created_at) VALUES (gen_random_uuid(), 'gift', now())",
    ),
    (
        "transactions_reverses_key",
        asyncpg.UniqueViolationError,
        "INSERT INTO transactions (id, kind, reverses, created_at) VALUES "
        "(gen_random_uuid(), 'reversal', '{txn}', now()), (gen_random_uuid(), 'reversal', "
        "'{txn}', now())",
    ),
    (
        "transactions_reversal_has_target",
        asyncpg.CheckViolationError,
        "INSERT INTO transactions (id, kind, created_at) VALUES (gen_random_uuid(), 'reversal', "
        "now())",
    ),
    (
        "transactions_metadata_object",
        asyncpg.CheckViolationError,
        "INSERT INTO transactions (id, kind, metadata, created_at) VALUES (gen_random_uuid(), "
        "'debit', '[]', now())",
    ),
    # entries
    ("entries_amount_nonzero", asyncpg.CheckViolationError, _NEW_ENTRY % (0, 1000)),
    ("entries_version_positive", asyncpg.CheckViolationError, _NEW_ENTRY % (1, 0)),
    ("entries_account_version_key", asyncpg.UniqueViolationError, _NEW_ENTRY % (1, 1)),
    # lots
    ("lots_amount_positive", asyncpg.CheckViolationError, _NEW_LOT % 0),
    (
        "lots_remaining_within_amount",
        asyncpg.CheckViolationError,
        "UPDATE lots SET remaining = amount + 1 WHERE id = '{lot}'",
    ),
    (
        "lots_reserved_within_remaining",
        asyncpg.CheckViolationError,
        "UPDATE lots SET reserved = remaining + 1 WHERE id = '{lot}'",
    ),
    (
        "lots_priority_range",
        asyncpg.CheckViolationError,
        "UPDATE lots SET priority = 1001 WHERE id = '{lot}'",
    ),
    (
        "lots_expiry_after_start",
        asyncpg.CheckViolationError,
        "UPDATE lots SET expires_at = effective_at WHERE id = '{lot}'",
    ),
    (
        "lots_status_valid",
        asyncpg.CheckViolationError,
        "UPDATE lots SET status = 'spent' WHERE id = '{lot}'",
    ),
    # lot_movements
    (
        "lot_movements_amount_nonzero",
        asyncpg.CheckViolationError,
        "WITH t AS (INSERT INTO transactions (id, kind, created_at) VALUES (gen_random_uuid(), "
        "'debit', now()) "
        "RETURNING id) INSERT INTO lot_movements (transaction_id, lot_id, amount) SELECT t.id, "
        "'{lot}', 0 FROM t",
    ),
    # api_keys
    (
        "api_keys_prefix_key",
        asyncpg.UniqueViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role) VALUES "
        "(gen_random_uuid(), 'p1', sha256('a'), 'one', 'admin'), (gen_random_uuid(), 'p1', "
        "sha256('b'), 'two', 'hr')",
    ),
    (
        "api_keys_role_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role) VALUES (gen_random_uuid(), "
        "'p2', sha256('a'), 'n', 'root')",
    ),
    (
        "api_keys_account_types_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role, account_types) VALUES "
        "(gen_random_uuid(), 'p4', sha256('a'), 'n', 'meter', ARRAY['system'])",
    ),
    (
        "api_keys_rate_limit_positive",
        asyncpg.CheckViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role, rate_limit) VALUES "
        "(gen_random_uuid(), 'p9', sha256('a'), 'n', 'meter', 0)",
    ),
    (
        "api_keys_name_length",
        asyncpg.CheckViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role) VALUES (gen_random_uuid(), "
        "'p3', sha256('a'), '', 'hr')",
    ),
    (
        "api_keys_hash_length",
        asyncpg.CheckViolationError,
        "INSERT INTO api_keys (id, prefix, secret_hash, name, role) VALUES (gen_random_uuid(), "
        "'p4', '\\x0102', 'n', 'hr')",
    ),
    # chain (tamper evidence)
    (
        "chain_transaction_key",
        asyncpg.UniqueViolationError,
        _NEW_LINK % (2, "'{txn}'", "sha256('c')", "sha256('p')", "sha256('h')"),
    ),
    (
        "chain_seq_positive",
        asyncpg.CheckViolationError,
        _NEW_LINK % (0, "'{debit}'", "sha256('c')", "sha256('p')", "sha256('h')"),
    ),
    (
        "chain_content_hash_length",
        asyncpg.CheckViolationError,
        _NEW_LINK % (2, "'{debit}'", "'\\x00'", "sha256('p')", "sha256('h')"),
    ),
    (
        "chain_prev_hash_length",
        asyncpg.CheckViolationError,
        _NEW_LINK % (2, "'{debit}'", "sha256('c')", "'\\x00'", "sha256('h')"),
    ),
    (
        "chain_chain_hash_length",
        asyncpg.CheckViolationError,
        _NEW_LINK % (2, "'{debit}'", "sha256('c')", "sha256('p')", "'\\x00'"),
    ),
    # reservations
    (
        "reservations_amount_positive",
        asyncpg.CheckViolationError,
        _NEW_RESERVATION
        + "(gen_random_uuid(), {acc}, 0, 'active', NULL, NULL, now(), now(), NULL)",
    ),
    (
        "reservations_status_valid",
        asyncpg.CheckViolationError,
        "UPDATE reservations SET status = 'pending', resolved_at = now() WHERE id = '{active}'",
    ),
    (
        "reservations_resolved_when_not_active",
        asyncpg.CheckViolationError,
        "UPDATE reservations SET status = 'released' WHERE id = '{active}'",
    ),
    (
        "reservations_capture_recorded",
        asyncpg.CheckViolationError,
        "UPDATE reservations SET status = 'captured', resolved_at = now() WHERE id = '{active}'",
    ),
    (
        "reservations_captured_positive",
        asyncpg.CheckViolationError,
        "UPDATE reservations SET captured = 0 WHERE id = '{active}'",
    ),
    (
        "reservations_capture_transaction_key",
        asyncpg.UniqueViolationError,
        _NEW_RESERVATION
        + "(gen_random_uuid(), {acc}, 5, 'captured', 5, '{debit}', now(), now(), now()), "
        "(gen_random_uuid(), {acc}, 5, 'captured', 5, '{debit}', now(), now(), now())",
    ),
    (
        "reservation_holds_amount_positive",
        asyncpg.CheckViolationError,
        # (the CHECK runs before the primary key would find the existing hold)
        "INSERT INTO reservation_holds (reservation_id, lot_id, amount) VALUES ('{active}', "
        "'{lot}', 0)",
    ),
    # idempotency_keys
    (
        "idempotency_keys_key_format",
        asyncpg.CheckViolationError,
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
        "VALUES ('c', E'bad\\nkey', '\\x00', 200, 'null')",
    ),
    (
        "idempotency_keys_key_format",
        asyncpg.CheckViolationError,
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
        "VALUES ('c', repeat('k', 256), '\\x00', 200, 'null')",
    ),
    # prices
    (
        "prices_model_format",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), '-bad', 'standard', now(), 1, 1, 1, 'test')",
    ),
    (
        "prices_tier_valid",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'gold', now(), 1, 1, 1, 'test')",
    ),
    (
        "prices_input_rate_range",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'standard', now(), -1, 1, 1, 'test')",
    ),
    (
        "prices_cached_input_rate_range",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'standard', now(), 1, 1000000001, 1, 'test')",
    ),
    (
        "prices_output_rate_range",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'standard', now(), 1, 1, -1, 'test')",
    ),
    (
        "prices_source_length",
        asyncpg.CheckViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'standard', now(), 1, 1, 1, '')",
    ),
    # usage events
    (
        "usage_events_tokens_range",
        asyncpg.CheckViolationError,
        _NEW_USAGE % "('e1', 10, 11, 1, 1, '{txn}', '{{}}')",
    ),
    (
        "usage_events_cost_nonnegative",
        asyncpg.CheckViolationError,
        _NEW_USAGE % "('e1', 10, 0, 1, -1, '{txn}', '{{}}')",
    ),
    (
        "usage_events_charged",
        asyncpg.CheckViolationError,
        _NEW_USAGE % "('e1', 10, 0, 1, 5, NULL, '{{}}')",
    ),
    (
        "usage_events_source_event_key",
        asyncpg.UniqueViolationError,
        _NEW_USAGE % "('e1', 1, 0, 1, 1, '{txn}', '{{}}'), ('e1', 1, 0, 1, 1, '{txn}', '{{}}')",
    ),
    (
        "prices_model_effective_key",
        asyncpg.UniqueViolationError,
        _NEW_PRICE + "(gen_random_uuid(), 'm', 'standard', '2026-01-01Z', 1, 1, 1, 'test'), "
        "(gen_random_uuid(), 'm', 'standard', '2026-01-01Z', 2, 2, 2, 'test')",
    ),
    # grant programs
    (
        "grant_programs_id_format",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'Bad Id'", "100, 1, NULL, NULL, NULL"),
    ),
    (
        "grant_programs_amount_positive",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'p'", "0, 1, NULL, NULL, NULL"),
    ),
    (
        "grant_programs_day_range",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'p'", "100, 29, NULL, NULL, NULL"),
    ),
    (
        "grant_programs_rollover_nonnegative",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'p'", '100, 1, \'{{"at": "end_of_cycle"}}\', -1, NULL'),
    ),
    (
        "grant_programs_rollover_needs_cycle_expiry",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'p'", "100, 1, '{{\"after_days\": 3}}', 10, NULL"),
    ),
    (
        "grant_programs_ends_after_start",
        asyncpg.CheckViolationError,
        _NEW_PROGRAM % ("'p'", "100, 1, NULL, NULL, '2025-12-31'"),
    ),
    (
        "program_runs_trigger_valid",
        asyncpg.CheckViolationError,
        _WITH_PROGRAM + _NEW_RUN % ("'2026-01'", "'cron'"),
    ),
    (
        "program_runs_cycle_format",
        asyncpg.CheckViolationError,
        _WITH_PROGRAM + _NEW_RUN % ("'2026-13'", "'api'"),
    ),
    (
        "program_grants_amount_positive",
        asyncpg.CheckViolationError,
        _WITH_PROGRAM + ", r AS (" + _NEW_RUN % ("'2026-01'", "'api'") + " RETURNING id) "
        "INSERT INTO program_grants (program_id, cycle, employee_id, amount, transaction_id, "
        "lot_id, run_id, created_at) "
        "SELECT 'p', '2026-01', 'e1', 0, '{txn}', '{lot}', r.id, now() FROM r",
    ),
    # spend policy
    (
        "spend_policies_limits_array",
        asyncpg.CheckViolationError,
        "INSERT INTO spend_policies (account_id, limits, created_at, updated_at) "
        "VALUES ({acc}, '{{}}', now(), now())",
    ),
    (
        "spend_policies_models_object",
        asyncpg.CheckViolationError,
        "INSERT INTO spend_policies (account_id, models, created_at, updated_at) "
        "VALUES ({acc}, '[]', now(), now())",
    ),
    ("policy_spend_period_valid", asyncpg.CheckViolationError, _NEW_SPEND % ("'year'", 1)),
    ("policy_spend_spent_nonnegative", asyncpg.CheckViolationError, _NEW_SPEND % ("'day'", -1)),
    (
        "usage_events_shortfall_within_cost",
        asyncpg.CheckViolationError,
        _NEW_POLICY_USAGE % ("6", "NULL"),
    ),
    (
        "usage_events_violation_valid",
        asyncpg.CheckViolationError,
        _NEW_POLICY_USAGE % ("0", "'over_budget'"),
    ),
    # outbox
    (
        "outbox_type_known",
        asyncpg.CheckViolationError,
        "INSERT INTO outbox (type, data) VALUES ('balance.high', '{{}}')",
    ),
    (
        "outbox_id_unique",
        asyncpg.UniqueViolationError,
        "INSERT INTO outbox (id, type, data) VALUES ('evt_1', 'grant.created', '{{}}'), "
        "('evt_1', 'grant.created', '{{}}')",
    ),
    (
        "outbox_dedup_key_unique",
        asyncpg.UniqueViolationError,
        "INSERT INTO outbox (type, data, dedup_key) VALUES ('grant.created', '{{}}', 'k'), "
        "('grant.created', '{{}}', 'k')",
    ),
    # alerts and webhooks
    (
        "account_alerts_low_balance_count",
        asyncpg.CheckViolationError,
        "INSERT INTO account_alerts (account_id, low_balance) "
        "VALUES ({acc}, ARRAY[1,2,3,4,5,6,7,8,9,10,11]::bigint[])",
    ),
    (
        "account_alerts_low_balance_positive",
        asyncpg.CheckViolationError,
        "INSERT INTO account_alerts (account_id, low_balance) "
        "VALUES ({acc}, ARRAY[5, 0]::bigint[])",
    ),
    (
        "account_alerts_expiring_range",
        asyncpg.CheckViolationError,
        "INSERT INTO account_alerts (account_id, expiring_within_days) VALUES ({acc}, 91)",
    ),
    (
        "webhooks_url_length",
        asyncpg.CheckViolationError,
        _NEW_WEBHOOK % ("''", "ARRAY['grant.created']", "NULL"),
    ),
    (
        "webhooks_events_valid",
        asyncpg.CheckViolationError,
        _NEW_WEBHOOK % ("'https://x.example'", "ARRAY['balance.high']", "NULL"),
    ),
    (
        "webhooks_description_length",
        asyncpg.CheckViolationError,
        _NEW_WEBHOOK % ("'https://x.example'", "ARRAY['grant.created']", "repeat('d', 501)"),
    ),
    (
        "webhook_deliveries_event_key",
        asyncpg.UniqueViolationError,
        _WITH_DELIVERY % ("'pending'", "0", "NULL") + ", ('pending', 0, NULL)) " + _NEW_DELIVERIES,
    ),
    (
        "webhook_deliveries_status_valid",
        asyncpg.CheckViolationError,
        _WITH_DELIVERY % ("'sent'", "0", "now()") + ") " + _NEW_DELIVERIES,
    ),
    (
        "webhook_deliveries_completed_when_done",
        asyncpg.CheckViolationError,
        _WITH_DELIVERY % ("'delivered'", "0", "NULL") + ") " + _NEW_DELIVERIES,
    ),
    (
        "webhook_deliveries_attempts_nonnegative",
        asyncpg.CheckViolationError,
        _WITH_DELIVERY % ("'pending'", "-1", "NULL") + ") " + _NEW_DELIVERIES,
    ),
    (
        "webhook_attempts_attempt_positive",
        asyncpg.CheckViolationError,
        _WITH_DELIVERY % ("'pending'", "0", "NULL")
        + "), d AS ("
        + _NEW_DELIVERIES
        + " RETURNING id) "
        "INSERT INTO webhook_attempts (delivery_id, attempt, replica, started_at) "
        "SELECT id, 0, 'r', now() FROM d",
    ),
    # approvals (issue 16)
    (
        "approvals_kind_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO approvals (id, kind, request, requested_by, requested_at) "
        "VALUES (gen_random_uuid(), 'transfer', '{{}}', 'a', now())",
    ),
    (
        "approvals_status_valid",
        asyncpg.CheckViolationError,
        "INSERT INTO approvals (id, kind, request, requested_by, requested_at, status, decided_by,"
        " decided_at) VALUES (gen_random_uuid(), 'grant', '{{}}', 'a', now(), 'maybe', 'b', now())",
    ),
    (
        "approvals_decided",
        asyncpg.CheckViolationError,
        "INSERT INTO approvals (id, kind, request, requested_by, requested_at, status) "
        "VALUES (gen_random_uuid(), 'grant', '{{}}', 'a', now(), 'approved')",
    ),
    (
        "approvals_four_eyes",
        asyncpg.CheckViolationError,
        "INSERT INTO approvals (id, kind, request, requested_by, requested_at, status, decided_by,"
        " decided_at) VALUES (gen_random_uuid(), 'grant', '{{}}', 'a', now(), 'approved', 'a',"
        " now())",
    ),
    (
        "approvals_dedup_key_unique",
        asyncpg.UniqueViolationError,
        "INSERT INTO approvals (id, kind, request, requested_by, requested_at, dedup_key) "
        "VALUES (gen_random_uuid(), 'grant', '{{}}', 'a', now(), 'k'), "
        "(gen_random_uuid(), 'grant', '{{}}', 'a', now(), 'k')",
    ),
    # audit checkpoints: a check has an instant, the chain a row (seq and hash), never both
    (
        "audit_checkpoints_one_mark",
        asyncpg.CheckViolationError,
        "INSERT INTO audit_checkpoints (check_name, verified_to, chain_seq, chain_hash) "
        "VALUES ('audit_1_unbalanced', now(), 1, sha256('h'))",
    ),
    # report tag keys: a tag name as group_by takes it (no comma, no surrounding spaces)
    (
        "report_tag_keys_name_format",
        asyncpg.CheckViolationError,
        "INSERT INTO report_tag_keys (name) VALUES ('team,project')",
    ),
]


@pytest.mark.parametrize(
    ("constraint", "error", "statement"), CONSTRAINT_CASES, ids=[c[0] for c in CONSTRAINT_CASES]
)
async def test_constraint_fires(
    db: asyncpg.Connection,
    world: World,
    constraint: str,
    error: type[asyncpg.PostgresError],
    statement: str,
) -> None:
    """The named constraint refuses a row that breaks it, and nothing is written."""
    before = await db.fetchval("SELECT count(*) FROM transactions")
    with pytest.raises(error) as exc:
        await db.execute(_sql(statement, world))
    assert exc.value.constraint_name == constraint
    assert await db.fetchval("SELECT count(*) FROM transactions") == before


async def test_every_named_constraint_has_a_case(db: asyncpg.Connection) -> None:
    """Every CHECK and UNIQUE constraint in the schema is covered by a case above, so a new one
    needs a test."""
    rows = await db.fetch(
        "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = 'public' AND c.contype IN ('c', 'u')"
    )
    in_schema = {r["conname"] for r in rows}
    covered = {c[0] for c in CONSTRAINT_CASES}
    assert in_schema == covered


async def test_format_checks_use_no_counted_repetition(db: asyncpg.Connection) -> None:
    """A CHECK runs on every insert and update of its row, and PostgreSQL's regex engine
    expands a counted repetition such as {1,255} into that many copies of its states: the
    Idempotency-Key check written so cost about 50 µs per row, twice per request. Format
    checks bound the length apart and use an unbounded pattern (schema.sql, "Tables")."""
    rows = await db.fetch(
        "SELECT conname, pg_get_constraintdef(c.oid) AS def FROM pg_constraint c "
        "JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = 'public' AND c.contype = 'c'"
    )
    counted = {
        r["conname"]: r["def"]
        for r in rows
        if re.search(r"~.*\{\d*,?\d{2,}\}", r["def"])  # {n,mm} or {mm}: 10 copies or more
    }
    assert counted == {}


async def test_format_checks_accept_the_longest_allowed_values(
    db: asyncpg.Connection, world: World
) -> None:
    """The length bounds are the old patterns' bounds: a 255-character key and a
    64-character reference still pass."""
    await db.execute(
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
        "VALUES ('c', repeat('~', 255), '\\x00', 200, 'null')"
    )
    await db.execute(
        "INSERT INTO accounts (address, type, ref) "
        "VALUES ('department:' || repeat('a', 64), 'department', repeat('a', 64))"
    )


async def test_idempotency_key_is_unique_per_caller(db: asyncpg.Connection, world: World) -> None:
    """One (caller, key) row at most: a second record for the same key is refused (invariant 6)."""
    insert = (
        "INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body) "
        "VALUES ($1, 'k-1', '\\x00', 201, 'null')"
    )
    await db.execute(insert, "alice")
    await db.execute(insert, "bob")  # another caller may use the same key
    with pytest.raises(asyncpg.UniqueViolationError) as exc:
        await db.execute(insert, "alice")
    assert exc.value.constraint_name == "idempotency_keys_pkey"


# ---------------------------------------------------------------------------
# Triggers
# ---------------------------------------------------------------------------

# (trigger, table, statement): UPDATE, DELETE and TRUNCATE of append-only rows.
IMMUTABLE_CASES: list[tuple[str, str, str]] = [
    (
        "transactions_immutable",
        "transactions",
        "UPDATE transactions SET memo = 'changed' WHERE id = '{txn}'",
    ),
    ("transactions_immutable", "transactions", "DELETE FROM transactions WHERE id = '{debit}'"),
    # transactions is referenced by other tables, so only a CASCADE reaches its trigger.
    ("transactions_no_truncate", "transactions", "TRUNCATE transactions CASCADE"),
    (
        "entries_immutable",
        "entries",
        "UPDATE entries SET amount = amount + 1 WHERE transaction_id = '{txn}'",
    ),
    ("entries_immutable", "entries", "DELETE FROM entries WHERE transaction_id = '{debit}'"),
    ("entries_no_truncate", "entries", "TRUNCATE entries"),
    (
        "lot_movements_immutable",
        "lot_movements",
        "UPDATE lot_movements SET amount = amount + 1 WHERE lot_id = '{lot}'",
    ),
    (
        "lot_movements_immutable",
        "lot_movements",
        "DELETE FROM lot_movements WHERE transaction_id = '{debit}'",
    ),
    ("lot_movements_no_truncate", "lot_movements", "TRUNCATE lot_movements"),
    ("chain_immutable", "chain", "UPDATE chain SET chain_hash = sha256('forged') WHERE seq = 1"),
    ("chain_immutable", "chain", "DELETE FROM chain WHERE seq = 1"),
    ("chain_no_truncate", "chain", "TRUNCATE chain"),
    (
        "reservation_holds_immutable",
        "reservation_holds",
        "UPDATE reservation_holds SET amount = 1 WHERE reservation_id = '{active}'",
    ),
    (
        "reservation_holds_immutable",
        "reservation_holds",
        "DELETE FROM reservation_holds WHERE reservation_id = '{resolved}'",
    ),
]

_SNAPSHOT = (
    "SELECT (SELECT count(*) FROM transactions), (SELECT sum(amount) FROM entries), "
    "(SELECT count(*) FROM entries), (SELECT sum(amount) FROM lot_movements), "
    "(SELECT count(*) FROM lot_movements), (SELECT memo FROM transactions WHERE id = $1), "
    "(SELECT array_agg(chain_hash ORDER BY seq) FROM chain), "
    "(SELECT array_agg(amount ORDER BY reservation_id) FROM reservation_holds)"
)


@pytest.mark.parametrize(
    ("trigger", "table", "statement"),
    IMMUTABLE_CASES,
    ids=[c[2].split(" WHERE")[0] for c in IMMUTABLE_CASES],
)
async def test_journal_is_append_only(
    db: asyncpg.Connection, world: World, trigger: str, table: str, statement: str
) -> None:
    """UPDATE, DELETE and TRUNCATE on append-only tables raise TLE01 journal_immutable and change
    nothing."""
    before = await db.fetchrow(_SNAPSHOT, world.grant_txn)
    with pytest.raises(asyncpg.PostgresError) as exc:
        await db.execute(_sql(statement, world))
    assert exc.value.sqlstate == "TLE01"
    assert exc.value.message == "journal_immutable"
    op = statement.split()[0]
    assert str(exc.value.detail).startswith(f"{op} on {table} ")
    assert await db.fetchrow(_SNAPSHOT, world.grant_txn) == before
    # The same statement goes through once that trigger is disabled: it is the trigger that refused
    # it.
    await db.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
    if op == "TRUNCATE" or (op, table) == ("DELETE", "transactions"):
        # Other tables' triggers and foreign keys would refuse it too.
        await db.execute("SET session_replication_role = replica")
    await db.execute(_sql(statement, world))
    assert await db.fetchrow(_SNAPSHOT, world.grant_txn) != before


RESOLVED_CHANGES = {
    "reopen": "status = 'active', resolved_at = NULL",
    "capture_after_release": (
        "status = 'captured', captured = 5, capture_transaction_id = '{debit}'"
    ),
    "move_resolved_at": "resolved_at = resolved_at + interval '1 second'",
}


@pytest.mark.parametrize("change", list(RESOLVED_CHANGES.values()), ids=list(RESOLVED_CHANGES))
async def test_resolved_reservation_cannot_change(
    db: asyncpg.Connection, world: World, change: str
) -> None:
    """A reservation that is captured, released or expired never changes its resolution again
    (TLE03, invariant 5)."""
    # (the statements are this file's own constants)
    sql = _sql(f"UPDATE reservations SET {change} WHERE id = '{{resolved}}'", world)  # noqa: S608
    with pytest.raises(asyncpg.PostgresError) as exc:
        await db.execute(sql)
    assert exc.value.sqlstate == "TLE03"
    assert exc.value.message == "reservation_already_resolved"
    row = await db.fetchrow(
        "SELECT status, captured FROM reservations WHERE id = $1", world.res_resolved
    )
    assert row is not None and tuple(row) == ("released", None)


async def test_active_reservation_resolves_once(db: asyncpg.Connection, world: World) -> None:
    """An active reservation may be extended and then resolved, once; a second resolution raises
    TLE03."""
    await db.execute(
        "UPDATE reservations SET expires_at = expires_at + interval '1 hour' WHERE id = $1",
        world.res_active,
    )
    await db.execute(
        "UPDATE reservations SET status = 'expired', resolved_at = now() WHERE id = $1",
        world.res_active,
    )
    with pytest.raises(asyncpg.PostgresError) as exc:
        await db.execute(
            "UPDATE reservations SET status = 'released', resolved_at = now() WHERE id = $1",
            world.res_active,
        )
    assert exc.value.sqlstate == "TLE03"
    # Fields outside the resolution (metadata) may still be written.
    await db.execute(
        "UPDATE reservations SET metadata = '{\"note\": 1}' WHERE id = $1", world.res_active
    )


async def test_every_trigger_has_a_case(db: asyncpg.Connection) -> None:
    """Every trigger in the schema is covered by a test here, so a new one needs a test."""
    rows = await db.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
    covered = {c[0] for c in IMMUTABLE_CASES}
    covered.add("entries_balanced")  # test_unbalanced_transaction_fails_at_commit
    covered.add("entries_balanced_reset")  # test_leg_added_after_an_early_check_is_checked_again
    # test_usage_event_naming_a_missing_account_or_price_is_refused
    covered |= {"usage_events_refs", "usage_events_refs_update"}
    covered.add("reservations_resolve_once")  # test_resolved_reservation_cannot_change
    # tests/api/test_prices.py::test_prices_are_append_only
    covered |= {"prices_immutable", "prices_no_truncate"}
    covered.add(
        "api_keys_changed"
    )  # tests/api/test_key_cache.py::test_key_changes_notify_and_use_does_not
    # tests/api/test_policy.py::test_member_joining_a_department_is_bound_by_its_policy
    covered |= {"employees_policy_rebind", "accounts_policy_bind", "accounts_policy_links"}
    # tests/api/test_webhooks.py: test_balance_low_fires_once_per_crossing_and_rearms and
    # test_grant_reservation_and_program_events
    covered |= {
        "accounts_balance_low",
        "lots_grant_created",
        "reservations_expired_event",
        "program_runs_completed_event",
    }
    # tests/api/test_balance_at_settled.py::test_a_spent_lot_is_settled_and_a_reversal_unsettles_it
    covered.add("lots_unsettle")
    # tests/api/test_spend_rollups.py::test_rollups_equal_the_journal_and_their_rebuild
    covered.add("entries_spend_rollup")
    assert {r["tgname"] for r in rows} == covered


async def _insert_transaction(conn: asyncpg.Connection) -> uuid.UUID:
    txn = uuid.uuid4()
    await conn.execute(
        "INSERT INTO transactions (id, kind, created_at) VALUES ($1, 'debit', now())", txn
    )
    return txn


async def _insert_entry(
    conn: asyncpg.Connection, txn: uuid.UUID, account: int, amount: int, asset: str, version: int
) -> None:
    await conn.execute(
        "INSERT INTO entries (transaction_id, account_id, asset, amount, balance_after, version, "
        "created_at) "
        "VALUES ($1, $2, $3, $4, 0, $5, now())",
        txn,
        account,
        asset,
        amount,
        version,
    )


# Legs (account key, amount, asset) of transactions that must not commit.
UNBALANCED_CASES = {
    "single_entry": [("acc", 5, "CREDIT")],
    "single_entry_on_a_system_account": [("usage", -5, "CREDIT")],
    "two_entries_not_summing_to_zero": [("acc", -5, "CREDIT"), ("usage", 3, "CREDIT")],
    "zero_sum_across_assets_only": [("acc", -5, "CREDIT"), ("usage", 5, "USD")],
}


@pytest.mark.parametrize("legs", list(UNBALANCED_CASES.values()), ids=list(UNBALANCED_CASES))
async def test_unbalanced_transaction_fails_at_commit(
    db: asyncpg.Connection, world: World, legs: list[tuple[str, int, str]]
) -> None:
    """A transaction whose entries do not sum to zero per asset, or has a single entry, is refused
    at COMMIT with TLE02."""
    ids = {"acc": world.acc, "usage": world.usage}
    txn = None
    with pytest.raises(asyncpg.PostgresError) as exc:
        async with db.transaction():
            txn = await _insert_transaction(db)
            for n, (who, amount, asset) in enumerate(legs):
                # Each statement is accepted: the check is deferred to COMMIT.
                await _insert_entry(db, txn, ids[who], amount, asset, 1000 + n)
    assert txn is not None, "the inserts themselves must succeed; only COMMIT fails"
    assert exc.value.sqlstate == "TLE02"
    assert exc.value.message == "transaction_unbalanced"
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE id = $1", txn) == 0
    assert await db.fetchval("SELECT count(*) FROM entries WHERE transaction_id = $1", txn) == 0


async def test_leg_added_after_an_early_check_is_checked_again(
    db: asyncpg.Connection, world: World
) -> None:
    """tl_check_balanced checks a transaction once for all its legs and remembers it; a leg
    inserted after a check that SET CONSTRAINTS ... IMMEDIATE ran early makes it forget
    (entries_balanced_reset), so the leg is checked at COMMIT all the same."""
    with pytest.raises(asyncpg.PostgresError) as exc:
        async with db.transaction():
            txn = await _insert_transaction(db)
            await _insert_entry(db, txn, world.acc, -5, "CREDIT", 1000)
            await _insert_entry(db, txn, world.usage, 5, "CREDIT", 1000)
            await db.execute("SET CONSTRAINTS entries_balanced IMMEDIATE")  # balanced: passes
            await db.execute("SET CONSTRAINTS entries_balanced DEFERRED")
            await _insert_entry(db, txn, world.acc, -1, "CREDIT", 1001)
    assert exc.value.sqlstate == "TLE02"
    assert await db.fetchval("SELECT count(*) FROM transactions WHERE id = $1", txn) == 0


async def test_balance_check_reads_each_transaction_once(
    db: asyncpg.Connection, world: World
) -> None:
    """Two legs of one transaction inserted together cost one check at COMMIT, not two (the
    second event finds the transaction just checked)."""
    await db.execute("SELECT pg_stat_reset()")
    async with db.transaction():
        txn = await _insert_transaction(db)
        await db.execute(
            "INSERT INTO entries (transaction_id, account_id, asset, amount, balance_after, "
            "version, created_at) VALUES ($1, $2, 'CREDIT', -5, 0, 1000, now()), "
            "($1, $3, 'CREDIT', 5, 0, 1000, now())",
            txn,
            world.acc,
            world.usage,
        )
        scans_before = await _entries_index_scans(db)
    assert await _entries_index_scans(db) - scans_before == 1


async def _entries_index_scans(db: asyncpg.Connection) -> int:
    await db.execute("SELECT pg_stat_force_next_flush()")
    return int(
        await db.fetchval(
            "SELECT idx_scan FROM pg_stat_user_indexes "
            "WHERE indexrelname = 'entries_transaction_idx'"
        )
    )


async def test_balanced_transaction_commits(db: asyncpg.Connection, world: World) -> None:
    """The deferred balance trigger lets a two-leg, zero-sum transaction commit (so the failures
    above are specific)."""
    async with db.transaction():
        txn = await _insert_transaction(db)
        await _insert_entry(db, txn, world.acc, -5, "CREDIT", 1000)
        await _insert_entry(db, txn, world.usage, 5, "CREDIT", 1000)
    assert await db.fetchval("SELECT count(*) FROM entries WHERE transaction_id = $1", txn) == 2


async def test_entry_added_later_to_a_committed_transaction_is_refused(
    db: asyncpg.Connection, world: World
) -> None:
    """Appending one more leg to an already balanced transaction unbalances it and fails at
    COMMIT."""
    with pytest.raises(asyncpg.PostgresError) as exc:
        await _insert_entry(db, world.debit_txn, world.acc, -1, "CREDIT", 1000)
    assert exc.value.sqlstate == "TLE02"
    assert (
        await db.fetchval("SELECT count(*) FROM entries WHERE transaction_id = $1", world.debit_txn)
        == 2
    )


# ---------------------------------------------------------------------------
# Applying the schema again
# ---------------------------------------------------------------------------


async def _state(conn: asyncpg.Connection) -> dict[str, Any]:
    tables = [
        r["tablename"]
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
    ]
    # why: table names come from pg_tables, not from input
    counts = {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}  # noqa: S608
    triggers = await conn.fetch(
        "SELECT tgrelid::regclass::text AS tbl, tgname, tgenabled, pg_get_triggerdef(oid) AS def "
        "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2"
    )
    constraints = await conn.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(c.oid) AS def "
        "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = 'public' ORDER BY 1, 2"
    )
    shards = await conn.fetch(
        "SELECT account_id, shard, posted, version FROM account_shards ORDER BY 1, 2"
    )
    accounts = await conn.fetch(
        "SELECT id, address, posted, version, shard_count FROM accounts ORDER BY id"
    )
    return {
        "counts": counts,
        "triggers": [tuple(r) for r in triggers],
        "constraints": [tuple(r) for r in constraints],
        "shards": [tuple(r) for r in shards],
        "accounts": [tuple(r) for r in accounts],
        "versions": [
            tuple(r) for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        ],
    }


async def test_schema_apply_is_idempotent(database_url: str, world: World) -> None:
    """Applying schema.sql twice more (`migrate --reapply`, the repeatable step) on a database with
    data changes no row, trigger, constraint or version."""
    conn = await service_db.connect(database_url)
    try:
        before = await _state(conn)
        assert before["counts"]["entries"] == 4 and before["counts"]["transactions"] == 2
        assert (await migrate.migrate(conn, reapply=True)).applied == ["schema.sql"]
        assert (await migrate.migrate(conn, reapply=True)).applied == ["schema.sql"]
        after = await _state(conn)
        assert after == before
        assert (await migrate.status(conn)).current
    finally:
        await conn.close()


async def test_emit_writes_an_event_once_per_dedup_key(db: asyncpg.Connection) -> None:
    """tl_emit answers the new event's id, then NULL for the same dedup key, so "once per crossing"
    holds even when two transactions race to emit it."""
    first = await db.fetchval("SELECT tl_emit('balance.low', '{\"x\": 1}', 'acct:1:low:100')")
    again = await db.fetchval("SELECT tl_emit('balance.low', '{\"x\": 2}', 'acct:1:low:100')")
    free = await db.fetchval("SELECT tl_emit('grant.created', '{}')")
    assert first.startswith("evt_") and len(first) == 36
    assert again is None
    assert free.startswith("evt_") and free != first
    rows = await db.fetch("SELECT type, data::text AS data FROM outbox ORDER BY seq")
    assert [(r["type"], r["data"]) for r in rows] == [
        ("balance.low", '{"x": 1}'),
        ("grant.created", "{}"),
    ]


@pytest.mark.parametrize(
    ("column", "value"),
    [("account_id", "999999"), ("price_id", "'00000000-0000-0000-0000-00000000dead'")],
)
async def test_usage_event_naming_a_missing_account_or_price_is_refused(
    db: asyncpg.Connection, world: World, column: str, value: str
) -> None:
    """A usage event's account and price must exist. They are checked once per statement, set-based
    (usage_events_refs), not by a foreign key's per-row trigger: in a batch of 500 events the three
    per-row checks cost about a quarter of PostgreSQL's CPU. The event, the statement and nothing
    else are refused, with the SQLSTATE a foreign key gives."""
    good = await db.fetchval(
        "INSERT INTO prices (id, model, tier, effective_from, input_per_mtok, "
        "cached_input_per_mtok, output_per_mtok, source) VALUES (gen_random_uuid(), 'um', "
        "'standard', '2020-01-01Z', 1, 1, 1, 'test') RETURNING id"
    )
    row = {"account_id": str(world.acc), "price_id": f"'{good}'"}
    insert = (
        "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, "
        "input_tokens, cached_input_tokens, output_tokens, cost, occurred_at, recorded_at, "
        "transaction_id, result) SELECT gen_random_uuid(), 's', 'e' || g, {account_id}, 'um', "
        "{price_id}, 1, 0, 1, 1, now(), now(), '" + str(world.debit_txn) + "', '{{}}' "
        "FROM generate_series(1, 3) g"
    )
    await db.execute(insert.format(**row))  # three good events pass
    bad = dict(row, **{column: value})
    with pytest.raises(asyncpg.ForeignKeyViolationError) as exc:
        await db.execute(insert.format(**bad).replace("'e' || g", "'bad' || g"))
    assert column in str(exc.value)
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE event_id LIKE 'bad%'") == 0
    assert await db.fetchval("SELECT count(*) FROM usage_events WHERE source = 's'") == 3
    # An update that names a missing one is refused too (usage_events_refs_update); one that
    # leaves them alone is not.
    with pytest.raises(asyncpg.ForeignKeyViolationError) as exc:
        await db.execute(
            f"UPDATE usage_events SET {column} = {value} WHERE event_id = 'e1'"  # noqa: S608  # why: the test's own constants
        )
    assert column in str(exc.value)
    await db.execute("UPDATE usage_events SET shortfall = 0 WHERE source = 's'")
