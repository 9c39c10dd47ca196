-- name: usage_export_rows
-- GET /v1/reports/usage?group_by=employee,model,project over a period whose
-- roll-ups are whole UTC months (service/reports.py, export_span): the same
-- rows as usage_report (service/sql/reports.sql) for those keys, in the
-- answer's order, from tl_usage_export (schema.sql, section 14b, which says
-- how and why). $1, $2: the period [from, to); $3, $4: the UTC month starts
-- whose roll-ups answer it (usage_span: $1 and $2 themselves, or their
-- nearest midnights), each end corrected like usage_report's. The rows as
-- records: for callers that keep the answer whole (the bench's SQL path).
SELECT x.* FROM tl_usage_export($1::timestamptz, $2::timestamptz, $3::timestamptz, $4::timestamptz) x;

-- name: usage_export_csv
-- The same rows as PostgreSQL's COPY (FORMAT csv) must receive them to write
-- the answer's CSV rows exactly as service/reports.py's csv writer would
-- (tl_csv_key: formulas neutralised, an empty key as null): the service sends
-- COPY's bytes on, with CRLF line ends, decoding no row.
SELECT tl_csv_key(x.employee), tl_csv_key(x.model), tl_csv_key(x.project),
       x.events, x.input_tokens, x.cached_input_tokens, x.output_tokens, x.credits,
       x.overage, x.violations, x.debits, x.debit_credits
FROM tl_usage_export($1::timestamptz, $2::timestamptz, $3::timestamptz, $4::timestamptz) x;

-- name: usage_export_json
-- The same rows, each as the JSON object of its item (the keys, then the
-- totals, as UsageReportItem has them), one per line of COPY's text format:
-- the service joins them into the answer's `items`, decoding no row. Written
-- by concatenation: row_to_json cost about twice as much CPU per row.
SELECT concat('{"employee":', coalesce(to_json(x.employee)::text, 'null'),
              ',"model":', coalesce(to_json(x.model)::text, 'null'),
              ',"project":', coalesce(to_json(x.project)::text, 'null'),
              ',"events":', x.events, ',"input_tokens":', x.input_tokens,
              ',"cached_input_tokens":', x.cached_input_tokens,
              ',"output_tokens":', x.output_tokens, ',"credits":', x.credits,
              ',"overage":', x.overage, ',"violations":', x.violations,
              ',"debits":', x.debits, ',"debit_credits":', x.debit_credits, '}')
FROM tl_usage_export($1::timestamptz, $2::timestamptz, $3::timestamptz, $4::timestamptz) x;

-- name: usage_export_rows_from
-- usage_export_rows from the employee $5 on (byte order): a JSON page after
-- a cursor (service/reports.py, _export_pages, which then reads
-- usage_export_rows_unowned and skips the rows of $5 up to the cursor's).
-- The condition is on a grouping key of the inlined tl_usage_export, so
-- PostgreSQL moves it below the aggregation into each branch: the employee
-- walk starts at $5 in accounts_employee_ref_idx (an index range), and the
-- branch of the accounts without an employee (null, last) is left out.
SELECT x.* FROM tl_usage_export($1::timestamptz, $2::timestamptz, $3::timestamptz, $4::timestamptz) x
WHERE x.employee >= $5::text COLLATE "C";

-- name: usage_export_rows_unowned
-- usage_export_rows of the accounts without an employee only (employee null,
-- the last rows): a page after a cursor among them. The employee walk is
-- left out (its condition, a.ref IS NULL, matches no employee account).
SELECT x.* FROM tl_usage_export($1::timestamptz, $2::timestamptz, $3::timestamptz, $4::timestamptz) x
WHERE x.employee IS NULL;
