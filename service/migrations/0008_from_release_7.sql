-- From schema version 7 (the last release whose schema.sql upgraded itself
-- in place) to the first versioned migration: everything that schema.sql did
-- with ALTERs and DROPs on existing tables since then. Written to be safe on
-- any "version 7" database, including those built from schema.sql between
-- that release and this one, which have some of it already.
-- Tables, types and functions that are new since then come from schema.sql,
-- which runs after this.

-- Balances stay within ±2^62 (accounts_posted_within_limit).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'accounts_posted_within_limit') THEN
        ALTER TABLE accounts ADD CONSTRAINT accounts_posted_within_limit
            CHECK (posted BETWEEN -4611686018427387904 AND 4611686018427387904);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'account_shards_posted_within_limit') THEN
        ALTER TABLE account_shards ADD CONSTRAINT account_shards_posted_within_limit
            CHECK (posted BETWEEN -4611686018427387904 AND 4611686018427387904);
    END IF;
END $$;

-- entries_account_idx serves what this index did.
DROP INDEX IF EXISTS entries_account_transaction_idx;

-- Lots: the generated `live` column and partial indexes on it (HOT updates),
-- replacing the indexes on remaining > 0; schema.sql creates the new ones.
ALTER TABLE lots ADD COLUMN IF NOT EXISTS live boolean GENERATED ALWAYS AS (remaining > 0) STORED;
ALTER TABLE lots SET (fillfactor = 80);
DROP INDEX IF EXISTS lots_consumption_idx;
DROP INDEX IF EXISTS lots_due_idx;
DROP INDEX IF EXISTS lots_voided_held_idx;

ALTER TABLE idempotency_keys SET (fillfactor = 10);

-- usage_events' references are checked at commit (a catalog change only; no
-- row is checked again).
DO $$
DECLARE
    v_name text;
BEGIN
    FOR v_name IN
        SELECT c.conname FROM pg_constraint c JOIN pg_attribute a
            ON a.attrelid = c.conrelid AND c.conkey = ARRAY[a.attnum]
        WHERE c.conrelid = 'usage_events'::regclass AND c.contype = 'f' AND NOT c.condeferred
          AND a.attname IN ('account_id', 'transaction_id')
    LOOP
        EXECUTE format('ALTER TABLE usage_events ALTER CONSTRAINT %I DEFERRABLE INITIALLY DEFERRED', v_name);
    END LOOP;
END $$;

-- schema_migrations (service/migrate.py) replaces the version table.
DROP TABLE IF EXISTS schema_version;
