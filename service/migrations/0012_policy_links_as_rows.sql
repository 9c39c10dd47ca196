-- Spend policy (issue 12): policy_links keeps one row per limit (account_id,
-- rank) instead of one row per account with the limits as arrays, which a
-- coalesced batch unnested per wallet. The table is derived (schema.sql's
-- last section makes the rows of every bound account that has none, from
-- its policies), so the array-shaped one is dropped here and schema.sql,
-- which runs after this, creates and fills the new one.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_schema = current_schema() AND table_name = 'policy_links'
                  AND column_name = 'owner' AND data_type = 'ARRAY') THEN
        DROP TABLE policy_links;
    END IF;
END $$;
