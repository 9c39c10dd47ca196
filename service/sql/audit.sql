-- The invariant checks of DESIGN.md run by `tokenledger audit`. Each query
-- returns the first violating row (or none), described in a `problem` column.
--
-- Two forms (service/audit.py picks):
--   * `audit_N_x` is the complete check, run by `audit --full` (and by a
--     routine audit for a check that has no checkpoint yet). Each is
--     set-based over the whole history: scans joined by hash or merge and
--     aggregated once, never a per-row look-up repeated for every row of
--     history (tests/db/test_audit_plans.py asserts the plan shapes). The
--     violation is found first (a MATERIALIZED CTE with LIMIT 1) and only
--     then joined to accounts to name it.
--   * `audit_N_x__since` checks what the transactions created in [$1, $2)
--     brought (found by transactions_created_idx, then by index per new
--     row), together with the current state of accounts and live lots, which
--     grows with employees and not with history. Its cost follows new
--     traffic. A check without a __since form is already of that size.

-- name: audit_1_unbalanced
-- Invariant 1: every transaction's entries sum to zero per asset.
SELECT format('transaction %s: %s entries sum to %s', tl_public_id('txn_', transaction_id), asset, sum(amount)) AS problem
FROM entries GROUP BY transaction_id, asset HAVING sum(amount) <> 0
LIMIT 1;

-- name: audit_1_unbalanced__since
SELECT format('transaction %s: %s entries sum to %s', tl_public_id('txn_', e.transaction_id), e.asset,
              sum(e.amount)) AS problem
FROM transactions t JOIN entries e ON e.transaction_id = t.id
WHERE t.created_at >= $1 AND t.created_at < $2
GROUP BY e.transaction_id, e.asset HAVING sum(e.amount) <> 0
LIMIT 1;

-- name: audit_1_too_few_entries
-- Invariant 1: a transaction has at least two entries.
SELECT format('transaction %s has %s entries', tl_public_id('txn_', t.id), coalesce(e.n, 0)) AS problem
FROM transactions t
LEFT JOIN (SELECT transaction_id, count(*) AS n FROM entries GROUP BY transaction_id) e ON e.transaction_id = t.id
WHERE coalesce(e.n, 0) < 2
LIMIT 1;

-- name: audit_1_too_few_entries__since
SELECT format('transaction %s has %s entries', tl_public_id('txn_', t.id), count(e.id)) AS problem
FROM transactions t LEFT JOIN entries e ON e.transaction_id = t.id
WHERE t.created_at >= $1 AND t.created_at < $2
GROUP BY t.id HAVING count(e.id) < 2
LIMIT 1;

-- name: audit_2_running_balance
-- Invariant 2: each entry's balance_after is the previous one plus its amount,
-- and versions rise by one from 1 (per account, per shard for system accounts).
WITH bad AS MATERIALIZED (
    SELECT x.* FROM (
        SELECT e.account_id, e.shard, e.version, e.balance_after,
               sum(e.amount) OVER w AS running, row_number() OVER w AS rn
        FROM entries e
        WINDOW w AS (PARTITION BY e.account_id, e.shard ORDER BY e.version)) x
    WHERE x.balance_after <> x.running OR x.version <> x.rn
    LIMIT 1)
SELECT format('account %s shard %s version %s: balance_after %s, running sum %s, expected version %s',
              a.address, bad.shard, bad.version, bad.balance_after, bad.running, bad.rn) AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_2_running_balance__since
-- The same, entry by entry: a new entry is version 1 with balance_after equal
-- to its amount, or follows the entry of the version before it (by the
-- unique key) with that entry's balance_after plus its amount. With versions
-- unique, every version having its predecessor is what makes them 1..n.
WITH bad AS MATERIALIZED (
    SELECT n.account_id, n.shard, n.version, n.amount, n.balance_after, p.balance_after AS previous
    FROM transactions t
    JOIN entries n ON n.transaction_id = t.id
    LEFT JOIN entries p ON p.account_id = n.account_id AND p.shard = n.shard AND p.version = n.version - 1
    WHERE t.created_at >= $1 AND t.created_at < $2
      AND CASE WHEN n.version = 1 THEN n.balance_after <> n.amount
               ELSE p.id IS NULL OR n.balance_after <> p.balance_after + n.amount END
    LIMIT 1)
SELECT format('account %s shard %s version %s: balance_after %s, but the version before ends at %s and the amount is %s',
              a.address, bad.shard, bad.version, bad.balance_after, coalesce(bad.previous::text, 'nothing'),
              bad.amount) AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_2_posted
