-- The SQL of bench/reports.py: a month of usage events and a journal for the
-- report timings, built set-based. Each section is one script; {departments},
-- {employees}, {grant}, {debits}, {debit}, {start} and {end} are filled in by
-- str.format (so a literal brace is doubled), $1.. are bound parameters.

-- section: setup
-- The directory, its accounts, four priced models, and numbered accounts and
-- models for the events to draw from.
INSERT INTO departments (id, name)
    SELECT 'dept-' || g, 'Department ' || g FROM generate_series(1, {departments}) g;
INSERT INTO employees (id, name, email, department)
    SELECT 'emp-' || g, 'Employee ' || g, 'emp-' || g || '@example.com',
           'dept-' || (g % {departments} + 1)
    FROM generate_series(1, {employees}) g;
INSERT INTO accounts (address, type, ref)
    SELECT 'department:' || id, 'department', id FROM departments
    UNION ALL SELECT 'employee:' || id, 'employee', id FROM employees;
INSERT INTO prices (id, model, effective_from, input_per_mtok, cached_input_per_mtok,
                    output_per_mtok, source)
    VALUES (gen_random_uuid(), 'gpt-4o', '2026-01-01', 2500000, 1250000, 10000000, 'bench'),
           (gen_random_uuid(), 'gpt-4o-mini', '2026-01-01', 150000, 75000, 600000, 'bench'),
           (gen_random_uuid(), 'claude-sonnet', '2026-01-01', 3000000, 300000, 15000000, 'bench'),
           (gen_random_uuid(), 'o3', '2026-01-01', 2000000, 500000, 8000000, 'bench');
CREATE TEMP TABLE bench_accounts AS
    SELECT row_number() OVER (ORDER BY id) AS n, id, type FROM accounts;
CREATE TEMP TABLE bench_models AS
    SELECT row_number() OVER (ORDER BY model) - 1 AS n, * FROM prices;

-- section: events
-- Usage events $3..$4 of the month [$1, $2): one in twenty on a department,
-- the rest on employees; most with a project and a team tag.
WITH g AS (
    SELECT g AS n,
           CASE WHEN random() < 0.05 THEN 1 + floor(random() * {departments})::int
                ELSE {departments} + 1 + floor(random() * {employees})::int END AS account_n,
           floor(random() * 4)::int AS model_n,
           floor(random() * 9)::int AS project_n,
           $1::timestamptz + random() * ($2::timestamptz - $1::timestamptz) AS occurred_at,
           floor(random() * 20000)::bigint AS input_tokens,
           floor(random() * 2000)::bigint AS output_tokens
    FROM generate_series($3::bigint, $4::bigint) g
)
INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens,
                          cached_input_tokens, output_tokens, cost, project, occurred_at,
                          recorded_at, tags)
SELECT gen_random_uuid(), 'bench', g.n::text, a.id, m.model, m.id, g.input_tokens,
       g.input_tokens / 4, g.output_tokens,
       ceil(((g.input_tokens - g.input_tokens / 4) * m.input_per_mtok
             + (g.input_tokens / 4) * m.cached_input_per_mtok
             + g.output_tokens * m.output_per_mtok) / 1e6)::bigint,
       CASE WHEN g.project_n > 0 THEN 'project-' || g.project_n END,
       least(g.occurred_at, $2::timestamptz - interval '1 microsecond'), g.occurred_at,
       CASE WHEN g.project_n > 1 THEN jsonb_build_object('team', 'team-' || g.project_n)
            ELSE '{{}}'::jsonb END
FROM g
JOIN bench_accounts a ON a.n = g.account_n
JOIN bench_models m ON m.n = g.model_n

