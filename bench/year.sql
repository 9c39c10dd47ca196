-- The SQL of bench/year.py: a year of history, built set-based. Each
-- section is run statement by statement (split at ";\n"); {grant},
-- {rollover}, {departments} and {employees} are filled in by str.format.

-- section: stage
DROP TABLE IF EXISTS y_em, y_spend, y_legs;
-- A version-7 UUID for an instant, like tl_uuid7 at that clock: ids in time
-- order, as the service makes them, so that every index on an id is
-- appended to (random ids made the load several times slower).
CREATE FUNCTION pg_temp.uuid7_at(p timestamptz) RETURNS uuid LANGUAGE sql VOLATILE AS $f$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM p) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$f$;
CREATE UNLOGGED TABLE y_em AS
WITH emp AS (
    SELECT row_number() OVER (ORDER BY a.id) AS e, a.id AS account_id, a.ref AS employee_id
    FROM accounts a WHERE a.type = 'employee'),
months AS (
    SELECT m, $1::timestamptz + make_interval(months => m) AS start,
           $1::timestamptz + make_interval(months => m + 1) AS next_start
    FROM generate_series(0, $2::int) m),
weights AS (SELECT sum(power(e, -0.9)) AS total FROM emp)
SELECT emp.e, emp.account_id, emp.employee_id, months.m, months.start, months.next_start,
       to_char(months.start AT TIME ZONE 'UTC', 'YYYY-MM') AS cycle,
       -- The current cycle is spent only up to $4 (an hour ago).
       CASE WHEN months.m < $2 THEN months.next_start ELSE $4::timestamptz END AS spend_end,
       CASE WHEN $3::bigint = 0 THEN 0
            ELSE greatest(1, round($3::numeric * power(emp.e, -0.9) / weights.total / $5::numeric
                                   * CASE WHEN months.m < $2 THEN 1
                                          ELSE extract(epoch FROM $4::timestamptz - months.start)
                                               / extract(epoch FROM months.next_start - months.start) END))
       END::bigint AS n,
       -- What the cycle spends: 35% to 95% of what the cycle's lot may give
       -- and still roll over its ROLLOVER credits.
       floor((0.35 + 0.6 * random()) * ({grant} - {rollover}))::bigint AS budget,
       CASE WHEN months.m = 0 THEN 0 ELSE {rollover} END::bigint AS a,
       pg_temp.uuid7_at(months.start) AS lot_a, pg_temp.uuid7_at(months.start) AS lot_b,
       pg_temp.uuid7_at(months.start) AS grant_txn, pg_temp.uuid7_at(months.next_start) AS roll_txn,
       pg_temp.uuid7_at(months.next_start) AS exp_txn
FROM emp CROSS JOIN months CROSS JOIN weights;
ALTER TABLE y_em ADD COLUMN x bigint, ADD COLUMN spent bigint, ADD COLUMN sa bigint, ADD COLUMN sb bigint;
UPDATE y_em SET x = CASE WHEN n = 0 THEN 0 ELSE greatest(1, budget / n) END;
UPDATE y_em SET spent = n * x;
UPDATE y_em SET sa = least(spent, a), sb = spent - least(spent, a);
CREATE INDEX ON y_em (e, m);
ANALYZE y_em;

CREATE UNLOGGED TABLE y_spend AS
SELECT *, pg_temp.uuid7_at(t) AS txn, pg_temp.uuid7_at(t - interval '2 seconds') AS rsv FROM (
SELECT em.e, em.m, em.account_id, i,
       em.start + interval '5 seconds'
           + ((i - 0.5 + 0.8 * (random() - 0.5)) / em.n)
             * (em.spend_end - em.start - interval '10 seconds') AS t,
       em.x,
       greatest(0, least(i * em.x, em.a) - (i - 1) * em.x) AS from_a,
       em.x - greatest(0, least(i * em.x, em.a) - (i - 1) * em.x) AS from_b,
       em.lot_a, em.lot_b,
       CASE WHEN r < 0.7 THEN 'usage' WHEN r < 0.9 THEN 'capture' ELSE 'debit' END AS kind,
       least(em.x, 1 + floor(random() * 5))::int AS k
FROM y_em em
CROSS JOIN LATERAL generate_series(1, em.n) i
CROSS JOIN LATERAL (SELECT random() + 0 * i AS r) rr
WHERE em.n > 0) s;
ANALYZE y_spend;

