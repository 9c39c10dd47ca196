-- Alerts and webhooks (schema.sql, "Alerts and webhooks"; service/webhooks/).

-- name: put_alerts
-- Replace an account's alert settings; the settings as JSON.
SELECT tl_put_alerts($1, $2);

-- name: get_alerts
-- An account's alert settings (empty when none were set), or NULL.
SELECT tl_alerts_json(id) FROM accounts WHERE address = $1;

-- name: emit_expiring
-- credits.expiring for the lots now within their account's window; how many.
SELECT tl_emit_expiring(coalesce($1::timestamptz, clock_timestamp()), $2);

-- name: webhook_get
-- One live webhook, or NULL.
SELECT tl_webhook_json(w) FROM webhooks w WHERE w.id = $1 AND w.deleted_at IS NULL;

-- name: webhook_secret
-- The encrypted secret of a webhook (deleted or not), for the answer to a
-- replayed POST /v1/webhooks.
SELECT secret_encrypted FROM webhooks WHERE id = $1;

-- name: webhook_list
-- Live webhooks, newest first, after the cursor's id.
SELECT tl_webhook_json(w) AS item, w.id::text AS cursor
FROM webhooks w
WHERE w.deleted_at IS NULL AND ($1::uuid IS NULL OR w.id < $1::uuid)
ORDER BY w.id DESC
LIMIT $2;

-- name: webhook_delete
-- Delete a webhook: true when it was live.
SELECT tl_delete_webhook($1);

-- name: webhook_deliveries
-- A webhook's deliveries with their attempts, newest first, after the cursor's id.
SELECT tl_delivery_json(d) AS item, d.id::text AS cursor
FROM webhook_deliveries d
WHERE d.webhook_id = $1 AND ($2::uuid IS NULL OR d.id < $2::uuid)
ORDER BY d.id DESC
LIMIT $3;

-- name: webhook_fanout
-- Fan new outbox events out to deliveries; how many events.
SELECT tl_webhook_fanout($1, $2);

-- name: webhook_claim
-- Claim due deliveries for this replica (leased; attempts logged).
SELECT * FROM tl_webhook_claim($1, $2, $3, $4);

-- name: webhook_record
-- Record an attempt's outcome: delivered, retry, failed or stale.
SELECT tl_webhook_record($1, $2, $3, $4, $5, $6, $7, $8);

-- name: webhook_stats
-- Outbox lag (oldest event not fanned out, or with a delivery pending) and
-- the pending deliveries.
SELECT coalesce(extract(epoch FROM clock_timestamp() - least(
           (SELECT min(created_at) FROM outbox WHERE fanned_out_at IS NULL),
           (SELECT min(o.created_at) FROM webhook_deliveries d JOIN outbox o ON o.seq = d.event_seq
            WHERE d.status = 'pending'))), 0)::float8 AS lag_seconds,
       (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending') AS pending;