-- Invariant 2: an account's posted balance (and version) equal the sum (and
-- count) of its entries; for system accounts, shard by shard.
WITH sums AS (
    SELECT account_id, shard, sum(amount) AS total, count(*) AS n FROM entries GROUP BY account_id, shard),
balances AS (
    SELECT id AS account_id, 0 AS shard, posted, version FROM accounts WHERE shard_count = 1
    UNION ALL
    SELECT account_id, shard, posted, version FROM account_shards),
bad AS MATERIALIZED (
    SELECT b.account_id, b.shard, b.posted, b.version, coalesce(s.total, 0) AS total, coalesce(s.n, 0) AS n
    FROM balances b FULL JOIN sums s ON s.account_id = b.account_id AND s.shard = b.shard
    WHERE b.account_id IS NOT NULL AND (b.posted <> coalesce(s.total, 0) OR b.version <> coalesce(s.n, 0))
    LIMIT 1)
SELECT format('account %s shard %s: posted %s, version %s, but entries sum to %s over %s',
              a.address, bad.shard, bad.posted, bad.version, bad.total, bad.n) AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_2_posted__since
-- The same from the current state, one index look-up per balance row: with
-- the entries' versions verified to run 1..n with running balances (the
-- check above, on every entry once), posted must be the balance_after of the
-- entry at the row's version, and no entry may come after it.
WITH balances AS (
    SELECT id AS account_id, 0 AS shard, posted, version FROM accounts WHERE shard_count = 1
    UNION ALL
    SELECT account_id, shard, posted, version FROM account_shards),
bad AS MATERIALIZED (
    SELECT b.account_id, b.shard, b.posted, b.version, last.balance_after, after.version AS later
    FROM balances b
    -- Each look-up is by the unique key (account_id, shard, version). LIMIT
    -- keeps the subqueries from being pulled up into a plain join, where the
    -- planner could not push the shard (a constant in one branch of the
    -- union) into the index and read every entry for each balance row.
    LEFT JOIN LATERAL (
        SELECT e.id, e.balance_after FROM entries e
        WHERE e.account_id = b.account_id AND e.shard = b.shard AND e.version = b.version LIMIT 1) last ON true
    LEFT JOIN LATERAL (
        SELECT e.id, e.version FROM entries e
        WHERE e.account_id = b.account_id AND e.shard = b.shard AND e.version = b.version + 1 LIMIT 1) after
        ON true
    WHERE after.id IS NOT NULL
       OR (b.version = 0 AND b.posted <> 0)
       OR (b.version > 0 AND (last.id IS NULL OR last.balance_after <> b.posted))
    LIMIT 1)
SELECT format('account %s shard %s: posted %s at version %s, but its entry at that version ends at %s%s',
              a.address, bad.shard, bad.posted, bad.version, coalesce(bad.balance_after::text, 'nothing'),
              CASE WHEN bad.later IS NOT NULL THEN format(' and version %s follows', bad.later) ELSE '' END)
       AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_2_orphan_entries
-- Invariant 2: no entry of a system account lies outside its shard rows.
WITH bad AS MATERIALIZED (
    SELECT e.account_id, e.shard
    FROM entries e
    JOIN accounts a ON a.id = e.account_id
    LEFT JOIN account_shards s ON s.account_id = e.account_id AND s.shard = e.shard
    WHERE (a.shard_count = 1 AND e.shard <> 0) OR (a.shard_count > 1 AND s.account_id IS NULL)
    LIMIT 1)
SELECT format('account %s has entries on shard %s, which does not exist', a.address, bad.shard) AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_2_orphan_entries__since
WITH bad AS MATERIALIZED (
    SELECT e.account_id, e.shard
    FROM transactions t
    JOIN entries e ON e.transaction_id = t.id
    JOIN accounts a ON a.id = e.account_id
    LEFT JOIN account_shards s ON s.account_id = e.account_id AND s.shard = e.shard
    WHERE t.created_at >= $1 AND t.created_at < $2
      AND ((a.shard_count = 1 AND e.shard <> 0) OR (a.shard_count > 1 AND s.account_id IS NULL))
    LIMIT 1)
SELECT format('account %s has entries on shard %s, which does not exist', a.address, bad.shard) AS problem
FROM bad JOIN accounts a ON a.id = bad.account_id;

-- name: audit_3_available
-- Invariant 3: available = posted - reserved >= -overdraft_limit for bounded accounts.
SELECT format('account %s: posted %s - reserved %s is below -%s', address, posted, reserved, overdraft_limit) AS problem
FROM accounts
WHERE type <> 'system' AND posted - reserved < -overdraft_limit
LIMIT 1;