-- section: directory
INSERT INTO departments (id, name)
    SELECT 'dept-' || g, 'Department ' || g FROM generate_series(1, {departments}) g;
INSERT INTO employees (id, name, email, department)
    SELECT 'emp-' || g, 'Employee ' || g, 'emp-' || g || '@example.com', 'dept-' || (g % {departments} + 1)
    FROM generate_series(1, {employees}) g;
INSERT INTO accounts (address, type, ref)
    SELECT 'department:' || id, 'department', id FROM departments
    UNION ALL SELECT 'employee:' || id, 'employee', id FROM employees ORDER BY 1;
INSERT INTO prices (id, model, effective_from, input_per_mtok, cached_input_per_mtok,
                    output_per_mtok, source)
    VALUES (gen_random_uuid(), 'gpt-4o', '2020-01-01', 2500000, 1250000, 10000000, 'bench'),
           (gen_random_uuid(), 'gpt-4o-mini', '2020-01-01', 150000, 75000, 600000, 'bench'),
           (gen_random_uuid(), 'claude-sonnet', '2020-01-01', 3000000, 300000, 15000000, 'bench'),
           (gen_random_uuid(), 'o3', '2020-01-01', 2000000, 500000, 8000000, 'bench');
INSERT INTO grant_programs (id, amount, reason, cadence_day, time_zone, audience, expiry, rollover_max,
                            funded_by, starts_on, active, activated_at, created_at, updated_at)
    SELECT 'monthly', {grant}, 'monthly_allotment', 1, 'UTC', '{{"all": true}}', '{{"at": "end_of_cycle"}}',
           {rollover}, tl_account_id('system:issuance'), ($1::timestamptz AT TIME ZONE 'UTC')::date, true,
           $1::timestamptz, $1::timestamptz, $1::timestamptz;

-- section: journal
CREATE TEMP TABLE y_sys AS SELECT
    tl_account_id('system:issuance') AS issuance, tl_account_id('system:usage') AS usage,
    tl_account_id('system:expired') AS expired;
CREATE TEMP TABLE y_models AS SELECT row_number() OVER (ORDER BY model) - 1 AS n, id, model FROM prices;

INSERT INTO program_runs (id, program_id, cycle, trigger, issued, credits, actor, request_id, ran_at,
                          completed_at)
SELECT gen_random_uuid(), 'monthly', cycle, 'scheduler', count(*), count(*) * {grant}, 'system:scheduler',
       'scheduler', min(start) + interval '3 ms', min(start) + interval '4 ms'
FROM y_em GROUP BY cycle;

INSERT INTO transactions (id, kind, metadata, details, actor, request_id, created_at)
SELECT grant_txn, 'grant', '{{}}'::jsonb, jsonb_build_object('program', 'monthly', 'cycle', cycle,
       'reason', 'monthly_allotment'), 'system:scheduler', 'scheduler', start + interval '3 ms'
FROM y_em
UNION ALL
SELECT roll_txn, 'rollover', '{{}}'::jsonb, jsonb_build_object('from_lot', tl_public_id('lot_', lot_b),
       'rollover_max', {rollover}), 'system:sweeper', 'sweeper', next_start + interval '1 ms'
FROM y_em WHERE m < $1
UNION ALL
SELECT exp_txn, 'expiry', '{{}}'::jsonb, '{{}}'::jsonb, 'system:sweeper', 'sweeper', next_start + interval '2 ms'
FROM y_em WHERE m < $1
UNION ALL
SELECT txn, kind, jsonb_build_object('model', 'bench'),
       CASE WHEN kind = 'capture' THEN jsonb_build_object('reservation_id', tl_public_id('rsv_', rsv))
            ELSE '{{}}'::jsonb END,
       'gateway', 'req-' || i, t
