-- The invariant checks of DESIGN.md run by `tokenledger audit`. Each query
-- returns the first violating row (or none), described in a `problem` column.

-- name: audit_1_unbalanced
-- Invariant 1: every transaction's entries sum to zero per asset.
SELECT format('transaction %s: %s entries sum to %s', tl_public_id('txn_', transaction_id), asset, sum(amount)) AS problem
FROM entries GROUP BY transaction_id, asset HAVING sum(amount) <> 0
LIMIT 1;

-- name: audit_1_too_few_entries
-- Invariant 1: a transaction has at least two entries.
SELECT format('transaction %s has %s entries', tl_public_id('txn_', t.id), count(e.id)) AS problem
FROM transactions t LEFT JOIN entries e ON e.transaction_id = t.id
GROUP BY t.id HAVING count(e.id) < 2
LIMIT 1;

-- name: audit_2_running_balance
-- Invariant 2: each entry's balance_after is the previous one plus its amount,
-- and versions rise by one from 1 (per account, per shard for system accounts).
SELECT format('account %s shard %s version %s: balance_after %s, running sum %s, expected version %s',
              a.address, x.shard, x.version, x.balance_after, x.running, x.rn) AS problem
FROM (SELECT e.account_id, e.shard, e.version, e.balance_after,
             sum(e.amount) OVER w AS running, row_number() OVER w AS rn
      FROM entries e
      WINDOW w AS (PARTITION BY e.account_id, e.shard ORDER BY e.version)) x
JOIN accounts a ON a.id = x.account_id
WHERE x.balance_after <> x.running OR x.version <> x.rn
LIMIT 1;

-- name: audit_2_posted
-- Invariant 2: an account's posted balance (and version) equal the sum (and
-- count) of its entries; for system accounts, shard by shard.
WITH sums AS (
    SELECT account_id, shard, sum(amount) AS total, count(*) AS n FROM entries GROUP BY account_id, shard)
SELECT format('account %s shard %s: posted %s, version %s, but entries sum to %s over %s',
              a.address, b.shard, b.posted, b.version, coalesce(s.total, 0), coalesce(s.n, 0)) AS problem
FROM (SELECT id AS account_id, 0 AS shard, posted, version FROM accounts WHERE shard_count = 1
      UNION ALL
      SELECT account_id, shard, posted, version FROM account_shards) b
JOIN accounts a ON a.id = b.account_id
LEFT JOIN sums s ON s.account_id = b.account_id AND s.shard = b.shard
WHERE b.posted <> coalesce(s.total, 0) OR b.version <> coalesce(s.n, 0)
LIMIT 1;

-- name: audit_2_orphan_entries
-- Invariant 2: no entry of a system account lies outside its shard rows.
SELECT format('account %s has entries on shard %s, which does not exist', a.address, e.shard) AS problem
FROM entries e JOIN accounts a ON a.id = e.account_id
WHERE (a.shard_count = 1 AND e.shard <> 0)
   OR (a.shard_count > 1 AND NOT EXISTS (
        SELECT 1 FROM account_shards s WHERE s.account_id = e.account_id AND s.shard = e.shard))
LIMIT 1;

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

-- name: audit_4_lots_cover_posted
-- Invariant 4: a lot-holding account's posted balance is the sum of its
-- lots' remaining credits (so spendable credits are exactly its live lots),
-- less what usage overdrew it by (the `overdraft` of its usage
-- transactions, spend policy), which never passes its overdraft_limit.
SELECT format('account %s: posted %s but its lots hold %s and usage overdrew it by %s (overdraft_limit %s)',
              a.address, a.posted, coalesce(l.total, 0), coalesce(o.total, 0), a.overdraft_limit) AS problem
FROM accounts a
LEFT JOIN (SELECT account_id, sum(remaining) AS total FROM lots GROUP BY account_id) l ON l.account_id = a.id
LEFT JOIN (SELECT e.account_id, sum((t.details ->> 'overdraft')::bigint) AS total
           FROM transactions t JOIN entries e ON e.transaction_id = t.id
           WHERE t.kind = 'usage' AND t.details ? 'overdraft' GROUP BY e.account_id) o ON o.account_id = a.id
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
     FROM lots WHERE status = 'voided' AND remaining > reserved LIMIT 1)) AS problem;

-- name: audit_4_lot_reserved
-- Invariant 4: an account's reserved amount is what its lots have earmarked.
SELECT format('account %s: reserved %s but its lots earmark %s', a.address, a.reserved, coalesce(l.total, 0)) AS problem
FROM accounts a
LEFT JOIN (SELECT account_id, sum(reserved) AS total FROM lots GROUP BY account_id) l ON l.account_id = a.id
WHERE a.type <> 'system' AND a.reserved <> coalesce(l.total, 0)
LIMIT 1;

-- name: audit_4_hold_earmarks
-- Invariant 4: a lot's reserved credits are exactly the holds of active
-- reservations on it.
SELECT format('lot %s: reserved %s but active holds on it sum to %s', tl_public_id('lot_', l.id), l.reserved,
              coalesce(h.total, 0)) AS problem
