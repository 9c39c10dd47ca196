-- name: approvals_page
-- Approvals newest first, of one status ($1) or all, after the cursor $2
-- (the id of the last one seen, exclusive); $3 the page size plus one.
SELECT a.id::text AS cursor, tl_approval_json(a) AS item
FROM approvals a
WHERE ($1::text IS NULL OR a.status = $1)
  AND ($2::uuid IS NULL OR a.id < $2)
ORDER BY a.id DESC
LIMIT $3;

-- name: approval_json
SELECT tl_approval_json(a) FROM approvals a WHERE a.id = $1;

-- name: approval_find
-- The approval of a caller's deduplicated request ($1 caller, $2 dedup_key).
SELECT tl_approval_json(a) FROM approvals a WHERE a.requested_by = $1 AND a.dedup_key = $2;

-- name: approval_set_result
-- Records what an approved program run issued ($1 id, $2 the run).
SELECT tl_approval_set_result($1, $2);


-- name: import_grants
-- A CSV import's grants, set-based ($1 caller, $2 items, $3 context).
SELECT tl_import_grants($1, $2, $3);
