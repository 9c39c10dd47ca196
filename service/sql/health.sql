-- name: schema_state
-- The newest migration the database has and whether the given content of
-- schema.sql has been applied to it (service/migrate.py).
SELECT (SELECT max(version) FROM schema_migrations) AS version,
       EXISTS (SELECT 1 FROM schema_applied WHERE checksum = $1) AS schema_applied;
