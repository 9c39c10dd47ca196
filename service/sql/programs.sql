-- name: put_program
-- Creates or updates a grant program ($1 arguments, $2 context).
SELECT tl_op_put_program($1, $2);

-- name: program_json
SELECT tl_program_json($1, coalesce($2::timestamptz, clock_timestamp()));

-- name: programs_page
-- Programs by id after the cursor $1 (exclusive); $2 the page size plus one;
-- $3 the instant for current_cycle.
SELECT p.id AS cursor, tl_program_json(p.id, coalesce($3::timestamptz, clock_timestamp())) AS item
FROM grant_programs p
WHERE ($1::text IS NULL OR p.id > $1)
ORDER BY p.id
LIMIT $2;

-- name: run_program
-- Runs one batch of a cycle: $1 program, $2 cycle, $3 trigger, $4 context,
-- $5 the run to continue (NULL: a new one), $6 the cursor (the last
-- employee id of the previous batch), $7 the batch size. Returns {run, next}.
SELECT tl_program_run($1, $2, $3, NULL, $4, $5::uuid, $6::text, $7::integer);

-- name: program_runs_page
-- Runs of program $1, newest first, of one cycle ($2) or all; $3 the cursor
-- (id of the last run seen, exclusive); $4 the page size plus one.
SELECT r.id::text AS cursor, tl_program_run_json(r) AS item
FROM program_runs r
WHERE r.program_id = $1 AND ($2::text IS NULL OR r.cycle = $2)
  AND ($3::uuid IS NULL OR r.id < $3)
ORDER BY r.id DESC
LIMIT $4;

-- name: program_exists
SELECT EXISTS (SELECT 1 FROM grant_programs WHERE id = $1);

-- name: programs_due
-- The (program, cycle) pairs the scheduler owes at $1, oldest first, at most $2.
SELECT program_id, cycle FROM tl_programs_due(coalesce($1::timestamptz, clock_timestamp()), $2);
