-- name: account_id
-- The internal id of an account by address (null when there is none).
SELECT id FROM accounts WHERE address = $1;

-- name: account_json
-- The balance view of an account at an instant (null clock = now).
SELECT tl_account_json(a.id, coalesce($2::timestamptz, clock_timestamp()))
FROM accounts a WHERE a.address = $1;

-- name: account_entries
-- One page of an account's entries, newest first, within [from, to): $2 is
-- the cursor (an entry id, exclusive; NULL for the first page), $3/$4 bound
-- created_at. The cursor is an index condition on entries_account_idx, so a
-- page starts where the last one ended however deep it is; the time bounds
-- filter what that index walk finds.
SELECT e.id AS cursor, tl_entry_json(e, t) AS item
FROM entries e JOIN transactions t ON t.id = e.transaction_id
WHERE e.account_id = $1
  AND e.id < coalesce($2::bigint, 9223372036854775807)
  AND ($3::timestamptz IS NULL OR e.created_at >= $3)
  AND ($4::timestamptz IS NULL OR e.created_at < $4)
ORDER BY e.id DESC
LIMIT $5;

-- name: account_entries_latest
-- The same page without time bounds, the common case (a wallet's history):
-- a keyset read of entries_account_idx, (account_id, id DESC) from the
-- cursor ($2, exclusive; NULL for the first page), $3 rows and no more.
-- With the time bounds' "IS NULL OR" in the statement, a cached generic
-- plan could not tell this page from a narrow time range, and filtered the
-- cursor instead of starting at it: a page deep in a heavy user's history
-- read every newer entry first.
SELECT e.id AS cursor, tl_entry_json(e, t) AS item
FROM entries e JOIN transactions t ON t.id = e.transaction_id
WHERE e.account_id = $1
  AND e.id < coalesce($2::bigint, 9223372036854775807)
ORDER BY e.id DESC
LIMIT $3;

-- name: balance_at
-- The posted balance of an account as of an instant.
SELECT tl_balance_at($1, $2);

-- name: balance_series
-- The posted balance at the end of each interval from $2 to $3, every $4:
-- tl_balance_at's answer at each point, computed in one pass (schema.sql,
-- "Balance series").
SELECT s.at, s.posted
FROM tl_balance_series($1, $2::timestamptz, $3::timestamptz, $4::interval) s
ORDER BY s.at;

-- name: account_lots
-- Live lots of an account in consumption order (pending ones included).
SELECT tl_lot_json(l.id, $2::timestamptz)
FROM lots l
WHERE l.account_id = $1 AND l.status = 'active' AND l.live
  AND (l.expires_at IS NULL OR l.expires_at > coalesce($2::timestamptz, clock_timestamp()))
ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id
OFFSET $3 LIMIT $4;
