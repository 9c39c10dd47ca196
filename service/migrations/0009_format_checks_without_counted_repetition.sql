-- Format checks without counted repetition (schema.sql, "Tables"): the same
-- rules, written as a length bound and an unbounded pattern, because a
-- counted repetition such as {1,255} made the check of every Idempotency-Key
-- cost about 50 µs, twice per request. Every row that passed the old check
-- passes the new one; re-adding a check reads its table once.
ALTER TABLE departments DROP CONSTRAINT IF EXISTS departments_id_format,
    ADD CONSTRAINT departments_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$');
ALTER TABLE employees DROP CONSTRAINT IF EXISTS employees_id_format,
    ADD CONSTRAINT employees_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$');
ALTER TABLE accounts DROP CONSTRAINT IF EXISTS accounts_ref_format,
    ADD CONSTRAINT accounts_ref_format CHECK (length(ref) <= 64 AND ref ~ '^[a-z0-9][a-z0-9._-]*$');
ALTER TABLE idempotency_keys DROP CONSTRAINT IF EXISTS idempotency_keys_key_format,
    ADD CONSTRAINT idempotency_keys_key_format CHECK (length(key) <= 255 AND key ~ '^[\x20-\x7e]+$');
ALTER TABLE prices DROP CONSTRAINT IF EXISTS prices_model_format,
    ADD CONSTRAINT prices_model_format
        CHECK (length(model) <= 128 AND model ~ '^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$');
ALTER TABLE grant_programs DROP CONSTRAINT IF EXISTS grant_programs_id_format,
    ADD CONSTRAINT grant_programs_id_format CHECK (length(id) <= 64 AND id ~ '^[a-z0-9][a-z0-9._-]*$');
