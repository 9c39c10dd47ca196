-- The hash chain of transactions (README, Tamper evidence; tl_chain_pending
-- and tl_canonical in schema.sql).

-- name: chain_pending
-- Appends up to $1 transactions created more than $2 (an interval) ago to
-- the chain; $3 also takes stragglers from all history. Returns how many;
-- 0 at once when another connection is chaining.
SELECT tl_chain_pending($1, $2, $3);

-- name: chain_head
-- The last row of the chain (none when empty).
SELECT seq, transaction_id, chain_hash FROM chain ORDER BY seq DESC LIMIT 1;

-- name: chain_verify_batch
-- Up to $2 chain rows after seq $1, each with its transaction's created_at
-- and its content hash recomputed from the transaction as it is now (both
-- NULL when the transaction is gone).
WITH c AS (
    SELECT seq, transaction_id, content_hash, prev_hash, chain_hash FROM chain
    WHERE seq > $1 ORDER BY seq LIMIT $2)
SELECT c.seq, c.transaction_id, c.content_hash, c.prev_hash, c.chain_hash, t.created_at,
       sha256(convert_to(k.canonical, 'UTF8')) AS recomputed
FROM c
LEFT JOIN tl_canonical_many((SELECT array_agg(transaction_id) FROM c)) k ON k.transaction_id = c.transaction_id
LEFT JOIN transactions t ON t.id = c.transaction_id
ORDER BY c.seq;

-- name: chain_row
-- One chain row by seq, with its transaction's created_at.
SELECT c.seq, c.chain_hash, t.created_at FROM chain c LEFT JOIN transactions t ON t.id = c.transaction_id
WHERE c.seq = $1;

-- name: chain_row_verified
-- The last chain row `audit --verify-chain` verified (none before the first).
SELECT chain_seq, chain_hash FROM audit_checkpoints WHERE check_name = 'chain';

-- name: chain_unchained_before
-- The first transaction created before $1 (and not before $2, when given:
-- a routine verification looks only after its checkpoint) that is not chained.
SELECT t.id, t.created_at FROM transactions t
WHERE t.created_at < $1 AND ($2::timestamptz IS NULL OR t.created_at >= $2)
  AND NOT EXISTS (SELECT 1 FROM chain c WHERE c.transaction_id = t.id)
ORDER BY t.created_at, t.id
LIMIT 1;

-- name: chain_lagging
-- The first transaction not chained although the newest transaction is more
-- than $1 (an interval) newer: the chainer is stuck or not running. Measured
-- against the newest transaction rather than the clock, so that a restored
-- copy of the database verifies the same as the original did.
SELECT t.id, t.created_at FROM transactions t
WHERE t.created_at < (SELECT max(created_at) FROM transactions) - $1::interval
  AND ($2::timestamptz IS NULL OR t.created_at >= $2)
  AND NOT EXISTS (SELECT 1 FROM chain c WHERE c.transaction_id = t.id)
ORDER BY t.created_at, t.id
LIMIT 1;

-- name: chain_pending_count
-- Transactions not chained yet, and the oldest one's created_at.
SELECT count(*) AS n, min(t.created_at) AS oldest FROM transactions t
WHERE NOT EXISTS (SELECT 1 FROM chain c WHERE c.transaction_id = t.id);

-- name: chain_function_source
-- The body of the function that the signature $1 resolves to here (NULL
-- when none does).
SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure($1);
