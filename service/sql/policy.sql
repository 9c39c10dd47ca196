-- Spend policy (schema.sql, "Spend policy").

-- name: put_policy
-- Replaces the policy of a wallet or department ($1 args, $2 context).
SELECT tl_op_put_policy($1, $2);

-- name: policy_json
-- The policy of an account with its current windows at an instant (null clock = now).
SELECT tl_policy_json(a.id, coalesce($2::timestamptz, clock_timestamp()))
FROM accounts a WHERE a.address = $1;
