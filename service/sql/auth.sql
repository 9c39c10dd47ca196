-- name: authenticate_key
-- The key's id, name, role and scopes when the presented secret is valid and not revoked.
SELECT a.id, a.name, a.role, k.sources, k.account_types, k.departments, k.rate_limit
FROM tl_authenticate_key($1, $2) a JOIN api_keys k ON k.id = a.id;

-- name: create_key
-- Stores a new service key (only the secret's hash).
INSERT INTO api_keys (id, prefix, secret_hash, name, role, created_by)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING id, prefix, name, role, created_at;

-- name: set_key_scopes
-- Narrows (or widens) what a key, by id or prefix, may charge; NULL lifts a scope. The
-- api_keys trigger tells every replica to drop the key from its cache at commit.
UPDATE api_keys SET sources = $2, account_types = $3
WHERE (id::text = $1 OR prefix = $1) AND revoked_at IS NULL
RETURNING id, prefix, name, role, sources, account_types;

-- name: set_key_limits
-- The departments a key, by id or prefix, may charge and its spend rate cap in credits per
-- minute; NULL lifts either. The api_keys trigger drops the key from every replica's cache.
UPDATE api_keys SET departments = $2, rate_limit = $3
WHERE (id::text = $1 OR prefix = $1) AND revoked_at IS NULL
RETURNING id, prefix, name, role, departments, rate_limit;

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
SELECT id, prefix, name, role, created_by, created_at, last_used_at, revoked_at, sources,
       account_types
FROM api_keys ORDER BY created_at DESC;

-- name: revoke_key
-- Revokes a key by id or prefix; returns it, or nothing if unknown.
UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp())
WHERE id::text = $1 OR prefix = $1
RETURNING id, prefix, name, role, revoked_at;