FROM lots l
LEFT JOIN (SELECT h.lot_id, sum(h.amount) AS total FROM reservation_holds h
           JOIN reservations r ON r.id = h.reservation_id AND r.status = 'active'
           GROUP BY h.lot_id) h ON h.lot_id = l.id
WHERE l.reserved <> coalesce(h.total, 0)
LIMIT 1;

-- name: audit_4_reservations_cover_reserved
-- Invariant 4: an account's reserved amount is the sum of its active
-- reservations, and each active reservation's holds add up to its amount.
SELECT coalesce(
    (SELECT format('account %s: reserved %s but active reservations hold %s', a.address, a.reserved,
                   coalesce(r.total, 0))
     FROM accounts a
     LEFT JOIN (SELECT account_id, sum(amount) AS total FROM reservations WHERE status = 'active'
                GROUP BY account_id) r ON r.account_id = a.id
     WHERE a.reserved <> coalesce(r.total, 0) LIMIT 1),
    (SELECT format('reservation %s: amount %s but its holds sum to %s', tl_public_id('rsv_', r.id), r.amount,
                   coalesce(sum(h.amount), 0))
     FROM reservations r LEFT JOIN reservation_holds h ON h.reservation_id = r.id
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

-- name: audit_6_usage_charged_once
-- Invariant 6: every usage transaction charges exactly the events that name
-- it, and every charged event names one transaction.
SELECT coalesce(
    (SELECT format('usage transaction %s moves %s credits but its events cost %s',
                   tl_public_id('txn_', t.id), coalesce(e.moved, 0), coalesce(u.cost, 0))
     FROM transactions t
     LEFT JOIN (SELECT transaction_id, sum(amount) AS moved FROM entries
                JOIN accounts a ON a.id = entries.account_id AND a.address = 'system:usage'
                GROUP BY transaction_id) e ON e.transaction_id = t.id
     LEFT JOIN (SELECT transaction_id, sum(cost) AS cost FROM usage_events GROUP BY transaction_id) u
            ON u.transaction_id = t.id
     WHERE t.kind = 'usage' AND coalesce(e.moved, 0) <> coalesce(u.cost, 0)
     LIMIT 1),
    (SELECT format('usage event %s/%s costs %s but no transaction charged it', source, event_id, cost)
     FROM usage_events WHERE cost > 0 AND transaction_id IS NULL AND result IS NOT NULL LIMIT 1)) AS problem;

-- name: audit_7_triggers
-- Invariant 7: the append-only triggers exist and are enabled.
SELECT format('trigger %s on %s is missing or disabled', want.tgname, want.tbl) AS problem
FROM (VALUES ('transactions_immutable', 'transactions'), ('transactions_no_truncate', 'transactions'),
             ('entries_immutable', 'entries'), ('entries_no_truncate', 'entries'),
             ('lot_movements_immutable', 'lot_movements'), ('lot_movements_no_truncate', 'lot_movements'),
             ('entries_balanced', 'entries'), ('reservations_resolve_once', 'reservations'),
             ('reservation_holds_immutable', 'reservation_holds'),
             ('chain_immutable', 'chain'), ('chain_no_truncate', 'chain')) AS want (tgname, tbl)
LEFT JOIN pg_trigger t ON t.tgname = want.tgname AND t.tgrelid = want.tbl::regclass AND t.tgenabled <> 'D'
WHERE t.oid IS NULL
LIMIT 1;

-- name: audit_7_reversals
-- Invariant 7: a reversal negates exactly the entries of the transaction it reverses.
SELECT format('reversal %s does not negate %s on account %s', tl_public_id('txn_', r.id),
              tl_public_id('txn_', r.reverses), a.address) AS problem
FROM transactions r
JOIN LATERAL (
    SELECT account_id, sum(amount) AS total FROM entries WHERE transaction_id IN (r.id, r.reverses)
    GROUP BY account_id HAVING sum(amount) <> 0) bad ON true
JOIN accounts a ON a.id = bad.account_id
WHERE r.kind = 'reversal'
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
     LEFT JOIN (SELECT transaction_id, sum(shortfall) AS shortfall FROM usage_events GROUP BY transaction_id) u
            ON u.transaction_id = t.id
     WHERE t.kind = 'usage' AND coalesce(-e.moved, 0) <> coalesce(u.shortfall, 0)
     LIMIT 1),
    (SELECT format('system:overage has entries in a %s transaction %s', t.kind, tl_public_id('txn_', t.id))
     FROM entries e JOIN accounts a ON a.id = e.account_id AND a.address = 'system:overage'
     JOIN transactions t ON t.id = e.transaction_id
     WHERE t.kind <> 'usage' LIMIT 1)) AS problem;

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
-- (its own, or its department's), so no bound account skips its checks.
SELECT format('account %s: policy_bound is %s', a.address, a.policy_bound) AS problem
FROM accounts a
WHERE a.type <> 'system' AND a.policy_bound IS DISTINCT FROM EXISTS (SELECT 1 FROM tl_policies_of(a) p)
LIMIT 1;
