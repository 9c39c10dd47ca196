-- Bookkeeping of service/migrate.py: which versioned migrations ran, and
-- which contents of schema.sql were applied. Not in schema.sql because the
-- runner needs them before anything else runs, on a database of any age.

-- name: migrate_lock
-- One migrator at a time, for the rest of its transaction (a transaction-
-- level lock: it works through pgbouncer's transaction pooling and is
-- released by COMMIT or ROLLBACK, whatever happens to the process).
SELECT pg_advisory_xact_lock($1);

-- name: migrate_bookkeeping
-- how: 'migration' (ran its file), 'schema.sql' (a fresh install, where
-- schema.sql already holds what the file does) or 'legacy' (recorded in the
-- old schema_version table).
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    how        text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS schema_applied (
    checksum   text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- name: migrate_state
-- What kind of database this is: tracked (has schema_migrations), legacy
-- (a release before versioned migrations: schema_version) or empty.
SELECT to_regclass('schema_migrations') IS NOT NULL AS tracked,
       to_regclass('schema_version') IS NOT NULL AS legacy,
       to_regclass('accounts') IS NOT NULL AS populated;

-- name: migrate_legacy_version
SELECT max(version) FROM schema_version;

-- name: migrate_applied
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: migrate_record
INSERT INTO schema_migrations (version, name, checksum, how) VALUES ($1, $2, $3, $4);

-- name: migrate_record_schema
INSERT INTO schema_applied (checksum) VALUES ($1)
ON CONFLICT (checksum) DO UPDATE SET applied_at = clock_timestamp();
