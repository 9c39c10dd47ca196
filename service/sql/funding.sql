-- name: funding_report
-- Each department's funding against its spend over [$1, $2), for finance's
-- page, one row per department (every department, in id order):
--
-- `funded`: credits that transfers and grants put into the department's
-- account (department:ID) in the period, less the reversals of such
-- transfers and grants in the period. What the department hands on (its
-- grants to employees, transfers out) and what comes back to it (voids,
-- reversals of its outflows) is neither.
--
-- `spent`: credits that debit, usage and capture transactions took in the
-- period from the department's own account and from the wallets of its
-- employees, less the reversals of such transactions in the period. An
-- employee's spend counts in the department they belonged to at the end of
-- the spend's UTC day (employee_departments), as the usage report counts it.
--
-- Both by when the journal recorded them. Funding reads the department
-- accounts' own index ranges; spend reads the period's transactions
-- (transactions_created_idx) and their entries, so its cost follows the
-- period's traffic.
WITH funded AS (
    SELECT a.ref AS department, sum(e.amount) AS credits
    FROM accounts a
    JOIN entries e ON e.account_id = a.id AND e.shard = 0
        AND e.created_at >= $1::timestamptz AND e.created_at < $2::timestamptz
    JOIN transactions t ON t.id = e.transaction_id
    LEFT JOIN transactions o ON o.id = t.reverses
    WHERE a.type = 'department'
      AND ((t.kind IN ('transfer', 'grant') AND e.amount > 0)
           OR (o.kind IN ('transfer', 'grant') AND e.amount < 0))
    GROUP BY a.ref
),
legs AS (
    SELECT e.account_id, (e.created_at AT TIME ZONE 'UTC')::date AS day, -sum(e.amount) AS credits
    FROM transactions t
    LEFT JOIN transactions o ON o.id = t.reverses
    JOIN entries e ON e.transaction_id = t.id AND e.shard = 0
    WHERE t.created_at >= $1::timestamptz AND t.created_at < $2::timestamptz
      AND (t.kind IN ('debit', 'usage', 'capture') OR o.kind IN ('debit', 'usage', 'capture'))
    GROUP BY 1, 2
),
spent AS (
    SELECT CASE a.type
               WHEN 'department' THEN a.ref
               ELSE coalesce(
                   (SELECT h.department FROM employee_departments h
                    WHERE h.employee_id = a.ref
                      AND h.since < (l.day + 1)::timestamp AT TIME ZONE 'UTC'
                    ORDER BY h.since DESC LIMIT 1),
                   emp.department)
           END AS department,
           sum(l.credits) AS credits
    FROM legs l
    JOIN accounts a ON a.id = l.account_id AND a.type IN ('employee', 'department')
    LEFT JOIN employees emp ON a.type = 'employee' AND emp.id = a.ref
    GROUP BY 1
)
SELECT d.id AS department,
       coalesce(f.credits, 0)::bigint AS funded,
       coalesce(s.credits, 0)::bigint AS spent
FROM departments d
LEFT JOIN funded f ON f.department = d.id
LEFT JOIN spent s ON s.department = d.id
ORDER BY d.id COLLATE "C";
