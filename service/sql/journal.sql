-- name: execute
-- Runs one state-changing operation under an idempotency key (tl_execute in
-- schema.sql): $1 caller, $2 key, $3 request hash, $4 op, $5 success status,
-- $6 arguments, $7 context (actor, request id, injected clock).
SELECT tl_execute($1, $2, $3, $4, $5, $6, $7);

-- name: execute_batch
-- Runs coalesced operations in one transaction (tl_execute_batch): $1..$7
-- are arrays of tl_execute's first seven arguments, one element per item.
SELECT tl_execute_batch($1, $2, $3, $4, $5, $6, $7);

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

-- name: analyze_grown
-- Analyzes the hot tables that at least doubled since their last analysis
-- (tl_analyze_grown); returns their names.
SELECT tl_analyze_grown();

-- name: settle_lots
-- Marks the lots that hold nothing among those moved by up to $1 movement
-- ids after the last mark (lot_settled); returns how many ids it covered.
SELECT tl_settle_lots($1);

-- name: archive_usage_events
-- Moves up to $2 usage events that occurred and were recorded before $1 to
-- usage_events_archive; returns how many.
SELECT tl_archive_usage_events($1, $2);

-- name: reservation_json
-- One reservation as of an instant (null clock = now).
SELECT tl_reservation_json($1, coalesce($2::timestamptz, clock_timestamp()));

-- name: reservation_account
-- The address of the account a reservation holds credits of.
SELECT a.address FROM reservations r JOIN accounts a ON a.id = r.account_id WHERE r.id = $1;

-- name: account_reservations
-- One page of an account's reservations, newest first, optionally by
-- status as seen at $5 (a reservation past expires_at reads as expired).
SELECT r.id AS cursor, tl_reservation_json(r.id, coalesce($5::timestamptz, clock_timestamp())) AS item
FROM reservations r
WHERE r.account_id = $1
  AND ($3::uuid IS NULL OR r.id < $3)
  AND ($2::text IS NULL OR $2 = CASE WHEN r.status = 'active'
                                      AND r.expires_at <= coalesce($5::timestamptz, clock_timestamp())
                                     THEN 'expired' ELSE r.status END)
ORDER BY r.id DESC
LIMIT $4;

-- name: active_reservations
-- How many reservations hold credits right now (a gauge).
SELECT count(*) FROM reservations WHERE status = 'active' AND expires_at > clock_timestamp();

-- name: record_usage
-- Records one usage event (idempotent by source and event id): {status, body}.
SELECT tl_record_usage($1, $2);

-- name: record_usage_batch
-- Records up to 1000 usage events set-based in one transaction: {results}.
SELECT tl_record_usage_batch($1, $2);
