-- name: schema_state
-- The newest migration the database has and whether the given content of
-- schema.sql has been applied to it (ever: a replica of the previous release
-- stays ready while the next one rolls out). Readiness (/readyz) and
-- `tokenledger migrate` both ask it (service/migrate.py).
SELECT (SELECT max(version) FROM schema_migrations) AS version,
       EXISTS (SELECT 1 FROM schema_applied WHERE checksum = $1) AS schema_applied;

-- name: session_timeouts
-- The timeouts a server connection runs with (behind pgbouncer they come
-- from the role's defaults; db.check_pooled_timeouts).
SELECT current_setting('statement_timeout') AS statement_timeout,
       current_setting('lock_timeout') AS lock_timeout,
       current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction_session_timeout;
