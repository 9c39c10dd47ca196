-- name: liability_report
-- The company's liability to employees (README, Reports): per period
-- (`month`: each UTC month, cut to [from, to)) or per wallet, over wallets
-- $5 (employee ids; NULL: every employee wallet):
--   opening/outstanding  the balance at the period's start/end exactly as
--                        GET /v1/accounts/{a}/balance?at= gives it
--                        (tl_balance_at: lots expired by then count as
--                        expired even before the sweeper journals them);
--   granted   grant entries; voided   void entries (back to the funder);
--   adjusted  transfers, reversals and rollovers, net;
--   expired   expiry entries plus the change of expired-but-unjournaled
--             credits between the two instants (breakage);
--   spent     usage, debits and captures: what the wallet's balance lost
--             that no other column explains (the journal's sum identity,
--             so it needs no scan of the period's spend entries).
-- Entries count in the period (start, end] of their transaction's
-- created_at, as the balances at instants do. $1 from, $2 to, $3 true for
-- monthly periods, $4 the wallets' department as of each period's end.
-- Only non-spend transactions are read (transactions_ledger_time_idx).
WITH bounds AS MATERIALIZED (SELECT * FROM tl_report_periods($1, $2, $3)),
-- By address (accounts_address_key), one probe per id: `ref = ANY (array)`
-- compared every account with every element.
wallets AS (
    SELECT a.id, a.ref FROM unnest($5::text[]) x
    JOIN accounts a ON a.address = 'employee:' || x
    UNION ALL
    SELECT a.id, a.ref FROM accounts a WHERE $5::text[] IS NULL AND a.type = 'employee'
),
-- Wallets whose balance at an instant T of the period may differ from the
-- journal's: a lot that had expired by T but whose expiry was journaled
-- after T. Such a lot is live now with expires_at <= T (lots_live_due_idx),
-- or was expired or voided by a transaction after T
-- (transactions_ledger_time_idx). Only these pay for tl_balance_at; every
-- other wallet's balance at T is its journal balance (one index probe).
candidates AS (
    SELECT l.account_id FROM lots l
    WHERE l.status = 'active' AND l.live AND l.expires_at IS NOT NULL AND l.expires_at <= $2::timestamptz
    UNION
    SELECT l.account_id FROM transactions t
    JOIN lot_movements m ON m.transaction_id = t.id
    JOIN lots l ON l.id = m.lot_id
    WHERE t.kind NOT IN ('usage', 'debit', 'capture') AND t.kind IN ('expiry', 'void')
      AND t.created_at > $1::timestamptz AND l.expires_at <= $2::timestamptz
),
journal AS (
    SELECT w.id, w.ref, b.starts, b.ends, w.id IN (SELECT account_id FROM candidates) AS exact,
           coalesce((SELECT e.balance_after FROM entries e
                     WHERE e.account_id = w.id AND e.shard = 0 AND e.created_at <= b.starts
                     ORDER BY e.created_at DESC, e.version DESC LIMIT 1), 0) AS journal_opening,
           coalesce((SELECT e.balance_after FROM entries e
                     WHERE e.account_id = w.id AND e.shard = 0 AND e.created_at <= b.ends
                     ORDER BY e.created_at DESC, e.version DESC LIMIT 1), 0) AS journal_outstanding
    FROM wallets w CROSS JOIN bounds b
),
-- MATERIALIZED: each row's journal balances are read once. Inlined, the
-- outer SELECT's references to them (opening, outstanding, expired, spent)
-- each ran the correlated index probes again.
points AS MATERIALIZED (
    SELECT j.*,
           CASE WHEN j.exact THEN tl_balance_at(j.id, j.starts) ELSE j.journal_opening END AS opening,
           CASE WHEN j.exact THEN tl_balance_at(j.id, j.ends) ELSE j.journal_outstanding END AS outstanding
    FROM journal j
),
flows AS (
    SELECT e.account_id, b.starts,
           sum(e.amount) FILTER (WHERE t.kind = 'grant') AS granted,
           sum(e.amount) FILTER (WHERE t.kind = 'void') AS voided,
           sum(e.amount) FILTER (WHERE t.kind = 'expiry') AS expired,
           sum(e.amount) FILTER (WHERE t.kind IN ('transfer', 'reversal', 'rollover')) AS adjusted
    FROM transactions t
    JOIN entries e ON e.transaction_id = t.id
    JOIN bounds b ON t.created_at > b.starts AND t.created_at <= b.ends
    WHERE t.kind NOT IN ('usage', 'debit', 'capture')
      AND t.created_at > $1::timestamptz AND t.created_at <= $2::timestamptz
      AND e.account_id IN (SELECT id FROM wallets)
    GROUP BY e.account_id, b.starts
),
history AS (
    SELECT h.employee_id, h.department, h.since,
           coalesce(lead(h.since) OVER (PARTITION BY h.employee_id ORDER BY h.since), 'infinity') AS until
    FROM employee_departments h
    WHERE $4::boolean
)
SELECT p.ref AS employee,
       CASE WHEN $4::boolean THEN coalesce(h.department, e.department) END AS department,
       p.starts, p.ends, p.id AS account_id,
       p.opening, p.outstanding,
       coalesce(f.granted, 0) AS granted,
       -coalesce(f.voided, 0) AS voided,
       -coalesce(f.expired, 0) + (p.journal_outstanding - p.outstanding) - (p.journal_opening - p.opening) AS expired,
       coalesce(f.adjusted, 0) AS adjusted,
       p.journal_opening - p.journal_outstanding + coalesce(f.granted, 0) + coalesce(f.voided, 0)
           + coalesce(f.expired, 0) + coalesce(f.adjusted, 0) AS spent
FROM points p
LEFT JOIN flows f ON f.account_id = p.id AND f.starts = p.starts
LEFT JOIN employees e ON e.id = p.ref
LEFT JOIN history h ON h.employee_id = p.ref AND h.since <= p.ends AND p.ends < h.until
ORDER BY p.ref, p.starts;

-- name: liability_overage
-- Overage (spend beyond a wallet's balance, charged to system:overage by the
-- spend policy) per wallet and period: the system:overage entries of
-- transactions in (start, end] that also have an entry on the wallet. $1
-- from, $2 to, $3 monthly periods. Nothing while there is no system:overage
-- account. Kept apart so that its rule can change with the spend policy.
WITH bounds AS MATERIALIZED (SELECT * FROM tl_report_periods($1, $2, $3)),
overage AS (SELECT id FROM accounts WHERE address = 'system:overage')
SELECT w.account_id, b.starts, sum(o.amount)::bigint AS overage
FROM overage a
JOIN entries o ON o.account_id = a.id AND o.created_at > $1::timestamptz AND o.created_at <= $2::timestamptz
JOIN bounds b ON o.created_at > b.starts AND o.created_at <= b.ends
JOIN LATERAL (SELECT DISTINCT e.account_id FROM entries e JOIN accounts x ON x.id = e.account_id
              WHERE e.transaction_id = o.transaction_id AND x.type = 'employee') w ON true
GROUP BY w.account_id, b.starts;

-- name: compensation_report
-- Credits granted per employee and UTC month in [$1, $2), by reason, valued
-- at $4 (a numeric, the money value of one credit; exact). A reversal of a
-- grant in the period counts against the month of the reversal, under the
-- reversed grant's reason. $3 one employee or NULL for all; $5 the cursor
-- (the last employee id of the previous page), $6 the page size in
-- employees. Reads grant and reversal transactions by time
-- (transactions_ledger_time_idx), never spend.
WITH grants AS (
    SELECT a.ref AS employee,
           to_char(t.created_at AT TIME ZONE 'UTC', 'YYYY-MM') AS month,
           coalesce(t.details ->> 'reason', o.details ->> 'reason', 'unknown') AS reason,
           e.amount
    FROM transactions t
    JOIN entries e ON e.transaction_id = t.id
    JOIN accounts a ON a.id = e.account_id AND a.type = 'employee'
    LEFT JOIN transactions o ON t.kind = 'reversal' AND o.id = t.reverses
    WHERE t.kind IN ('grant', 'reversal')
      AND t.created_at >= $1::timestamptz AND t.created_at < $2::timestamptz
      AND (t.kind = 'grant' OR o.kind = 'grant')
      AND ($3::text IS NULL OR a.ref = $3)
      AND ($5::text IS NULL OR a.ref > $5)
),
page AS (
    SELECT DISTINCT employee FROM grants ORDER BY employee LIMIT $6
)
SELECT g.employee, g.month, g.reason, sum(g.amount)::bigint AS credits,
       (sum(g.amount) * $4::numeric)::text AS value
FROM grants g JOIN page p ON p.employee = g.employee
GROUP BY g.employee, g.month, g.reason
HAVING sum(g.amount) <> 0
ORDER BY g.employee, g.month, g.reason;

-- name: forecast_accounts
-- The wallets to forecast: one address ($1), or every employee wallet of a
-- department ($2) after the cursor $3, at most $4.
SELECT a.id, a.address, a.posted, a.reserved
FROM accounts a
WHERE ($1::text IS NOT NULL AND a.address = $1)
   OR ($1::text IS NULL AND a.type = 'employee' AND a.status = 'open'
       AND a.ref IN (SELECT id FROM employees WHERE department = $2)
       AND ($3::text IS NULL OR a.address > $3))
ORDER BY a.address
LIMIT $4;

-- name: forecast_inputs
-- For each account id in $1 at the instant $2: the credits spent in the
-- trailing 30 days (usage, debits, captures: the negative legs of those
-- transactions on the account) and its spendable lots in consumption
-- order (amount free now, expires_at). One index range per account.
SELECT a.id,
       coalesce((SELECT -sum(e.amount) FROM entries e JOIN transactions t ON t.id = e.transaction_id
                 WHERE e.account_id = a.id AND e.shard = 0
                   AND e.created_at > $2::timestamptz - interval '30 days' AND e.created_at <= $2::timestamptz
                   AND t.kind IN ('usage', 'debit', 'capture')), 0)::bigint AS spent_30d,
       coalesce((SELECT jsonb_agg(jsonb_build_object('amount', l.remaining - l.reserved,
                                                      'expires_at', l.expires_at)
                                   ORDER BY l.priority, l.expires_at NULLS LAST, l.effective_at, l.id)
                 FROM lots l
                 WHERE l.account_id = a.id AND l.status = 'active' AND l.live AND l.remaining > l.reserved
                   AND (l.expires_at IS NULL OR l.expires_at > $2::timestamptz)
                   AND l.effective_at <= $2::timestamptz), '[]'::jsonb) AS lots
FROM accounts a WHERE a.id = ANY ($1::bigint[]);

-- name: efficiency_report
-- Per employee or department ($3) over [$1, $2): events, tokens and
-- credits, cached input tokens, and credits at premium-tier prices (the
-- tier of the model's latest price). $4 the source service/finance.py
-- picked: 'monthly' (usage_monthly_models: whole UTC months, and no
-- employee changed department in the period or the grouping is by
-- employee), 'daily' (usage_daily: whole UTC days), or 'events'. An
-- employee's usage counts in the department they belonged to at the end of
-- the day it happened (employee_departments), not today's. Usage charged to
-- a department account counts for that department. $5 the cursor (the last
-- group key), $6 the page size.
WITH raw AS (
    SELECT m.account_id, m.model, m.month AS day, m.events, m.input_tokens, m.cached_input_tokens,
           m.output_tokens, m.credits
    FROM usage_monthly_models m
    WHERE $4::text = 'monthly'
      AND m.month >= ($1::timestamptz AT TIME ZONE 'UTC')::date
      AND m.month < ($2::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT d.account_id, d.model, d.day, d.events, d.input_tokens, d.cached_input_tokens,
           d.output_tokens, d.credits
    FROM usage_daily d
    WHERE $4::text = 'daily'
      AND d.day >= ($1::timestamptz AT TIME ZONE 'UTC')::date
      AND d.day < ($2::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT u.account_id, u.model, (u.occurred_at AT TIME ZONE 'UTC')::date, 1, u.input_tokens,
           u.cached_input_tokens, u.output_tokens, u.cost
    -- Archived events too (usage_events_all).
    FROM usage_events_all u
    WHERE $4::text = 'events' AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
),
tiers AS (
    SELECT DISTINCT ON (model) model, tier FROM prices ORDER BY model, effective_from DESC
),
-- By account and day only when departments are asked (the day picks the
-- department); by account alone otherwise.
per_account AS (
    SELECT r.account_id, CASE WHEN $3::text = 'department' THEN r.day END AS day,
           sum(r.events) AS events, sum(r.input_tokens) AS input_tokens,
           sum(r.cached_input_tokens) AS cached_input_tokens, sum(r.output_tokens) AS output_tokens,
           sum(r.credits) AS credits,
           sum(CASE WHEN t.tier = 'premium' THEN r.credits ELSE 0 END) AS premium_credits
    FROM raw r LEFT JOIN tiers t ON t.model = r.model
    GROUP BY 1, 2
),
history AS (
    SELECT h.employee_id, h.department, h.since,
           coalesce(lead(h.since) OVER (PARTITION BY h.employee_id ORDER BY h.since), 'infinity') AS until
    FROM employee_departments h
    WHERE $3::text = 'department'
),
keyed AS (
    SELECT CASE WHEN $3::text = 'employee' THEN CASE WHEN a.type = 'employee' THEN a.ref END
                WHEN a.type = 'department' THEN a.ref
                ELSE coalesce(h.department, e.department) END AS key,
           p.events, p.input_tokens, p.cached_input_tokens, p.output_tokens, p.credits, p.premium_credits
    FROM per_account p
    JOIN accounts a ON a.id = p.account_id
    LEFT JOIN history h ON a.type = 'employee' AND h.employee_id = a.ref
         AND h.since < (p.day + 1)::timestamp AT TIME ZONE 'UTC'
         AND h.until >= (p.day + 1)::timestamp AT TIME ZONE 'UTC'
    LEFT JOIN employees e ON $3::text = 'department' AND a.type = 'employee' AND e.id = a.ref
)
SELECT key, sum(events)::bigint AS events, sum(input_tokens)::bigint AS input_tokens,
       sum(cached_input_tokens)::bigint AS cached_input_tokens,
       sum(output_tokens)::bigint AS output_tokens, sum(credits)::bigint AS credits,
       sum(premium_credits)::bigint AS premium_credits
FROM keyed
WHERE key IS NOT NULL AND ($5::text IS NULL OR key COLLATE "C" > $5)
GROUP BY key
ORDER BY key COLLATE "C"
LIMIT $6;

-- name: departments_moved
-- Whether any employee changed department within [$1, $2).
SELECT EXISTS (SELECT 1 FROM employee_departments WHERE since >= $1::timestamptz AND since < $2::timestamptz);

-- name: liability_wallet_page
-- Employee ids of wallets after the cursor $1, at most $2 (liability by employee).
SELECT a.ref FROM accounts a
WHERE a.type = 'employee' AND ($1::text IS NULL OR a.ref COLLATE "C" > $1)
ORDER BY a.ref COLLATE "C"
LIMIT $2;
