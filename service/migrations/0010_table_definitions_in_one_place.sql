-- schema.sql read as a book (issue 18): every table is defined in one
-- CREATE TABLE, so the columns and constraints that schema.sql used to add
-- with ALTER TABLE after the fact, and the old functions it dropped, are
-- upgraded here. Safe on any database this release migrates: everything is
-- conditional, and a table that does not exist yet (outbox, on a release-7
-- database) is created whole by schema.sql, which runs after this.

-- Spend policy (issue 12) and alerts (issue 14) on accounts.
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS policy_bound boolean NOT NULL DEFAULT false;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS low_alert_armed bigint;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS low_alert_rearm bigint;

-- Usage events: overage and model violations (issue 12); the per-row
-- foreign keys of databases made before the set-based checks replaced them.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS shortfall bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS violation text;
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_account_id_fkey,
                         DROP CONSTRAINT IF EXISTS usage_events_price_id_fkey,
                         DROP CONSTRAINT IF EXISTS usage_events_transaction_id_fkey;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'usage_events_shortfall_within_cost') THEN
        ALTER TABLE usage_events ADD CONSTRAINT usage_events_shortfall_within_cost
            CHECK (shortfall BETWEEN 0 AND cost);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'usage_events_violation_valid') THEN
        ALTER TABLE usage_events ADD CONSTRAINT usage_events_violation_valid
            CHECK (violation IS NULL OR violation = 'model_not_allowed');
    END IF;
END $$;

-- Service key scopes and rate caps (issue 11).
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS sources text[];
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS account_types text[];
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS departments text[];
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rate_limit bigint;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'api_keys_account_types_valid') THEN
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_account_types_valid
            CHECK (account_types <@ ARRAY['employee', 'department']::text[]);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'api_keys_rate_limit_positive') THEN
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_rate_limit_positive CHECK (rate_limit > 0);
    END IF;
END $$;

-- The webhook dispatcher's mark (issue 14), on an outbox made before it.
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS fanned_out_at timestamptz;

-- Functions replaced by others of another signature.
DROP FUNCTION IF EXISTS tl_lot_json(uuid);
DROP FUNCTION IF EXISTS tl_program_run(text, text, text, text, jsonb);
DROP FUNCTION IF EXISTS tl_policy_batchable(accounts);
DROP FUNCTION IF EXISTS tl_policy_batch_limits(bigint[], timestamptz);
DROP FUNCTION IF EXISTS tl_policy_batch_count(bigint[], bigint[], timestamptz);
DROP FUNCTION IF EXISTS tl_grant_created() CASCADE;
