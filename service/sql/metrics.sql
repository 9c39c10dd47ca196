-- name: ledger_gauges
-- The ledger-wide gauges of /metrics, in one row (read at scrape time, at
-- most once a second per replica): how far the chainer, the expiry sweeper
-- and the grant-program scheduler are behind, and the balances of the
-- system accounts, whose movements are the credits issued, spent and
-- expired. Every part is an index range scan from its oldest due row.
-- chain_lag_seconds: age of the oldest transaction not yet chained (it
-- includes the settle window; 0 when everything is chained). Unchained
-- transactions lie at or after the head's created_at (minus a straggler
-- window the chainer also looks through).
-- sweeper_lag_seconds: age of the oldest expiry due and not yet written
-- (an unreserved part of a live lot past expires_at, or an active
-- reservation past expires_at); 0 when none is due.
-- scheduler_lag_seconds: age of the oldest grant-program cycle that has
-- started and has not been run; 0 when none is owed.
WITH head AS (
    SELECT t.created_at FROM chain c JOIN transactions t ON t.id = c.transaction_id
    ORDER BY c.seq DESC LIMIT 1
), unchained AS (
    -- A per-row look-up in chain's unique index, written as a scalar
    -- subquery so the planner cannot turn it into an anti-join that reads
    -- the whole chain: the scan walks transactions_created_idx from the head
    -- and stops at the first unchained row.
    SELECT t.created_at FROM transactions t
    WHERE t.created_at >= coalesce((SELECT created_at FROM head), '-infinity')
      AND (SELECT c.seq FROM chain c WHERE c.transaction_id = t.id) IS NULL
    ORDER BY t.created_at, t.id LIMIT 1
), due AS (
    SELECT least(
        (SELECT min(l.expires_at) FROM lots l
         WHERE l.status = 'active' AND l.live AND l.expires_at IS NOT NULL
           AND l.expires_at <= clock_timestamp() AND l.remaining > l.reserved),
        (SELECT min(r.expires_at) FROM reservations r
         WHERE r.status = 'active' AND r.expires_at <= clock_timestamp())) AS at
), owed AS (
    SELECT min(b.starts_at) AS at
    FROM tl_programs_due(clock_timestamp(), 100) d
    JOIN grant_programs p ON p.id = d.program_id
    CROSS JOIN LATERAL tl_cycle_bounds(d.cycle, p.cadence_day, p.time_zone) b
)
SELECT
    coalesce(extract(epoch FROM clock_timestamp() - (SELECT created_at FROM unchained)), 0)::float8
        AS chain_lag_seconds,
    coalesce(extract(epoch FROM clock_timestamp() - (SELECT at FROM due)), 0)::float8
        AS sweeper_lag_seconds,
    coalesce(extract(epoch FROM clock_timestamp() - (SELECT at FROM owed)), 0)::float8
        AS scheduler_lag_seconds,
    (SELECT coalesce(jsonb_object_agg(a.address, s.posted), '{}'::jsonb) FROM (
        SELECT sh.account_id, sum(sh.posted)::bigint AS posted FROM account_shards sh
        GROUP BY sh.account_id) s
     JOIN accounts a ON a.id = s.account_id
     WHERE a.type = 'system') AS system_balances;
