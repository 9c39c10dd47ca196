-- Report tag keys (issue 16, tags16): the tag keys whose roll-ups are kept
-- (schema.sql, "Tag roll-ups"; README, Reports).

-- name: report_tag_keys
-- The declared tag keys, in slot order.
SELECT tl_report_tag_keys();

-- name: report_tags_sync
-- Makes the declared tag keys exactly $1 (TOKENLEDGER_REPORT_TAGS, at
-- start-up), rebuilding the tag roll-ups when they changed; whether it did.
SELECT tl_report_tags_sync($1::text[]);