-- name: audit_4_lot_movements
-- Invariant 4: each lot's remaining is the sum of its movements.
SELECT format('lot %s: remaining %s but its movements sum to %s', tl_public_id('lot_', l.id), l.remaining,
              coalesce(m.total, 0)) AS problem
FROM lots l LEFT JOIN (SELECT lot_id, sum(amount) AS total FROM lot_movements GROUP BY lot_id) m ON m.lot_id = l.id
WHERE l.remaining <> coalesce(m.total, 0)
LIMIT 1;

-- name: audit_4_lot_movements__since
-- The same for the lots that can have changed: those moved by a new
-- transaction, and every live lot (a lot's remaining changes only with a
-- movement; a spent lot changed without one would hold credits again, and so
-- be live).
WITH touched AS (
    SELECT id FROM lots WHERE status = 'active' AND live
    UNION
    SELECT id FROM lots WHERE status = 'voided' AND live
    UNION
    SELECT m.lot_id FROM transactions t JOIN lot_movements m ON m.transaction_id = t.id
    WHERE t.created_at >= $1 AND t.created_at < $2),
bad AS MATERIALIZED (
    SELECT l.id, l.remaining, m.total
    FROM touched
    JOIN lots l ON l.id = touched.id
    CROSS JOIN LATERAL (SELECT coalesce(sum(amount), 0) AS total FROM lot_movements WHERE lot_id = l.id) m
    WHERE l.remaining <> m.total
    LIMIT 1)
SELECT format('lot %s: remaining %s but its movements sum to %s', tl_public_id('lot_', id), remaining, total)
       AS problem
FROM bad;

