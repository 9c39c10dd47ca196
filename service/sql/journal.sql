-- name: execute
-- Runs one state-changing operation under an idempotency key (tl_execute in
-- schema.sql): $1 caller, $2 key, $3 request hash, $4 op, $5 success status,
-- $6 arguments, $7 context (actor, request id, injected clock).
SELECT tl_execute($1, $2, $3, $4, $5, $6, $7);

-- name: grant_batch
-- A batch of grants, each idempotent by its own key, in one transaction.
SELECT tl_grant_batch($1, $2, $3);

-- name: transaction_json
-- One transaction with its entries and lot movements.
SELECT tl_transaction_json($1);

-- name: transactions_page
-- One page of transactions, newest first, optionally of one account and kind;
-- $3 is the cursor (a transaction id, exclusive).
SELECT t.id AS cursor, tl_transaction_json(t.id) AS item
FROM transactions t
WHERE ($1::bigint IS NULL OR EXISTS (
          SELECT 1 FROM entries e WHERE e.account_id = $1 AND e.transaction_id = t.id))
  AND ($2::text IS NULL OR t.kind = $2)
  AND ($3::uuid IS NULL OR t.id < $3)
ORDER BY t.id DESC
LIMIT $4;

-- name: lot_account
-- The address of the account holding a lot.
SELECT a.address FROM lots l JOIN accounts a ON a.id = l.account_id WHERE l.id = $1;

-- name: sweep_expired
-- Writes expiry transactions for up to $1 accounts with due lots.
SELECT tl_sweep_expired($1, $2);

-- name: purge_idempotency_keys
-- Deletes up to $2 idempotency records older than $1.
SELECT tl_purge_idempotency_keys($1, $2);
