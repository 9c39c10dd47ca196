-- name: usage_export
-- GET /v1/reports/usage?group_by=employee,model,project over a period whose
-- roll-ups are whole UTC months (service/reports.py, export_span): the same
-- rows as usage_report (service/sql/reports.sql) for those keys, already
-- written, one `line` (bytea, UTF-8) per group in the answer's order: with
-- $5 = 'json' the item as a JSON object (the keys, then the totals), with
-- $5 = 'csv' the CSV row (tl_csv_cell, then the totals, CRLF), so the
-- service copies bytes and decodes no row.
--
-- $1, $2: the period [from, to); $3, $4: the UTC month starts whose
-- roll-ups answer it (usage_span: $1 and $2 themselves, or their nearest
-- midnights), each end corrected by the events and the journal's debits and
-- captures between bound and midnight exactly as in usage_report (its header
-- says why that is exact).
--
-- Why not usage_report: it aggregates the roll-up rows by account, then
-- again by the answer's keys, then sorts: for a month of 10,000 employees,
-- a third of a million groups hashed twice (spilling to disk) and sorted
-- (an external merge) before the first row comes out. Here the employee
-- accounts are walked in byte order of their ids (accounts_employee_ref_idx)
-- and each one's roll-up rows read by their keys (usage_monthly's primary
-- key, spend_monthly_key_idx), a few dozen rows sorted per employee
-- (Incremental Sort). The accounts that are not an employee's (employee
-- null: last) and the corrections are few rows, sorted apart; a Merge Append
-- of the three feeds one GroupAggregate, which sums the months and the
-- corrections of each group and needs no hash and no sort of the whole.
SELECT CASE WHEN $5::text = 'csv'
            THEN convert_to(concat_ws(',', tl_csv_cell(t.employee), tl_csv_cell(t.model),
                                      tl_csv_cell(t.project), t.events, t.input_tokens,
                                      t.cached_input_tokens, t.output_tokens, t.credits,
                                      t.overage, t.violations, t.debits, t.debit_credits)
                            || E'\r\n', 'UTF8')
            ELSE convert_to(row_to_json(t)::text, 'UTF8')
       END AS line
