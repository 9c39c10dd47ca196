-- name: put_department
-- Creates or updates a department and opens its account.
SELECT tl_op_put_department($1, $2);

-- name: put_employee
-- Creates or updates an employee and opens their wallet.
SELECT tl_op_put_employee($1, $2);

-- name: department_json
SELECT tl_department_json($1);

-- name: employee_json
SELECT tl_employee_json($1, coalesce($2::timestamptz, clock_timestamp()));
