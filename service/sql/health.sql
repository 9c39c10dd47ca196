-- name: schema_version
-- The schema version the database is at.
SELECT max(version) FROM schema_version;