-- name: audit_4_settled_lots
-- A settled lot (lot_settled, which the as-of balance trusts to skip a
-- lot's movements) holds nothing now and had no movement after its
-- settled_at.
WITH moved AS (
    SELECT m.lot_id, max(t.created_at) AS moved_at
    FROM lot_movements m JOIN transactions t ON t.id = m.transaction_id
    GROUP BY m.lot_id),
bad AS MATERIALIZED (
    SELECT s.lot_id, s.settled_at, l.remaining, moved.moved_at
    FROM lot_settled s JOIN lots l ON l.id = s.lot_id LEFT JOIN moved ON moved.lot_id = s.lot_id
    WHERE l.remaining <> 0 OR moved.moved_at > s.settled_at
    LIMIT 1)
SELECT tl_settled_lot_problem(lot_id, remaining, moved_at, settled_at) AS problem FROM bad;

-- name: audit_4_settled_lots__since
-- The same for the lots moved by a new transaction and the marks of lots
-- whose last movement is new (a mark written late for an older movement is
-- left to --full).
WITH touched AS (
    SELECT m.lot_id FROM transactions t JOIN lot_movements m ON m.transaction_id = t.id
    WHERE t.created_at >= $1 AND t.created_at < $2
    UNION
    SELECT lot_id FROM lot_settled WHERE settled_at >= $1),
bad AS MATERIALIZED (
    SELECT s.lot_id, s.settled_at, l.remaining, x.moved_at
    FROM touched
    JOIN lot_settled s ON s.lot_id = touched.lot_id
    JOIN lots l ON l.id = s.lot_id
    CROSS JOIN LATERAL (SELECT max(t.created_at) AS moved_at FROM lot_movements m
                        JOIN transactions t ON t.id = m.transaction_id WHERE m.lot_id = s.lot_id) x
    WHERE l.remaining <> 0 OR x.moved_at > s.settled_at
    LIMIT 1)
SELECT tl_settled_lot_problem(lot_id, remaining, moved_at, settled_at) AS problem FROM bad;

-- name: audit_4_lots_cover_posted
-- Invariant 4: a lot-holding account's posted balance is the sum of its
-- lots' remaining credits (so spendable credits are exactly its live lots),
-- less what usage overdrew it by (the `overdraft` of its usage
-- transactions, spend policy), which never passes its overdraft_limit.
-- Only live lots hold any (live is remaining > 0), and the two partial
-- indexes of live lots find them without reading the spent ones; the usage
-- transactions that overdrew are read through their partial index
-- (transactions_overdraft_idx), not among every usage transaction: a
-- routine audit runs this check whole, and it took 78 s of one on a year of
-- 10M entries.
WITH held AS (
    SELECT account_id, sum(remaining) AS total FROM (
        SELECT account_id, remaining FROM lots WHERE status = 'active' AND live
        UNION ALL
        SELECT account_id, remaining FROM lots WHERE status = 'voided' AND live) l
    GROUP BY account_id),
overdrawn AS (
    SELECT e.account_id, sum((t.details ->> 'overdraft')::bigint) AS total
    FROM transactions t JOIN entries e ON e.transaction_id = t.id
    WHERE t.kind = 'usage' AND t.details ? 'overdraft' GROUP BY e.account_id)
SELECT format('account %s: posted %s but its lots hold %s and usage overdrew it by %s (overdraft_limit %s)',
              a.address, a.posted, coalesce(l.total, 0), coalesce(o.total, 0), a.overdraft_limit) AS problem
FROM accounts a
LEFT JOIN held l ON l.account_id = a.id
LEFT JOIN overdrawn o ON o.account_id = a.id
WHERE a.type <> 'system'
  AND (a.posted <> coalesce(l.total, 0) - coalesce(o.total, 0) OR coalesce(o.total, 0) > a.overdraft_limit)
LIMIT 1;

-- name: audit_4_closed_or_voided_holds_credits
-- Invariant 4: a closed account holds nothing, and a voided lot keeps only
-- what an active reservation holds on it (the rest went back to its funder).
SELECT coalesce(
    (SELECT format('account %s is closed but holds %s credits (%s reserved)', address, posted, reserved)
     FROM accounts WHERE status = 'closed' AND (posted <> 0 OR reserved <> 0) LIMIT 1),
    (SELECT format('voided lot %s keeps %s credits that no reservation holds', tl_public_id('lot_', id),
                   remaining - reserved)
     FROM lots WHERE status = 'voided' AND live AND remaining > reserved LIMIT 1)) AS problem;

-- name: audit_4_lot_reserved
-- Invariant 4: an account's reserved amount is what its lots have earmarked
-- (a lot earmarks at most its remaining credits, so only live lots do).
WITH earmarked AS (
    SELECT account_id, sum(reserved) AS total FROM (
        SELECT account_id, reserved FROM lots WHERE status = 'active' AND live
        UNION ALL
        SELECT account_id, reserved FROM lots WHERE status = 'voided' AND live) l
    GROUP BY account_id)
SELECT format('account %s: reserved %s but its lots earmark %s', a.address, a.reserved, coalesce(l.total, 0)) AS problem
FROM accounts a
LEFT JOIN earmarked l ON l.account_id = a.id
WHERE a.type <> 'system' AND a.reserved <> coalesce(l.total, 0)
LIMIT 1;

-- name: audit_4_hold_earmarks
-- Invariant 4: a lot's reserved credits are exactly the holds of active
-- reservations on it. Only live lots can have reserved credits, and only
-- active reservations count: both sets are found by partial indexes, so the
-- check is complete without reading spent lots or resolved reservations.
WITH holds AS (
    SELECT h.lot_id, sum(h.amount) AS total FROM reservations r
    JOIN reservation_holds h ON h.reservation_id = r.id
    WHERE r.status = 'active'
    GROUP BY h.lot_id),
candidates AS (
    SELECT id FROM lots WHERE status = 'active' AND live
    UNION
    SELECT id FROM lots WHERE status = 'voided' AND live
    UNION
    SELECT lot_id FROM holds),
bad AS MATERIALIZED (
    SELECT l.id, l.reserved, coalesce(h.total, 0) AS total
    FROM candidates c JOIN lots l ON l.id = c.id LEFT JOIN holds h ON h.lot_id = l.id
    WHERE l.reserved <> coalesce(h.total, 0)
    LIMIT 1)
SELECT format('lot %s: reserved %s but active holds on it sum to %s', tl_public_id('lot_', id), reserved, total)
       AS problem
FROM bad;

-- name: audit_4_reservations_cover_reserved
-- Invariant 4: an account's reserved amount is the sum of its active
-- reservations, and each reservation's holds add up to its amount.
SELECT coalesce(
    (SELECT format('account %s: reserved %s but active reservations hold %s', address, reserved, held)
     FROM tl_reserved_mismatches LIMIT 1),
    (SELECT format('reservation %s: amount %s but its holds sum to %s', tl_public_id('rsv_', r.id), r.amount,
                   coalesce(h.total, 0))
     FROM reservations r
     LEFT JOIN (SELECT reservation_id, sum(amount) AS total FROM reservation_holds GROUP BY reservation_id) h
            ON h.reservation_id = r.id
     WHERE r.amount <> coalesce(h.total, 0) LIMIT 1)) AS problem;

-- name: audit_4_reservations_cover_reserved__since
-- Holds are written with their reservation and never change, and neither
-- does its amount: only reservations made since need their holds summed.
SELECT coalesce(
    (SELECT format('account %s: reserved %s but active reservations hold %s', address, reserved, held)
     FROM tl_reserved_mismatches LIMIT 1),
    (SELECT format('reservation %s: amount %s but its holds sum to %s', tl_public_id('rsv_', r.id), r.amount,
                   coalesce(sum(h.amount), 0))
     FROM reservations r LEFT JOIN reservation_holds h ON h.reservation_id = r.id
     WHERE r.created_at >= $1 AND r.created_at < $2
     GROUP BY r.id HAVING r.amount <> coalesce(sum(h.amount), 0) LIMIT 1)) AS problem;

-- name: audit_5_resolved_once
-- Invariant 5: a captured reservation has exactly one capture transaction,
-- of its own amount, naming it; no capture transaction is left unclaimed.
SELECT coalesce(
    (SELECT format('reservation %s is captured by %s, which does not record it',
                   tl_public_id('rsv_', r.id), tl_public_id('txn_', r.capture_transaction_id))
     FROM reservations r JOIN transactions t ON t.id = r.capture_transaction_id
     WHERE r.status = 'captured'
       AND (t.kind <> 'capture' OR t.details ->> 'reservation_id' <> tl_public_id('rsv_', r.id))
     LIMIT 1),
    (SELECT format('capture %s resolves no reservation', tl_public_id('txn_', t.id))
     FROM transactions t LEFT JOIN reservations r ON r.capture_transaction_id = t.id
     WHERE t.kind = 'capture' AND r.id IS NULL LIMIT 1)) AS problem;

-- name: audit_5_resolved_once__since
-- The same for capture transactions created since, and for the
-- reservations that name them.
SELECT coalesce(
    (SELECT format('reservation %s is captured by %s, which does not record it',
                   tl_public_id('rsv_', r.id), tl_public_id('txn_', r.capture_transaction_id))
     FROM transactions t JOIN reservations r ON r.capture_transaction_id = t.id
     WHERE t.created_at >= $1 AND t.created_at < $2
       AND (r.status <> 'captured' OR t.kind <> 'capture'
            OR t.details ->> 'reservation_id' <> tl_public_id('rsv_', r.id))
     LIMIT 1),
    (SELECT format('capture %s resolves no reservation', tl_public_id('txn_', t.id))
     FROM transactions t LEFT JOIN reservations r ON r.capture_transaction_id = t.id
     WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind = 'capture' AND r.id IS NULL LIMIT 1)) AS problem;

-- name: audit_6_usage_charged_once
-- Invariant 6: every usage transaction charges exactly the events that name
-- it (archived ones included), and every charged event names one
-- transaction. Three aggregates joined by hash: the quadratic form of this
-- check (a nested loop over a materialized sum of every event) did not
-- finish in 11 minutes at 621k transactions.
WITH usage_account AS (SELECT id FROM accounts WHERE address = 'system:usage'),
moved AS (
    SELECT e.transaction_id, sum(e.amount) AS moved FROM entries e
    WHERE e.account_id = (SELECT id FROM usage_account) GROUP BY e.transaction_id),
cost AS (
    SELECT transaction_id, sum(cost) AS cost FROM (
        SELECT transaction_id, cost FROM usage_events WHERE transaction_id IS NOT NULL
        UNION ALL
        SELECT transaction_id, cost FROM usage_events_archive WHERE transaction_id IS NOT NULL) u
    GROUP BY transaction_id)
SELECT coalesce(
    (SELECT format('usage transaction %s moves %s credits but its events cost %s',
                   tl_public_id('txn_', t.id), coalesce(m.moved, 0), coalesce(c.cost, 0))
     FROM transactions t
     LEFT JOIN moved m ON m.transaction_id = t.id
     LEFT JOIN cost c ON c.transaction_id = t.id
     WHERE t.kind = 'usage' AND coalesce(m.moved, 0) <> coalesce(c.cost, 0)
     LIMIT 1),
    (SELECT format('usage event %s/%s costs %s but no transaction charged it', source, event_id, cost)
     FROM usage_events WHERE cost > 0 AND transaction_id IS NULL AND result IS NOT NULL LIMIT 1),
    -- No foreign key checks an event's transaction (see usage_events in schema.sql).
    (SELECT format('usage event %s/%s names transaction %s, which does not exist',
                   u.source, u.event_id, tl_public_id('txn_', u.transaction_id))
     FROM usage_events u LEFT JOIN transactions t ON t.id = u.transaction_id
     WHERE u.transaction_id IS NOT NULL AND t.id IS NULL LIMIT 1)) AS problem;

-- name: audit_6_usage_charged_once__since
-- The same for usage transactions created since (their events by
-- usage_events_transaction_idx). An uncharged event is refused by the
-- usage_events_charged constraint; the index on transaction_id finds the
-- events without one too.
SELECT coalesce(
    (SELECT format('usage transaction %s moves %s credits but its events cost %s',
                   tl_public_id('txn_', t.id), m.moved, c.cost)
     FROM transactions t
     CROSS JOIN LATERAL (
         SELECT coalesce(sum(e.amount), 0) AS moved FROM entries e JOIN accounts a ON a.id = e.account_id
         WHERE e.transaction_id = t.id AND a.address = 'system:usage') m
     CROSS JOIN LATERAL (
         SELECT coalesce(sum(cost), 0) AS cost FROM (
             SELECT cost FROM usage_events WHERE transaction_id = t.id
             UNION ALL
             SELECT cost FROM usage_events_archive WHERE transaction_id = t.id) u) c
     WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind = 'usage' AND m.moved <> c.cost
     LIMIT 1),
    (SELECT format('usage event %s/%s costs %s but no transaction charged it', source, event_id, cost)
     FROM usage_events WHERE transaction_id IS NULL AND cost > 0 AND result IS NOT NULL LIMIT 1),
    -- Events claimed since (their uuid7 ids by the primary key) whose
    -- transaction does not exist.
    (SELECT format('usage event %s/%s names transaction %s, which does not exist',
                   u.source, u.event_id, tl_public_id('txn_', u.transaction_id))
     FROM usage_events u
     WHERE u.id >= tl_uuid7_floor($1) AND u.id < tl_uuid7_floor($2 + interval '1 millisecond')
       AND u.transaction_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.id = u.transaction_id)
     LIMIT 1)) AS problem;