-- section: rollup
-- The same rows the service's tl_usage_rollup_many keeps, built in bulk
-- (bench/year.py builds its year's roll-ups with it too).
INSERT INTO usage_daily (day, account_id, model, project, events, input_tokens,
                         cached_input_tokens, output_tokens, credits)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, account_id, model, coalesce(project, ''),
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3, 4;
INSERT INTO usage_monthly (month, account_id, model, project, events, input_tokens,
                           cached_input_tokens, output_tokens, credits)
SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, account_id, model,
       coalesce(project, ''), count(*), sum(input_tokens), sum(cached_input_tokens),
       sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3, 4;
INSERT INTO usage_monthly_models (month, account_id, model, events, input_tokens,
                                  cached_input_tokens, output_tokens, credits)
SELECT date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, account_id, model,
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3;
INSERT INTO usage_daily_models (day, model, project, shard, events, input_tokens,
                                cached_input_tokens, output_tokens, credits)
SELECT (occurred_at AT TIME ZONE 'UTC')::date, model, coalesce(project, ''), 0,
       count(*), sum(input_tokens), sum(cached_input_tokens), sum(output_tokens), sum(cost)
FROM usage_events
GROUP BY 1, 2, 3;

-- section: journal
-- The journal the finance reports read (issue 16): a grant per employee a
-- minute into the month (a lot expiring after it), and JOURNAL_DEBITS debits
-- per employee spread over the month, with consistent balance_after and
-- versions (two in three with a model and a team in their metadata, which
-- usage reports group by); the usage events stay outside the journal. Written
-- set-based with triggers off (session_replication_role = replica), so the
-- deferred balance check does not run per row; the bench does not audit.
SET session_replication_role = replica;
CREATE TEMP TABLE bench_wallets AS
    SELECT id, ref, row_number() OVER (ORDER BY id) AS n FROM accounts WHERE type = 'employee';
INSERT INTO transactions (id, kind, details, actor, created_at)
    SELECT md5('g' || id)::uuid, 'grant', '{{"reason": "monthly_allotment"}}', 'bench',
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets;
INSERT INTO lots (id, account_id, amount, remaining, priority, effective_at, expires_at,
                  grant_transaction_id, funded_by, created_at)
    SELECT md5('l' || id)::uuid, id, {grant}, {grant} - {debits} * {debit}, 100,
           '{start}'::timestamptz + interval '1 minute', '{end}'::timestamptz + interval '10 days',
           md5('g' || id)::uuid, (SELECT id FROM accounts WHERE address = 'system:issuance'),
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets;
INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version,
                     created_at)
    SELECT md5('g' || id)::uuid, id, 0, 'CREDIT', {grant}, {grant}, 1,
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets
    UNION ALL
    SELECT md5('g' || w.id)::uuid, i.id, 0, 'CREDIT', -{grant}, -{grant} * w.n, w.n,
           '{start}'::timestamptz + interval '1 minute'
    FROM bench_wallets w, accounts i WHERE i.address = 'system:issuance';
INSERT INTO transactions (id, kind, metadata, actor, created_at)
    SELECT md5('d' || w.id || '-' || k)::uuid, 'debit',
           CASE WHEN k % 3 = 0 THEN '{{}}'::jsonb
                ELSE jsonb_build_object('model', 'batch-job', 'team', 'team-' || k % 7) END,
           'bench',
           '{start}'::timestamptz
               + (k - 0.5) * ('{end}'::timestamptz - '{start}'::timestamptz) / {debits}
    FROM bench_wallets w, generate_series(1, {debits}) k;
INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version,
                     created_at)
    SELECT md5('d' || w.id || '-' || k)::uuid, w.id, 0, 'CREDIT', -{debit},
           {grant} - {debit} * k, 1 + k,
           '{start}'::timestamptz
               + (k - 0.5) * ('{end}'::timestamptz - '{start}'::timestamptz) / {debits}
    FROM bench_wallets w, generate_series(1, {debits}) k;
UPDATE accounts SET posted = {grant} - {debits} * {debit}, version = 1 + {debits}
    WHERE type = 'employee';
INSERT INTO employee_departments (employee_id, department, since)
    SELECT id, department, '-infinity' FROM employees ON CONFLICT DO NOTHING;
SET session_replication_role = origin;
