-- name: usage_report
-- $5: split the rows by day internally (someone changed department within
-- the period, so a department is looked up per day; the day column itself
-- is output only when asked).
-- Usage totals over [$1, $2) grouped by the keys in $3 (a text[] of
-- employee, department, model, project, day, month, already checked by
-- service/reports.py), in the order of $3, from the source $4 that
-- service/reports.py picked: 'monthly_models' (usage_monthly_models: whole
-- UTC months, no day or project key), 'monthly' (usage_monthly: whole UTC
-- months, no day key), 'models' (usage_daily_models: whole days, no employee or
-- department key), 'daily' (usage_daily: whole days), or 'events'
-- (usage_events itself, exact at any instant). A roll-up is read over the
-- UTC days [$8, $9), which service/reports.py (usage_span) set to $1 and $2
-- when both are midnights and else to their nearest midnights (see below).
-- $6: the names of the
-- `tag:<name>` keys, which $3 calls tag1, tag2, tag3 (sources 'events',
-- 'tag_daily' and 'tag_monthly': only the tag roll-ups keep tags). Debits
-- and captures by amount (issue 16) are read from $7, which service/reports.py picked: 'monthly' (spend_monthly:
-- whole UTC months, no day key, nobody moved department), 'daily'
-- (spend_daily: whole days) or 'journal' (the transactions themselves,
-- exact at any instant, with their metadata for tag keys), the roll-ups
-- over [$8, $9) like the usage events'. Both are 'tag_daily' or
-- 'tag_monthly' for a report whose tag keys are all declared (the tag
-- roll-ups, at the end of `raw`).
--
-- Corrections at the ends (issue 16, the reports' speed): a period of two
-- days or more whose bounds are not both UTC midnights is read from the
-- roll-ups over [$8, $9), the midnights nearest to $1 and $2, and each end
-- is corrected with the usage events and the journal's spend between the
-- bound and its midnight: added when the midnight is outside the period
-- ([$1, $8) when $1 < $8), subtracted when it is inside ([$8, $1) when
-- $8 < $1), and the same between $9 and $2. Sums and counts are additive, so
-- this is exact; a group whose corrected counts are all zero (subtracted
-- spend only) is not in the period and is dropped. Whole days have $8 = $1
-- and $9 = $2: nothing to correct. The journal source is the same formula
-- with $8 = $9 = $2: [$1, $2) added. The usage corrections read the archive
-- too, where the roll-ups' older events live.
--
-- The grouping is static SQL: every allow-listed key has its expression
-- below, and a key not in $3 turns into NULL, a constant that groups
-- nothing. The first level aggregates the narrow rows by account id, model,
-- project and date bucket; the second joins the (few) resulting accounts to
-- employees and folds them into the asked keys. Every key is text, so the
-- final ORDER BY picks each position's key by name.
WITH
-- Every account's department account at $1, for the reports by department
-- without employee: an employee account's department at $1 (its latest move
-- at or before $1, else its department), as that department's own account;
-- any other account, an employee whose department has none, and an employee
-- who moved department after $1 and by the end of the period's last UTC day
-- keep their own id. Their spend is then read under it, and the first
-- aggregation folds a department's employees into one row per key: a month
-- of 10,000 employees by a tag key is about 200 groups instead of 100,000.
-- `homes` below finds the same department for every account folded here,
-- whether it looks at $1 or, when someone moved ($5), at the end of each day
-- (no move of theirs falls between), and finds each day's for those who
-- moved. Set-based (DISTINCT ON), which also keeps it a subquery when it is
-- inlined (NOT MATERIALIZED), so PostgreSQL estimates its few homes as a few
-- groups, not as many as the accounts, and hashes them with parallel workers.
folds AS NOT MATERIALIZED (
    SELECT DISTINCT ON (a.id) a.id AS account_id,
           CASE WHEN m.employee_id IS NULL THEN coalesce(da.id, a.id) ELSE a.id END AS home,
           -- An employee account that keeps its own id (moved, or no department
           -- account): `homes` puts its rows under the department of their day.
           a.type = 'employee' AND (m.employee_id IS NOT NULL OR da.id IS NULL) AS apart
    FROM accounts a
    LEFT JOIN employee_departments h ON a.type = 'employee' AND h.employee_id = a.ref
                                    AND h.since <= $1::timestamptz
    -- Those who moved (by employee_departments_since_idx: the period's few moves).
    LEFT JOIN (SELECT DISTINCT m.employee_id FROM employee_departments m
               WHERE m.since > $1::timestamptz
                 AND m.since < (((($2::timestamptz - interval '1 microsecond')
                                  AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC')) m
           ON a.type = 'employee' AND m.employee_id = a.ref
    LEFT JOIN employees e ON a.type = 'employee' AND e.id = a.ref
    LEFT JOIN accounts da ON da.address = 'department:' || coalesce(h.department, e.department)
    ORDER BY a.id, h.since DESC
),
-- The tag roll-up per month and account ($4 'tag_monthly': whole months,
-- nobody moved) by department without employee, read under `folds`.
tag_homes AS (
    SELECT f.account_id, f.home
    FROM folds f
    WHERE $4::text = 'tag_monthly' AND 'department' = ANY ($3::text[])
      AND NOT 'employee' = ANY ($3::text[])
),
-- The asked keys as booleans, computed once: testing the array per row
-- costs more than the aggregation itself on a million rows. (Inlined into
-- each branch that joins it, each of its values is a constant or one
-- sub-select for the whole statement.)
flags AS NOT MATERIALIZED (
    SELECT $3::text[] && ARRAY['employee', 'department'] AS by_account,
           -- Spend read from the events and the journal is read under `folds`.
           $4::text = 'events' AND 'department' = ANY ($3::text[])
             AND NOT 'employee' = ANY ($3::text[]) AS by_home,
           'model' = ANY ($3::text[]) AS by_model,
           'project' = ANY ($3::text[]) AS by_project,
           'day' = ANY ($3::text[]) OR $5::boolean AS by_day,
           'day' = ANY ($3::text[]) AS by_day_asked,
           'month' = ANY ($3::text[]) AS by_month,
           -- tag:<name> keys: their names in $6, in the order of tag1..tag3.
           $6::text[] AS tag_names,
           -- and their slots (0-based) in the tag roll-ups' arrays of values
           -- (the declared keys in order: tl_report_tag_keys), NULL when not
           -- declared.
           (SELECT array_agg(array_position(k.keys, g.n) - 1 ORDER BY g.i)
            FROM unnest($6::text[]) WITH ORDINALITY AS g(n, i)
            CROSS JOIN (SELECT tl_report_tag_keys() AS keys) k) AS tag_slots
),
raw AS (
    SELECT d.account_id, d.model, d.project, d.day, d.events, d.input_tokens,
           d.cached_input_tokens, d.output_tokens, d.credits, 0::bigint AS overage, 0::bigint AS violations,
           NULL::text AS tag1, NULL::text AS tag2, NULL::text AS tag3,
           0::bigint AS debits, 0::bigint AS debit_credits
    FROM usage_daily d
    WHERE $4::text = 'daily'
      AND d.day >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND d.day < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT m.account_id, m.model, m.project, m.month, m.events, m.input_tokens,
           m.cached_input_tokens, m.output_tokens, m.credits, 0, 0, NULL, NULL, NULL, 0, 0
    FROM usage_monthly m
    WHERE $4::text = 'monthly'
      AND m.month >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND m.month < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT mm.account_id, mm.model, '', mm.month, mm.events, mm.input_tokens,
           mm.cached_input_tokens, mm.output_tokens, mm.credits, 0, 0, NULL, NULL, NULL, 0, 0
    FROM usage_monthly_models mm
    WHERE $4::text = 'monthly_models'
      AND mm.month >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND mm.month < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT NULL::bigint, g.model, g.project, g.day, g.events, g.input_tokens,
           g.cached_input_tokens, g.output_tokens, g.credits, 0, 0, NULL, NULL, NULL, 0, 0
    FROM usage_daily_models g
    WHERE $4::text = 'models'
      AND g.day >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND g.day < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    -- The events of the period, archived ones included (usage_events_all),
    -- summed here by the asked keys: a month's million events by a tag key
    -- that is not declared are ten rows for the levels above instead of a
    -- million (1.4 -> 0.5 s). The account is a key only when asked, so
    -- usage_report_accounts puts its condition on the accounts here too
    -- (@accounts: service/db.py), where usage_events_account_idx can serve
    -- it. The flags are read as sub-selects (one value each for the whole
    -- statement) rather than joined as in the other branches: joined (or
    -- written as conditions on the parameters), a chunk of 1,000 accounts
    -- was planned as a scan of all the events, 0.4 s instead of 0.2 s by
    -- the index. Either way the branch may get parallel workers when the
    -- query is not read through a cursor (service/reports.py, _window_plan).
    SELECT CASE WHEN (SELECT by_account FROM flags) THEN u.account_id END,
           CASE WHEN (SELECT by_model FROM flags) THEN u.model END,
           CASE WHEN (SELECT by_project FROM flags) THEN coalesce(u.project, '') END,
           CASE WHEN (SELECT by_day FROM flags) THEN (u.occurred_at AT TIME ZONE 'UTC')::date
                WHEN (SELECT by_month FROM flags)
                THEN date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date END,
           count(*), tl_bigint_sum(u.input_tokens), tl_bigint_sum(u.cached_input_tokens),
           tl_bigint_sum(u.output_tokens), tl_bigint_sum(u.cost), tl_bigint_sum(u.shortfall),
           count(u.violation), u.tags ->> (SELECT tag_names[1] FROM flags),
           u.tags ->> (SELECT tag_names[2] FROM flags), u.tags ->> (SELECT tag_names[3] FROM flags), 0, 0
    FROM usage_events_all u
    WHERE $4::text = 'events' AND NOT (SELECT by_home FROM flags)
      AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
      -- @accounts: u.account_id
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    -- The same under `folds` (flags.by_home: by department without
    -- employee): a month's million events are a few hundred rows for the
    -- levels above, where by account they are 80,000 for a month by a tag key,
    -- and no 80,000 groups are hashed. Planned so that PostgreSQL hashes these
    -- few groups (with parallel workers) rather than sorting the million rows:
    -- - the flags are joined, so each key not asked is a constant NULL when
    --   planned, and the groups are estimated from the keys asked alone;
    -- - each table is read and summed in its own arm (usage_events, then the
    --   archive), where its columns' statistics are known: summed over the
    --   view, every key was estimated at 200 values, so three keys were a
    --   million groups (department, model and a tag key: 1.1 s sorted, 0.6 s
    --   hashed);
    -- - the day and the month have statistics of their own (schema.sql,
    --   usage_events_buckets): from the instant alone, a month was a million
    --   days;
    -- - the day is a key only when asked, not because someone moved ($5):
    --   the accounts kept apart (folds.apart) are read by day in the third
    --   arm, and the rows here, under a department's own account, need no
    --   day for `homes`. Split by day, with one employee moved in the month,
    --   department, model and a tag key were estimated at 200,000 groups and
    --   summed without workers: 1.5 to 1.6 s, 0.65 s now.
    -- (Never with @accounts: usage_report_accounts reads reports with the
    -- employee, which flags.by_home excludes.)
    SELECT fo.home,
           CASE WHEN f.by_model THEN u.model END,
           CASE WHEN f.by_project THEN coalesce(u.project, '') END,
           CASE WHEN f.by_day_asked THEN (u.occurred_at AT TIME ZONE 'UTC')::date
                WHEN f.by_month THEN date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date END,
           count(*), tl_bigint_sum(u.input_tokens), tl_bigint_sum(u.cached_input_tokens),
           tl_bigint_sum(u.output_tokens), tl_bigint_sum(u.cost), tl_bigint_sum(u.shortfall),
           count(u.violation), u.tags ->> f.tag_names[1], u.tags ->> f.tag_names[2],
           u.tags ->> f.tag_names[3], 0, 0
    FROM usage_events u
    CROSS JOIN flags f
    JOIN folds fo ON fo.account_id = u.account_id AND NOT fo.apart
    WHERE f.by_home
      AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    SELECT fo.home,
           CASE WHEN f.by_model THEN u.model END,
           CASE WHEN f.by_project THEN coalesce(u.project, '') END,
           CASE WHEN f.by_day_asked THEN (u.occurred_at AT TIME ZONE 'UTC')::date
                WHEN f.by_month THEN date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date END,
           count(*), tl_bigint_sum(u.input_tokens), tl_bigint_sum(u.cached_input_tokens),
           tl_bigint_sum(u.output_tokens), tl_bigint_sum(u.cost), tl_bigint_sum(u.shortfall),
           count(u.violation), u.tags ->> f.tag_names[1], u.tags ->> f.tag_names[2],
           u.tags ->> f.tag_names[3], 0, 0
    FROM usage_events_archive u
    CROSS JOIN flags f
    JOIN folds fo ON fo.account_id = u.account_id AND NOT fo.apart
    WHERE f.by_home
      AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    -- And the events of the accounts kept apart (folds.apart: those who
    -- moved), by their own index, by account and, when someone moved ($5),
    -- by day, for `homes`.
    SELECT u.account_id,
           CASE WHEN f.by_model THEN u.model END,
           CASE WHEN f.by_project THEN coalesce(u.project, '') END,
           CASE WHEN f.by_day THEN (u.occurred_at AT TIME ZONE 'UTC')::date
                WHEN f.by_month THEN date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date END,
           count(*), tl_bigint_sum(u.input_tokens), tl_bigint_sum(u.cached_input_tokens),
           tl_bigint_sum(u.output_tokens), tl_bigint_sum(u.cost), tl_bigint_sum(u.shortfall),
           count(u.violation), u.tags ->> f.tag_names[1], u.tags ->> f.tag_names[2],
           u.tags ->> f.tag_names[3], 0, 0
    FROM usage_events_all u
    CROSS JOIN flags f
    WHERE f.by_home
      AND u.account_id = ANY (ARRAY(SELECT fo.account_id FROM folds fo WHERE fo.apart))
      AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    -- Spend policy: overage (shortfalls charged to system:overage) and
    -- model violations, which the roll-ups do not keep, from the few events
    -- that have them (usage_events_policy_idx, and the archive's
    -- usage_events_archive_policy_idx); their counts are in the roll-up
    -- rows above.
    SELECT CASE WHEN $4::text = 'models' THEN NULL ELSE u.account_id END, u.model,
           CASE WHEN $4::text = 'monthly_models' THEN '' ELSE coalesce(u.project, '') END,
           CASE WHEN $4::text IN ('monthly', 'monthly_models')
                THEN date_trunc('month', u.occurred_at AT TIME ZONE 'UTC')::date
                ELSE (u.occurred_at AT TIME ZONE 'UTC')::date END,
           0, 0, 0, 0, 0, u.shortfall, (u.violation IS NOT NULL)::integer,
           u.tags ->> f.tag_names[1], u.tags ->> f.tag_names[2], u.tags ->> f.tag_names[3], 0, 0
    FROM usage_events_all u CROSS JOIN flags f
    WHERE $4::text <> 'events' AND (u.shortfall > 0 OR u.violation IS NOT NULL)
      AND u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    UNION ALL
    -- The corrections at the ends of a period read from a roll-up over the
    -- nearest midnights of its bounds (see the header): each event between
    -- a bound and its midnight, with the sign of its side, keyed as the
    -- roll-up's rows are (the expressions of the policy leg above).
    SELECT CASE WHEN $4::text = 'models' THEN NULL ELSE c0.account_id END, c0.model,
           CASE WHEN $4::text = 'monthly_models' THEN '' ELSE coalesce(c0.project, '') END,
           CASE WHEN $4::text IN ('monthly', 'monthly_models')
                THEN date_trunc('month', c0.occurred_at AT TIME ZONE 'UTC')::date
                ELSE (c0.occurred_at AT TIME ZONE 'UTC')::date END,
           sg.sign, sg.sign * c0.input_tokens, sg.sign * c0.cached_input_tokens,
           sg.sign * c0.output_tokens, sg.sign * c0.cost, 0, 0,
           c0.tags ->> f.tag_names[1], c0.tags ->> f.tag_names[2], c0.tags ->> f.tag_names[3], 0, 0
    -- (The bounds' filter, in the WHERE below, reaches both tables of
    -- usage_events_all, each by its own index.)
    FROM usage_events_all c0 CROSS JOIN flags f
    CROSS JOIN LATERAL (
        SELECT CASE WHEN c0.occurred_at < greatest($1::timestamptz, $8::timestamptz)
                    THEN CASE WHEN $1::timestamptz < $8::timestamptz THEN 1 ELSE -1 END
                    ELSE CASE WHEN $9::timestamptz < $2::timestamptz THEN 1 ELSE -1 END
               END::bigint AS sign) sg
    -- Nothing to correct between midnights: not even an index probe.
    WHERE $4::text <> 'events'
      AND ($1::timestamptz <> $8::timestamptz OR $9::timestamptz <> $2::timestamptz)
      AND ((c0.occurred_at >= least($1::timestamptz, $8::timestamptz)
            AND c0.occurred_at < greatest($1::timestamptz, $8::timestamptz))
           OR (c0.occurred_at >= least($9::timestamptz, $2::timestamptz)
               AND c0.occurred_at < greatest($9::timestamptz, $2::timestamptz)))
    UNION ALL
    -- Debits and captures by amount (captures by usage are usage events)
    -- from their roll-ups (schema.sql, tl_spend_rollup), which hold the
    -- same sums as the journal read below, per day or month, paying
    -- account, model and project.
    SELECT CASE WHEN $4::text = 'models' THEN NULL ELSE sd.account_id END, sd.model,
           CASE WHEN $4::text = 'monthly_models' THEN '' ELSE sd.project END,
           sd.day, 0, 0, 0, 0, sd.credits, 0, 0, NULL, NULL, NULL, sd.debits, sd.credits
    FROM spend_daily sd
    WHERE $7::text = 'daily'
      AND sd.day >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND sd.day < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT CASE WHEN $4::text = 'models' THEN NULL ELSE sm.account_id END, sm.model,
           CASE WHEN $4::text = 'monthly_models' THEN '' ELSE sm.project END,
           sm.month, 0, 0, 0, 0, sm.credits, 0, 0, NULL, NULL, NULL, sm.debits, sm.credits
    FROM spend_monthly sm
    WHERE $7::text = 'monthly'
      AND sm.month >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND sm.month < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    -- The journal: the transactions of those kinds between $1 and $8 and
    -- between $9 and $2, with the sign of their side (the header: the whole
    -- period added for source 'journal', the corrections at the ends for the
    -- roll-ups), by transactions_spend_time_idx, each with its one spending
    -- entry (the account that paid; the other entry is system:usage's). They count
    -- under their metadata's `model` and `project`, and a tag:<name> key
    -- reads their metadata's <name> (metadata is a flat object of scalars,
    -- a debit's tags), null where it has none, in the bucket of their
    -- created_at.
    -- The metadata is read (from the table) only when a model, project or
    -- tag key is asked; otherwise the index alone (it includes the id)
    -- gives the transactions, and only their entries are read (the second
    -- branch). Summed here by the asked keys, as the events are above. The
    -- metadata is read from the transaction's own row: a second join of the
    -- transactions, for the metadata alone, cost a month's 300,000 debits
    -- about 0.25 s. Under `folds` as the events are with flags.by_home
    -- (0.49 -> 0.29 s for a month by department and a tag key); otherwise
    -- `folds` is unique and unused, and PostgreSQL drops its join.
    SELECT CASE WHEN f.by_home THEN fo.home
                WHEN $4::text <> 'models' AND f.by_account THEN e.account_id END,
           CASE WHEN f.by_model THEN t.metadata ->> 'model' END,
           CASE WHEN NOT f.by_project THEN NULL
                WHEN $4::text = 'monthly_models' THEN '' ELSE coalesce(t.metadata ->> 'project', '') END,
           CASE WHEN f.by_day AND $4::text NOT IN ('monthly', 'monthly_models')
                THEN (t.created_at AT TIME ZONE 'UTC')::date
                WHEN (f.by_day OR f.by_month)
                THEN date_trunc('month', t.created_at AT TIME ZONE 'UTC')::date END,
           0, 0, 0, 0, tl_bigint_sum(-e.amount * sg.sign), 0, 0,
           t.metadata ->> f.tag_names[1], t.metadata ->> f.tag_names[2],
           t.metadata ->> f.tag_names[3],
           tl_bigint_sum(sg.sign), tl_bigint_sum(-e.amount * sg.sign)
    FROM transactions t
    CROSS JOIN flags f
    JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
    LEFT JOIN folds fo ON fo.account_id = e.account_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.created_at < greatest($1::timestamptz, $8::timestamptz)
                    THEN CASE WHEN $1::timestamptz < $8::timestamptz THEN 1 ELSE -1 END
                    ELSE CASE WHEN $9::timestamptz < $2::timestamptz THEN 1 ELSE -1 END
               END::bigint AS sign) sg
    WHERE ($1::timestamptz <> $8::timestamptz OR $9::timestamptz <> $2::timestamptz)
      AND $3::text[] && ARRAY['model', 'project', 'tag1', 'tag2', 'tag3']
      -- @accounts: e.account_id
      AND t.kind IN ('debit', 'capture')
      AND ((t.created_at >= least($1::timestamptz, $8::timestamptz)
            AND t.created_at < greatest($1::timestamptz, $8::timestamptz))
           OR (t.created_at >= least($9::timestamptz, $2::timestamptz)
               AND t.created_at < greatest($9::timestamptz, $2::timestamptz)))
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    -- The same without a key of the metadata: the index alone gives the
    -- transactions (it includes the id), and only their entries are read.
    SELECT CASE WHEN f.by_home THEN fo.home
                WHEN $4::text <> 'models' AND f.by_account THEN e.account_id END,
           CASE WHEN f.by_model THEN NULL::jsonb ->> 'model' END,
           CASE WHEN NOT f.by_project THEN NULL
                WHEN $4::text = 'monthly_models' THEN '' ELSE coalesce(NULL::jsonb ->> 'project', '') END,
           CASE WHEN f.by_day AND $4::text NOT IN ('monthly', 'monthly_models')
                THEN (t.created_at AT TIME ZONE 'UTC')::date
                WHEN (f.by_day OR f.by_month)
                THEN date_trunc('month', t.created_at AT TIME ZONE 'UTC')::date END,
           0, 0, 0, 0, tl_bigint_sum(-e.amount * sg.sign), 0, 0,
           NULL::jsonb ->> f.tag_names[1], NULL::jsonb ->> f.tag_names[2],
           NULL::jsonb ->> f.tag_names[3],
           tl_bigint_sum(sg.sign), tl_bigint_sum(-e.amount * sg.sign)
    FROM transactions t
    CROSS JOIN flags f
    JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
    LEFT JOIN folds fo ON fo.account_id = e.account_id
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.created_at < greatest($1::timestamptz, $8::timestamptz)
                    THEN CASE WHEN $1::timestamptz < $8::timestamptz THEN 1 ELSE -1 END
                    ELSE CASE WHEN $9::timestamptz < $2::timestamptz THEN 1 ELSE -1 END
               END::bigint AS sign) sg
    WHERE ($1::timestamptz <> $8::timestamptz OR $9::timestamptz <> $2::timestamptz)
      AND NOT $3::text[] && ARRAY['model', 'project', 'tag1', 'tag2', 'tag3']
      -- @accounts: e.account_id
      AND t.kind IN ('debit', 'capture')
      AND ((t.created_at >= least($1::timestamptz, $8::timestamptz)
            AND t.created_at < greatest($1::timestamptz, $8::timestamptz))
           OR (t.created_at >= least($9::timestamptz, $2::timestamptz)
               AND t.created_at < greatest($9::timestamptz, $2::timestamptz)))
    GROUP BY 1, 2, 3, 4, 12, 13, 14
    UNION ALL
    -- Tag roll-ups (schema.sql, "Tag roll-ups"), for reports whose tag keys
    -- are all declared: $4 and $7 'tag_daily' (per day, model and project,
    -- without the account: no employee or department key) or 'tag_monthly'
    -- (per month and account: whole UTC months, no day, model or project key,
    -- nobody moved department), over [$8, $9) and corrected at the ends like
    -- the other roll-ups. Their tags are the declared keys' values, a JSON
    -- array read by slot (flags.tag_slots) where the events' are read by name.
    SELECT NULL::bigint, tg.model, tg.project, tg.day, tg.events, tg.input_tokens,
           tg.cached_input_tokens, tg.output_tokens, tg.credits, 0, 0,
           tg.tag_values ->> f.tag_slots[1], tg.tag_values ->> f.tag_slots[2], tg.tag_values ->> f.tag_slots[3], 0, 0
    FROM usage_tag_daily tg CROSS JOIN flags f
    WHERE $4::text = 'tag_daily'
      AND tg.day >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND tg.day < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT coalesce(th.home, tm.account_id), NULL, '', tm.month, tm.events, tm.input_tokens,
           tm.cached_input_tokens, tm.output_tokens, tm.credits, 0, 0,
           tm.tag_values ->> f.tag_slots[1], tm.tag_values ->> f.tag_slots[2], tm.tag_values ->> f.tag_slots[3], 0, 0
    FROM usage_tag_monthly tm CROSS JOIN flags f
    LEFT JOIN tag_homes th ON th.account_id = tm.account_id
    WHERE $4::text = 'tag_monthly'
      AND tm.month >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND tm.month < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT NULL::bigint, sg.model, sg.project, sg.day, 0, 0, 0, 0, sg.credits, 0, 0,
           sg.tag_values ->> f.tag_slots[1], sg.tag_values ->> f.tag_slots[2], sg.tag_values ->> f.tag_slots[3], sg.debits, sg.credits
    FROM spend_tag_daily sg CROSS JOIN flags f
    WHERE $7::text = 'tag_daily'
      AND sg.day >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND sg.day < ($9::timestamptz AT TIME ZONE 'UTC')::date
    UNION ALL
    SELECT coalesce(th.home, st.account_id), NULL, '', st.month, 0, 0, 0, 0, st.credits, 0, 0,
           st.tag_values ->> f.tag_slots[1], st.tag_values ->> f.tag_slots[2], st.tag_values ->> f.tag_slots[3], st.debits, st.credits
    FROM spend_tag_monthly st CROSS JOIN flags f
    LEFT JOIN tag_homes th ON th.account_id = st.account_id
    WHERE $7::text = 'tag_monthly'
      AND st.month >= ($8::timestamptz AT TIME ZONE 'UTC')::date
      AND st.month < ($9::timestamptz AT TIME ZONE 'UTC')::date
),
-- The sums are bigints at each level (every total is a bigint in the end),
-- added by tl_bigint_sum (schema.sql): the next level then adds bigints, not
-- numerics, which cost seconds on a third of a million groups, and each group's
-- state is a bigint, not sum()'s int128 allocated per group (employee,day over
-- a month: 4.5-4.9 -> 3.4-3.7 s, the first level's hash table 133 MB spilling to
-- disk -> 111 MB in memory).
firsts AS (
    SELECT CASE WHEN f.by_account THEN r.account_id END AS account_id,
           CASE WHEN f.by_model THEN r.model END AS model,
           CASE WHEN f.by_project THEN r.project END AS project,
           CASE WHEN f.by_day THEN r.day
                WHEN f.by_month THEN date_trunc('month', r.day)::date END AS bucket,
           tl_bigint_sum(r.events) AS events,
           tl_bigint_sum(r.input_tokens) AS input_tokens,
           tl_bigint_sum(r.cached_input_tokens) AS cached_input_tokens,
           tl_bigint_sum(r.output_tokens) AS output_tokens,
           tl_bigint_sum(r.credits) AS credits,
           tl_bigint_sum(r.overage) AS overage,
           tl_bigint_sum(r.violations) AS violations,
           tl_bigint_sum(r.debits) AS debits,
           tl_bigint_sum(r.debit_credits) AS debit_credits,
           -- The tags' values, read by each source (by name from the events'
           -- and the journal's objects, by slot from the tag roll-ups' arrays).
           r.tag1, r.tag2, r.tag3
    FROM raw r CROSS JOIN flags f
    -- @accounts (usage_report_accounts restricts the accounts here: service/db.py)
    GROUP BY 1, 2, 3, 4, tag1, tag2, tag3
),
-- The department of the time of each employee account in firsts (and day,
-- when days are split), looked up once per account (and day) rather than
-- once per group: a month by department and model has six groups per
-- account. At the end of the day when days are split ($5: someone moved in
-- the period), else at `from` (nobody moved until `to`).
homes AS (
    SELECT d.account_id, d.bucket,
           coalesce((SELECT h.department FROM employee_departments h
                     WHERE h.employee_id = a.ref
                       AND h.since <= CASE WHEN $5::boolean
                                           THEN (d.bucket + 1)::timestamp AT TIME ZONE 'UTC' - interval '1 microsecond'
                                           ELSE $1::timestamptz END
                     ORDER BY h.since DESC LIMIT 1),
                    e.department) AS department
    FROM (SELECT DISTINCT f.account_id,
                 CASE WHEN $5::boolean THEN f.bucket ELSE DATE '-infinity' END AS bucket
          FROM firsts f
          WHERE 'department' = ANY ($3::text[])) d
    JOIN accounts a ON a.id = d.account_id AND a.type = 'employee'
    LEFT JOIN employees e ON e.id = a.ref
),
keyed AS NOT MATERIALIZED (
    SELECT CASE WHEN 'employee' = ANY ($3::text[]) AND a.type = 'employee' THEN a.ref END AS employee,
           -- The department of the time (homes), or the department account's own.
           CASE WHEN 'department' = ANY ($3::text[])
                THEN CASE a.type
                    WHEN 'employee' THEN hm.department
                    WHEN 'department' THEN a.ref END
           END AS department,
           f.model,
           nullif(f.project, '') AS project,
           CASE WHEN 'day' = ANY ($3::text[]) THEN to_char(f.bucket, 'YYYY-MM-DD') END AS day,
           CASE WHEN 'month' = ANY ($3::text[]) THEN to_char(f.bucket, 'YYYY-MM') END AS month,
           f.tag1, f.tag2, f.tag3,
           f.events, f.input_tokens, f.cached_input_tokens, f.output_tokens, f.credits,
           f.overage, f.violations, f.debits, f.debit_credits,
           -- A group of firsts that is a whole group of the answer: an employee's
           -- account (the only one with that employee), its bucket the asked day or
           -- month (not a day of a month asked, split because someone moved, $5).
           -- Every other key of the answer is firsts' own, or (the department)
           -- follows from the account and the bucket. Never null (a row without
           -- an account is not whole), or totals would drop the row from both
           -- of its branches.
           'employee' = ANY ($3::text[]) AND coalesce(a.type = 'employee', false)
             AND (NOT $5::boolean OR 'day' = ANY ($3::text[])) AS whole
    FROM firsts f
    LEFT JOIN accounts a ON a.id = f.account_id
    LEFT JOIN homes hm ON hm.account_id = f.account_id
                      AND hm.bucket = CASE WHEN $5::boolean THEN f.bucket ELSE DATE '-infinity' END
),
totals AS (
    SELECT employee, department, model, project, day, month, tag1, tag2, tag3,
           tl_bigint_sum(events) AS events,
           tl_bigint_sum(input_tokens) AS input_tokens,
           tl_bigint_sum(cached_input_tokens) AS cached_input_tokens,
           tl_bigint_sum(output_tokens) AS output_tokens,
           tl_bigint_sum(credits) AS credits,
           tl_bigint_sum(overage) AS overage,
           tl_bigint_sum(violations) AS violations,
           tl_bigint_sum(debits) AS debits,
           tl_bigint_sum(debit_credits) AS debit_credits
    FROM keyed
    -- Only the groups of firsts that are not whole groups of the answer are
    -- aggregated again; the others (every employee's, in a report with the
    -- employee) pass through below: employee,day over a month hashed its third
    -- of a million groups a second time for nothing (about 0.5 s of 3.3).
    WHERE NOT whole
    GROUP BY employee, department, model, project, day, month, tag1, tag2, tag3
    -- A group of subtracted spend only (the corrections, see the header)
    -- sums to zero events and debits: nothing of it is in the period, where
    -- every group has an event or a debit.
    HAVING tl_bigint_sum(events) <> 0 OR tl_bigint_sum(debits) <> 0
    UNION ALL
    SELECT employee, department, model, project, day, month, tag1, tag2, tag3,
           events, input_tokens, cached_input_tokens, output_tokens, credits,
           overage, violations, debits, debit_credits
    FROM keyed
    WHERE whole AND (events <> 0 OR debits <> 0)
)
-- Each position's key found once (o.pos), then read from the row's values
-- (x.v) in the order of that list.
SELECT t.*
FROM totals t
CROSS JOIN (SELECT array_agg(array_position(ARRAY['employee', 'department', 'model', 'project', 'day', 'month',
                                                  'tag1', 'tag2', 'tag3'], g.k) ORDER BY g.n) AS pos
            FROM unnest($3::text[]) WITH ORDINALITY AS g(k, n)) o
CROSS JOIN LATERAL (SELECT ARRAY[t.employee, t.department, t.model, t.project, t.day, t.month,
                                 t.tag1, t.tag2, t.tag3] AS v) x
ORDER BY x.v[o.pos[1]] COLLATE "C", x.v[o.pos[2]] COLLATE "C", x.v[o.pos[3]] COLLATE "C",
         x.v[o.pos[4]] COLLATE "C", x.v[o.pos[5]] COLLATE "C", x.v[o.pos[6]] COLLATE "C",
         x.v[o.pos[7]] COLLATE "C", x.v[o.pos[8]] COLLATE "C", x.v[o.pos[9]] COLLATE "C";

-- name: report_lead_values
-- The values of a report's leading key ($3: 'model', 'project' or 'tag', the
-- tag's name $4) among the usage events and the debits and captures of
-- [$1, $2), after $6 (byte order; null $6: from the first), in the report's
-- order (null last), at most $5: the chunks of a report led by that key with
-- the employee that is read from the events and the journal themselves
-- (service/reports.py, _value_range_plan). As usage_report reads them (`raw`):
-- the events' model, project ('' is null) and tags, the transactions'
-- metadata. A superset (a transaction with no spending entry has no row
-- there): a chunk of such a value only has no rows. Each table's values
-- grouped apart, so that each is hashed with parallel workers (read whole,
-- then made distinct, a month's 1.3 million values were sorted: 0.98 s, against
-- 0.39 s).
SELECT v FROM (
    SELECT CASE $3::text WHEN 'model' THEN u.model WHEN 'project' THEN nullif(u.project, '')
                ELSE u.tags ->> $4::text END AS v
    FROM usage_events u
    WHERE u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    GROUP BY 1
    UNION ALL
    SELECT CASE $3::text WHEN 'model' THEN u.model WHEN 'project' THEN nullif(u.project, '')
                ELSE u.tags ->> $4::text END
    FROM usage_events_archive u
    WHERE u.occurred_at >= $1::timestamptz AND u.occurred_at < $2::timestamptz
    GROUP BY 1
    UNION ALL
    SELECT CASE $3::text WHEN 'model' THEN t.metadata ->> 'model'
                WHEN 'project' THEN nullif(t.metadata ->> 'project', '')
                ELSE t.metadata ->> $4::text END
    FROM transactions t
    WHERE t.kind IN ('debit', 'capture')
      AND t.created_at >= $1::timestamptz AND t.created_at < $2::timestamptz
    GROUP BY 1
) x
WHERE $6::text IS NULL OR v IS NULL OR (v COLLATE "C") > ($6::text COLLATE "C")
GROUP BY v
ORDER BY v COLLATE "C"
LIMIT $5;

-- name: report_employee_accounts
-- Up to $3 employee accounts from the employee $1 on (byte order, the
-- report's; $2: $1 itself included), with their employees: the next chunk of
-- a JSON page of a report led by the employee (service/reports.py,
-- _employee_pages), by accounts_employee_ref_idx.
SELECT a.id, a.ref FROM accounts a
WHERE a.type = 'employee' AND (a.ref COLLATE "C") >= ($1::text COLLATE "C")
  AND ((a.ref COLLATE "C") <> ($1::text COLLATE "C") OR $2::boolean)
ORDER BY (a.ref COLLATE "C")
LIMIT $3;

-- name: report_accounts_after
-- The accounts whose rows come from the employee $1 on in a report led by a
-- value and then the employee: those of the employees from $1 on (byte order,
-- the report's) and every account without an employee (null, last); and how
-- many employees there are, and from $1 on. A page that reads the rows of its
-- cursor's value alone reads only theirs when they are few enough
-- (service/reports.py, _value_range_plan).
SELECT array_agg(a.id) FILTER (
           WHERE a.type <> 'employee' OR (a.ref COLLATE "C") >= ($1::text COLLATE "C")) AS ids,
       count(*) FILTER (WHERE a.type = 'employee') AS employees,
       count(*) FILTER (
           WHERE a.type = 'employee' AND (a.ref COLLATE "C") >= ($1::text COLLATE "C")) AS after
FROM accounts a;

-- name: report_unowned_accounts
-- The accounts without an employee (departments', the system's): the rows of
-- a report led by the employee whose employee is null, last in its order.
SELECT a.id FROM accounts a WHERE a.type <> 'employee' ORDER BY a.id;

-- name: report_departments
-- Up to $3 departments from $1 on (byte order, the report's; $2: $1 itself
-- included): the next chunk of a report led by the department
-- (service/reports.py, _department_pages).
SELECT d.id FROM departments d
WHERE (d.id COLLATE "C") >= ($1::text COLLATE "C")
  AND ((d.id COLLATE "C") <> ($1::text COLLATE "C") OR $2::boolean)
ORDER BY (d.id COLLATE "C")
LIMIT $3;

-- name: report_department_accounts
-- The accounts whose spend a report may put under one of the departments
-- $1: the departments' own, and those of every employee who is or ever was
-- in one of them (employee_departments keeps each move, the first
-- department included). A superset for an employee who moved: the caller
-- keeps the rows of $1's departments.
SELECT a.id FROM accounts a
WHERE a.address = ANY (ARRAY(SELECT 'department:' || d FROM unnest($1::text[]) d))
   OR a.address = ANY (ARRAY(
          SELECT 'employee:' || e.id FROM employees e WHERE e.department = ANY ($1::text[])
          UNION
          SELECT 'employee:' || h.employee_id FROM employee_departments h
          WHERE h.department = ANY ($1::text[])))
ORDER BY a.id;

-- name: report_system_accounts
-- The accounts of no department (the system's): the rows of a report led by
-- the department whose department is null, last in its order.
SELECT a.id FROM accounts a WHERE a.type = 'system' ORDER BY a.id;