-- name: audit_7_triggers
-- Invariant 7: the append-only triggers exist and are enabled.
SELECT format('trigger %s on %s is missing or disabled', want.tgname, want.tbl) AS problem
FROM (VALUES ('transactions_immutable', 'transactions'), ('transactions_no_truncate', 'transactions'),
             ('entries_immutable', 'entries'), ('entries_no_truncate', 'entries'),
             ('lot_movements_immutable', 'lot_movements'), ('lot_movements_no_truncate', 'lot_movements'),
             ('entries_balanced', 'entries'), ('reservations_resolve_once', 'reservations'),
             ('reservation_holds_immutable', 'reservation_holds'),
             ('chain_immutable', 'chain'), ('chain_no_truncate', 'chain'),
             ('usage_events_refs', 'usage_events')) AS want (tgname, tbl)
LEFT JOIN pg_trigger t ON t.tgname = want.tgname AND t.tgrelid = want.tbl::regclass AND t.tgenabled <> 'D'
WHERE t.oid IS NULL
LIMIT 1;

-- name: audit_7_reversals
-- Invariant 7: a reversal negates exactly the entries of the transaction it
-- reverses: the entries of both, summed per (reversal, account), are zero.
WITH legs AS (
    SELECT id AS transaction_id, id AS reversal FROM transactions WHERE kind = 'reversal'
    UNION ALL
    SELECT reverses, id FROM transactions WHERE kind = 'reversal'),