FROM (
    SELECT g.employee, g.model, g.project,
           sum(g.events)::bigint AS events,
           sum(g.input_tokens)::bigint AS input_tokens,
           sum(g.cached_input_tokens)::bigint AS cached_input_tokens,
           sum(g.output_tokens)::bigint AS output_tokens,
           sum(g.credits)::bigint AS credits,
           sum(g.overage)::bigint AS overage,
           sum(g.violations)::bigint AS violations,
           sum(g.debits)::bigint AS debits,
           sum(g.debit_credits)::bigint AS debit_credits
    FROM (
        -- Every employee account in byte order of its id, with its roll-up rows.
        (SELECT a.ref COLLATE "C" AS employee, r.model COLLATE "C" AS model,
                nullif(r.project, '') COLLATE "C" AS project,
                r.events, r.input_tokens, r.cached_input_tokens, r.output_tokens, r.credits,
                r.overage, r.violations, r.debits, r.debit_credits
         FROM accounts a
         CROSS JOIN LATERAL (
             SELECT m.model, m.project, m.events, m.input_tokens, m.cached_input_tokens,
                    m.output_tokens, m.credits, 0::bigint AS overage, 0::bigint AS violations,
                    0::bigint AS debits, 0::bigint AS debit_credits
             FROM usage_monthly m
             WHERE m.account_id = a.id
               AND m.month >= ($3::timestamptz AT TIME ZONE 'UTC')::date
               AND m.month < ($4::timestamptz AT TIME ZONE 'UTC')::date
             UNION ALL
             SELECT sm.model, sm.project, 0, 0, 0, 0, sm.credits, 0, 0, sm.debits, sm.credits
             FROM spend_monthly sm
             WHERE sm.account_id = a.id
               AND sm.month >= ($3::timestamptz AT TIME ZONE 'UTC')::date
               AND sm.month < ($4::timestamptz AT TIME ZONE 'UTC')::date
         ) r
         WHERE a.type = 'employee'
         ORDER BY 1, 2, 3)
        UNION ALL
        -- Department (and any other) accounts: spend without an employee.
        (SELECT NULL::text COLLATE "C", r.model COLLATE "C", nullif(r.project, '') COLLATE "C",
                r.events, r.input_tokens, r.cached_input_tokens, r.output_tokens, r.credits,
                0::bigint, 0::bigint, r.debits, r.debit_credits
         FROM accounts a
         CROSS JOIN LATERAL (
             SELECT m.model, m.project, m.events, m.input_tokens, m.cached_input_tokens,
                    m.output_tokens, m.credits, 0::bigint AS debits, 0::bigint AS debit_credits
             FROM usage_monthly m
             WHERE m.account_id = a.id
               AND m.month >= ($3::timestamptz AT TIME ZONE 'UTC')::date
               AND m.month < ($4::timestamptz AT TIME ZONE 'UTC')::date
             UNION ALL
             SELECT sm.model, sm.project, 0, 0, 0, 0, sm.credits, sm.debits, sm.credits
             FROM spend_monthly sm
             WHERE sm.account_id = a.id
               AND sm.month >= ($3::timestamptz AT TIME ZONE 'UTC')::date
               AND sm.month < ($4::timestamptz AT TIME ZONE 'UTC')::date
         ) r
         WHERE a.type <> 'employee'
         ORDER BY 1, 2, 3)
        UNION ALL
        -- The few rows the roll-ups do not hold, per account: the spend
        -- policy's overage and violations in [$1, $2), and the corrections at
        -- the ends (usage_report's legs for its 'monthly' source).
        (SELECT CASE WHEN a.type = 'employee' THEN a.ref END COLLATE "C",
                c.model COLLATE "C", nullif(c.project, '') COLLATE "C",
                c.events, c.input_tokens, c.cached_input_tokens, c.output_tokens, c.credits,
                c.overage, c.violations, c.debits, c.debit_credits
         FROM (
             SELECT u.account_id, u.model, coalesce(u.project, '') AS project,
                    0::bigint AS events, 0::bigint AS input_tokens,
                    0::bigint AS cached_input_tokens, 0::bigint AS output_tokens,
                    0::bigint AS credits, u.shortfall AS overage,
                    (u.violation IS NOT NULL)::integer::bigint AS violations,
                    0::bigint AS debits, 0::bigint AS debit_credits
             FROM usage_events u
             WHERE (u.shortfall > 0 OR u.violation IS NOT NULL)
               AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
             UNION ALL
             SELECT c.account_id, c.model, coalesce(c.project, ''),
                    c.sign, c.sign * c.input_tokens, c.sign * c.cached_input_tokens,
                    c.sign * c.output_tokens, c.sign * c.cost, 0, 0, 0, 0
             FROM (
                 SELECT u.account_id, u.model, u.project, u.occurred_at, u.input_tokens,
                        u.cached_input_tokens, u.output_tokens, u.cost
                 FROM usage_events u
                 UNION ALL
                 SELECT u.account_id, u.model, u.project, u.occurred_at, u.input_tokens,
                        u.cached_input_tokens, u.output_tokens, u.cost
                 FROM usage_events_archive u
             ) c0
             CROSS JOIN LATERAL (
                 SELECT c0.*,
                        CASE WHEN c0.occurred_at < greatest($1::timestamptz, $3::timestamptz)
                             THEN CASE WHEN $1::timestamptz < $3::timestamptz THEN 1 ELSE -1 END
                             ELSE CASE WHEN $4::timestamptz < $2::timestamptz THEN 1 ELSE -1 END
                        END::bigint AS sign
             ) c
             WHERE ($1::timestamptz <> $3::timestamptz OR $4::timestamptz <> $2::timestamptz)
               AND ((c0.occurred_at >= least($1::timestamptz, $3::timestamptz)
                     AND c0.occurred_at < greatest($1::timestamptz, $3::timestamptz))
                    OR (c0.occurred_at >= least($4::timestamptz, $2::timestamptz)
                        AND c0.occurred_at < greatest($4::timestamptz, $2::timestamptz)))
             UNION ALL
             SELECT e.account_id, t.metadata ->> 'model', coalesce(t.metadata ->> 'project', ''),
                    0, 0, 0, 0, -e.amount * sg.sign, 0, 0, sg.sign, -e.amount * sg.sign
             FROM transactions t
             JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
             CROSS JOIN LATERAL (
                 SELECT CASE WHEN t.created_at < greatest($1::timestamptz, $3::timestamptz)
                             THEN CASE WHEN $1::timestamptz < $3::timestamptz THEN 1 ELSE -1 END
                             ELSE CASE WHEN $4::timestamptz < $2::timestamptz THEN 1 ELSE -1 END
                        END::bigint AS sign) sg
             WHERE ($1::timestamptz <> $3::timestamptz OR $4::timestamptz <> $2::timestamptz)
               AND t.kind IN ('debit', 'capture')
               AND ((t.created_at >= least($1::timestamptz, $3::timestamptz)
                     AND t.created_at < greatest($1::timestamptz, $3::timestamptz))
                    OR (t.created_at >= least($4::timestamptz, $2::timestamptz)
                        AND t.created_at < greatest($4::timestamptz, $2::timestamptz)))
         ) c
         JOIN accounts a ON a.id = c.account_id
         ORDER BY 1, 2, 3)
    ) g
    GROUP BY g.employee, g.model, g.project
    -- As in usage_report: a group of subtracted spend only is not in the period.
    HAVING sum(g.events) <> 0 OR sum(g.debits) <> 0
    ORDER BY g.employee, g.model, g.project
) t;
