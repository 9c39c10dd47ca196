-- name: prices_versions
-- One page of price versions, newest first, of one model ($1) or of all
-- (NULL); $2, $3 are the cursor (effective_from, id of the last row seen,
-- exclusive); $4 the page size plus one.
SELECT jsonb_build_array(tl_ts(p.effective_from), p.id::text) AS cursor, tl_price_json(p) AS item
FROM prices p
WHERE ($1::text IS NULL OR p.model = $1)
  AND ($2::timestamptz IS NULL OR (p.effective_from, p.id) < ($2, $3::uuid))
ORDER BY p.effective_from DESC, p.id DESC
LIMIT $4;

-- name: prices_at
-- One page of the versions in effect at $2, one per model, by model name:
-- of one model ($1) or of all (NULL); $3 is the cursor (the last model
-- seen, exclusive); $4 the page size plus one.
SELECT p.model AS cursor, tl_price_json(p) AS item
FROM (SELECT DISTINCT ON (model) * FROM prices
      WHERE ($1::text IS NULL OR model = $1) AND effective_from <= $2
        AND ($3::text IS NULL OR model > $3)
      ORDER BY model, effective_from DESC) p
ORDER BY p.model
LIMIT $4;

-- name: price_at
-- The version of model $1 in effect at $2, as the row (NULL when none).
SELECT (tl_price_at($1, $2)).*;

-- name: add_price
-- Adds a price version outside a request (the import command): $1 arguments
-- as for POST /v1/prices plus `source`, $2 context.
SELECT tl_op_add_price($1, $2);