FROM y_spend
ORDER BY 7;

CREATE UNLOGGED TABLE y_legs AS
SELECT grant_txn AS txn, account_id, 0 AS shard, {grant}::bigint AS amount, start + interval '3 ms' AS at, 1 AS ord
FROM y_em
UNION ALL SELECT grant_txn, (SELECT issuance FROM y_sys), floor(random() * 16)::int, -{grant},
                 start + interval '3 ms', 2 FROM y_em
UNION ALL SELECT roll_txn, account_id, 0, -{rollover}, next_start + interval '1 ms', 1 FROM y_em WHERE m < $1
UNION ALL SELECT roll_txn, account_id, 0, {rollover}, next_start + interval '1 ms', 2 FROM y_em WHERE m < $1
UNION ALL SELECT exp_txn, account_id, 0, -((a - sa) + ({grant} - sb) - {rollover}), next_start + interval '2 ms', 1
FROM y_em WHERE m < $1
UNION ALL SELECT exp_txn, (SELECT expired FROM y_sys), floor(random() * 16)::int,
                 (a - sa) + ({grant} - sb) - {rollover}, next_start + interval '2 ms', 2 FROM y_em WHERE m < $1
UNION ALL SELECT txn, account_id, 0, -x, t, 1 FROM y_spend
UNION ALL SELECT txn, (SELECT usage FROM y_sys), floor(random() * 16)::int, x, t, 2 FROM y_spend;

INSERT INTO entries (transaction_id, account_id, shard, asset, amount, balance_after, version, created_at)
SELECT txn, account_id, shard, 'CREDIT', amount, sum(amount) OVER w, row_number() OVER w, at
FROM y_legs
WINDOW w AS (PARTITION BY account_id, shard ORDER BY at, txn, ord)
ORDER BY at, txn, ord;

UPDATE accounts a SET posted = s.total, version = s.n
FROM (SELECT account_id, sum(amount) AS total, count(*) AS n FROM y_legs WHERE shard = 0 GROUP BY 1) s
WHERE a.id = s.account_id AND a.shard_count = 1;
UPDATE account_shards sh SET posted = s.total, version = s.n
FROM (SELECT account_id, shard, sum(amount) AS total, count(*) AS n FROM y_legs GROUP BY 1, 2) s
WHERE sh.account_id = s.account_id AND sh.shard = s.shard;

-- Lots: each cycle's grant lot (b) and, from the second cycle on, the lot
-- the previous cycle rolled over into (a).
INSERT INTO lots (id, account_id, amount, remaining, reserved, priority, effective_at, expires_at,
                  grant_transaction_id, funded_by, source_lot_id, status, created_at, rollover_max,
                  rollover_until, rolled_at)
SELECT lot_b, account_id, {grant}, CASE WHEN m < $1 THEN 0 ELSE {grant} - sb END, 0, 100, start, next_start,
       grant_txn, (SELECT issuance FROM y_sys), NULL, 'active', start + interval '3 ms', {rollover},
       next_start + (next_start - start), CASE WHEN m < $1 THEN next_start + interval '1 ms' END
FROM y_em
UNION ALL
SELECT em.lot_a, em.account_id, {rollover}, CASE WHEN em.m < $1 THEN 0 ELSE {rollover} - em.sa END, 0, 100,
       em.start, em.next_start, prev.roll_txn, (SELECT issuance FROM y_sys), prev.lot_b, 'active',
       em.start + interval '1 ms', NULL, NULL, NULL
FROM y_em em JOIN y_em prev ON prev.e = em.e AND prev.m = em.m - 1;

