-- Spend policy (issue 12): tl_policy_batch_links answers the batch's limit
-- links as arrays (OUT parameters) instead of a set of rows, which
-- tl_batch_fast aggregated back into arrays. A function's result type cannot
-- be replaced in place, so the old one goes here; schema.sql, which runs
-- after this, creates the new one.
DROP FUNCTION IF EXISTS tl_policy_batch_links(bigint[], timestamptz);