bad AS MATERIALIZED (
    SELECT l.reversal, e.account_id
    FROM legs l JOIN entries e ON e.transaction_id = l.transaction_id
    GROUP BY l.reversal, e.account_id HAVING sum(e.amount) <> 0
    LIMIT 1)
SELECT format('reversal %s does not negate %s on account %s', tl_public_id('txn_', r.id),
              tl_public_id('txn_', r.reverses), a.address) AS problem
FROM bad JOIN transactions r ON r.id = bad.reversal JOIN accounts a ON a.id = bad.account_id;

-- name: audit_7_reversals__since
SELECT format('reversal %s does not negate %s on account %s', tl_public_id('txn_', r.id),
              tl_public_id('txn_', r.reverses), a.address) AS problem
FROM transactions r
JOIN LATERAL (
    SELECT account_id, sum(amount) AS total FROM entries WHERE transaction_id IN (r.id, r.reverses)
    GROUP BY account_id HAVING sum(amount) <> 0) bad ON true
JOIN accounts a ON a.id = bad.account_id
WHERE r.created_at >= $1 AND r.created_at < $2 AND r.kind = 'reversal'
LIMIT 1;

-- name: audit_8_program_grants
-- Invariant 8: a grant program issues one grant per (program, cycle,
-- employee): program_grants (whose primary key is that triple) names each
-- one's transaction and lot, which must be a `grant` of its amount into that
-- employee's wallet; and every program grant transaction is named there once.
SELECT problem FROM (
    SELECT format('program grant %s/%s/%s does not match its lot or transaction',
                  g.program_id, g.cycle, g.employee_id) AS problem
    FROM program_grants g
    LEFT JOIN lots l ON l.id = g.lot_id
    LEFT JOIN accounts a ON a.id = l.account_id
    LEFT JOIN transactions t ON t.id = g.transaction_id
    WHERE l.id IS NULL OR t.id IS NULL OR a.address <> 'employee:' || g.employee_id
       OR l.amount <> g.amount OR l.grant_transaction_id <> g.transaction_id OR t.kind <> 'grant'
       OR t.details ->> 'program' IS DISTINCT FROM g.program_id
       OR t.details ->> 'cycle' IS DISTINCT FROM g.cycle
    UNION ALL
    SELECT format('transaction %s grants for program %s cycle %s but is not its recorded grant',
                  tl_public_id('txn_', t.id), t.details ->> 'program', t.details ->> 'cycle')
    FROM transactions t
    WHERE t.kind = 'grant' AND t.details ? 'program'
      AND NOT EXISTS (SELECT 1 FROM program_grants g WHERE g.transaction_id = t.id)
) x
LIMIT 1;