INSERT INTO lot_movements (transaction_id, lot_id, amount)
SELECT grant_txn, lot_b, {grant} FROM y_em
UNION ALL SELECT em.roll_txn, em.lot_b, -{rollover} FROM y_em em WHERE em.m < $1
UNION ALL SELECT em.roll_txn, nx.lot_a, {rollover} FROM y_em em JOIN y_em nx ON nx.e = em.e AND nx.m = em.m + 1
UNION ALL SELECT exp_txn, lot_a, -(a - sa) FROM y_em WHERE m < $1 AND m > 0 AND a - sa > 0
UNION ALL SELECT exp_txn, lot_b, -(({grant} - sb) - {rollover}) FROM y_em WHERE m < $1
UNION ALL SELECT txn, lot_a, -from_a FROM y_spend WHERE from_a > 0
UNION ALL SELECT txn, lot_b, -from_b FROM y_spend WHERE from_b > 0;

INSERT INTO program_grants (program_id, cycle, employee_id, amount, transaction_id, lot_id, run_id, created_at)
SELECT 'monthly', em.cycle, em.employee_id, {grant}, em.grant_txn, em.lot_b, r.id, em.start + interval '3 ms'
FROM y_em em JOIN program_runs r ON r.program_id = 'monthly' AND r.cycle = em.cycle;

INSERT INTO reservations (id, account_id, amount, captured, status, expires_at, capture_transaction_id, actor,
                          request_id, created_at, resolved_at)
SELECT rsv, account_id, x, x, 'captured', t + interval '5 minutes', txn, 'gateway', 'req-' || i,
       t - interval '2 seconds', t
FROM y_spend WHERE kind = 'capture';
INSERT INTO reservation_holds (reservation_id, lot_id, amount)
SELECT rsv, lot_a, from_a FROM y_spend WHERE kind = 'capture' AND from_a > 0
UNION ALL SELECT rsv, lot_b, from_b FROM y_spend WHERE kind = 'capture' AND from_b > 0;

INSERT INTO usage_events (id, source, event_id, account_id, model, price_id, input_tokens, cached_input_tokens,
                          output_tokens, cost, transaction_id, project, tags, occurred_at, recorded_at)
SELECT pg_temp.uuid7_at(s.t), 'gateway', s.txn::text || '-' || j, s.account_id, mo.model, mo.id,
       3 * c.cost, c.cost / 2, c.cost, c.cost, s.txn,
       CASE WHEN s.e % 9 > 0 THEN 'project-' || (s.e % 9) END, '{{}}', s.t - make_interval(secs => j), s.t
FROM y_spend s
CROSS JOIN LATERAL generate_series(1, s.k) j
CROSS JOIN LATERAL (SELECT s.x / s.k + CASE WHEN j = s.k THEN s.x % s.k ELSE 0 END AS cost) c
JOIN y_models mo ON mo.n = (s.e + j) % 4
WHERE s.kind = 'usage'
ORDER BY s.t;

INSERT INTO idempotency_keys (caller, key, request_hash, status_code, body, created_at)
SELECT 'gateway', 'k-' || txn, '\x00', 201, jsonb_build_object('id', tl_public_id('txn_', txn)), t
FROM y_spend WHERE kind <> 'usage' AND t > (SELECT max(t) FROM y_spend) - interval '35 days';

-- Lots that hold nothing are settled from their last movement on, as the
-- background loop's tl_settle_lots marks them, and its progress mark is
-- past every movement (the as-of balance then skips them: schema.sql,
-- "Settled lots").
INSERT INTO lot_settled (lot_id, settled_at)
SELECT m.lot_id, max(t.created_at)
FROM lot_movements m JOIN transactions t ON t.id = m.transaction_id JOIN lots l ON l.id = m.lot_id
WHERE l.remaining = 0
GROUP BY m.lot_id;
UPDATE lot_settle_progress SET movement_id = x.id, seen_id = x.id
FROM (SELECT coalesce(max(id), 0) AS id FROM lot_movements) x WHERE name = 'lots';
