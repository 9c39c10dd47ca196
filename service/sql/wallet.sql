-- name: account_spend
-- What one account spent over [$2, $3), for the wallet page, as one JSON
-- object, all by when the journal recorded it: every debit, usage and
-- capture transaction's leg on the account, net of the reversals of such
-- transactions (`credits`, and per UTC day in `days`), and the same credits
-- per model and project (`models`): a usage leg split into the usage events
-- it charged (their cost less any shortfall charged to system:overage,
-- archived events included); a debit or capture under its metadata's
-- `model` and `project` (a capture without a model in its metadata: the
-- model its reservation's estimate named); a reversal under what it
-- reverses, negated. Spend that names no model is the group whose model is
-- null, and whatever a usage leg charged beyond its events (nothing, while
-- the ledger is sound) is counted there too, so the groups always add up to
-- `credits`. `events` counts the usage events, debits and captures (a
-- reversal takes credits back, not the call).
--
-- Reads the account's own index range (entries_account_time_idx) and, per
-- leg, its transaction (and the reversed one) and its usage events
-- (usage_events_transaction_idx): a wallet's page costs the same however
-- large the ledger is.
WITH legs AS (
    SELECT t.id,
           (min(e.created_at) AT TIME ZONE 'UTC')::date AS day,
           -sum(e.amount) AS credits,
           coalesce(o.id, t.id) AS origin_id,
           coalesce(o.kind, t.kind) AS origin_kind,
           coalesce(o.metadata, t.metadata) AS metadata,
           coalesce(o.details, t.details) AS details,
           t.kind <> 'reversal' AS forward
    FROM entries e
    JOIN transactions t ON t.id = e.transaction_id
    LEFT JOIN transactions o ON o.id = t.reverses
    WHERE e.account_id = $1 AND e.shard = 0
      AND e.created_at >= $2::timestamptz AND e.created_at < $3::timestamptz
      AND (t.kind IN ('debit', 'usage', 'capture') OR o.kind IN ('debit', 'usage', 'capture'))
    GROUP BY t.id, o.id
),
parts AS (
    SELECT CASE WHEN l.origin_kind = 'capture'
                THEN coalesce(l.metadata ->> 'model',
                              (SELECT r.details ->> 'model' FROM reservations r
                               WHERE r.id = substr(l.details ->> 'reservation_id', 5)::uuid))
                ELSE l.metadata ->> 'model' END AS model,
           l.metadata ->> 'project' AS project,
           l.forward::integer AS events,
           l.credits
    FROM legs l
    WHERE l.origin_kind <> 'usage'
    UNION ALL
    SELECT ev.model, ev.project, l.forward::integer,
           CASE WHEN l.forward THEN 1 ELSE -1 END * (ev.cost - ev.shortfall)
    FROM legs l
    CROSS JOIN LATERAL (
        SELECT u.model, u.project, u.cost, u.shortfall FROM usage_events u
        WHERE u.transaction_id = l.origin_id AND u.account_id = $1
        UNION ALL
        SELECT a.model, a.project, a.cost, a.shortfall FROM usage_events_archive a
        WHERE a.transaction_id = l.origin_id AND a.account_id = $1
    ) ev
    WHERE l.origin_kind = 'usage'
),
total AS (
    SELECT coalesce(sum(credits), 0) AS credits FROM legs
),
grouped AS (
    SELECT p.model, p.project, sum(p.events) AS events, sum(p.credits) AS credits
    FROM (SELECT * FROM parts
          UNION ALL
          SELECT NULL, NULL, 0, (SELECT credits FROM total) - coalesce((SELECT sum(credits) FROM parts), 0)
         ) p
    GROUP BY 1, 2
    HAVING sum(p.events) <> 0 OR sum(p.credits) <> 0
),
days AS (
    SELECT day, sum(credits) AS credits FROM legs GROUP BY day
)
SELECT jsonb_build_object(
    'credits', (SELECT credits FROM total)::bigint,
    'days', coalesce((SELECT jsonb_agg(jsonb_build_object(
                          'day', to_char(day, 'YYYY-MM-DD'), 'credits', credits::bigint)
                          ORDER BY day)
                      FROM days), '[]'::jsonb),
    'models', coalesce((SELECT jsonb_agg(jsonb_build_object(
                            'model', model, 'project', project, 'events', events::bigint,
                            'credits', credits::bigint)
                            ORDER BY credits DESC, model COLLATE "C" NULLS LAST,
                                     project COLLATE "C" NULLS LAST)
                        FROM grouped), '[]'::jsonb));
