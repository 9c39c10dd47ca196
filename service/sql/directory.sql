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

-- name: employees_page
-- Employees by id after the cursor $1 (exclusive), filtered by department
-- $2, status $3 and search $4 (a lower-case prefix of the id, the name or
-- the email; each has an index), at most $5 rows (the page size plus one);
-- $6 the instant for the wallet balance. Keyset order by id: a page never
-- repeats or skips an employee however many are inserted meanwhile.
SELECT e.id AS cursor,
       jsonb_build_object('id', e.id, 'name', e.name, 'email', e.email, 'department', e.department,
                          'status', e.status, 'offboarded_at', tl_ts(e.offboarded_at),
                          'created_at', tl_ts(e.created_at), 'updated_at', tl_ts(e.updated_at)) AS item
FROM employees e
WHERE ($1::text IS NULL OR e.id > $1)
  AND ($2::text IS NULL OR e.department = $2)
  AND ($3::text IS NULL OR e.status = $3)
  AND ($4::text IS NULL
       OR e.id COLLATE "C" LIKE replace(replace(replace($4, '\', '\\'), '%', '\%'), '_', '\_') || '%'
       OR lower(e.name) COLLATE "C" LIKE replace(replace(replace($4, '\', '\\'), '%', '\%'), '_', '\_') || '%'
       OR lower(e.email) COLLATE "C" LIKE replace(replace(replace($4, '\', '\\'), '%', '\%'), '_', '\_') || '%')
ORDER BY e.id
LIMIT $5;

-- name: departments_page
-- Departments by id after the cursor $1 (exclusive), at most $2 rows.
SELECT d.id AS cursor, tl_department_json(d.id) AS item
FROM departments d
WHERE ($1::text IS NULL OR d.id > $1)
ORDER BY d.id
LIMIT $2;

-- name: import_employees
-- Imports rows of employees, set-based ($1 the rows, $2 the context).
SELECT tl_import_employees($1, $2);
