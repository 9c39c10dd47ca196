-- name: account_spend
-- What one account spent over [$2, $3), for the wallet page, as one JSON
-- object: `credits` and `days` from the journal (the credits its debit,
-- usage and capture transactions took, net of any reversal of them, per UTC
-- day), `models` from its usage events (per model and project). Both read
-- the account's own index (entries_account_time_idx, usage_events_account_idx),
-- so a wallet's page costs the same however large the ledger is.
WITH spent AS (
    SELECT (e.created_at AT TIME ZONE 'UTC')::date AS day, -sum(e.amount) AS credits
    FROM entries e
    JOIN transactions t ON t.id = e.transaction_id
    WHERE e.account_id = $1 AND e.shard = 0
      AND e.created_at >= $2::timestamptz AND e.created_at < $3::timestamptz
      AND (t.kind IN ('debit', 'usage', 'capture')
           OR (t.kind = 'reversal' AND EXISTS (
                   SELECT 1 FROM transactions r
                   WHERE r.id = t.reverses AND r.kind IN ('debit', 'usage', 'capture'))))
    GROUP BY 1
),
models AS (
    SELECT u.model, u.project, count(*) AS events, sum(u.cost) AS credits
    FROM usage_events u
    WHERE u.account_id = $1
      AND u.occurred_at >= $2::timestamptz AND u.occurred_at < $3::timestamptz
    GROUP BY 1, 2
)
SELECT jsonb_build_object(
    'credits', coalesce((SELECT sum(credits) FROM spent), 0)::bigint,
    'days', coalesce((SELECT jsonb_agg(jsonb_build_object(
                          'day', to_char(day, 'YYYY-MM-DD'), 'credits', credits::bigint)
                          ORDER BY day)
                      FROM spent), '[]'::jsonb),
    'models', coalesce((SELECT jsonb_agg(jsonb_build_object(
                            'model', model, 'project', project, 'events', events,
                            'credits', credits::bigint)
                            ORDER BY credits DESC, model COLLATE "C", project COLLATE "C")
                        FROM models), '[]'::jsonb));