-- name: audit_9_overage
-- Spend policy: system:overage carries exactly the shortfalls of the usage
-- events (what no wallet could cover), each in the transaction that charged
-- the event; and an event's shortfall is at most its cost.
SELECT coalesce(
    (SELECT format('usage transaction %s charges %s to system:overage but its events have a shortfall of %s',
                   tl_public_id('txn_', t.id), coalesce(-e.moved, 0), coalesce(u.shortfall, 0))
     FROM transactions t
     LEFT JOIN (SELECT transaction_id, sum(amount) AS moved FROM entries
                JOIN accounts a ON a.id = entries.account_id AND a.address = 'system:overage'
                GROUP BY transaction_id) e ON e.transaction_id = t.id
     LEFT JOIN (SELECT transaction_id, sum(shortfall) AS shortfall FROM (
                    SELECT transaction_id, shortfall FROM usage_events
                    UNION ALL
                    SELECT transaction_id, shortfall FROM usage_events_archive) ue
                GROUP BY transaction_id) u
            ON u.transaction_id = t.id
     WHERE t.kind = 'usage' AND coalesce(-e.moved, 0) <> coalesce(u.shortfall, 0)
     LIMIT 1),
    (SELECT format('system:overage has entries in a %s transaction %s', t.kind, tl_public_id('txn_', t.id))
     FROM entries e JOIN accounts a ON a.id = e.account_id AND a.address = 'system:overage'
     JOIN transactions t ON t.id = e.transaction_id
     WHERE t.kind <> 'usage' LIMIT 1)) AS problem;

-- name: audit_9_overage__since
-- The same for the transactions created since the checkpoint ($1 to $2),
-- each reached by its own keys (transactions_created_idx, then its entries
-- and events by transaction id).
SELECT coalesce(
    (SELECT format('usage transaction %s charges %s to system:overage but its events have a shortfall of %s',
                   tl_public_id('txn_', t.id), coalesce(-e.moved, 0), coalesce(u.shortfall, 0))
     FROM transactions t
     LEFT JOIN LATERAL (
         SELECT sum(en.amount) AS moved FROM entries en
         JOIN accounts a ON a.id = en.account_id AND a.address = 'system:overage'
         WHERE en.transaction_id = t.id) e ON true
     LEFT JOIN LATERAL (
         SELECT sum(ue.shortfall) AS shortfall FROM (
             SELECT shortfall FROM usage_events WHERE transaction_id = t.id
             UNION ALL
             SELECT shortfall FROM usage_events_archive WHERE transaction_id = t.id) ue) u ON true
     WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind = 'usage'
       AND coalesce(-e.moved, 0) <> coalesce(u.shortfall, 0)
     LIMIT 1),
    (SELECT format('system:overage has entries in a %s transaction %s', t.kind, tl_public_id('txn_', t.id))
     FROM transactions t
     JOIN entries en ON en.transaction_id = t.id
     JOIN accounts a ON a.id = en.account_id AND a.address = 'system:overage'
     WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind <> 'usage' LIMIT 1)) AS problem;

-- name: audit_9_policy_windows
-- Spend policy: every window's spend row of a bound account equals what
-- the journal says was spent in it (debits and usage at their instant, less
-- reversed debits; reservations made in it, active at their amount and
-- captured at what was captured), and rows exist only for bound accounts,
-- so a department limit's sum of its members' rows is exact.
SELECT format('account %s: %s window from %s (%s) counts %s spent, the journal %s',
              a.address, s.period, tl_ts(s.starts_at), s.time_zone, s.spent,
              tl_journal_spend(s.account_id, s.starts_at, tl_window_end(s.period, s.time_zone, s.starts_at)))
       AS problem
FROM policy_spend s JOIN accounts a ON a.id = s.account_id
WHERE NOT a.policy_bound
   OR s.spent <> tl_journal_spend(s.account_id, s.starts_at, tl_window_end(s.period, s.time_zone, s.starts_at))
