-- tokenledger schema.
--
-- This file is the whole current schema, and applying it again is a no-op:
-- tables use IF NOT EXISTS, functions CREATE OR REPLACE, triggers are dropped
-- and re-created. `tokenledger migrate` (service/migrate.py) applies it to an
-- empty database, and to an existing one after the pending versioned
-- migrations of service/migrations/, whenever its content changed. A change
-- to an existing table (a column, a constraint, a dropped index, a back-fill)
-- also needs a migration file: README, "Schema migrations". The migrator's
-- own tables, schema_migrations and schema_applied, are in
-- service/sql/migrate.sql.
--
-- Conventions
--   * Amounts are BIGINT credits. A transaction's entries sum to zero.
--   * Balance-critical writes are PL/pgSQL functions (tl_op_*) called once per
--     request: rows are locked in one global order (idempotency key, then
--     account rows by ascending id, then system-account shard rows by
--     ascending account id), and nothing leaves the database until commit.
--   * Errors raised here carry their own SQLSTATE in class TL (TLAxx = 404,
--     TLBxx = 409, TLCxx = 422, TLDxx = 400); service/errors.py maps them.
--     MESSAGE is the stable error code, DETAIL the human text, HINT a JSON
--     object of machine-readable extras.
--
-- Contents. The tables of the ledger proper (accounts, journal, lots,
-- reservations, idempotency keys) are all in section 1: the functions of
-- sections 2 and 3 use each other's row types. Order matters below: a
-- LANGUAGE sql body is checked when it is created, so what it reads comes
-- first.
--
--  1. Accounts and the journal
--       tables:    departments, employees, accounts, account_shards,
--                 transactions, entries, lots, lot_movements, reservations,
--                 reservation_holds, idempotency_keys, employee_departments.
--       functions: tl_forbid_change, tl_reservation_resolves_once,
--                 tl_check_balanced, tl_check_balanced_reset, tl_uuid7,
--                 tl_uuid7_floor, tl_ts, tl_public_id, tl_raise, tl_now,
--                 tl_shard, tl_account_id, tl_require_account, tl_lock,
--                 tl_require_open, tl_new_transaction, tl_post_entry,
--                 tl_parse_public_id, tl_transaction_json, tl_entry_json,
--                 tl_account_json,
--                 tl_department_json, tl_employee_json, tl_op_put_department,
--                 tl_op_put_employee, tl_record_department, tl_department_at,
--                 tl_rehire.
--
--  2. Lots and expiry
--       functions: tl_move_lot, tl_new_lot, tl_expire_due, tl_return_voided,
--                 tl_expire_lots, tl_spendable, tl_consume, tl_lot_json,
--                 tl_roll_over, tl_rollover_pending, tl_op_grant, tl_op_debit,
--                 tl_op_transfer, tl_void_lots, tl_funders, tl_op_void_lot,
--                 tl_op_reverse, tl_op_offboard.
--
--  3. Reservations
--       functions: tl_release_holds, tl_reservation_json, tl_may_act_on,
--                 tl_lock_reservation, tl_op_reserve, tl_op_capture,
--                 tl_op_release, tl_op_extend.
--       views:     tl_reserved_mismatches.
--
--  4. Prices and usage
--       tables:    prices, usage_events.
--       functions: tl_price_at, tl_price_json, tl_usage_cost, tl_op_add_price,
--                 tl_usage_refs_exist, tl_usage_events_refs,
--                 tl_usage_event_refs, tl_usage_json, tl_usage_differs,
--                 tl_usage_duplicate, tl_usage_prepare, tl_usage_settle,
--                 tl_record_usage, tl_usage_batch_prepare, tl_usage_batch_claim,
--                 tl_usage_batch_answer, tl_usage_batch_sums, tl_usage_batch_totals,
--                 tl_usage_batch_rows, tl_usage_batch_key_cap, tl_usage_batch_fit,
--                 tl_usage_batch_charge, tl_usage_batch_settle,
--                 tl_record_usage_batch.
--
--  5. The entry point
--       functions: tl_estimate, tl_batch_fast, tl_debit_fast, tl_execute_batch,
--                 tl_dispatch, tl_execute, tl_grant_batch, tl_post_entries.
--
--  6. Roll-ups
--       tables:    usage_daily, usage_monthly, usage_monthly_models,
--                 usage_daily_models, spend_daily, spend_monthly,
--                 spend_rollup_builds, lot_settled, lot_settle_progress.
--       functions: tl_usage_rollup_sums, tl_usage_rollup_many, tl_usage_rollup,
--                 tl_usage_rollup_events, tl_spend_rollup, tl_spend_rollup_rebuild,
--                 tl_lot_unsettled, tl_settle_lots, tl_balance_at,
--                 tl_settled_lot_problem, tl_report_periods.
--
--  7. Grant programs
--       tables:    grant_programs, program_runs, program_grants.
--       functions: tl_cycle_bounds, tl_cycle_at, tl_cycle_add,
--                 tl_program_first_cycle, tl_program_last_cycle,
--                 tl_in_audience, tl_cycle_json, tl_program_json,
--                 tl_program_run_json, tl_op_put_program, tl_program_cycle,
--                 tl_program_classify, tl_program_fund, tl_program_post,
--                 tl_program_record, tl_program_run, tl_program_onboard,
--                 tl_programs_due.
--
--  8. Spend policy
--       tables:    spend_policies, policy_spend.
--       functions: tl_window_start, tl_window_end, tl_policy_department,
--                 tl_policies_of, tl_policy_limits, tl_journal_spend,
--                 tl_policy_spend_row, tl_policy_total,
--                 tl_limit_exceeded_json, tl_limit_exceeded,
--                 tl_policy_batch_links, tl_policy_count, tl_policy_room,
--                 tl_models_allow, tl_model_allowed, tl_require_model,
--                 tl_usage_cover, tl_policy_rebind, tl_employee_rebind,
--                 tl_account_bind, tl_policy_spent_now, tl_policy_json,
--                 tl_op_put_policy, tl_policy_debit, tl_policy_reserve.
--
--  9. Outbox, alerts and webhooks
--       tables:    outbox, account_alerts, webhooks, webhook_deliveries,
--                 webhook_attempts.
--       functions: tl_emit, tl_low_alert_bounds, tl_balance_low,
--                 tl_alerts_json, tl_put_alerts, tl_grants_created,
--                 tl_reservation_expired, tl_program_run_completed,
--                 tl_emit_expiring, tl_webhook_json, tl_delivery_json,
--                 tl_op_create_webhook, tl_delete_webhook,
--                 tl_op_retry_delivery, tl_webhook_fanout, tl_webhook_claim,
--                 tl_webhook_record.
--
-- 10. Approvals and imports
--       tables:    approvals.
--       functions: tl_approval_json, tl_op_request_approval, tl_lock_approval,
--                 tl_op_approve, tl_op_reject, tl_approval_set_result,
--                 tl_import_employees, tl_import_grants.
--
-- 11. Authentication
--       tables:    api_keys, key_spend.
--       functions: tl_authenticate_key, tl_api_keys_changed, tl_key_lock,
--                 tl_key_rate_limited_json, tl_key_charge, tl_key_in_scope,
--                 tl_key_scope_json, tl_require_key_scope.
--
-- 12. Tamper evidence
--       tables:    chain.
--       functions: tl_canonical_many, tl_canonical, tl_chain_pending.
--
-- 13. Background work, statistics and retention
--       tables:    audit_checkpoints, usage_events_archive.
--       functions: tl_sweep_expired, tl_purge_idempotency_keys,
--                 tl_archive_usage_events, tl_analyze_grown.
--
-- 14. Grants to the app role
--
-- 14b. The usage export (employee, model and project in answer order)
--       indexes:   accounts_employee_ref_idx.
--       functions: tl_csv_key, tl_bigint_sum (an aggregate), tl_usage_export.
--
-- 15. Seed rows and back-fills

SET client_min_messages = warning;

-- ===========================================================================
-- 1. Accounts and the journal: the ledger's tables, append-only and balanced
-- triggers, helpers, JSON shapes, directory
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------

-- Format checks are written as a length bound plus an unbounded pattern
-- (`length(x) <= 64 AND x ~ '^[a-z0-9][a-z0-9._-]*$'`), never as a counted
-- repetition (`{0,63}`): PostgreSQL's regex engine expands a counted
-- repetition into that many copies of its states, and such a check cost
-- about 50 µs per row where the form below costs 1 to 4. A CHECK runs on
-- every insert and every update of the row, whichever columns change (an
-- Idempotency-Key is checked when claimed and again when completed; an
-- account on each debit). tests/db/test_constraints.py keeps it so.

CREATE TABLE IF NOT EXISTS departments (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    parent     text REFERENCES departments (id),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT departments_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$'),
    CONSTRAINT departments_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT departments_not_own_parent CHECK (parent IS DISTINCT FROM id)
);

CREATE TABLE IF NOT EXISTS employees (
    id            text PRIMARY KEY,
    name          text NOT NULL,
    email         text NOT NULL,
    department    text NOT NULL REFERENCES departments (id),
    status        text NOT NULL DEFAULT 'active',
    offboarded_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT employees_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$'),
    CONSTRAINT employees_name_length CHECK (length(name) BETWEEN 1 AND 200),
    CONSTRAINT employees_email_format CHECK (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 320),
    CONSTRAINT employees_status_valid CHECK (status IN ('active', 'offboarded')),
    CONSTRAINT employees_offboarded_at_set CHECK ((status = 'offboarded') = (offboarded_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS employees_department_idx ON employees (department);

-- Directory search (GET /v1/employees?q=): prefixes of id, name and email,
-- case-insensitive, each answered by a btree index in byte order.
CREATE INDEX IF NOT EXISTS employees_id_search_idx ON employees ((id COLLATE "C"));
CREATE INDEX IF NOT EXISTS employees_name_search_idx ON employees ((lower(name) COLLATE "C"));
CREATE INDEX IF NOT EXISTS employees_email_search_idx ON employees ((lower(email) COLLATE "C"));
CREATE INDEX IF NOT EXISTS employees_status_idx ON employees (status, id);

-- An account is a balance with an address. Wallets (employee:*) and
-- department budgets (department:*) hold lots and are bounded below by
-- -overdraft_limit. System accounts are unbounded and, because nearly every
-- operation touches one of them, keep their balance in shard rows
-- (account_shards) instead of the account row: see README "System accounts".
CREATE TABLE IF NOT EXISTS accounts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address         text NOT NULL,
    type            text NOT NULL,
    ref             text NOT NULL,
    asset           text NOT NULL DEFAULT 'CREDIT',
    posted          bigint NOT NULL DEFAULT 0,
    reserved        bigint NOT NULL DEFAULT 0,
    version         bigint NOT NULL DEFAULT 0,
    overdraft_limit bigint NOT NULL DEFAULT 0,
    shard_count     integer NOT NULL DEFAULT 1,
    status          text NOT NULL DEFAULT 'open',
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Whether a spend policy binds the account, its own or its department's
    -- ("Spend policy").
    policy_bound    boolean NOT NULL DEFAULT false,
    -- The thresholds around an account's available balance, denormalised onto
    -- its row so the trigger's WHEN is two integer comparisons: low_alert_armed
    -- is the highest threshold below the balance (reaching it fires), and
    -- low_alert_rearm the lowest threshold at or above it (rising past it
    -- re-arms). Both NULL for accounts without thresholds ("Alerts and webhooks").
    low_alert_armed bigint,
    low_alert_rearm bigint,
    CONSTRAINT accounts_address_key UNIQUE (address),
    CONSTRAINT accounts_type_valid CHECK (type IN ('employee', 'department', 'system')),
    CONSTRAINT accounts_address_matches CHECK (address = type || ':' || ref),
    CONSTRAINT accounts_ref_format CHECK (length(ref) <= 64 AND ref ~ '^[a-z0-9][a-z0-9._-]*$'),
    CONSTRAINT accounts_status_valid CHECK (status IN ('open', 'closed')),
    CONSTRAINT accounts_reserved_nonnegative CHECK (reserved >= 0),
    CONSTRAINT accounts_overdraft_nonnegative CHECK (overdraft_limit >= 0),
    -- Invariant 3, as a backstop: the functions check first and answer
    -- insufficient_credits; this firing means a bug.
    CONSTRAINT accounts_available_within_limit
        CHECK (type = 'system' OR posted - reserved >= -overdraft_limit),
    CONSTRAINT accounts_shards_only_system CHECK (shard_count BETWEEN 1 AND 256 AND (shard_count = 1 OR type = 'system')),
    CONSTRAINT accounts_sharded_row_unused CHECK (shard_count = 1 OR (posted = 0 AND version = 0)),
    -- Every balance stays within ±2^62 (BALANCE_LIMIT): amounts are at most
    -- 2^53, so no sum of two balances, or of a balance and an amount, can
    -- overflow a bigint. A write that would pass it fails whole and answers
    -- 409 balance_limit_exceeded (service/errors.py translates by name).
    CONSTRAINT accounts_posted_within_limit
        CHECK (posted BETWEEN -4611686018427387904 AND 4611686018427387904)
);

-- The few system accounts: every write locks their shard rows (tl_lock).
CREATE INDEX IF NOT EXISTS accounts_system_idx ON accounts (id) WHERE type = 'system';

CREATE TABLE IF NOT EXISTS account_shards (
    account_id bigint NOT NULL REFERENCES accounts (id),
    shard      integer NOT NULL,
    posted     bigint NOT NULL DEFAULT 0,
    version    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, shard),
    CONSTRAINT account_shards_shard_nonnegative CHECK (shard >= 0),
    CONSTRAINT account_shards_posted_within_limit
        CHECK (posted BETWEEN -4611686018427387904 AND 4611686018427387904)
);

CREATE TABLE IF NOT EXISTS transactions (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL,
    memo       text,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    details    jsonb NOT NULL DEFAULT '{}'::jsonb,
    actor      text,
    request_id text,
    reverses   uuid REFERENCES transactions (id),
    created_at timestamptz NOT NULL,
    CONSTRAINT transactions_kind_valid CHECK (kind IN
        ('grant', 'debit', 'usage', 'transfer', 'capture', 'expiry', 'void', 'reversal', 'rollover')),
    -- A transaction is reversed at most once.
    CONSTRAINT transactions_reverses_key UNIQUE (reverses),
    CONSTRAINT transactions_reversal_has_target CHECK ((kind = 'reversal') = (reverses IS NOT NULL)),
    CONSTRAINT transactions_metadata_object CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX IF NOT EXISTS transactions_kind_idx ON transactions (kind, id DESC);
-- The usage transactions that overdrew their account (spend policy's
-- overdraft_limit): a routine audit sums them per account (invariant 4,
-- audit_4_lots_cover_posted) without reading every usage transaction. Few
-- rows; a write that is not one only evaluates the predicate.
CREATE INDEX IF NOT EXISTS transactions_overdraft_idx ON transactions (id)
    WHERE kind = 'usage' AND details ? 'overdraft';
-- The chainer reads transactions in (created_at, id) order from just below
-- the head, so a pass costs the same at ten rows or ten million.
CREATE INDEX IF NOT EXISTS transactions_created_idx ON transactions (created_at, id);

-- Finance reports (liability, compensation) read the transactions that are
-- not spend by time; spend (usage, debits, captures: the hot path) is left
-- out of the index, so writing it costs nothing more.
CREATE INDEX IF NOT EXISTS transactions_ledger_time_idx ON transactions (created_at)
    WHERE kind NOT IN ('usage', 'debit', 'capture');
-- Usage reports count debits and captures (issue 16, reports2).
-- GET /v1/reports/usage counts debits and captures by amount beside the usage
-- events; it reads the period's transactions of those kinds by this partial
-- index (transactions_ledger_time_idx leaves spend out). Usage events, the
-- bulk of the hot path, do not enter it; a debit or capture pays one more
-- small index insert (measured in the README, Reports). It includes the id,
-- so a report without a model, project or tag key reads only the index and
-- the entries.
CREATE INDEX IF NOT EXISTS transactions_spend_time_idx ON transactions (created_at) INCLUDE (id)
    WHERE kind IN ('debit', 'capture');

CREATE TABLE IF NOT EXISTS entries (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id uuid NOT NULL REFERENCES transactions (id),
    account_id     bigint NOT NULL REFERENCES accounts (id),
    shard          integer NOT NULL DEFAULT 0,
    asset          text NOT NULL,
    amount         bigint NOT NULL,
    balance_after  bigint NOT NULL,
    version        bigint NOT NULL,
    created_at     timestamptz NOT NULL,
    CONSTRAINT entries_amount_nonzero CHECK (amount <> 0),
    CONSTRAINT entries_version_positive CHECK (version > 0),
    -- Versions of an account (or of one shard of a system account) never repeat.
    CONSTRAINT entries_account_version_key UNIQUE (account_id, shard, version)
);
CREATE INDEX IF NOT EXISTS entries_account_idx ON entries (account_id, id DESC);
CREATE INDEX IF NOT EXISTS entries_account_time_idx ON entries (account_id, shard, created_at DESC, version DESC);
CREATE INDEX IF NOT EXISTS entries_transaction_idx ON entries (transaction_id);

-- A lot is a block of credits in a lot-holding account (wallet or
-- department). remaining changes only together with a lot_movements row, so
-- remaining = sum(movements) always (invariant 4, checked by audit).
CREATE TABLE IF NOT EXISTS lots (
    id                   uuid PRIMARY KEY,
    account_id           bigint NOT NULL REFERENCES accounts (id),
    amount               bigint NOT NULL,
    remaining            bigint NOT NULL,
    reserved             bigint NOT NULL DEFAULT 0,
    priority             integer NOT NULL DEFAULT 100,
    effective_at         timestamptz NOT NULL,
    expires_at           timestamptz,
    grant_transaction_id uuid NOT NULL REFERENCES transactions (id),
    funded_by            bigint NOT NULL REFERENCES accounts (id),
    source_lot_id        uuid REFERENCES lots (id),
    status               text NOT NULL DEFAULT 'active',
    created_at           timestamptz NOT NULL,
    -- live says whether a lot still holds credits (remaining > 0). It is a
    -- column of its own so that the partial indexes below name it and not
    -- remaining: a debit, a reservation or a capture changes remaining and
    -- reserved, and while those appear in no index that update is HOT (no
    -- new entry in any of the lots' indexes, and room for it on the page,
    -- which fillfactor keeps); it stops being HOT only when live flips, once
    -- in a lot's life. With remaining in the predicates, none was (every
    -- debit added an entry to each lots index, dead ones piling up until
    -- vacuum).
    live                 boolean GENERATED ALWAYS AS (remaining > 0) STORED,
    -- A grant-program lot can roll over (tl_roll_over): at expires_at up to
    -- rollover_max of its free credits move to a new lot expiring at
    -- rollover_until; rolled_at records that it happened (once).
    rollover_max         bigint,
    rollover_until       timestamptz,
    rolled_at            timestamptz,
    CONSTRAINT lots_amount_positive CHECK (amount > 0),
    CONSTRAINT lots_remaining_within_amount CHECK (remaining BETWEEN 0 AND amount),
    CONSTRAINT lots_reserved_within_remaining CHECK (reserved BETWEEN 0 AND remaining),
    CONSTRAINT lots_priority_range CHECK (priority BETWEEN 0 AND 1000),
    CONSTRAINT lots_expiry_after_start CHECK (expires_at IS NULL OR expires_at > effective_at),
    CONSTRAINT lots_status_valid CHECK (status IN ('active', 'voided'))
) WITH (fillfactor = 80);
-- Consumption order (DESIGN.md): priority, expires_at NULLS LAST, effective_at, id.
CREATE INDEX IF NOT EXISTS lots_live_consumption_idx ON lots
    (account_id, priority, expires_at NULLS LAST, effective_at, id)
    WHERE status = 'active' AND live;
CREATE INDEX IF NOT EXISTS lots_live_due_idx ON lots (expires_at)
    WHERE status = 'active' AND live AND expires_at IS NOT NULL;
-- Voided lots still holding credits (for a reservation that may release them).
CREATE INDEX IF NOT EXISTS lots_voided_live_idx ON lots (account_id)
    WHERE status = 'voided' AND live;
-- Queries on an account's live lots say `live` as well as
-- `remaining > reserved`: the planner cannot infer the first from the second,
-- and without it these partial indexes do not apply (every write and read
-- would scan all lots).
-- Every write to a wallet looks for its lots due to roll over: a small index
-- of just those, so the look-up never scans the account's other lots.
CREATE INDEX IF NOT EXISTS lots_rollover_due_idx ON lots (account_id, expires_at)
    WHERE rollover_max IS NOT NULL AND rolled_at IS NULL;

-- An as-of balance (tl_balance_at, every point of a series) subtracts what
-- the account's lots had expired by then: all its lots, spent or not, which
-- no partial index of lots holds. Without this, every point of a 30-day
-- series read the whole lots table (a million rows in a year). Written once
-- per lot: account_id and expires_at never change, so the debits' updates
-- of remaining and reserved stay HOT.
CREATE INDEX IF NOT EXISTS lots_account_expires_idx ON lots (account_id, expires_at);

-- A transaction may move one lot more than once (a capture draws on a lot's
-- hold and then on its free credits), so movements have an id of their own.
CREATE TABLE IF NOT EXISTS lot_movements (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id uuid NOT NULL REFERENCES transactions (id),
    lot_id         uuid NOT NULL REFERENCES lots (id),
    amount         bigint NOT NULL,
    CONSTRAINT lot_movements_amount_nonzero CHECK (amount <> 0)
);
CREATE INDEX IF NOT EXISTS lot_movements_lot_idx ON lot_movements (lot_id);
CREATE INDEX IF NOT EXISTS lot_movements_transaction_idx ON lot_movements (transaction_id);

-- A reservation holds credits of a wallet: its holds earmark lots (lot.reserved)
-- in consumption order at the moment it is made. It resolves once: captured,
-- released or expired (a trigger refuses any change after that).
CREATE TABLE IF NOT EXISTS reservations (
    id                     uuid PRIMARY KEY,
    account_id             bigint NOT NULL REFERENCES accounts (id),
    amount                 bigint NOT NULL,
    captured               bigint,
    status                 text NOT NULL DEFAULT 'active',
    expires_at             timestamptz NOT NULL,
    metadata               jsonb NOT NULL DEFAULT '{}'::jsonb,
    details                jsonb NOT NULL DEFAULT '{}'::jsonb,
    capture_transaction_id uuid REFERENCES transactions (id),
    actor                  text,
    request_id             text,
    created_at             timestamptz NOT NULL,
    resolved_at            timestamptz,
    CONSTRAINT reservations_amount_positive CHECK (amount > 0),
    CONSTRAINT reservations_status_valid CHECK (status IN ('active', 'captured', 'released', 'expired')),
    CONSTRAINT reservations_resolved_when_not_active CHECK ((status = 'active') = (resolved_at IS NULL)),
    CONSTRAINT reservations_capture_recorded
        CHECK ((status = 'captured') = (captured IS NOT NULL AND capture_transaction_id IS NOT NULL)),
    CONSTRAINT reservations_captured_positive CHECK (captured IS NULL OR captured > 0),
    -- Invariant 5: one capture transaction captures one reservation.
    CONSTRAINT reservations_capture_transaction_key UNIQUE (capture_transaction_id)
);
CREATE INDEX IF NOT EXISTS reservations_account_idx ON reservations (account_id, id DESC);
CREATE INDEX IF NOT EXISTS reservations_due_idx ON reservations (expires_at) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS reservations_created_idx ON reservations (created_at);

CREATE TABLE IF NOT EXISTS reservation_holds (
    reservation_id uuid NOT NULL REFERENCES reservations (id),
    lot_id         uuid NOT NULL REFERENCES lots (id),
    amount         bigint NOT NULL,
    PRIMARY KEY (reservation_id, lot_id),
    CONSTRAINT reservation_holds_amount_positive CHECK (amount > 0)
);
CREATE INDEX IF NOT EXISTS reservation_holds_lot_idx ON reservation_holds (lot_id);

-- Idempotency records live in the same database transaction as the effect
-- (STYLE.md habit 3). status_code 0 never survives a commit: the row is
-- inserted and completed by tl_execute in one transaction.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    caller       text NOT NULL,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    status_code  integer NOT NULL,
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key),
    CONSTRAINT idempotency_keys_key_format CHECK (length(key) <= 255 AND key ~ '^[\x20-\x7e]+$')
-- A key row is inserted small (status 0, body null) and completed in the
-- same transaction with the answer, several times its size. Pages filled to
-- a tenth by the inserts leave room for those updates on the same page, so
-- they are HOT (no new index entries; about three in four were not at the
-- default 100), and the pages end up about as full as they would anyway.
) WITH (fillfactor = 10);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_idx ON idempotency_keys (created_at);

-- ---------------------------------------------------------------------------
-- Triggers: the journal is append-only (invariant 7) and balanced (invariant 1)
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION tl_forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'TLE01',
        MESSAGE = 'journal_immutable',
        DETAIL = format('%s on %s is not allowed: the journal is append-only; correct with a reversal',
                        TG_OP, TG_TABLE_NAME);
END $$;

DROP TRIGGER IF EXISTS transactions_immutable ON transactions;
CREATE TRIGGER transactions_immutable BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS transactions_no_truncate ON transactions;
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS entries_immutable ON entries;
CREATE TRIGGER entries_immutable BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS entries_no_truncate ON entries;
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS lot_movements_immutable ON lot_movements;
CREATE TRIGGER lot_movements_immutable BEFORE UPDATE OR DELETE ON lot_movements
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS lot_movements_no_truncate ON lot_movements;
CREATE TRIGGER lot_movements_no_truncate BEFORE TRUNCATE ON lot_movements
    FOR EACH STATEMENT EXECUTE FUNCTION tl_forbid_change();

-- Invariant 5: a reservation is resolved at most once.
CREATE OR REPLACE FUNCTION tl_reservation_resolves_once() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'active' AND (NEW.status, NEW.captured, NEW.capture_transaction_id, NEW.resolved_at)
            IS DISTINCT FROM (OLD.status, OLD.captured, OLD.capture_transaction_id, OLD.resolved_at) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'TLE03',
            MESSAGE = 'reservation_already_resolved',
            DETAIL = format('reservation %s is %s; it cannot change again', OLD.id, OLD.status);
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS reservations_resolve_once ON reservations;
CREATE TRIGGER reservations_resolve_once BEFORE UPDATE ON reservations
    FOR EACH ROW EXECUTE FUNCTION tl_reservation_resolves_once();
DROP TRIGGER IF EXISTS reservation_holds_immutable ON reservation_holds;
CREATE TRIGGER reservation_holds_immutable BEFORE UPDATE OR DELETE ON reservation_holds
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();

-- Checked at commit, once per entry row: the entries of the row's
-- transaction sum to zero per asset and there are at least two.
--
-- A transaction's legs are checked once, not once per leg: the check reads
-- all of them, so the event of the next leg of the same transaction, which
-- fires right after it (legs are inserted together), has nothing left to
-- find. The transaction last found balanced is remembered in a setting of
-- this database transaction (`tl.balanced`), which every INSERT into
-- entries clears (entries_balanced_reset, once per statement): a leg added
-- after a check that SET CONSTRAINTS ... IMMEDIATE ran early is checked
-- again at commit. This halved what the check cost a coalesced debit.
CREATE OR REPLACE FUNCTION tl_check_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_bad text;
    v_count integer;
BEGIN
    IF current_setting('tl.balanced', true) = NEW.transaction_id::text THEN
        RETURN NULL;
    END IF;
    SELECT sum(g.n), min(g.asset) FILTER (WHERE g.total <> 0) INTO v_count, v_bad
      FROM (SELECT asset, count(*) AS n, sum(amount) AS total
              FROM entries WHERE transaction_id = NEW.transaction_id GROUP BY asset) g;
    IF v_bad IS NOT NULL OR coalesce(v_count, 0) < 2 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'TLE02',
            MESSAGE = 'transaction_unbalanced',
            DETAIL = format('transaction %s: entries do not sum to zero per asset (asset %s, %s entries)',
                            NEW.transaction_id, coalesce(v_bad, '-'), coalesce(v_count, 0));
    END IF;
    PERFORM set_config('tl.balanced', NEW.transaction_id::text, true);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS entries_balanced ON entries;
CREATE CONSTRAINT TRIGGER entries_balanced AFTER INSERT ON entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION tl_check_balanced();

-- Forgets the transaction tl_check_balanced last found balanced: rows
-- inserted since may belong to it.
CREATE OR REPLACE FUNCTION tl_check_balanced_reset() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('tl.balanced', '', true);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS entries_balanced_reset ON entries;
CREATE TRIGGER entries_balanced_reset AFTER INSERT ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION tl_check_balanced_reset();

-- ---------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------

-- A time-ordered UUID (version 7 layout) so that ids sort roughly by
-- creation without any global sequence.
CREATE OR REPLACE FUNCTION tl_uuid7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- The least uuid7 of an instant: rows keyed by tl_uuid7() made at or after
-- p have ids >= it, so a range of the primary key finds them (the audit's
-- routine checks of usage events).
CREATE OR REPLACE FUNCTION tl_uuid7_floor(p timestamptz) RETURNS uuid
LANGUAGE sql STABLE AS $$
    SELECT encode(substring(int8send(floor(extract(epoch FROM p) * 1000)::bigint) FROM 3)
                  || '\x00000000000000000000'::bytea, 'hex')::uuid
$$;

-- STABLE, as to_char() is (it reads the locale): PostgreSQL inlines a SQL
-- function into the statement that calls it only when the function claims
-- no more than its body is, and a call that is not inlined plans the body
-- anew in each statement that calls it and runs it once per row.
CREATE OR REPLACE FUNCTION tl_ts(p timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(p AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

CREATE OR REPLACE FUNCTION tl_public_id(p_prefix text, p uuid) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p IS NULL THEN NULL ELSE p_prefix || replace(p::text, '-', '') END
$$;

CREATE OR REPLACE FUNCTION tl_raise(p_state text, p_code text, p_detail text, p_extra jsonb DEFAULT '{}'::jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_state, MESSAGE = p_code, DETAIL = p_detail, HINT = p_extra::text;
END $$;

-- The operation's clock: the caller's injected time (tests) or the wall
-- clock read after the row locks are held, so that within one account
-- created_at never runs backwards against version.
CREATE OR REPLACE FUNCTION tl_now(p_ctx jsonb) RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce((p_ctx ->> 'now')::timestamptz, clock_timestamp())
$$;

-- The shard of a system account this transaction writes to: the one
-- tl_lock chose and locked (kept in the transaction-local setting
-- tl.shard), or before any lock the backend's own.
CREATE OR REPLACE FUNCTION tl_shard(p_shard_count integer) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('tl.shard', true), '')::integer, pg_backend_pid()) % p_shard_count
$$;

CREATE OR REPLACE FUNCTION tl_account_id(p_address text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM accounts WHERE address = p_address
$$;

-- Resolves an address or raises the right not-found code for its type.
CREATE OR REPLACE FUNCTION tl_require_account(p_address text) RETURNS accounts
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v accounts;
BEGIN
    SELECT * INTO v FROM accounts WHERE address = p_address;
    IF NOT FOUND THEN
        IF p_address LIKE 'employee:%' THEN
            PERFORM tl_raise('TLA02', 'employee_not_found', format('no employee %s', substr(p_address, 10)),
                             jsonb_build_object('employee', substr(p_address, 10)));
        ELSIF p_address LIKE 'department:%' THEN
            PERFORM tl_raise('TLA03', 'department_not_found', format('no department %s', substr(p_address, 12)),
                             jsonb_build_object('department', substr(p_address, 12)));
        END IF;
        PERFORM tl_raise('TLA01', 'account_not_found', format('no account %s', p_address),
                         jsonb_build_object('account', p_address));
    END IF;
    RETURN v;
END $$;

-- Locks the given non-system accounts in ascending id order (the global
-- lock order), then shard rows of the system accounts, also in ascending
-- account id order, after them.
--
-- The first time in a transaction, it chooses the shard index: the first
-- index, counting from the backend's own, whose system:issuance shard no
-- one holds (SKIP LOCKED never waits), and locks that index of every system
-- account, whichever p_system names. Every writer holds all three rows of
-- its index, so two transactions never meet on a system shard while free
-- ones exist; a coalesced batch, which holds its locks longer than a single
-- operation, never waits behind another on one. Later calls in the
-- transaction (and tl_shard) use the same index.
CREATE OR REPLACE FUNCTION tl_lock(p_accounts bigint[], p_system text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_shard integer;
BEGIN
    -- NO KEY UPDATE: it excludes every other writer of the row but not the
    -- KEY SHARE locks that inserts referencing the account take (a usage
    -- event, a lot), so claiming such a row before locking cannot deadlock.
    -- The funders of the accounts' voided lots that still hold credits are
    -- locked with them, in the same order: any write to an account may give
    -- such credits back (tl_return_voided), and locking the funder only then
    -- took it out of order (a deadlock with a writer of the funder).
    PERFORM 1 FROM accounts
     WHERE id = ANY (p_accounts || ARRAY(SELECT l.funded_by FROM lots l
                                          WHERE l.account_id = ANY (p_accounts) AND l.status = 'voided'
                                            AND l.live))
       AND type <> 'system'
     ORDER BY id FOR NO KEY UPDATE;
    IF cardinality(p_system) = 0 THEN
        RETURN;
    END IF;
    IF nullif(current_setting('tl.shard', true), '') IS NULL THEN
        SELECT s.shard INTO v_shard FROM account_shards s
            WHERE s.account_id = (SELECT id FROM accounts WHERE address = 'system:issuance')
            ORDER BY (s.shard - pg_backend_pid() % 16 + 256) % 256
            LIMIT 1 FOR NO KEY UPDATE SKIP LOCKED;
        PERFORM set_config('tl.shard', coalesce(v_shard, pg_backend_pid() % 16)::text, true);
    END IF;
    PERFORM 1 FROM account_shards s JOIN accounts a ON a.id = s.account_id
        WHERE a.type = 'system' AND s.shard = tl_shard(a.shard_count)
        ORDER BY s.account_id FOR NO KEY UPDATE OF s;
END $$;

CREATE OR REPLACE FUNCTION tl_require_open(p accounts) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p.status <> 'open' THEN
        PERFORM tl_raise('TLB02', 'account_closed', format('account %s is closed', p.address),
                         jsonb_build_object('account', p.address));
    END IF;
END $$;

CREATE OR REPLACE FUNCTION tl_new_transaction(
    p_kind text, p_now timestamptz, p_ctx jsonb,
    p_memo text DEFAULT NULL, p_metadata jsonb DEFAULT '{}'::jsonb, p_details jsonb DEFAULT '{}'::jsonb,
    p_reverses uuid DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid := tl_uuid7();
BEGIN
    INSERT INTO transactions (id, kind, memo, metadata, details, actor, request_id, reverses, created_at)
    VALUES (v_id, p_kind, p_memo, coalesce(nullif(p_metadata, 'null'::jsonb), '{}'::jsonb),
            coalesce(nullif(p_details, 'null'::jsonb), '{}'::jsonb),
            p_ctx ->> 'actor', p_ctx ->> 'request_id', p_reverses, p_now);
    RETURN v_id;
END $$;

-- Applies one leg to an account's balance and journals it. The caller holds
-- the row lock (tl_lock). Sharded system accounts post to this backend's shard.
CREATE OR REPLACE FUNCTION tl_post_entry(p_txn uuid, p_account bigint, p_amount bigint, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_shard_count integer;
    v_asset text;
    v_shard integer := 0;
    v_posted bigint;
    v_version bigint;
BEGIN
    SELECT shard_count, asset INTO v_shard_count, v_asset FROM accounts WHERE id = p_account;
    IF v_shard_count > 1 THEN
        v_shard := tl_shard(v_shard_count);
        UPDATE account_shards SET posted = posted + p_amount, version = version + 1, updated_at = p_now
            WHERE account_id = p_account AND shard = v_shard
            RETURNING posted, version INTO v_posted, v_version;
    ELSE
        UPDATE accounts SET posted = posted + p_amount, version = version + 1, updated_at = p_now
            WHERE id = p_account
            RETURNING posted, version INTO v_posted, v_version;
    END IF;
    INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
    VALUES (p_txn, p_account, v_shard, v_asset, p_amount, v_posted, v_version, p_now);
END $$;

CREATE OR REPLACE FUNCTION tl_parse_public_id(p text) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT substring(p FROM position('_' IN p) + 1)::uuid
$$;

-- ---------------------------------------------------------------------------
-- JSON shapes of the resources (one place, so a replay is byte-identical)
-- ---------------------------------------------------------------------------

-- PL/pgSQL returning one SELECT, not a SQL function: it cannot be inlined
-- (it reads tables), and a SQL function that is not inlined was planned
-- again at every call, three times what the call then did (a reserve or
-- capture batch answers with it and tl_reservation_json per item: about
-- 190 -> 65 us a call, tests/db/test_plans.py). PL/pgSQL keeps the plan
-- for the session, so the plan must not depend on who called first: a
-- plan made for a page read (sequential scans allowed) on a fresh table's
-- statistics scanned the whole table at every later call, the hot path's
-- included, until the next ANALYZE. Hence its own enable_seqscan = off.
CREATE OR REPLACE FUNCTION tl_transaction_json(p_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'id', tl_public_id('txn_', t.id),
        'kind', t.kind,
        'entries', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'account', a.address, 'amount', e.amount, 'balance_after', e.balance_after,
                       'version', e.version, 'asset', e.asset) ORDER BY e.id)
            FROM entries e JOIN accounts a ON a.id = e.account_id
            WHERE e.transaction_id = t.id), '[]'::jsonb),
        'lots', coalesce((
            SELECT jsonb_agg(jsonb_build_object('lot_id', tl_public_id('lot_', m.lot_id), 'amount', m.amount)
                             ORDER BY m.lot_id)
            FROM lot_movements m WHERE m.transaction_id = t.id), '[]'::jsonb),
        'memo', t.memo,
        'metadata', t.metadata,
        'details', t.details,
        'actor', t.actor,
        'request_id', t.request_id,
        'reverses', tl_public_id('txn_', t.reverses),
        'reversed_by', (SELECT tl_public_id('txn_', r.id) FROM transactions r WHERE r.reverses = t.id),
        'created_at', tl_ts(t.created_at))
    FROM transactions t WHERE t.id = p_id);
END $$;

-- An item of an account's entries page (service/sql/accounts.sql), from
-- the entry and its transaction. Inlined into the calling statement (one
-- SELECT of an expression): its field selections become plain columns.
CREATE OR REPLACE FUNCTION tl_entry_json(e entries, t transactions) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'transaction_id', tl_public_id('txn_', e.transaction_id),
        'kind', t.kind,
        'amount', e.amount,
        'balance_after', e.balance_after,
        'version', e.version,
        'shard', e.shard,
        'created_at', tl_ts(e.created_at),
        'metadata', t.metadata)
$$;

-- The balance view at p_now. Lots that expired at or before p_now count as
-- expired even when no sweeper has written their expiry yet.
CREATE OR REPLACE FUNCTION tl_account_json(p_id bigint, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    a accounts;
    v_posted bigint;
    v_version bigint;
    v_updated timestamptz;
    v_due bigint := 0;
    v_pending bigint := 0;
    v_available bigint;
    v_reserved bigint;
    v_due_reserved bigint := 0;
    v_due_held bigint := 0;
    v_rolling bigint := 0;
    v_expiring jsonb := '[]'::jsonb;
BEGIN
    SELECT * INTO a FROM accounts WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF a.shard_count > 1 THEN
        SELECT coalesce(sum(posted), 0), coalesce(sum(version), 0), max(updated_at)
            INTO v_posted, v_version, v_updated FROM account_shards WHERE account_id = a.id;
    ELSE
        v_posted := a.posted; v_version := a.version; v_updated := a.updated_at;
    END IF;
    IF a.type <> 'system' THEN
        SELECT coalesce(sum(remaining - reserved) FILTER (WHERE expires_at <= p_now), 0),
               coalesce(sum(remaining - reserved) FILTER (WHERE effective_at > p_now
                                                          AND (expires_at IS NULL OR expires_at > p_now)), 0)
            INTO v_due, v_pending
            FROM lots WHERE account_id = a.id AND status = 'active' AND live AND remaining > reserved;
        -- Program lots past their cycle's end whose rollover is not written
        -- yet: the part that rolls over is still live, until rollover_until.
        SELECT coalesce(sum(tl_rollover_pending(l, p_now)), 0) INTO v_rolling FROM lots l
            WHERE l.account_id = a.id AND l.rollover_max IS NOT NULL AND l.rolled_at IS NULL
              AND l.status = 'active' AND l.expires_at <= p_now;
        SELECT coalesce(jsonb_agg(jsonb_build_object('amount', x.amount, 'expires_at', tl_ts(x.expires_at))
                                  ORDER BY x.expires_at), '[]'::jsonb)
            INTO v_expiring
            FROM (SELECT y.expires_at, sum(y.amount) AS amount FROM (
                      SELECT expires_at, remaining - reserved AS amount FROM lots
                      WHERE account_id = a.id AND status = 'active' AND live AND remaining > reserved
                        AND expires_at > p_now AND expires_at IS NOT NULL
                      UNION ALL
                      SELECT l.rollover_until, tl_rollover_pending(l, p_now) FROM lots l
                      WHERE v_rolling > 0 AND l.account_id = a.id AND l.rollover_max IS NOT NULL
                        AND l.rolled_at IS NULL AND l.status = 'active' AND l.expires_at <= p_now) y
                  WHERE y.amount > 0
                  GROUP BY y.expires_at ORDER BY y.expires_at LIMIT 50) x;
    END IF;
    -- Reservations past their expires_at hold nothing any more; what they
    -- held on lots that have expired has expired with them.
    SELECT coalesce(sum(r.amount), 0) INTO v_due_reserved FROM reservations r
        WHERE r.account_id = a.id AND r.status = 'active' AND r.expires_at <= p_now;
    IF v_due_reserved > 0 THEN
        SELECT coalesce(sum(h.amount), 0) INTO v_due_held FROM reservation_holds h
            JOIN reservations r ON r.id = h.reservation_id JOIN lots l ON l.id = h.lot_id
            WHERE r.account_id = a.id AND r.status = 'active' AND r.expires_at <= p_now
              AND l.status = 'active' AND l.expires_at <= p_now;
    END IF;
    v_posted := v_posted - v_due - v_due_held + v_rolling;
    v_reserved := a.reserved - v_due_reserved;
    v_available := v_posted - v_reserved - v_pending;
    RETURN jsonb_build_object(
        'address', a.address,
        'type', a.type,
        'asset', a.asset,
        'posted', v_posted,
        'reserved', v_reserved,
        'pending', v_pending,
        'available', CASE WHEN a.type = 'system' THEN NULL ELSE v_available END,
        'overdraft_limit', CASE WHEN a.type = 'system' THEN NULL ELSE a.overdraft_limit END,
        'status', a.status,
        'version', v_version,
        'expiring', v_expiring,
        'updated_at', tl_ts(v_updated));
END $$;

-- tl_balance_at, the posted balance as of an instant, is defined in the
-- section "Settled lots" near the end: it reads lot_settled, created there.

CREATE OR REPLACE FUNCTION tl_department_json(p_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', d.id, 'name', d.name, 'parent', d.parent,
                              'account', 'department:' || d.id,
                              'created_at', tl_ts(d.created_at), 'updated_at', tl_ts(d.updated_at))
    FROM departments d WHERE d.id = p_id
$$;

CREATE OR REPLACE FUNCTION tl_employee_json(p_id text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', e.id, 'name', e.name, 'email', e.email, 'department', e.department,
                              'status', e.status, 'offboarded_at', tl_ts(e.offboarded_at),
                              'created_at', tl_ts(e.created_at), 'updated_at', tl_ts(e.updated_at),
                              'wallet', tl_account_json(tl_account_id('employee:' || e.id), p_now))
    FROM employees e WHERE e.id = p_id
$$;

-- ---------------------------------------------------------------------------
-- Directory
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION tl_op_put_department(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id text := p_args ->> 'id';
    v_parent text := p_args ->> 'parent';
    v_created boolean;
BEGIN
    IF v_parent IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM departments WHERE id = v_parent) THEN
            PERFORM tl_raise('TLA03', 'department_not_found', format('parent department %s does not exist', v_parent),
                             jsonb_build_object('department', v_parent));
        END IF;
        -- Refuse a parent chain that leads back to this department.
        IF EXISTS (WITH RECURSIVE up(id, parent) AS (
                       SELECT id, parent FROM departments WHERE id = v_parent
                       UNION SELECT d.id, d.parent FROM departments d JOIN up ON d.id = up.parent)
                   SELECT 1 FROM up WHERE id = v_id) THEN
            PERFORM tl_raise('TLD01', 'invalid_request', format('parent %s would make a cycle', v_parent),
                             jsonb_build_object('path', '$.parent'));
        END IF;
    END IF;
    INSERT INTO departments (id, name, parent) VALUES (v_id, p_args ->> 'name', v_parent)
    ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, parent = EXCLUDED.parent, updated_at = clock_timestamp()
    RETURNING (xmax = 0) INTO v_created;
    INSERT INTO accounts (address, type, ref) VALUES ('department:' || v_id, 'department', v_id)
    ON CONFLICT (address) DO NOTHING;
    RETURN jsonb_build_object('created', v_created, 'body', tl_department_json(v_id));
END $$;

CREATE OR REPLACE FUNCTION tl_op_put_employee(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id text := p_args ->> 'id';
    v_dept text := p_args ->> 'department';
    v_created boolean;
    v_status text;
    v_old_dept text;
    v_runs jsonb := '[]'::jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM departments WHERE id = v_dept) THEN
        PERFORM tl_raise('TLA03', 'department_not_found', format('department %s does not exist', v_dept),
                         jsonb_build_object('department', v_dept));
    END IF;
    SELECT status, department INTO v_status, v_old_dept FROM employees WHERE id = v_id FOR UPDATE;
    -- An explicit status "active" re-hires an offboarded employee (tl_rehire);
    -- without it the closed wallet stays closed.
    IF v_status = 'offboarded' AND p_args ->> 'status' = 'active' THEN
        PERFORM tl_rehire(v_id, tl_now(p_ctx));
        v_old_dept := NULL;  -- joins the grant programs' audiences again
    ELSIF v_status = 'offboarded' THEN
        PERFORM tl_raise('TLB02', 'account_closed', format('employee %s was offboarded; their wallet is closed', v_id),
                         jsonb_build_object('account', 'employee:' || v_id));
    END IF;
    INSERT INTO employees (id, name, email, department) VALUES (v_id, p_args ->> 'name', p_args ->> 'email', v_dept)
    ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email,
                                   department = EXCLUDED.department, updated_at = clock_timestamp()
    RETURNING (xmax = 0) INTO v_created;
    INSERT INTO accounts (address, type, ref) VALUES ('employee:' || v_id, 'employee', v_id)
    ON CONFLICT (address) DO NOTHING;
    -- Reports attribute spend to the department of its time (employee_departments).
    PERFORM tl_record_department(v_id, v_dept, v_created, tl_now(p_ctx));
    -- Joining a grant program's audience mid-cycle grants that cycle at once.
    IF v_created OR v_old_dept IS DISTINCT FROM v_dept THEN
        v_runs := tl_program_onboard(v_id, p_ctx);
    END IF;
    RETURN jsonb_build_object('created', v_created, 'body', tl_employee_json(v_id, tl_now(p_ctx)),
                              'program_runs', v_runs);
END $$;

-- ---------------------------------------------------------------------------
-- Department history and re-hire (issue 16)
-- ---------------------------------------------------------------------------

-- The department an employee belonged to from `since` until the next row's
-- `since`. Reports join spend to it by time, so moving an employee does not
-- move their past spend. The first row of an employee starts at -infinity.
CREATE TABLE IF NOT EXISTS employee_departments (
    employee_id text NOT NULL REFERENCES employees (id),
    department  text NOT NULL REFERENCES departments (id),
    since       timestamptz NOT NULL,
    CONSTRAINT employee_departments_pkey PRIMARY KEY (employee_id, since)
);
-- Whether anyone moved department in a period (the efficiency report).
CREATE INDEX IF NOT EXISTS employee_departments_since_idx ON employee_departments (since);

-- Records a department change (or the first department) of an employee.
CREATE OR REPLACE FUNCTION tl_record_department(p_employee text, p_department text, p_created boolean,
                                                p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_created THEN
        INSERT INTO employee_departments (employee_id, department, since)
        VALUES (p_employee, p_department, '-infinity') ON CONFLICT DO NOTHING;
    ELSIF (SELECT h.department FROM employee_departments h WHERE h.employee_id = p_employee
           ORDER BY h.since DESC LIMIT 1) IS DISTINCT FROM p_department THEN
        INSERT INTO employee_departments (employee_id, department, since)
        VALUES (p_employee, p_department, p_now)
        ON CONFLICT ON CONSTRAINT employee_departments_pkey DO UPDATE SET department = EXCLUDED.department;
    END IF;
END $$;

-- The department of an employee at an instant.
CREATE OR REPLACE FUNCTION tl_department_at(p_employee text, p_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT h.department FROM employee_departments h
    WHERE h.employee_id = p_employee AND h.since <= p_at ORDER BY h.since DESC LIMIT 1
$$;

-- Re-hire: the wallet reopens as it was left at offboarding (empty: its
-- lots went back to their funders); its history stays. The caller holds the
-- employee row lock.
CREATE OR REPLACE FUNCTION tl_rehire(p_employee text, p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
BEGIN
    w := tl_require_account('employee:' || p_employee);
    PERFORM tl_lock(ARRAY[w.id], ARRAY[]::text[]);
    UPDATE accounts SET status = 'open', updated_at = p_now WHERE id = w.id;
    UPDATE employees SET status = 'active', offboarded_at = NULL, updated_at = p_now WHERE id = p_employee;
END $$;

-- ===========================================================================
-- 2. Lots and expiry: spending, expiring and rolling over lots; grants,
-- debits, transfers, voids, reversals, offboarding
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Lots: consumption, expiry, rollover
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION tl_move_lot(p_txn uuid, p_lot uuid, p_amount bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE lots SET remaining = remaining + p_amount WHERE id = p_lot;
    INSERT INTO lot_movements (transaction_id, lot_id, amount) VALUES (p_txn, p_lot, p_amount);
END $$;

CREATE OR REPLACE FUNCTION tl_new_lot(
    p_txn uuid, p_account bigint, p_amount bigint, p_priority integer, p_effective_at timestamptz,
    p_expires_at timestamptz, p_funded_by bigint, p_source_lot uuid, p_now timestamptz)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid := tl_uuid7();
BEGIN
    INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                      grant_transaction_id, funded_by, source_lot_id, created_at)
    VALUES (v_id, p_account, p_amount, 0, p_priority, p_effective_at, p_expires_at,
            p_txn, p_funded_by, p_source_lot, p_now);
    PERFORM tl_move_lot(p_txn, v_id, p_amount);
    RETURN v_id;
END $$;

-- Brings one locked lot-holding account up to p_now; every write that
-- touches a wallet calls this first (DESIGN.md, Expiry):
--   1. reservations whose expires_at has passed free their holds (they
--      expired at their own instant, whoever notices);
--   2. credits freed on voided lots go back to their funders;
--   3. due lots' unreserved remainder moves to system:expired in one
--      `expiry` transaction.
-- Returns the credits expired.
CREATE OR REPLACE FUNCTION tl_expire_due(p_account bigint, p_now timestamptz, p_ctx jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_res reservations;
BEGIN
    FOR v_res IN SELECT * FROM reservations
                 WHERE account_id = p_account AND status = 'active' AND expires_at <= p_now
                 ORDER BY id LOOP
        PERFORM tl_release_holds(v_res);
        UPDATE reservations SET status = 'expired', resolved_at = v_res.expires_at WHERE id = v_res.id;
    END LOOP;
    PERFORM tl_roll_over(p_account, p_now, p_ctx);
    PERFORM tl_return_voided(p_account, p_now, p_ctx);
    RETURN tl_expire_lots(p_account, p_now, p_ctx);
END $$;

-- Credits that a released hold freed on a voided lot follow the rest of the
-- lot back to its funder, in a `void` transaction.
CREATE OR REPLACE FUNCTION tl_return_voided(p_account bigint, p_now timestamptz, p_ctx jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_lots uuid[];
    v_txn uuid;
BEGIN
    SELECT array_agg(id) INTO v_lots FROM lots
        WHERE account_id = p_account AND status = 'voided' AND live AND remaining > reserved;
    IF v_lots IS NULL THEN
        RETURN;
    END IF;
    v_txn := tl_new_transaction('void', p_now, p_ctx, NULL, '{}'::jsonb,
                                jsonb_build_object('released_holds', true));
    PERFORM tl_void_lots(v_txn, (SELECT a FROM accounts a WHERE a.id = p_account), v_lots, p_now);
END $$;

-- Step 3 of tl_expire_due.
CREATE OR REPLACE FUNCTION tl_expire_lots(p_account bigint, p_now timestamptz, p_ctx jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint;
    v_txn uuid;
    v_lot record;
    v_count integer := 0;
BEGIN
    SELECT sum(remaining - reserved) INTO v_total FROM lots
        WHERE account_id = p_account AND status = 'active' AND live AND remaining > reserved
          AND expires_at <= p_now;
    IF v_total IS NULL OR v_total = 0 THEN
        RETURN 0;
    END IF;
    v_txn := tl_new_transaction('expiry', p_now, p_ctx);
    FOR v_lot IN
        SELECT id, remaining - reserved AS free FROM lots
        WHERE account_id = p_account AND status = 'active' AND live AND remaining > reserved AND expires_at <= p_now
        ORDER BY priority, expires_at NULLS LAST, effective_at, id
    LOOP
        PERFORM tl_move_lot(v_txn, v_lot.id, -v_lot.free);
        v_count := v_count + 1;
    END LOOP;
    PERFORM tl_post_entry(v_txn, p_account, -v_total, p_now);
    PERFORM tl_post_entry(v_txn, tl_account_id('system:expired'), v_total, p_now);
    RETURN v_total;
END $$;

-- Spendable credits of a lot-holding account at p_now: live lots' unreserved remainder.
CREATE OR REPLACE FUNCTION tl_spendable(p_account bigint, p_now timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(remaining - reserved), 0)::bigint FROM lots
    WHERE account_id = p_account AND status = 'active' AND live AND remaining > reserved
      AND effective_at <= p_now AND (expires_at IS NULL OR expires_at > p_now)
$$;

-- Takes p_amount from the live lots of a locked account in consumption order
-- and returns the pieces taken, so that a transfer can carry their expiry.
CREATE OR REPLACE FUNCTION tl_consume(p_txn uuid, p_account accounts, p_amount bigint, p_now timestamptz)
RETURNS TABLE (lot_id uuid, taken bigint, expires_at timestamptz, priority integer, funded_by bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_lot record;
    v_take bigint;
    v_available bigint;
BEGIN
    v_available := tl_spendable(p_account.id, p_now);
    IF v_available < p_amount THEN
        PERFORM tl_raise('TLB01', 'insufficient_credits',
            format('%s has %s credits available; %s requested', p_account.address, v_available, p_amount),
            jsonb_build_object('account', p_account.address, 'available', v_available, 'requested', p_amount));
    END IF;
    FOR v_lot IN
        SELECT l.id, l.remaining - l.reserved AS free, l.expires_at, l.priority, l.funded_by FROM lots l
        WHERE l.account_id = p_account.id AND l.status = 'active' AND l.live AND l.remaining > l.reserved
          AND l.effective_at <= p_now AND (l.expires_at IS NULL OR l.expires_at > p_now)
        ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
    LOOP
        v_take := least(v_lot.free, v_left);
        PERFORM tl_move_lot(p_txn, v_lot.id, -v_take);
        lot_id := v_lot.id; taken := v_take; expires_at := v_lot.expires_at;
        priority := v_lot.priority; funded_by := v_lot.funded_by;
        RETURN NEXT;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    ASSERT v_left = 0, 'tl_consume: spendable credits changed under a held lock';
END $$;
-- A lot as of p_at (default now): holds of reservations whose expires_at has
-- passed no longer count as reserved, sweeper or not.
CREATE OR REPLACE FUNCTION tl_lot_json(p_id uuid, p_at timestamptz DEFAULT NULL) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', tl_public_id('lot_', l.id),
        'account', a.address,
        'amount', l.amount,
        'remaining', l.remaining,
        'reserved', l.reserved - coalesce((
            SELECT sum(h.amount) FROM reservation_holds h JOIN reservations r ON r.id = h.reservation_id
            WHERE h.lot_id = l.id AND r.status = 'active'
              AND r.expires_at <= coalesce(p_at, clock_timestamp())), 0),
        'priority', l.priority,
        'effective_at', tl_ts(l.effective_at),
        'expires_at', tl_ts(l.expires_at),
        'status', l.status,
        'funded_by', f.address,
        'grant_transaction_id', tl_public_id('txn_', l.grant_transaction_id))
    FROM lots l JOIN accounts a ON a.id = l.account_id JOIN accounts f ON f.id = l.funded_by
    WHERE l.id = p_id
$$;

-- Rollover (called by tl_expire_due once due reservations are released): a
-- program lot that reached its cycle's end moves up to rollover_max of what
-- was unspent and unreserved at that instant into a new lot that expires at
-- the end of the next cycle, in a `rollover` transaction. The new lot never
-- rolls again; tl_expire_lots then expires the rest.
CREATE OR REPLACE FUNCTION tl_roll_over(p_account bigint, p_now timestamptz, p_ctx jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_lot lots;
    v_free bigint;
    v_roll bigint;
    v_txn uuid;
BEGIN
    FOR v_lot IN SELECT * FROM lots
                 WHERE account_id = p_account AND rollover_max IS NOT NULL AND rolled_at IS NULL
                   AND expires_at <= p_now
                 ORDER BY expires_at, id FOR UPDATE LOOP
        -- Holds of reservations that outlived the cycle's end were reserved
        -- at that instant, even if released since: they expire, not roll.
        v_free := v_lot.remaining - v_lot.reserved - coalesce((
            SELECT sum(h.amount) FROM reservation_holds h JOIN reservations r ON r.id = h.reservation_id
            WHERE h.lot_id = v_lot.id AND r.status = 'expired' AND r.expires_at > v_lot.expires_at), 0);
        v_roll := least(v_lot.rollover_max, greatest(v_free, 0));
        UPDATE lots SET rolled_at = p_now WHERE id = v_lot.id;
        IF v_roll > 0 AND v_lot.status = 'active' THEN
            v_txn := tl_new_transaction('rollover', p_now, p_ctx, NULL, '{}'::jsonb,
                                        jsonb_build_object('from_lot', tl_public_id('lot_', v_lot.id),
                                                           'rollover_max', v_lot.rollover_max));
            PERFORM tl_move_lot(v_txn, v_lot.id, -v_roll);
            PERFORM tl_new_lot(v_txn, p_account, v_roll, v_lot.priority, v_lot.expires_at, v_lot.rollover_until,
                               v_lot.funded_by, v_lot.id, p_now);
            PERFORM tl_post_entry(v_txn, p_account, -v_roll, p_now);
            PERFORM tl_post_entry(v_txn, p_account, v_roll, p_now);
        END IF;
    END LOOP;
END $$;

-- What a program lot past its cycle's end will roll over once written, as
-- of p_now: reads count it as live until the new lot exists.
CREATE OR REPLACE FUNCTION tl_rollover_pending(p_lot lots, p_now timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_lot.rollover_max IS NULL OR p_lot.rolled_at IS NOT NULL OR p_lot.status <> 'active'
                     OR p_lot.expires_at > p_now OR p_lot.rollover_until <= p_now THEN 0
                ELSE least(p_lot.rollover_max, greatest(0, p_lot.remaining - p_lot.reserved + coalesce((
                    SELECT sum(h.amount) FROM reservation_holds h JOIN reservations r ON r.id = h.reservation_id
                    WHERE h.lot_id = p_lot.id AND r.status = 'active' AND r.expires_at <= p_lot.expires_at), 0)
                  - coalesce((
                    SELECT sum(h.amount) FROM reservation_holds h JOIN reservations r ON r.id = h.reservation_id
                    WHERE h.lot_id = p_lot.id AND r.status = 'expired' AND r.expires_at > p_lot.expires_at), 0)))
           END::bigint
$$;

-- ---------------------------------------------------------------------------
-- Grants, debits, transfers, voids, reversals, offboarding
-- ---------------------------------------------------------------------------

-- Issues a grant: a new lot in the employee's wallet, funded by
-- system:issuance or by a department's own lots. A department-funded lot
-- never outlives the department credits it was made of.
CREATE OR REPLACE FUNCTION tl_op_grant(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    f accounts;
    v_amount bigint := (p_args ->> 'amount')::bigint;
    v_expires timestamptz := (p_args ->> 'expires_at')::timestamptz;
    v_effective timestamptz := (p_args ->> 'effective_at')::timestamptz;
    v_priority integer := coalesce((p_args ->> 'priority')::integer, 100);
    v_now timestamptz;
    v_txn uuid;
    v_lot uuid;
    v_min_expiry timestamptz;
BEGIN
    w := tl_require_account('employee:' || (p_args ->> 'employee'));
    f := tl_require_account(coalesce(p_args ->> 'funded_by', 'system:issuance'));
    IF f.type = 'system' AND f.address <> 'system:issuance' OR f.type = 'employee' THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('grants are funded by system:issuance or a department, not %s', f.address),
            jsonb_build_object('path', '$.funded_by'));
    END IF;
    PERFORM tl_lock(ARRAY[w.id, f.id], ARRAY['system:expired', f.address]);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = w.id;
    SELECT * INTO f FROM accounts WHERE id = f.id;
    PERFORM tl_require_open(w);
    PERFORM tl_require_open(f);
    IF w.asset <> f.asset THEN
        PERFORM tl_raise('TLB03', 'asset_mismatch', format('%s holds %s, %s holds %s', f.address, f.asset, w.address, w.asset),
                         jsonb_build_object('from_asset', f.asset, 'to_asset', w.asset));
    END IF;
    v_effective := coalesce(v_effective, v_now);
    IF v_expires IS NOT NULL AND v_expires <= greatest(v_effective, v_now) THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'expires_at must be later than now and than effective_at',
                         jsonb_build_object('path', '$.expires_at'));
    END IF;
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    v_txn := tl_new_transaction('grant', v_now, p_ctx, p_args ->> 'memo', coalesce(p_args -> 'metadata', '{}'::jsonb),
                                jsonb_build_object('reason', p_args ->> 'reason'));
    IF f.type <> 'system' THEN
        PERFORM tl_expire_due(f.id, v_now, p_ctx);
        SELECT min(c.expires_at) INTO v_min_expiry FROM tl_consume(v_txn, f, v_amount, v_now) c;
        IF v_min_expiry IS NOT NULL AND (v_expires IS NULL OR v_min_expiry < v_expires) THEN
            v_expires := v_min_expiry;
        END IF;
    END IF;
    v_lot := tl_new_lot(v_txn, w.id, v_amount, v_priority, v_effective, v_expires, f.id, NULL, v_now);
    PERFORM tl_post_entry(v_txn, f.id, -v_amount, v_now);
    PERFORM tl_post_entry(v_txn, w.id, v_amount, v_now);
    RETURN jsonb_build_object('transaction', tl_transaction_json(v_txn), 'lot', tl_lot_json(v_lot));
END $$;

CREATE OR REPLACE FUNCTION tl_op_debit(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_amount bigint := (p_args ->> 'amount')::bigint;
    v_now timestamptz;
    v_txn uuid;
BEGIN
    w := tl_require_account(p_args ->> 'account');
    IF w.type = 'system' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'debits draw on a wallet or a department account',
                         jsonb_build_object('path', '$.account'));
    END IF;
    IF p_ctx ? 'departments' THEN
        PERFORM tl_require_key_scope(w, p_ctx);  -- a key limited to departments
    END IF;
    PERFORM tl_lock(ARRAY[w.id], ARRAY['system:expired', 'system:usage']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = w.id;
    PERFORM tl_require_open(w);
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    IF w.policy_bound THEN
        PERFORM tl_policy_debit(w, v_amount, p_args -> 'metadata' ->> 'model', v_now);
    END IF;
    v_txn := tl_new_transaction('debit', v_now, p_ctx, p_args ->> 'memo', coalesce(p_args -> 'metadata', '{}'::jsonb));
    PERFORM 1 FROM tl_consume(v_txn, w, v_amount, v_now);
    PERFORM tl_post_entry(v_txn, w.id, -v_amount, v_now);
    PERFORM tl_post_entry(v_txn, tl_account_id('system:usage'), v_amount, v_now);
    IF p_ctx ? 'rate_limit' THEN
        PERFORM tl_key_charge(p_ctx, v_amount);  -- the key's spend rate cap, checked last
    END IF;
    RETURN tl_transaction_json(v_txn);
END $$;

-- Moves credits between lot-holding accounts (or to and from
-- system:issuance). Credits keep their expiry and priority: each consumed
-- piece becomes a lot of its own in the receiving account.
CREATE OR REPLACE FUNCTION tl_op_transfer(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    s accounts;
    d accounts;
    v_amount bigint := (p_args ->> 'amount')::bigint;
    v_now timestamptz;
    v_txn uuid;
    v_piece record;
BEGIN
    s := tl_require_account(p_args ->> 'from');
    d := tl_require_account(p_args ->> 'to');
    IF s.id = d.id THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'from and to are the same account',
                         jsonb_build_object('path', '$.to'));
    END IF;
    IF s.type = 'system' AND s.address <> 'system:issuance' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', format('%s cannot be transferred from', s.address),
                         jsonb_build_object('path', '$.from'));
    END IF;
    IF d.type = 'system' AND d.address <> 'system:issuance' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', format('%s cannot be transferred to', d.address),
                         jsonb_build_object('path', '$.to'));
    END IF;
    PERFORM tl_lock(ARRAY[s.id, d.id], ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO s FROM accounts WHERE id = s.id;
    SELECT * INTO d FROM accounts WHERE id = d.id;
    PERFORM tl_require_open(s);
    PERFORM tl_require_open(d);
    IF s.asset <> d.asset THEN
        PERFORM tl_raise('TLB03', 'asset_mismatch', format('%s holds %s, %s holds %s', s.address, s.asset, d.address, d.asset),
                         jsonb_build_object('from_asset', s.asset, 'to_asset', d.asset));
    END IF;
    IF s.type <> 'system' THEN PERFORM tl_expire_due(s.id, v_now, p_ctx); END IF;
    IF d.type <> 'system' THEN PERFORM tl_expire_due(d.id, v_now, p_ctx); END IF;
    v_txn := tl_new_transaction('transfer', v_now, p_ctx, p_args ->> 'memo', coalesce(p_args -> 'metadata', '{}'::jsonb));
    IF s.type = 'system' THEN
        IF d.type <> 'system' THEN
            PERFORM tl_new_lot(v_txn, d.id, v_amount, 100, v_now, NULL, s.id, NULL, v_now);
        END IF;
    ELSE
        FOR v_piece IN SELECT * FROM tl_consume(v_txn, s, v_amount, v_now) LOOP
            IF d.type <> 'system' THEN
                PERFORM tl_new_lot(v_txn, d.id, v_piece.taken, v_piece.priority, v_now, v_piece.expires_at,
                                   v_piece.funded_by, v_piece.lot_id, v_now);
            END IF;
        END LOOP;
    END IF;
    PERFORM tl_post_entry(v_txn, s.id, -v_amount, v_now);
    PERFORM tl_post_entry(v_txn, d.id, v_amount, v_now);
    RETURN tl_transaction_json(v_txn);
END $$;

-- Returns a lot's unspent, unreserved remainder to the account that funded
-- it (as a new lot with the same expiry when that is a department).
CREATE OR REPLACE FUNCTION tl_void_lots(p_txn uuid, p_account accounts, p_lots uuid[], p_now timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_lot record;
    v_total bigint := 0;
    v_funder accounts;
BEGIN
    FOR v_lot IN
        SELECT l.* FROM lots l
        WHERE l.id = ANY (p_lots) AND (l.status = 'active' OR l.remaining > l.reserved)
        ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
    LOOP
        UPDATE lots SET status = 'voided' WHERE id = v_lot.id;
        IF v_lot.remaining - v_lot.reserved > 0 THEN
            PERFORM tl_move_lot(p_txn, v_lot.id, -(v_lot.remaining - v_lot.reserved));
            IF v_lot.expires_at <= p_now THEN
                -- Credits of a lot that has already expired (kept alive only by
                -- a hold that has now let go) expire; they never go back.
                SELECT * INTO v_funder FROM accounts WHERE address = 'system:expired';
            ELSE
                SELECT * INTO v_funder FROM accounts WHERE id = v_lot.funded_by;
            END IF;
            IF v_funder.type <> 'system' THEN
                PERFORM tl_new_lot(p_txn, v_funder.id, v_lot.remaining - v_lot.reserved, v_lot.priority, p_now,
                                   v_lot.expires_at, v_funder.id, v_lot.id, p_now);
            END IF;
            PERFORM tl_post_entry(p_txn, v_funder.id, v_lot.remaining - v_lot.reserved, p_now);
            v_total := v_total + (v_lot.remaining - v_lot.reserved);
        END IF;
    END LOOP;
    IF v_total > 0 THEN
        PERFORM tl_post_entry(p_txn, p_account.id, -v_total, p_now);
    END IF;
    RETURN v_total;
END $$;

-- The accounts that funded the lots of an account that still hold credits,
-- voided ones (held by a reservation) included: they receive voided
-- remainders and so must be locked with it.
CREATE OR REPLACE FUNCTION tl_funders(p_account bigint) RETURNS bigint[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT funded_by), '{}') FROM lots
    WHERE account_id = p_account AND status IN ('active', 'voided') AND live
$$;

CREATE OR REPLACE FUNCTION tl_op_void_lot(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    l lots;
    w accounts;
    v_now timestamptz;
    v_txn uuid;
BEGIN
    SELECT * INTO l FROM lots WHERE id = (p_args ->> 'lot_id')::uuid;
    IF NOT FOUND THEN
        PERFORM tl_raise('TLA06', 'lot_not_found', format('no lot %s', p_args ->> 'lot'),
                         jsonb_build_object('lot', p_args ->> 'lot'));
    END IF;
    PERFORM tl_lock(ARRAY[l.account_id, l.funded_by], ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = l.account_id;
    PERFORM tl_require_open(w);
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    SELECT * INTO l FROM lots WHERE id = l.id;
    IF l.status <> 'active' OR l.remaining - l.reserved = 0 THEN
        PERFORM tl_raise('TLB05', 'lot_not_active',
            format('lot %s has nothing to void (status %s, %s remaining, %s reserved)',
                   p_args ->> 'lot', CASE WHEN l.status = 'active' AND l.expires_at <= v_now THEN 'expired' ELSE l.status END,
                   l.remaining, l.reserved),
            jsonb_build_object('lot', p_args ->> 'lot', 'status',
                CASE WHEN l.status = 'active' AND l.expires_at <= v_now THEN 'expired'
                     WHEN l.status = 'active' THEN 'depleted' ELSE l.status END));
    END IF;
    v_txn := tl_new_transaction('void', v_now, p_ctx, p_args ->> 'memo', '{}'::jsonb,
                                jsonb_build_object('lot_id', tl_public_id('lot_', l.id)));
    PERFORM tl_void_lots(v_txn, w, ARRAY[l.id], v_now);
    RETURN tl_transaction_json(v_txn);
END $$;

-- Reverses a grant, debit or transfer exactly: every entry and every lot
-- movement is negated, so consumed lots get their credits back. A restored
-- lot that has expired meanwhile expires again at once.
CREATE OR REPLACE FUNCTION tl_op_reverse(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    o transactions;
    v_accounts bigint[];
    v_system text[];
    v_now timestamptz;
    v_txn uuid;
    v_acc accounts;
    v_mv record;
    v_lot lots;
    v_e record;
BEGIN
    SELECT * INTO o FROM transactions WHERE id = (p_args ->> 'transaction_id')::uuid;
    IF NOT FOUND THEN
        PERFORM tl_raise('TLA04', 'transaction_not_found', format('no transaction %s', p_args ->> 'transaction'),
                         jsonb_build_object('transaction', p_args ->> 'transaction'));
    END IF;
    IF o.kind NOT IN ('grant', 'debit', 'transfer') THEN
        PERFORM tl_raise('TLD01', 'invalid_request', format('a %s transaction cannot be reversed', o.kind),
                         jsonb_build_object('path', '$', 'kind', o.kind));
    END IF;
    SELECT array_agg(DISTINCT e.account_id) FILTER (WHERE a.type <> 'system'),
           array_agg(DISTINCT a.address) FILTER (WHERE a.type = 'system')
        INTO v_accounts, v_system
        FROM entries e JOIN accounts a ON a.id = e.account_id WHERE e.transaction_id = o.id;
    PERFORM tl_lock(coalesce(v_accounts, '{}'), coalesce(v_system, '{}') || ARRAY['system:expired']);
    v_now := tl_now(p_ctx);
    IF EXISTS (SELECT 1 FROM transactions WHERE reverses = o.id) THEN
        PERFORM tl_raise('TLB06', 'already_reversed', format('transaction %s was already reversed', p_args ->> 'transaction'),
                         jsonb_build_object('reversed_by',
                             (SELECT tl_public_id('txn_', id) FROM transactions WHERE reverses = o.id)));
    END IF;
    FOR v_acc IN SELECT * FROM accounts WHERE id = ANY (coalesce(v_accounts, '{}')) ORDER BY id LOOP
        PERFORM tl_require_open(v_acc);
        PERFORM tl_expire_due(v_acc.id, v_now, p_ctx);
    END LOOP;
    IF o.kind = 'debit' THEN
        -- Spend policy: the debit's spend goes back to the window it was counted in.
        FOR v_acc IN SELECT * FROM accounts WHERE id = ANY (coalesce(v_accounts, '{}')) AND policy_bound LOOP
            PERFORM tl_policy_count(v_acc, -(SELECT -sum(amount) FROM entries
                                              WHERE transaction_id = o.id AND account_id = v_acc.id)::bigint,
                                    o.created_at, false, v_now);
        END LOOP;
    END IF;
    v_txn := tl_new_transaction('reversal', v_now, p_ctx, p_args ->> 'memo', '{}'::jsonb,
                                jsonb_build_object('reversed_kind', o.kind), o.id);
    FOR v_mv IN SELECT m.lot_id, m.amount FROM lot_movements m WHERE m.transaction_id = o.id ORDER BY m.lot_id LOOP
        SELECT * INTO v_lot FROM lots WHERE id = v_mv.lot_id;
        IF v_lot.status <> 'active' THEN
            PERFORM tl_raise('TLB05', 'lot_not_active',
                format('lot %s was voided; the transaction can no longer be reversed', tl_public_id('lot_', v_lot.id)),
                jsonb_build_object('lot', tl_public_id('lot_', v_lot.id), 'status', v_lot.status));
        END IF;
        IF v_mv.amount > 0 AND v_lot.remaining - v_lot.reserved < v_mv.amount THEN
            PERFORM tl_raise('TLB01', 'insufficient_credits',
                format('lot %s has %s of the %s credits this reversal must take back',
                       tl_public_id('lot_', v_lot.id), v_lot.remaining - v_lot.reserved, v_mv.amount),
                jsonb_build_object('account', (SELECT address FROM accounts WHERE id = v_lot.account_id),
                                   'available', v_lot.remaining - v_lot.reserved, 'requested', v_mv.amount));
        END IF;
        PERFORM tl_move_lot(v_txn, v_mv.lot_id, -v_mv.amount);
    END LOOP;
    FOR v_e IN SELECT account_id, sum(amount)::bigint AS amount FROM entries WHERE transaction_id = o.id
               GROUP BY account_id ORDER BY account_id LOOP
        IF v_e.amount <> 0 THEN
            PERFORM tl_post_entry(v_txn, v_e.account_id, -v_e.amount, v_now);
        END IF;
    END LOOP;
    -- Credits restored into lots that have expired expire again, at once.
    FOR v_acc IN SELECT * FROM accounts WHERE id = ANY (coalesce(v_accounts, '{}')) ORDER BY id LOOP
        PERFORM tl_expire_due(v_acc.id, v_now, p_ctx);
    END LOOP;
    RETURN tl_transaction_json(v_txn);
END $$;

-- Closes an employee's wallet: remaining lots go back to their funders in
-- one `void` transaction, the account closes, and later writes answer
-- account_closed.
CREATE OR REPLACE FUNCTION tl_op_offboard(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_now timestamptz;
    v_txn uuid;
    v_lots uuid[];
    v_res reservations;
BEGIN
    w := tl_require_account('employee:' || (p_args ->> 'employee'));
    PERFORM tl_lock(ARRAY[w.id] || tl_funders(w.id), ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = w.id;
    PERFORM tl_require_open(w);
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    -- Active reservations are released first, so their credits are voided too.
    FOR v_res IN SELECT * FROM reservations WHERE account_id = w.id AND status = 'active' ORDER BY id LOOP
        PERFORM tl_release_holds(v_res);
        UPDATE reservations SET status = 'released', resolved_at = v_now WHERE id = v_res.id;
    END LOOP;
    -- What those holds kept alive on lots that have expired expires now.
    PERFORM tl_expire_lots(w.id, v_now, p_ctx);
    -- Every lot with free credits goes back: the active ones, and voided
    -- ones whose credits the released reservations have just freed.
    SELECT array_agg(id) INTO v_lots FROM lots
        WHERE account_id = w.id AND status IN ('active', 'voided') AND live
          AND remaining > reserved;
    IF v_lots IS NOT NULL THEN
        v_txn := tl_new_transaction('void', v_now, p_ctx, p_args ->> 'memo', '{}'::jsonb,
                                    jsonb_build_object('offboarded', p_args ->> 'employee'));
        PERFORM tl_void_lots(v_txn, w, v_lots, v_now);
    END IF;
    UPDATE accounts SET status = 'closed', updated_at = v_now WHERE id = w.id;
    UPDATE employees SET status = 'offboarded', offboarded_at = v_now, updated_at = v_now
        WHERE id = p_args ->> 'employee';
    RETURN tl_employee_json(p_args ->> 'employee', v_now)
           || jsonb_build_object('void_transaction_id', tl_public_id('txn_', v_txn));
END $$;

-- ===========================================================================
-- 3. Reservations: hold credits before a model call, capture the real cost
-- after
-- ===========================================================================

-- Gives back a reservation's holds: its lots' earmarks and the account's reserved amount.
CREATE OR REPLACE FUNCTION tl_release_holds(p_res reservations) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v accounts;
BEGIN
    UPDATE lots l SET reserved = l.reserved - h.amount
        FROM reservation_holds h WHERE h.reservation_id = p_res.id AND l.id = h.lot_id;
    UPDATE accounts SET reserved = reserved - p_res.amount WHERE id = p_res.account_id RETURNING * INTO v;
    -- Spend policy: the hold no longer counts in the window it was made in.
    IF v.policy_bound THEN
        PERFORM tl_policy_count(v, -p_res.amount, p_res.created_at, false, p_res.created_at);
    END IF;
END $$;

-- ---------------------------------------------------------------------------
-- Reservations: hold credits before a model call, capture the real cost after
-- ---------------------------------------------------------------------------

-- PL/pgSQL for its plan's sake, and by key whoever calls first, as
-- tl_transaction_json.
CREATE OR REPLACE FUNCTION tl_reservation_json(p_id uuid, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'id', tl_public_id('rsv_', r.id),
        'account', a.address,
        'amount', r.amount,
        'captured', r.captured,
        -- Past its expires_at a reservation is expired, whether or not the
        -- sweeper has written that yet.
        'status', CASE WHEN r.status = 'active' AND r.expires_at <= p_now THEN 'expired' ELSE r.status END,
        'expires_at', tl_ts(r.expires_at),
        'metadata', r.metadata,
        'capture_transaction_id', tl_public_id('txn_', r.capture_transaction_id),
        'holds', coalesce((
            SELECT jsonb_agg(jsonb_build_object('lot_id', tl_public_id('lot_', h.lot_id), 'amount', h.amount)
                             ORDER BY h.lot_id)
            FROM reservation_holds h WHERE h.reservation_id = r.id), '[]'::jsonb),
        'actor', r.actor,
        'created_at', tl_ts(r.created_at),
        'resolved_at', tl_ts(CASE WHEN r.status = 'active' AND r.expires_at <= p_now THEN r.expires_at
                                  ELSE r.resolved_at END))
    FROM reservations r JOIN accounts a ON a.id = r.account_id
    WHERE r.id = p_id);
END $$;

-- Whether the caller of p_ctx may capture, release, extend or settle a
-- reservation: the one that made it, or an admin.
CREATE OR REPLACE FUNCTION tl_may_act_on(r reservations, p_ctx jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.actor IS NOT DISTINCT FROM p_ctx ->> 'actor' OR coalesce((p_ctx ->> 'admin')::boolean, false)
$$;

-- Loads a reservation for a write: locks its account first (the global
-- order), brings the account up to now (which expires the reservation if
-- its time is up), and answers reservation_not_active unless it is active.
CREATE OR REPLACE FUNCTION tl_lock_reservation(p_args jsonb, p_ctx jsonb, p_system text[])
RETURNS reservations LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v_now timestamptz;
BEGIN
    SELECT * INTO r FROM reservations WHERE id = (p_args ->> 'reservation_id')::uuid;
    -- Only the caller that made a reservation (or an admin) may act on it;
    -- to anyone else it does not exist.
    IF NOT FOUND OR NOT tl_may_act_on(r, p_ctx) THEN
        PERFORM tl_raise('TLA05', 'reservation_not_found', format('no reservation %s', p_args ->> 'reservation'),
                         jsonb_build_object('reservation', p_args ->> 'reservation'));
    END IF;
    PERFORM tl_lock(ARRAY[r.account_id], p_system);
    v_now := tl_now(p_ctx);
    PERFORM tl_expire_due(r.account_id, v_now, p_ctx);
    SELECT * INTO r FROM reservations WHERE id = r.id;
    IF r.status <> 'active' THEN
        PERFORM tl_raise('TLB04', 'reservation_not_active',
                         format('reservation %s is %s', p_args ->> 'reservation', r.status),
                         jsonb_build_object('reservation', p_args ->> 'reservation', 'status', r.status));
    END IF;
    RETURN r;
END $$;

-- Holds credits on a wallet or department account: earmarks live lots in
-- consumption order and raises `reserved`. No journal entry: nothing moves
-- until the capture.
CREATE OR REPLACE FUNCTION tl_op_reserve(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_amount bigint := (p_args ->> 'amount')::bigint;
    v_now timestamptz;
    v_id uuid := tl_uuid7();
    v_left bigint;
    v_take bigint;
    v_lot record;
    v_available bigint;
    v_estimate jsonb;
BEGIN
    w := tl_require_account(p_args ->> 'account');
    IF w.type = 'system' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'reservations hold credits of a wallet or a department account',
                         jsonb_build_object('path', '$.account'));
    END IF;
    IF p_ctx ? 'departments' THEN
        PERFORM tl_require_key_scope(w, p_ctx);  -- a key limited to departments
    END IF;
    PERFORM tl_lock(ARRAY[w.id], ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = w.id;
    PERFORM tl_require_open(w);
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    v_available := tl_spendable(w.id, v_now);
    IF w.policy_bound THEN
        -- Spend policy: the model first, then an estimate is cut to the tightest limit too.
        v_estimate := tl_policy_reserve(w, p_args, v_available, v_now);
    END IF;
    IF jsonb_typeof(p_args -> 'estimate') = 'object' THEN
        v_estimate := coalesce(v_estimate, tl_estimate(p_args -> 'estimate', v_available, v_now, w.address));
        v_amount := (v_estimate ->> 'amount')::bigint;
    END IF;
    IF v_available < v_amount THEN
        PERFORM tl_raise('TLB01', 'insufficient_credits',
            format('%s has %s credits available; %s requested', w.address, v_available, v_amount),
            jsonb_build_object('account', w.address, 'available', v_available, 'requested', v_amount));
    END IF;
    IF w.policy_bound THEN
        PERFORM tl_policy_count(w, v_amount, v_now, true, v_now);
    END IF;
    INSERT INTO reservations (id, account_id, amount, expires_at, metadata, details, actor, request_id, created_at)
    VALUES (v_id, w.id, v_amount, v_now + make_interval(secs => (p_args ->> 'ttl_seconds')::integer),
            coalesce(nullif(p_args -> 'metadata', 'null'::jsonb), '{}'::jsonb),
            coalesce(v_estimate - 'amount', '{}'::jsonb),
            p_ctx ->> 'actor', p_ctx ->> 'request_id', v_now);
    v_left := v_amount;
    FOR v_lot IN
        SELECT l.id, l.remaining - l.reserved AS free FROM lots l
        WHERE l.account_id = w.id AND l.status = 'active' AND l.live AND l.remaining > l.reserved
          AND l.effective_at <= v_now AND (l.expires_at IS NULL OR l.expires_at > v_now)
        ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
    LOOP
        v_take := least(v_lot.free, v_left);
        UPDATE lots SET reserved = reserved + v_take WHERE id = v_lot.id;
        INSERT INTO reservation_holds (reservation_id, lot_id, amount) VALUES (v_id, v_lot.id, v_take);
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    ASSERT v_left = 0, 'tl_op_reserve: spendable credits changed under a held lock';
    UPDATE accounts SET reserved = reserved + v_amount, updated_at = v_now WHERE id = w.id;
    IF p_ctx ? 'rate_limit' THEN
        PERFORM tl_key_charge(p_ctx, v_amount);  -- the key's spend rate cap, checked last
    END IF;
    RETURN tl_reservation_json(v_id, v_now)
           || jsonb_build_object('available_after', v_available - v_amount)
           || CASE WHEN v_estimate IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('max_output_tokens_allowed', v_estimate -> 'max_output_tokens_allowed')
              END;
END $$;

-- A capture by amount (p_args: reservation, reservation_id, amount,
-- metadata), without its answer: the reservation locked and captured, the
-- capture's transaction posted. tl_op_capture answers it; a usage event
-- that settles a reservation (tl_usage_settle, tl_usage_batch_settle)
-- needs only the transaction's id, and building the reservation and the
-- transaction as JSON for it was work thrown away.
CREATE OR REPLACE FUNCTION tl_capture(p_args jsonb, p_ctx jsonb, OUT o_reservation uuid, OUT o_txn uuid,
                                      OUT o_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    w accounts;
    v_amount bigint := (p_args ->> 'amount')::bigint;
    v_left bigint;
    v_take bigint;
    v_now timestamptz;
    v_txn uuid;
    v_hold record;
BEGIN
    r := tl_lock_reservation(p_args, p_ctx, ARRAY['system:expired', 'system:usage', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = r.account_id;
    v_txn := tl_new_transaction('capture', v_now, p_ctx, NULL,
                                coalesce(nullif(p_args -> 'metadata', 'null'::jsonb), r.metadata),
                                jsonb_build_object('reservation_id', tl_public_id('rsv_', r.id),
                                                   'held', r.amount));
    v_left := v_amount;
    FOR v_hold IN
        SELECT h.lot_id, h.amount FROM reservation_holds h JOIN lots l ON l.id = h.lot_id
        WHERE h.reservation_id = r.id
        ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
    LOOP
        v_take := least(v_hold.amount, v_left);
        UPDATE lots SET reserved = reserved - v_hold.amount WHERE id = v_hold.lot_id;
        IF v_take > 0 THEN
            PERFORM tl_move_lot(v_txn, v_hold.lot_id, -v_take);
            v_left := v_left - v_take;
        END IF;
    END LOOP;
    UPDATE accounts SET reserved = reserved - r.amount WHERE id = w.id;
    IF w.policy_bound THEN
        -- Spend policy: trued up to the captured amount in the reservation's window.
        PERFORM tl_policy_count(w, v_amount - r.amount, r.created_at, true, v_now);
    END IF;
    IF v_left > 0 THEN
        -- Over-capture: the excess comes from available credits or not at all
        -- (insufficient_credits rolls everything back; the reservation stays active).
        SELECT * INTO w FROM accounts WHERE id = w.id;
        PERFORM 1 FROM tl_consume(v_txn, w, v_left, v_now);
    END IF;
    PERFORM tl_post_entry(v_txn, w.id, -v_amount, v_now);
    PERFORM tl_post_entry(v_txn, tl_account_id('system:usage'), v_amount, v_now);
    UPDATE reservations SET status = 'captured', captured = v_amount, capture_transaction_id = v_txn,
                            resolved_at = v_now
        WHERE id = r.id;
    PERFORM tl_expire_due(w.id, v_now, p_ctx);
    o_reservation := r.id;
    o_txn := v_txn;
    o_at := v_now;
END $$;

-- Captures a reservation: the amount is drawn from its held lots first (even
-- lots that expired since: a reservation is a promise), then, when it asks
-- for more than was held, from the wallet's live lots. What is held and not
-- captured is released; released credits of an expired lot expire at once.
CREATE OR REPLACE FUNCTION tl_op_capture(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v_usage jsonb;
    v_captured record;
BEGIN
    IF jsonb_typeof(p_args -> 'usage') = 'object' THEN
        -- Capture by usage: record a usage event (source "reservation", the
        -- reservation's id) priced at the price the reservation was made with.
        -- A reservation that is not active answers so, before any event.
        r := tl_lock_reservation(p_args, p_ctx, ARRAY['system:expired', 'system:usage', 'system:issuance']);
        v_usage := tl_record_usage((p_args -> 'usage') || jsonb_build_object(
            'source', 'reservation', 'event_id', p_args ->> 'reservation',
            'account', (SELECT address FROM accounts WHERE id = r.account_id),
            'reservation', p_args ->> 'reservation', 'reservation_id', r.id), p_ctx);
        RETURN jsonb_build_object(
            'reservation', tl_reservation_json(r.id, tl_now(p_ctx)),
            'transaction', CASE WHEN v_usage #>> '{body,transaction_id}' IS NULL THEN NULL
                                ELSE tl_transaction_json(replace(v_usage #>> '{body,transaction_id}', 'txn_', '')::uuid) END,
            'usage', v_usage -> 'body');
    END IF;
    v_captured := tl_capture(p_args, p_ctx);
    RETURN jsonb_build_object('reservation', tl_reservation_json(v_captured.o_reservation, v_captured.o_at),
                              'transaction', tl_transaction_json(v_captured.o_txn));
END $$;

CREATE OR REPLACE FUNCTION tl_op_release(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v_now timestamptz;
BEGIN
    r := tl_lock_reservation(p_args, p_ctx, ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    PERFORM tl_release_holds(r);
    UPDATE reservations SET status = 'released', resolved_at = v_now WHERE id = r.id;
    PERFORM tl_expire_due(r.account_id, v_now, p_ctx);
    RETURN tl_reservation_json(r.id, v_now);
END $$;

CREATE OR REPLACE FUNCTION tl_op_extend(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r reservations;
    v_now timestamptz;
BEGIN
    r := tl_lock_reservation(p_args, p_ctx, ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    -- Never past created_at + the lifetime the service allows (p_args
    -- max_lifetime_seconds): an extension must not keep credits, expired
    -- ones above all, capturable for ever.
    UPDATE reservations
       SET expires_at = least(v_now + make_interval(secs => (p_args ->> 'ttl_seconds')::integer),
                              r.created_at + make_interval(
                                  secs => coalesce((p_args ->> 'max_lifetime_seconds')::integer, 86400)))
     WHERE id = r.id;
    RETURN tl_reservation_json(r.id, v_now);
END $$;

-- Accounts whose reserved amount is not the sum of their active
-- reservations: the audit's invariant 4 (service/sql/audit.sql), in both its
-- full and its routine form. A view, so each query plans it as its own.
CREATE OR REPLACE VIEW tl_reserved_mismatches AS
SELECT a.address, a.reserved, coalesce(r.total, 0) AS held
FROM accounts a
LEFT JOIN (SELECT account_id, sum(amount) AS total FROM reservations WHERE status = 'active'
           GROUP BY account_id) r ON r.account_id = a.id
WHERE a.reserved <> coalesce(r.total, 0);

-- ===========================================================================
-- 4. Prices and usage: versioned prices; usage events, recorded one by one or
-- in batches
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Prices: versioned model rates (README, Prices)
-- ---------------------------------------------------------------------------

-- A price is a version: the rates of a model in credits per million tokens
-- from effective_from until the model's next version. Versions are never
-- edited or deleted, because usage is billed at (and records) the version in
-- effect when it occurred; a changed price is a new version with a later
-- effective_from. The limits keep every product of a rate and a token count
-- (both at most 10^9) within bigint.
CREATE TABLE IF NOT EXISTS prices (
    id                    uuid PRIMARY KEY,
    model                 text NOT NULL,
    tier                  text NOT NULL DEFAULT 'standard',
    effective_from        timestamptz NOT NULL,
    input_per_mtok        bigint NOT NULL,
    cached_input_per_mtok bigint NOT NULL,
    output_per_mtok       bigint NOT NULL,
    source                text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT prices_model_format CHECK (length(model) <= 128 AND model ~ '^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$'),
    CONSTRAINT prices_tier_valid CHECK (tier IN ('standard', 'premium')),
    CONSTRAINT prices_input_rate_range CHECK (input_per_mtok BETWEEN 0 AND 1000000000),
    CONSTRAINT prices_cached_input_rate_range CHECK (cached_input_per_mtok BETWEEN 0 AND 1000000000),
    CONSTRAINT prices_output_rate_range CHECK (output_per_mtok BETWEEN 0 AND 1000000000),
    CONSTRAINT prices_source_length CHECK (length(source) BETWEEN 1 AND 200),
    -- Its index also answers "the latest version with effective_from <= t"
    -- for one model (a backward scan) and for every model (DISTINCT ON).
    CONSTRAINT prices_model_effective_key UNIQUE (model, effective_from)
);

DROP TRIGGER IF EXISTS prices_immutable ON prices;
CREATE TRIGGER prices_immutable BEFORE UPDATE OR DELETE ON prices
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS prices_no_truncate ON prices;
CREATE TRIGGER prices_no_truncate BEFORE TRUNCATE ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION tl_forbid_change();

-- The version of a model in effect at p_at: the one with the latest
-- effective_from at or before p_at (so a version is in effect from its own
-- effective_from on). NULL when the model had no price then.
CREATE OR REPLACE FUNCTION tl_price_at(p_model text, p_at timestamptz) RETURNS prices
LANGUAGE sql STABLE AS $$
    SELECT * FROM prices WHERE model = p_model AND effective_from <= p_at
    ORDER BY effective_from DESC LIMIT 1
$$;

CREATE OR REPLACE FUNCTION tl_price_json(p prices) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.id IS NULL THEN NULL ELSE jsonb_build_object(
        'id', tl_public_id('prc_', p.id),
        'model', p.model,
        'tier', p.tier,
        'effective_from', tl_ts(p.effective_from),
        'input_per_mtok', p.input_per_mtok,
        'cached_input_per_mtok', p.cached_input_per_mtok,
        'output_per_mtok', p.output_per_mtok,
        'source', p.source,
        'created_at', tl_ts(p.created_at)) END
$$;

-- The credits of one usage event at a price: README, Prices, and
-- service/pricing.py usage_cost, which must agree (tests/api/test_prices.py).
-- Rounded up once per event, in exact integer arithmetic: numeric division
-- would round to a limited scale before ceil() saw the remainder.
CREATE OR REPLACE FUNCTION tl_usage_cost(p_price prices, p_input bigint, p_cached bigint, p_output bigint)
RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_price.id IS NULL THEN
        RETURN NULL;
    END IF;
    IF p_input < 0 OR p_cached < 0 OR p_output < 0 OR p_cached > p_input THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('token counts must be >= 0 and cached_input_tokens <= input_tokens (got %s, %s, %s)',
                   p_input, p_cached, p_output));
    END IF;
    RETURN div((p_input - p_cached)::numeric * p_price.input_per_mtok
               + p_cached::numeric * p_price.cached_input_per_mtok
               + p_output::numeric * p_price.output_per_mtok
               + 999999, 1000000)::bigint;
END $$;

-- Adds a price version. The same (model, effective_from) again with the same
-- tier and rates is a no-op answering the stored version (an import run
-- twice, a retry without its Idempotency-Key); with anything different it
-- is refused, because a version is never edited.
CREATE OR REPLACE FUNCTION tl_op_add_price(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_row prices;
    v_old prices;
BEGIN
    INSERT INTO prices (id, model, tier, effective_from, input_per_mtok, cached_input_per_mtok,
                        output_per_mtok, source, created_at)
    VALUES (tl_uuid7(), p_args ->> 'model', coalesce(p_args ->> 'tier', 'standard'),
            (p_args ->> 'effective_from')::timestamptz, (p_args ->> 'input_per_mtok')::bigint,
            (p_args ->> 'cached_input_per_mtok')::bigint, (p_args ->> 'output_per_mtok')::bigint,
            coalesce(p_args ->> 'source', 'api'), tl_now(p_ctx))
    ON CONFLICT (model, effective_from) DO NOTHING
    RETURNING * INTO v_row;
    IF v_row.id IS NOT NULL THEN
        RETURN tl_price_json(v_row);
    END IF;
    SELECT * INTO v_old FROM prices
        WHERE model = p_args ->> 'model' AND effective_from = (p_args ->> 'effective_from')::timestamptz;
    IF (v_old.tier, v_old.input_per_mtok, v_old.cached_input_per_mtok, v_old.output_per_mtok)
            IS DISTINCT FROM (coalesce(p_args ->> 'tier', 'standard'), (p_args ->> 'input_per_mtok')::bigint,
                              (p_args ->> 'cached_input_per_mtok')::bigint, (p_args ->> 'output_per_mtok')::bigint) THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('%s already has a different price version effective from %s (%s); prices are never '
                   'edited: add a version with a later effective_from',
                   v_old.model, tl_ts(v_old.effective_from), tl_public_id('prc_', v_old.id)),
            jsonb_build_object('path', '$.effective_from', 'price_id', tl_public_id('prc_', v_old.id)));
    END IF;
    RETURN tl_price_json(v_old);
END $$;

-- ---------------------------------------------------------------------------
-- Usage events: metered model calls, priced and charged once
-- ---------------------------------------------------------------------------

-- A usage event is idempotent by (source, event_id): the row is claimed
-- first, so a concurrent duplicate waits for the first to commit and then
-- answers as it was recorded, and charges nothing. `result` is null while
-- the event is claimed and not yet recorded (inside the claiming
-- transaction), then `{}`: the answer is the row's columns (tl_usage_answer).
-- Rows recorded before 2026-12-07 hold their whole answer there instead.
CREATE TABLE IF NOT EXISTS usage_events (
    id                  uuid PRIMARY KEY,
    source              text NOT NULL,
    event_id            text NOT NULL,
    -- account_id, price_id and transaction_id name rows that are never
    -- deleted (the service's role may not), but no foreign key checks them:
    -- a foreign key checks each row with a trigger and a query of its own,
    -- and in a batch of 500 events those three checks per event cost a
    -- quarter of PostgreSQL's CPU (measured with bench.sqlbatch, 0.089 ->
    -- 0.066 ms per event). Instead usage_events_refs checks the account and
    -- the price of all of a statement's rows in one set-based query, and the
    -- audit (invariant 6) checks that every event's transaction exists: a
    -- batch claims its events before it writes their transactions, so no
    -- check at the end of the claiming statement can see them.
    account_id          bigint NOT NULL,
    model               text NOT NULL,
    price_id            uuid NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL,
    cost                bigint NOT NULL,
    -- A batch claims its events with the id of the transaction that charges
    -- them, written later in the same transaction (tl_record_usage_batch).
    transaction_id      uuid,
    reservation_id      uuid REFERENCES reservations (id),
    project             text,
    tags                jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL,
    result              jsonb,
    -- The part of the cost that went to system:overage, and whether the model
    -- was outside the policy ("Spend policy").
    shortfall           bigint NOT NULL DEFAULT 0,
    violation           text,
    CONSTRAINT usage_events_source_event_key UNIQUE (source, event_id),
    CONSTRAINT usage_events_tokens_range CHECK (
        input_tokens BETWEEN 0 AND 1000000000 AND output_tokens BETWEEN 0 AND 1000000000
        AND cached_input_tokens BETWEEN 0 AND input_tokens),
    CONSTRAINT usage_events_cost_nonnegative CHECK (cost >= 0),
    CONSTRAINT usage_events_charged CHECK (cost = 0 OR transaction_id IS NOT NULL OR result IS NULL),
    CONSTRAINT usage_events_shortfall_within_cost CHECK (shortfall BETWEEN 0 AND cost),
    CONSTRAINT usage_events_violation_valid CHECK (violation IS NULL OR violation = 'model_not_allowed')
);
CREATE INDEX IF NOT EXISTS usage_events_occurred_idx ON usage_events (occurred_at);
CREATE INDEX IF NOT EXISTS usage_events_account_idx ON usage_events (account_id, occurred_at);
-- Usage reports read overage and violations from the events that have
-- them (the roll-ups do not keep them): a small index of just those.
CREATE INDEX IF NOT EXISTS usage_events_policy_idx ON usage_events (occurred_at)
    WHERE shortfall > 0 OR violation IS NOT NULL;

-- The references of new or changed usage events: the distinct accounts and
-- prices named, each looked up once by its primary key. Refused with the
-- SQLSTATE of a foreign key (23503), naming the column, like the foreign
-- keys it replaces (see usage_events above).
CREATE OR REPLACE FUNCTION tl_usage_refs_exist(p_accounts bigint[], p_prices uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_missing text;
BEGIN
    SELECT format('account_id %s', x) INTO v_missing FROM unnest(p_accounts) x
     WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x) LIMIT 1;
    IF v_missing IS NULL THEN
        SELECT format('price_id %s', x) INTO v_missing FROM unnest(p_prices) x
         WHERE NOT EXISTS (SELECT 1 FROM prices p WHERE p.id = x) LIMIT 1;
    END IF;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', TABLE = 'usage_events',
            MESSAGE = format('usage_events names %s, which does not exist', v_missing);
    END IF;
END $$;

-- Once for all of an INSERT's rows.
CREATE OR REPLACE FUNCTION tl_usage_events_refs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_usage_refs_exist(array_agg(DISTINCT account_id), array_agg(DISTINCT price_id)) FROM new_rows;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS usage_events_refs ON usage_events;
CREATE TRIGGER usage_events_refs AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tl_usage_events_refs();
-- An update never changes them (it records the charge: transaction, result,
-- shortfall); one that does is checked row by row, and the WHEN keeps the
-- others from calling anything.
CREATE OR REPLACE FUNCTION tl_usage_event_refs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_usage_refs_exist(ARRAY[NEW.account_id], ARRAY[NEW.price_id]);
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS usage_events_refs_update ON usage_events;
CREATE TRIGGER usage_events_refs_update AFTER UPDATE OF account_id, price_id ON usage_events
    FOR EACH ROW WHEN (OLD.account_id IS DISTINCT FROM NEW.account_id OR OLD.price_id IS DISTINCT FROM NEW.price_id)
    EXECUTE FUNCTION tl_usage_event_refs();

CREATE OR REPLACE FUNCTION tl_usage_json(p usage_events, p_status text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', tl_public_id('evt_', p.id),
        'source', p.source,
        'event_id', p.event_id,
        'account', (SELECT address FROM accounts WHERE id = p.account_id),
        'model', p.model,
        'input_tokens', p.input_tokens,
        'cached_input_tokens', p.cached_input_tokens,
        'output_tokens', p.output_tokens,
        'cost', p.cost,
        'price_id', tl_public_id('prc_', p.price_id),
        'transaction_id', tl_public_id('txn_', p.transaction_id),
        'reservation_id', tl_public_id('rsv_', p.reservation_id),
        'project', p.project,
        'tags', p.tags,
        'occurred_at', tl_ts(p.occurred_at),
        'status', p_status)
$$;

-- The answer a recorded event (p) was recorded with, without its status (a
-- replay adds 'duplicate'). Its `result` is `{}` when the answer is the row's
-- own columns, as every event recorded since 2026-12-07 has it: building and
-- writing a copy of the answer with each event was about a fifth of a usage
-- batch's PostgreSQL CPU (bench.sqlbatch, 4 clients), and most of the row.
-- Otherwise `result` is the answer itself, as earlier versions stored it.
CREATE OR REPLACE FUNCTION tl_usage_answer(p usage_events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.result = '{}'::jsonb
                THEN (tl_usage_json(p, NULL) - 'status')
                     || CASE WHEN p.shortfall = 0 THEN '{}'::jsonb
                             ELSE jsonb_build_object('shortfall', p.shortfall) END
                     || CASE WHEN p.violation IS NULL THEN '{}'::jsonb
                             ELSE jsonb_build_object('violation', p.violation) END
                ELSE p.result END
$$;

-- What a usage batch answers of a recorded event (p): its id, cost,
-- transaction and shortfall (tl_usage_batch_answer reads no more), without
-- building its whole answer: a replayed batch of 500 events built each one's
-- (tl_usage_answer, the account's address looked up per event) and cost
-- PostgreSQL 36 ms instead of 25 when the answer was stored; 23.5 with
-- this, against 21 to 25.
CREATE OR REPLACE FUNCTION tl_usage_brief(p usage_events) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.result = '{}'::jsonb
                THEN jsonb_build_object('id', tl_public_id('evt_', p.id), 'cost', p.cost,
                                        'transaction_id', tl_public_id('txn_', p.transaction_id))
                     || CASE WHEN p.shortfall = 0 THEN '{}'::jsonb
                             ELSE jsonb_build_object('shortfall', p.shortfall) END
                ELSE p.result END
$$;

-- Whether an event posted under the (source, event_id) of a recorded one
-- says something else (API.md: the same key with another body is 422
-- idempotency_key_reused, like an Idempotency-Key). occurred_at counts only
-- when the event gives it (without it the event occurred when first sent).
CREATE OR REPLACE FUNCTION tl_usage_differs(u usage_events, e jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT u.model IS DISTINCT FROM e ->> 'model'
        OR u.input_tokens IS DISTINCT FROM (e ->> 'input_tokens')::bigint
        OR u.cached_input_tokens IS DISTINCT FROM coalesce((e ->> 'cached_input_tokens')::bigint, 0)
        OR u.output_tokens IS DISTINCT FROM (e ->> 'output_tokens')::bigint
        OR u.project IS DISTINCT FROM e ->> 'project'
        OR u.tags IS DISTINCT FROM coalesce(nullif(e -> 'tags', 'null'::jsonb), '{}'::jsonb)
        OR u.reservation_id IS DISTINCT FROM (e ->> 'reservation_id')::uuid
        OR (e ->> 'occurred_at' IS NOT NULL AND u.occurred_at IS DISTINCT FROM (e ->> 'occurred_at')::timestamptz)
        OR (SELECT a.address FROM accounts a WHERE a.id = u.account_id) IS DISTINCT FROM e ->> 'account'
$$;

-- The answer to an event whose (source, event_id) is recorded already: its
-- stored result, or idempotency_key_reused when it says something else.
CREATE OR REPLACE FUNCTION tl_usage_duplicate(u usage_events, e jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF tl_usage_differs(u, e) THEN
        PERFORM tl_raise('TLC01', 'idempotency_key_reused',
                         'this (source, event_id) was recorded with a different event; nothing was changed');
    END IF;
    RETURN jsonb_build_object('status', 200, 'body', tl_usage_answer(u) || '{"status": "duplicate"}'::jsonb);
END $$;

-- Recording one usage event is in three steps, so that a coalesced batch
-- (tl_execute_batch) can claim its events before it locks any account, as
-- tl_record_usage and tl_record_usage_batch claim theirs:
--   1. tl_usage_prepare, which takes no row lock: the answer when (source,
--      event_id) is recorded already, or the event's row, priced;
--   2. the claim: its row inserted (a concurrent request for the same event
--      waits there for the first one's outcome);
--   3. tl_usage_settle, under the account's lock: the charge (or the
--      reservation's capture), the event marked recorded, the roll-ups.

-- Step 1. Prices the event at the version in effect at occurred_at (or,
-- when it settles a reservation made by estimate, at that reservation's
-- price) and returns either `answer`, {status: 200, body} for an event whose
-- (source, event_id) is recorded already, or `event`, the row to claim (its
-- id chosen, recorded_at not yet), with the spend-policy flag `violation`.
-- Raises what the event answers before anything is claimed: an unknown
-- account, reservation or model, a system account, a key's departments, a
-- reused (source, event_id). With p_lock_key a capped key's spend row is
-- locked here, before the claim (a coalesced batch locks it beforehand).
CREATE OR REPLACE FUNCTION tl_usage_prepare(p_args jsonb, p_ctx jsonb, p_lock_key boolean,
                                            OUT answer jsonb, OUT event usage_events, OUT violation text)
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_price prices;
    v_existing usage_events;
    v_occurred timestamptz := coalesce((p_args ->> 'occurred_at')::timestamptz, tl_now(p_ctx));
    v_res reservations;
BEGIN
    SELECT * INTO v_existing FROM usage_events
        WHERE source = p_args ->> 'source' AND event_id = p_args ->> 'event_id';
    IF FOUND AND v_existing.result IS NOT NULL THEN
        answer := tl_usage_duplicate(v_existing, p_args);
        RETURN;
    END IF;
    w := tl_require_account(p_args ->> 'account');
    IF w.type = 'system' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'usage is charged to a wallet or a department account',
                         jsonb_build_object('path', '$.account'));
    END IF;
    IF p_ctx ? 'departments' THEN
        PERFORM tl_require_key_scope(w, p_ctx);  -- a key limited to departments
    END IF;
    IF p_lock_key AND p_ctx ? 'rate_limit' AND p_args ->> 'reservation' IS NULL THEN
        PERFORM tl_key_lock(ARRAY[p_ctx]);  -- before the event is claimed (see tl_key_lock)
    END IF;
    IF p_args ? 'reservation' AND p_args ->> 'reservation' IS NOT NULL THEN
        SELECT * INTO v_res FROM reservations WHERE id = (p_args ->> 'reservation_id')::uuid;
        IF NOT FOUND OR NOT tl_may_act_on(v_res, p_ctx) THEN
            PERFORM tl_raise('TLA05', 'reservation_not_found', format('no reservation %s', p_args ->> 'reservation'),
                             jsonb_build_object('reservation', p_args ->> 'reservation'));
        END IF;
        IF v_res.account_id <> w.id THEN
            PERFORM tl_raise('TLD01', 'invalid_request', 'the reservation holds credits of another account',
                             jsonb_build_object('path', '$.reservation'));
        END IF;
        IF v_res.details ? 'price_id' THEN
            SELECT * INTO v_price FROM prices WHERE id = (v_res.details ->> 'price_id')::uuid;
        END IF;
    END IF;
    IF v_price.id IS NULL THEN
        v_price := tl_price_at(p_args ->> 'model', v_occurred);
    END IF;
    IF v_price.id IS NULL OR v_price.model <> p_args ->> 'model' THEN
        PERFORM tl_raise('TLA08', 'unknown_model',
                         format('no price for model %s at %s', p_args ->> 'model', tl_ts(v_occurred)),
                         jsonb_build_object('model', p_args ->> 'model'));
    END IF;
    event.cost := tl_usage_cost(v_price, (p_args ->> 'input_tokens')::bigint,
                                coalesce((p_args ->> 'cached_input_tokens')::bigint, 0),
                                (p_args ->> 'output_tokens')::bigint);
    -- Spend policy: a call to a model outside it already happened; it is
    -- recorded and flagged, never dropped.
    IF w.policy_bound AND NOT tl_model_allowed(w, v_price.model, v_price.tier) THEN
        violation := 'model_not_allowed';
    END IF;
    event.id := tl_uuid7();
    event.source := p_args ->> 'source';
    event.event_id := p_args ->> 'event_id';
    event.account_id := w.id;
    event.model := p_args ->> 'model';
    event.price_id := v_price.id;
    event.input_tokens := (p_args ->> 'input_tokens')::bigint;
    event.cached_input_tokens := coalesce((p_args ->> 'cached_input_tokens')::bigint, 0);
    event.output_tokens := (p_args ->> 'output_tokens')::bigint;
    event.reservation_id := v_res.id;
    event.project := p_args ->> 'project';
    event.tags := coalesce(nullif(p_args -> 'tags', 'null'::jsonb), '{}'::jsonb);
    event.occurred_at := v_occurred;
END $$;

-- Step 3. Records a claimed event (p_event, as tl_usage_prepare made it):
-- charges the account in this transaction (or captures the reservation
-- with the cost), and marks the event recorded. Returns {status:
-- 201, body}. p_rollup false leaves the roll-ups to the caller (a coalesced
-- batch writes all of its events' at once, in key order).
CREATE OR REPLACE FUNCTION tl_usage_settle(p_event usage_events, p_args jsonb, p_ctx jsonb, p_violation text,
                                           p_rollup boolean)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_cost bigint := p_event.cost;
    v_now timestamptz;
    v_txn uuid;
    v_body jsonb;
    v_cover record;
    v_shortfall bigint := 0;
BEGIN
    IF p_event.reservation_id IS NOT NULL THEN
        -- Settles the reservation: capture with the priced cost (same rules as
        -- a capture), or release it when the call cost nothing.
        IF v_cost > 0 THEN
            v_txn := (tl_capture(jsonb_build_object(
                'reservation', p_args ->> 'reservation', 'reservation_id', p_event.reservation_id, 'amount', v_cost,
                'metadata', jsonb_build_object('usage_event', p_args ->> 'event_id', 'model', p_event.model)),
                p_ctx)).o_txn;
        ELSE
            PERFORM tl_op_release(jsonb_build_object('reservation', p_args ->> 'reservation',
                                                     'reservation_id', p_event.reservation_id), p_ctx);
        END IF;
    ELSIF v_cost > 0 THEN
        PERFORM tl_lock(ARRAY[p_event.account_id], ARRAY['system:expired', 'system:usage', 'system:issuance']);
        v_now := tl_now(p_ctx);
        SELECT * INTO w FROM accounts WHERE id = p_event.account_id;
        PERFORM tl_require_open(w);
        PERFORM tl_expire_due(w.id, v_now, p_ctx);
        -- Usage that happened is never dropped: what the wallet cannot cover
        -- down to -overdraft_limit is charged to system:overage (the shortfall).
        SELECT * INTO w FROM accounts WHERE id = w.id;
        v_cover := tl_usage_cover(w, v_cost, v_now);
        v_shortfall := v_cover.shortfall;
        IF p_ctx ? 'rate_limit' THEN
            PERFORM tl_key_charge(p_ctx, v_cost);  -- the key's spend rate cap
        END IF;
        IF w.policy_bound THEN
            PERFORM tl_policy_count(w, v_cost, p_event.occurred_at, false, v_now);
        END IF;
        v_txn := tl_new_transaction('usage', v_now, p_ctx, NULL,
                                    jsonb_build_object('model', p_event.model, 'project', p_args ->> 'project'),
                                    jsonb_build_object('source', p_args ->> 'source', 'event_id', p_args ->> 'event_id',
                                                       'price_id', tl_public_id('prc_', p_event.price_id))
                                    || CASE WHEN v_cover.from_lots < v_cost
                                            THEN jsonb_build_object('overdraft', v_cover.overdraft,
                                                                    'shortfall', v_cover.shortfall)
                                            ELSE '{}'::jsonb END);
        IF v_cover.from_lots > 0 THEN
            PERFORM 1 FROM tl_consume(v_txn, w, v_cover.from_lots, v_now);
        END IF;
        IF v_cover.from_lots + v_cover.overdraft > 0 THEN
            PERFORM tl_post_entry(v_txn, w.id, -(v_cover.from_lots + v_cover.overdraft), v_now);
        END IF;
        IF v_cover.shortfall > 0 THEN
            PERFORM tl_post_entry(v_txn, tl_account_id('system:overage'), -v_cover.shortfall, v_now);
        END IF;
        PERFORM tl_post_entry(v_txn, tl_account_id('system:usage'), v_cost, v_now);
    END IF;
    p_event.transaction_id := v_txn;
    p_event.shortfall := v_shortfall;
    p_event.violation := p_violation;
    p_event.result := '{}'::jsonb;
    -- The answer is the recorded row's columns, built as a replay rebuilds it
    -- (tl_usage_answer).
    v_body := tl_usage_answer(p_event) || '{"status": "recorded"}'::jsonb;
    UPDATE usage_events SET transaction_id = v_txn, result = p_event.result, shortfall = v_shortfall,
                            violation = p_violation
     WHERE id = p_event.id;
    IF p_rollup THEN
        PERFORM tl_usage_rollup(p_event);
    END IF;
    RETURN jsonb_build_object('status', 201, 'body', v_body);
END $$;

-- Records one usage event (the three steps above, in one go): prices it,
-- claims (source, event_id), charges the account in the same transaction
-- (or captures the reservation with the cost), and marks it recorded under
-- (source, event_id). Returns {status: 201|200, body}.
CREATE OR REPLACE FUNCTION tl_record_usage(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_prepared record;
    v_event usage_events;
    v_existing usage_events;
BEGIN
    v_prepared := tl_usage_prepare(p_args, p_ctx, true);
    IF v_prepared.answer IS NOT NULL THEN
        RETURN v_prepared.answer;
    END IF;
    v_event := v_prepared.event;
    -- Claim (source, event_id); a concurrent duplicate waits here for us.
    INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                              cached_input_tokens, output_tokens, cost, reservation_id, project, tags,
                              occurred_at, recorded_at)
    VALUES (v_event.id, v_event.source, v_event.event_id, v_event.account_id, v_event.model, v_event.price_id,
            v_event.input_tokens, v_event.cached_input_tokens, v_event.output_tokens, v_event.cost,
            v_event.reservation_id, v_event.project, v_event.tags, v_event.occurred_at, clock_timestamp())
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING * INTO v_event;
    IF v_event.id IS NULL THEN
        SELECT * INTO v_existing FROM usage_events
            WHERE source = p_args ->> 'source' AND event_id = p_args ->> 'event_id';
        RETURN tl_usage_duplicate(v_existing, p_args);
    END IF;
    RETURN tl_usage_settle(v_event, p_args, p_ctx, v_prepared.violation, true);
END $$;

-- Usage events in a coalesced batch (tl_execute_batch): tl_usage_prepare
-- with the event's errors (TL...) as its answer, {error: {state, code,
-- detail, hint}} as the batch answers an operating error, and a duplicate's
-- answer with `replayed: false`. The batch has locked a capped key's row
-- already. Anything else (a bug, a timeout) fails the batch.
CREATE OR REPLACE FUNCTION tl_usage_batch_prepare(p_args jsonb, p_ctx jsonb,
                                                  OUT answer jsonb, OUT event usage_events, OUT violation text)
LANGUAGE plpgsql AS $$
DECLARE
    v record;
    v_state text;
    v_code text;
    v_detail text;
    v_hint text;
BEGIN
    v := tl_usage_prepare(p_args, p_ctx, false);
    answer := v.answer || '{"replayed": false}'::jsonb;
    event := v.event;
    violation := v.violation;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_code = MESSAGE_TEXT,
                            v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
    IF v_state !~ '^TL' THEN
        RAISE;
    END IF;
    answer := jsonb_build_object('error', jsonb_build_object(
        'state', v_state, 'code', v_code, 'detail', v_detail, 'hint', v_hint));
END $$;

-- Prepares the usage events p_items of a coalesced batch (item numbers;
-- no event twice) and claims those to record in one INSERT, in (source,
-- event_id) order as tl_record_usage_batch claims its own. An event claimed
-- meanwhile by a request that has committed since (the INSERT waited for
-- it) is that request's duplicate: prepared again, it answers so. Each
-- item's answer (when it has one now), or its claimed row and spend-policy
-- flag, go to its place in the batch's arrays.
CREATE OR REPLACE FUNCTION tl_usage_batch_claim(
    p_items integer[], p_args jsonb[], p_ctxs jsonb[],
    INOUT answers jsonb[], INOUT events usage_events[], INOUT violations text[])
LANGUAGE plpgsql AS $$
DECLARE
    v record;
    v_new usage_events[] := '{}';
    v_ids uuid[];
    v_i integer;
BEGIN
    FOREACH v_i IN ARRAY p_items LOOP
        v := tl_usage_batch_prepare(p_args[v_i], p_ctxs[v_i]);
        answers[v_i] := v.answer;
        events[v_i] := v.event;
        violations[v_i] := v.violation;
        IF v.answer IS NULL THEN
            v_new := v_new || v.event;
        END IF;
    END LOOP;
    IF cardinality(v_new) = 0 THEN
        RETURN;
    END IF;
    WITH claimed AS (
        INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                                  cached_input_tokens, output_tokens, cost, reservation_id, project, tags,
                                  occurred_at, recorded_at)
        SELECT e.id, e.source, e.event_id, e.account_id, e.model, e.price_id, e.input_tokens,
               e.cached_input_tokens, e.output_tokens, e.cost, e.reservation_id, e.project, e.tags,
               e.occurred_at, clock_timestamp()
          FROM unnest(v_new) e
         ORDER BY e.source, e.event_id
        ON CONFLICT (source, event_id) DO NOTHING
        RETURNING id)
    SELECT array_agg(id) INTO v_ids FROM claimed;
    FOREACH v_i IN ARRAY p_items LOOP
        CONTINUE WHEN answers[v_i] IS NOT NULL OR (events[v_i]).id = ANY (coalesce(v_ids, '{}'));
        v := tl_usage_batch_prepare(p_args[v_i], p_ctxs[v_i]);
        IF v.answer IS NULL THEN
            RAISE EXCEPTION 'tl_execute_batch: usage event % was claimed elsewhere, and is not recorded',
                            p_args[v_i] ->> 'event_id';
        END IF;
        answers[v_i] := v.answer;
        events[v_i] := NULL;
        violations[v_i] := NULL;
    END LOOP;
END $$;

-- The working row of tl_record_usage_batch, one per event of the batch.
-- Change it under a new name (a type in use cannot be altered in place).
DO $$
BEGIN
    IF to_regtype('tl_usage_batch_item') IS NULL THEN
        CREATE TYPE tl_usage_batch_item AS (
            pos integer, source text, event_id text, account text, model text,
            input_tokens bigint, cached_input_tokens bigint, output_tokens bigint,
            occurred_at timestamptz, project text, tags jsonb, reservation text, reservation_id uuid,
            account_id bigint, price_id uuid, price_model text, cost bigint, id uuid, txn uuid,
            status text, code text, result jsonb);
    END IF;
END $$;

-- The answer of tl_record_usage_batch from its working rows (the status
-- 'pending' of a claimed event is 'recorded'). plpgsql, so that the plan
-- is kept for the session (a SQL function would plan it at every call).
CREATE OR REPLACE FUNCTION tl_usage_batch_answer(p_rows tl_usage_batch_item[]) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('results', (
        SELECT jsonb_agg(
                   -- An event charged in this batch has no null to strip:
                   -- built directly (jsonb_strip_nulls builds it twice).
                   CASE WHEN b.status = 'recorded' AND b.txn IS NOT NULL AND b.event_id IS NOT NULL
                        THEN jsonb_build_object('event_id', b.event_id, 'status', 'recorded', 'cost', b.cost,
                                                'id', b.id, 'transaction_id', b.txn)
                             -- Spend policy: what went to system:overage (events recorded one by one).
                             || CASE WHEN b.result ? 'shortfall'
                                     THEN jsonb_build_object('shortfall', b.result -> 'shortfall')
                                     ELSE '{}'::jsonb END
                        ELSE jsonb_strip_nulls(jsonb_build_object(
                            'event_id', b.event_id, 'status', b.status, 'code', b.code,
                            'cost', CASE WHEN b.mine THEN b.cost ELSE (b.result ->> 'cost')::bigint END,
                            'id', b.id, 'transaction_id', b.txn,
                            'shortfall', (b.result ->> 'shortfall')::bigint)) END
                   ORDER BY b.pos)
        -- An event this batch claimed and recorded (mine) has no answer in
        -- `result`: its id, transaction and cost are the working row's. One
        -- recorded alone (tl_record_usage), or a duplicate, answers by
        -- `result`; a rejected one answers no id, transaction nor cost.
        FROM (SELECT w.pos, w.event_id, s.status, w.code, w.cost, s.mine, s.result,
                     CASE WHEN s.mine THEN tl_public_id('evt_', w.id) ELSE s.result ->> 'id' END AS id,
                     CASE WHEN s.mine THEN tl_public_id('txn_', w.txn) ELSE s.result ->> 'transaction_id' END AS txn
              FROM unnest(p_rows) w
              CROSS JOIN LATERAL (
                  SELECT CASE WHEN w.status IN ('pending', 'recorded_single') THEN 'recorded' ELSE w.status END AS status,
                         w.status IN ('pending', 'recorded') AND w.result IS NULL AS mine,
                         CASE WHEN w.status <> 'rejected' THEN w.result END AS result) s) b));
END $$;

-- The roll-up sums (tl_usage_rollup_sums) of the events tl_record_usage_batch
-- records, from its working rows.
CREATE OR REPLACE FUNCTION tl_usage_batch_sums(
    p_rows tl_usage_batch_item[],
    OUT days date[], OUT accounts bigint[], OUT models text[], OUT projects text[], OUT events bigint[],
    OUT input_tokens bigint[], OUT cached_input_tokens bigint[], OUT output_tokens bigint[],
    OUT credits bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    SELECT array_agg(s.d), array_agg(s.a), array_agg(s.m), array_agg(s.p), array_agg(s.n),
           array_agg(s.i), array_agg(s.ci), array_agg(s.o), array_agg(s.c)
    INTO days, accounts, models, projects, events, input_tokens, cached_input_tokens, output_tokens, credits
    FROM (SELECT (w.occurred_at AT TIME ZONE 'UTC')::date AS d, w.account_id AS a, w.model AS m,
                 coalesce(w.project, '') AS p, count(*) AS n, sum(w.input_tokens)::bigint AS i,
                 sum(w.cached_input_tokens)::bigint AS ci, sum(w.output_tokens)::bigint AS o,
                 sum(w.cost)::bigint AS c
          FROM unnest(p_rows) w WHERE w.status IN ('pending', 'recorded')
          GROUP BY 1, 2, 3, 4) s;
END $$;

-- The accounts a usage batch charges directly (claimed, priced, no
-- reservation), in lock order, each with the transaction its charge posts,
-- its total and its number of events: built before the locks, and again
-- after tl_usage_batch_fit rejected some.
CREATE OR REPLACE FUNCTION tl_usage_batch_totals(
    p_rows tl_usage_batch_item[],
    OUT charged bigint[], OUT txns uuid[], OUT totals bigint[], OUT counts bigint[])
LANGUAGE plpgsql AS $$
BEGIN
    SELECT array_agg(s.account_id ORDER BY s.account_id), array_agg(s.txn ORDER BY s.account_id),
           array_agg(s.total ORDER BY s.account_id), array_agg(s.n ORDER BY s.account_id)
    INTO charged, txns, totals, counts
    FROM (SELECT w.account_id, (array_agg(w.txn))[1] AS txn, sum(w.cost)::bigint AS total, count(*) AS n
          FROM unnest(p_rows) w
          WHERE w.status = 'pending' AND w.reservation IS NULL AND w.cost > 0 GROUP BY w.account_id) s;
END $$;

-- tl_record_usage_batch's steps (below), each a function called once per
-- batch: the working rows (tl_usage_batch_item[]) go in and come back, and
-- every statement is the set-based one it was when the steps were written
-- out in one body.

-- Step 1, before any lock: the batch's working rows.
-- Runs inside tl_record_usage_batch, under its settings (generic plans, no
-- sequential scans): called once per batch, never per event.
CREATE OR REPLACE FUNCTION tl_usage_batch_rows(p_events jsonb, p_ctx jsonb) RETURNS tl_usage_batch_item[]
LANGUAGE plpgsql AS $$
DECLARE
    v_rows tl_usage_batch_item[];
BEGIN
    -- Parse, and answer what needs no lock: repeats within the batch (later
    -- ones answer like the first), events recorded before (their stored
    -- answer), unknown or system accounts, unknown reservations, prices
    -- (looked up once per model and instant, not per event). Each new event
    -- gets its id (in claim order) and each account charged directly the id
    -- of its `usage` transaction, so the row to claim is final: status
    -- 'pending' here means "claimed, to be recorded".
    WITH e AS (
        SELECT x.pos::integer AS pos, x.v ->> 'source' AS source, x.v ->> 'event_id' AS event_id, x.v ->> 'account' AS account,
               x.v ->> 'model' AS model, (x.v ->> 'input_tokens')::bigint AS input_tokens,
               coalesce((x.v ->> 'cached_input_tokens')::bigint, 0) AS cached_input_tokens,
               (x.v ->> 'output_tokens')::bigint AS output_tokens,
               coalesce((x.v ->> 'occurred_at')::timestamptz, tl_now(p_ctx)) AS occurred_at,
               x.v ->> 'project' AS project, coalesce(nullif(x.v -> 'tags', 'null'::jsonb), '{}'::jsonb) AS tags,
               x.v ->> 'reservation' AS reservation, (x.v ->> 'reservation_id')::uuid AS reservation_id,
               x.pos > min(x.pos) OVER (PARTITION BY x.v ->> 'source', x.v ->> 'event_id') AS repeat,
               x.v IS DISTINCT FROM first_value(x.v) OVER (
                   PARTITION BY x.v ->> 'source', x.v ->> 'event_id' ORDER BY x.pos) AS repeat_differs,
               x.v AS raw
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS x (v, pos)),
    -- Tables are reached only by key (= ANY, or per event), never joined
    -- whole: the generic plan is kept for the session, and one made while a
    -- table was small would otherwise go on hashing all of it at every batch.
    a AS (
        SELECT a.id, a.type, a.address, a.policy_bound,
               -- A key limited to departments (tl_key_in_scope).
               CASE WHEN p_ctx ? 'departments' THEN tl_key_in_scope(a, p_ctx) ELSE true END AS in_scope
        FROM accounts a
        WHERE a.address = ANY (ARRAY(SELECT DISTINCT account FROM e))),
    r AS (
        SELECT r.id, r.account_id, r.details FROM reservations r
        WHERE r.id = ANY (ARRAY(SELECT reservation_id FROM e WHERE reservation IS NOT NULL))
          -- One the caller may not act on is, to it, not found.
          AND tl_may_act_on(r, p_ctx)),
    c AS (
        SELECT e.*, u.result AS stored, u.differs, a.id AS account_id, a.type AS account_type,
               a.policy_bound AS bound, coalesce(a.in_scope, true) AS in_scope,
               r.id AS res_id, r.account_id AS res_account,
               -- An event settling a reservation made by estimate is priced at that reservation's price.
               CASE WHEN r.details ? 'price_id'
                    THEN (SELECT rp FROM prices rp WHERE rp.id = (r.details ->> 'price_id')::uuid) END AS res_price,
               NOT e.repeat AND u.result IS NULL AND a.id IS NOT NULL AS priced
        FROM e
        -- OFFSET 0 keeps this a probe per event, as in tl_spend_rollup:
        -- without it the planner may flatten the subquery into a join, and
        -- the generic plan a session made while usage_events was small read
        -- the whole table at every batch (tests/db/test_usage_claims.py).
        LEFT JOIN LATERAL (
            SELECT tl_usage_brief(u) AS result, tl_usage_differs(u, e.raw) AS differs FROM usage_events u
            WHERE u.source = e.source AND u.event_id = e.event_id AND u.result IS NOT NULL
            OFFSET 0) u ON true
        LEFT JOIN a ON a.address = e.account
        LEFT JOIN r ON e.reservation IS NOT NULL AND r.id = e.reservation_id),
    -- The price versions of the models named, each with the instant the
    -- next one takes over: tl_price_at() by a join, since events without
    -- occurred_at each have an instant of their own (clock_timestamp()).
    p AS MATERIALIZED (
        SELECT pr AS price, pr.model, pr.effective_from,
               lead(pr.effective_from) OVER (PARTITION BY pr.model ORDER BY pr.effective_from) AS until
        FROM prices pr WHERE pr.model IN (SELECT model FROM c WHERE priced AND res_price IS NULL)),
    k AS (
        SELECT c.*, (q.price).id AS price_id, (q.price).model AS price_model,
               CASE WHEN (q.price).id IS NOT NULL
                    THEN CASE WHEN c.input_tokens < 0 OR c.cached_input_tokens < 0 OR c.output_tokens < 0
                                   OR c.cached_input_tokens > c.input_tokens
                              -- (which raises invalid_request)
                              THEN tl_usage_cost(q.price, c.input_tokens, c.cached_input_tokens, c.output_tokens)
                              -- tl_usage_cost's arithmetic, written out: a plpgsql
                              -- call per event cost more than the sum itself.
                              ELSE div((c.input_tokens - c.cached_input_tokens)::numeric * (q.price).input_per_mtok
                                       + c.cached_input_tokens::numeric * (q.price).cached_input_per_mtok
                                       + c.output_tokens::numeric * (q.price).output_per_mtok
                                       + 999999, 1000000)::bigint END END AS cost,
               -- An event recorded before answers by that record (duplicate,
               -- or reused key when it says something else); one new to this
               -- batch, repeated in it, by its first occurrence.
               CASE WHEN c.stored IS NOT NULL AND c.differs THEN 'rejected'
                    WHEN c.stored IS NOT NULL THEN 'duplicate'
                    WHEN c.repeat AND c.repeat_differs THEN 'rejected'
                    WHEN c.repeat THEN 'repeat'
                    WHEN NOT c.in_scope THEN 'rejected'
                    WHEN c.account_id IS NULL OR c.account_type = 'system'
                      OR c.reservation IS NOT NULL AND (c.res_id IS NULL OR c.res_account <> c.account_id)
                      OR (q.price).id IS NULL OR (q.price).model <> c.model THEN 'rejected'
                    -- Spend policy: a bound account's events go through tl_record_usage.
                    WHEN c.bound THEN 'single'
                    ELSE 'pending' END AS status,
               CASE WHEN c.stored IS NOT NULL AND c.differs OR c.stored IS NULL AND c.repeat AND c.repeat_differs
                    THEN 'idempotency_key_reused'
                    WHEN c.repeat OR c.stored IS NOT NULL THEN NULL
                    WHEN NOT c.in_scope THEN 'forbidden'
                    WHEN c.account_type = 'system' THEN 'invalid_request'
                    WHEN c.account_id IS NULL AND c.account LIKE 'employee:%' THEN 'employee_not_found'
                    WHEN c.account_id IS NULL AND c.account LIKE 'department:%' THEN 'department_not_found'
                    WHEN c.account_id IS NULL THEN 'account_not_found'
                    WHEN c.reservation IS NOT NULL AND c.res_id IS NULL THEN 'reservation_not_found'
                    WHEN c.reservation IS NOT NULL AND c.res_account <> c.account_id THEN 'invalid_request'
                    WHEN (q.price).id IS NULL OR (q.price).model <> c.model THEN 'unknown_model' END AS code
        FROM c
        LEFT JOIN p ON c.priced AND c.res_price IS NULL AND p.model = c.model
                   AND p.effective_from <= c.occurred_at AND (p.until IS NULL OR c.occurred_at < p.until)
        CROSS JOIN LATERAL (SELECT CASE WHEN c.priced THEN coalesce(c.res_price, p.price) END AS price) q),
    t AS (
        SELECT account_id, tl_uuid7() AS txn FROM k
        WHERE status = 'pending' AND reservation IS NULL AND cost > 0 GROUP BY account_id),
    -- The volatile tl_uuid7() is evaluated after the sort: ids in claim order.
    w AS (
        SELECT k.*, t.txn, CASE WHEN k.status = 'pending' THEN tl_uuid7() END AS id
        FROM k LEFT JOIN t ON k.status = 'pending' AND k.reservation IS NULL AND k.cost > 0
                          AND t.account_id = k.account_id
        ORDER BY k.source, k.event_id)
    SELECT array_agg(ROW(
           w.pos, w.source, w.event_id, w.account, w.model, w.input_tokens, w.cached_input_tokens,
           w.output_tokens, w.occurred_at, w.project, w.tags, w.reservation, w.res_id, w.account_id,
           w.price_id, w.price_model, w.cost, w.id, w.txn, w.status, w.code,
           -- A duplicate's id, cost, transaction and shortfall
           -- (tl_usage_brief). A claimed event has none: the batch's answer
           -- reads them from the working row.
           CASE WHEN w.status = 'duplicate' THEN w.stored END
           )::tl_usage_batch_item ORDER BY w.pos)
    INTO v_rows
    FROM w;
    RETURN v_rows;
END $$;

-- Step 2, for a key with a rate cap only.
    -- A capped key's spend rate (tl_key_charge): its row locked before any
    -- event is claimed, the events it would charge counted in batch order,
    -- and each one that would pass the cap rejected alone (key_rate_limited).
    -- The events of a closed wallet are rejected first (account_closed, as
    -- tl_usage_batch_fit would under the lock), so that they do not count;
    -- tl_record_usage_batch gives back the count of any other counted event
    -- that ends up charging nothing.
CREATE OR REPLACE FUNCTION tl_usage_batch_key_cap(p_rows tl_usage_batch_item[], p_ctx jsonb)
RETURNS tl_usage_batch_item[] LANGUAGE plpgsql AS $$
DECLARE
    v_minute timestamptz;
    v_key_spent bigint;
    v_closed integer[];
BEGIN
    SELECT array_agg(w.pos) INTO v_closed
      FROM unnest(p_rows) w JOIN accounts a ON a.id = w.account_id
     WHERE w.status IN ('pending', 'single') AND w.reservation IS NULL AND coalesce(w.cost, 0) > 0
       AND a.status <> 'open';
    FOR i IN 1 .. coalesce(cardinality(v_closed), 0) LOOP
        p_rows[v_closed[i]].status := 'rejected';
        p_rows[v_closed[i]].code := 'account_closed';
    END LOOP;
    PERFORM tl_key_lock(ARRAY[p_ctx]);
    v_minute := date_trunc('minute', tl_now(p_ctx), 'UTC');
    SELECT CASE WHEN s.minute = v_minute THEN s.spent ELSE 0 END INTO v_key_spent
      FROM key_spend s WHERE s.actor = p_ctx ->> 'actor';
    FOR i IN 1 .. coalesce(cardinality(p_rows), 0) LOOP
        CONTINUE WHEN p_rows[i].status NOT IN ('pending', 'single') OR p_rows[i].reservation IS NOT NULL
                      OR coalesce(p_rows[i].cost, 0) <= 0;
        IF v_key_spent + p_rows[i].cost > (p_ctx ->> 'rate_limit')::bigint THEN
            p_rows[i].status := 'rejected';
            p_rows[i].code := 'key_rate_limited';
        ELSE
            v_key_spent := v_key_spent + p_rows[i].cost;
        END IF;
    END LOOP;
    UPDATE key_spend SET spent = v_key_spent, minute = v_minute WHERE actor = p_ctx ->> 'actor';
    RETURN p_rows;
END $$;

-- Step 4, under the account locks, for the accounts charged directly (p_charged,
-- with the totals of their events, p_totals): a closed one rejects all its
-- events; an open one is brought up to now (only when something is due).
-- Answers the rows, and how many of them became 'rejected' or 'single'.
-- Runs inside tl_record_usage_batch, under its settings (generic plans, no
-- sequential scans): called once per batch, never per event.
CREATE OR REPLACE FUNCTION tl_usage_batch_fit(p_rows tl_usage_batch_item[], p_charged bigint[], p_totals bigint[],
                                              p_now timestamptz, p_ctx jsonb,
                                              OUT o_rows tl_usage_batch_item[], OUT o_rejected integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_acc record;
    v_left bigint;
    v_pos integer[];
    v_differs boolean[];
BEGIN
    o_rejected := 0;
    -- (Spend policy: an account bound by a policy set since the events
    -- were sorted out goes one by one too, now that it is locked.)
    IF EXISTS (SELECT 1 FROM accounts a WHERE a.id = ANY (p_charged) AND (a.status <> 'open' OR a.policy_bound)) THEN
        SELECT array_agg(w.pos), array_agg(a.status <> 'open') INTO v_pos, v_differs
        FROM unnest(p_rows) w JOIN accounts a ON a.id = w.account_id
        WHERE a.id = ANY (p_charged) AND (a.status <> 'open' OR a.policy_bound) AND w.status = 'pending';
        FOR i IN 1 .. coalesce(cardinality(v_pos), 0) LOOP
            IF v_differs[i] THEN
                p_rows[v_pos[i]].status := 'rejected';
                p_rows[v_pos[i]].code := 'account_closed';
            ELSE
                p_rows[v_pos[i]].status := 'single';
            END IF;
            o_rejected := o_rejected + 1;
        END LOOP;
    END IF;
    FOR v_acc IN
        SELECT a.id FROM accounts a
        WHERE a.id = ANY (p_charged) AND a.status = 'open' AND (
              EXISTS (SELECT 1 FROM reservations r WHERE r.account_id = a.id AND r.status = 'active'
                                                     AND r.expires_at <= p_now)
           OR EXISTS (SELECT 1 FROM lots l WHERE l.account_id = a.id AND l.rollover_max IS NOT NULL
                                             AND l.rolled_at IS NULL AND l.expires_at <= p_now)
           OR EXISTS (SELECT 1 FROM lots l WHERE l.account_id = a.id AND l.status = 'voided'
                                             AND l.live AND l.remaining > l.reserved)
           OR EXISTS (SELECT 1 FROM lots l WHERE l.account_id = a.id AND l.status = 'active'
                                             AND l.live AND l.remaining > l.reserved
                                             AND l.expires_at <= p_now))
        ORDER BY a.id
    LOOP
        PERFORM tl_expire_due(v_acc.id, p_now, p_ctx);
    END LOOP;
    -- Where an account's events do not all fit, reject in batch order
    -- those that do not fit what the earlier ones left.
    FOR v_acc IN
        SELECT n.account_id, coalesce(sum(l.remaining - l.reserved), 0)::bigint AS spendable
        FROM unnest(p_charged, p_totals) AS n (account_id, total)
        LEFT JOIN lots l ON l.account_id = ANY (p_charged) AND l.account_id = n.account_id
                        AND l.status = 'active' AND l.live
                        AND l.remaining > l.reserved AND l.effective_at <= p_now
                        AND (l.expires_at IS NULL OR l.expires_at > p_now)
        GROUP BY n.account_id, n.total
        HAVING n.total > coalesce(sum(l.remaining - l.reserved), 0)
        ORDER BY n.account_id
    LOOP
        v_left := v_acc.spendable;
        SELECT array_agg(w.pos ORDER BY w.pos) INTO v_pos FROM unnest(p_rows) w
        WHERE w.account_id = v_acc.account_id AND w.status = 'pending' AND w.reservation IS NULL AND w.cost > 0;
        -- (None left pending when the account is closed.)
        FOR i IN 1 .. coalesce(cardinality(v_pos), 0) LOOP
            IF p_rows[v_pos[i]].cost <= v_left THEN
                v_left := v_left - p_rows[v_pos[i]].cost;
            ELSE
                -- Never dropped: recorded by tl_record_usage later
                -- (tl_usage_batch_settle), its shortfall charged to system:overage.
                p_rows[v_pos[i]].status := 'single';
                o_rejected := o_rejected + 1;
            END IF;
        END LOOP;
    END LOOP;
    o_rows := p_rows;
END $$;

-- Step 5, the charge.
    -- Charge: one `usage` transaction per account (the id its events were
    -- claimed with), its lots consumed in consumption order, its balance and
    -- system:usage's moved once each.
-- Runs inside tl_record_usage_batch, under its settings (generic plans, no
-- sequential scans): called once per batch, never per event.
CREATE OR REPLACE FUNCTION tl_usage_batch_charge(p_charged bigint[], p_txns uuid[], p_totals bigint[],
                                                 p_counts bigint[], p_now timestamptz, p_ctx jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_taken bigint;
BEGIN
    INSERT INTO transactions (id, kind, memo, metadata, details, actor, request_id, created_at)
    SELECT t.id, 'usage', NULL, '{}'::jsonb, jsonb_build_object('batch', true, 'events', t.n),
           p_ctx ->> 'actor', p_ctx ->> 'request_id', p_now
    FROM unnest(p_txns, p_counts) WITH ORDINALITY AS t (id, n, ord) ORDER BY t.ord;
    WITH need AS (
        SELECT * FROM unnest(p_charged, p_txns, p_totals) AS n (account_id, txn, total)),
    live AS (
        SELECT l.id, n.txn, n.total, l.remaining - l.reserved AS free,
               coalesce(sum(l.remaining - l.reserved) OVER (
                   PARTITION BY l.account_id ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
        FROM need n JOIN lots l ON l.account_id = ANY (p_charged) AND l.account_id = n.account_id
        WHERE l.status = 'active' AND l.live AND l.remaining > l.reserved
          AND l.effective_at <= p_now AND (l.expires_at IS NULL OR l.expires_at > p_now)),
    taken AS (
        SELECT id, txn, least(free, total - before)::bigint AS take FROM live WHERE before < total),
    moved AS (
        UPDATE lots l SET remaining = l.remaining - t.take FROM taken t
        WHERE l.id = ANY (ARRAY(SELECT id FROM taken)) AND l.id = t.id
        RETURNING t.id, t.txn, t.take),
    logged AS (
        INSERT INTO lot_movements (transaction_id, lot_id, amount)
        SELECT txn, id, -take FROM moved RETURNING amount)
    SELECT coalesce(-sum(amount), 0) INTO v_taken FROM logged;
    ASSERT v_taken = (SELECT sum(x) FROM unnest(p_totals) x),
        'tl_record_usage_batch: spendable credits changed under a held lock';
    PERFORM tl_post_entries(array_agg(l.txn ORDER BY l.ord, l.leg), array_agg(l.account ORDER BY l.ord, l.leg),
                            array_agg(l.amount ORDER BY l.ord, l.leg), p_now)
    FROM (SELECT n.ord, 1 AS leg, n.txn, n.account, -n.total AS amount
          FROM unnest(p_txns, p_charged, p_totals) WITH ORDINALITY AS n (txn, account, total, ord)
          UNION ALL
          SELECT n.ord, 2, n.txn, tl_account_id('system:usage'), n.total
          FROM unnest(p_txns, p_totals) WITH ORDINALITY AS n (txn, total, ord)) l;
END $$;

-- Step 6, only in a batch where not every claimed event was recorded by the
-- charge (a reservation, a bound account, credits that do not cover, a
-- repeated event): the rest, one at a time.
    -- Events that settle a reservation, one at a time (each fails alone):
    -- a capture with the priced cost, or a release when it cost nothing.
CREATE OR REPLACE FUNCTION tl_usage_batch_settle(p_rows tl_usage_batch_item[], p_events jsonb, p_ctx jsonb)
RETURNS tl_usage_batch_item[] LANGUAGE plpgsql AS $$
DECLARE
    v_e record;
    v_txn uuid;
    v_res jsonb;
    v_code text;
    v_pos integer[];
    v_codes text[];
    v_statuses text[];
    v_results jsonb[];
BEGIN
    SELECT array_agg(pos ORDER BY pos) INTO v_pos FROM unnest(p_rows)
    WHERE status = 'pending' AND reservation IS NOT NULL;
    FOR i IN 1 .. coalesce(cardinality(v_pos), 0) LOOP
        v_e := p_rows[v_pos[i]];
        BEGIN
            v_txn := NULL;
            IF v_e.cost > 0 THEN
                v_txn := (tl_capture(jsonb_build_object(
                    'reservation', v_e.reservation, 'reservation_id', v_e.reservation_id, 'amount', v_e.cost,
                    'metadata', jsonb_build_object('usage_event', v_e.event_id, 'model', v_e.price_model)),
                    p_ctx)).o_txn;
            ELSE
                PERFORM tl_op_release(jsonb_build_object('reservation', v_e.reservation,
                                                         'reservation_id', v_e.reservation_id), p_ctx);
            END IF;
            -- Recorded: its answer is its row (tl_usage_answer).
            UPDATE usage_events SET transaction_id = v_txn, result = '{}'::jsonb WHERE id = v_e.id;
            p_rows[v_e.pos].status := 'recorded';
            p_rows[v_e.pos].txn := v_txn;
        EXCEPTION WHEN SQLSTATE 'TLA01' OR SQLSTATE 'TLA02' OR SQLSTATE 'TLA03' OR SQLSTATE 'TLA05'
                     OR SQLSTATE 'TLA08' OR SQLSTATE 'TLB01' OR SQLSTATE 'TLB02' OR SQLSTATE 'TLB04'
                     OR SQLSTATE 'TLD01' THEN
            GET STACKED DIAGNOSTICS v_code = MESSAGE_TEXT;
            DELETE FROM usage_events WHERE id = v_e.id;
            p_rows[v_e.pos].status := 'rejected';
            p_rows[v_e.pos].code := v_code;
        END;
    END LOOP;
    -- Events of bound accounts, and those their account could not cover
    -- in full, one at a time through tl_record_usage (each fails alone).
    SELECT array_agg(pos ORDER BY pos) INTO v_pos FROM unnest(p_rows) WHERE status = 'single';
    FOR i IN 1 .. coalesce(cardinality(v_pos), 0) LOOP
        v_e := p_rows[v_pos[i]];
        BEGIN
            -- Counted against the key's cap already (tl_usage_batch_key_cap).
            v_res := tl_record_usage(p_events -> (v_e.pos - 1), p_ctx - 'rate_limit');
            p_rows[v_e.pos].status := CASE WHEN (v_res ->> 'status')::integer = 201 THEN 'recorded_single'
                                           ELSE 'duplicate' END;
            p_rows[v_e.pos].result := (v_res -> 'body') - 'status';
            p_rows[v_e.pos].cost := (v_res #>> '{body,cost}')::bigint;
            p_rows[v_e.pos].txn := replace(v_res #>> '{body,transaction_id}', 'txn_', '')::uuid;
        EXCEPTION WHEN SQLSTATE 'TLA01' OR SQLSTATE 'TLA02' OR SQLSTATE 'TLA03' OR SQLSTATE 'TLA05'
                     OR SQLSTATE 'TLA08' OR SQLSTATE 'TLB01' OR SQLSTATE 'TLB02' OR SQLSTATE 'TLB04'
                     OR SQLSTATE 'TLB08' OR SQLSTATE 'TLC01' OR SQLSTATE 'TLD01' THEN
            GET STACKED DIAGNOSTICS v_code = MESSAGE_TEXT;
            p_rows[v_e.pos].status := 'rejected';
            p_rows[v_e.pos].code := v_code;
        END;
    END LOOP;
    -- Repeats within the batch answer like their first occurrence did.
    SELECT array_agg(b.pos),
           array_agg(CASE WHEN o.status IN ('pending', 'recorded', 'recorded_single', 'duplicate') THEN 'duplicate'
                          ELSE o.status END),
           array_agg(o.code),
           -- (One this batch recorded has its answer in its row, not in `result`.)
           array_agg(CASE WHEN o.status IN ('pending', 'recorded') AND o.result IS NULL
                          THEN jsonb_build_object('id', tl_public_id('evt_', o.id), 'cost', o.cost,
                                                  'transaction_id', tl_public_id('txn_', o.txn))
                          ELSE o.result END)
    INTO v_pos, v_statuses, v_codes, v_results
    FROM unnest(p_rows) b JOIN unnest(p_rows) o ON o.source = b.source AND o.event_id = b.event_id
    WHERE b.status = 'repeat' AND o.status <> 'repeat';
    FOR i IN 1 .. coalesce(cardinality(v_pos), 0) LOOP
        p_rows[v_pos[i]].status := v_statuses[i];
        p_rows[v_pos[i]].code := v_codes[i];
        p_rows[v_pos[i]].result := v_results[i];
    END LOOP;
    RETURN p_rows;
END $$;

-- Records a batch of usage events in one database transaction, set-based:
-- duplicates (earlier ones and within the batch), unknown accounts, models
-- and reservations are sorted out with joins; every new event, reservation
-- or not, is claimed in one INSERT sorted by (source, event_id); then all
-- the accounts they charge are locked in one ordered statement (after the
-- claims, so a concurrent duplicate never waits on us while we wait on its
-- account), each locked account is expired only if it has anything due, and
-- charged once, in a single `usage` transaction for all its accepted
-- events, with one statement per table for all accounts. Events that do not
-- fit an account's available credits, in batch order (a loop over that
-- account's events only when they do not all fit), and every event of an
-- account bound by a spend policy, are recorded afterwards one at a time by
-- tl_record_usage (overdraft, shortfall to system:overage, policy). Events
-- that settle a reservation capture or release it one at a time (each fails
-- alone). The roll-ups are written last, once per key, in key order.
--
-- The account row locks are held from tl_lock to COMMIT, and batches over
-- the same accounts queue for them, so whatever needs no lock is done
-- before it: the transaction id of each account's `usage` transaction is
-- chosen up front, so each event is claimed once with its final row (its
-- transaction id, and `result` `{}`: recorded; the reference to transactions is
-- deferred to COMMIT for that, the transaction row being written after the
-- lock), and the answer and the roll-up sums are built before the lock on
-- the assumption that every claimed event is recorded. In the rare batch
-- where that is not so (a closed account, credits that do not cover, a
-- reservation, a repeated event), v_changed is set, and the rejected claims
-- are deleted and the answer and the roll-ups rebuilt after the charge.
-- Returns {results: [{event_id, status, code?, cost?, id?, transaction_id?}]}.
CREATE OR REPLACE FUNCTION tl_record_usage_batch(p_events jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql
-- Generic plans: a parameter's value (the batch, the working rows, v_now)
-- tells the planner nothing here, and the custom plans it otherwise makes
-- now and then cost CPU (planning: 1.2% -> 0.7% of the backend's samples).
SET plan_cache_mode = force_generic_plan
-- Every table is reached by key (accounts by address or id, usage_events by
-- (source, event_id), lots by account, prices by model): the indexes whatever
-- the statistics say, as under tl_execute_batch. A cached generic plan made
-- with the statistics of a small, fresh table would otherwise scan the whole
-- table at every batch once it has grown.
SET enable_seqscan = off
AS $$
DECLARE
    v_now timestamptz;
    v_changed boolean;
    v_rejected integer := 0;
    v_accounts bigint[];
    v_charged bigint[];
    v_txns uuid[];
    v_totals bigint[];
    v_counts bigint[];
    v_answer jsonb;
    v_rollup record;
    v_rows tl_usage_batch_item[];
    v_pos integer[];
    v_results jsonb[];
    v_differs boolean[];
    v_try integer;
    v_tag_keys text[];
    v_counted integer[];
BEGIN
    -- The working rows are an array (v_rows[pos] is event pos), not a
    -- temporary table: emptying one at commit rebuilt its indexes, which
    -- invalidated the plan of every statement that used it, so each batch
    -- planned them all again; and every event was written to it (with its
    -- index entries) once more than to usage_events.

    -- 1. Parse, price and sort out the events (tl_usage_batch_rows).
    v_rows := tl_usage_batch_rows(p_events, p_ctx);

    -- 2. A capped key's spend rate (tl_usage_batch_key_cap), and the events
    -- it counted.
    IF p_ctx ? 'rate_limit' THEN
        v_rows := tl_usage_batch_key_cap(v_rows, p_ctx);
        v_counted := ARRAY(SELECT pos FROM unnest(v_rows)
                           WHERE status IN ('pending', 'single') AND reservation IS NULL AND cost > 0);
    END IF;

    -- 3. Claim the new events in key order, each with its final row (an event
    -- that settles a reservation without its answer, which needs the
    -- capture's transaction). One claimed meanwhile by a concurrent request
    -- is a duplicate (the INSERT waited for that request to commit).
    --
    -- As a plain INSERT: the events recorded before were found above, so a
    -- conflict means a concurrent claim, which is rare; and ON CONFLICT DO
    -- NOTHING would cost each row a speculative insertion (a probe of the
    -- key, then a confirmation record), about half again what the row costs.
    -- When the INSERT meets a key claimed meanwhile, it is undone (its
    -- subtransaction), the events claimed elsewhere are answered, and the
    -- rest are claimed again.
    FOR v_try IN 1 .. 10 LOOP
        BEGIN
            INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                                      cached_input_tokens, output_tokens, cost, transaction_id, reservation_id,
                                      project, tags, occurred_at, recorded_at, result)
            SELECT w.id, w.source, w.event_id, w.account_id, w.model, w.price_id, w.input_tokens,
                   w.cached_input_tokens, w.output_tokens, w.cost, w.txn, w.reservation_id, w.project, w.tags,
                   w.occurred_at, clock_timestamp(), CASE WHEN w.reservation IS NULL THEN '{}'::jsonb END
            FROM unnest(v_rows) w WHERE w.status = 'pending' ORDER BY w.source, w.event_id;
            EXIT;
        EXCEPTION WHEN unique_violation THEN
            -- Claimed by a request that has committed since (the INSERT waited
            -- for it): a duplicate, or a reused key when it says otherwise.
            SELECT array_agg(w.pos), array_agg(tl_usage_brief(u)),
                   array_agg(tl_usage_differs(u, p_events -> (w.pos - 1)))
            INTO v_pos, v_results, v_differs
            FROM unnest(v_rows) w JOIN usage_events u ON u.source = w.source AND u.event_id = w.event_id
            WHERE w.status = 'pending';
            ASSERT v_try < 10 AND v_pos IS NOT NULL, 'tl_record_usage_batch: the claim keeps meeting claimed keys';
            FOR i IN 1 .. cardinality(v_pos) LOOP
                IF v_differs[i] THEN
                    v_rows[v_pos[i]].status := 'rejected';
                    v_rows[v_pos[i]].code := 'idempotency_key_reused';
                ELSE
                    v_rows[v_pos[i]].status := 'duplicate';
                    v_rows[v_pos[i]].result := v_results[i];
                END IF;
            END LOOP;
        END;
    END LOOP;

    -- Everything the lock does not change, built now: the accounts to lock,
    -- those charged directly with their totals, the answer and the roll-up
    -- sums as if every claimed event is recorded.
    SELECT array_agg(DISTINCT account_id) FILTER (WHERE status = 'pending' AND (reservation IS NOT NULL OR cost > 0)),
           coalesce(bool_or(status IN ('repeat', 'single') OR status = 'pending' AND reservation IS NOT NULL), false)
    INTO v_accounts, v_changed
    FROM unnest(v_rows);
    SELECT * INTO v_charged, v_txns, v_totals, v_counts FROM tl_usage_batch_totals(v_rows);
    IF NOT v_changed THEN
        v_answer := tl_usage_batch_answer(v_rows);
        v_rollup := tl_usage_batch_sums(v_rows);
    END IF;

    -- Lock every account the batch charges or settles a reservation of, once,
    -- in the global order (one statement), then the system shard rows.
    --
    -- First queue for them in arrival order: a row lock is not a fair queue
    -- under load. Each charge writes a new version of the account row; the
    -- waiters queued on the old version move to the new one only one by one
    -- (each woken after the one before it), while a transaction that arrives
    -- meanwhile queues on the new version at once, ahead of them. With
    -- sixteen batches over the same accounts, some waited ten times as long
    -- as the median (p99 2.5 s against 0.4 s). An advisory lock per account
    -- (key: the account id modulo 2^31, in the two-key space, which nothing
    -- else uses) does not move, and its waiters are served in order. They are
    -- taken in key order, before any account row lock, and only by this
    -- function, so they cannot take part in a deadlock: whoever waits for one
    -- holds no account row lock. (A single operation still locks the rows
    -- directly; it waits for at most the batch that holds them.)
    IF v_accounts IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1969516655, k)
        FROM (SELECT DISTINCT (a % 2147483648)::integer AS k FROM unnest(v_accounts) a) s ORDER BY k;
        PERFORM tl_lock(v_accounts, ARRAY['system:expired', 'system:usage', 'system:issuance']);
    END IF;
    v_now := tl_now(p_ctx);

    -- 4. Accounts charged directly: closed, bound, due, or short (tl_usage_batch_fit).
    IF v_charged IS NOT NULL THEN
        SELECT * INTO v_rows, v_rejected FROM tl_usage_batch_fit(v_rows, v_charged, v_totals, v_now, p_ctx);
    END IF;
    IF v_rejected > 0 THEN
        v_changed := true;
        -- Rejected claims are given back, so a retry can record them later.
        DELETE FROM usage_events u USING unnest(v_rows) b
            WHERE b.status IN ('rejected', 'single') AND b.id IS NOT NULL AND u.id = b.id;
        SELECT * INTO v_charged, v_txns, v_totals, v_counts FROM tl_usage_batch_totals(v_rows);
    END IF;

    -- 5. Charge (tl_usage_batch_charge).
    IF v_charged IS NOT NULL THEN
        PERFORM tl_usage_batch_charge(v_charged, v_txns, v_totals, v_counts, v_now, p_ctx);
    END IF;

    -- 6. What the charge did not record, one at a time (tl_usage_batch_settle).
    IF v_changed THEN
        v_rows := tl_usage_batch_settle(v_rows, p_events, p_ctx);
        v_answer := tl_usage_batch_answer(v_rows);
        v_rollup := tl_usage_batch_sums(v_rows);
    END IF;

    -- A capped key's count keeps only what was charged: an event counted in
    -- step 2 that charged nothing after all (claimed meanwhile by another
    -- request, its wallet closed while the batch waited for its lock) gives
    -- its cost back. The key's row is still locked from step 2.
    IF v_counted IS NOT NULL THEN
        UPDATE key_spend s SET spent = s.spent - g.cost
          FROM (SELECT sum(v_rows[p].cost) AS cost FROM unnest(v_counted) p
                WHERE v_rows[p].status NOT IN ('pending', 'recorded_single')) g
         WHERE s.actor = p_ctx ->> 'actor' AND g.cost > 0;
    END IF;

    PERFORM tl_usage_rollup_sums(v_rollup.days, v_rollup.accounts, v_rollup.models, v_rollup.projects,
                                 v_rollup.events, v_rollup.input_tokens, v_rollup.cached_input_tokens,
                                 v_rollup.output_tokens, v_rollup.credits);
    -- The tag roll-ups of the declared report tag keys, of the same events
    -- ("Tag roll-ups"); none declared, the usual case: nothing more.
    v_tag_keys := ARRAY(SELECT name FROM report_tag_keys ORDER BY name COLLATE "C");
    IF cardinality(v_tag_keys) > 0 THEN
        PERFORM tl_usage_tag_rollup_batch(v_rows, v_tag_keys);
    END IF;
    RETURN v_answer;
END $$;

-- ===========================================================================
-- 5. The entry point: idempotency, dispatch and the coalesced batches of the
-- hot path
-- ===========================================================================

-- The reservation amount for an estimate: the worst case (all input
-- uncached, max_output_tokens) at the model's current price, or, when the
-- wallet cannot cover that, what it can cover down to min_output_tokens.
-- Returns {amount, max_output_tokens_allowed, price_id}.
CREATE OR REPLACE FUNCTION tl_estimate(p_estimate jsonb, p_available bigint, p_now timestamptz, p_address text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_price prices := tl_price_at(p_estimate ->> 'model', p_now);
    v_input bigint := (p_estimate ->> 'input_tokens')::bigint;
    v_max bigint := (p_estimate ->> 'max_output_tokens')::bigint;
    v_min bigint := coalesce((p_estimate ->> 'min_output_tokens')::bigint, v_max);
    v_allowed bigint;
    v_room numeric;
    v_amount bigint;
BEGIN
    IF v_price.id IS NULL THEN
        PERFORM tl_raise('TLA08', 'unknown_model', format('no price for model %s', p_estimate ->> 'model'),
                         jsonb_build_object('model', p_estimate ->> 'model'));
    END IF;
    v_amount := tl_usage_cost(v_price, v_input, 0, v_max);
    v_allowed := v_max;
    IF v_amount > p_available THEN
        -- ceil(x / 10^6) <= available exactly when x <= available * 10^6.
        v_room := p_available::numeric * 1000000 - v_input::numeric * v_price.input_per_mtok;
        v_allowed := CASE WHEN v_room < 0 THEN -1
                          WHEN v_price.output_per_mtok = 0 THEN v_max
                          ELSE least(v_max, floor(v_room / v_price.output_per_mtok)::bigint) END;
        IF v_allowed < v_min THEN
            PERFORM tl_raise('TLB01', 'insufficient_credits',
                format('%s has %s credits available; the estimate needs %s (%s with min_output_tokens)',
                       p_address, p_available, v_amount,
                       tl_usage_cost(v_price, v_input, 0, v_min)),
                jsonb_build_object('account', p_address, 'available', p_available,
                                   'requested', tl_usage_cost(v_price, v_input, 0, v_min)));
        END IF;
        v_amount := tl_usage_cost(v_price, v_input, 0, v_allowed);
    END IF;
    IF v_amount = 0 THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'the estimate costs nothing; there is nothing to reserve',
                         jsonb_build_object('path', '$.estimate'));
    END IF;
    RETURN jsonb_build_object('amount', v_amount, 'max_output_tokens_allowed', v_allowed,
                              'price_id', v_price.id, 'model', v_price.model);
END $$;

-- ---------------------------------------------------------------------------
-- The one entry point for state-changing requests: idempotency + dispatch
-- ---------------------------------------------------------------------------

-- The set-based part of tl_execute_batch: the fresh debits, reservations by
-- amount, captures by amount and releases of wallets that nothing else in
-- the batch touches and that have nothing to expire, release, return or
-- roll over at this instant (so tl_expire_due would do nothing, before or
-- after). For them, instead of some twenty statements per operation, the
-- batch is decided in memory in arrival order, wallet by wallet, exactly as
-- the tl_op_* functions would decide it one after the other (the same
-- lots, in consumption order, the same answers and rejections), and then
-- written with one statement per table for the whole batch. Returns one
-- element per item: the result for the items it took, NULL for the others,
-- which tl_execute_batch runs one by one afterwards; an item over its key's
-- spend rate cap is answered {error: ...}, which gives its key back. The
-- caller holds every lock (the capped keys' key_spend rows too).
--
-- Spend policy and key limits are decided here too, in the order the
-- one-by-one functions check them: the key's departments (an item outside
-- them is left to the one-by-one path, which refuses it), the model rules,
-- a capture's hard limits, the credits, a debit's or reservation's hard
-- limits, then the key's spend rate cap.
--
-- Every statement reaches accounts, lots and reservations through
-- `key = ANY (array)`, which the planner can only answer with the index,
-- whatever its statistics say (a join against unnest() was planned as a scan
-- of every lot of every wallet while the table's statistics were stale): its
-- cost follows the batch, never the size of the tables.
--
-- p_kinds says which operations may go set-based (tl_debit_fast: debits only).
CREATE OR REPLACE FUNCTION tl_batch_fast(
    p_ops text[], p_args jsonb[], p_ctxs jsonb[], p_statuses integer[], p_claimed boolean[],
    p_kinds text[] DEFAULT ARRAY['debit', 'reserve', 'capture', 'release'])
RETURNS jsonb[] LANGUAGE plpgsql AS $$
DECLARE
    v_out jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_ops)]);
    v_items integer[];
    v_now timestamptz;
    v_busy text[];
    v_busy_ids bigint[];
    -- The reservations that candidate captures and releases name.
    v_r_id uuid[];
    v_r_account bigint[];
    v_r_amount bigint[];
    v_r_metadata jsonb[];
    v_r_wallet integer[];
    -- The eligible wallets, ascending id: their state under the held lock.
    v_w_id bigint[];
    v_w_address text[];
    v_w_asset text[];
    v_w_posted bigint[];
    v_w_version bigint[];
    v_w_reserved bigint[];
    v_w_free bigint[];
    v_w_first integer[];
    v_w_last integer[];
    -- Their live lots, wallet by wallet in consumption order.
    v_l_id uuid[];
    v_l_account bigint[];
    v_l_remaining bigint[];
    v_l_reserved bigint[];
    v_l_changed boolean[];
    -- Holds of the named reservations, by reservation, in consumption order.
    v_h_reservation uuid[];
    v_h_lot integer[];
    v_h_amount bigint[];
    -- What the batch writes.
    v_new_id uuid[] := '{}';        -- reservations made
    v_new_item integer[] := '{}';
    v_new_wallet integer[] := '{}';
    v_new_amount bigint[] := '{}';
    v_new_available bigint[] := '{}';
    v_hold_res uuid[] := '{}';      -- their holds
    v_hold_lot uuid[] := '{}';
    v_hold_amount bigint[] := '{}';
    v_txn uuid[] := '{}';           -- debit and capture transactions
    v_txn_item integer[] := '{}';
    v_txn_wallet integer[] := '{}';
    v_txn_amount bigint[] := '{}';
    v_txn_balance bigint[] := '{}';
    v_txn_version bigint[] := '{}';
    v_txn_s_balance bigint[] := '{}';
    v_txn_s_version bigint[] := '{}';
    v_mv_txn uuid[] := '{}';        -- lot movements
    v_mv_lot uuid[] := '{}';
    v_mv_amount bigint[] := '{}';
    v_done_item integer[] := '{}';  -- captures and releases
    v_done_res integer[] := '{}';
    v_done_txn uuid[] := '{}';
    v_done_amount bigint[] := '{}';
    v_usage accounts;
    v_shard integer;
    v_s_posted bigint;
    v_s_version bigint;
    v_bodies jsonb[];
    v_i integer;
    v_w integer;
    v_r integer;
    v_k integer;
    v_op text;
    v_amt bigint;
    v_left bigint;
    v_take bigint;
    v_id uuid;
    v_shortfall bigint;
    v_r_created timestamptz[];
    -- Spend policy (tl_policy_batch_links). The limits binding the bound
    -- wallets, each once (a department's is shared by its members in the
    -- batch), with the spend it counts, kept up to date in the loop:
    v_p_owner text[];
    v_p_ord integer[];
    v_p_period text[];
    v_p_tz text[];
    v_p_start timestamptz[];
    v_p_amount bigint[];
    v_p_hard boolean[];
    v_p_total bigint[];
    -- each wallet's limits in check order (links v_pw_first .. v_pw_last),
    v_pk_wallet integer[];
    v_pk_limit integer[];
    v_pw_first integer[];
    v_pw_last integer[];
    -- what the batch adds to each wallet's window rows (net),
    v_p_delta bigint[];
    -- a wallet whose named reservation was made in an earlier window (its
    -- spend is trued up there: one by one),
    v_w_skip boolean[];
    -- a debit or reservation refused for its model (model_not_allowed),
    v_p_model jsonb[];
    v_refusal jsonb;
    -- and soft-limit crossings to emit (limit, threshold, spend then).
    -- Soft-limit crossings, in order: limit * 1000 + threshold percent, and
    -- the window's spend at the crossing.
    v_e_key bigint[] := '{}';
    v_e_spent bigint[] := '{}';
    v_p_refused integer;
    v_p_any boolean;
    v_p_models boolean;
    v_delta bigint;
    v_pct integer;
    -- Per-key spend rate caps (tl_key_charge): each capped caller's cap and
    -- spend this minute (its key_spend row, locked by tl_execute_batch).
    v_ka_actor text[];
    v_ka_cap bigint[];
    v_ka_spent bigint[];
    v_ka_changed boolean := false;
    v_ka integer;
    v_minute timestamptz;
    v_mixed boolean;
    v_capped boolean;
BEGIN
    v_items := ARRAY(
        SELECT i FROM generate_subscripts(p_ops, 1) i
         WHERE p_claimed[i] AND p_ops[i] = ANY (p_kinds)
           AND CASE p_ops[i]
                   WHEN 'reserve' THEN jsonb_typeof(p_args[i] -> 'amount') = 'number'
                   WHEN 'capture' THEN jsonb_typeof(p_args[i] -> 'amount') = 'number'
                   ELSE true END
           -- A key limited to departments charging outside them goes one by
           -- one, to be refused there (403 forbidden, never stored).
           AND (NOT p_ctxs[i] ? 'departments' OR p_ops[i] NOT IN ('debit', 'reserve')
                OR tl_key_in_scope((SELECT a FROM accounts a WHERE a.address = p_args[i] ->> 'account'), p_ctxs[i]))
         ORDER BY i);
    IF cardinality(v_items) = 0 THEN
        RETURN v_out;
    END IF;
    SELECT count(DISTINCT coalesce(p_ctxs[i] ->> 'now', '')) > 1, coalesce(bool_or(p_ctxs[i] ? 'rate_limit'), false)
      INTO v_mixed, v_capped
      FROM unnest(v_items) i;
    IF v_mixed THEN
        RETURN v_out;  -- items pinned to different instants (tests): one by one
    END IF;
    v_now := coalesce((p_ctxs[v_items[1]] ->> 'now')::timestamptz, clock_timestamp());
    v_minute := date_trunc('minute', v_now, 'UTC');
    IF v_capped THEN
        SELECT array_agg(c.actor ORDER BY c.actor), array_agg(c.cap ORDER BY c.actor),
               array_agg(coalesce(CASE WHEN s.minute = v_minute THEN s.spent END, 0) ORDER BY c.actor)
          INTO v_ka_actor, v_ka_cap, v_ka_spent
          FROM (SELECT DISTINCT p_ctxs[i] ->> 'actor' AS actor, (p_ctxs[i] ->> 'rate_limit')::bigint AS cap
                  FROM unnest(v_items) AS i WHERE p_ctxs[i] ? 'rate_limit') c
          LEFT JOIN key_spend s ON s.actor = c.actor;
    END IF;
    SELECT array_agg(r.id ORDER BY r.id), array_agg(r.account_id ORDER BY r.id),
           array_agg(r.amount ORDER BY r.id), array_agg(r.metadata ORDER BY r.id),
           array_agg(r.created_at ORDER BY r.id)
      INTO v_r_id, v_r_account, v_r_amount, v_r_metadata, v_r_created
      -- The named ones by key first (OFFSET 0 keeps the conditions below out
      -- of that scan): given them all at once, the planner answered from
      -- the index of open reservations by expiry whenever a fresh table's
      -- statistics made it look small, reading every open reservation
      -- (tests/db/test_plans.py).
      FROM (SELECT * FROM reservations x
             WHERE x.id = ANY (ARRAY(SELECT (p_args[i] ->> 'reservation_id')::uuid FROM unnest(v_items) i
                                      WHERE p_ops[i] IN ('capture', 'release')))
            OFFSET 0) r
     WHERE r.status = 'active' AND r.expires_at > v_now
       -- One its caller may not act on goes one by one, to answer not found.
       AND NOT EXISTS (SELECT 1 FROM unnest(v_items) i
                       WHERE (p_args[i] ->> 'reservation_id')::uuid = r.id AND NOT tl_may_act_on(r, p_ctxs[i]));
    -- A wallet goes one by one, all of it, when another item touches it
    -- that cannot go set-based (so that its operations keep their arrival
    -- order across kinds), or when one reservation is named twice.
    v_busy := ARRAY(SELECT x FROM generate_subscripts(p_ops, 1) i,
                           LATERAL (VALUES (p_args[i] ->> 'account'), (p_args[i] ->> 'from'),
                                           (p_args[i] ->> 'to')) v(x)
                     WHERE p_claimed[i] AND x IS NOT NULL AND i <> ALL (v_items));
    -- (The reservations by `id = ANY (array)`, as everywhere here.)
    v_busy_ids := ARRAY(
        SELECT r.account_id FROM reservations r
         WHERE r.id = ANY (ARRAY(
                   SELECT (p_args[i] ->> 'reservation_id')::uuid FROM generate_subscripts(p_ops, 1) i
                    WHERE p_claimed[i]
                      AND (i <> ALL (v_items)
                           OR (p_args[i] ->> 'reservation_id')::uuid <> ALL (coalesce(v_r_id, '{}'))
                           OR (SELECT count(*) FROM unnest(v_items) j
                                WHERE p_args[j] ->> 'reservation_id' = p_args[i] ->> 'reservation_id') > 1))));
    SELECT array_agg(a.id ORDER BY a.id), array_agg(a.address ORDER BY a.id),
           array_agg(a.asset ORDER BY a.id), array_agg(a.posted ORDER BY a.id),
           array_agg(a.version ORDER BY a.id), array_agg(a.reserved ORDER BY a.id),
           coalesce(bool_or(a.policy_bound), false),
           -- Whether any debit or reservation names a model (the model rules'
           -- statement below has nothing to check otherwise).
           EXISTS (SELECT 1 FROM unnest(v_items) i
                    WHERE p_ops[i] IN ('debit', 'reserve')
                      AND coalesce(p_args[i] -> 'estimate' ->> 'model', p_args[i] -> 'metadata' ->> 'model')
                          IS NOT NULL)
      INTO v_w_id, v_w_address, v_w_asset, v_w_posted, v_w_version, v_w_reserved, v_p_any, v_p_models
      FROM accounts a
     WHERE (a.address = ANY (ARRAY(SELECT p_args[i] ->> 'account' FROM unnest(v_items) i
                                    WHERE p_ops[i] IN ('debit', 'reserve')))
            OR a.id = ANY (coalesce(v_r_account, '{}')))
       AND a.type <> 'system' AND a.status = 'open' AND a.shard_count = 1
       AND a.address <> ALL (v_busy) AND a.id <> ALL (v_busy_ids)
       -- Nothing for tl_expire_due to do: no reservation past its time, no
       -- lot to roll over, no voided lot holding credits, and no lot past
       -- its expiry with anything left (held or not: what a capture would
       -- release of it must expire at once, which the one-by-one path does).
       AND NOT EXISTS (SELECT 1 FROM reservations r
                       WHERE r.account_id = a.id AND r.status = 'active' AND r.expires_at <= v_now)
       AND NOT EXISTS (SELECT 1 FROM lots l
                       WHERE l.account_id = a.id AND l.rollover_max IS NOT NULL AND l.rolled_at IS NULL
                         AND l.expires_at <= v_now)
       AND NOT EXISTS (SELECT 1 FROM lots l
                       WHERE l.account_id = a.id AND l.status = 'voided' AND l.live)
       AND NOT EXISTS (SELECT 1 FROM lots l
                       WHERE l.account_id = a.id AND l.status = 'active' AND l.live
                         AND l.expires_at <= v_now);
    IF v_w_id IS NULL THEN
        RETURN v_out;
    END IF;
    -- Their live lots (a reservation's holds are all on such lots, given the
    -- checks above), and each wallet's range of them.
    SELECT array_agg(l.id ORDER BY l.account_id, l.priority, l.expires_at NULLS LAST, l.effective_at, l.id),
           array_agg(l.account_id ORDER BY l.account_id, l.priority, l.expires_at NULLS LAST, l.effective_at, l.id),
           array_agg(l.remaining ORDER BY l.account_id, l.priority, l.expires_at NULLS LAST, l.effective_at, l.id),
           array_agg(l.reserved ORDER BY l.account_id, l.priority, l.expires_at NULLS LAST, l.effective_at, l.id)
      INTO v_l_id, v_l_account, v_l_remaining, v_l_reserved
      FROM lots l
     WHERE l.account_id = ANY (v_w_id) AND l.status = 'active' AND l.live
       AND l.effective_at <= v_now AND (l.expires_at IS NULL OR l.expires_at > v_now);
    v_l_id := coalesce(v_l_id, '{}');
    v_l_changed := array_fill(false, ARRAY[cardinality(v_l_id)]);
    SELECT array_agg(coalesce(s.first, 1) ORDER BY w.n), array_agg(coalesce(s.last, 0) ORDER BY w.n),
           array_agg(coalesce(s.free, 0) ORDER BY w.n)
      INTO v_w_first, v_w_last, v_w_free
      FROM unnest(v_w_id) WITH ORDINALITY AS w(id, n)
      LEFT JOIN (SELECT x.account_id, min(x.k) AS first, max(x.k) AS last,
                        sum(x.remaining - x.reserved) AS free
                   FROM unnest(v_l_account, v_l_remaining, v_l_reserved)
                        WITH ORDINALITY AS x(account_id, remaining, reserved, k)
                  GROUP BY x.account_id) s ON s.account_id = w.id;
    -- Each named reservation's wallet (NULL: not eligible) and holds.
    v_r_wallet := ARRAY(SELECT array_position(v_w_id, a.id)
                          FROM unnest(coalesce(v_r_account, '{}')) WITH ORDINALITY AS a(id, n) ORDER BY a.n);
    SELECT array_agg(h.reservation_id ORDER BY h.reservation_id, x.k),
           array_agg(x.k ORDER BY h.reservation_id, x.k), array_agg(h.amount ORDER BY h.reservation_id, x.k)
      INTO v_h_reservation, v_h_lot, v_h_amount
      FROM reservation_holds h
      JOIN unnest(v_l_id) WITH ORDINALITY AS x(id, k) ON x.id = h.lot_id
     WHERE h.reservation_id = ANY (coalesce(v_r_id, '{}'));
    v_h_reservation := coalesce(v_h_reservation, '{}');
    -- Spend policy: the limits of the bound wallets, with their totals now
    -- (nothing to read when none is bound, the common case).
    -- A bound wallet's limits are checked in the loop below as
    -- tl_policy_count checks them one by one (the same order, the same
    -- answers, the same soft-limit events); its window rows are written once.
    v_w_skip := array_fill(false, ARRAY[cardinality(v_w_id)]);
    IF v_p_any THEN
        -- The links in check order, each naming its limit by the limit's
        -- first link (a department's limit is linked once per member).
        SELECT * INTO v_pk_wallet, v_pk_limit, v_p_owner, v_p_ord, v_p_period, v_p_tz, v_p_start, v_p_amount,
                      v_p_hard, v_p_total
          FROM tl_policy_batch_links(v_w_id, v_now);
    END IF;
    IF v_pk_wallet IS NOT NULL THEN
        SELECT array_agg(coalesce(s.first, 1) ORDER BY w.n), array_agg(coalesce(s.last, 0) ORDER BY w.n)
          INTO v_pw_first, v_pw_last
          FROM generate_series(1, cardinality(v_w_id)) AS w(n)
          LEFT JOIN (SELECT k.wallet, min(k.n)::integer AS first, max(k.n)::integer AS last
                       FROM unnest(v_pk_wallet) WITH ORDINALITY AS k(wallet, n) GROUP BY k.wallet) s
                 ON s.wallet = w.n;
        v_p_delta := array_fill(0::bigint, ARRAY[cardinality(v_w_id)]);
        -- A capture or release trues up the window its reservation was made
        -- in: when that is not the current one of every limit, one by one.
        -- (Nothing to look at without one: each statement here costs its
        -- executor start-up at every batch.)
        IF cardinality(v_r_account) > 0 THEN
            v_w_skip := ARRAY(
                SELECT EXISTS (SELECT 1 FROM unnest(v_r_account, v_r_created) AS r(account, created),
                                             generate_series(v_pw_first[w.n], v_pw_last[w.n]) AS k
                                WHERE r.account = w.id
                                  AND tl_window_start(v_p_period[v_pk_limit[k]], v_p_tz[v_pk_limit[k]],
                                                      r.created)
                                      <> v_p_start[v_pk_limit[k]])
                  FROM unnest(v_w_id) WITH ORDINALITY AS w(id, n) ORDER BY w.n);
        END IF;
    END IF;
    IF v_p_any AND v_p_models THEN
        -- A model its policies do not allow is refused before anything is
        -- held (tl_require_model).
        v_p_model := array_fill(NULL::jsonb, ARRAY[cardinality(p_ops)]);
        FOR v_i, v_refusal IN
            SELECT i, jsonb_build_object(
                       'code', 'model_not_allowed',
                       'detail', format('the spend policy of %s does not allow model %s (%s tier)',
                                        a.address, m.model, pr.tier),
                       'extra', jsonb_build_object('account', a.address, 'model', m.model, 'tier', pr.tier))
              FROM unnest(v_items) AS i
              JOIN accounts a ON a.address = p_args[i] ->> 'account' AND a.id = ANY (v_w_id) AND a.policy_bound
             CROSS JOIN LATERAL (SELECT coalesce(p_args[i] -> 'estimate' ->> 'model',
                                                 p_args[i] -> 'metadata' ->> 'model') AS model) m
             -- tl_price_at and tl_model_allowed, written out: called per item
             -- they were not inlined, and each call planned its body again
             -- (about half of what a policy added to a debit).
             CROSS JOIN LATERAL (SELECT x.tier FROM prices x
                                  WHERE x.model = m.model AND x.effective_from <= v_now
                                  ORDER BY x.effective_from DESC LIMIT 1) pr
             WHERE p_ops[i] IN ('debit', 'reserve') AND m.model IS NOT NULL
               AND NOT coalesce((
                   SELECT bool_and(tl_models_allow(p.models, m.model, pr.tier))
                     FROM spend_policies p
                    WHERE p.account_id = ANY (ARRAY[
                              a.id,
                              CASE WHEN a.type = 'employee' THEN (
                                  SELECT d.id FROM accounts d
                                   WHERE d.address = 'department:' || (SELECT e.department FROM employees e
                                                                        WHERE e.id = a.ref)) END])),
                   true)
        LOOP
            v_p_model[v_i] := v_refusal;
        END LOOP;
    END IF;
    -- This transaction's shard of system:usage, locked by tl_lock.
    SELECT * INTO v_usage FROM accounts WHERE address = 'system:usage';
    v_shard := tl_shard(v_usage.shard_count);
    SELECT s.posted, s.version INTO v_s_posted, v_s_version FROM account_shards s
     WHERE s.account_id = v_usage.id AND s.shard = v_shard;

    -- Decide in arrival order; nothing but arithmetic on the arrays.
    FOREACH v_i IN ARRAY v_items LOOP
        v_op := p_ops[v_i];
        IF v_op IN ('capture', 'release') THEN
            v_r := array_position(v_r_id, (p_args[v_i] ->> 'reservation_id')::uuid);
            CONTINUE WHEN v_r IS NULL;
            v_w := v_r_wallet[v_r];
        ELSE
            v_w := array_position(v_w_address, p_args[v_i] ->> 'account');
        END IF;
        -- Not eligible: tl_execute_batch runs it one by one.
        CONTINUE WHEN v_w IS NULL OR v_w_skip[v_w];
        v_amt := (p_args[v_i] ->> 'amount')::bigint;
        IF v_p_model[v_i] IS NOT NULL THEN
            v_out[v_i] := jsonb_build_object('status', 409, 'replayed', false, 'body', v_p_model[v_i]);
            CONTINUE;
        END IF;
        -- What must come from free credits, beyond the reservation's own holds.
        v_shortfall := CASE v_op WHEN 'debit' THEN v_amt WHEN 'reserve' THEN v_amt
                                 WHEN 'capture' THEN greatest(v_amt - v_r_amount[v_r], 0) ELSE 0 END;
        -- Spend policy: what it adds to the wallet's windows, and the first
        -- hard limit that would pass, as tl_policy_count finds it. A capture
        -- checks its limits before the credits of an over-capture; a debit
        -- and a reservation after their credits.
        v_delta := CASE v_op WHEN 'capture' THEN v_amt - v_r_amount[v_r]
                             WHEN 'release' THEN -v_r_amount[v_r] ELSE v_amt END;
        v_p_refused := NULL;
        IF v_pw_first IS NOT NULL AND v_delta > 0 THEN
            FOR v_k IN v_pw_first[v_w] .. v_pw_last[v_w] LOOP
                IF v_p_hard[v_pk_limit[v_k]]
                   AND v_p_total[v_pk_limit[v_k]] + v_delta > v_p_amount[v_pk_limit[v_k]] THEN
                    v_p_refused := v_pk_limit[v_k];
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF v_p_refused IS NOT NULL AND (v_op = 'capture' OR v_w_free[v_w] >= v_shortfall) THEN
            v_out[v_i] := jsonb_build_object('status', 409, 'replayed', false, 'body', tl_limit_exceeded_json(
                v_p_owner[v_p_refused], v_p_period[v_p_refused], v_p_tz[v_p_refused], v_p_amount[v_p_refused],
                v_p_total[v_p_refused], v_delta, v_p_start[v_p_refused]));
            CONTINUE;
        END IF;
        IF v_w_free[v_w] < v_shortfall THEN
            v_out[v_i] := jsonb_build_object('status', 409, 'replayed', false, 'body', jsonb_build_object(
                'code', 'insufficient_credits',
                'detail', format('%s has %s credits available; %s requested',
                                 v_w_address[v_w], v_w_free[v_w], v_shortfall),
                'extra', jsonb_build_object('account', v_w_address[v_w], 'available', v_w_free[v_w],
                                            'requested', v_shortfall)));
            CONTINUE;
        END IF;
        -- The key's spend rate cap, checked last (tl_key_charge): debits and
        -- reservations count; over it, an error that gives the key back.
        IF v_ka_actor IS NOT NULL AND v_op IN ('debit', 'reserve') AND p_ctxs[v_i] ? 'rate_limit' THEN
            v_ka := array_position(v_ka_actor, p_ctxs[v_i] ->> 'actor');
            IF v_ka_spent[v_ka] + v_amt > v_ka_cap[v_ka] THEN
                v_refusal := tl_key_rate_limited_json(v_ka_cap[v_ka], v_ka_spent[v_ka], v_amt, v_minute, v_now);
                v_out[v_i] := jsonb_build_object('error', jsonb_build_object(
                    'state', 'TLD29', 'code', 'key_rate_limited', 'detail', v_refusal ->> 'detail',
                    'hint', (v_refusal -> 'extra')::text));
                CONTINUE;
            END IF;
            v_ka_spent[v_ka] := v_ka_spent[v_ka] + v_amt;
            v_ka_changed := true;
        END IF;
        -- Counted: the window totals, and each soft limit's 80 % and 100 %
        -- crossings (emitted after the loop; the outbox keeps the first).
        IF v_pw_first IS NOT NULL AND v_delta <> 0 AND v_pw_first[v_w] <= v_pw_last[v_w] THEN
            v_p_delta[v_w] := v_p_delta[v_w] + v_delta;
            FOR v_k IN v_pw_first[v_w] .. v_pw_last[v_w] LOOP
                v_p_refused := v_pk_limit[v_k];
                v_p_total[v_p_refused] := v_p_total[v_p_refused] + v_delta;
                CONTINUE WHEN v_delta < 0 OR v_p_hard[v_p_refused];
                FOREACH v_pct IN ARRAY ARRAY[80, 100] LOOP
                    -- (limit, threshold) pairs met, as one number each: a
                    -- simple expression, which PL/pgSQL evaluates without
                    -- the executor start-up a subquery here cost at every
                    -- debit of a wallet with a soft limit.
                    IF v_p_total[v_p_refused] * 100 >= v_p_amount[v_p_refused] * v_pct
                       AND NOT (v_p_refused::bigint * 1000 + v_pct) = ANY (v_e_key) THEN
                        v_e_key := v_e_key || (v_p_refused::bigint * 1000 + v_pct);
                        v_e_spent := v_e_spent || v_p_total[v_p_refused];
                    END IF;
                END LOOP;
            END LOOP;
        END IF;
        IF v_op IN ('debit', 'capture') THEN
            v_id := tl_uuid7();
        END IF;
        IF v_op IN ('capture', 'release') THEN
            -- The reservation's holds, in consumption order: a capture draws
            -- on them first; what it does not draw is free again.
            v_left := CASE v_op WHEN 'capture' THEN v_amt ELSE 0 END;
            FOR v_k IN SELECT k FROM generate_subscripts(v_h_reservation, 1) k
                        WHERE v_h_reservation[k] = v_r_id[v_r] ORDER BY k LOOP
                v_take := least(v_h_amount[v_k], v_left);
                v_l_reserved[v_h_lot[v_k]] := v_l_reserved[v_h_lot[v_k]] - v_h_amount[v_k];
                v_l_changed[v_h_lot[v_k]] := true;
                IF v_take > 0 THEN
                    v_l_remaining[v_h_lot[v_k]] := v_l_remaining[v_h_lot[v_k]] - v_take;
                    v_mv_txn := v_mv_txn || v_id;
                    v_mv_lot := v_mv_lot || v_l_id[v_h_lot[v_k]];
                    v_mv_amount := v_mv_amount || -v_take;
                    v_left := v_left - v_take;
                END IF;
                v_w_free[v_w] := v_w_free[v_w] + v_h_amount[v_k] - v_take;
            END LOOP;
            v_w_reserved[v_w] := v_w_reserved[v_w] - v_r_amount[v_r];
            v_done_item := v_done_item || v_i;
            v_done_res := v_done_res || v_r;
            v_done_txn := array_append(v_done_txn, CASE v_op WHEN 'capture' THEN v_id END);
            v_done_amount := array_append(v_done_amount, CASE v_op WHEN 'capture' THEN v_amt END);
        ELSE
            v_left := v_amt;
        END IF;
        IF v_op = 'reserve' THEN
            v_id := tl_uuid7();
            v_new_id := v_new_id || v_id;
            v_new_item := v_new_item || v_i;
            v_new_wallet := v_new_wallet || v_w;
            v_new_amount := v_new_amount || v_amt;
            v_new_available := v_new_available || (v_w_free[v_w] - v_amt);
            v_w_reserved[v_w] := v_w_reserved[v_w] + v_amt;
        END IF;
        -- Free credits in consumption order: consumed by a debit or the
        -- excess of a capture, earmarked by a reservation.
        IF v_op <> 'release' AND v_left > 0 THEN
            v_w_free[v_w] := v_w_free[v_w] - v_left;
            FOR v_k IN v_w_first[v_w] .. v_w_last[v_w] LOOP
                v_take := least(v_l_remaining[v_k] - v_l_reserved[v_k], v_left);
                CONTINUE WHEN v_take <= 0;
                v_l_changed[v_k] := true;
                IF v_op = 'reserve' THEN
                    v_l_reserved[v_k] := v_l_reserved[v_k] + v_take;
                    v_hold_res := v_hold_res || v_id;
                    v_hold_lot := v_hold_lot || v_l_id[v_k];
                    v_hold_amount := v_hold_amount || v_take;
                ELSE
                    v_l_remaining[v_k] := v_l_remaining[v_k] - v_take;
                    v_mv_txn := v_mv_txn || v_id;
                    v_mv_lot := v_mv_lot || v_l_id[v_k];
                    v_mv_amount := v_mv_amount || -v_take;
                END IF;
                v_left := v_left - v_take;
                EXIT WHEN v_left = 0;
            END LOOP;
            ASSERT v_left = 0, 'tl_batch_fast: free credits of a wallet do not add up';
        END IF;
        IF v_op IN ('debit', 'capture') THEN
            v_w_posted[v_w] := v_w_posted[v_w] - v_amt;
            v_w_version[v_w] := v_w_version[v_w] + 1;
            v_s_posted := v_s_posted + v_amt;
            v_s_version := v_s_version + 1;
            v_txn := v_txn || v_id;
            v_txn_item := v_txn_item || v_i;
            v_txn_wallet := v_txn_wallet || v_w;
            v_txn_amount := v_txn_amount || v_amt;
            v_txn_balance := v_txn_balance || v_w_posted[v_w];
            v_txn_version := v_txn_version || v_w_version[v_w];
            v_txn_s_balance := v_txn_s_balance || v_s_posted;
            v_txn_s_version := v_txn_s_version || v_s_version;
        END IF;
        v_out[v_i] := 'null'::jsonb;  -- taken; its answer is built below
    END LOOP;

    -- Write it all: one statement per table.
    IF cardinality(v_new_id) > 0 THEN
        INSERT INTO reservations (id, account_id, amount, expires_at, metadata, details, actor, request_id,
                                  created_at)
        SELECT u.id, v_w_id[u.w], u.amount,
               v_now + make_interval(secs => (p_args[u.i] ->> 'ttl_seconds')::integer),
               coalesce(nullif(p_args[u.i] -> 'metadata', 'null'::jsonb), '{}'::jsonb), '{}'::jsonb,
               p_ctxs[u.i] ->> 'actor', p_ctxs[u.i] ->> 'request_id', v_now
          FROM unnest(v_new_id, v_new_item, v_new_wallet, v_new_amount) WITH ORDINALITY AS u(id, i, w, amount, o)
         ORDER BY u.o;
        INSERT INTO reservation_holds (reservation_id, lot_id, amount)
        SELECT * FROM unnest(v_hold_res, v_hold_lot, v_hold_amount);
    END IF;
    IF cardinality(v_txn) > 0 THEN
        INSERT INTO transactions (id, kind, memo, metadata, details, actor, request_id, created_at)
        SELECT u.txn, p_ops[u.i],
               CASE p_ops[u.i] WHEN 'debit' THEN p_args[u.i] ->> 'memo' END,
               CASE p_ops[u.i]
                   WHEN 'debit' THEN coalesce(nullif(p_args[u.i] -> 'metadata', 'null'::jsonb), '{}'::jsonb)
                   ELSE coalesce(nullif(p_args[u.i] -> 'metadata', 'null'::jsonb), v_r_metadata[c.r],
                                 '{}'::jsonb) END,
               CASE p_ops[u.i]
                   WHEN 'debit' THEN '{}'::jsonb
                   ELSE jsonb_build_object('reservation_id', tl_public_id('rsv_', v_r_id[c.r]),
                                           'held', v_r_amount[c.r]) END,
               p_ctxs[u.i] ->> 'actor', p_ctxs[u.i] ->> 'request_id', v_now
          FROM unnest(v_txn, v_txn_item) WITH ORDINALITY AS u(txn, i, o)
          LEFT JOIN unnest(v_done_item, v_done_res) AS c(i, r) ON c.i = u.i
         ORDER BY u.o;
        INSERT INTO lot_movements (transaction_id, lot_id, amount)
        SELECT * FROM unnest(v_mv_txn, v_mv_lot, v_mv_amount);
        -- Both legs, in arrival order: the wallet's, then system:usage's shard.
        INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version,
                             created_at)
        SELECT u.txn, leg.account_id, leg.shard, leg.asset, leg.amount, leg.balance_after, leg.version, v_now
          FROM unnest(v_txn, v_txn_wallet, v_txn_amount, v_txn_balance, v_txn_version, v_txn_s_balance,
                      v_txn_s_version)
               WITH ORDINALITY AS u(txn, w, amount, w_balance, w_version, s_balance, s_version, o)
         CROSS JOIN LATERAL (VALUES
               (0, v_w_id[u.w], 0, v_w_asset[u.w], -u.amount, u.w_balance, u.w_version),
               (1, v_usage.id, v_shard, v_usage.asset, u.amount, u.s_balance, u.s_version))
               AS leg(n, account_id, shard, asset, amount, balance_after, version)
         ORDER BY u.o, leg.n;
        UPDATE account_shards SET posted = v_s_posted, version = v_s_version, updated_at = v_now
         WHERE account_id = v_usage.id AND shard = v_shard;
    END IF;
    UPDATE lots l SET remaining = v_l_remaining[array_position(v_l_id, l.id)],
                      reserved = v_l_reserved[array_position(v_l_id, l.id)]
     WHERE l.id = ANY (ARRAY(SELECT v_l_id[k] FROM generate_subscripts(v_l_id, 1) k WHERE v_l_changed[k]));
    UPDATE accounts a SET posted = v_w_posted[array_position(v_w_id, a.id)],
                          version = v_w_version[array_position(v_w_id, a.id)],
                          reserved = v_w_reserved[array_position(v_w_id, a.id)], updated_at = v_now
     WHERE a.id = ANY (ARRAY(SELECT v_w_id[u.w] FROM unnest(v_txn_wallet || v_new_wallet) u(w)
                             UNION SELECT v_r_account[r] FROM unnest(v_done_res) r));
    IF cardinality(v_done_item) > 0 THEN
        UPDATE reservations r
           SET status = CASE WHEN c.txn IS NULL THEN 'released' ELSE 'captured' END,
               captured = c.amount, capture_transaction_id = c.txn, resolved_at = v_now
          FROM unnest(v_done_res, v_done_txn, v_done_amount) AS c(r, txn, amount)
         WHERE r.id = v_r_id[c.r] AND r.id = ANY (ARRAY(SELECT v_r_id[x] FROM unnest(v_done_res) x));
    END IF;

    IF v_ka_changed THEN
        UPDATE key_spend s SET spent = k.spent, minute = v_minute
          FROM unnest(v_ka_actor, v_ka_spent) AS k(actor, spent)
         WHERE s.actor = k.actor AND s.actor = ANY (v_ka_actor);
    END IF;
    -- Spend policy: the bound wallets' window rows, each once, and the
    -- soft-limit events in the order they were crossed.
    IF v_pk_wallet IS NOT NULL THEN
        UPDATE policy_spend s SET spent = s.spent + d.delta
          FROM (SELECT DISTINCT v_w_id[k.wallet] AS account_id, v_p_period[k.li] AS period, v_p_tz[k.li] AS tz,
                       v_p_start[k.li] AS starts_at, v_p_delta[k.wallet] AS delta
                  FROM unnest(v_pk_wallet, v_pk_limit) AS k(wallet, li)
                 WHERE v_p_delta[k.wallet] <> 0) d
         WHERE s.account_id = d.account_id AND s.period = d.period AND s.time_zone = d.tz
           AND s.starts_at = d.starts_at;
        FOR v_k IN 1 .. cardinality(v_e_key) LOOP
            v_p_refused := v_e_key[v_k] / 1000;
            v_pct := v_e_key[v_k] % 1000;
            PERFORM tl_emit('limit.reached',
                jsonb_build_object('account', v_p_owner[v_p_refused], 'window', v_p_period[v_p_refused],
                                   'time_zone', v_p_tz[v_p_refused], 'mode', 'soft',
                                   'limit', v_p_amount[v_p_refused], 'threshold_percent', v_pct,
                                   'spent', v_e_spent[v_k], 'starts_at', tl_ts(v_p_start[v_p_refused]),
                                   'resets_at', tl_ts(tl_window_end(v_p_period[v_p_refused], v_p_tz[v_p_refused],
                                                                    v_p_start[v_p_refused]))),
                format('limit.reached:%s:%s:%s:%s:%s', v_p_owner[v_p_refused], v_p_period[v_p_refused],
                       v_p_tz[v_p_refused], tl_ts(v_p_start[v_p_refused]), v_pct),
                v_now);
        END LOOP;
    END IF;

    -- The answers: a debit's is built from what was written; the others are
    -- read back with the same functions the one-by-one path answers with.
    SELECT array_agg(CASE p_ops[i]
               WHEN 'debit' THEN jsonb_build_object(
                   'id', tl_public_id('txn_', t.txn),
                   'kind', 'debit',
                   'entries', jsonb_build_array(
                       jsonb_build_object('account', v_w_address[t.w], 'amount', -t.amount,
                                          'balance_after', t.w_balance, 'version', t.w_version,
                                          'asset', v_w_asset[t.w]),
                       jsonb_build_object('account', v_usage.address, 'amount', t.amount,
                                          'balance_after', t.s_balance, 'version', t.s_version,
                                          'asset', v_usage.asset)),
                   'lots', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                       'lot_id', tl_public_id('lot_', m.lot), 'amount', m.amount)
                                       ORDER BY m.lot), '[]'::jsonb)
                              FROM unnest(v_mv_txn, v_mv_lot, v_mv_amount) AS m(txn, lot, amount)
                             WHERE m.txn = t.txn),
                   'memo', p_args[i] ->> 'memo',
                   'metadata', coalesce(nullif(p_args[i] -> 'metadata', 'null'::jsonb), '{}'::jsonb),
                   'details', '{}'::jsonb,
                   'actor', p_ctxs[i] ->> 'actor',
                   'request_id', p_ctxs[i] ->> 'request_id',
                   'reverses', NULL,
                   'reversed_by', NULL,
                   'created_at', tl_ts(v_now))
               WHEN 'reserve' THEN tl_reservation_json(n.id, v_now)
                   || jsonb_build_object('available_after', n.available)
               WHEN 'capture' THEN jsonb_build_object(
                   'reservation', tl_reservation_json(v_r_id[c.r], v_now),
                   'transaction', tl_transaction_json(t.txn))
               ELSE tl_reservation_json(v_r_id[c.r], v_now) END
           ORDER BY i)
      INTO v_bodies
      FROM unnest(v_items) AS i
      LEFT JOIN unnest(v_txn, v_txn_item, v_txn_wallet, v_txn_amount, v_txn_balance, v_txn_version,
                       v_txn_s_balance, v_txn_s_version)
                AS t(txn, item, w, amount, w_balance, w_version, s_balance, s_version) ON t.item = i
      LEFT JOIN unnest(v_new_id, v_new_item, v_new_available) AS n(id, item, available) ON n.item = i
      LEFT JOIN unnest(v_done_item, v_done_res) AS c(item, r) ON c.item = i
     WHERE v_out[i] = 'null'::jsonb;
    v_k := 0;
    FOREACH v_i IN ARRAY v_items LOOP
        CONTINUE WHEN v_out[v_i] IS DISTINCT FROM 'null'::jsonb;
        v_k := v_k + 1;
        v_out[v_i] := jsonb_build_object('status', p_statuses[v_i], 'replayed', false, 'body', v_bodies[v_k]);
    END LOOP;
    RETURN v_out;
END $$;

-- The debits alone, set-based (tests pin which wallets qualify).
CREATE OR REPLACE FUNCTION tl_debit_fast(
    p_ops text[], p_args jsonb[], p_ctxs jsonb[], p_statuses integer[], p_claimed boolean[])
RETURNS jsonb[] LANGUAGE sql AS $$
    SELECT tl_batch_fast(p_ops, p_args, p_ctxs, p_statuses, p_claimed, ARRAY['debit'])
$$;

-- Coalesced operations (service/coalesce.py): the requests that reached one
-- replica while its earlier calls were in flight, run in one database
-- transaction, each with the outcome it would have had alone, in arrival
-- order. Item i is (p_callers[i], p_keys[i], p_hashes[i], p_ops[i],
-- p_statuses[i], p_args[i], p_ctxs[i]), as the arguments of tl_execute. A
-- single usage event (POST /v1/usage) is op `usage` with the arguments of
-- tl_record_usage and no key: (source, event_id) is its key, and its status
-- is its own (201 recorded, 200 duplicate), not p_statuses[i].
--   1. Every key is claimed in one statement, in (caller, key) order and
--      before any account lock: tl_execute also takes its key first, so a
--      batch and a single call never wait on each other in a cycle.
--   2. The capped keys' spend rows are locked (tl_key_lock). Then the usage
--      events are prepared (tl_usage_prepare: priced, or answered without a
--      lock, as a duplicate or with their error) and those to record are
--      claimed in one INSERT in (source, event_id) order, still before any
--      account lock, as tl_record_usage and tl_record_usage_batch claim
--      theirs, for the same reason. Of an event repeated in the batch only
--      the first is claimed now; the others are prepared at their turn, when
--      they answer as its duplicates.
--   3. Every account the batch can touch is locked once, ascending id, then
--      a free index of the system shards (tl_lock, the global order):
--      concurrent batches cannot deadlock, and a hot wallet is locked once
--      per batch.
--   4. Each operation runs in a subtransaction of its own. A business
--      rejection (TLB01..06) is stored with its key, as tl_execute does; any
--      other operating error (TLA, TLB07, TLC, TLD) gives the key back and
--      answers that item alone. A usage event is settled (tl_usage_settle)
--      in a subtransaction of its own, and any of its errors answers it
--      alone and gives its claim back (its row is deleted, as a single call
--      rolls it back), so a retry can record it. Anything else (a bug, a
--      timeout, a broken invariant) fails the whole batch; the service then
--      runs its items one by one, so that one bad request never fails the
--      others. The recorded usage events are rolled up last, once per key,
--      in key order (tl_usage_rollup_events).
-- Returns a JSON array with one element per item: {status, body, replayed},
-- or {error: {state, code, detail, hint}}. Keys are distinct per caller
-- within a batch: the coalescer defers a repeated key to the next batch.
CREATE OR REPLACE FUNCTION tl_execute_batch(
    p_callers text[], p_keys text[], p_hashes bytea[], p_ops text[], p_statuses integer[],
    p_args jsonb[], p_ctxs jsonb[])
RETURNS jsonb LANGUAGE plpgsql
-- Generic plans for every statement under it (the operations it dispatches
-- included): the custom plans PostgreSQL would otherwise make for the first
-- calls of each statement on each connection, and again whenever it judges
-- a custom plan cheaper, cost more CPU than these one-row statements run
-- (measured: 4.1 -> 3.3 ms of PostgreSQL CPU per lone debit).
SET plan_cache_mode = force_generic_plan
-- Every statement under it reaches a handful of rows by key. With the
-- statistics of a freshly loaded table (every table starts so) the planner
-- may judge a scan of the whole table cheaper than its index; this keeps the
-- hot path on the indexes whatever the statistics say (tests/db/test_plans.py).
SET enable_seqscan = off
AS $$
DECLARE
    v_n integer := cardinality(p_ops);
    v_capped boolean;
    v_claimed boolean[];
    -- Where each key claimed now is (NULL: not claimed now), to complete it
    -- by its row's address.
    v_tids tid[];
    -- Keys completed or given back, less those of the answered items.
    v_done bigint;
    v_given bigint;
    v_fast jsonb[];
    v_row idempotency_keys;
    v_out jsonb[] := '{}';
    v_body jsonb;
    v_status integer;
    v_state text;
    v_code text;
    v_detail text;
    v_hint text;
    -- Usage events: whether the batch has any; per item, its answer given
    -- before the lock (a duplicate, an error), or its claimed row and
    -- spend-policy flag; the items that may take locks (all but those
    -- answered already); and the events recorded, for the roll-ups.
    v_usage boolean := 'usage' = ANY (p_ops);
    v_early jsonb[];
    v_events usage_events[];
    v_violations text[];
    v_lockable boolean[];
    v_claim record;
    v_recorded usage_events[] := '{}';
BEGIN
    ASSERT (SELECT count(DISTINCT (c, k)) FILTER (WHERE k IS NOT NULL) = count(k)
              FROM unnest(p_callers, p_keys) AS u(c, k)),
        'tl_execute_batch: a key repeats within the batch';
    -- 1. Claim the keys; v_claimed[i] says whether item i took its key now.
    WITH claimed AS (
        INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body)
        SELECT c, k, h, 0, 'null'::jsonb FROM unnest(p_callers, p_keys, p_hashes) AS u(c, k, h)
        WHERE k IS NOT NULL
        ORDER BY c, k
        ON CONFLICT DO NOTHING
        RETURNING caller, key, ctid)
    SELECT array_agg(u.k IS NULL OR m.ctid IS NOT NULL ORDER BY u.i), array_agg(m.ctid ORDER BY u.i)
      INTO v_claimed, v_tids
      FROM unnest(p_callers, p_keys) WITH ORDINALITY AS u(c, k, i)
      LEFT JOIN claimed m ON m.caller = u.c AND m.key = u.k;
    -- 2. Lock the capped keys' spend rows (tl_key_lock; not for a usage event
    --    that settles a reservation, which charges no key: it takes none
    --    alone either), then prepare and claim the usage events.
    IF NOT v_usage THEN
        v_capped := tl_key_lock(p_ctxs);
        v_lockable := v_claimed;
    ELSE
        v_capped := tl_key_lock(ARRAY(SELECT c FROM unnest(p_ops, p_args, p_ctxs) AS u(o, a, c)
                                       WHERE o <> 'usage' OR a ->> 'reservation' IS NULL));
        v_claim := tl_usage_batch_claim(
            ARRAY(SELECT u.i::integer FROM (SELECT u.i, u.a, row_number() OVER (
                                              PARTITION BY u.a ->> 'source', u.a ->> 'event_id' ORDER BY u.i) AS nth
                                     FROM unnest(p_ops, p_args) WITH ORDINALITY AS u(o, a, i)
                                    WHERE u.o = 'usage') u
                   WHERE u.nth = 1 ORDER BY u.a ->> 'source', u.a ->> 'event_id'),
            p_args, p_ctxs, array_fill(NULL::jsonb, ARRAY[v_n]), array_fill(NULL::usage_events, ARRAY[v_n]),
            array_fill(NULL::text, ARRAY[v_n]));
        v_early := v_claim.answers;
        v_events := v_claim.events;
        v_violations := v_claim.violations;
        v_lockable := ARRAY(SELECT u.c AND u.e IS NULL FROM unnest(v_claimed, v_early) WITH ORDINALITY AS u(c, e, i)
                             ORDER BY u.i);
    END IF;
    -- 3. Lock what the fresh items can touch, in the global order.
    PERFORM tl_lock(
        ARRAY(SELECT a.id FROM unnest(p_args, v_lockable) AS u(args, fresh)
                JOIN accounts a ON a.address IN (u.args ->> 'account', u.args ->> 'from', u.args ->> 'to')
               WHERE u.fresh
              UNION
              -- By `id = ANY (array)`, which only the index answers: as a
              -- join, a fresh table's statistics had it hash all of them
              -- (tests/db/test_plans.py).
              SELECT r.account_id FROM reservations r
               WHERE r.id = ANY (ARRAY(SELECT (u.args ->> 'reservation_id')::uuid
                                         FROM unnest(p_args, v_lockable) AS u(args, fresh)
                                        WHERE u.fresh))),
        ARRAY['system:expired', 'system:issuance', 'system:usage']);
    -- 4. What can go set-based (tl_batch_fast), then the rest one by one, in
    --    arrival order. (A usage event answered already changes nothing, so
    --    its wallet may still go set-based.)
    v_fast := tl_batch_fast(p_ops, p_args, p_ctxs, p_statuses, v_lockable);
    -- The keys claimed above, by their rows' addresses (`ctid = ANY`, a TID
    -- scan): joined by (caller, key), a connection whose plan was made while
    -- the table was small (a fresh database) read every key of the caller at
    -- each batch, the key a filter (tests/db/test_plans.py). Nothing else
    -- writes these rows before this (they are this transaction's own).
    UPDATE idempotency_keys k SET status_code = (u.r ->> 'status')::integer, body = u.r -> 'body'
      FROM unnest(v_tids, v_fast) AS u(t, r)
     WHERE u.r IS NOT NULL AND NOT u.r ? 'error' AND k.ctid = u.t AND k.ctid = ANY (v_tids);
    GET DIAGNOSTICS v_done = ROW_COUNT;
    IF v_capped THEN
        -- An item tl_batch_fast answered with an operating error (a key's
        -- spend rate cap) gives its key back, as below.
        DELETE FROM idempotency_keys k
         USING unnest(v_tids, v_fast) AS u(t, r)
         WHERE u.r ? 'error' AND k.ctid = u.t AND k.ctid = ANY (v_tids);
        GET DIAGNOSTICS v_given = ROW_COUNT;
        v_done := v_done + v_given;
    END IF;
    FOR i IN 1 .. v_n LOOP
        IF v_fast[i] IS NOT NULL THEN
            -- (Its key, if it claimed one, was completed or given back above.)
            v_done := v_done - (v_tids[i] IS NOT NULL)::integer;
            v_out := v_out || v_fast[i];
            CONTINUE;
        END IF;
        IF p_ops[i] = 'usage' THEN
            IF v_early[i] IS NULL AND (v_events[i]).id IS NULL THEN
                -- Repeated in the batch: prepared (and claimed, should the
                -- first have failed) now, after the first.
                v_claim := tl_usage_batch_claim(ARRAY[i], p_args, p_ctxs, v_early, v_events, v_violations);
                v_early := v_claim.answers;
                v_events := v_claim.events;
                v_violations := v_claim.violations;
            END IF;
            IF v_early[i] IS NOT NULL THEN
                v_out := v_out || v_early[i];
                CONTINUE;
            END IF;
            BEGIN
                v_body := tl_usage_settle(v_events[i], p_args[i], p_ctxs[i], v_violations[i], false);
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_code = MESSAGE_TEXT,
                                        v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
                IF v_state !~ '^TL' THEN
                    RAISE;
                END IF;
                DELETE FROM usage_events WHERE id = (v_events[i]).id;
                v_out := v_out || jsonb_build_object('error', jsonb_build_object(
                    'state', v_state, 'code', v_code, 'detail', v_detail, 'hint', v_hint));
                CONTINUE;
            END;
            v_recorded := v_recorded || v_events[i];
            v_out := v_out || (v_body || '{"replayed": false}'::jsonb);
            CONTINUE;
        END IF;
        IF NOT v_claimed[i] THEN
            SELECT * INTO v_row FROM idempotency_keys WHERE caller = p_callers[i] AND key = p_keys[i];
            IF v_row.request_hash <> p_hashes[i] THEN
                v_out := v_out || jsonb_build_object('error', jsonb_build_object(
                    'state', 'TLC01', 'code', 'idempotency_key_reused',
                    'detail', 'this Idempotency-Key was used with a different request; nothing was changed'));
            ELSE
                v_out := v_out || jsonb_build_object('status', v_row.status_code, 'body', v_row.body,
                                                     'replayed', true);
            END IF;
            CONTINUE;
        END IF;
        BEGIN
            v_body := tl_dispatch(p_ops[i], p_args[i], p_ctxs[i]);
            v_status := p_statuses[i];
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_code = MESSAGE_TEXT,
                                    v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
            IF v_state IN ('TLB01', 'TLB02', 'TLB03', 'TLB04', 'TLB05', 'TLB06', 'TLB08', 'TLB09') THEN
                v_status := 409;
                v_body := jsonb_build_object('code', v_code, 'detail', v_detail,
                                             'extra', coalesce(nullif(v_hint, '')::jsonb, '{}'::jsonb));
            ELSIF v_state ~ '^TL[ABCD]' THEN
                IF p_keys[i] IS NOT NULL THEN
                    DELETE FROM idempotency_keys WHERE caller = p_callers[i] AND key = p_keys[i];
                END IF;
                v_out := v_out || jsonb_build_object('error', jsonb_build_object(
                    'state', v_state, 'code', v_code, 'detail', v_detail, 'hint', v_hint));
                CONTINUE;
            ELSE
                RAISE;
            END IF;
        END;
        IF p_keys[i] IS NOT NULL THEN
            UPDATE idempotency_keys SET status_code = v_status, body = v_body
                WHERE caller = p_callers[i] AND key = p_keys[i];
        END IF;
        v_out := v_out || jsonb_build_object('status', v_status, 'body', v_body, 'replayed', false);
    END LOOP;
    -- Every key an answered item claimed was completed (or given back): one
    -- left claimed but empty would answer its retries as in flight, so a row
    -- that moved fails the batch (the service then runs its items one by one).
    ASSERT v_done = 0, 'tl_execute_batch: an answered key was not completed';
    IF cardinality(v_recorded) > 0 THEN
        PERFORM tl_usage_rollup_events(v_recorded);
    END IF;
    RETURN to_jsonb(v_out);
END $$;

CREATE OR REPLACE FUNCTION tl_dispatch(p_op text, p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN CASE p_op
        WHEN 'grant' THEN tl_op_grant(p_args, p_ctx)
        WHEN 'debit' THEN tl_op_debit(p_args, p_ctx)
        WHEN 'transfer' THEN tl_op_transfer(p_args, p_ctx)
        WHEN 'void_lot' THEN tl_op_void_lot(p_args, p_ctx)
        WHEN 'reverse' THEN tl_op_reverse(p_args, p_ctx)
        WHEN 'offboard' THEN tl_op_offboard(p_args, p_ctx)
        WHEN 'reserve' THEN tl_op_reserve(p_args, p_ctx)
        WHEN 'capture' THEN tl_op_capture(p_args, p_ctx)
        WHEN 'release' THEN tl_op_release(p_args, p_ctx)
        WHEN 'extend' THEN tl_op_extend(p_args, p_ctx)
        WHEN 'add_price' THEN tl_op_add_price(p_args, p_ctx)
        WHEN 'create_webhook' THEN tl_op_create_webhook(p_args, p_ctx)
        WHEN 'retry_delivery' THEN tl_op_retry_delivery(p_args, p_ctx)
        WHEN 'request_approval' THEN tl_op_request_approval(p_args, p_ctx)
        WHEN 'approve' THEN tl_op_approve(p_args, p_ctx)
        WHEN 'reject' THEN tl_op_reject(p_args, p_ctx)
    END;
END $$;

-- Runs one operation under an idempotency key (scoped to the caller).
-- Returns {status, body, replayed}. Successes and business rejections
-- (TLBxx, 409) are stored with the key in this same transaction; anything
-- else raises, rolls back, and leaves the key free for a retry.
CREATE OR REPLACE FUNCTION tl_execute(
    p_caller text, p_key text, p_hash bytea, p_op text, p_success_status integer, p_args jsonb, p_ctx jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_row idempotency_keys;
    v_body jsonb;
    v_status integer;
    v_inserted boolean;
    v_state text;
    v_code text;
    v_detail text;
    v_hint text;
BEGIN
    IF p_key IS NOT NULL THEN
        BEGIN
            -- Waits here while another transaction holds the same key, then
            -- sees its committed row (or takes the key if it rolled back).
            INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body)
            VALUES (p_caller, p_key, p_hash, 0, 'null'::jsonb)
            ON CONFLICT DO NOTHING;
            v_inserted := FOUND;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM tl_raise('TLB07', 'idempotency_key_in_progress',
                             'a request with this Idempotency-Key is still being processed; retry shortly');
        END;
        IF NOT v_inserted THEN
            SELECT * INTO v_row FROM idempotency_keys WHERE caller = p_caller AND key = p_key;
            IF v_row.request_hash <> p_hash THEN
                PERFORM tl_raise('TLC01', 'idempotency_key_reused',
                                 'this Idempotency-Key was used with a different request; nothing was changed');
            END IF;
            RETURN jsonb_build_object('status', v_row.status_code, 'body', v_row.body, 'replayed', true);
        END IF;
    END IF;
    IF p_ctx ? 'rate_limit' THEN
        PERFORM tl_key_lock(ARRAY[p_ctx]);  -- a capped key's spend row, before any account
    END IF;
    BEGIN
        v_body := tl_dispatch(p_op, p_args, p_ctx);
        v_status := p_success_status;
    EXCEPTION WHEN SQLSTATE 'TLB01' OR SQLSTATE 'TLB02' OR SQLSTATE 'TLB03' OR SQLSTATE 'TLB04'
                 OR SQLSTATE 'TLB05' OR SQLSTATE 'TLB06' OR SQLSTATE 'TLB08' OR SQLSTATE 'TLB09' THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_code = MESSAGE_TEXT,
                                v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
        v_status := 409;
        v_body := jsonb_build_object('code', v_code, 'detail', v_detail,
                                     'extra', coalesce(nullif(v_hint, '')::jsonb, '{}'::jsonb));
    END;
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys SET status_code = v_status, body = v_body
            WHERE caller = p_caller AND key = p_key;
    END IF;
    RETURN jsonb_build_object('status', v_status, 'body', v_body, 'replayed', false);
END $$;

-- A batch of grants in one database transaction: each item is idempotent by
-- its own key and fails alone. All accounts the batch can touch are locked
-- up front in the global order, so two batches never deadlock.
--
-- Set-based where it pays: the items that are sure to succeed (a new key, an
-- open wallet, funded by an open system:issuance, a valid expiry) are claimed
-- in one sorted INSERT of their keys, each wallet is expired once, and all of
-- them are written with a few statements; each account row (and the issuance
-- shard row) moves once, by the sum. Updating one row once per item instead
-- made each later look-up of it walk every earlier version of the row (they
-- stay until commit), so 1,000 grants to one wallet cost O(n^2) and took over
-- 5 s. Every other item (a replay, a reused key, a department funder, an
-- error) goes through tl_execute one at a time, exactly as before, after the
-- fast items.
CREATE OR REPLACE FUNCTION tl_grant_batch(p_caller text, p_items jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_item record;
    v_res jsonb;
    v_now timestamptz;
    v_state text;
    v_code text;
    v_detail text;
    v_wallet bigint;
BEGIN
    PERFORM tl_lock(
        (SELECT coalesce(array_agg(a.id), '{}') FROM accounts a
          WHERE a.address IN (SELECT 'employee:' || (i ->> 'employee') FROM jsonb_array_elements(p_items) i
                              UNION SELECT coalesce(i ->> 'funded_by', 'system:issuance') FROM jsonb_array_elements(p_items) i)),
        ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);

    CREATE TEMP TABLE IF NOT EXISTS tl_grant_batch_items (
        pos integer PRIMARY KEY, key text, hash bytea, args jsonb, wallet bigint, funder bigint,
        amount bigint, priority integer, effective_at timestamptz, expires_at timestamptz,
        candidate boolean, fast boolean NOT NULL DEFAULT false, txn uuid, lot uuid, result jsonb
    ) ON COMMIT DROP;
    TRUNCATE tl_grant_batch_items;
    INSERT INTO tl_grant_batch_items (pos, key, hash, wallet, funder, amount, priority, effective_at, expires_at,
                                      args, candidate)
    SELECT i.pos, i.v ->> 'key', decode(i.v ->> 'hash', 'hex'), w.id, f.id, (i.v #>> '{grant,amount}')::bigint,
           coalesce((i.v #>> '{grant,priority}')::integer, 100),
           coalesce((i.v #>> '{grant,effective_at}')::timestamptz, v_now), (i.v #>> '{grant,expires_at}')::timestamptz,
           i.v -> 'grant', w.asset = f.asset AND i.pos = min(i.pos) OVER (PARTITION BY i.v ->> 'key')
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS i (v, pos)
    LEFT JOIN accounts w ON w.address = 'employee:' || (i.v #>> '{grant,employee}') AND w.status = 'open'
    LEFT JOIN accounts f ON f.address = coalesce(i.v #>> '{grant,funded_by}', 'system:issuance')
                        AND f.address = 'system:issuance' AND f.status = 'open';
    -- Claim the keys of the items that cannot fail, in key order; a key that
    -- exists, or repeats an earlier item's, leaves its item to tl_execute.
    BEGIN
        WITH claimed AS (
            INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body)
            SELECT p_caller, 'grants:batch/' || b.key, b.hash, 0, 'null'::jsonb FROM tl_grant_batch_items b
            WHERE b.candidate AND b.amount > 0 AND b.priority BETWEEN 0 AND 1000
              AND (b.expires_at IS NULL OR b.expires_at > greatest(b.effective_at, v_now))
            ORDER BY 2
            ON CONFLICT DO NOTHING
            RETURNING key)
        UPDATE tl_grant_batch_items b SET fast = true, txn = tl_uuid7(), lot = tl_uuid7()
        FROM claimed c WHERE 'grants:batch/' || b.key = c.key AND b.candidate;
    EXCEPTION WHEN lock_not_available THEN
        NULL;  -- another request holds one of the keys: every item goes the slow way
    END;

    IF EXISTS (SELECT 1 FROM tl_grant_batch_items WHERE fast) THEN
        FOR v_wallet IN SELECT DISTINCT wallet FROM tl_grant_batch_items WHERE fast ORDER BY wallet LOOP
            PERFORM tl_expire_due(v_wallet, v_now, p_ctx);
        END LOOP;
        INSERT INTO transactions (id, kind, memo, metadata, details, actor, request_id, created_at)
        SELECT txn, 'grant', args ->> 'memo', coalesce(nullif(args -> 'metadata', 'null'::jsonb), '{}'::jsonb),
               jsonb_build_object('reason', args ->> 'reason'), p_ctx ->> 'actor', p_ctx ->> 'request_id', v_now
        FROM tl_grant_batch_items WHERE fast ORDER BY pos;
        INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                          grant_transaction_id, funded_by, source_lot_id, created_at)
        SELECT lot, wallet, amount, amount, priority, effective_at, expires_at, txn, funder, NULL, v_now
        FROM tl_grant_batch_items WHERE fast ORDER BY pos;
        INSERT INTO lot_movements (transaction_id, lot_id, amount)
        SELECT txn, lot, amount FROM tl_grant_batch_items WHERE fast ORDER BY pos;
        -- The funder's leg first, then the wallet's, as tl_op_grant posts them.
        PERFORM tl_post_entries(array_agg(l.txn ORDER BY l.pos, l.leg), array_agg(l.account ORDER BY l.pos, l.leg),
                                array_agg(l.amount ORDER BY l.pos, l.leg), v_now)
        FROM (SELECT pos, 1 AS leg, txn, funder AS account, -amount AS amount FROM tl_grant_batch_items WHERE fast
              UNION ALL
              SELECT pos, 2, txn, wallet, amount FROM tl_grant_batch_items WHERE fast) l;
        UPDATE tl_grant_batch_items
            SET result = jsonb_build_object('transaction', tl_transaction_json(txn), 'lot', tl_lot_json(lot))
            WHERE fast;
        UPDATE idempotency_keys k SET status_code = 201, body = b.result
            FROM tl_grant_batch_items b WHERE b.fast AND k.caller = p_caller AND k.key = 'grants:batch/' || b.key;
    END IF;

    -- Everything else, one at a time in batch order (each fails alone).
    FOR v_item IN SELECT i.pos, i.v FROM jsonb_array_elements(p_items) WITH ORDINALITY AS i (v, pos)
                  JOIN tl_grant_batch_items b ON b.pos = i.pos AND NOT b.fast
                  ORDER BY i.pos LOOP
        BEGIN
            v_res := tl_execute(p_caller, 'grants:batch/' || (v_item.v ->> 'key'), decode(v_item.v ->> 'hash', 'hex'),
                                'grant', 201, v_item.v -> 'grant', p_ctx);
            IF (v_res ->> 'status')::integer = 201 THEN
                v_res := jsonb_build_object(
                    'key', v_item.v ->> 'key',
                    'status', CASE WHEN (v_res ->> 'replayed')::boolean THEN 'duplicate' ELSE 'created' END,
                    'transaction_id', v_res #>> '{body,transaction,id}',
                    'lot_id', v_res #>> '{body,lot,id}');
            ELSE
                v_res := jsonb_build_object('key', v_item.v ->> 'key', 'status', 'rejected',
                                            'code', v_res #>> '{body,code}',
                                            'detail', v_res #>> '{body,detail}');
            END IF;
        EXCEPTION WHEN SQLSTATE 'TLA01' OR SQLSTATE 'TLA02' OR SQLSTATE 'TLA03' OR SQLSTATE 'TLC01'
                     OR SQLSTATE 'TLD01' OR SQLSTATE 'TLB07' THEN
            GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_code = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
            v_res := jsonb_build_object('key', v_item.v ->> 'key', 'status', 'rejected',
                                        'code', v_code, 'detail', v_detail);
        END;
        UPDATE tl_grant_batch_items SET result = v_res WHERE pos = v_item.pos;
    END LOOP;
    RETURN jsonb_build_object('results', coalesce((
        SELECT jsonb_agg(CASE WHEN fast THEN jsonb_build_object(
                                  'key', key, 'status', 'created',
                                  'transaction_id', result #>> '{transaction,id}', 'lot_id', result #>> '{lot,id}')
                              ELSE result END ORDER BY pos)
        FROM tl_grant_batch_items), '[]'::jsonb));
END $$;

-- Posts many legs at once, in array order: each account's balance and
-- version (or, for a sharded system account, this backend's shard row's)
-- move once, by the sum, and each entry gets the balance_after and version
-- that posting the legs one by one with tl_post_entry would have given it.
-- The caller holds the row locks. One UPDATE per row rather than one per
-- leg: repeated updates of one row in one transaction leave a chain of row
-- versions that every later look-up of the row walks.
CREATE OR REPLACE FUNCTION tl_post_entries(p_txns uuid[], p_accounts bigint[], p_amounts bigint[], p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WITH legs AS (
        SELECT l.ord, l.txn, l.account, l.amount, a.asset, a.shard_count,
               CASE WHEN a.shard_count > 1 THEN tl_shard(a.shard_count) ELSE 0 END AS shard
        FROM unnest(p_txns, p_accounts, p_amounts) WITH ORDINALITY AS l (txn, account, amount, ord)
        JOIN accounts a ON a.id = l.account),
    totals AS (
        SELECT account, shard, shard_count, sum(amount)::bigint AS total, count(*) AS n
        FROM legs GROUP BY account, shard, shard_count),
    plain AS (
        UPDATE accounts a SET posted = a.posted + t.total, version = a.version + t.n, updated_at = p_now
        FROM totals t WHERE t.shard_count <= 1 AND a.id = t.account
        RETURNING a.id AS account, 0 AS shard, a.posted - t.total AS posted0, a.version - t.n AS version0),
    sharded AS (
        UPDATE account_shards s SET posted = s.posted + t.total, version = s.version + t.n, updated_at = p_now
        FROM totals t WHERE t.shard_count > 1 AND s.account_id = t.account AND s.shard = t.shard
        RETURNING s.account_id AS account, s.shard, s.posted - t.total AS posted0, s.version - t.n AS version0),
    base AS (SELECT * FROM plain UNION ALL SELECT * FROM sharded)
    INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
    SELECT l.txn, l.account, l.shard, l.asset, l.amount,
           b.posted0 + sum(l.amount) OVER w, b.version0 + row_number() OVER w, p_now
    FROM legs l JOIN base b ON b.account = l.account AND b.shard = l.shard
    WINDOW w AS (PARTITION BY l.account, l.shard ORDER BY l.ord)
    ORDER BY l.ord;
END $$;

-- ===========================================================================
-- 6. Roll-ups: usage and spend roll-ups, settled lots, report periods
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Usage roll-ups: the usage events summed per day and month, in the
-- transaction of each event
-- ---------------------------------------------------------------------------

-- Daily roll-up for reports, kept in the same transaction as each event.
-- project '' stands for "no project" so it can be part of the key.
CREATE TABLE IF NOT EXISTS usage_daily (
    day                 date NOT NULL,
    account_id          bigint NOT NULL REFERENCES accounts (id),
    model               text NOT NULL,
    project             text NOT NULL DEFAULT '',
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, account_id, model, project)
);

-- Coarser roll-ups, so a month's report reads far fewer rows than events:
-- per account and month, and per day without the account (that one is
-- touched by every event of the day, so it is split into shard rows by
-- backend like the system accounts, and never becomes one hot row).
CREATE TABLE IF NOT EXISTS usage_monthly (
    month               date NOT NULL,
    account_id          bigint NOT NULL REFERENCES accounts (id),
    model               text NOT NULL,
    project             text NOT NULL DEFAULT '',
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (month, account_id, model, project)
);
-- The monthly roll-up without the project: about as many rows as accounts
-- times models, what most whole-month reports (by employee, department,
-- model) need.
CREATE TABLE IF NOT EXISTS usage_monthly_models (
    month               date NOT NULL,
    account_id          bigint NOT NULL REFERENCES accounts (id),
    model               text NOT NULL,
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (month, account_id, model)
);
CREATE TABLE IF NOT EXISTS usage_daily_models (
    day                 date NOT NULL,
    model               text NOT NULL,
    project             text NOT NULL DEFAULT '',
    shard               integer NOT NULL,
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, project, shard)
);

-- Adds sums of events to the four roll-ups: item i is the events of one
-- (day, account, model, project) -- p_days[i], p_accounts[i], ... -- with
-- their counts and token and credit sums (several items may share a key).
-- One row per key per call, written in key order, so that batches writing
-- the same roll-up rows (usage_daily_models is shared by every account) take
-- their row locks in one order and never deadlock on them.
CREATE OR REPLACE FUNCTION tl_usage_rollup_sums(
    p_days date[], p_accounts bigint[], p_models text[], p_projects text[], p_events bigint[],
    p_input bigint[], p_cached bigint[], p_output bigint[], p_credits bigint[]) RETURNS void
-- plpgsql, so that its four statements are planned once per session, not at
-- every call as in a SQL function.
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (day, account_id, model, project, events, input_tokens,
                                  cached_input_tokens, output_tokens, credits)
    SELECT s.day, s.account_id, s.model, s.project, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_events, p_input, p_cached, p_output, p_credits)
         AS s (day, account_id, model, project, events, input_tokens, cached_input_tokens, output_tokens, credits)
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, account_id, model, project) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
    INSERT INTO usage_monthly AS d (month, account_id, model, project, events, input_tokens,
                                    cached_input_tokens, output_tokens, credits)
    SELECT date_trunc('month', s.day)::date, s.account_id, s.model, s.project, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_events, p_input, p_cached, p_output, p_credits)
         AS s (day, account_id, model, project, events, input_tokens, cached_input_tokens, output_tokens, credits)
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (month, account_id, model, project) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
    INSERT INTO usage_monthly_models AS d (month, account_id, model, events, input_tokens,
                                           cached_input_tokens, output_tokens, credits)
    SELECT date_trunc('month', s.day)::date, s.account_id, s.model, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_events, p_input, p_cached, p_output, p_credits)
         AS s (day, account_id, model, project, events, input_tokens, cached_input_tokens, output_tokens, credits)
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (month, account_id, model) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
    INSERT INTO usage_daily_models AS d (day, model, project, shard, events, input_tokens,
                                         cached_input_tokens, output_tokens, credits)
    SELECT s.day, s.model, s.project, pg_backend_pid() % 16, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_events, p_input, p_cached, p_output, p_credits)
         AS s (day, account_id, model, project, events, input_tokens, cached_input_tokens, output_tokens, credits)
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, model, project, shard) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
END $$;

-- Adds a set of events (as rows of usage_events) to the four roll-ups.
-- plpgsql, so that its statement is planned once per session (it runs once
-- per coalesced batch of usage events: tl_usage_rollup_events).
CREATE OR REPLACE FUNCTION tl_usage_rollup_many(p_events usage_events[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_usage_rollup_sums(array_agg((e.occurred_at AT TIME ZONE 'UTC')::date), array_agg(e.account_id),
                                 array_agg(e.model), array_agg(coalesce(e.project, '')),
                                 array_agg(1::bigint), array_agg(e.input_tokens), array_agg(e.cached_input_tokens),
                                 array_agg(e.output_tokens), array_agg(e.cost))
       FROM unnest(p_events) e;
END $$;

-- One event's roll-ups (tl_record_usage), straight to the sums: plpgsql, so
-- that the call is planned once per session; as a SQL function over
-- tl_usage_rollup_many it was planned at every call, a third of a single
-- event's roll-up time.
CREATE OR REPLACE FUNCTION tl_usage_rollup(p usage_events) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_tag_keys text[];
BEGIN
    PERFORM tl_usage_rollup_sums(ARRAY[(p.occurred_at AT TIME ZONE 'UTC')::date], ARRAY[p.account_id],
                                 ARRAY[p.model], ARRAY[coalesce(p.project, '')], ARRAY[1::bigint],
                                 ARRAY[p.input_tokens], ARRAY[p.cached_input_tokens], ARRAY[p.output_tokens],
                                 ARRAY[p.cost]);
    -- The tag roll-ups of the declared report tag keys ("Tag roll-ups"
    -- below); none declared, the usual case: nothing more.
    v_tag_keys := ARRAY(SELECT name FROM report_tag_keys ORDER BY name COLLATE "C");
    IF cardinality(v_tag_keys) > 0 THEN
        PERFORM tl_usage_tag_rollup_sums(ARRAY[(p.occurred_at AT TIME ZONE 'UTC')::date], ARRAY[p.account_id],
                                         ARRAY[p.model], ARRAY[coalesce(p.project, '')],
                                         ARRAY[tl_report_tag_values(p.tags, v_tag_keys)], ARRAY[1::bigint],
                                         ARRAY[p.input_tokens], ARRAY[p.cached_input_tokens],
                                         ARRAY[p.output_tokens], ARRAY[p.cost]);
    END IF;
END $$;

-- The roll-ups of usage events recorded one by one in a coalesced batch
-- (tl_execute_batch), all at once at its end: one row per key per roll-up,
-- written in key order, so that batches that share roll-up rows
-- (usage_daily_models is shared by every account) take their locks in one
-- order, as tl_record_usage_batch does; written per event in the order the
-- events came, two batches could each hold a row the other waits for.
CREATE OR REPLACE FUNCTION tl_usage_rollup_events(p_events usage_events[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_tag_keys text[];
BEGIN
    PERFORM tl_usage_rollup_many(p_events);
    v_tag_keys := ARRAY(SELECT name FROM report_tag_keys ORDER BY name COLLATE "C");
    IF cardinality(v_tag_keys) > 0 THEN
        PERFORM tl_usage_tag_rollup_sums(array_agg((e.occurred_at AT TIME ZONE 'UTC')::date),
                                         array_agg(e.account_id), array_agg(e.model),
                                         array_agg(coalesce(e.project, '')),
                                         array_agg(tl_report_tag_values(e.tags, v_tag_keys)),
                                         array_agg(1::bigint), array_agg(e.input_tokens),
                                         array_agg(e.cached_input_tokens), array_agg(e.output_tokens),
                                         array_agg(e.cost))
           FROM unnest(p_events) e;
    END IF;
END $$;

-- ---------------------------------------------------------------------------
-- Roll-ups of debits and captures for usage reports (issue 16, reports3)
--
-- GET /v1/reports/usage counts debits and captures by amount beside the
-- usage events. Read from the journal, a month of them cost seconds (each
-- transaction joined to its paying entry: 300,000 of each in the bench);
-- these roll-ups hold the same sums per UTC day (and per UTC month), per
-- paying account, metadata `model` (NULL when none) and `project` ('' when
-- none), so a report over whole days reads them as it reads usage_daily and
-- usage_monthly for the events. What counts is exactly what the journal
-- query counted: each negative entry of a `debit` or `capture` transaction,
-- in the bucket of the transaction's created_at. Reversals do not count
-- (the usage report never subtracted them; the usage events' roll-ups do
-- not either).
--
-- They are written by a statement-level trigger on entries over its
-- transition table, in the same transaction as the spend, once per INSERT
-- statement: a coalesced batch that posts all its entries in one statement
-- pays once, and no write function had to change. The rows of one account
-- are only touched by transactions that hold that account's lock, so they
-- add no lock wait of their own. No foreign key to accounts: entries has it
-- already, and a per-row RI check would be a cost on the hot path.
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS spend_daily (
    day        date NOT NULL,
    account_id bigint NOT NULL,
    model      text,
    project    text NOT NULL DEFAULT '',
    debits     bigint NOT NULL DEFAULT 0,
    credits    bigint NOT NULL DEFAULT 0
);
-- A unique index, NULLS NOT DISTINCT (PostgreSQL 15 or later): one row per
-- key, a NULL model included (ON CONFLICT infers it).
CREATE UNIQUE INDEX IF NOT EXISTS spend_daily_key_idx
    ON spend_daily (day, account_id, model, project) NULLS NOT DISTINCT;

CREATE TABLE IF NOT EXISTS spend_monthly (
    month      date NOT NULL,
    account_id bigint NOT NULL,
    model      text,
    project    text NOT NULL DEFAULT '',
    debits     bigint NOT NULL DEFAULT 0,
    credits    bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS spend_monthly_key_idx
    ON spend_monthly (month, account_id, model, project) NULLS NOT DISTINCT;

-- When the roll-ups were (re)built from the journal: the first application
-- of this file backfills them once (section 15), tl_spend_rollup_rebuild()
-- again on demand.
CREATE TABLE IF NOT EXISTS spend_rollup_builds (
    built_at timestamptz PRIMARY KEY
);

-- The trigger: the statement's paying entries (the negative ones) of debits
-- and captures, their transaction's kind and metadata read by primary key,
-- summed per key in key order (one statement's rows are written in one
-- order), then one upsert per roll-up, all in one statement.
CREATE OR REPLACE FUNCTION tl_spend_rollup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One statement without parameters, so its plan is made once per
    -- session and reused (with the spend passed on in arrays, the upserts
    -- took parameters and were planned anew at most calls: several times
    -- the cost). A statement without spend (a grant, a usage batch) runs it
    -- too and writes nothing; one without a negative entry (a lone debit's
    -- system:usage leg, which tl_post_entry writes apart) stops here.
    IF NOT EXISTS (SELECT 1 FROM tl_new_entries WHERE amount < 0) THEN
        RETURN NULL;
    END IF;
    WITH s AS MATERIALIZED (
        SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day, n.account_id,
               t.metadata ->> 'model' AS model, coalesce(t.metadata ->> 'project', '') AS project,
               count(*)::bigint AS debits, -sum(n.amount)::bigint AS credits
        FROM tl_new_entries n
        -- One primary-key probe per paying entry, never a join planned
        -- against the whole table: the plan is cached for the session, made
        -- when the transition table's size was whatever it was then
        -- (OFFSET 0 keeps the subquery from being flattened into a join).
        CROSS JOIN LATERAL (SELECT x.kind, x.created_at, x.metadata FROM transactions x
                            WHERE x.id = n.transaction_id OFFSET 0) t
        WHERE n.amount < 0 AND t.kind IN ('debit', 'capture')
        GROUP BY 1, 2, 3, 4),
    daily AS (
        INSERT INTO spend_daily AS d (day, account_id, model, project, debits, credits)
        SELECT day, account_id, model, project, debits, credits FROM s
        ORDER BY day, account_id, model, project
        ON CONFLICT (day, account_id, model, project) DO UPDATE SET
            debits = d.debits + EXCLUDED.debits,
            credits = d.credits + EXCLUDED.credits)
    INSERT INTO spend_monthly AS m (month, account_id, model, project, debits, credits)
    SELECT date_trunc('month', day)::date, account_id, model, project, sum(debits), sum(credits)
    FROM s
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (month, account_id, model, project) DO UPDATE SET
        debits = m.debits + EXCLUDED.debits,
        credits = m.credits + EXCLUDED.credits;
    -- The tag roll-ups of the declared report tag keys ("Tag roll-ups"),
    -- counting the same entries; none declared, the usual case: nothing more.
    -- The keys are read inside the statement, not passed in, so that its plan
    -- is made once per session like the one above.
    IF EXISTS (SELECT 1 FROM report_tag_keys) THEN
        WITH s AS MATERIALIZED (
            SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day, n.account_id,
                   t.metadata ->> 'model' AS model, coalesce(t.metadata ->> 'project', '') AS project,
                   tl_report_tag_values(t.metadata, k.keys) AS tag_values,
                   count(*)::bigint AS debits, -sum(n.amount)::bigint AS credits
            FROM tl_new_entries n
            CROSS JOIN LATERAL (SELECT x.kind, x.created_at, x.metadata FROM transactions x
                                WHERE x.id = n.transaction_id OFFSET 0) t
            -- tl_report_tag_keys' query written out: a SQL function that is
            -- not inlined has its body planned again at every statement.
            CROSS JOIN (SELECT ARRAY(SELECT name FROM report_tag_keys
                                     ORDER BY name COLLATE "C") AS keys) k
            WHERE n.amount < 0 AND t.kind IN ('debit', 'capture')
            GROUP BY 1, 2, 3, 4, 5),
        daily AS (
            INSERT INTO spend_tag_daily AS d (day, model, project, tag_values, shard, debits, credits)
            SELECT day, model, project, tag_values, pg_backend_pid() % 16, sum(debits), sum(credits) FROM s
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
            ON CONFLICT (day, model, project, tag_values, shard) DO UPDATE SET
                debits = d.debits + EXCLUDED.debits,
                credits = d.credits + EXCLUDED.credits)
        INSERT INTO spend_tag_monthly AS m (month, account_id, tag_values, debits, credits)
        SELECT date_trunc('month', day)::date, account_id, tag_values, sum(debits), sum(credits)
        FROM s
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (month, account_id, tag_values) DO UPDATE SET
            debits = m.debits + EXCLUDED.debits,
            credits = m.credits + EXCLUDED.credits;
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS entries_spend_rollup ON entries;
CREATE TRIGGER entries_spend_rollup AFTER INSERT ON entries
    REFERENCING NEW TABLE AS tl_new_entries
    FOR EACH STATEMENT EXECUTE FUNCTION tl_spend_rollup();

-- Rebuilds both roll-ups from the journal, exactly as the trigger keeps
-- them, with entries locked against writers meanwhile (SHARE: reads go on).
-- For the first application (section 15), and for a journal written with triggers
-- off (bench/reports.py writes one set-based).
CREATE OR REPLACE FUNCTION tl_spend_rollup_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE entries IN SHARE MODE;
    DELETE FROM spend_daily;
    DELETE FROM spend_monthly;
    INSERT INTO spend_daily (day, account_id, model, project, debits, credits)
    SELECT (t.created_at AT TIME ZONE 'UTC')::date, e.account_id,
           t.metadata ->> 'model', coalesce(t.metadata ->> 'project', ''),
           count(*), -sum(e.amount)
    FROM transactions t
    JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
    WHERE t.kind IN ('debit', 'capture')
    GROUP BY 1, 2, 3, 4;
    INSERT INTO spend_monthly (month, account_id, model, project, debits, credits)
    SELECT date_trunc('month', day)::date, account_id, model, project, sum(debits), sum(credits)
    FROM spend_daily
    GROUP BY 1, 2, 3, 4;
    INSERT INTO spend_rollup_builds (built_at) VALUES (clock_timestamp());
END $$;

-- ---------------------------------------------------------------------------
-- Settled lots: an as-of balance that does not grow with history (issue 21)
-- ---------------------------------------------------------------------------

-- A lot is settled from an instant on when it held nothing at any instant
-- after it: it holds nothing now (remaining = 0, so reserved = 0 too) and
-- every movement it ever had happened at or before settled_at. The as-of
-- balance (tl_balance_at) subtracts, for each lot that had expired by the
-- instant, what it still held then; summing a lot's movements for that
-- read all of its history (tens of thousands of rows for a heavy user's
-- monthly lot, for every point of a series), while a lot settled by the
-- instant held nothing and is skipped on one primary-key probe.
--
-- Written off the hot path, by tl_settle_lots (the background loop), for
-- lots that died in the movements since its last pass. A lot given credits
-- again (a reversal after it was spent or expired) loses its row in the
-- same statement (trigger lots_unsettle), so a row here is never stale: a
-- lot without one is summed as before, exact and only slower.
CREATE TABLE IF NOT EXISTS lot_settled (
    lot_id     uuid PRIMARY KEY REFERENCES lots (id),
    settled_at timestamptz NOT NULL
);

-- tl_settle_lots' place in lot_movements: it has looked at the movements up
-- to movement_id, and will look up to seen_id next (the newest id at its
-- previous pass, so that a movement whose transaction was still in flight
-- then has committed by the time it is read).
CREATE TABLE IF NOT EXISTS lot_settle_progress (
    name        text PRIMARY KEY,
    movement_id bigint NOT NULL,
    seen_id     bigint NOT NULL
);
-- The routine audit checks the marks of lots last moved since its checkpoint.
CREATE INDEX IF NOT EXISTS lot_settled_settled_idx ON lot_settled (settled_at);

CREATE OR REPLACE FUNCTION tl_lot_unsettled() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM lot_settled WHERE lot_id = NEW.id;
    RETURN NULL;
END $$;

-- Only a lot at 0 that gets credits back can have a row here; the WHEN is
-- evaluated without calling the function, so the debits' and captures'
-- updates of lots pay nothing for it.
DROP TRIGGER IF EXISTS lots_unsettle ON lots;
CREATE TRIGGER lots_unsettle AFTER UPDATE OF remaining ON lots
    FOR EACH ROW WHEN (OLD.remaining = 0 AND NEW.remaining <> 0)
    EXECUTE FUNCTION tl_lot_unsettled();

-- Marks the lots that hold nothing among those moved by up to p_limit
-- movement ids after the progress mark; returns how many ids it covered
-- (less than p_limit: caught up). One caller at a time (the progress row is
-- taken with SKIP LOCKED: another replica's call returns 0 at once). The
-- lots are locked (FOR SHARE, SKIP LOCKED) before the statement that reads
-- their movements, so that no movement can be added between that read and
-- the commit of the mark without its trigger seeing the mark.
CREATE OR REPLACE FUNCTION tl_settle_lots(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_progress lot_settle_progress;
    v_to bigint;
    v_lots uuid[];
BEGIN
    SELECT * INTO v_progress FROM lot_settle_progress WHERE name = 'lots' FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    v_to := least(v_progress.seen_id, v_progress.movement_id + p_limit);
    SELECT array_agg(l.id) INTO v_lots FROM (
        SELECT l.id FROM lots l
        WHERE l.id IN (SELECT m.lot_id FROM lot_movements m
                       WHERE m.id > v_progress.movement_id AND m.id <= v_to)
          AND l.remaining = 0
        ORDER BY l.id FOR SHARE SKIP LOCKED) l;
    IF v_lots IS NOT NULL THEN
        INSERT INTO lot_settled (lot_id, settled_at)
        SELECT m.lot_id, max(t.created_at)
        FROM lot_movements m JOIN transactions t ON t.id = m.transaction_id
        WHERE m.lot_id = ANY (v_lots)
          AND m.lot_id IN (SELECT l.id FROM lots l WHERE l.id = ANY (v_lots) AND l.remaining = 0)
        GROUP BY m.lot_id
        ON CONFLICT (lot_id) DO UPDATE SET settled_at = EXCLUDED.settled_at;
    END IF;
    UPDATE lot_settle_progress
       SET movement_id = v_to,
           seen_id = CASE WHEN v_to = seen_id
                          THEN coalesce((SELECT max(id) FROM lot_movements), 0) ELSE seen_id END
     WHERE name = 'lots';
    RETURN (v_to - v_progress.movement_id)::integer;
END $$;

-- The posted balance of an account as of an instant: the balance_after of
-- its last entry at or before it (per shard for system accounts), less the
-- credits of lots that had expired by then but whose expiry was written
-- later (expiry is exact at expires_at; the journal records it when a write
-- or the sweeper gets there). A lot's credits as of p_at are its movements
-- up to p_at, less what reservations alive at p_at held on it; a lot
-- settled by p_at (lot_settled) held none, and its movements are not read.
-- Each lot's two sums are computed once (LATERAL), not once per use.
--
-- PL/pgSQL with a generic plan, not a SQL function: a SQL function that is
-- not inlined (this one has subqueries) has its body planned again at every
-- call, and that planning cost five times the execution (0.65 against 0.13 ms
-- of CPU on a year of 1M entries, 48 buffers touched per call, more as the
-- tables grow), the tail of the as-of balance at scale. PL/pgSQL keeps the
-- plan for the session. Generic, because p_at's value buys nothing (every
-- part is an index probe by account and lot) while a custom plan per call,
-- which the plan cache kept choosing, cost more than the SQL function did.
CREATE OR REPLACE FUNCTION tl_balance_at(p_account bigint, p_at timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN (
        SELECT coalesce(sum(x.balance_after), 0)
        FROM generate_series(0, (SELECT shard_count - 1 FROM accounts WHERE id = p_account)) s
        CROSS JOIN LATERAL (
            SELECT e.balance_after FROM entries e
            WHERE e.account_id = p_account AND e.shard = s AND e.created_at <= p_at
            ORDER BY e.created_at DESC, e.version DESC LIMIT 1) x
    )::bigint - (
        -- (a program lot's rollover part lives on until rollover_until)
        SELECT coalesce(sum(greatest(0, r.remaining - h.held)
                            - CASE WHEN l.rollover_max IS NOT NULL AND l.rollover_until > p_at
                                   THEN least(l.rollover_max, greatest(0, r.remaining - h.held)) ELSE 0 END), 0)
        FROM lots l
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(m.amount), 0) AS remaining FROM lot_movements m
            JOIN transactions t ON t.id = m.transaction_id
            WHERE m.lot_id = l.id AND t.created_at <= p_at) r
        CROSS JOIN LATERAL (
            SELECT coalesce(sum(rh.amount), 0) AS held FROM reservation_holds rh
            JOIN reservations rv ON rv.id = rh.reservation_id
            WHERE rh.lot_id = l.id AND rv.created_at <= p_at
              AND coalesce(rv.resolved_at, rv.expires_at) > p_at) h
        WHERE l.account_id = p_account AND l.expires_at <= p_at AND l.created_at <= p_at
          AND NOT EXISTS (SELECT 1 FROM lot_settled s WHERE s.lot_id = l.id AND s.settled_at <= p_at)
    )::bigint;
END $$;

-- The audit's finding for a settled lot that is not (service/sql/audit.sql,
-- audit_4_settled_lots and its __since form).
CREATE OR REPLACE FUNCTION tl_settled_lot_problem(p_lot uuid, p_remaining bigint, p_moved_at timestamptz,
                                                  p_settled_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('settled lot %s: remaining %s, last moved at %s, settled at %s', tl_public_id('lot_', p_lot),
                  p_remaining, tl_ts(p_moved_at), tl_ts(p_settled_at))
$$;

-- ---------------------------------------------------------------------------
-- Report periods
-- ---------------------------------------------------------------------------

-- The periods of a finance report over [p_from, p_to): the whole span, or
-- with p_monthly one period per UTC month (the first and last cut at the
-- bounds). At most 14 month starts in 400 days; the LIMIT and ROWS tell the
-- planner so (it guesses 1,000 rows for a generate_series and then plans,
-- and JIT-compiles, for a thousand times the work).
CREATE OR REPLACE FUNCTION tl_report_periods(p_from timestamptz, p_to timestamptz, p_monthly boolean)
RETURNS TABLE (starts timestamptz, ends timestamptz) LANGUAGE sql STABLE ROWS 14 AS $$
    SELECT b, coalesce(lead(b) OVER (ORDER BY b), p_to)
    FROM (SELECT p_from AS b
          UNION
          SELECT m AT TIME ZONE 'UTC'
          FROM generate_series(date_trunc('month', p_from AT TIME ZONE 'UTC') + interval '1 month',
                               p_to AT TIME ZONE 'UTC' - interval '1 microsecond',
                               interval '1 month') m
          WHERE p_monthly
          LIMIT 14) x
$$;

-- ===========================================================================
-- 7. Grant programs: recurring allotments
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Grant programs: recurring allotments (README, Grant programs)
-- ---------------------------------------------------------------------------

-- A program issues `amount` to every employee of its audience once per
-- cycle. Cycle "YYYY-MM" starts at local midnight of day `cadence_day` of
-- that month in `time_zone` and ends where the next one starts (so a DST
-- change moves the UTC instant, never the local one).
CREATE TABLE IF NOT EXISTS grant_programs (
    id           text PRIMARY KEY,
    amount       bigint NOT NULL,
    reason       text NOT NULL,
    cadence_day  integer NOT NULL,
    time_zone    text NOT NULL DEFAULT 'UTC',
    audience     jsonb NOT NULL,
    expiry       jsonb,
    rollover_max bigint,
    funded_by    bigint NOT NULL REFERENCES accounts (id),
    starts_on    date NOT NULL,
    ends_on      date,
    active       boolean NOT NULL,
    prorate      boolean NOT NULL DEFAULT false,
    -- When the program last became active: the scheduler owes no cycle that
    -- ended before it (a pause is not an outage to catch up on).
    activated_at timestamptz,
    version      integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    CONSTRAINT grant_programs_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$'),
    CONSTRAINT grant_programs_amount_positive CHECK (amount > 0),
    CONSTRAINT grant_programs_day_range CHECK (cadence_day BETWEEN 1 AND 28),
    CONSTRAINT grant_programs_rollover_nonnegative CHECK (rollover_max IS NULL OR rollover_max >= 0),
    CONSTRAINT grant_programs_rollover_needs_cycle_expiry
        CHECK (rollover_max IS NULL OR expiry = '{"at": "end_of_cycle"}'::jsonb),
    CONSTRAINT grant_programs_ends_after_start CHECK (ends_on IS NULL OR ends_on >= starts_on)
);

-- One row per run of a cycle (by the API, the scheduler, or an onboarding).
CREATE TABLE IF NOT EXISTS program_runs (
    id                uuid PRIMARY KEY,
    program_id        text NOT NULL REFERENCES grant_programs (id),
    cycle             text NOT NULL,
    trigger           text NOT NULL,
    issued            integer NOT NULL DEFAULT 0,
    credits           bigint NOT NULL DEFAULT 0,
    skipped           jsonb NOT NULL DEFAULT '{}'::jsonb,
    skipped_employees jsonb NOT NULL DEFAULT '[]'::jsonb,
    actor             text,
    request_id        text,
    ran_at            timestamptz NOT NULL,
    -- NULL while a run (issued in batches of members) is still going, or if
    -- it stopped half way; the scheduler owes a cycle until one completes.
    completed_at      timestamptz,
    CONSTRAINT program_runs_trigger_valid CHECK (trigger IN ('api', 'scheduler', 'onboarding')),
    CONSTRAINT program_runs_cycle_format CHECK (cycle ~ '^[0-9]{4}-(0[1-9]|1[0-2])$')
);
CREATE INDEX IF NOT EXISTS program_runs_program_idx ON program_runs (program_id, cycle, ran_at);

-- Invariant 8: the primary key is what makes a grant exactly one per
-- (program, cycle, employee), whoever runs the cycle and however often. A
-- run claims its rows with INSERT .. ON CONFLICT DO NOTHING and issues only
-- the rows it inserted. The lot and transaction are written after the claim
-- in the same transaction, hence the deferred references.
CREATE TABLE IF NOT EXISTS program_grants (
    program_id     text NOT NULL REFERENCES grant_programs (id),
    cycle          text NOT NULL,
    employee_id    text NOT NULL REFERENCES employees (id),
    amount         bigint NOT NULL,
    transaction_id uuid NOT NULL REFERENCES transactions (id) DEFERRABLE INITIALLY DEFERRED,
    lot_id         uuid NOT NULL REFERENCES lots (id) DEFERRABLE INITIALLY DEFERRED,
    run_id         uuid NOT NULL REFERENCES program_runs (id),
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (program_id, cycle, employee_id),
    CONSTRAINT program_grants_amount_positive CHECK (amount > 0)
);

CREATE OR REPLACE FUNCTION tl_cycle_bounds(p_cycle text, p_day integer, p_tz text,
                                           OUT starts_at timestamptz, OUT ends_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT (m + (p_day - 1))::timestamp AT TIME ZONE p_tz,
           ((m + interval '1 month')::date + (p_day - 1))::timestamp AT TIME ZONE p_tz
    FROM (SELECT to_date(p_cycle || '-01', 'YYYY-MM-DD') AS m) x
$$;

-- The cycle an instant falls in: its local time, moved back (day - 1) days,
-- is in the cycle's month.
CREATE OR REPLACE FUNCTION tl_cycle_at(p_at timestamptz, p_day integer, p_tz text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char((p_at AT TIME ZONE p_tz) - make_interval(days => p_day - 1), 'YYYY-MM')
$$;

CREATE OR REPLACE FUNCTION tl_cycle_add(p_cycle text, p_months integer) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(to_date(p_cycle || '-01', 'YYYY-MM-DD') + make_interval(months => p_months), 'YYYY-MM')
$$;

-- A program's first cycle starts on or after starts_on; its last starts on
-- or before ends_on (NULL: no last cycle).
CREATE OR REPLACE FUNCTION tl_program_first_cycle(p grant_programs) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN extract(day FROM p.starts_on) <= p.cadence_day THEN to_char(p.starts_on, 'YYYY-MM')
                ELSE tl_cycle_add(to_char(p.starts_on, 'YYYY-MM'), 1) END
$$;

CREATE OR REPLACE FUNCTION tl_program_last_cycle(p grant_programs) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p.ends_on IS NULL THEN NULL
                WHEN extract(day FROM p.ends_on) >= p.cadence_day THEN to_char(p.ends_on, 'YYYY-MM')
                ELSE tl_cycle_add(to_char(p.ends_on, 'YYYY-MM'), -1) END
$$;

CREATE OR REPLACE FUNCTION tl_in_audience(p grant_programs, p_employee text, p_department text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce((p.audience ->> 'all')::boolean, false)
        OR coalesce(p.audience -> 'departments' ? p_department, false)
        OR coalesce(p.audience -> 'employees' ? p_employee, false)
$$;

CREATE OR REPLACE FUNCTION tl_cycle_json(p grant_programs, p_cycle text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_cycle IS NULL OR p_cycle < tl_program_first_cycle(p)
                     OR p_cycle > tl_program_last_cycle(p) THEN NULL
                ELSE (SELECT jsonb_build_object('cycle', p_cycle, 'starts_at', tl_ts(b.starts_at),
                                                'ends_at', tl_ts(b.ends_at))
                      FROM tl_cycle_bounds(p_cycle, p.cadence_day, p.time_zone) b) END
$$;

CREATE OR REPLACE FUNCTION tl_program_json(p_id text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', p.id,
        'amount', p.amount,
        'reason', p.reason,
        'cadence', jsonb_build_object('every', 'month', 'day', p.cadence_day),
        'time_zone', p.time_zone,
        'audience', p.audience,
        'expiry', p.expiry,
        'rollover_max', p.rollover_max,
        'funded_by', f.address,
        'starts_on', p.starts_on,
        'ends_on', p.ends_on,
        'active', p.active,
        'prorate', p.prorate,
        'activated_at', tl_ts(p.activated_at),
        'version', p.version,
        'current_cycle', tl_cycle_json(p, tl_cycle_at(p_now, p.cadence_day, p.time_zone)),
        'next_cycle', tl_cycle_json(p, greatest(tl_cycle_add(tl_cycle_at(p_now, p.cadence_day, p.time_zone), 1),
                                                tl_program_first_cycle(p))),
        'created_at', tl_ts(p.created_at),
        'updated_at', tl_ts(p.updated_at))
    FROM grant_programs p JOIN accounts f ON f.id = p.funded_by
    WHERE p.id = p_id
$$;

CREATE OR REPLACE FUNCTION tl_program_run_json(p program_runs) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'id', tl_public_id('run_', p.id),
        'program', p.program_id,
        'cycle', p.cycle,
        'trigger', p.trigger,
        'issued', p.issued,
        'credits', p.credits,
        'skipped', p.skipped,
        'skipped_employees', p.skipped_employees,
        'actor', p.actor,
        'ran_at', tl_ts(p.ran_at),
        'completed_at', tl_ts(p.completed_at))
$$;

-- Creates or replaces a program. A change applies to the runs after it;
-- grants already issued keep their lots.
CREATE OR REPLACE FUNCTION tl_op_put_program(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id text := p_args ->> 'id';
    f accounts;
    v_missing text;
    v_created boolean;
    v_now timestamptz := tl_now(p_ctx);
BEGIN
    BEGIN
        PERFORM now() AT TIME ZONE (p_args ->> 'time_zone');
    EXCEPTION WHEN invalid_parameter_value THEN
        PERFORM tl_raise('TLD01', 'invalid_request', format('unknown time zone %s', p_args ->> 'time_zone'),
                         jsonb_build_object('path', '$.time_zone'));
    END;
    f := tl_require_account(p_args ->> 'funded_by');
    IF f.type = 'employee' OR (f.type = 'system' AND f.address <> 'system:issuance') THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('programs are funded by system:issuance or a department, not %s', f.address),
            jsonb_build_object('path', '$.funded_by'));
    END IF;
    SELECT d INTO v_missing FROM jsonb_array_elements_text(coalesce(p_args #> '{audience,departments}', '[]')) d
        WHERE NOT EXISTS (SELECT 1 FROM departments WHERE id = d) LIMIT 1;
    IF v_missing IS NOT NULL THEN
        PERFORM tl_raise('TLA03', 'department_not_found', format('no department %s', v_missing),
                         jsonb_build_object('department', v_missing));
    END IF;
    SELECT e INTO v_missing FROM jsonb_array_elements_text(coalesce(p_args #> '{audience,employees}', '[]')) e
        WHERE NOT EXISTS (SELECT 1 FROM employees WHERE id = e) LIMIT 1;
    IF v_missing IS NOT NULL THEN
        PERFORM tl_raise('TLA02', 'employee_not_found', format('no employee %s', v_missing),
                         jsonb_build_object('employee', v_missing));
    END IF;
    INSERT INTO grant_programs AS g (id, amount, reason, cadence_day, time_zone, audience, expiry, rollover_max,
                                     funded_by, starts_on, ends_on, active, prorate, activated_at,
                                     created_at, updated_at)
    VALUES (v_id, (p_args ->> 'amount')::bigint, p_args ->> 'reason', (p_args #>> '{cadence,day}')::integer,
            p_args ->> 'time_zone', p_args -> 'audience', nullif(p_args -> 'expiry', 'null'::jsonb),
            (p_args ->> 'rollover_max')::bigint, f.id, (p_args ->> 'starts_on')::date,
            (p_args ->> 'ends_on')::date, (p_args ->> 'active')::boolean,
            coalesce((p_args ->> 'prorate')::boolean, false),
            CASE WHEN (p_args ->> 'active')::boolean THEN v_now END, v_now, v_now)
    ON CONFLICT (id) DO UPDATE SET
        amount = EXCLUDED.amount, reason = EXCLUDED.reason, cadence_day = EXCLUDED.cadence_day,
        time_zone = EXCLUDED.time_zone, audience = EXCLUDED.audience, expiry = EXCLUDED.expiry,
        rollover_max = EXCLUDED.rollover_max, funded_by = EXCLUDED.funded_by, starts_on = EXCLUDED.starts_on,
        ends_on = EXCLUDED.ends_on, active = EXCLUDED.active, prorate = EXCLUDED.prorate,
        activated_at = CASE WHEN NOT EXCLUDED.active THEN NULL
                            WHEN g.active THEN g.activated_at
                            ELSE EXCLUDED.activated_at END,
        version = g.version + 1, updated_at = EXCLUDED.updated_at
    RETURNING (xmax = 0) INTO v_created;
    RETURN jsonb_build_object('created', v_created, 'body', tl_program_json(v_id, v_now));
END $$;
-- tl_program_run's steps (below), each a function of its own so that the
-- run reads as a list of steps; all but the first work on the run's
-- temporary table tl_program_rows with the same set-based statements as
-- before: a few more function calls per batch of members, none per member.

-- Checks that cycle p_cycle of program p may be issued now; answers its
-- bounds and the end of the next cycle (where a rollover ends).
CREATE OR REPLACE FUNCTION tl_program_cycle(p grant_programs, p_cycle text, p_ctx jsonb,
                                            OUT o_starts timestamptz, OUT o_ends timestamptz,
                                            OUT o_next_ends timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_cycle !~ '^[0-9]{4}-(0[1-9]|1[0-2])$' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'cycle must be YYYY-MM', jsonb_build_object('path', '$.cycle'));
    END IF;
    IF NOT p.active THEN
        PERFORM tl_raise('TLD01', 'invalid_request', format('grant program %s is not active', p.id),
                         jsonb_build_object('path', '$.cycle'));
    END IF;
    IF p_cycle < tl_program_first_cycle(p) OR p_cycle > tl_program_last_cycle(p) THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('cycle %s is outside grant program %s (cycles %s to %s)', p_cycle, p.id,
                   tl_program_first_cycle(p), coalesce(tl_program_last_cycle(p), 'open-ended')),
            jsonb_build_object('path', '$.cycle'));
    END IF;
    SELECT b.starts_at, b.ends_at INTO o_starts, o_ends FROM tl_cycle_bounds(p_cycle, p.cadence_day, p.time_zone) b;
    SELECT b.ends_at INTO o_next_ends FROM tl_cycle_bounds(tl_cycle_add(p_cycle, 1), p.cadence_day, p.time_zone) b;
    IF tl_now(p_ctx) < o_starts THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('cycle %s starts at %s; it cannot be issued before then', p_cycle, tl_ts(o_starts)),
            jsonb_build_object('path', '$.cycle'));
    END IF;
END $$;

-- Step 2: one row per member of the batch whose wallet the run holds (or who
-- was granted this cycle already), with the outcome known before funding:
-- NULL (to issue), already_granted, offboarded or prorated_to_zero.
CREATE OR REPLACE FUNCTION tl_program_classify(p grant_programs, p_cycle text, p_batch text[],
                                               p_locked bigint[], p_amount bigint,
                                               p_expires timestamptz, p_rollover_until timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS tl_program_rows (
        ord bigint, employee_id text, account_id bigint, outcome text, amount bigint,
        txn uuid, lot uuid, expires_at timestamptz, rollover_until timestamptz
    ) ON COMMIT DROP;
    TRUNCATE tl_program_rows;
    INSERT INTO tl_program_rows (ord, employee_id, account_id, outcome, amount, expires_at, rollover_until)
    SELECT row_number() OVER (ORDER BY e.id), e.id, w.id,
           CASE WHEN EXISTS (SELECT 1 FROM program_grants g
                             WHERE g.program_id = p.id AND g.cycle = p_cycle AND g.employee_id = e.id)
                     THEN 'already_granted'
                WHEN e.status <> 'active' OR w.status <> 'open' THEN 'offboarded'
                WHEN p_amount <= 0 THEN 'prorated_to_zero' END,
           p_amount, p_expires, p_rollover_until
    FROM employees e JOIN accounts w ON w.address = 'employee:' || e.id
    WHERE e.id = ANY (p_batch)
      AND (w.id = ANY (p_locked) OR EXISTS (SELECT 1 FROM program_grants g
                                            WHERE g.program_id = p.id AND g.cycle = p_cycle
                                              AND g.employee_id = e.id));
END $$;

-- Step 5a: a department's lots are consumed in consumption order, member by
-- member: each member's share is the overlap of its running range with each
-- lot's. A lot made of department credits never outlives them.
CREATE OR REPLACE FUNCTION tl_program_fund(p_funder bigint, p_end timestamptz, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS tl_program_pieces (txn uuid, lot_id uuid, taken bigint, expires_at timestamptz)
        ON COMMIT DROP;
    TRUNCATE tl_program_pieces;
    INSERT INTO tl_program_pieces
    SELECT g.txn, l.id, least(g.hi, l.hi) - greatest(g.hi - g.amount, l.hi - l.free), l.expires_at
    FROM (SELECT txn, amount, sum(amount) OVER (ORDER BY ord) AS hi
          FROM tl_program_rows WHERE outcome = 'issued') g
    JOIN (SELECT id, remaining - reserved AS free, expires_at,
                 sum(remaining - reserved) OVER (ORDER BY priority, expires_at NULLS LAST, effective_at, id) AS hi
          FROM lots
          WHERE account_id = p_funder AND status = 'active' AND live AND remaining > reserved
            AND effective_at <= p_now AND (expires_at IS NULL OR expires_at > p_now)) l
      ON l.hi - l.free < g.hi AND g.hi - g.amount < l.hi;
    INSERT INTO lot_movements (transaction_id, lot_id, amount)
    SELECT txn, lot_id, -taken FROM tl_program_pieces ORDER BY txn, lot_id;
    UPDATE lots l SET remaining = l.remaining - x.taken
    FROM (SELECT lot_id, sum(taken) AS taken FROM tl_program_pieces GROUP BY lot_id) x
    WHERE l.id = x.lot_id;
    UPDATE tl_program_rows r
       SET expires_at = CASE WHEN r.expires_at IS NULL OR x.min_expiry < r.expires_at
                             THEN x.min_expiry ELSE r.expires_at END,
           rollover_until = CASE WHEN x.min_expiry < r.rollover_until THEN x.min_expiry
                                 ELSE r.rollover_until END
    FROM (SELECT txn, min(expires_at) AS min_expiry FROM tl_program_pieces GROUP BY txn) x
    WHERE x.txn = r.txn AND x.min_expiry IS NOT NULL;
    -- Rollover happens at the cycle's end; a lot cut short by its
    -- department credits does not roll over.
    UPDATE tl_program_rows SET rollover_until = NULL
    WHERE outcome = 'issued' AND (expires_at IS DISTINCT FROM p_end OR rollover_until <= expires_at);
END $$;

-- Steps 5b and 5c: the issued members' lots, their movements, and the
-- entries and balances of the wallets and the funder.
CREATE OR REPLACE FUNCTION tl_program_post(p grant_programs, f accounts, p_effective timestamptz,
                                           p_now timestamptz, p_count integer, p_total bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_shard integer := 0;
    v_posted bigint;
    v_version bigint;
BEGIN
    INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                      grant_transaction_id, funded_by, created_at, rollover_max, rollover_until)
    SELECT r.lot, r.account_id, r.amount, r.amount, 100, p_effective, r.expires_at, r.txn, f.id, p_now,
           CASE WHEN r.rollover_until IS NOT NULL THEN p.rollover_max END, r.rollover_until
    FROM tl_program_rows r WHERE r.outcome = 'issued' ORDER BY r.ord;
    INSERT INTO lot_movements (transaction_id, lot_id, amount)
    SELECT r.txn, r.lot, r.amount FROM tl_program_rows r WHERE r.outcome = 'issued' ORDER BY r.ord;

    -- Entries: each wallet's next version; the funder's (one shard of
    -- system:issuance, or the department) running balance.
    INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
    SELECT r.txn, w.id, 0, w.asset, r.amount, w.posted + r.amount, w.version + 1, p_now
    FROM tl_program_rows r JOIN accounts w ON w.id = r.account_id
    WHERE r.outcome = 'issued' ORDER BY r.ord;
    UPDATE accounts w SET posted = w.posted + r.amount, version = w.version + 1, updated_at = p_now
    FROM tl_program_rows r WHERE r.outcome = 'issued' AND w.id = r.account_id;
    IF f.shard_count > 1 THEN
        v_shard := tl_shard(f.shard_count);
        SELECT posted, version INTO v_posted, v_version FROM account_shards
            WHERE account_id = f.id AND shard = v_shard;
    ELSE
        SELECT posted, version INTO v_posted, v_version FROM accounts WHERE id = f.id;
    END IF;
    INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
    SELECT r.txn, f.id, v_shard, f.asset, -r.amount,
           v_posted - sum(r.amount) OVER (ORDER BY r.ord), v_version + row_number() OVER (ORDER BY r.ord), p_now
    FROM tl_program_rows r WHERE r.outcome = 'issued' ORDER BY r.ord;
    IF f.shard_count > 1 THEN
        UPDATE account_shards SET posted = posted - p_total, version = version + p_count, updated_at = p_now
            WHERE account_id = f.id AND shard = v_shard;
    ELSE
        UPDATE accounts SET posted = posted - p_total, version = version + p_count, updated_at = p_now
            WHERE id = f.id;
    END IF;
END $$;

-- Step 6: adds the batch's counts, skips and skipped employees to the run,
-- and completes it with the last batch.
CREATE OR REPLACE FUNCTION tl_program_record(p_run uuid, p_count integer, p_total bigint,
                                             p_done boolean, p_now timestamptz)
RETURNS program_runs LANGUAGE plpgsql AS $$
DECLARE
    v_run program_runs;
BEGIN
    UPDATE program_runs r SET
        issued = r.issued + p_count,
        credits = r.credits + p_total,
        skipped = (SELECT coalesce(jsonb_object_agg(k, n), '{}'::jsonb) FROM (
                       SELECT k, sum(n) AS n FROM (
                           SELECT key AS k, value::bigint AS n FROM jsonb_each_text(r.skipped)
                           UNION ALL
                           SELECT outcome, count(*) FROM tl_program_rows
                           WHERE outcome <> 'issued' GROUP BY outcome) a
                       GROUP BY k) s),
        skipped_employees = r.skipped_employees || (
            SELECT coalesce(jsonb_agg(jsonb_build_object('employee', employee_id, 'reason', outcome)
                                      ORDER BY ord), '[]'::jsonb)
            FROM tl_program_rows WHERE outcome NOT IN ('issued', 'already_granted')),
        completed_at = CASE WHEN p_done THEN p_now END
    WHERE id = p_run
    RETURNING * INTO v_run;
    RETURN v_run;
END $$;

CREATE OR REPLACE FUNCTION tl_program_run(p_program text, p_cycle text, p_trigger text, p_employee text,
                                          p_ctx jsonb, p_run uuid DEFAULT NULL, p_after text DEFAULT NULL,
                                          p_limit integer DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_batch text[];
    v_locked bigint[];
    v_next text;
    p grant_programs;
    f accounts;
    v_now timestamptz;
    v_start timestamptz;
    v_end timestamptz;
    v_next_end timestamptz;
    v_amount bigint;
    v_effective timestamptz;
    v_expires timestamptz;
    v_rollover_until timestamptz;
    v_budget bigint;
    v_run program_runs;
    v_total bigint;
    v_count integer;
BEGIN
    -- FOR SHARE: a PUT of the program waits for the run, and the run sees one version.
    SELECT * INTO p FROM grant_programs WHERE id = p_program FOR SHARE;
    IF NOT FOUND THEN
        PERFORM tl_raise('TLA07', 'grant_program_not_found', format('no grant program %s', p_program),
                         jsonb_build_object('program', p_program));
    END IF;
    SELECT * INTO v_start, v_end, v_next_end FROM tl_program_cycle(p, p_cycle, p_ctx);
    SELECT * INTO f FROM accounts WHERE id = p.funded_by;
    SELECT array_agg(x.id ORDER BY x.id) INTO v_batch FROM (
        SELECT e.id FROM employees e
        WHERE tl_in_audience(p, e.id, e.department) AND (p_employee IS NULL OR e.id = p_employee)
          AND (p_after IS NULL OR e.id > p_after)
        ORDER BY e.id LIMIT p_limit) x;
    v_batch := coalesce(v_batch, '{}');
    IF p_limit IS NOT NULL AND cardinality(v_batch) = p_limit THEN
        v_next := v_batch[p_limit];
    END IF;

    -- 1. Locks: wallets of the batch's members not yet granted, and a
    -- department funder, in ascending account id; then the system shards.
    -- Only members whose wallet this run holds are issued.
    SELECT array_agg(x.id) INTO v_locked FROM (
        SELECT a.id FROM accounts a
        WHERE a.type <> 'system'
          AND (a.id = f.id OR a.address IN (
                -- A scalar subquery, not NOT EXISTS: an anti join here gets
                -- planned as a scan of the cycle's grants per member.
                SELECT 'employee:' || b FROM unnest(v_batch) b
                WHERE (SELECT 1 FROM program_grants g
                       WHERE g.program_id = p.id AND g.cycle = p_cycle AND g.employee_id = b) IS NULL))
        ORDER BY a.id FOR NO KEY UPDATE) x;
    v_locked := coalesce(v_locked, '{}');
    PERFORM tl_lock('{}', ARRAY['system:expired', f.address]);
    v_now := tl_now(p_ctx);

    IF p_employee IS NOT NULL AND v_now > v_start THEN
        -- Joined during the cycle: at once, prorated by the share of the cycle left.
        v_effective := v_now;
        v_amount := CASE WHEN p.prorate
                         THEN floor(p.amount * extract(epoch FROM greatest(v_end - v_now, interval '0'))
                                    / extract(epoch FROM v_end - v_start))::bigint
                         ELSE p.amount END;
    ELSE
        v_effective := v_start;
        v_amount := p.amount;
    END IF;
    v_expires := CASE WHEN p.expiry ->> 'at' = 'end_of_cycle' THEN v_end
                      WHEN p.expiry ? 'after_days' THEN v_effective + make_interval(days => (p.expiry ->> 'after_days')::integer)
                 END;
    v_rollover_until := CASE WHEN p.rollover_max IS NOT NULL THEN v_next_end END;

    IF p_run IS NULL THEN
        INSERT INTO program_runs (id, program_id, cycle, trigger, actor, request_id, ran_at)
        VALUES (tl_uuid7(), p.id, p_cycle, p_trigger, p_ctx ->> 'actor', p_ctx ->> 'request_id', v_now)
        RETURNING * INTO v_run;
    ELSE
        SELECT * INTO v_run FROM program_runs
            WHERE id = p_run AND program_id = p.id AND cycle = p_cycle AND completed_at IS NULL FOR UPDATE;
        IF NOT FOUND THEN
            PERFORM tl_raise('TLD01', 'invalid_request', 'no unfinished run of this program and cycle to continue',
                             jsonb_build_object('path', '$.run'));
        END IF;
    END IF;

    -- 2. Classify (tl_program_rows).
    PERFORM tl_program_classify(p, p_cycle, v_batch, v_locked, v_amount, v_expires, v_rollover_until);

    -- 3. A department funds what it holds, in ascending employee id.
    IF f.type <> 'system' THEN
        PERFORM tl_expire_due(f.id, v_now, p_ctx);
        v_budget := tl_spendable(f.id, v_now);
        UPDATE tl_program_rows r SET outcome = 'insufficient_budget'
        FROM (SELECT employee_id, sum(amount) OVER (ORDER BY ord) AS cum
              FROM tl_program_rows WHERE outcome IS NULL) c
        WHERE c.employee_id = r.employee_id AND c.cum > v_budget;
    END IF;

    -- 4. Claim. A conflict means another run got there first.
    WITH claimed AS (
        INSERT INTO program_grants (program_id, cycle, employee_id, amount, transaction_id, lot_id, run_id, created_at)
        SELECT p.id, p_cycle, r.employee_id, r.amount, tl_uuid7(), tl_uuid7(), v_run.id, v_now
        FROM tl_program_rows r WHERE r.outcome IS NULL ORDER BY r.ord
        ON CONFLICT DO NOTHING
        RETURNING employee_id, transaction_id, lot_id)
    UPDATE tl_program_rows r SET outcome = 'issued', txn = c.transaction_id, lot = c.lot_id
    FROM claimed c WHERE c.employee_id = r.employee_id;
    UPDATE tl_program_rows SET outcome = 'already_granted' WHERE outcome IS NULL;

    SELECT count(*), coalesce(sum(amount), 0) INTO v_count, v_total FROM tl_program_rows WHERE outcome = 'issued';
    IF v_count > 0 THEN
        INSERT INTO transactions (id, kind, details, actor, request_id, created_at)
        SELECT r.txn, 'grant',
               jsonb_build_object('reason', p.reason, 'program', p.id, 'cycle', p_cycle, 'run', tl_public_id('run_', v_run.id)),
               p_ctx ->> 'actor', p_ctx ->> 'request_id', v_now
        FROM tl_program_rows r WHERE r.outcome = 'issued' ORDER BY r.ord;

        -- 5a. A department's lots fund the members' grants.
        IF f.type <> 'system' THEN
            PERFORM tl_program_fund(f.id, v_end, v_now);
        END IF;

        -- 5b, 5c. Lots, movements, entries and balances.
        PERFORM tl_program_post(p, f, v_effective, v_now, v_count, v_total);
    END IF;

    -- 6. The run's record.
    v_run := tl_program_record(v_run.id, v_count, v_total, v_next IS NULL, v_now);
    RETURN jsonb_build_object('run', tl_program_run_json(v_run), 'next', v_next);
END $$;

-- An employee who joins a program's audience (created, or moved into an
-- audience department) during a cycle gets that cycle's grant at once. Runs
-- that issue nothing new are not recorded.
CREATE OR REPLACE FUNCTION tl_program_onboard(p_employee text, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    p grant_programs;
    e employees;
    v_cycle text;
    v_run jsonb;
    v_runs jsonb := '[]'::jsonb;
BEGIN
    SELECT * INTO e FROM employees WHERE id = p_employee;
    FOR p IN SELECT * FROM grant_programs g WHERE g.active AND tl_in_audience(g, e.id, e.department) ORDER BY g.id LOOP
        v_cycle := tl_cycle_at(tl_now(p_ctx), p.cadence_day, p.time_zone);
        CONTINUE WHEN v_cycle < tl_program_first_cycle(p) OR v_cycle > tl_program_last_cycle(p);
        v_run := tl_program_run(p.id, v_cycle, 'onboarding', p_employee, p_ctx) -> 'run';
        IF (v_run ->> 'issued')::integer = 0 AND v_run -> 'skipped_employees' = '[]'::jsonb THEN
            DELETE FROM program_runs WHERE id = tl_parse_public_id(v_run ->> 'id');
        ELSE
            v_runs := v_runs || v_run;
        END IF;
    END LOOP;
    RETURN v_runs;
END $$;

-- The cycles the scheduler owes: for each active program, every cycle from
-- its first to the one in progress (never past its last) that has started,
-- had not ended when the program was (last) activated, and has no completed
-- API or scheduler run yet, oldest first.
CREATE OR REPLACE FUNCTION tl_programs_due(p_now timestamptz, p_limit integer) RETURNS TABLE (program_id text, cycle text)
LANGUAGE sql STABLE AS $$
    SELECT p.id, c.cycle
    FROM grant_programs p
    CROSS JOIN LATERAL (
        SELECT to_char(m, 'YYYY-MM') AS cycle
        FROM generate_series(to_date(tl_program_first_cycle(p) || '-01', 'YYYY-MM-DD'),
                             to_date(tl_cycle_at(p_now, p.cadence_day, p.time_zone) || '-01', 'YYYY-MM-DD'),
                             interval '1 month') m) c
    WHERE p.active
      AND (tl_program_last_cycle(p) IS NULL OR c.cycle <= tl_program_last_cycle(p))
      AND (SELECT b.starts_at <= p_now AND b.ends_at > p.activated_at
           FROM tl_cycle_bounds(c.cycle, p.cadence_day, p.time_zone) b)
      AND NOT EXISTS (SELECT 1 FROM program_runs r
                      WHERE r.program_id = p.id AND r.cycle = c.cycle AND r.trigger IN ('api', 'scheduler')
                        AND r.completed_at IS NOT NULL)
    ORDER BY p.id, c.cycle
    LIMIT p_limit
$$;

-- ===========================================================================
-- 8. Spend policy: period limits, model rules, overdraft, overage
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Spend policy (issue 12): period limits, model rules, overdraft, overage.
--
-- A policy belongs to an employee wallet or a department account
-- (spend_policies). A department's policy binds every member as well.
-- accounts.policy_bound says whether any policy binds an account (its own or
-- its department's): the hot functions read it from the account row they
-- already hold, so a wallet without a policy pays no look-up at all. The
-- set-based batch path (tl_batch_fast) decides a bound wallet's debits,
-- reservations, captures and releases against its limits and model rules
-- loaded once per batch for all its wallets (tl_policy_batch_links), in
-- memory, exactly as the one-by-one functions below would (tests/api/
-- test_policy.py compares the two), and writes the window rows once; only
-- a capture or release of a reservation made in an earlier window sends its
-- wallet through the one-by-one functions, where the checks below run
-- inside the same call.
--
-- Spend is kept per account and window (policy_spend), never in one row per
-- department: a member's row is written only under that member's account
-- lock. A department limit is the sum of its members' rows. A HARD
-- department limit must be checked against that sum exactly, so the check
-- is serialised per (department, window) by a transaction-level advisory
-- lock taken after the account locks, and only by writes that add spend
-- under a hard department limit; it is held to commit, which is the end of
-- the same database call (no Python in between), and a coalesced batch
-- takes them once for all its members, sorted (tl_policy_batch_links). Soft department limits and member
-- limits take no such lock. See README, "Spend policy".
--
-- Where spend counts: a debit and a usage event without a reservation in
-- the window of their instant (usage: occurred_at); a reservation in the
-- window of its created_at from the moment it is made, trued up there at
-- capture and given back there at release or expiry; a reversal gives a
-- debit's spend back to the window it was counted in. tl_journal_spend
-- derives every row from the journal, and audit checks that they agree.
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS spend_policies (
    account_id bigint PRIMARY KEY REFERENCES accounts (id),
    limits     jsonb NOT NULL DEFAULT '[]'::jsonb,
    models     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT spend_policies_limits_array CHECK (jsonb_typeof(limits) = 'array'),
    CONSTRAINT spend_policies_models_object CHECK (jsonb_typeof(models) = 'object')
);

CREATE TABLE IF NOT EXISTS policy_spend (
    account_id bigint NOT NULL REFERENCES accounts (id),
    period     text NOT NULL,
    time_zone  text NOT NULL,
    starts_at  timestamptz NOT NULL,
    -- The account's department (a department account: itself), whose
    -- limits sum this row.
    department text,
    spent      bigint NOT NULL,
    PRIMARY KEY (account_id, period, time_zone, starts_at),
    CONSTRAINT policy_spend_period_valid CHECK (period IN ('day', 'week', 'month')),
    CONSTRAINT policy_spend_spent_nonnegative CHECK (spent >= 0)
);
CREATE INDEX IF NOT EXISTS policy_spend_department_idx ON policy_spend (department, period, time_zone, starts_at)
    WHERE department IS NOT NULL;

-- Each bound account's limits, resolved: its own policy's and its
-- department's, one row per limit in the order tl_policy_count checks them
-- (`rank`). tl_policy_batch_links reads a batch's wallets' rows by key
-- instead of joining the account, its employee, its department's account
-- and both policies and parsing their jsonb at every coalesced batch: that
-- join and its executor start-up were most of what loading a batch's limits
-- cost (about 290 -> 180 us for 8 wallets). One row per limit rather than
-- one per account with the limits as arrays: unnesting the arrays of each
-- wallet (a function scan rescanned per wallet) cost as much again as
-- reading the rows (about 90 -> 45 us for 8 wallets of two limits, measured
-- in a loop). Written only by tl_policy_links_refresh, from
-- tl_policy_rebind (a policy put, an employee moving) and when a bound
-- account is created; audit_9_policy_bound checks it against the policies.
-- No row: no limit binds the account.
CREATE TABLE IF NOT EXISTS policy_links (
    account_id     bigint NOT NULL REFERENCES accounts (id),
    -- The limit's place in the account's check order, from 1.
    rank           integer NOT NULL,
    -- The department whose limits sum this account's window rows
    -- (policy_spend.department), the same on each of its rows.
    own_department text,
    -- The limit: its owner's address and place in the owner's policy, the
    -- department whose members' summed spend it counts (NULL: the account's
    -- own), window, time zone, amount, hard or soft.
    owner          text NOT NULL,
    ord            integer NOT NULL,
    department     text,
    period         text NOT NULL,
    time_zone      text NOT NULL,
    amount         bigint NOT NULL,
    hard           boolean NOT NULL,
    PRIMARY KEY (account_id, rank)
);

-- The window of a period containing p_at, in a time zone: local midnight
-- (of the day, the ISO week's Monday, the month's first day) to the next
-- one, exact on the days daylight saving starts or ends (23 or 25 hours).
CREATE OR REPLACE FUNCTION tl_window_start(p_period text, p_tz text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT date_trunc(p_period, p_at, p_tz)
$$;

CREATE OR REPLACE FUNCTION tl_window_end(p_period text, p_tz text, p_start timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT ((p_start AT TIME ZONE p_tz) + ('1 ' || p_period)::interval) AT TIME ZONE p_tz
$$;

-- The department whose limits count an account's spend.
CREATE OR REPLACE FUNCTION tl_policy_department(p_account accounts) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE p_account.type WHEN 'department' THEN p_account.ref
                WHEN 'employee' THEN (SELECT e.department FROM employees e WHERE e.id = p_account.ref) END
$$;

-- The policies binding an account: its own and, for an employee, its department's.
CREATE OR REPLACE FUNCTION tl_policies_of(p_account accounts)
RETURNS TABLE (owner text, department text, limits jsonb, models jsonb)
LANGUAGE sql STABLE AS $$
    SELECT a.address, CASE WHEN a.type = 'department' THEN a.ref END, p.limits, p.models
    FROM spend_policies p JOIN accounts a ON a.id = p.account_id
    WHERE p.account_id = p_account.id
    UNION ALL
    SELECT a.address, a.ref, p.limits, p.models
    FROM accounts a JOIN spend_policies p ON p.account_id = a.id
    WHERE p_account.type = 'employee'
      AND a.address = 'department:' || (SELECT e.department FROM employees e WHERE e.id = p_account.ref)
$$;

-- Every limit binding an account; department IS NULL for the account's own
-- (its own spend), else the department whose members' summed spend counts.
CREATE OR REPLACE FUNCTION tl_policy_limits(p_account accounts)
RETURNS TABLE (owner text, department text, period text, time_zone text, amount bigint, mode text)
LANGUAGE sql STABLE AS $$
    SELECT p.owner, p.department, l ->> 'window', coalesce(l ->> 'time_zone', 'UTC'),
           (l ->> 'amount')::bigint, coalesce(l ->> 'mode', 'hard')
    FROM tl_policies_of(p_account) p CROSS JOIN LATERAL jsonb_array_elements(p.limits) l
$$;

-- An account's spend in [p_from, p_to) as the journal tells it (see the
-- section header): what policy_spend rows must equal (audit), and how a
-- row starts. Usage events and reservations are read without the one being
-- recorded by the caller (a claimed event has no result yet).
-- PL/pgSQL only so that it may name usage_events_archive, which is created
-- further down (a SQL function's body is checked when it is created):
-- archived events still count in the windows they were spent in.
--
-- Debits and their reversals are read from the account's entries in the
-- window, each entry's transaction (and a debit's reversal) probed by key
-- in a scalar subquery. As a join, the planner hashed every debit
-- transaction of the ledger against the wallet's few entries whenever the
-- tables were small enough for that to look cheap (in `make bench`, a
-- sequential scan of transactions at each wallet's first operation of a
-- day); a LATERAL forced into a nested loop instead is what the audit's
-- enable_nestloop = off prices at disable_cost, which made PostgreSQL
-- JIT-compile every call (1 s each). A subplan is neither
-- (tests/api/test_policy_scans.py).
CREATE OR REPLACE FUNCTION tl_journal_spend(p_account bigint, p_from timestamptz, p_to timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (coalesce((
                -- Each debit's spend, less what its reversal (if any, in any
                -- window since) gave back to this account.
                SELECT sum(d.spent) FROM (
                    SELECT -sum(e.amount)
                           - coalesce((SELECT sum(re.amount) FROM entries re
                                        WHERE re.transaction_id = (SELECT rv.id FROM transactions rv
                                                                    WHERE rv.reverses = e.transaction_id
                                                                      AND rv.kind = 'reversal')
                                          AND re.account_id = p_account AND re.shard = 0), 0) AS spent
                      FROM entries e
                     WHERE e.account_id = p_account AND e.shard = 0
                       AND e.created_at >= p_from AND e.created_at < p_to
                       AND (SELECT t.kind FROM transactions t WHERE t.id = e.transaction_id) = 'debit'
                     GROUP BY e.transaction_id) d), 0)
          + coalesce((SELECT sum(u.cost) FROM usage_events u
                      WHERE u.account_id = p_account AND u.occurred_at >= p_from AND u.occurred_at < p_to
                        AND u.reservation_id IS NULL AND u.result IS NOT NULL), 0)
          + coalesce((SELECT sum(u.cost) FROM usage_events_archive u
                      WHERE u.account_id = p_account AND u.occurred_at >= p_from AND u.occurred_at < p_to
                        AND u.reservation_id IS NULL AND u.result IS NOT NULL), 0)
          + coalesce((SELECT sum(CASE WHEN r.status = 'active' THEN r.amount ELSE r.captured END)
                      FROM reservations r
                      WHERE r.account_id = p_account AND r.status IN ('active', 'captured')
                        AND r.created_at >= p_from AND r.created_at < p_to), 0))::bigint;
END $$;

-- Adds p_delta to an account's row for one window (made from the journal
-- when missing) and answers the new spend. The caller holds the account lock.
CREATE OR REPLACE FUNCTION tl_policy_spend_row(
    p_account bigint, p_department text, p_period text, p_tz text, p_start timestamptz, p_delta bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_spent bigint;
BEGIN
    UPDATE policy_spend SET spent = spent + p_delta
     WHERE account_id = p_account AND period = p_period AND time_zone = p_tz AND starts_at = p_start
    RETURNING spent INTO v_spent;
    IF NOT FOUND THEN
        INSERT INTO policy_spend (account_id, period, time_zone, starts_at, department, spent)
        VALUES (p_account, p_period, p_tz, p_start, p_department,
                tl_journal_spend(p_account, p_start, tl_window_end(p_period, p_tz, p_start)) + p_delta)
        RETURNING spent INTO v_spent;
    END IF;
    RETURN v_spent;
END $$;

-- The spend a limit counts in the window starting p_start: the account's
-- own row, or the sum of its department's rows. p_lock serialises the
-- department's hard-limit checks for the window (see the section header).
CREATE OR REPLACE FUNCTION tl_policy_total(
    p_account bigint, p_department text, p_period text, p_tz text, p_start timestamptz, p_lock boolean)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint;
BEGIN
    IF p_department IS NULL THEN
        SELECT spent INTO v_total FROM policy_spend
         WHERE account_id = p_account AND period = p_period AND time_zone = p_tz AND starts_at = p_start;
        RETURN coalesce(v_total, 0);
    END IF;
    IF p_lock THEN
        PERFORM pg_advisory_xact_lock(1969516656, hashtext(p_department || '|' || p_period || '|' || p_tz
                                                           || '|' || tl_ts(p_start)));
    END IF;
    SELECT sum(spent) INTO v_total FROM policy_spend
     WHERE department = p_department AND period = p_period AND time_zone = p_tz AND starts_at = p_start;
    RETURN coalesce(v_total, 0);
END $$;

-- The 409 limit_exceeded, as {code, detail, extra} (what tl_execute stores).
CREATE OR REPLACE FUNCTION tl_limit_exceeded_json(
    p_owner text, p_period text, p_tz text, p_amount bigint, p_spent bigint, p_requested bigint,
    p_start timestamptz)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'code', 'limit_exceeded',
        'detail', format('%s would pass the %s limit of %s credits of %s (%s spent, %s requested)',
                         p_requested, p_period, p_amount, p_owner, p_spent, p_requested),
        'extra', jsonb_build_object('account', p_owner, 'window', p_period, 'time_zone', p_tz, 'limit', p_amount,
                                    'spent', p_spent, 'remaining', greatest(p_amount - p_spent, 0),
                                    'requested', p_requested, 'starts_at', tl_ts(p_start),
                                    'resets_at', tl_ts(tl_window_end(p_period, p_tz, p_start))))
$$;

CREATE OR REPLACE FUNCTION tl_limit_exceeded(
    p_owner text, p_period text, p_tz text, p_amount bigint, p_spent bigint, p_requested bigint,
    p_start timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v jsonb := tl_limit_exceeded_json(p_owner, p_period, p_tz, p_amount, p_spent, p_requested, p_start);
BEGIN
    PERFORM tl_raise('TLB08', 'limit_exceeded', v ->> 'detail', v -> 'extra');
END $$;

-- The limits binding the bound accounts among p_wallets (tl_batch_fast's
-- wallets, by position), set-based, one row per (wallet, limit), in the
-- order tl_policy_count checks a wallet's limits (`rank`). A limit is named
-- by its owner and its place in the owner's policy (`ord`): a department's
-- limit is the same one for every member in the batch, so members' spend
-- adds up in it as it does in its rows. `total` is the spend it counts
-- now. Before the totals are read, the accounts' own window rows are made
-- (from the journal) where missing, and the (department, window) advisory
-- locks of hard department limits are taken, all at once and sorted (the
-- order tl_policy_count takes one department's in), so that the sums read
-- in the next statement stay exact until the batch commits.
--
-- The answer is the links as arrays, in check order, each naming its limit
-- by the position of the limit's first link (`first`): what tl_batch_fast
-- keeps. (It returned a set, which tl_batch_fast aggregated back into
-- arrays after a window and a sort: half of what loading the links cost.)
CREATE OR REPLACE FUNCTION tl_policy_batch_links(
    p_wallets bigint[], p_now timestamptz,
    OUT wallet integer[], OUT first integer[], OUT owner text[], OUT ord integer[], OUT period text[],
    OUT time_zone text[], OUT starts_at timestamptz[], OUT amount bigint[], OUT hard boolean[],
    OUT total bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    v_wallet integer[];
    v_account bigint[];
    v_own_department text[];
    v_owner text[];
    v_ord integer[];
    v_department text[];
    v_period text[];
    v_tz text[];
    v_start timestamptz[];
    v_amount bigint[];
    v_hard boolean[];
    -- The account's own row of the window (NULL: none yet), read with the
    -- links: the wallets are locked, so no one else changes these rows.
    v_own_spent bigint[];
    v_missing boolean;
    v_locks boolean;
    v_shared boolean;
BEGIN
    -- One sort (the window's), read in its order: an ORDER BY in each
    -- array_agg would sort the rows once per array.
    SELECT array_agg(k.wallet), array_agg(k.account), array_agg(k.own_department),
           array_agg(k.owner), array_agg(k.ord), array_agg(k.department), array_agg(k.period), array_agg(k.tz),
           array_agg(k.start), array_agg(k.amount), array_agg(k.hard), array_agg(k.own_spent),
           bool_or(k.own_spent IS NULL), bool_or(k.hard AND k.department IS NOT NULL),
           bool_or(k.department IS NOT NULL)
      INTO v_wallet, v_account, v_own_department, v_owner, v_ord, v_department, v_period, v_tz,
           v_start, v_amount, v_hard, v_own_spent, v_missing, v_locks, v_shared
      FROM (SELECT l.*,
                   -- The account's own row, probed by key: as a join, the
                   -- planner hashed the whole of policy_spend (a row per
                   -- bound wallet and window) whenever it looked small
                   -- enough (tests/api/test_policy_scans.py).
                   (SELECT y.spent FROM policy_spend y
                     WHERE y.account_id = l.account AND y.period = l.period AND y.time_zone = l.tz
                       AND y.starts_at = l.start) AS own_spent
              FROM (SELECT x.n::integer AS wallet, p.account_id AS account, p.own_department,
                           p.owner, p.ord, p.department, p.period, p.time_zone AS tz,
                           tl_window_start(p.period, p.time_zone, p_now) AS start, p.amount, p.hard, p.rank
                      FROM unnest(p_wallets) WITH ORDINALITY AS x(id, n)
                      -- The wallets' limits, resolved and in check order
                      -- (policy_links): each wallet's rows by key.
                      JOIN policy_links p ON p.account_id = x.id) l
             ORDER BY l.wallet, l.rank) k;
    IF v_wallet IS NULL THEN
        RETURN;
    END IF;
    -- Only the wallets' own limits, each with its row already read: the
    -- answer is what was just read. No department limit means no lock to
    -- take and no limit shared by two links (a link's limit is itself:
    -- `first` is its own position). This skips the statement below, which
    -- was a tenth of what a policy added to a batch of debits.
    IF NOT v_missing AND NOT v_shared THEN
        wallet := v_wallet;
        first := ARRAY(SELECT generate_series(1, cardinality(v_wallet)));
        owner := v_owner;
        ord := v_ord;
        period := v_period;
        time_zone := v_tz;
        starts_at := v_start;
        amount := v_amount;
        hard := v_hard;
        total := v_own_spent;
        RETURN;
    END IF;
    -- The accounts' own rows of the windows their limits count in (a new
    -- window, or a limit just set).
    IF v_missing THEN
        INSERT INTO policy_spend (account_id, period, time_zone, starts_at, department, spent)
        SELECT DISTINCT ON (k.account, k.period, k.tz) k.account, k.period, k.tz, k.start, k.own_department,
               tl_journal_spend(k.account, k.start, tl_window_end(k.period, k.tz, k.start))
          FROM unnest(v_account, v_own_department, v_period, v_tz, v_start)
               AS k(account, own_department, period, tz, start)
         WHERE NOT EXISTS (SELECT 1 FROM policy_spend s WHERE s.account_id = k.account AND s.period = k.period
                                                          AND s.time_zone = k.tz AND s.starts_at = k.start)
        ON CONFLICT DO NOTHING;
    END IF;
    -- The hard department limits' locks (tl_policy_total), sorted.
    IF v_locks THEN
        PERFORM pg_advisory_xact_lock(1969516656, hashtext(d.department || '|' || d.period || '|' || d.tz
                                                           || '|' || tl_ts(d.start)))
           FROM (SELECT DISTINCT k.department, k.period, k.tz, k.start
                   FROM unnest(v_department, v_period, v_tz, v_start, v_hard) AS k(department, period, tz, start, hard)
                  WHERE k.hard AND k.department IS NOT NULL
                  ORDER BY 1, 2, 3, 4) d;
    END IF;
    -- Each link's total: the account's own row, read above unless it was
    -- missing; a department's sum, read now, under its lock. Read in check
    -- order after the window's sort.
    SELECT array_agg(k.wallet), array_agg(k.first), array_agg(k.owner), array_agg(k.ord), array_agg(k.period),
           array_agg(k.tz), array_agg(k.start), array_agg(k.amount), array_agg(k.hard), array_agg(k.total)
      INTO wallet, first, owner, ord, period, time_zone, starts_at, amount, hard, total
      FROM (SELECT k.wallet, min(k.n) OVER (PARTITION BY k.owner, k.ord)::integer AS first, k.owner, k.ord,
                   k.period, k.tz, k.start, k.amount, k.hard,
                   CASE WHEN k.department IS NULL AND k.own IS NOT NULL THEN k.own
                        WHEN k.department IS NULL
                        THEN coalesce((SELECT s.spent FROM policy_spend s
                                        WHERE s.account_id = k.account AND s.period = k.period
                                          AND s.time_zone = k.tz AND s.starts_at = k.start), 0)
                        ELSE coalesce((SELECT sum(s.spent) FROM policy_spend s
                                        WHERE s.department = k.department AND s.period = k.period
                                          AND s.time_zone = k.tz AND s.starts_at = k.start), 0) END::bigint AS total
              FROM unnest(v_wallet, v_account, v_owner, v_ord, v_department, v_period, v_tz, v_start, v_amount,
                          v_hard, v_own_spent) WITH ORDINALITY AS k(wallet, account, owner, ord, department, period,
                                                                    tz, start, amount, hard, own, n)
             ORDER BY k.n) k;
END $$;

-- Counts p_delta credits of spend (negative: given back) of a bound
-- account in every window of its limits that contains p_at. With p_check,
-- added spend that passes a hard limit raises limit_exceeded (rolling back
-- the call); soft limits never refuse: crossing 80 % and 100 % of one emits
-- limit.reached, once per window and threshold (the outbox dedup key).
-- Called before the operation writes its journal rows (tl_journal_spend
-- must not see them when a row is made).
CREATE OR REPLACE FUNCTION tl_policy_count(
    p_account accounts, p_delta bigint, p_at timestamptz, p_check boolean, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_department text := tl_policy_department(p_account);
    v_w record;
    v_l record;
    v_start timestamptz;
    v_total bigint;
    v_pct integer;
BEGIN
    IF p_delta = 0 THEN
        RETURN;
    END IF;
    FOR v_w IN SELECT DISTINCT l.period, l.time_zone FROM tl_policy_limits(p_account) l ORDER BY 1, 2 LOOP
        PERFORM tl_policy_spend_row(p_account.id, v_department, v_w.period, v_w.time_zone,
                                    tl_window_start(v_w.period, v_w.time_zone, p_at), p_delta);
    END LOOP;
    IF p_delta < 0 THEN
        RETURN;
    END IF;
    FOR v_l IN SELECT * FROM tl_policy_limits(p_account) l ORDER BY l.department NULLS FIRST, l.period, l.time_zone LOOP
        CONTINUE WHEN v_l.mode = 'hard' AND NOT p_check;
        v_start := tl_window_start(v_l.period, v_l.time_zone, p_at);
        v_total := tl_policy_total(p_account.id, v_l.department, v_l.period, v_l.time_zone, v_start,
                                   v_l.mode = 'hard');
        IF v_l.mode = 'hard' THEN
            IF v_total > v_l.amount THEN
                PERFORM tl_limit_exceeded(v_l.owner, v_l.period, v_l.time_zone, v_l.amount, v_total - p_delta,
                                          p_delta, v_start);
            END IF;
            CONTINUE;
        END IF;
        FOREACH v_pct IN ARRAY ARRAY[80, 100] LOOP
            IF v_total * 100 >= v_l.amount * v_pct THEN
                PERFORM tl_emit('limit.reached',
                    jsonb_build_object('account', v_l.owner, 'window', v_l.period, 'time_zone', v_l.time_zone,
                                       'mode', v_l.mode, 'limit', v_l.amount, 'threshold_percent', v_pct,
                                       'spent', v_total, 'starts_at', tl_ts(v_start),
                                       'resets_at', tl_ts(tl_window_end(v_l.period, v_l.time_zone, v_start))),
                    format('limit.reached:%s:%s:%s:%s:%s', v_l.owner, v_l.period, v_l.time_zone, tl_ts(v_start), v_pct),
                    p_now);
            END IF;
        END LOOP;
    END LOOP;
END $$;

-- The most a bound account may still add under its hard limits now
-- (NULL: no hard limit), taking the department locks a reservation by
-- estimate will need anyway.
CREATE OR REPLACE FUNCTION tl_policy_room(p_account accounts, p_now timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_department text := tl_policy_department(p_account);
    v_l record;
    v_start timestamptz;
    v_room bigint;
BEGIN
    FOR v_l IN SELECT * FROM tl_policy_limits(p_account) l WHERE l.mode = 'hard'
               ORDER BY l.department NULLS FIRST, l.period, l.time_zone LOOP
        v_start := tl_window_start(v_l.period, v_l.time_zone, p_now);
        PERFORM tl_policy_spend_row(p_account.id, v_department, v_l.period, v_l.time_zone, v_start, 0);
        v_room := least(v_room, greatest(v_l.amount - tl_policy_total(p_account.id, v_l.department, v_l.period,
                                                                      v_l.time_zone, v_start, true), 0));
    END LOOP;
    RETURN v_room;
END $$;

-- Whether the policies binding an account allow a model of a tier: every
-- one of them must (a department's rules narrow its members' own).
-- One policy's model rules (its `models` object) on a model of a tier; a
-- single expression, so PostgreSQL inlines it where it is called
-- (tl_model_allowed, and tl_batch_fast's check of a whole batch).
CREATE OR REPLACE FUNCTION tl_models_allow(p_models jsonb, p_model text, p_tier text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT (NOT (p_models ? 'tiers') OR p_models -> 'tiers' ? p_tier)
       AND (NOT (p_models ? 'allow') OR p_models -> 'allow' ? p_model)
       AND NOT (coalesce(p_models -> 'deny', '[]'::jsonb) ? p_model)
$$;

CREATE OR REPLACE FUNCTION tl_model_allowed(p_account accounts, p_model text, p_tier text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_and(tl_models_allow(p.models, p_model, p_tier)), true)
    FROM tl_policies_of(p_account) p
$$;

-- Refuses, before anything is held, a reservation or debit of a bound
-- account for a model its policies do not allow. p_model NULL, or a model
-- with no price at p_now (nothing to check; unknown_model is answered
-- elsewhere), passes.
CREATE OR REPLACE FUNCTION tl_require_model(p_account accounts, p_model text, p_now timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_price prices;
BEGIN
    IF p_model IS NULL THEN
        RETURN;
    END IF;
    v_price := tl_price_at(p_model, p_now);
    IF v_price.id IS NOT NULL AND NOT tl_model_allowed(p_account, p_model, v_price.tier) THEN
        PERFORM tl_raise('TLB09', 'model_not_allowed',
            format('the spend policy of %s does not allow model %s (%s tier)', p_account.address, p_model, v_price.tier),
            jsonb_build_object('account', p_account.address, 'model', p_model, 'tier', v_price.tier));
    END IF;
END $$;

-- What a usage event without a reservation charges the wallet: from its
-- live lots first, then (overdraft) down to -overdraft_limit; the rest is
-- the shortfall, charged to system:overage. The wallet's overdrawn credits
-- are what its posted balance lacks against its lots (audit checks that
-- they are exactly the usage transactions' `overdraft`).
CREATE OR REPLACE FUNCTION tl_usage_cover(p_account accounts, p_cost bigint, p_now timestamptz,
                                          OUT from_lots bigint, OUT overdraft bigint, OUT shortfall bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_lots bigint;
BEGIN
    from_lots := least(p_cost, tl_spendable(p_account.id, p_now));
    overdraft := 0;
    IF from_lots < p_cost AND p_account.overdraft_limit > 0 THEN
        SELECT coalesce(sum(remaining), 0) INTO v_lots FROM lots WHERE account_id = p_account.id AND live;
        overdraft := least(p_cost - from_lots,
                           greatest(p_account.overdraft_limit - (v_lots - p_account.posted), 0),
                           greatest(p_account.posted - p_account.reserved - from_lots + p_account.overdraft_limit, 0));
    END IF;
    shortfall := p_cost - from_lots - overdraft;
END $$;

-- An account's limits as tl_policy_batch_links links them: tl_policy_limits'
-- rows (its own policy's and its department's, tl_policies_of) with the
-- limit's place in its owner's policy (`ord`) and its place in check order
-- (`rank`: own limits first, then by window, time zone, owner, place).
CREATE OR REPLACE FUNCTION tl_policy_links_of(p_account accounts)
RETURNS TABLE (rank integer, owner text, ord integer, department text, period text, time_zone text,
               amount bigint, hard boolean)
LANGUAGE sql STABLE AS $$
    SELECT (row_number() OVER (ORDER BY l.department NULLS FIRST, l.period, l.tz, l.owner, l.ord))::integer,
           l.owner, l.ord, l.department, l.period, l.tz, l.amount, l.hard
      FROM (SELECT p.owner, v.ord::integer AS ord, p.department, v.l ->> 'window' AS period,
                   coalesce(v.l ->> 'time_zone', 'UTC') AS tz, (v.l ->> 'amount')::bigint AS amount,
                   coalesce(v.l ->> 'mode', 'hard') = 'hard' AS hard
              FROM tl_policies_of(p_account) p
             CROSS JOIN LATERAL jsonb_array_elements(p.limits) WITH ORDINALITY AS v(l, ord)) l
     ORDER BY 1
$$;

-- Makes the accounts' policy_links rows again from their policies.
CREATE OR REPLACE FUNCTION tl_policy_links_refresh(p_accounts bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM policy_links WHERE account_id = ANY (p_accounts);
    INSERT INTO policy_links (account_id, rank, own_department, owner, ord, department, period, time_zone,
                              amount, hard)
    SELECT a.id, l.rank, tl_policy_department(a), l.owner, l.ord, l.department, l.period, l.time_zone,
           l.amount, l.hard
      FROM accounts a CROSS JOIN LATERAL tl_policy_links_of(a) l
     WHERE a.id = ANY (p_accounts) AND a.policy_bound
     ORDER BY a.id, l.rank;
END $$;

-- Sets whether each account is bound by a policy; a change of binding
-- forgets the account's spend rows (they are made again from the journal).
-- Its limits' links are made again whatever changed (a policy put on the
-- account or its department, or the employee moving to another one).
CREATE OR REPLACE FUNCTION tl_policy_rebind(p_accounts bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a SET policy_bound = b.bound
      FROM (SELECT x.id, EXISTS (SELECT 1 FROM tl_policies_of(x) p) AS bound
              FROM accounts x WHERE x.id = ANY (p_accounts)) b
     WHERE a.id = b.id AND a.policy_bound IS DISTINCT FROM b.bound;
    DELETE FROM policy_spend WHERE account_id = ANY (p_accounts);
    PERFORM tl_policy_links_refresh(p_accounts);
END $$;

-- An employee who joins or changes department is bound by its policy (or
-- no longer by the old one's).
CREATE OR REPLACE FUNCTION tl_employee_rebind() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_policy_rebind(ARRAY(SELECT id FROM accounts WHERE address = 'employee:' || NEW.id));
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS employees_policy_rebind ON employees;
CREATE TRIGGER employees_policy_rebind AFTER UPDATE OF department ON employees
    FOR EACH ROW WHEN (OLD.department IS DISTINCT FROM NEW.department) EXECUTE FUNCTION tl_employee_rebind();

-- A new employee wallet is bound from the start by its department's policy.
CREATE OR REPLACE FUNCTION tl_account_bind() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.type = 'employee' THEN
        NEW.policy_bound := EXISTS (
            SELECT 1 FROM spend_policies p JOIN accounts d ON d.id = p.account_id
             WHERE d.address = 'department:' || (SELECT e.department FROM employees e WHERE e.id = NEW.ref));
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS accounts_policy_bind ON accounts;
CREATE TRIGGER accounts_policy_bind BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION tl_account_bind();

-- ... and gets its links once it exists (policy_links refers to it).
CREATE OR REPLACE FUNCTION tl_account_links() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_policy_links_refresh(ARRAY[NEW.id]);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS accounts_policy_links ON accounts;
CREATE TRIGGER accounts_policy_links AFTER INSERT ON accounts
    FOR EACH ROW WHEN (NEW.policy_bound) EXECUTE FUNCTION tl_account_links();

-- The spend a limit counts at p_now, exactly: its rows less the
-- reservations among them whose time is up but that no write has expired yet.
CREATE OR REPLACE FUNCTION tl_policy_spent_now(
    p_account bigint, p_department text, p_period text, p_tz text, p_start timestamptz, p_now timestamptz)
RETURNS bigint LANGUAGE sql STABLE AS $$
    WITH rows AS (
        SELECT s.account_id, s.spent FROM policy_spend s
         WHERE p_department IS NULL AND s.account_id = p_account
           AND s.period = p_period AND s.time_zone = p_tz AND s.starts_at = p_start
        UNION ALL
        SELECT s.account_id, s.spent FROM policy_spend s
         WHERE p_department IS NOT NULL AND s.department = p_department
           AND s.period = p_period AND s.time_zone = p_tz AND s.starts_at = p_start)
    SELECT (coalesce((SELECT sum(spent) FROM rows), 0)
            - coalesce((SELECT sum(r.amount) FROM reservations r
                        WHERE r.account_id IN (SELECT account_id FROM rows) AND r.status = 'active'
                          AND r.expires_at <= p_now AND r.created_at >= p_start
                          AND r.created_at < tl_window_end(p_period, p_tz, p_start)), 0))::bigint
$$;

CREATE OR REPLACE FUNCTION tl_policy_json(p_id bigint, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account', a.address,
        'limits', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'window', w.period, 'amount', w.amount, 'mode', w.mode, 'time_zone', w.tz,
                       'spent', w.spent, 'remaining', greatest(w.amount - w.spent, 0),
                       'starts_at', tl_ts(w.start), 'resets_at', tl_ts(tl_window_end(w.period, w.tz, w.start)))
                       ORDER BY w.ord)
            FROM (SELECT l.ord, l.v ->> 'window' AS period, (l.v ->> 'amount')::bigint AS amount,
                         l.v ->> 'mode' AS mode, l.v ->> 'time_zone' AS tz,
                         tl_window_start(l.v ->> 'window', l.v ->> 'time_zone', p_now) AS start,
                         tl_policy_spent_now(a.id, CASE WHEN a.type = 'department' THEN a.ref END,
                                             l.v ->> 'window', l.v ->> 'time_zone',
                                             tl_window_start(l.v ->> 'window', l.v ->> 'time_zone', p_now),
                                             p_now) AS spent
                  FROM jsonb_array_elements(p.limits) WITH ORDINALITY AS l (v, ord)) w), '[]'::jsonb),
        'models', coalesce(p.models, '{}'::jsonb),
        'overdraft_limit', a.overdraft_limit,
        'updated_at', tl_ts(coalesce(p.updated_at, a.updated_at)))
    FROM accounts a LEFT JOIN spend_policies p ON p.account_id = a.id
    WHERE a.id = p_id
$$;

-- PUT /v1/accounts/{address}/policy: replaces the policy of a wallet or a
-- department. Its own row and every account it binds (a department's
-- members) are locked in the global order, rebound, and their spend rows
-- for the current windows made again from the journal, so a limit set
-- mid-window counts what was spent in it already.
CREATE OR REPLACE FUNCTION tl_op_put_policy(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w accounts;
    v_now timestamptz;
    v_bound bigint[];
    v_limits jsonb := '[]'::jsonb;
    v_models jsonb := coalesce(nullif(p_args -> 'models', 'null'::jsonb), '{}'::jsonb);
    v_overdraft bigint := coalesce((p_args ->> 'overdraft_limit')::bigint, 0);
    v_l record;
    v_lots bigint;
    v_acc accounts;
    v_w record;
BEGIN
    v_now := tl_now(p_ctx);
    w := tl_require_account(p_args ->> 'account');
    IF w.type NOT IN ('employee', 'department') THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'a spend policy belongs to an employee wallet or a department',
                         jsonb_build_object('path', '$.address'));
    END IF;
    FOR v_l IN SELECT l.v, l.i FROM jsonb_array_elements(coalesce(nullif(p_args -> 'limits', 'null'::jsonb), '[]'::jsonb))
                                    WITH ORDINALITY AS l (v, i) LOOP
        -- The service checks the zone too; PostgreSQL's own zone data decides
        -- (an unknown zone raises invalid_parameter_value; pg_timezone_names
        -- would read every zone file).
        BEGIN
            PERFORM v_now AT TIME ZONE coalesce(v_l.v ->> 'time_zone', 'UTC');
        EXCEPTION WHEN invalid_parameter_value THEN
            PERFORM tl_raise('TLD01', 'invalid_request',
                             format('unknown time zone %s', v_l.v ->> 'time_zone'),
                             jsonb_build_object('path', format('$.limits[%s].time_zone', v_l.i - 1)));
        END;
        v_limits := v_limits || jsonb_build_array(jsonb_build_object(
            'window', v_l.v ->> 'window', 'amount', (v_l.v ->> 'amount')::bigint,
            'mode', coalesce(v_l.v ->> 'mode', 'hard'), 'time_zone', coalesce(v_l.v ->> 'time_zone', 'UTC')));
    END LOOP;
    v_bound := ARRAY[w.id] || CASE WHEN w.type = 'department' THEN ARRAY(
        SELECT a.id FROM employees e JOIN accounts a ON a.address = 'employee:' || e.id
         WHERE e.department = w.ref) ELSE '{}' END;
    PERFORM tl_lock(v_bound, ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    SELECT * INTO w FROM accounts WHERE id = w.id;
    -- Lowering the overdraft below what the account has overdrawn already
    -- would leave it below -overdraft_limit.
    SELECT coalesce(sum(remaining), 0) INTO v_lots FROM lots WHERE account_id = w.id AND live;
    IF w.posted - w.reserved < -v_overdraft OR v_lots - w.posted > v_overdraft THEN
        PERFORM tl_raise('TLD01', 'invalid_request',
            format('%s has overdrawn %s credits; overdraft_limit cannot be lower', w.address,
                   greatest(v_lots - w.posted, w.reserved - w.posted)),
            jsonb_build_object('path', '$.overdraft_limit'));
    END IF;
    IF w.overdraft_limit <> v_overdraft THEN
        UPDATE accounts SET overdraft_limit = v_overdraft, updated_at = v_now WHERE id = w.id;
    END IF;
    IF v_limits = '[]'::jsonb AND v_models = '{}'::jsonb THEN
        DELETE FROM spend_policies WHERE account_id = w.id;
    ELSE
        INSERT INTO spend_policies AS s (account_id, limits, models, created_at, updated_at)
        VALUES (w.id, v_limits, v_models, v_now, v_now)
        ON CONFLICT (account_id) DO UPDATE SET limits = EXCLUDED.limits, models = EXCLUDED.models,
                                                updated_at = EXCLUDED.updated_at;
    END IF;
    PERFORM tl_policy_rebind(v_bound);
    FOR v_acc IN SELECT * FROM accounts WHERE id = ANY (v_bound) AND policy_bound ORDER BY id LOOP
        FOR v_w IN SELECT DISTINCT l.period, l.time_zone FROM tl_policy_limits(v_acc) l LOOP
            PERFORM tl_policy_spend_row(v_acc.id, tl_policy_department(v_acc), v_w.period, v_w.time_zone,
                                        tl_window_start(v_w.period, v_w.time_zone, v_now), 0);
        END LOOP;
    END LOOP;
    RETURN tl_policy_json(w.id, v_now);
END $$;

-- The policy part of a debit of a bound account: a model named in its
-- metadata must be allowed, and the amount must fit every hard limit
-- (checked after the balance: insufficient_credits answers first).
CREATE OR REPLACE FUNCTION tl_policy_debit(p_account accounts, p_amount bigint, p_model text, p_now timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_require_model(p_account, p_model, p_now);
    IF tl_spendable(p_account.id, p_now) >= p_amount THEN
        PERFORM tl_policy_count(p_account, p_amount, p_now, true, p_now);
    END IF;
END $$;

-- The policy part of a reservation of a bound account, before anything is
-- held: the model (of the estimate, or named in metadata) must be allowed;
-- an estimate is cut to the tightest of balance and hard limits (down to
-- min_output_tokens) and answered here when a limit is the tighter one
-- (NULL: the balance is, and tl_estimate cuts to it as before). Below
-- min_output_tokens under a limit the balance would cover: limit_exceeded.
CREATE OR REPLACE FUNCTION tl_policy_reserve(p_account accounts, p_args jsonb, p_available bigint, p_now timestamptz)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_room bigint;
    v_hint text;
    v_need bigint;
BEGIN
    PERFORM tl_require_model(p_account, coalesce(p_args -> 'estimate' ->> 'model', p_args -> 'metadata' ->> 'model'),
                             p_now);
    IF jsonb_typeof(p_args -> 'estimate') IS DISTINCT FROM 'object' THEN
        RETURN NULL;
    END IF;
    v_room := tl_policy_room(p_account, p_now);
    IF v_room IS NULL OR v_room >= p_available THEN
        RETURN NULL;
    END IF;
    BEGIN
        RETURN tl_estimate(p_args -> 'estimate', v_room, p_now, p_account.address);
    EXCEPTION WHEN SQLSTATE 'TLB01' THEN
        GET STACKED DIAGNOSTICS v_hint = PG_EXCEPTION_HINT;
        v_need := (v_hint::jsonb ->> 'requested')::bigint;
    END;
    IF v_need > p_available THEN
        RETURN NULL;  -- the balance cannot cover it either: insufficient_credits answers first
    END IF;
    PERFORM tl_policy_count(p_account, v_need, p_now, true, p_now);
    ASSERT false, 'tl_policy_reserve: an estimate above the room passed every limit';
END $$;

-- ===========================================================================
-- 9. Outbox, alerts and webhooks: events written with the change that causes
-- them, and their delivery
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Outbox: events written in the same transaction as the change that causes
-- them (a transactional outbox). Nothing is emitted for a change that rolled
-- back, and no committed change loses its event. dedup_key makes "once per
-- threshold crossing / window / lot" a unique constraint rather than a check
-- in code: tl_emit inserts ON CONFLICT DO NOTHING. The webhook dispatcher
-- (issue 14) fans events out to subscriptions; until then they accumulate
-- here and can be read by an operator.
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS outbox (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL DEFAULT tl_public_id('evt_', tl_uuid7()),
    type        text NOT NULL,
    data        jsonb NOT NULL,
    dedup_key   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When the webhook dispatcher fanned the event out to deliveries.
    fanned_out_at timestamptz,
    CONSTRAINT outbox_id_unique UNIQUE (id),
    CONSTRAINT outbox_dedup_key_unique UNIQUE (dedup_key),
    CONSTRAINT outbox_type_known CHECK (type IN ('balance.low', 'credits.expiring', 'grant.created',
        'limit.reached', 'program.run.completed', 'reservation.expired'))
);
-- The events the dispatcher has still to fan out.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (seq) WHERE fanned_out_at IS NULL;

-- Emits one event; answers its id, or NULL when dedup_key was already used.
CREATE OR REPLACE FUNCTION tl_emit(p_type text, p_data jsonb, p_dedup_key text DEFAULT NULL,
                                   p_at timestamptz DEFAULT now())
RETURNS text LANGUAGE sql AS $$
    INSERT INTO outbox (type, data, dedup_key, created_at)
    VALUES (p_type, p_data, p_dedup_key, p_at)
    ON CONFLICT ON CONSTRAINT outbox_dedup_key_unique DO NOTHING
    RETURNING id
$$;

-- ---------------------------------------------------------------------------
-- Alerts and webhooks (issue 14; README, Alerts and webhooks)
-- ---------------------------------------------------------------------------
--
-- Events reach the outbox (above) in the transaction of the change that
-- causes them, without touching the bodies of the write functions:
--   * balance.low: a BEFORE UPDATE trigger on accounts whose WHEN compares
--     the new available balance (posted - reserved) with two columns that
--     bracket it between the account's thresholds. For an account without
--     alerts both are NULL and the WHEN is false: nothing runs. Coalesced
--     batches update each account row once (by the batch's sum), so a batch
--     that crosses a threshold emits once too.
--   * grant.created: an AFTER INSERT trigger on lots (a lot made by a
--     `grant` transaction: single, batch or program).
--   * reservation.expired: an AFTER UPDATE trigger on reservations, when the
--     status becomes `expired` (the sweeper, or a write to the wallet).
--   * program.run.completed: an AFTER UPDATE trigger on program_runs, when
--     a scheduled or API run completes.
--   * credits.expiring: tl_emit_expiring, called by the background loop.
-- The dispatcher (service/webhooks.py) fans events out to deliveries, one
-- per matching webhook, and claims due deliveries with SKIP LOCKED.

-- Alert settings of an account. low_balance holds up to 10 thresholds.
CREATE TABLE IF NOT EXISTS account_alerts (
    account_id           bigint PRIMARY KEY REFERENCES accounts (id),
    low_balance          bigint[] NOT NULL DEFAULT '{}',
    expiring_within_days integer,
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT account_alerts_low_balance_count CHECK (cardinality(low_balance) <= 10),
    CONSTRAINT account_alerts_low_balance_positive CHECK (0 < ALL (low_balance)),
    CONSTRAINT account_alerts_expiring_range CHECK (expiring_within_days BETWEEN 1 AND 90)
);
-- Accounts with an expiring window, for the background loop.
CREATE INDEX IF NOT EXISTS account_alerts_expiring_idx ON account_alerts (account_id)
    WHERE expiring_within_days IS NOT NULL;

CREATE OR REPLACE FUNCTION tl_low_alert_bounds(p_thresholds bigint[], p_available bigint,
                                               OUT armed bigint, OUT rearm bigint)
LANGUAGE sql IMMUTABLE AS $$
    SELECT (SELECT max(t) FROM unnest(p_thresholds) t WHERE t < p_available),
           (SELECT min(t) FROM unnest(p_thresholds) t WHERE t >= p_available)
$$;

-- A threshold t is crossed when the available balance goes from above t to
-- t or below: one balance.low per threshold crossed, highest first. Any move
-- out of the bracket re-computes it, so a rise above t re-arms t.
CREATE OR REPLACE FUNCTION tl_balance_low() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old bigint := OLD.posted - OLD.reserved;
    v_new bigint := NEW.posted - NEW.reserved;
    v_thresholds bigint[];
    v_t bigint;
BEGIN
    SELECT low_balance INTO v_thresholds FROM account_alerts WHERE account_id = NEW.id;
    v_thresholds := coalesce(v_thresholds, '{}');
    FOR v_t IN SELECT t FROM unnest(v_thresholds) t WHERE t >= v_new AND t < v_old ORDER BY t DESC LOOP
        PERFORM tl_emit('balance.low',
            jsonb_build_object('account', NEW.address, 'threshold', v_t, 'available', v_new,
                               'posted', NEW.posted, 'reserved', NEW.reserved, 'version', NEW.version),
            format('balance.low:%s:%s:%s', NEW.id, v_t, NEW.version));
    END LOOP;
    SELECT b.armed, b.rearm INTO NEW.low_alert_armed, NEW.low_alert_rearm
        FROM tl_low_alert_bounds(v_thresholds, v_new) b;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS accounts_balance_low ON accounts;
CREATE TRIGGER accounts_balance_low BEFORE UPDATE OF posted, reserved ON accounts
    FOR EACH ROW
    WHEN (NEW.posted - NEW.reserved <= NEW.low_alert_armed OR NEW.posted - NEW.reserved > NEW.low_alert_rearm)
    EXECUTE FUNCTION tl_balance_low();

CREATE OR REPLACE FUNCTION tl_alerts_json(p_account bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'address', a.address,
        'low_balance', coalesce(to_jsonb(al.low_balance), '[]'::jsonb),
        'expiring_within_days', al.expiring_within_days,
        'updated_at', tl_ts(coalesce(al.updated_at, a.created_at)))
    FROM accounts a LEFT JOIN account_alerts al ON al.account_id = a.id
    WHERE a.id = p_account
$$;

-- PUT /v1/accounts/{address}/alerts: replaces the settings (a field left
-- out is cleared). The account row is locked so the bracket matches the
-- balance it is computed from; setting a threshold above the balance emits
-- nothing (no crossing happened), the next crossing of it does.
CREATE OR REPLACE FUNCTION tl_put_alerts(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    v_thresholds bigint[];
BEGIN
    a := tl_require_account(p_args ->> 'address');
    IF a.type = 'system' THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'alerts are set on a wallet or a department account',
                         jsonb_build_object('path', 'address'));
    END IF;
    SELECT * INTO a FROM accounts WHERE id = a.id FOR NO KEY UPDATE;
    SELECT coalesce(array_agg(DISTINCT e.v::bigint ORDER BY e.v::bigint), '{}') INTO v_thresholds
        FROM jsonb_array_elements_text(coalesce(p_args -> 'low_balance', '[]'::jsonb)) AS e(v);
    INSERT INTO account_alerts (account_id, low_balance, expiring_within_days, updated_at)
    VALUES (a.id, v_thresholds, (p_args ->> 'expiring_within_days')::integer, tl_now(p_ctx))
    ON CONFLICT (account_id) DO UPDATE
        SET low_balance = EXCLUDED.low_balance, expiring_within_days = EXCLUDED.expiring_within_days,
            updated_at = EXCLUDED.updated_at;
    UPDATE accounts SET (low_alert_armed, low_alert_rearm) =
        (SELECT b.armed, b.rearm FROM tl_low_alert_bounds(v_thresholds, a.posted - a.reserved) b)
        WHERE id = a.id;
    RETURN tl_alerts_json(a.id);
END $$;

-- grant.created, for every lot a grant transaction makes. A statement-level
-- trigger over the inserted rows (a transition table): a CSV import or a
-- program run inserts thousands of lots in one statement, and a row trigger
-- emitted them one tl_emit call at a time (a third of a 50,000-grant
-- import's time). The events are the same, in the lots' order.
CREATE OR REPLACE FUNCTION tl_grants_created() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (type, data, dedup_key, created_at)
    SELECT 'grant.created',
           jsonb_build_object('transaction_id', tl_public_id('txn_', t.id), 'lot_id', tl_public_id('lot_', n.id),
                              'account', a.address,
                              'amount', n.amount, 'reason', t.details ->> 'reason',
                              'effective_at', tl_ts(n.effective_at), 'expires_at', tl_ts(n.expires_at)),
           'grant.created:' || n.id, now()
    FROM new_lots n
    JOIN transactions t ON t.id = n.grant_transaction_id AND t.kind = 'grant'
    JOIN accounts a ON a.id = n.account_id
    ORDER BY n.grant_transaction_id, n.id
    ON CONFLICT ON CONSTRAINT outbox_dedup_key_unique DO NOTHING;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS lots_grant_created ON lots;
CREATE TRIGGER lots_grant_created AFTER INSERT ON lots
    REFERENCING NEW TABLE AS new_lots
    FOR EACH STATEMENT EXECUTE FUNCTION tl_grants_created();

-- reservation.expired, when a reservation's expiry is written.
CREATE OR REPLACE FUNCTION tl_reservation_expired() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_emit('reservation.expired',
        jsonb_build_object('reservation_id', tl_public_id('rsv_', NEW.id),
                           'account', (SELECT address FROM accounts WHERE id = NEW.account_id),
                           'amount', NEW.amount, 'expires_at', tl_ts(NEW.expires_at),
                           'metadata', NEW.metadata),
        'reservation.expired:' || NEW.id);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS reservations_expired_event ON reservations;
CREATE TRIGGER reservations_expired_event AFTER UPDATE OF status ON reservations
    FOR EACH ROW WHEN (NEW.status = 'expired' AND OLD.status <> 'expired')
    EXECUTE FUNCTION tl_reservation_expired();

-- program.run.completed, with the run (its skipped counts included). A
-- member's onboarding run is one employee's grant, which grant.created
-- already reports.
CREATE OR REPLACE FUNCTION tl_program_run_completed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tl_emit('program.run.completed', tl_program_run_json(NEW), 'program.run.completed:' || NEW.id);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS program_runs_completed_event ON program_runs;
CREATE TRIGGER program_runs_completed_event AFTER UPDATE OF completed_at ON program_runs
    FOR EACH ROW WHEN (OLD.completed_at IS NULL AND NEW.completed_at IS NOT NULL
                       AND NEW.trigger <> 'onboarding')
    EXECUTE FUNCTION tl_program_run_completed();

-- credits.expiring: once per lot (the dedup key), from the moment the lot is
-- within its account's expiring_within_days of expires_at. p_now is the
-- service's clock (injected in tests). Returns how many it emitted.
CREATE OR REPLACE FUNCTION tl_emit_expiring(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH due AS (
        SELECT l.id, l.remaining, l.reserved, l.expires_at, a.address, al.expiring_within_days
        FROM account_alerts al
        JOIN accounts a ON a.id = al.account_id
        JOIN lots l ON l.account_id = al.account_id
        WHERE al.expiring_within_days IS NOT NULL
          AND l.status = 'active' AND l.live AND l.remaining > l.reserved
          AND l.expires_at > p_now
          AND l.expires_at <= p_now + make_interval(days => al.expiring_within_days)
          AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.dedup_key = 'credits.expiring:' || l.id)
        ORDER BY l.expires_at, l.id
        LIMIT p_limit)
    SELECT count(tl_emit('credits.expiring',
                 jsonb_build_object('account', address, 'lot_id', tl_public_id('lot_', id),
                                    'amount', remaining - reserved, 'expires_at', tl_ts(expires_at),
                                    'expiring_within_days', expiring_within_days),
                 'credits.expiring:' || id))::integer
    FROM due
$$;

-- Subscriptions. The signing secret is kept encrypted (AES-256-GCM, with
-- TOKENLEDGER_WEBHOOK_SECRET_KEY, which the database never sees): signing
-- needs the secret itself, so it cannot be hashed. A deleted webhook stays
-- for its delivery log.
CREATE TABLE IF NOT EXISTS webhooks (
    id               uuid PRIMARY KEY,
    url              text NOT NULL,
    events           text[] NOT NULL,
    description      text,
    secret_encrypted bytea NOT NULL,
    created_by       text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    deleted_at       timestamptz,
    CONSTRAINT webhooks_url_length CHECK (length(url) BETWEEN 1 AND 2000),
    CONSTRAINT webhooks_events_valid CHECK (cardinality(events) BETWEEN 1 AND 6 AND events <@ ARRAY[
        'balance.low', 'credits.expiring', 'grant.created', 'limit.reached', 'program.run.completed',
        'reservation.expired']::text[]),
    CONSTRAINT webhooks_description_length CHECK (description IS NULL OR length(description) <= 500)
);
CREATE INDEX IF NOT EXISTS webhooks_live_idx ON webhooks (id) WHERE deleted_at IS NULL;

-- One event for one webhook. `pending` until delivered (a 2xx) or failed
-- (still failing after the retry window, or its webhook deleted). A claim
-- leases it (next_attempt_at moves to the lease's end, leased_until says
-- it is in flight), so a replica that dies mid-send only delays it.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id),
    event_seq        bigint NOT NULL REFERENCES outbox (seq),
    status           text NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    leased_until     timestamptz,
    retry_until      timestamptz NOT NULL,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    CONSTRAINT webhook_deliveries_event_key UNIQUE (webhook_id, event_seq),
    CONSTRAINT webhook_deliveries_status_valid CHECK (status IN ('pending', 'delivered', 'failed')),
    CONSTRAINT webhook_deliveries_completed_when_done CHECK ((status = 'pending') = (completed_at IS NULL)),
    CONSTRAINT webhook_deliveries_attempts_nonnegative CHECK (attempts >= 0)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_webhook_idx ON webhook_deliveries (webhook_id, id DESC);

-- Every attempt: written when it is claimed, completed with its outcome.
-- An attempt without an outcome was cut off (its replica died mid-send).
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id     uuid NOT NULL REFERENCES webhook_deliveries (id),
    attempt         integer NOT NULL,
    replica         text NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    status_code     integer,
    latency_seconds double precision,
    error           text,
    PRIMARY KEY (delivery_id, attempt),
    CONSTRAINT webhook_attempts_attempt_positive CHECK (attempt > 0)
);

CREATE OR REPLACE FUNCTION tl_webhook_json(w webhooks) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', tl_public_id('wh_', w.id), 'url', w.url, 'events', to_jsonb(w.events),
                              'description', w.description, 'created_at', tl_ts(w.created_at))
$$;

CREATE OR REPLACE FUNCTION tl_delivery_json(d webhook_deliveries) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', tl_public_id('dlv_', d.id),
        'webhook_id', tl_public_id('wh_', d.webhook_id),
        'event_id', o.id, 'event_type', o.type,
        'status', d.status, 'attempts', d.attempts,
        'next_attempt_at', CASE WHEN d.status = 'pending' THEN tl_ts(d.next_attempt_at) END,
        'last_status_code', d.last_status_code, 'last_error', d.last_error,
        'created_at', tl_ts(d.created_at), 'completed_at', tl_ts(d.completed_at),
        'attempt_log', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'attempt', x.attempt, 'started_at', tl_ts(x.started_at),
                       'finished_at', tl_ts(x.finished_at), 'status_code', x.status_code,
                       'latency_seconds', x.latency_seconds, 'error', x.error) ORDER BY x.attempt)
            FROM webhook_attempts x WHERE x.delivery_id = d.id), '[]'::jsonb))
    FROM outbox o WHERE o.seq = d.event_seq
$$;

-- POST /v1/webhooks (through tl_execute, so the Idempotency-Key holds).
-- The service makes the id and the encrypted secret (the id is the
-- encryption's associated data). The answer carries no secret: the service
-- adds it, decrypted, to the first answer and to its replays, so no
-- plaintext secret is stored with the idempotency key.
CREATE OR REPLACE FUNCTION tl_op_create_webhook(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    w webhooks;
BEGIN
    INSERT INTO webhooks (id, url, events, description, secret_encrypted, created_by, created_at)
    VALUES ((p_args ->> 'id')::uuid, p_args ->> 'url',
            ARRAY(SELECT DISTINCT e FROM jsonb_array_elements_text(p_args -> 'events') e ORDER BY e),
            p_args ->> 'description', decode(p_args ->> 'secret_encrypted', 'base64'),
            p_ctx ->> 'actor', clock_timestamp())
    RETURNING * INTO w;
    RETURN tl_webhook_json(w);
END $$;

-- DELETE /v1/webhooks/{id}: no more deliveries; the pending ones fail.
CREATE OR REPLACE FUNCTION tl_delete_webhook(p_id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE webhooks SET deleted_at = clock_timestamp() WHERE id = p_id AND deleted_at IS NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE webhook_deliveries SET status = 'failed', completed_at = clock_timestamp(), leased_until = NULL,
                                  last_error = 'webhook deleted'
        WHERE webhook_id = p_id AND status = 'pending';
    RETURN true;
END $$;

-- POST /v1/webhooks/{id}/deliveries/{delivery_id}/retry: due again at once,
-- whatever its state (a receiver deduplicates by webhook-id). A failed
-- delivery gets one more attempt per manual retry.
CREATE OR REPLACE FUNCTION tl_op_retry_delivery(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    d webhook_deliveries;
BEGIN
    SELECT dl.* INTO d FROM webhook_deliveries dl JOIN webhooks w ON w.id = dl.webhook_id
        WHERE dl.id = (p_args ->> 'delivery')::uuid AND dl.webhook_id = (p_args ->> 'webhook')::uuid
          AND w.deleted_at IS NULL
        FOR UPDATE OF dl;
    IF NOT FOUND THEN
        PERFORM tl_raise('TLAW1', 'webhook_not_found', 'no such delivery of a live webhook',
                         jsonb_build_object('delivery', p_args ->> 'delivery'));
    END IF;
    UPDATE webhook_deliveries SET status = 'pending', completed_at = NULL, leased_until = NULL,
                                  next_attempt_at = clock_timestamp(),
                                  retry_until = greatest(retry_until, clock_timestamp())
        WHERE id = d.id RETURNING * INTO d;
    RETURN tl_delivery_json(d);
END $$;

-- Fans up to p_limit outbox events out to the live webhooks that want
-- them (created before the event), one delivery each; returns how many
-- events. Replicas take disjoint events (SKIP LOCKED).
CREATE OR REPLACE FUNCTION tl_webhook_fanout(p_limit integer, p_retry_for interval) RETURNS integer
LANGUAGE sql AS $$
    WITH claimed AS (
        SELECT seq, type, created_at FROM outbox WHERE fanned_out_at IS NULL
        ORDER BY seq LIMIT p_limit FOR UPDATE SKIP LOCKED)
    , made AS (
        INSERT INTO webhook_deliveries (id, webhook_id, event_seq, next_attempt_at, retry_until, created_at)
        SELECT tl_uuid7(), w.id, c.seq, clock_timestamp(), clock_timestamp() + p_retry_for, clock_timestamp()
        FROM claimed c JOIN webhooks w
          ON w.deleted_at IS NULL AND c.type = ANY (w.events) AND w.created_at <= c.created_at
        ON CONFLICT ON CONSTRAINT webhook_deliveries_event_key DO NOTHING
        RETURNING 1)
    , marked AS (
        UPDATE outbox o SET fanned_out_at = clock_timestamp() FROM claimed c WHERE o.seq = c.seq
        RETURNING 1)
    -- `made` runs whether or not it is read (a data-modifying WITH always does).
    SELECT count(*)::integer FROM marked
$$;

-- Claims up to p_limit due deliveries for this replica, at most p_cap in
-- flight per webhook across all replicas: a webhook's row is locked (SKIP
-- LOCKED) while its deliveries are claimed, so two replicas never count
-- its in-flight deliveries at once. Each claim leases the delivery for
-- p_lease and logs the attempt. Returns what a send needs.
CREATE OR REPLACE FUNCTION tl_webhook_claim(p_limit integer, p_cap integer, p_lease interval, p_replica text)
RETURNS TABLE (delivery_id uuid, attempt integer, webhook_id uuid, url text, secret_encrypted bytea,
               event_id text, event_type text, event_created_at timestamptz, event_data jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_hook webhooks;
    v_taken integer := 0;
    v_in_flight integer;
    v_n integer;
BEGIN
    FOR v_hook IN
        SELECT h.* FROM webhooks h
        WHERE h.id IN (SELECT DISTINCT d.webhook_id FROM webhook_deliveries d
                       WHERE d.status = 'pending' AND d.next_attempt_at <= v_now)
        ORDER BY h.id FOR NO KEY UPDATE OF h SKIP LOCKED
    LOOP
        EXIT WHEN v_taken >= p_limit;
        SELECT count(*) INTO v_in_flight FROM webhook_deliveries d
            WHERE d.webhook_id = v_hook.id AND d.status = 'pending' AND d.leased_until > v_now;
        CONTINUE WHEN v_in_flight >= p_cap;
        RETURN QUERY
        WITH c AS (
            SELECT d.id FROM webhook_deliveries d
            WHERE d.webhook_id = v_hook.id AND d.status = 'pending' AND d.next_attempt_at <= v_now
            ORDER BY d.next_attempt_at, d.id
            LIMIT least(p_cap - v_in_flight, p_limit - v_taken)
            FOR UPDATE SKIP LOCKED)
        , u AS (
            UPDATE webhook_deliveries d SET attempts = d.attempts + 1, leased_until = v_now + p_lease,
                                            next_attempt_at = v_now + p_lease
            FROM c WHERE d.id = c.id
            RETURNING d.id, d.attempts, d.event_seq)
        , logged AS (
            INSERT INTO webhook_attempts (delivery_id, attempt, replica, started_at)
            SELECT u.id, u.attempts, p_replica, v_now FROM u
            RETURNING 1)
        SELECT u.id, u.attempts, v_hook.id, v_hook.url, v_hook.secret_encrypted, o.id, o.type,
               o.created_at, o.data
        FROM u JOIN outbox o ON o.seq = u.event_seq;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_taken := v_taken + v_n;
    END LOOP;
END $$;

-- Records an attempt's outcome. A 2xx delivers (whichever attempt it was).
-- A failure of the current attempt schedules the next one after an
-- exponential backoff with jitter (base * 2^(attempts-1), at most p_max,
-- times a random 0.5..1), never later than retry_until; a failure at or
-- after retry_until marks the delivery failed. A failure of an attempt a
-- later one has replaced (its lease ran out) is only logged.
CREATE OR REPLACE FUNCTION tl_webhook_record(p_delivery uuid, p_attempt integer, p_ok boolean,
                                             p_status_code integer, p_error text, p_latency double precision,
                                             p_base_seconds double precision, p_max_seconds double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    d webhook_deliveries;
    v_now timestamptz := clock_timestamp();
    v_delay double precision;
BEGIN
    UPDATE webhook_attempts SET finished_at = v_now, status_code = p_status_code,
                                latency_seconds = p_latency, error = left(p_error, 500)
        WHERE delivery_id = p_delivery AND attempt = p_attempt;
    SELECT * INTO d FROM webhook_deliveries WHERE id = p_delivery FOR UPDATE;
    IF NOT FOUND OR d.status <> 'pending' THEN
        RETURN 'stale';
    END IF;
    IF p_ok THEN
        UPDATE webhook_deliveries SET status = 'delivered', completed_at = v_now, leased_until = NULL,
                                      last_status_code = p_status_code, last_error = NULL
            WHERE id = d.id;
        RETURN 'delivered';
    END IF;
    IF d.attempts <> p_attempt THEN
        RETURN 'stale';
    END IF;
    IF v_now >= d.retry_until THEN
        UPDATE webhook_deliveries SET status = 'failed', completed_at = v_now, leased_until = NULL,
                                      last_status_code = p_status_code, last_error = left(p_error, 500)
            WHERE id = d.id;
        RETURN 'failed';
    END IF;
    v_delay := least(p_max_seconds, p_base_seconds * power(2, least(d.attempts - 1, 40)))
               * (0.5 + random() / 2);
    UPDATE webhook_deliveries
        SET next_attempt_at = least(v_now + make_interval(secs => v_delay), d.retry_until),
            leased_until = NULL, last_status_code = p_status_code, last_error = left(p_error, 500)
        WHERE id = d.id;
    RETURN 'retry';
END $$;

-- ===========================================================================
-- 10. Approvals and imports: four-eyes approvals, CSV imports
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Four-eyes approvals and CSV imports (issue 16)
-- ---------------------------------------------------------------------------

-- Four-eyes approvals (README, Approvals). A grant, a batch of grants or a
-- manual program run above TOKENLEDGER_APPROVAL_THRESHOLD is stored here
-- instead of being posted; a different hr or admin caller approves it (which
-- posts it, once: the approval row is locked and must still be pending) or
-- rejects it (final). requested_by and decided_by are the audit trail.
CREATE TABLE IF NOT EXISTS approvals (
    id           uuid PRIMARY KEY,
    kind         text NOT NULL,
    request      jsonb NOT NULL,
    -- Same caller, same request, same approval: a batch or program run sent
    -- again finds its approval (single grants have their Idempotency-Key).
    dedup_key    text,
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL,
    request_id   text,
    status       text NOT NULL DEFAULT 'pending',
    decided_by   text,
    decided_at   timestamptz,
    memo         text,
    result       jsonb,
    CONSTRAINT approvals_kind_valid CHECK (kind IN ('grant', 'grant_batch', 'program_run')),
    CONSTRAINT approvals_status_valid CHECK (status IN ('pending', 'approved', 'rejected')),
    CONSTRAINT approvals_decided CHECK ((status = 'pending') = (decided_by IS NULL AND decided_at IS NULL)),
    CONSTRAINT approvals_four_eyes CHECK (decided_by IS DISTINCT FROM requested_by),
    CONSTRAINT approvals_dedup_key_unique UNIQUE (requested_by, dedup_key)
);
CREATE INDEX IF NOT EXISTS approvals_status_idx ON approvals (status, id DESC);

CREATE OR REPLACE FUNCTION tl_approval_json(a approvals) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', tl_public_id('apr_', a.id), 'kind', a.kind, 'status', a.status,
                              'request', a.request, 'requested_by', a.requested_by,
                              'requested_at', tl_ts(a.requested_at), 'decided_by', a.decided_by,
                              'decided_at', tl_ts(a.decided_at), 'memo', a.memo, 'result', a.result)
$$;

-- Stores a pending approval (the op `request_approval`, under the caller's
-- Idempotency-Key for single grants). With a dedup_key, the same caller's
-- same request answers the approval it already has.
CREATE OR REPLACE FUNCTION tl_op_request_approval(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a approvals;
BEGIN
    IF p_args ->> 'dedup_key' IS NOT NULL THEN
        SELECT * INTO a FROM approvals
        WHERE requested_by = p_ctx ->> 'actor' AND dedup_key = p_args ->> 'dedup_key';
        IF FOUND THEN
            RETURN jsonb_build_object('approval', tl_approval_json(a));
        END IF;
    END IF;
    INSERT INTO approvals (id, kind, request, dedup_key, requested_by, requested_at, request_id)
    VALUES (tl_uuid7(), p_args ->> 'kind', p_args -> 'request', p_args ->> 'dedup_key', p_ctx ->> 'actor',
            tl_now(p_ctx), p_ctx ->> 'request_id')
    ON CONFLICT ON CONSTRAINT approvals_dedup_key_unique DO NOTHING
    RETURNING * INTO a;
    IF NOT FOUND THEN  -- a concurrent twin inserted it first
        SELECT * INTO a FROM approvals
        WHERE requested_by = p_ctx ->> 'actor' AND dedup_key = p_args ->> 'dedup_key';
    END IF;
    RETURN jsonb_build_object('approval', tl_approval_json(a));
END $$;

-- Locks a pending approval for a decision by the caller of p_ctx. The row
-- lock is what makes two concurrent approvals post once: the second waits,
-- then finds it decided.
CREATE OR REPLACE FUNCTION tl_lock_approval(p_args jsonb, p_ctx jsonb) RETURNS approvals
LANGUAGE plpgsql AS $$
DECLARE
    a approvals;
BEGIN
    SELECT * INTO a FROM approvals WHERE id = (p_args ->> 'approval_id')::uuid FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM tl_raise('TLA16', 'approval_not_found', format('no approval %s', p_args ->> 'approval'),
                         jsonb_build_object('approval', p_args ->> 'approval'));
    END IF;
    IF a.status <> 'pending' THEN
        PERFORM tl_raise('TLB16', 'not_approvable', format('approval %s is already %s', p_args ->> 'approval', a.status),
                         jsonb_build_object('approval', p_args ->> 'approval', 'approval_status', a.status));
    END IF;
    IF a.requested_by = p_ctx ->> 'actor' THEN
        PERFORM tl_raise('TLB16', 'not_approvable', 'the approver must be a different caller than the requester',
                         jsonb_build_object('approval', p_args ->> 'approval', 'approval_status', a.status));
    END IF;
    RETURN a;
END $$;

-- Approves and posts: a grant through tl_op_grant, a batch through
-- tl_grant_batch (under the requester's item keys, so each item is posted
-- at most once even if also sent again directly). A program run is only
-- marked approved here; the service then runs the cycle, which is itself
-- exactly-once per (program, cycle, employee). The posting's transactions
-- carry the requester as actor; the approval row names both.
CREATE OR REPLACE FUNCTION tl_op_approve(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a approvals;
    v_ctx jsonb;
    v_result jsonb;
BEGIN
    a := tl_lock_approval(p_args, p_ctx);
    v_ctx := p_ctx || jsonb_build_object('actor', a.requested_by);
    v_result := CASE a.kind
        WHEN 'grant' THEN tl_op_grant(a.request, v_ctx)
        WHEN 'grant_batch' THEN tl_grant_batch(a.requested_by, a.request -> 'items', v_ctx)
        ELSE NULL END;
    UPDATE approvals SET status = 'approved', decided_by = p_ctx ->> 'actor', decided_at = tl_now(p_ctx),
                         memo = p_args ->> 'memo', result = v_result
        WHERE id = a.id RETURNING * INTO a;
    RETURN tl_approval_json(a);
END $$;

CREATE OR REPLACE FUNCTION tl_op_reject(p_args jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    a approvals;
BEGIN
    a := tl_lock_approval(p_args, p_ctx);
    UPDATE approvals SET status = 'rejected', decided_by = p_ctx ->> 'actor', decided_at = tl_now(p_ctx),
                         memo = p_args ->> 'memo'
        WHERE id = a.id RETURNING * INTO a;
    RETURN tl_approval_json(a);
END $$;

-- Records the result of an approved program run (the service runs the
-- cycle after tl_op_approve committed).
CREATE OR REPLACE FUNCTION tl_approval_set_result(p_id uuid, p_result jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    UPDATE approvals SET result = coalesce(result, p_result) WHERE id = p_id AND status = 'approved'
    RETURNING tl_approval_json(approvals)
$$;

-- Imports employees from a CSV, set-based (README, Bulk import). p_rows:
-- [{line, id, name, email, department}], each already format-checked by the
-- service. Each row is idempotent by the employee id: a row equal to the
-- stored employee is `duplicate`, a changed one `updated`, a new one
-- `created`; a later row for an id already in the file is `duplicate` if
-- equal to the first, else rejected. Unknown departments and offboarded
-- employees are rejected. One statement per kind of change; grant-program
-- onboarding runs per new member only when an active program exists.
-- Returns {created, updated, duplicate, rejected: [{line, code, detail}]}.
CREATE OR REPLACE FUNCTION tl_import_employees(p_rows jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := tl_now(p_ctx);
    v_emp text;
    v_out jsonb;
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS tl_import_rows (
        line integer PRIMARY KEY, id text, name text, email text, department text,
        action text, code text, detail text
    ) ON COMMIT DROP;
    TRUNCATE tl_import_rows;
    INSERT INTO tl_import_rows (line, id, name, email, department)
    SELECT r.line, r.id, r.name, r.email, r.department
    FROM jsonb_to_recordset(p_rows) AS r (line integer, id text, name text, email text, department text);
    ANALYZE tl_import_rows;
    -- Later rows repeating an id of the file.
    UPDATE tl_import_rows t SET
        action = CASE WHEN (t.name, t.email, t.department) = (f.name, f.email, f.department) THEN 'duplicate' END,
        code = CASE WHEN (t.name, t.email, t.department) IS DISTINCT FROM (f.name, f.email, f.department)
                    THEN 'invalid_request' END,
        detail = format('employee %s appears on line %s with other values', t.id, f.line)
    FROM (SELECT DISTINCT ON (id) id, line, name, email, department FROM tl_import_rows ORDER BY id, line) f
    WHERE t.id = f.id AND t.line > f.line;
    UPDATE tl_import_rows t SET code = 'department_not_found', detail = format('department %s does not exist', t.department)
    WHERE t.action IS NULL AND t.code IS NULL AND NOT EXISTS (SELECT 1 FROM departments d WHERE d.id = t.department);
    -- Lock the employees the file names, in id order, then classify.
    PERFORM 1 FROM employees e JOIN tl_import_rows t ON t.id = e.id AND t.action IS NULL AND t.code IS NULL
        ORDER BY e.id FOR UPDATE OF e;
    UPDATE tl_import_rows t SET
        action = CASE WHEN e.status = 'offboarded' THEN NULL
                      WHEN (e.name, e.email, e.department) = (t.name, t.email, t.department) THEN 'duplicate'
                      ELSE 'updated' END,
        code = CASE WHEN e.status = 'offboarded' THEN 'account_closed' END,
        detail = CASE WHEN e.status = 'offboarded'
                      THEN format('employee %s was offboarded; re-hire with PUT and status "active"', e.id) END
    FROM employees e WHERE e.id = t.id AND t.action IS NULL AND t.code IS NULL;
    UPDATE tl_import_rows SET action = 'created' WHERE action IS NULL AND code IS NULL;

    INSERT INTO employees (id, name, email, department)
    SELECT id, name, email, department FROM tl_import_rows WHERE action = 'created' ORDER BY id;
    INSERT INTO accounts (address, type, ref)
    SELECT 'employee:' || id, 'employee', id FROM tl_import_rows WHERE action = 'created' ORDER BY id
    ON CONFLICT (address) DO NOTHING;
    INSERT INTO employee_departments (employee_id, department, since)
    SELECT id, department, '-infinity' FROM tl_import_rows WHERE action = 'created'
    ON CONFLICT DO NOTHING;
    INSERT INTO employee_departments (employee_id, department, since)
    SELECT t.id, t.department, v_now FROM tl_import_rows t JOIN employees e ON e.id = t.id
    WHERE t.action = 'updated' AND e.department <> t.department
    ON CONFLICT ON CONSTRAINT employee_departments_pkey DO UPDATE SET department = EXCLUDED.department;
    CREATE TEMP TABLE IF NOT EXISTS tl_import_moved (id text PRIMARY KEY) ON COMMIT DROP;
    TRUNCATE tl_import_moved;
    INSERT INTO tl_import_moved
    SELECT t.id FROM tl_import_rows t JOIN employees e ON e.id = t.id
    WHERE t.action = 'updated' AND e.department <> t.department;
    UPDATE employees e SET name = t.name, email = t.email, department = t.department, updated_at = clock_timestamp()
    FROM tl_import_rows t WHERE t.id = e.id AND t.action = 'updated';
    IF EXISTS (SELECT 1 FROM grant_programs WHERE active) THEN
        FOR v_emp IN SELECT id FROM tl_import_rows WHERE action = 'created'
                     UNION SELECT id FROM tl_import_moved ORDER BY 1 LOOP
            PERFORM tl_program_onboard(v_emp, p_ctx);
        END LOOP;
    END IF;
    SELECT jsonb_build_object(
        'created', count(*) FILTER (WHERE action = 'created'),
        'updated', count(*) FILTER (WHERE action = 'updated'),
        'duplicate', count(*) FILTER (WHERE action = 'duplicate'),
        'rejected', coalesce(jsonb_agg(jsonb_build_object('line', line, 'code', code, 'detail', detail) ORDER BY line)
                             FILTER (WHERE code IS NOT NULL), '[]'::jsonb))
    INTO v_out FROM tl_import_rows;
    RETURN v_out;
END $$;

-- Imports grants from a CSV (README, Bulk import), set-based: the rows of
-- tl_grant_batch's fast path (a new key, an open wallet, funded by
-- system:issuance, a valid expiry) in a handful of statements whatever
-- their number; rows whose key this caller already used answer from the
-- stored key (duplicate, or idempotency_key_reused) without touching the
-- ledger; every other row (a department funder, a closed wallet, an unknown
-- employee) goes through tl_grant_batch. Unlike tl_grant_batch it expires
-- only the wallets that have something due, and stores a small replay body
-- ({transaction: {id}, lot: {id}}, all a batch replay reads). Keys share
-- the `grants:batch/` space, so an import and POST /v1/grants:batch agree on
-- what a key means. Returns {results: [{key, status, code?, detail?}]} in
-- item order.
CREATE OR REPLACE FUNCTION tl_import_grants(p_caller text, p_items jsonb, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_wallet bigint;
    v_slow jsonb;
    v_slow_results jsonb;
BEGIN
    PERFORM tl_lock(
        (SELECT coalesce(array_agg(a.id), '{}') FROM accounts a
          WHERE a.address IN (SELECT 'employee:' || (i #>> '{grant,employee}') FROM jsonb_array_elements(p_items) i
                              UNION SELECT coalesce(i #>> '{grant,funded_by}', 'system:issuance')
                              FROM jsonb_array_elements(p_items) i)),
        ARRAY['system:expired', 'system:issuance']);
    v_now := tl_now(p_ctx);
    CREATE TEMP TABLE IF NOT EXISTS tl_import_grant_rows (
        pos integer PRIMARY KEY, key text, hash bytea, args jsonb, wallet bigint, funder bigint,
        amount bigint, priority integer, effective_at timestamptz, expires_at timestamptz,
        state text, txn uuid, lot uuid, result jsonb
    ) ON COMMIT DROP;
    TRUNCATE tl_import_grant_rows;
    INSERT INTO tl_import_grant_rows (pos, key, hash, args, wallet, funder, amount, priority, effective_at, expires_at)
    SELECT i.pos, i.v ->> 'key', decode(i.v ->> 'hash', 'hex'), i.v -> 'grant', w.id, f.id,
           (i.v #>> '{grant,amount}')::bigint, coalesce((i.v #>> '{grant,priority}')::integer, 100),
           coalesce((i.v #>> '{grant,effective_at}')::timestamptz, v_now), (i.v #>> '{grant,expires_at}')::timestamptz
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS i (v, pos)
    LEFT JOIN accounts w ON w.address = 'employee:' || (i.v #>> '{grant,employee}') AND w.status = 'open'
    LEFT JOIN accounts f ON f.address = coalesce(i.v #>> '{grant,funded_by}', 'system:issuance')
                        AND f.address = 'system:issuance' AND f.status = 'open' AND f.asset = w.asset;
    -- Keys already used: the stored answer decides.
    UPDATE tl_import_grant_rows r SET
        state = CASE WHEN k.request_hash <> r.hash THEN 'reused'
                     WHEN k.status_code = 201 THEN 'duplicate' ELSE 'stored' END,
        result = k.body
    FROM idempotency_keys k
    WHERE k.caller = p_caller AND k.key = 'grants:batch/' || r.key;
    -- The fast rows: their transaction and lot ids first, then their keys
    -- claimed in key order with the final answer already in place (the same
    -- transaction posts them or nothing is kept), so no key row is written
    -- twice (a second write per row was a tenth of an import's time).
    UPDATE tl_import_grant_rows r SET txn = tl_uuid7(), lot = tl_uuid7()
    WHERE r.state IS NULL AND r.wallet IS NOT NULL AND r.funder IS NOT NULL AND r.amount > 0
      AND r.priority BETWEEN 0 AND 1000
      AND (r.expires_at IS NULL OR r.expires_at > greatest(r.effective_at, v_now));
    WITH claimed AS (
        INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body)
        SELECT p_caller, 'grants:batch/' || r.key, r.hash, 201,
               jsonb_build_object('transaction', jsonb_build_object('id', tl_public_id('txn_', r.txn)),
                                  'lot', jsonb_build_object('id', tl_public_id('lot_', r.lot)))
        FROM tl_import_grant_rows r
        WHERE r.state IS NULL AND r.txn IS NOT NULL
        ORDER BY 2
        ON CONFLICT DO NOTHING
        RETURNING key)
    UPDATE tl_import_grant_rows r SET state = 'fast'
    FROM claimed c WHERE 'grants:batch/' || r.key = c.key;
    IF EXISTS (SELECT 1 FROM tl_import_grant_rows WHERE state = 'fast') THEN
        -- Only wallets with something due need tl_expire_due (the same tests it makes).
        -- Read from the other side: what is due anywhere (the partial
        -- indexes of due reservations and lots hold few rows), kept if its
        -- wallet is in the chunk. Four EXISTS per row of the chunk took 1.2
        -- to 1.6 s per 5,000 rows (a third of a 50,000-grant import).
        FOR v_wallet IN
            WITH w AS MATERIALIZED (SELECT DISTINCT wallet FROM tl_import_grant_rows WHERE state = 'fast')
            SELECT s.account_id FROM reservations s
            WHERE s.status = 'active' AND s.expires_at <= v_now AND s.account_id IN (SELECT wallet FROM w)
            UNION
            SELECT l.account_id FROM lots l
            WHERE l.rollover_max IS NOT NULL AND l.rolled_at IS NULL AND l.expires_at <= v_now
              AND l.account_id IN (SELECT wallet FROM w)
            UNION
            SELECT l.account_id FROM lots l
            WHERE l.status = 'voided' AND l.live AND l.account_id IN (SELECT wallet FROM w)
            UNION
            SELECT l.account_id FROM lots l
            WHERE l.status = 'active' AND l.live AND l.expires_at IS NOT NULL AND l.expires_at <= v_now
              AND l.account_id IN (SELECT wallet FROM w)
            ORDER BY 1
        LOOP
            PERFORM tl_expire_due(v_wallet, v_now, p_ctx);
        END LOOP;
        INSERT INTO transactions (id, kind, memo, metadata, details, actor, request_id, created_at)
        SELECT txn, 'grant', args ->> 'memo', coalesce(nullif(args -> 'metadata', 'null'::jsonb), '{}'::jsonb),
               jsonb_build_object('reason', args ->> 'reason'), p_ctx ->> 'actor', p_ctx ->> 'request_id', v_now
        FROM tl_import_grant_rows WHERE state = 'fast' ORDER BY pos;
        INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                          grant_transaction_id, funded_by, source_lot_id, created_at)
        SELECT lot, wallet, amount, amount, priority, effective_at, expires_at, txn, funder, NULL, v_now
        FROM tl_import_grant_rows WHERE state = 'fast' ORDER BY pos;
        INSERT INTO lot_movements (transaction_id, lot_id, amount)
        SELECT txn, lot, amount FROM tl_import_grant_rows WHERE state = 'fast' ORDER BY pos;
        PERFORM tl_post_entries(array_agg(l.txn ORDER BY l.pos, l.leg), array_agg(l.account ORDER BY l.pos, l.leg),
                                array_agg(l.amount ORDER BY l.pos, l.leg), v_now)
        FROM (SELECT pos, 1 AS leg, txn, funder AS account, -amount AS amount FROM tl_import_grant_rows WHERE state = 'fast'
              UNION ALL
              SELECT pos, 2, txn, wallet, amount FROM tl_import_grant_rows WHERE state = 'fast') l;
    END IF;
    -- Every other row, through tl_grant_batch (it fails each alone).
    SELECT jsonb_agg(i.v ORDER BY i.pos) INTO v_slow
    FROM jsonb_array_elements(p_items) WITH ORDINALITY AS i (v, pos)
    JOIN tl_import_grant_rows r ON r.pos = i.pos AND r.state IS NULL;
    IF v_slow IS NOT NULL THEN
        v_slow_results := tl_grant_batch(p_caller, v_slow, p_ctx) -> 'results';
        UPDATE tl_import_grant_rows r SET state = 'slow', result = s.v
        FROM (SELECT v ->> 'key' AS key, v FROM jsonb_array_elements(v_slow_results) v) s
        WHERE r.state IS NULL AND r.key = s.key;
    END IF;
    RETURN jsonb_build_object('results', coalesce((
        SELECT jsonb_agg(CASE r.state
            WHEN 'fast' THEN jsonb_build_object('key', r.key, 'status', 'created')
            WHEN 'duplicate' THEN jsonb_build_object('key', r.key, 'status', 'duplicate')
            WHEN 'reused' THEN jsonb_build_object('key', r.key, 'status', 'rejected', 'code', 'idempotency_key_reused',
                                                  'detail', 'this key was used with other values; nothing was changed')
            WHEN 'stored' THEN jsonb_build_object('key', r.key, 'status', 'rejected', 'code', r.result ->> 'code',
                                                  'detail', r.result ->> 'detail')
            ELSE r.result END ORDER BY r.pos)
        FROM tl_import_grant_rows r), '[]'::jsonb));
END $$;

-- ===========================================================================
-- 11. Authentication: service keys, key scopes and per-key spend rate caps
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Service keys (authentication of HR tools, finance tools, metering services)
-- ---------------------------------------------------------------------------

-- Only a SHA-256 of each secret is kept: the secrets are 256-bit random
-- values, so a fast hash is enough (nothing to brute-force), and checking it
-- costs nothing on the hot path. `prefix` lets a key be recognised and found.
CREATE TABLE IF NOT EXISTS api_keys (
    id           uuid PRIMARY KEY,
    prefix       text NOT NULL,
    secret_hash  bytea NOT NULL,
    name         text NOT NULL,
    role         text NOT NULL,
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    -- Scopes narrow what a key may charge (issue 11): the usage `source`s it may
    -- send and the account types it may debit, reserve on or record usage for.
    -- NULL is unrestricted; an empty list allows nothing.
    sources      text[],
    account_types text[],
    -- The departments whose accounts it may charge, and its credits per minute
    -- ("Key scopes by department and per-key spend rate caps").
    departments  text[],
    rate_limit   bigint,
    CONSTRAINT api_keys_prefix_key UNIQUE (prefix),
    CONSTRAINT api_keys_role_valid CHECK (role IN ('admin', 'hr', 'finance', 'meter')),
    CONSTRAINT api_keys_name_length CHECK (length(name) BETWEEN 1 AND 100),
    CONSTRAINT api_keys_hash_length CHECK (length(secret_hash) = 32),
    CONSTRAINT api_keys_account_types_valid
        CHECK (account_types <@ ARRAY['employee', 'department']::text[]),
    CONSTRAINT api_keys_rate_limit_positive CHECK (rate_limit > 0)
);

-- Resolves a presented key: the key's id, name and role when the prefix is
-- known, the hash matches and it is not revoked; otherwise no row. Marks the
-- key used at most once a minute, so verification is a read almost always.
CREATE OR REPLACE FUNCTION tl_authenticate_key(p_prefix text, p_hash bytea)
RETURNS TABLE (id uuid, name text, role text) LANGUAGE plpgsql AS $$
DECLARE
    k api_keys;
BEGIN
    SELECT * INTO k FROM api_keys WHERE prefix = p_prefix;
    IF NOT FOUND OR k.revoked_at IS NOT NULL OR k.secret_hash <> p_hash THEN
        RETURN;
    END IF;
    IF k.last_used_at IS NULL OR k.last_used_at < clock_timestamp() - interval '1 minute' THEN
        UPDATE api_keys SET last_used_at = clock_timestamp() WHERE api_keys.id = k.id;
    END IF;
    id := k.id; name := k.name; role := k.role;
    RETURN NEXT;
END $$;

-- Every replica caches the keys it has verified, and the keys it found
-- unknown (service/auth.py, KeyCache), and LISTENs on tl_api_keys: a change
-- that can take a key's power away (revocation, a new secret or role,
-- deletion) or make an unknown key known (a new key) tells them all at
-- commit, and each drops its cache. last_used_at changes notify nobody.
CREATE OR REPLACE FUNCTION tl_api_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tl_api_keys', '');
    RETURN NULL;
END $$;

-- A change of a key's departments or cap drops it from every replica's
-- cache too (the trigger of the key section, with the new columns).
DROP TRIGGER IF EXISTS api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE OF revoked_at, secret_hash, role, prefix,
        sources, account_types, departments, rate_limit OR DELETE
    ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION tl_api_keys_changed();

-- ---------------------------------------------------------------------------
-- Key scopes by department and per-key spend rate caps (issue 11, defect 8)
--
-- A service key may be limited to charging the accounts of given
-- departments (api_keys.departments: employees currently in one of them,
-- and the department accounts themselves), and to a number of credits per
-- minute (api_keys.rate_limit). The service passes both in the operation's
-- context (ctx.departments, ctx.rate_limit) and the checks run inside the
-- operation's own database call: an employee's department is only known
-- here, and a cap must count what the key's concurrent calls spend.
--
-- What a key spends: debits, reservations (the amount held) and usage
-- events that settle no reservation (their cost); a capture is counted when
-- its reservation was made, a release gives nothing back. The count is per
-- calendar minute (UTC) in one row per key (key_spend), locked for the
-- rest of the transaction by every call of a capped key, before any account
-- (tl_key_lock: in tl_execute and tl_execute_batch after the idempotency
-- keys, in the usage functions before the events are claimed), so the cap
-- is exact. That row serialises a capped key's calls; a coalesced batch and
-- a usage batch take it once and update it once for all their items. Keys
-- without a cap never touch it. A call over the cap is answered 429
-- key_rate_limited (SQLSTATE TLD29, with retry_after: the seconds to the
-- next minute) and rolls back: nothing is written. Out of scope: 403
-- forbidden (TLD43).
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS key_spend (
    actor  text PRIMARY KEY,       -- the caller ("key:<id>"), as ctx.actor
    minute timestamptz NOT NULL,   -- the minute `spent` counts
    spent  bigint NOT NULL
);

-- Locks (making them when missing) the spend rows of the capped keys among
-- the callers, in actor order, and starts a new minute's count.
-- Answers whether there was any. PL/pgSQL, so that its plans are kept for
-- the session (a SQL function's INSERT is planned again at every call), and
-- a batch without a capped key pays one array test.
CREATE OR REPLACE FUNCTION tl_key_lock(p_ctxs jsonb[]) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM unnest(p_ctxs) AS c WHERE c ? 'rate_limit') THEN
        RETURN false;
    END IF;
    INSERT INTO key_spend AS s (actor, minute, spent)
    SELECT DISTINCT ON (c ->> 'actor') c ->> 'actor', date_trunc('minute', tl_now(c), 'UTC'), 0
      FROM unnest(p_ctxs) AS c
     WHERE c ? 'rate_limit'
     ORDER BY c ->> 'actor'
    ON CONFLICT (actor) DO UPDATE
       SET spent = CASE WHEN s.minute = EXCLUDED.minute THEN s.spent ELSE 0 END, minute = EXCLUDED.minute;
    RETURN true;
END $$;

-- The 429 key_rate_limited as {code, detail, extra} (extra.retry_after:
-- seconds to the next minute, when the count starts again).
CREATE OR REPLACE FUNCTION tl_key_rate_limited_json(
    p_limit bigint, p_spent bigint, p_requested bigint, p_minute timestamptz, p_now timestamptz)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'code', 'key_rate_limited',
        'detail', format('this key may spend %s credits a minute: %s spent this minute, %s requested',
                         p_limit, p_spent, p_requested),
        'extra', jsonb_build_object(
            'limit', p_limit, 'spent', p_spent, 'requested', p_requested,
            'retry_after', greatest(1, ceil(extract(epoch FROM p_minute + interval '1 minute' - p_now)))::integer))
$$;

-- Counts p_amount credits spent by the calling key (a no-op without a cap)
-- and raises key_rate_limited when that passes its cap for the minute.
CREATE OR REPLACE FUNCTION tl_key_charge(p_ctx jsonb, p_amount bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_cap bigint := (p_ctx ->> 'rate_limit')::bigint;
    v_now timestamptz;
    v_minute timestamptz;
    v_spent bigint;
    v jsonb;
BEGIN
    IF v_cap IS NULL OR p_amount <= 0 THEN
        RETURN;
    END IF;
    v_now := tl_now(p_ctx);
    v_minute := date_trunc('minute', v_now, 'UTC');
    INSERT INTO key_spend AS s (actor, minute, spent) VALUES (p_ctx ->> 'actor', v_minute, p_amount)
    ON CONFLICT (actor) DO UPDATE
       SET spent = CASE WHEN s.minute = EXCLUDED.minute THEN s.spent ELSE 0 END + EXCLUDED.spent,
           minute = EXCLUDED.minute
    RETURNING spent INTO v_spent;
    IF v_spent > v_cap THEN
        v := tl_key_rate_limited_json(v_cap, v_spent - p_amount, p_amount, v_minute, v_now);
        PERFORM tl_raise('TLD29', 'key_rate_limited', v ->> 'detail', v -> 'extra');
    END IF;
END $$;

-- Whether the calling key may charge an account: always, unless the key is
-- limited to departments; then only a department account among them, or
-- an employee wallet whose employee is in one of them now.
CREATE OR REPLACE FUNCTION tl_key_in_scope(p_account accounts, p_ctx jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT NOT (p_ctx ? 'departments')
        OR coalesce(CASE p_account.type
                        WHEN 'department' THEN p_account.ref
                        WHEN 'employee' THEN (SELECT e.department FROM employees e WHERE e.id = p_account.ref)
                    END = ANY (ARRAY(SELECT jsonb_array_elements_text(p_ctx -> 'departments'))), false)
$$;

CREATE OR REPLACE FUNCTION tl_key_scope_json(p_address text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'code', 'forbidden',
        'detail', format('this key may not charge %s: it is outside the key''s departments', p_address),
        'extra', jsonb_build_object('account', p_address))
$$;

CREATE OR REPLACE FUNCTION tl_require_key_scope(p_account accounts, p_ctx jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v jsonb;
BEGIN
    IF NOT tl_key_in_scope(p_account, p_ctx) THEN
        v := tl_key_scope_json(p_account.address);
        PERFORM tl_raise('TLD43', 'forbidden', v ->> 'detail', v -> 'extra');
    END IF;
END $$;

-- ===========================================================================
-- 12. Tamper evidence: the hash chain
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Tamper evidence: the hash chain (README, Tamper evidence)
-- ---------------------------------------------------------------------------

-- Committed transactions in the order a background chainer appended them
-- (seq). Writers never touch this table, so chaining adds nothing to the hot
-- path. content_hash = sha256(tl_canonical(transaction_id)), chain_hash =
-- sha256(prev_hash || content_hash), and prev_hash is the chain_hash of the
-- row before (32 zero bytes for seq 1). service/chain.py verifies it.
CREATE TABLE IF NOT EXISTS chain (
    seq            bigint PRIMARY KEY,
    transaction_id uuid NOT NULL REFERENCES transactions (id),
    content_hash   bytea NOT NULL,
    prev_hash      bytea NOT NULL,
    chain_hash     bytea NOT NULL,
    chained_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT chain_transaction_key UNIQUE (transaction_id),
    CONSTRAINT chain_seq_positive CHECK (seq > 0),
    CONSTRAINT chain_content_hash_length CHECK (length(content_hash) = 32),
    CONSTRAINT chain_prev_hash_length CHECK (length(prev_hash) = 32),
    CONSTRAINT chain_chain_hash_length CHECK (length(chain_hash) = 32)
);

DROP TRIGGER IF EXISTS chain_immutable ON chain;
CREATE TRIGGER chain_immutable BEFORE UPDATE OR DELETE ON chain
    FOR EACH ROW EXECUTE FUNCTION tl_forbid_change();
DROP TRIGGER IF EXISTS chain_no_truncate ON chain;
CREATE TRIGGER chain_no_truncate BEFORE TRUNCATE ON chain
    FOR EACH STATEMENT EXECUTE FUNCTION tl_forbid_change();

-- The canonical text of each given transaction's content, entries and lot
-- movements included (no row for an id that is not a transaction). jsonb
-- prints equal values identically (keys sorted, numbers normalised), so the
-- text changes exactly when the content does; entries are ordered by
-- (account, shard, version), which is unique, and movements by lot, so the
-- order depends on the content alone. Set-based, because the chainer and
-- the verifier hash thousands of transactions per statement.
CREATE OR REPLACE FUNCTION tl_canonical_many(p_ids uuid[])
RETURNS TABLE (transaction_id uuid, canonical text) LANGUAGE sql STABLE
-- Every look-up below is by key; statistics that lag behind a growing
-- journal made each entries sub-select a scan of all entries (the chainer
-- and --verify-chain alike).
SET enable_seqscan = off
AS $$
    -- The text of jsonb_build_object(...)::text for the transaction and its
    -- entries and lot movements, written out: jsonb's output puts keys in
    -- (length, bytes) order and separates with ", " and ": ", and strings
    -- are escaped by the same routine as to_json(text). Building the jsonb
    -- values and printing them cost about 0.1 ms per transaction, a quarter
    -- of a debit's PostgreSQL CPU; this costs about half of that. The text
    -- must never change (the chain's content hashes are of it):
    -- tests/invariants/test_chain.py compares it with the jsonb form.
    SELECT t.id,
        '{"id": "' || t.id::text
        || '", "kind": ' || to_json(t.kind)::text
        || ', "lots": [' || coalesce((
            SELECT string_agg('{"lot": "' || m.lot_id::text || '", "amount": ' || m.amount::text || '}', ', '
                              ORDER BY m.lot_id)
            FROM lot_movements m WHERE m.transaction_id = t.id), '')
        || '], "memo": ' || coalesce(to_json(t.memo)::text, 'null')
        || ', "actor": ' || coalesce(to_json(t.actor)::text, 'null')
        || ', "details": ' || coalesce(t.details::text, 'null')
        || ', "entries": [' || coalesce((
            SELECT string_agg('{"asset": ' || to_json(e.asset)::text || ', "shard": ' || e.shard::text
                              || ', "amount": ' || e.amount::text || ', "account": ' || to_json(a.address)::text
                              || ', "version": ' || e.version::text || ', "created_at": "' || tl_ts(e.created_at)
                              || '", "balance_after": ' || e.balance_after::text || '}', ', '
                              ORDER BY a.address, e.shard, e.version)
            FROM entries e JOIN accounts a ON a.id = e.account_id
            WHERE e.transaction_id = t.id), '')
        || '], "metadata": ' || coalesce(t.metadata::text, 'null')
        || ', "reverses": ' || coalesce('"' || t.reverses::text || '"', 'null')
        || ', "created_at": "' || tl_ts(t.created_at)
        || '", "request_id": ' || coalesce(to_json(t.request_id)::text, 'null')
        || '}'
    -- Each transaction by key, its entries and movements by index, whatever
    -- the plan: a prepared statement's generic plan does not know how many
    -- ids there are, and once it joined aggregates of all the ids to each
    -- transaction (a nested loop re-running them per row), a batch of 20,000
    -- took minutes; with `t.id = ANY (p_ids)` the planner read every
    -- transaction per call. Inlined into its caller, a plain join to
    -- transactions was planned as a hash join over a scan of the whole table
    -- (0.35 ms per chained transaction at 100k transactions, growing with
    -- history); OFFSET 0 keeps the look-up a subquery of its own, one index
    -- probe per id.
    FROM (SELECT DISTINCT id FROM unnest(p_ids) id) u
    CROSS JOIN LATERAL (SELECT * FROM transactions t WHERE t.id = u.id OFFSET 0) t
$$;

-- One transaction's canonical text (NULL when there is no such transaction).
CREATE OR REPLACE FUNCTION tl_canonical(p_id uuid) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT canonical FROM tl_canonical_many(ARRAY[p_id])
$$;

-- Appends up to p_limit unchained transactions to the chain, in
-- (created_at, id) order, and returns how many it appended. Only
-- transactions created more than p_settle ago are taken: every write is one
-- statement bounded by statement_timeout, so once p_settle exceeds it, every
-- transaction created before the cutoff has committed and none can appear
-- behind the head later. One caller chains at a time (a transaction-level
-- advisory lock; the others return 0 at once), and seq and transaction_id
-- are unique, so the chain never forks. A straggler that became visible
-- later than p_settle is still appended (after the head) if it is at most
-- p_settle older than the head; p_all looks through all history instead.
CREATE OR REPLACE FUNCTION tl_chain_pending(p_limit integer, p_settle interval, p_all boolean DEFAULT false)
RETURNS integer LANGUAGE plpgsql
-- Each pass planned for its own batch of ids (a cached generic plan cannot
-- know how many there are; see tl_canonical_many).
SET plan_cache_mode = force_custom_plan
-- The chain and the journal only grow, and their statistics lag behind
-- while they do (a fresh database's say they are empty): the head was read
-- by sorting the whole chain and the unchained transactions found by
-- hashing all of it, at every pass. Indexes only, as on the hot path.
SET enable_seqscan = off
AS $$
DECLARE
    v_cutoff timestamptz := now() - p_settle;
    v_seq bigint := 0;
    v_hash bytea := decode(repeat('00', 32), 'hex');
    v_floor timestamptz := '-infinity';
    v_head record;
    v_ids uuid[];
    v_txns uuid[];
    v_contents bytea[];
    v_prevs bytea[] := '{}';
    v_hashes bytea[] := '{}';
BEGIN
    -- 32770271507212654 is "tlchain" as a bigint.
    IF NOT pg_try_advisory_xact_lock(32770271507212654) THEN
        RETURN 0;
    END IF;
    SELECT c.seq, c.chain_hash, t.created_at INTO v_head
        FROM chain c LEFT JOIN transactions t ON t.id = c.transaction_id
        ORDER BY c.seq DESC LIMIT 1;
    IF FOUND THEN
        v_seq := v_head.seq;
        v_hash := v_head.chain_hash;
        IF NOT p_all AND v_head.created_at IS NOT NULL THEN
            v_floor := v_head.created_at - p_settle;
        END IF;
    END IF;
    SELECT array_agg(x.id ORDER BY x.created_at, x.id) INTO v_ids FROM (
        SELECT t.id, t.created_at FROM transactions t
        WHERE t.created_at >= v_floor AND t.created_at < v_cutoff
          -- A probe of chain_transaction_key per candidate (OFFSET 0: not
          -- an anti join, which could hash or merge the whole chain).
          AND NOT EXISTS (SELECT 1 FROM chain c WHERE c.transaction_id = t.id OFFSET 0)
        ORDER BY t.created_at, t.id
        LIMIT p_limit) x;
    -- The content hashes set-based, the links in order (each names the one
    -- before), then one INSERT for the whole pass: a statement per link cost
    -- about as much as building the canonical texts.
    SELECT array_agg(k.transaction_id ORDER BY u.n), array_agg(sha256(convert_to(k.canonical, 'UTF8')) ORDER BY u.n)
      INTO v_txns, v_contents
      FROM unnest(v_ids) WITH ORDINALITY AS u (id, n)
      JOIN tl_canonical_many(v_ids) k ON k.transaction_id = u.id;
    FOR i IN 1 .. coalesce(cardinality(v_txns), 0) LOOP
        v_prevs[i] := v_hash;
        v_hash := sha256(v_hash || v_contents[i]);
        v_hashes[i] := v_hash;
    END LOOP;
    INSERT INTO chain (seq, transaction_id, content_hash, prev_hash, chain_hash)
    SELECT v_seq + x.n, x.txn, x.content, x.prev, x.hash
      FROM unnest(v_txns, v_contents, v_prevs, v_hashes) WITH ORDINALITY AS x (txn, content, prev, hash, n)
     ORDER BY x.n;
    RETURN coalesce(cardinality(v_txns), 0);
END $$;

-- ===========================================================================
-- 13. Background work, statistics and retention: sweeps, purges, audit
-- checkpoints, the usage archive
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Background work (safe on every replica at once)
-- ---------------------------------------------------------------------------

-- Writes the expiry transactions of up to p_limit accounts that have due
-- lots. Accounts another transaction holds are skipped, not waited for.
CREATE OR REPLACE FUNCTION tl_sweep_expired(p_limit integer, p_ctx jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := tl_now(p_ctx);
    v_ids bigint[];
    v_id bigint;
    v_total bigint := 0;
BEGIN
    SELECT array_agg(id) INTO v_ids FROM (
        SELECT a.id FROM accounts a
        WHERE a.id IN (SELECT x.account_id FROM (
                           SELECT l.account_id FROM lots l
                           WHERE l.status = 'active' AND l.live AND l.expires_at <= v_now
                             AND l.remaining > l.reserved
                           UNION
                           SELECT r.account_id FROM reservations r
                           WHERE r.status = 'active' AND r.expires_at <= v_now) x
                       LIMIT p_limit)
        ORDER BY a.id
        FOR NO KEY UPDATE OF a SKIP LOCKED) x;
    IF v_ids IS NULL THEN
        RETURN jsonb_build_object('accounts', 0, 'credits', 0);
    END IF;
    PERFORM tl_lock('{}', ARRAY['system:expired', 'system:issuance']);
    FOREACH v_id IN ARRAY v_ids LOOP
        v_total := v_total + tl_expire_due(v_id, v_now, p_ctx);
    END LOOP;
    RETURN jsonb_build_object('accounts', cardinality(v_ids), 'credits', v_total);
END $$;

CREATE OR REPLACE FUNCTION tl_purge_idempotency_keys(p_older_than interval, p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT caller, key FROM idempotency_keys WHERE created_at < now() - p_older_than
        ORDER BY created_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    , gone AS (
        DELETE FROM idempotency_keys k USING doomed d
        WHERE k.caller = d.caller AND k.key = d.key RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;

-- ---------------------------------------------------------------------------
-- A year of history (issue 21): audit checkpoints, the indexes the routine
-- audit reads new rows by, and the archive of old usage events
-- ---------------------------------------------------------------------------

-- The audit's own high-water marks (service/audit.py), one row per check:
-- every transaction created before verified_to passed that check, so a
-- routine `tokenledger audit` reads only what came after. The row 'chain'
-- records the last chain row `--verify-chain` verified (chain_seq,
-- chain_hash): a routine verification starts there. Written only by the
-- audit after a check passed; `audit --full` checks everything again.
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    check_name  text PRIMARY KEY,
    verified_to timestamptz,
    chain_seq   bigint,
    chain_hash  bytea,
    verified_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT audit_checkpoints_one_mark CHECK (
        (check_name = 'chain' AND verified_to IS NULL AND chain_seq > 0 AND length(chain_hash) = 32)
        OR (check_name LIKE 'audit\_%' AND verified_to IS NOT NULL AND chain_seq IS NULL AND chain_hash IS NULL))
);

-- The routine audit finds what came after its checkpoint through these:
-- the events a usage transaction charged (audit_6; without it the full
-- check was a nested loop over a materialized scan of every event), the
-- reservations made since (audit_4), and the program grant a transaction
-- issued (audit_8).
CREATE INDEX IF NOT EXISTS usage_events_transaction_idx ON usage_events (transaction_id);
CREATE INDEX IF NOT EXISTS program_grants_transaction_idx ON program_grants (transaction_id);

-- Usage events older than TOKENLEDGER_USAGE_ARCHIVE_AFTER_DAYS move here
-- (tl_archive_usage_events, run by the background loop in small batches).
-- The roll-ups (usage_daily and the coarser ones) keep them, so reports over
-- whole days and months stay exact; the journal (transactions, entries) is
-- never deleted; the audit counts archived events as charged.
CREATE TABLE IF NOT EXISTS usage_events_archive (
    id                  uuid PRIMARY KEY,
    source              text NOT NULL,
    event_id            text NOT NULL,
    account_id          bigint NOT NULL,
    model               text NOT NULL,
    price_id            uuid NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cost                bigint NOT NULL,
    transaction_id      uuid,
    reservation_id      uuid,
    project             text,
    tags                jsonb NOT NULL,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL,
    result              jsonb,
    -- Spend policy's marks, kept so that overage and violations stay
    -- auditable (audit_9_overage reads both tables).
    shortfall           bigint NOT NULL DEFAULT 0,
    violation           text,
    archived_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS usage_events_archive_transaction_idx ON usage_events_archive (transaction_id);
CREATE INDEX IF NOT EXISTS usage_events_archive_occurred_idx ON usage_events_archive (occurred_at);
-- Usage reports read overage and violations from the events that have them,
-- archived ones included (the roll-ups keep neither): as usage_events_policy_idx.
CREATE INDEX IF NOT EXISTS usage_events_archive_policy_idx ON usage_events_archive (occurred_at)
    WHERE shortfall > 0 OR violation IS NOT NULL;
-- Usage reports by department read from the events (a tag key that is not
-- declared) sum them by the UTC day or month, and PostgreSQL estimates those
-- groups from these statistics, one set per table (usage_events_buckets,
-- usage_events_archive_buckets): from the instant alone, a month was a
-- million days, and a million events were sorted rather than hashed
-- (service/sql/reports.sql, the events' arms under `folds`). Created with the
-- table's ANALYZE, which fills them: otherwise they would stay empty until
-- autovacuum's next analysis (after a tenth of the table changed).
DO $$
DECLARE
    v_table text;
BEGIN
    FOREACH v_table IN ARRAY ARRAY['usage_events', 'usage_events_archive'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_statistic_ext
                       WHERE stxname = v_table || '_buckets'
                         AND stxnamespace = current_schema()::regnamespace) THEN
            EXECUTE format('CREATE STATISTICS %I (ndistinct)'
                           ' ON ((occurred_at AT TIME ZONE ''UTC'')::date),'
                           '    (date_trunc(''month'', occurred_at AT TIME ZONE ''UTC'')::date)'
                           ' FROM %I', v_table || '_buckets', v_table);
            EXECUTE format('ANALYZE %I', v_table);
        END IF;
    END LOOP;
END $$;

-- Every usage event, recorded or archived: what the reports that read raw
-- events read (service/sql/reports.sql, finance.sql, tl_usage_export), so
-- that none of them misses the days the retention job moved. PostgreSQL
-- flattens the UNION ALL and takes a condition on the view to each table's
-- own indexes.
CREATE OR REPLACE VIEW usage_events_all AS
    SELECT id, source, event_id, account_id, model, price_id, input_tokens, cached_input_tokens,
           output_tokens, cost, transaction_id, reservation_id, project, tags, occurred_at, recorded_at,
           result, shortfall, violation
    FROM usage_events
    UNION ALL
    SELECT id, source, event_id, account_id, model, price_id, input_tokens, cached_input_tokens,
           output_tokens, cost, transaction_id, reservation_id, project, tags, occurred_at, recorded_at,
           result, shortfall, violation
    FROM usage_events_archive;

-- Moves up to p_limit events that occurred and were recorded before
-- p_before into the archive, oldest first; returns how many. Each call is
-- one short transaction that locks only the rows it moves (SKIP LOCKED), so
-- writers and other replicas never wait on it. Both times are required:
-- an event recorded lately stays until the retry window has passed for it
-- too, and a retry of an archived event is older than
-- TOKENLEDGER_USAGE_MAX_AGE_SECONDS and refused, never charged again.
CREATE OR REPLACE FUNCTION tl_archive_usage_events(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE sql AS $$
    WITH doomed AS (
        SELECT id FROM usage_events
        WHERE occurred_at < p_before AND recorded_at < p_before
        ORDER BY occurred_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
    , moved AS (
        DELETE FROM usage_events u USING doomed d WHERE u.id = d.id
        RETURNING u.id, u.source, u.event_id, u.account_id, u.model, u.price_id, u.input_tokens,
                  u.cached_input_tokens, u.output_tokens, u.cost, u.transaction_id, u.reservation_id,
                  u.project, u.tags, u.occurred_at, u.recorded_at, u.result, u.shortfall, u.violation)
    , kept AS (
        INSERT INTO usage_events_archive (id, source, event_id, account_id, model, price_id, input_tokens,
                                          cached_input_tokens, output_tokens, cost, transaction_id,
                                          reservation_id, project, tags, occurred_at, recorded_at, result,
                                          shortfall, violation)
        SELECT * FROM moved RETURNING 1)
    SELECT count(*)::integer FROM kept
$$;

-- ---------------------------------------------------------------------------
-- Statistics of growing tables
-- ---------------------------------------------------------------------------

-- The hot path's statements run with generic plans (tl_execute_batch,
-- tl_record_usage_batch), which a connection keeps for its life and makes
-- anew only when the statistics of a table they read change: ANALYZE
-- invalidates them. A plan made while a table was empty (a fresh install)
-- costs the table as nothing, and reading all of it by an index then looks
-- as cheap as reaching one row: on a fresh database a usage batch's look-up
-- of recorded events read the whole unique index once per event, 0.3 to 0.8
-- ms of PostgreSQL CPU per event instead of 0.06, growing with the table,
-- until autovacuum analyzed it (a naptime of a minute, then 10 % of changed
-- rows, at the server's settings).
--
-- tl_analyze_grown analyzes each hot table the current role owns that has
-- grown, since the size its statistics last recorded (pg_class.reltuples,
-- set by ANALYZE and VACUUM), by at least that size and by at least 500
-- rows: a young table is analyzed as it reaches about 500, 1,000, 2,000,
-- ... rows, often at first and seldom later, when autovacuum's threshold is
-- the nearer one. The background loop calls it; it returns the tables it
-- analyzed.
--
-- Growth is live rows (n_live_tup), not changed rows (n_mod_since_analyze):
-- the hot path updates accounts, lots, reservations and the roll-ups at
-- every charge, so under load their changed rows passed their size between
-- two background passes, and each pass analyzed them again (every 5 s in
-- `make bench`): an ANALYZE's own work, and every connection's plans of
-- each statement reading them made again (a batch of 500 usage events
-- right after an ANALYZE of its tables: 29.6 to 31.2 ms against 25.9 to
-- 28.1 for the next one). Rows updated in place change no size the
-- planner costs by.
CREATE OR REPLACE FUNCTION tl_analyze_grown() RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_done text[] := '{}';
    v_table text;
BEGIN
    FOR v_table IN
        SELECT s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
         WHERE s.schemaname = current_schema()
           AND s.relname IN ('accounts', 'entries', 'transactions', 'lots', 'lot_movements',
                             'idempotency_keys', 'reservations', 'reservation_holds', 'usage_events',
                             'usage_daily', 'usage_monthly', 'usage_monthly_models', 'usage_daily_models',
                             'policy_spend', 'outbox', 'chain', 'lot_settled', 'spend_daily',
                             'spend_monthly')
           AND s.n_live_tup - greatest(c.reltuples, 0) >= greatest(c.reltuples, 500)
           AND pg_has_role(c.relowner, 'USAGE')
         ORDER BY s.relname
    LOOP
        EXECUTE format('ANALYZE %I', v_table);
        v_done := v_done || v_table;
    END LOOP;
    RETURN v_done;
END $$;

-- ===========================================================================
-- 14. Grants to the app role: least privilege: the role the service can run as
-- ===========================================================================

-- tokenledger_app may read everything and insert into the journal, but may
-- not UPDATE or DELETE transactions, entries or lot movements (the triggers
-- refuse that too; the grants make it hold even with triggers disabled by
-- someone who is not the table owner). Creating a role needs CREATEROLE; an
-- owner without it gets a notice and the grants are skipped.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tokenledger_app') THEN
        CREATE ROLE tokenledger_app NOLOGIN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO tokenledger_app', current_schema());
    GRANT SELECT ON ALL TABLES IN SCHEMA public TO tokenledger_app;
    GRANT INSERT ON transactions, entries, lot_movements, lots, accounts, account_shards,
                    departments, employees, idempotency_keys, api_keys TO tokenledger_app;
    GRANT UPDATE ON accounts, account_shards, lots, departments, employees, idempotency_keys,
                    api_keys TO tokenledger_app;
    GRANT DELETE ON idempotency_keys TO tokenledger_app;
    -- Reservations resolve by UPDATE (a trigger lets them do so once); holds
    -- are only inserted. A usage batch gives back the claims it rejects.
    GRANT INSERT, UPDATE ON reservations TO tokenledger_app;
    GRANT INSERT ON reservation_holds TO tokenledger_app;
    GRANT INSERT, UPDATE, DELETE ON usage_events TO tokenledger_app;
    GRANT INSERT, UPDATE ON usage_daily, usage_monthly, usage_monthly_models, usage_daily_models
        TO tokenledger_app;
    REVOKE UPDATE, DELETE, TRUNCATE ON transactions, entries, lot_movements FROM tokenledger_app;
    -- Price versions are append-only too (README, Prices).
    GRANT SELECT, INSERT ON prices TO tokenledger_app;
    REVOKE UPDATE, DELETE, TRUNCATE ON prices FROM tokenledger_app;
    -- Grant programs: definitions change by PUT; a run row is completed in
    -- its own transaction, and an onboarding run that issued nothing is
    -- removed again; claims are only inserted.
    GRANT INSERT, UPDATE ON grant_programs TO tokenledger_app;
    GRANT INSERT, UPDATE, DELETE ON program_runs TO tokenledger_app;
    GRANT INSERT ON program_grants TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'tokenledger_app role not created or granted: %', SQLERRM;
END $$;

-- The service role appends to the chain and never changes it.
DO $$
BEGIN
    GRANT SELECT, INSERT ON chain TO tokenledger_app;
    REVOKE UPDATE, DELETE, TRUNCATE ON chain FROM tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on chain: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT ON outbox TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on outbox: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE, DELETE ON spend_policies, policy_spend, policy_links TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on spend policy tables: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE ON account_alerts, webhooks, webhook_deliveries, webhook_attempts
        TO tokenledger_app;
    -- The dispatcher marks events fanned out; events are never deleted.
    GRANT UPDATE (fanned_out_at) ON outbox TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on webhooks: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE ON employee_departments, approvals TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on employee_departments, approvals: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE ON audit_checkpoints TO tokenledger_app;
    GRANT SELECT, INSERT ON usage_events_archive TO tokenledger_app;
    REVOKE UPDATE, DELETE, TRUNCATE ON usage_events_archive FROM tokenledger_app;
    GRANT SELECT ON usage_events_all TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on audit_checkpoints, usage_events_archive: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE ON key_spend TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on key_spend: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE, DELETE ON lot_settled TO tokenledger_app;
    GRANT SELECT, UPDATE ON lot_settle_progress TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on lot_settled, lot_settle_progress: %', SQLERRM;
END $$;

DO $$
BEGIN
    GRANT SELECT, INSERT, UPDATE ON spend_daily, spend_monthly TO tokenledger_app;
    REVOKE DELETE, TRUNCATE ON spend_daily, spend_monthly FROM tokenledger_app;
    GRANT SELECT ON spend_rollup_builds TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on spend_daily, spend_monthly: %', SQLERRM;
END $$;

-- ===========================================================================
-- Balance series: a chart's points in one pass (issue 21)
-- ===========================================================================

-- The posted balance at every p_step from p_from to p_to, both included
-- (generate_series' points): at each point exactly what tl_balance_at
-- answers there (tests/api/test_balance_series.py compares the two over
-- randomized histories, point by point), for about the cost of one as-of read
-- and an index probe per point.
--
-- The series (GET /v1/accounts/{a}/series) called tl_balance_at once per
-- point, and each call walked every lot of the account that had expired by
-- then and probed lot_settled for it: for the heaviest user of a year of 10M
-- entries (23 lots expired), about 150 buffers per point, 4,900 and 3.2 ms for
-- a 30-day chart, which made its p99 1.4 to 2.0 times the fresh database's
-- (README, A year of history); this function: 510 buffers, 0.7 ms. Here:
--
-- * the last entry at or before each point is one probe of
--   entries_account_time_idx per point and shard, as in tl_balance_at: cheaper
--   than one ordered read of the range's entries, which for a heavy user are
--   thousands (a usage event a few minutes for 30 days);
-- * the account's lots expired by the last point and their settled marks are
--   read once. A lot counts at point p when it was created and had expired by
--   p and was not settled by p (tl_balance_at's rule), so these rows alone say
--   which lots count at which points; on a year of history that is usually
--   none, the expiry and the mark being written soon after expires_at;
-- * only the lots that count at some point have their movements and holds
--   read, each row once (tl_balance_at read them again at every point), and
--   one running sum per lot over those rows and the lot's points, in time
--   order, gives its credits and holds at each: a movement counts at a point
--   at or after its transaction, a hold from its reservation's creation until
--   the reservation resolved or expired.
--
-- PL/pgSQL with a generic plan, like tl_balance_at and for its reasons (a SQL
-- function this size is planned again at every call). The lots' columns travel
-- in arrays from the first statement to the second, so that the lots are not
-- read twice. No parallel workers: on a year of history the generic plan
-- costs the movements of "some lots" high enough to read them with a
-- parallel worker, and starting one took 6 to 16 ms at each call (the whole
-- series takes about 1 ms), to read nothing when no lot counts, as usual.
CREATE OR REPLACE FUNCTION tl_balance_series(p_account bigint, p_from timestamptz, p_to timestamptz,
                                             p_step interval)
RETURNS TABLE (at timestamptz, posted bigint)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan SET max_parallel_workers_per_gather = 0 AS $$
DECLARE
    v_points timestamptz[];
    v_first timestamptz;
    v_last timestamptz;
    v_shards integer;
    v_lots uuid[];
    v_counts_from timestamptz[];
    v_counts_until timestamptz[];
    v_rollover_max bigint[];
    v_rollover_until timestamptz[];
BEGIN
    v_points := ARRAY(SELECT g FROM generate_series(p_from, p_to, p_step) g ORDER BY g);
    IF cardinality(v_points) = 0 THEN
        RETURN;
    END IF;
    v_first := v_points[1];
    v_last := v_points[cardinality(v_points)];
    SELECT a.shard_count INTO v_shards FROM accounts a WHERE a.id = p_account;

    -- The lots that count at one point at least, and from when until when
    -- they count (counts_until null: not settled).
    SELECT array_agg(l.id), array_agg(greatest(l.expires_at, l.created_at)), array_agg(s.settled_at),
           array_agg(l.rollover_max), array_agg(l.rollover_until)
      INTO v_lots, v_counts_from, v_counts_until, v_rollover_max, v_rollover_until
    FROM lots l
    LEFT JOIN lot_settled s ON s.lot_id = l.id
    WHERE l.account_id = p_account AND l.expires_at <= v_last AND l.created_at <= v_last
      AND (s.settled_at IS NULL OR s.settled_at > v_first)
      AND EXISTS (SELECT 1 FROM unnest(v_points) p(instant)
                  WHERE p.instant >= l.expires_at AND p.instant >= l.created_at
                    AND (s.settled_at IS NULL OR p.instant < s.settled_at));

    RETURN QUERY
    WITH lot_points AS (
        SELECT c.lot_id, p.instant, c.rollover_max, c.rollover_until
        FROM unnest(v_lots, v_counts_from, v_counts_until, v_rollover_max, v_rollover_until)
               c(lot_id, counts_from, counts_until, rollover_max, rollover_until)
        JOIN unnest(v_points) p(instant)
          ON p.instant >= c.counts_from AND (c.counts_until IS NULL OR p.instant < c.counts_until)
    ),
    -- A lot's movements and its holds' starts and ends, then its points: at
    -- one instant the point sorts last, so it counts what happened at it.
    timeline AS (
        SELECT m.lot_id, t.created_at AS instant, false AS is_point, m.amount AS moved,
               0::bigint AS held, NULL::bigint AS rollover_max, NULL::timestamptz AS rollover_until
        FROM lot_movements m
        JOIN transactions t ON t.id = m.transaction_id
        WHERE m.lot_id = ANY (v_lots)
        UNION ALL
        SELECT h.lot_id, x.instant, false, 0, x.held, NULL, NULL
        FROM reservation_holds h
        JOIN reservations rv ON rv.id = h.reservation_id
        CROSS JOIN LATERAL (VALUES (rv.created_at, h.amount),
                                   (coalesce(rv.resolved_at, rv.expires_at), -h.amount)) x(instant, held)
        -- (a reservation that ended when it began held nothing at any instant)
        WHERE h.lot_id = ANY (v_lots) AND coalesce(rv.resolved_at, rv.expires_at) > rv.created_at
        UNION ALL
        SELECT lp.lot_id, lp.instant, true, 0, 0, lp.rollover_max, lp.rollover_until
        FROM lot_points lp
    ),
    running AS (
        SELECT tl.instant, tl.is_point, tl.rollover_max, tl.rollover_until,
               sum(tl.moved) OVER w AS remaining, sum(tl.held) OVER w AS held
        FROM timeline tl
        WINDOW w AS (PARTITION BY tl.lot_id ORDER BY tl.instant, tl.is_point)
    ),
    -- What the lots that count held at each point: tl_balance_at's formula
    -- (a program lot's rollover part lives on until rollover_until).
    expired AS (
        SELECT r.instant,
               sum(greatest(0, r.remaining - r.held)
                   - CASE WHEN r.rollover_max IS NOT NULL AND r.rollover_until > r.instant
                          THEN least(r.rollover_max, greatest(0, r.remaining - r.held)) ELSE 0 END) AS credits
        FROM running r
        WHERE r.is_point
        GROUP BY r.instant
    )
    SELECT p.instant,
           ((SELECT coalesce(sum(x.balance_after), 0)
             FROM generate_series(0, v_shards - 1) s
             CROSS JOIN LATERAL (
                 SELECT e.balance_after FROM entries e
                 WHERE e.account_id = p_account AND e.shard = s AND e.created_at <= p.instant
                 ORDER BY e.created_at DESC, e.version DESC LIMIT 1) x)
            - coalesce(ex.credits, 0))::bigint
    FROM unnest(v_points) p(instant)
    LEFT JOIN expired ex ON ex.instant = p.instant
    ORDER BY p.instant;
END $$;

-- ===========================================================================
-- Tag roll-ups: usage reports by declared tag keys (issue 16, tags16)
-- ===========================================================================

-- A usage report grouped by `tag:<name>` read the period's usage events and
-- its debits and captures from the journal (2 to 6.5 s for a month of a
-- million events and 300,000 debits in bench.reports): the roll-ups above
-- keep no tags. These keep them for the tag keys declared in
-- report_tag_keys, so that a report whose tag keys are all declared reads
-- roll-ups like any other (service/reports.py source_for); a report by a key
-- not declared still reads the events and the journal, exactly.
--
-- The declared keys come from TOKENLEDGER_REPORT_TAGS, written here at
-- start-up by tl_report_tags_sync, which rebuilds the roll-ups when the set
-- changed. With no key declared, the usage and spend write paths read this
-- empty table once per batch or statement and write nothing more.
--
-- A roll-up row's `tag_values` is a JSON array of REPORT_TAG_SLOTS (8)
-- values: the spend's value of each declared key, in the keys' order by
-- name (COLLATE "C"), JSON null where it has none, then nulls
-- (tl_report_tag_values). The spend's tags are a usage event's `tags`, or a
-- debit's or capture's `metadata` (a flat object of scalars, so its keys are
-- its tags). A report reads slot i with `->> i`, which gives the same text as
-- `tags ->> name` over the events. An array of fixed length, built by one
-- inlined expression, costs about a microsecond per event; reducing the tags
-- object to the declared keys cost 14 µs (a subquery per event).
--
-- The rows are written where the other roll-ups are, in the transaction of
-- the spend, never by a trigger on usage_events: a usage batch inserts
-- events it then rejects and deletes, and the archive deletes events whose
-- sums must stay. Usage events: tl_usage_rollup (one event) and
-- tl_record_usage_batch (the batch's recorded events, beside
-- tl_usage_rollup_sums). Debits and captures by amount: tl_spend_rollup, the
-- statement trigger on entries, counting what spend_daily counts.
--
-- Two shapes each, for the two kinds of report that must be fast:
--   * per UTC day, model and project, without the account (like
--     usage_daily_models, and split into shard rows by backend for the same
--     reason: every account's spend touches them): reports without an
--     employee or department key, over any whole days;
--   * per UTC month and account, without model and project (like
--     usage_monthly_models without the model): reports by employee or
--     department (and month and tags) over whole months, when nobody moved
--     department.
-- Any other report with a tag key (an account key with a day, model or
-- project key) reads the events and the journal.

CREATE TABLE IF NOT EXISTS report_tag_keys (
    name        text PRIMARY KEY,
    declared_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- What service/reports.py accepts as a tag name (a comma separates keys).
    CONSTRAINT report_tag_keys_name_format CHECK (
        length(name) BETWEEN 1 AND 64 AND name = btrim(name) AND strpos(name, ',') = 0)
);

CREATE TABLE IF NOT EXISTS usage_tag_daily (
    day                 date NOT NULL,
    model               text NOT NULL,
    project             text NOT NULL DEFAULT '',
    tag_values          jsonb NOT NULL,
    shard               integer NOT NULL,
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, project, tag_values, shard)
);
CREATE TABLE IF NOT EXISTS usage_tag_monthly (
    month               date NOT NULL,
    account_id          bigint NOT NULL,
    tag_values          jsonb NOT NULL,
    events              bigint NOT NULL DEFAULT 0,
    input_tokens        bigint NOT NULL DEFAULT 0,
    cached_input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    credits             bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (month, account_id, tag_values)
);
-- Debits and captures: model NULL when the metadata has none (spend_daily's
-- rule), so the key is a unique index NULLS NOT DISTINCT.
CREATE TABLE IF NOT EXISTS spend_tag_daily (
    day        date NOT NULL,
    model      text,
    project    text NOT NULL DEFAULT '',
    tag_values jsonb NOT NULL,
    shard      integer NOT NULL,
    debits     bigint NOT NULL DEFAULT 0,
    credits    bigint NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS spend_tag_daily_key_idx
    ON spend_tag_daily (day, model, project, tag_values, shard) NULLS NOT DISTINCT;
CREATE TABLE IF NOT EXISTS spend_tag_monthly (
    month      date NOT NULL,
    account_id bigint NOT NULL,
    tag_values jsonb NOT NULL,
    debits     bigint NOT NULL DEFAULT 0,
    credits    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (month, account_id, tag_values)
);

-- The declared keys in slot order (tl_report_tag_values, the reports).
CREATE OR REPLACE FUNCTION tl_report_tag_keys() RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT ARRAY(SELECT name FROM report_tag_keys ORDER BY name COLLATE "C")
$$;

-- A spend's values of the declared keys p_keys (tl_report_tag_keys, at most
-- 8): one expression, so that PostgreSQL inlines it into the statement
-- (STABLE like jsonb_build_array: declared IMMUTABLE, it was not inlined).
CREATE OR REPLACE FUNCTION tl_report_tag_values(p_tags jsonb, p_keys text[]) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(p_tags -> p_keys[1], p_tags -> p_keys[2], p_tags -> p_keys[3],
                             p_tags -> p_keys[4], p_tags -> p_keys[5], p_tags -> p_keys[6],
                             p_tags -> p_keys[7], p_tags -> p_keys[8])
$$;

-- Adds the sums of usage events to the two usage tag roll-ups: item i is
-- the events of one (day, account, model, project, tag values). One row
-- per key per statement, written in key order (as tl_usage_rollup_sums).
CREATE OR REPLACE FUNCTION tl_usage_tag_rollup_sums(
    p_days date[], p_accounts bigint[], p_models text[], p_projects text[], p_values jsonb[],
    p_events bigint[], p_input bigint[], p_cached bigint[], p_output bigint[], p_credits bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_tag_daily AS d (day, model, project, tag_values, shard, events, input_tokens,
                                      cached_input_tokens, output_tokens, credits)
    SELECT s.day, s.model, s.project, s.tag_values, pg_backend_pid() % 16, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_values, p_events, p_input, p_cached, p_output,
                p_credits)
         AS s (day, account_id, model, project, tag_values, events, input_tokens, cached_input_tokens,
               output_tokens, credits)
    GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (day, model, project, tag_values, shard) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
    INSERT INTO usage_tag_monthly AS d (month, account_id, tag_values, events, input_tokens,
                                        cached_input_tokens, output_tokens, credits)
    SELECT date_trunc('month', s.day)::date, s.account_id, s.tag_values, sum(s.events),
           sum(s.input_tokens), sum(s.cached_input_tokens), sum(s.output_tokens), sum(s.credits)
    FROM unnest(p_days, p_accounts, p_models, p_projects, p_values, p_events, p_input, p_cached, p_output,
                p_credits)
         AS s (day, account_id, model, project, tag_values, events, input_tokens, cached_input_tokens,
               output_tokens, credits)
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (month, account_id, tag_values) DO UPDATE SET
        events = d.events + EXCLUDED.events,
        input_tokens = d.input_tokens + EXCLUDED.input_tokens,
        cached_input_tokens = d.cached_input_tokens + EXCLUDED.cached_input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        credits = d.credits + EXCLUDED.credits;
END $$;

-- The tag roll-ups of a usage batch's recorded events under the declared
-- keys p_keys: tl_record_usage_batch calls it beside tl_usage_rollup_sums,
-- over the rows tl_usage_batch_sums sums (status pending or recorded; an
-- event recorded one at a time by tl_record_usage was rolled up there).
CREATE OR REPLACE FUNCTION tl_usage_tag_rollup_batch(p_rows tl_usage_batch_item[], p_keys text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s record;
BEGIN
    SELECT array_agg(g.d) AS days, array_agg(g.a) AS accounts, array_agg(g.m) AS models,
           array_agg(g.p) AS projects, array_agg(g.t) AS tag_values, array_agg(g.n) AS events,
           array_agg(g.i) AS input, array_agg(g.ci) AS cached, array_agg(g.o) AS output,
           array_agg(g.c) AS credits
    INTO s
    FROM (SELECT (w.occurred_at AT TIME ZONE 'UTC')::date AS d, w.account_id AS a, w.model AS m,
                 coalesce(w.project, '') AS p, tl_report_tag_values(w.tags, p_keys) AS t,
                 count(*)::bigint AS n, sum(w.input_tokens)::bigint AS i,
                 sum(w.cached_input_tokens)::bigint AS ci, sum(w.output_tokens)::bigint AS o,
                 sum(w.cost)::bigint AS c
          FROM unnest(p_rows) w WHERE w.status IN ('pending', 'recorded')
          GROUP BY 1, 2, 3, 4, 5) g;
    IF s.days IS NOT NULL THEN
        PERFORM tl_usage_tag_rollup_sums(s.days, s.accounts, s.models, s.projects, s.tag_values, s.events,
                                         s.input, s.cached, s.output, s.credits);
    END IF;
END $$;

-- Rebuilds the four tag roll-ups from the usage events (the archive's too:
-- the roll-ups keep archived events) and the journal, under the declared
-- keys, exactly as the write paths keep them. The caller keeps writers out
-- meanwhile (tl_report_tags_sync).
CREATE OR REPLACE FUNCTION tl_report_tags_rebuild() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM usage_tag_daily;
    DELETE FROM usage_tag_monthly;
    DELETE FROM spend_tag_daily;
    DELETE FROM spend_tag_monthly;
    IF NOT EXISTS (SELECT 1 FROM report_tag_keys) THEN
        RETURN;
    END IF;
    WITH u AS MATERIALIZED (
        SELECT (u.occurred_at AT TIME ZONE 'UTC')::date AS day, u.account_id, u.model,
               coalesce(u.project, '') AS project, tl_report_tag_values(u.tags, k.keys) AS tag_values,
               count(*)::bigint AS events, sum(u.input_tokens)::bigint AS input_tokens,
               sum(u.cached_input_tokens)::bigint AS cached_input_tokens,
               sum(u.output_tokens)::bigint AS output_tokens, sum(u.cost)::bigint AS credits
        FROM (SELECT occurred_at, account_id, model, project, tags, input_tokens, cached_input_tokens,
                     output_tokens, cost FROM usage_events
              UNION ALL
              SELECT occurred_at, account_id, model, project, tags, input_tokens, cached_input_tokens,
                     output_tokens, cost FROM usage_events_archive) u
        CROSS JOIN (SELECT tl_report_tag_keys() AS keys) k
        GROUP BY 1, 2, 3, 4, 5),
    daily AS (
        INSERT INTO usage_tag_daily (day, model, project, tag_values, shard, events, input_tokens,
                                     cached_input_tokens, output_tokens, credits)
        SELECT day, model, project, tag_values, 0, sum(events), sum(input_tokens),
               sum(cached_input_tokens), sum(output_tokens), sum(credits)
        FROM u GROUP BY 1, 2, 3, 4)
    INSERT INTO usage_tag_monthly (month, account_id, tag_values, events, input_tokens,
                                   cached_input_tokens, output_tokens, credits)
    SELECT date_trunc('month', day)::date, account_id, tag_values, sum(events), sum(input_tokens),
           sum(cached_input_tokens), sum(output_tokens), sum(credits)
    FROM u GROUP BY 1, 2, 3;
    -- What spend_daily counts: every paying (negative) entry of a debit or
    -- capture, in the UTC day of its transaction (tl_spend_rollup_rebuild).
    WITH s AS MATERIALIZED (
        SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day, e.account_id,
               t.metadata ->> 'model' AS model, coalesce(t.metadata ->> 'project', '') AS project,
               tl_report_tag_values(t.metadata, k.keys) AS tag_values,
               count(*)::bigint AS debits, -sum(e.amount)::bigint AS credits
        FROM transactions t
        JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
        CROSS JOIN (SELECT tl_report_tag_keys() AS keys) k
        WHERE t.kind IN ('debit', 'capture')
        GROUP BY 1, 2, 3, 4, 5),
    daily AS (
        INSERT INTO spend_tag_daily (day, model, project, tag_values, shard, debits, credits)
        SELECT day, model, project, tag_values, 0, sum(debits), sum(credits)
        FROM s GROUP BY 1, 2, 3, 4)
    INSERT INTO spend_tag_monthly (month, account_id, tag_values, debits, credits)
    SELECT date_trunc('month', day)::date, account_id, tag_values, sum(debits), sum(credits)
    FROM s GROUP BY 1, 2, 3;
END $$;

-- Makes the declared keys exactly p_names (TOKENLEDGER_REPORT_TAGS, at
-- start-up): nothing when they are already (the usual start), else the keys
-- are replaced and the roll-ups rebuilt, with the tables the rebuild reads
-- locked against writers (SHARE: reports and other reads go on). Every
-- writer reads the keys after its first write to usage_events or entries in
-- its transaction, so it either committed before the rebuild read (and is
-- in it) or waits, then writes under the new keys. Returns whether it
-- rebuilt. SECURITY DEFINER: the service's role (tokenledger_app) may not
-- lock the journal.
CREATE OR REPLACE FUNCTION tl_report_tags_sync(p_names text[]) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_names text[] := ARRAY(SELECT n FROM unnest(p_names) n GROUP BY n ORDER BY n COLLATE "C");
BEGIN
    IF cardinality(v_names) > 8 THEN
        PERFORM tl_raise('TLD01', 'invalid_request', 'at most 8 report tag keys may be declared',
                         jsonb_build_object('path', '$.report_tags'));
    END IF;
    -- One sync at a time (replicas starting together): the second finds the
    -- keys the first wrote. Plain reads of the keys go on.
    LOCK TABLE report_tag_keys IN EXCLUSIVE MODE;
    IF tl_report_tag_keys() = v_names THEN
        RETURN false;
    END IF;
    LOCK TABLE usage_events, usage_events_archive, entries IN SHARE MODE;
    DELETE FROM report_tag_keys;
    INSERT INTO report_tag_keys (name) SELECT unnest(v_names);
    PERFORM tl_report_tags_rebuild();
    RETURN true;
END $$;

-- The service's role reads the keys and writes the roll-ups (the write paths
-- run as it); it changes the keys only through tl_report_tags_sync, which
-- nobody else may call (it runs as the owner and locks the journal).
REVOKE EXECUTE ON FUNCTION tl_report_tags_sync(text[]) FROM PUBLIC;
DO $$
BEGIN
    GRANT SELECT ON report_tag_keys TO tokenledger_app;
    GRANT EXECUTE ON FUNCTION tl_report_tags_sync(text[]) TO tokenledger_app;
    GRANT SELECT, INSERT, UPDATE ON usage_tag_daily, usage_tag_monthly, spend_tag_daily, spend_tag_monthly
        TO tokenledger_app;
EXCEPTION WHEN insufficient_privilege OR undefined_object THEN
    RAISE NOTICE 'tokenledger_app not granted on the tag roll-ups: %', SQLERRM;
END $$;

-- ===========================================================================
-- 14b. The usage export: employee, model and project in answer order
-- ===========================================================================
-- GET /v1/reports/usage?group_by=employee,model,project over whole UTC months
-- (tl_usage_export below, service/sql/usage_export.sql) walks the employee
-- accounts in byte order of their ids, the answer's order, and reads each
-- one's roll-up rows by key: the first row comes at once and a third of a
-- million groups are never hashed or sorted whole. Written only when an
-- account is created.
CREATE INDEX IF NOT EXISTS accounts_employee_ref_idx ON accounts ((ref COLLATE "C")) INCLUDE (id)
    WHERE type = 'employee';

-- A text key as PostgreSQL's COPY ... (FORMAT csv) must receive it to write
-- exactly what service/reports.py writes with Python's csv module after
-- csv_cell: text a spreadsheet would read as a formula (it starts with =, +,
-- -, @, tab or carriage return) gets a leading apostrophe, and an empty text
-- becomes null (COPY quotes an empty string, "", where Python writes an empty
-- field, as for null). COPY's own quoting (a cell holding a comma, a double
-- quote, CR or LF, its double quotes doubled) is Python's QUOTE_MINIMAL. One
-- expression, so PostgreSQL inlines it.
CREATE OR REPLACE FUNCTION tl_csv_key(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ascii(v) IN (61, 43, 45, 64, 9, 13) THEN '''' || v ELSE nullif(v, '') END
$$;

-- A sum of bigints as a bigint: sum(bigint) adds in numeric (or int128) and
-- returns a numeric that the export casts back, which cost a fifth of its
-- query's CPU over a third of a million groups (measured in the README,
-- Reports). int8pl fails loudly on overflow ("bigint out of range"), as the
-- cast back did; every total is far below 2^63 (amounts are at most 2^53).
-- usage_report (service/sql/reports.sql) sums with it too: its state is a
-- bigint held by value where sum()'s is an int128 allocated per group, so a
-- third of a million groups hash in less time and memory, without spilling
-- to disk. The combine function lets parallel workers sum their share of the
-- events and the leader add the partial sums, as sum() allows.
CREATE OR REPLACE AGGREGATE tl_bigint_sum(bigint) (SFUNC = int8pl, STYPE = bigint, COMBINEFUNC = int8pl,
                                                    PARALLEL = SAFE);

-- The usage export's groups (GET /v1/reports/usage?group_by=employee,model,project
-- over months of roll-ups; its named queries are in service/sql/usage_export.sql):
-- the same rows as usage_report (service/sql/reports.sql) for those keys, in the
-- answer's order, over [p_from, p_to) read from the monthly roll-ups of the month
-- starts [p_span_from, p_span_to) and corrected at the ends exactly as
-- usage_report corrects them (its header says why that is exact).
--
-- Why not usage_report: it aggregates the roll-up rows by account, then again
-- by the answer's keys, then sorts: for a month of 10,000 employees, a third of
-- a million groups hashed twice (spilling to disk) and sorted (an external
-- merge) before the first row comes out. Here the employee accounts are walked
-- in byte order of their ids (accounts_employee_ref_idx) and each one's roll-up
-- rows read by key (usage_monthly's primary key, spend_monthly_key_idx: one
-- probe per month listed, as a range of months would scan every account's
-- entries of those months at each employee), a few dozen rows sorted per
-- employee (Incremental Sort). The accounts that are not an employee's
-- (employee null, so last) and the corrections are few rows, sorted apart; a
-- Merge Append of the three feeds one GroupAggregate, which sums the months and
-- the corrections of each group with no hash and no sort of the whole.
--
-- LANGUAGE sql, STABLE, one SELECT and not STRICT, so PostgreSQL inlines it into
-- the query that calls it: its plan streams (no result set kept whole), and each
-- named query writes its rows (CSV cells, JSON objects) around the same plan.
CREATE OR REPLACE FUNCTION tl_usage_export(
    p_from timestamptz, p_to timestamptz, p_span_from timestamptz, p_span_to timestamptz
) RETURNS TABLE (
    employee text, model text, project text, events bigint, input_tokens bigint,
    cached_input_tokens bigint, output_tokens bigint, credits bigint, overage bigint,
    violations bigint, debits bigint, debit_credits bigint
)
LANGUAGE sql STABLE AS $$
SELECT g.employee, g.model, g.project,
       tl_bigint_sum(g.events) AS events,
       tl_bigint_sum(g.input_tokens) AS input_tokens,
       tl_bigint_sum(g.cached_input_tokens) AS cached_input_tokens,
       tl_bigint_sum(g.output_tokens) AS output_tokens,
       tl_bigint_sum(g.credits) AS credits,
       tl_bigint_sum(g.overage) AS overage,
       tl_bigint_sum(g.violations) AS violations,
       tl_bigint_sum(g.debits) AS debits,
       tl_bigint_sum(g.debit_credits) AS debit_credits
FROM (
    -- Every employee account in byte order of its id, with its roll-up rows.
    (SELECT a.ref COLLATE "C" AS employee, r.model COLLATE "C" AS model,
            nullif(r.project, '') COLLATE "C" AS project,
            r.events, r.input_tokens, r.cached_input_tokens, r.output_tokens, r.credits,
            r.overage, r.violations, r.debits, r.debit_credits
     FROM accounts a
     CROSS JOIN LATERAL (
         SELECT m.model, m.project, m.events, m.input_tokens, m.cached_input_tokens,
                m.output_tokens, m.credits, 0::bigint AS overage, 0::bigint AS violations,
                0::bigint AS debits, 0::bigint AS debit_credits
         FROM usage_monthly m
         WHERE m.account_id = a.id
           AND m.month = ANY (ARRAY(SELECT generate_series(
                   (p_span_from AT TIME ZONE 'UTC')::date,
                   (p_span_to AT TIME ZONE 'UTC')::date - 1, interval '1 month')::date))
         UNION ALL
         SELECT sm.model, sm.project, 0, 0, 0, 0, sm.credits, 0, 0, sm.debits, sm.credits
         FROM spend_monthly sm
         WHERE sm.account_id = a.id
           AND sm.month = ANY (ARRAY(SELECT generate_series(
                   (p_span_from AT TIME ZONE 'UTC')::date,
                   (p_span_to AT TIME ZONE 'UTC')::date - 1, interval '1 month')::date))
     ) r
     WHERE a.type = 'employee'
     ORDER BY 1, 2, 3)
    UNION ALL
    -- Department (and any other) accounts: spend without an employee.
    (SELECT NULL::text COLLATE "C", r.model COLLATE "C", nullif(r.project, '') COLLATE "C",
            r.events, r.input_tokens, r.cached_input_tokens, r.output_tokens, r.credits,
            0::bigint, 0::bigint, r.debits, r.debit_credits
     FROM accounts a
     CROSS JOIN LATERAL (
         SELECT m.model, m.project, m.events, m.input_tokens, m.cached_input_tokens,
                m.output_tokens, m.credits, 0::bigint AS debits, 0::bigint AS debit_credits
         FROM usage_monthly m
         WHERE m.account_id = a.id
           AND m.month = ANY (ARRAY(SELECT generate_series(
                   (p_span_from AT TIME ZONE 'UTC')::date,
                   (p_span_to AT TIME ZONE 'UTC')::date - 1, interval '1 month')::date))
         UNION ALL
         SELECT sm.model, sm.project, 0, 0, 0, 0, sm.credits, sm.debits, sm.credits
         FROM spend_monthly sm
         WHERE sm.account_id = a.id
           AND sm.month = ANY (ARRAY(SELECT generate_series(
                   (p_span_from AT TIME ZONE 'UTC')::date,
                   (p_span_to AT TIME ZONE 'UTC')::date - 1, interval '1 month')::date))
     ) r
     WHERE a.type <> 'employee'
     ORDER BY 1, 2, 3)
    UNION ALL
    -- The few rows the roll-ups do not hold, per account: the spend
    -- policy's overage and violations in [p_from, p_to) (archived events
    -- included), and the corrections at
    -- the ends (usage_report's legs for its 'monthly' source).
    (SELECT CASE WHEN a.type = 'employee' THEN a.ref END COLLATE "C",
            c.model COLLATE "C", nullif(c.project, '') COLLATE "C",
            c.events, c.input_tokens, c.cached_input_tokens, c.output_tokens, c.credits,
            c.overage, c.violations, c.debits, c.debit_credits
     FROM (
         SELECT u.account_id, u.model, coalesce(u.project, '') AS project,
                0::bigint AS events, 0::bigint AS input_tokens,
                0::bigint AS cached_input_tokens, 0::bigint AS output_tokens,
                0::bigint AS credits, u.shortfall AS overage,
                (u.violation IS NOT NULL)::integer::bigint AS violations,
                0::bigint AS debits, 0::bigint AS debit_credits
         FROM usage_events_all u
         WHERE (u.shortfall > 0 OR u.violation IS NOT NULL)
           AND u.occurred_at >= p_from AND u.occurred_at < p_to
         UNION ALL
         SELECT c0.account_id, c0.model, coalesce(c0.project, ''),
                sg.sign, sg.sign * c0.input_tokens, sg.sign * c0.cached_input_tokens,
                sg.sign * c0.output_tokens, sg.sign * c0.cost, 0, 0, 0, 0
         FROM usage_events_all c0
         CROSS JOIN LATERAL (
             SELECT CASE WHEN c0.occurred_at < greatest(p_from, p_span_from)
                         THEN CASE WHEN p_from < p_span_from THEN 1 ELSE -1 END
                         ELSE CASE WHEN p_span_to < p_to THEN 1 ELSE -1 END
                    END::bigint AS sign) sg
         WHERE (p_from <> p_span_from OR p_span_to <> p_to)
           AND ((c0.occurred_at >= least(p_from, p_span_from)
                 AND c0.occurred_at < greatest(p_from, p_span_from))
                OR (c0.occurred_at >= least(p_span_to, p_to)
                    AND c0.occurred_at < greatest(p_span_to, p_to)))
         UNION ALL
         SELECT e.account_id, t.metadata ->> 'model', coalesce(t.metadata ->> 'project', ''),
                0, 0, 0, 0, -e.amount * sg.sign, 0, 0, sg.sign, -e.amount * sg.sign
         FROM transactions t
         JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
         CROSS JOIN LATERAL (
             SELECT CASE WHEN t.created_at < greatest(p_from, p_span_from)
                         THEN CASE WHEN p_from < p_span_from THEN 1 ELSE -1 END
                         ELSE CASE WHEN p_span_to < p_to THEN 1 ELSE -1 END
                    END::bigint AS sign) sg
         WHERE (p_from <> p_span_from OR p_span_to <> p_to)
           AND t.kind IN ('debit', 'capture')
           AND ((t.created_at >= least(p_from, p_span_from)
                 AND t.created_at < greatest(p_from, p_span_from))
                OR (t.created_at >= least(p_span_to, p_to)
                    AND t.created_at < greatest(p_span_to, p_to)))
     ) c
     JOIN accounts a ON a.id = c.account_id
     ORDER BY 1, 2, 3)
) g
GROUP BY g.employee, g.model, g.project
-- As in usage_report: a group of subtracted spend only is not in the period.
HAVING tl_bigint_sum(g.events) <> 0 OR tl_bigint_sum(g.debits) <> 0
ORDER BY g.employee, g.model, g.project
$$;

-- ===========================================================================
-- 15. Seed rows and back-fills: the system accounts, the settle cursor, one-
-- time back-fills
-- ===========================================================================

-- Usage that no wallet could cover is charged here (unbounded, sharded
-- like the other system accounts; its shard rows are made with theirs below).
INSERT INTO accounts (address, type, ref, shard_count) VALUES ('system:overage', 'system', 'overage', 16)
ON CONFLICT (address) DO NOTHING;

-- ---------------------------------------------------------------------------
-- Seed rows
-- ---------------------------------------------------------------------------

INSERT INTO accounts (address, type, ref, shard_count) VALUES
    ('system:issuance', 'system', 'issuance', 16),
    ('system:usage', 'system', 'usage', 16),
    ('system:expired', 'system', 'expired', 16)
ON CONFLICT (address) DO NOTHING;

INSERT INTO account_shards (account_id, shard)
SELECT a.id, s FROM accounts a CROSS JOIN LATERAL generate_series(0, a.shard_count - 1) s
WHERE a.type = 'system'
ON CONFLICT DO NOTHING;

INSERT INTO lot_settle_progress (name, movement_id, seen_id) VALUES ('lots', 0, 0)
ON CONFLICT (name) DO NOTHING;
-- Employees created before this table existed: their current department,
-- since always (the best the database knows).
INSERT INTO employee_departments (employee_id, department, since)
SELECT e.id, e.department, '-infinity' FROM employees e
WHERE NOT EXISTS (SELECT 1 FROM employee_departments h WHERE h.employee_id = e.id);

-- Backfill once: a database from before the spend roll-ups has debits and
-- captures but no roll-up rows. Their trigger was (re)created above in this
-- same transaction and holds its lock on entries until commit, so no entry
-- is written between the rebuild's read and the trigger taking over.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM spend_rollup_builds) THEN
        PERFORM tl_spend_rollup_rebuild();
    END IF;
END $$;

-- Bound accounts of a database from before policy_links: their links, made
-- from their policies (nothing to do once every bound account has them).
SELECT tl_policy_links_refresh(ARRAY(
    SELECT a.id FROM accounts a
     WHERE a.policy_bound AND NOT EXISTS (SELECT 1 FROM policy_links l WHERE l.account_id = a.id)));
