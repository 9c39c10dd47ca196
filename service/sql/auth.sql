-- name: authenticate_key
-- The key's id, name and role when the presented secret is valid and not revoked.
SELECT id, name, role FROM tl_authenticate_key($1, $2);

-- name: create_key
-- Stores a new service key (only the secret's hash).
INSERT INTO api_keys (id, prefix, secret_hash, name, role, created_by)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id, prefix, name, role, created_at;

-- name: ensure_key
-- Stores a key given in configuration unless it already exists, and revokes
-- every other key that configuration made before ($6 is their created_by):
-- changing the configured key takes the old one out.
WITH revoked AS (
    UPDATE api_keys SET revoked_at = clock_timestamp()
    WHERE created_by = $6 AND prefix <> $2 AND revoked_at IS NULL
    RETURNING id)
INSERT INTO api_keys (id, prefix, secret_hash, name, role, created_by)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (prefix) DO NOTHING;

-- name: list_keys
-- Every key, newest first, without secrets.
SELECT id, prefix, name, role, created_by, created_at, last_used_at, revoked_at
FROM api_keys ORDER BY created_at DESC;

-- name: revoke_key
-- Revokes a key by id or prefix; returns it, or nothing if unknown.
UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp())
WHERE id::text = $1 OR prefix = $1
RETURNING id, prefix, name, role, revoked_at;