LIMIT 1;

-- name: audit_9_policy_bound
-- Spend policy: an account is marked bound exactly when a policy binds it
-- (its own, or its department's), so no bound account skips its checks;
-- and its resolved limits (policy_links, what a coalesced batch checks)
-- are exactly its policies' limits, in check order.
SELECT problem FROM (
    SELECT format('account %s: policy_bound is %s', a.address, a.policy_bound) AS problem
    FROM accounts a
    WHERE a.type <> 'system' AND a.policy_bound IS DISTINCT FROM EXISTS (SELECT 1 FROM tl_policies_of(a) p)
    UNION ALL
    SELECT format('account %s: policy_links %s, its policies %s', a.address, coalesce(x.stored::text, 'none'),
                  coalesce(x.resolved::text, 'none'))
    FROM accounts a
    -- Each side as the JSON array of its rows in rank order (NULL when none):
    -- the same columns, stored and resolved anew.
    CROSS JOIN LATERAL (
        SELECT (SELECT jsonb_agg(to_jsonb(r) ORDER BY r.rank) FROM (
                    SELECT pl.own_department, pl.owner, pl.ord, pl.department, pl.period, pl.time_zone,
                           pl.amount, pl.hard, pl.rank
                      FROM policy_links pl WHERE pl.account_id = a.id) r) AS stored,
               (SELECT jsonb_agg(to_jsonb(r) ORDER BY r.rank) FROM (
                    SELECT tl_policy_department(a) AS own_department, l.owner, l.ord, l.department, l.period,
                           l.time_zone, l.amount, l.hard, l.rank
                      FROM tl_policy_links_of(a) l WHERE a.policy_bound) r) AS resolved) x
    WHERE (a.policy_bound OR x.stored IS NOT NULL) AND x.stored IS DISTINCT FROM x.resolved
) p
LIMIT 1;
-- name: audit_8_program_grants__since
-- The same for the grant transactions created since and the program grants
-- that name them (program_grants_transaction_idx).
SELECT problem FROM (
    SELECT format('program grant %s/%s/%s does not match its lot or transaction',
                  g.program_id, g.cycle, g.employee_id) AS problem
    FROM transactions t
    JOIN program_grants g ON g.transaction_id = t.id
    LEFT JOIN lots l ON l.id = g.lot_id
    LEFT JOIN accounts a ON a.id = l.account_id
    WHERE t.created_at >= $1 AND t.created_at < $2
      AND (l.id IS NULL OR a.address <> 'employee:' || g.employee_id
       OR l.amount <> g.amount OR l.grant_transaction_id <> g.transaction_id OR t.kind <> 'grant'
       OR t.details ->> 'program' IS DISTINCT FROM g.program_id
       OR t.details ->> 'cycle' IS DISTINCT FROM g.cycle)
    UNION ALL
    SELECT format('transaction %s grants for program %s cycle %s but is not its recorded grant',
                  tl_public_id('txn_', t.id), t.details ->> 'program', t.details ->> 'cycle')
    FROM transactions t
    WHERE t.created_at >= $1 AND t.created_at < $2 AND t.kind = 'grant' AND t.details ? 'program'
      AND NOT EXISTS (SELECT 1 FROM program_grants g WHERE g.transaction_id = t.id)
) x
LIMIT 1;

-- name: audit_checkpoints
-- Every check's checkpoint (and the chain's), as the audit left them.
SELECT check_name, verified_to, chain_seq, chain_hash FROM audit_checkpoints;

-- name: audit_cutoff
-- The instant below which every transaction has committed: the snapshot's
-- start less $1 (an interval longer than statement_timeout, as for the
-- chainer), so no row created before it can still appear.
SELECT now() - $1::interval;

-- name: audit_checkpoint_save
-- Advances a check's checkpoint to $2 (never backwards).
INSERT INTO audit_checkpoints AS c (check_name, verified_to) VALUES ($1, $2)
ON CONFLICT (check_name) DO UPDATE SET verified_to = greatest(c.verified_to, EXCLUDED.verified_to),
    verified_at = clock_timestamp();

-- name: audit_chain_checkpoint_save
-- Records the last chain row verified ($1 seq, $2 chain_hash).
INSERT INTO audit_checkpoints AS c (check_name, chain_seq, chain_hash) VALUES ('chain', $1, $2)
ON CONFLICT (check_name) DO UPDATE SET chain_seq = EXCLUDED.chain_seq, chain_hash = EXCLUDED.chain_hash,
    verified_at = clock_timestamp()
WHERE c.chain_seq <= EXCLUDED.chain_seq;
