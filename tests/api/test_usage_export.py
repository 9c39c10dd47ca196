"""The employee,model,project export (issue 16, every report under a second): over
months of roll-ups it is answered by the `usage_export` query, whose lines PostgreSQL
writes as JSON or CSV in the answer's order. Its answer is the general path's, the CSV
byte for byte, over whole months and over periods corrected at their ends."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from service import db as service_db
from service import reports
from service.api.common import encode_cursor
from service.db import load_queries
from service.journal import Database
from service.reports import EXPORT_KEYS, TOTALS, _items, _usage_args, export_span, to_csv
from tests.api.conftest import Api, FakeClock, problem
from tests.api.test_coalescing import ledger_of
from tests.api.test_report_periods import history_with_a_move
from tests.api.test_reports import Event, expected, make_events, report
from tests.api.test_reports_spend import make_spends
from tests.api.test_spend_rollups import usage

# Keys a CSV must quote, neutralise or both, and one it must leave alone.
AWKWARD = (
    "a,b",
    'say "hi"',
    "=SUM(A1)",
    "-minus",
    "+plus",
    "@at",
    "\ttab",
    "\rcr",
    "line\nbreak",
    '=1,"2"',
    " space",
    "naïve ünïcode",
    "",
    "\\.",
    "plain",
)

# (from, to) of periods whose roll-ups are whole months: the export answers them.
PERIODS = [
    pytest.param("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", id="two-months"),
    pytest.param("2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00Z", id="one-month"),
    pytest.param("2026-01-01T00:00:00.000001Z", "2026-03-01T00:00:00Z", id="shifted"),
    pytest.param("2026-01-01T06:00:00Z", "2026-02-28T18:00:00Z", id="hours-subtracted"),
    pytest.param("2025-12-31T20:00:00Z", "2026-03-01T03:00:00Z", id="hours-added"),
    pytest.param("2026-01-01T01:00:00+01:00", "2026-03-01T05:30:00+05:30", id="offsets"),
]


def record_queries(monkeypatch: pytest.MonkeyPatch, method: str) -> list[str]:
    """The named queries Database.<method> (copy_slow, stream_slow: async iterators) runs
    from now on, in order."""
    queries: list[str] = []
    original = getattr(Database, method)

    async def recording(self: Database, query: str, *args: Any, **kw: Any) -> Any:
        queries.append(query)
        async for part in original(self, query, *args, **kw):
            yield part

    monkeypatch.setattr(Database, method, recording)
    return queries


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def make_awkward(api: Api, clock: FakeClock) -> list[Event]:
    """Debits whose metadata model and project need quoting or neutralising in CSV (and
    one charged to a department account, whose employee is null), as report events."""
    await api.department("fin")
    clock.set(datetime(2025, 12, 1, tzinfo=UTC))
    assert (await api.transfer("system:issuance", "department:fin", 50_000)).status_code == 201
    out = []
    for n, text in enumerate(AWKWARD):
        at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=n * 4 % 59, hours=n)
        account, emp = ("department:fin", None) if n % 5 == 4 else ("employee:e-b", "e-b")
        clock.set(at)
        metadata = {"model": text, "project": AWKWARD[-1 - n]}
        r = await api.debit(account, 10 + n, metadata=metadata)
        assert r.status_code == 201, r.text
        keys: dict[str, str | None] = {
            "employee": emp,
            "model": text,
            # The report folds an empty project into null, as for usage events.
            "project": AWKWARD[-1 - n] or None,
        }
        totals = {**dict.fromkeys(TOTALS, 0), "credits": 10 + n, "debits": 1}
        totals["debit_credits"] = 10 + n
        out.append(Event(keys, at, totals))
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))
    return out


async def general_path(
    api: Api,
    database_url: str,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...] = EXPORT_KEYS,
    sources: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The same report by the general `usage_report` query in one statement (what
    answered it before), its usage and spend sources `sources` when given."""
    ledger: Database = ledger_of(api.c)
    args = await _usage_args(ledger, start, end, keys)
    if sources is not None:
        assert (args[3], args[6]) == sources, args
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(ledger.queries["usage_report"], *args)
    finally:
        await conn.close()
    return _items(keys, rows)


@pytest.mark.parametrize(("start", "end"), PERIODS)
async def test_export_is_the_general_answer(
    api: Api,
    database_url: str,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    start: str,
    end: str,
) -> None:
    """Over whole months and periods corrected at either end, the export's JSON is the
    report summed in Python and the general path's, and its CSV is the general path's
    byte for byte (nulls, commas, quotes, line breaks, formulas, an empty model)."""
    events = await make_events(api, database_url)
    events += await make_spends(api, clock)
    events += await make_awkward(api, clock)
    lo, hi = parse(start), parse(end)
    assert export_span(lo, hi, EXPORT_KEYS) is not None
    queries = record_queries(monkeypatch, "copy_slow")
    want = expected(events, lo, hi, EXPORT_KEYS)
    general = await general_path(api, database_url, lo, hi, sources=("monthly", "monthly"))
    assert general == want

    r = await report(api, start, end, EXPORT_KEYS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"items": want}
    # Every item carries exactly the keys, then the totals, in that order.
    assert [list(i) for i in json.loads(r.content)["items"]] == [
        [*EXPORT_KEYS, *TOTALS] for _ in want
    ]

    r = await report(api, start, end, EXPORT_KEYS, headers={"Accept": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.content == to_csv(EXPORT_KEYS, general).encode()
    assert queries == ["usage_export_json", "usage_export_csv"]

    # The list form (the bench's SQL path) is the same answer.
    assert await reports.usage_report(ledger_of(api.c), lo, hi, EXPORT_KEYS) == want


async def test_export_streams_what_copy_writes(
    api: Api, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is written as PostgreSQL's COPY sends it, chunk by chunk, without a
    length known in advance: with the chunks cut one row each, the answer is still
    exactly the report; an empty month is a well-formed empty answer in both forms."""
    events = await make_events(api, database_url)
    original = Database.copy_slow
    sizes: list[int] = []

    async def row_by_row(self: Database, *args: Any, **kw: Any) -> Any:
        async for chunk in original(self, *args, **kw):
            lines = chunk.split(b"\n")[:-1]
            sizes.append(len(lines))
            for line in lines:
                yield line + b"\n"

    monkeypatch.setattr(Database, "copy_slow", row_by_row)
    lo, hi = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    want = expected(events, lo, hi, EXPORT_KEYS)
    assert len(want) > 10
    r = await report(api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", EXPORT_KEYS)
    assert "content-length" not in r.headers  # streamed, not one body
    assert r.json() == {"items": want}
    assert sum(sizes) == len(want)
    r = await report(
        api,
        "2026-01-01T00:00:00Z",
        "2026-03-01T00:00:00Z",
        EXPORT_KEYS,
        headers={"Accept": "text/csv"},
    )
    assert r.content == to_csv(EXPORT_KEYS, want).encode()
    r = await report(api, "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", EXPORT_KEYS)
    assert r.json() == {"items": []}
    r = await report(
        api,
        "2024-01-01T00:00:00Z",
        "2024-02-01T00:00:00Z",
        EXPORT_KEYS,
        headers={"Accept": "text/csv"},
    )
    assert r.text == "employee,model,project," + ",".join(TOTALS) + "\r\n"


@pytest.mark.parametrize(
    ("start", "end", "keys"),
    [
        # Whole days that are not month starts read usage_daily: the general path.
        ("2026-01-02T00:00:00Z", "2026-02-15T00:00:00Z", EXPORT_KEYS),
        # Shorter than two days: the events themselves.
        ("2026-01-10T12:00:00Z", "2026-01-11T06:00:00Z", EXPORT_KEYS),
        # Other keys, or the same in another order.
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("employee", "model")),
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("model", "employee", "project")),
        # Nearest midnights that are not month starts.
        ("2026-01-01T13:00:00Z", "2026-03-01T00:00:00Z", EXPORT_KEYS),
    ],
)
def test_only_months_of_roll_ups_take_the_export(
    start: str, end: str, keys: tuple[str, ...]
) -> None:
    """The export answers exactly employee,model,project over months of roll-ups; anything
    else stays on the general path."""
    assert export_span(parse(start), parse(end), keys) is None


async def test_copy_csv_is_pythons(database_url: str) -> None:
    """A key through tl_csv_key and COPY's CSV, with csv_line_ends, is what
    service/reports.py's csv writer writes after csv_cell: quoted, neutralised, both or
    neither, and null or empty as an empty field, line breaks inside cells kept."""
    values: list[str | None] = [*AWKWARD, None, '"', ",", "\n", "=", "'", "a\r\nb", "-1", '"\n"']
    conn = await asyncpg.connect(database_url)
    got: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        got.append(bytes(chunk))

    try:
        await conn.copy_from_query(
            "SELECT tl_csv_key(v), n FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n",
            values,
            output=sink,
            format="csv",
        )
    finally:
        await conn.close()
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(
        [reports.csv_cell(v), n] for n, v in enumerate(values, 1)
    )
    assert reports.csv_line_ends(b"".join(got)) == out.getvalue().encode()


def test_line_ends_and_json_lines() -> None:
    """csv_line_ends turns only the row ends into CRLF, not a line feed in a quoted cell;
    json_lines undoes COPY's doubled backslashes and joins the objects with commas."""
    assert reports.csv_line_ends(b"a,1\nb,2\n") == b"a,1\r\nb,2\r\n"
    assert (
        reports.csv_line_ends(b'"x\ny",1\n"say ""hi""\n",2\nz,3\n')
        == b'"x\ny",1\r\n"say ""hi""\n",2\r\nz,3\r\n'
    )
    assert reports.json_lines(b'{"a":"b\\\\"}\n{"a":null}\n') == b'{"a":"b\\"},{"a":null}'
    assert msgspec_json(reports.json_lines(b'{"a":"\\\\n\\\\u00e9"}\n')) == [{"a": "\n\u00e9"}]


def msgspec_json(body: bytes) -> Any:
    return json.loads(b"[" + body + b"]")


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A plan node and every node under it."""
    out = [plan]
    for child in plan.get("Plans", []):
        out += nodes(child)
    return out


async def test_a_month_is_walked_in_answer_order(database_url: str) -> None:
    """Over a whole month the export walks the employees by accounts_employee_ref_idx,
    reads each one's roll-up rows by key and sorts only those few rows (Incremental
    Sort): no hash aggregate and no full sort of the groups, whose sums come from one
    GroupAggregate over a Merge Append."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO accounts (address, type, ref)"
            " SELECT 'employee:e-' || n, 'employee', 'e-' || n FROM generate_series(1, 2000) n;"
            " INSERT INTO usage_monthly (month, account_id, model, project, events, credits)"
            " SELECT '2026-03-01', a.id, 'model-' || m, 'project-' || p, 1, 10"
            " FROM accounts a, generate_series(1, 4) m, generate_series(0, 5) p"
            " WHERE a.type = 'employee';"
            " INSERT INTO spend_monthly (month, account_id, model, project, debits, credits)"
            " SELECT '2026-03-01', a.id, CASE WHEN a.id % 2 = 0 THEN 'model-1' END, '', 1, 5"
            " FROM accounts a WHERE a.type = 'employee';"
            " ANALYZE accounts, usage_monthly, spend_monthly, usage_events, transactions, entries"
        )
        start, end = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
        explained = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + load_queries()["usage_export_rows"],
            start,
            end,
            start,
            end,
        )
    finally:
        await conn.close()
    plan = json.loads(explained)[0]["Plan"]
    every = nodes(plan)
    # tl_usage_export is inlined: its plan streams, no function result kept whole.
    assert "Function Scan" not in [n["Node Type"] for n in every]
    assert not [n for n in every if n.get("Strategy") == "Hashed"], "a hash aggregate"
    groups = [n for n in every if n["Node Type"] == "Aggregate"]
    assert [n["Strategy"] for n in groups] == ["Sorted"]
    (merge,) = [n for n in every if n["Node Type"] == "Merge Append"]
    walked = [
        child
        for child in merge["Plans"]
        if any(n.get("Index Name") == "accounts_employee_ref_idx" for n in nodes(child))
    ]
    assert len(walked) == 1
    kinds = [n["Node Type"] for n in nodes(walked[0])]
    assert "Incremental Sort" in kinds and "Sort" not in kinds, kinds
    # Each employee's roll-up rows by key, a probe per month: never a scan of the month.
    scans = {n["Relation Name"]: n["Node Type"] for n in every if "Relation Name" in n}
    assert scans["usage_monthly"] == scans["spend_monthly"] == "Index Scan", scans


async def test_bigint_sum_fails_loudly_on_overflow(database_url: str) -> None:
    """tl_bigint_sum adds bigints as bigints and refuses to wrap around, as the numeric
    sum cast back to bigint refused."""
    conn = await asyncpg.connect(database_url)
    try:
        assert (
            await conn.fetchval("SELECT tl_bigint_sum(x) FROM unnest('{1,2,-5}'::bigint[]) x") == -2
        )
        with pytest.raises(asyncpg.NumericValueOutOfRangeError):
            await conn.fetchval(
                "SELECT tl_bigint_sum(x) FROM unnest(ARRAY[9223372036854775807, 1]::bigint[]) x"
            )
    finally:
        await conn.close()


async def test_bigint_sum_adds_partial_sums_from_parallel_workers(database_url: str) -> None:
    """tl_bigint_sum has a combine function, so a report's arms read with parallel
    workers (a plain query: the events of a tag key not declared) sum in each worker
    and add the partial sums, as sum() does; without one, PostgreSQL sends every row
    to the leader to be summed there."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE bigint_sum_parts AS"
                " SELECT g % 7 AS k, g::bigint * 1000003 AS v FROM generate_series(1, 20000) g"
            )
            await conn.execute("ANALYZE bigint_sum_parts")
            for setting in (
                "parallel_setup_cost = 0",
                "parallel_tuple_cost = 0",
                "min_parallel_table_scan_size = 0",
                "max_parallel_workers_per_gather = 2",
            ):
                await conn.execute(f"SET LOCAL {setting}")
            query = "SELECT k, tl_bigint_sum(v) FROM bigint_sum_parts GROUP BY k ORDER BY k"
            plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}")
            assert '"Partial Mode": "Partial"' in plan and '"Workers Planned"' in plan, plan
            expected = await conn.fetch(
                "SELECT k, sum(v)::bigint FROM bigint_sum_parts GROUP BY k ORDER BY k"
            )
            assert [tuple(r) for r in await conn.fetch(query)] == [tuple(r) for r in expected]
            await conn.execute("DROP TABLE bigint_sum_parts")
    finally:
        await conn.close()


async def test_report_statements_are_planned_for_their_arguments(database_url: str) -> None:
    """A long statement (db.set_local: reports, exports) is planned for its arguments at
    every execution, never by PostgreSQL's generic plan of a statement prepared five
    times before on the connection (compensation's export: 8 to 15 s instead of 0.2 s).
    Without the setting, the same statement does switch to a generic plan."""
    query = load_queries()["compensation_report"]
    args = (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 4, 1, tzinfo=UTC),
        None,
        Decimal("0.000001"),
        None,
        2**31 - 1,
    )

    async def plans(with_setting: bool) -> tuple[int, int]:
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(8):
                async with conn.transaction(readonly=True):
                    if with_setting:
                        await service_db.set_local(conn, 30_000, jit=False)
                    cursor = await conn.cursor(query, *args)
                    await cursor.fetch(100)
            row = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = $1",
                query,
            )
            assert row is not None
            return int(row["generic_plans"]), int(row["custom_plans"])
        finally:
            await conn.close()

    assert await plans(with_setting=True) == (0, 8)
    assert (await plans(with_setting=False))[0] > 0


@pytest.mark.parametrize("accept", ["application/json", "text/csv"])
async def test_a_failing_export_answers_its_problem(
    api: Api, client: Any, database_url: str, accept: str
) -> None:
    """The export runs under the report statement timeout (here 1 ms: 503) and reads its
    first chunk before answering, so a failing query answers its problem, not a cut
    body; the connection goes back to the pool usable, and the next export answers."""
    await make_events(api, database_url)
    ledger = client.app.state.ledger
    normal = ledger.config
    ledger.config = msgspec.structs.replace(normal, report_statement_timeout_ms=1)
    try:
        r = await report(
            api,
            "2026-01-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            EXPORT_KEYS,
            headers={"Accept": accept},
        )
        problem(r, 503, "unavailable")
    finally:
        ledger.config = normal
    r = await report(
        api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", EXPORT_KEYS, headers={"Accept": accept}
    )
    assert r.status_code == 200, r.text
    async with ledger.pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('statement_timeout')") != "1ms"


async def paged(
    api: Api, start: str, end: str, keys: tuple[str, ...], extra: dict[str, str], **kw: Any
) -> Any:
    """The report with page parameters."""
    params = {"from": start, "to": end, "group_by": ",".join(keys), **extra}
    return await api.c.get("/v1/reports/usage", params=params, **kw)


async def pages_of(
    api: Api, start: str, end: str, keys: tuple[str, ...], limit: int
) -> list[list[dict[str, Any]]]:
    """Every JSON page of a report, following next_cursor to its null."""
    out: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        r = await paged(api, start, end, keys, params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next_cursor"}, body
        out.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert len(out) < 1000, "pages never end"


@pytest.mark.parametrize(
    ("start", "end", "keys"),
    [
        # The export (whole months) and the general path, corrected and not.
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", EXPORT_KEYS),
        ("2026-01-01T06:00:00Z", "2026-02-28T18:00:00Z", EXPORT_KEYS),
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("model", "project", "day")),
        # Led by the department or the day with the employee: chunks of
        # departments or of the period (_department_pages, _time_pages).
        ("2026-01-10T12:00:00Z", "2026-02-10T06:30:00Z", ("department", "employee", "day")),
        ("2026-01-10T12:00:00Z", "2026-02-10T06:30:00Z", ("day", "employee")),
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("day", "model", "employee")),
        # Led by the employee: a chunk of employees at a time (_employee_pages).
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("employee", "day")),
        ("2026-01-10T12:00:00Z", "2026-02-10T06:30:00Z", ("employee", "model", "department")),
        # Led by the model or the project with the employee: chunks of their values
        # (_value_pages), the awkward ones and null among them.
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", ("model", "employee")),
        ("2026-01-10T12:00:00Z", "2026-02-10T06:30:00Z", ("project", "employee", "model")),
        (
            "2026-01-01T00:00:00Z",
            "2026-03-01T00:00:00Z",
            ("tag:team", "employee", "tag:cost center"),
        ),
    ],
)
async def test_json_pages_are_the_report_in_order(
    api: Api,
    database_url: str,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    start: str,
    end: str,
    keys: tuple[str, ...],
) -> None:
    """With `limit`, the JSON answer is a page, `{items, next_cursor}`: the pages, followed
    to a null cursor, are the whole report in its order (nulls and awkward keys among
    them), each at most `limit` items. With `cursor` and CSV, the rows after it. The
    export's pages after the first start their walk at the cursor's employee (or read
    only the rows without one)."""
    await make_events(api, database_url)
    await make_spends(api, clock)
    await make_awkward(api, clock)
    whole = (await report(api, start, end, keys)).json()["items"]
    assert len(whole) > 7
    queries = record_queries(monkeypatch, "stream_slow")
    pages = await pages_of(api, start, end, keys, 3)
    if keys == EXPORT_KEYS:
        assert queries[0] == "usage_export_rows"
        assert set(queries[1:]) == {"usage_export_rows_from", "usage_export_rows_unowned"}
        # A cursor among the rows without an employee (last) reads only those.
        unowned = [n for n, i in enumerate(whole) if i["employee"] is None]
        assert len(unowned) >= 2, whole
        mark = reports.page_fingerprint(parse(start), parse(end), keys)
        cursor = encode_cursor([mark, [whole[unowned[0]][k] for k in keys]])
        r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "2"})
        assert r.json()["items"] == whole[unowned[0] + 1 : unowned[0] + 3]
        assert queries[-1] == "usage_export_rows_unowned"
    elif reports._chunked(ledger_of(api.c), parse(start), parse(end), keys, None, 1):
        assert queries == []  # read by stream_parts_slow (the tests below)
        # The chunks' whole answer is the single query's.
        assert whole == await general_path(api, database_url, parse(start), parse(end), keys)
    else:
        assert set(queries) == {"usage_report"}
    assert [len(p) for p in pages[:-1]] == [3] * (len(pages) - 1) and 1 <= len(pages[-1]) <= 3
    assert [i for p in pages for i in p] == whole
    # A page of the default size (a cursor without limit: 50).
    first = (await paged(api, start, end, keys, {"limit": "3"})).json()
    r = await paged(api, start, end, keys, {"cursor": first["next_cursor"]})
    assert r.json()["items"] == whole[3:53]
    # CSV from a cursor on: the header, then every row after it.
    r = await paged(
        api, start, end, keys, {"cursor": first["next_cursor"]}, headers={"Accept": "text/csv"}
    )
    assert r.status_code == 200, r.text
    assert r.content == to_csv(keys, whole[3:]).encode()
    # Without limit nor cursor, the whole report, without next_cursor (as before).
    assert set((await report(api, start, end, keys)).json()) == {"items"}


async def test_a_page_cursor_belongs_to_its_report(api: Api, database_url: str) -> None:
    """A cursor from another report (keys or period), or not one at all, and a limit
    outside 1..500 are 400 invalid_request."""
    await make_events(api, database_url)
    start, end = "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"
    first = (await paged(api, start, end, ("employee",), {"limit": "1"})).json()
    cursor = first["next_cursor"]
    assert cursor
    for keys, lo, hi, params in (
        (("model",), start, end, {"cursor": cursor}),
        (("employee",), start, "2026-02-01T00:00:00Z", {"cursor": cursor}),
        (("employee",), start, end, {"cursor": "not-a-cursor"}),
        (("employee",), start, end, {"cursor": cursor[:-4]}),
        (("employee",), start, end, {"limit": "0"}),
        (("employee",), start, end, {"limit": "501"}),
    ):
        r = await paged(api, lo, hi, keys, params)
        problem(r, 400, "invalid_request")


def record_parts(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, Any]]]:
    """The parts each Database.stream_parts_slow call from now on ran: each query's
    name and what it reads (the accounts' count, the values and the null flag, a
    window's limit and offset, a stretch's first and last value, null flag, limit and
    offset, or a usage_report's period), or ("rows", how many) for rows the plan read
    itself, or ("values", after which) for a list of a leading key's values
    (report_lead_values); and that the plan ran in a REPEATABLE READ transaction."""
    calls: list[list[tuple[str, Any]]] = []
    original = Database.stream_parts_slow
    listing = load_queries()["report_lead_values"]

    class Recorded:
        """The plan's connection, its lists of values recorded."""

        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
            if query == listing:
                calls[-1].append(("values", args[5]))
            return await self.conn.fetch(query, *args, **kw)

    async def recording(self: Database, timeout_ms: int, plan: Any, **kw: Any) -> Any:
        async def planned(conn: Any) -> Any:
            assert await conn.fetchval("SHOW transaction_isolation") == "repeatable read"
            calls.append([])
            async for step in plan(Recorded(conn)):
                if isinstance(step, list):  # rows the plan read itself
                    calls[-1].append(("rows", len(step)))
                    yield step
                    continue
                query, args = step
                if query == "usage_report_accounts":
                    reads = len(args[-1])
                elif query == "usage_report_values":
                    reads = (args[-3], args[-2])
                elif query == "usage_report_window":
                    reads = args[-2:]
                elif query == "usage_report_range":
                    reads = (*args[-6:-3], *args[-2:])
                elif query == "usage_report_range_accounts":  # (and how many accounts)
                    reads = (*args[-7:-4], *args[-3:-1], len(args[-1]))
                else:
                    reads = args[:2]
                calls[-1].append((query, reads))
                yield query, args

        async for rows in original(self, timeout_ms, planned, **kw):
            yield rows

    monkeypatch.setattr(Database, "stream_parts_slow", recording)
    return calls


async def test_employee_pages_read_the_employees_they_need(
    api: Api, database_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report led by the employee and another key is read a chunk of employees at a
    time, in one snapshot: from the cursor's employee on (the page's size and one
    more, then twice as many), the accounts without an employee last. Its whole
    answer is the single query's, row for row; pages of one item are the report in
    its order across chunk edges and employees without usage (first and last in byte
    order); a cursor among the rows without an employee reads only theirs."""
    await make_events(api, database_url)
    await make_spends(api, clock)
    await make_awkward(api, clock)
    for idle in ("e-0", "e-z"):
        await api.employee(idle, "eng")
    start, end, keys = "2026-01-01T06:00:00Z", "2026-02-28T18:00:00Z", ("employee", "day", "model")
    calls = record_parts(monkeypatch)
    stream = record_queries(monkeypatch, "stream_slow")
    whole = (await report(api, start, end, keys)).json()["items"]
    assert {i["employee"] for i in whole} == {"e-a", "e-b", "e-c", "e-d", None}, whole
    # The whole answer: every employee in the first chunk (six), then the others.
    unowned_accounts = calls[0][-1][1]
    assert calls == [[("usage_report_accounts", 6), ("usage_report_accounts", unowned_accounts)]]
    assert stream == []
    assert whole == await general_path(api, database_url, parse(start), parse(end), keys)
    calls.clear()
    pages = await pages_of(api, start, end, keys, 1)
    assert [i for p in pages for i in p] == whole
    assert stream == []
    # The first page: e-0 (no usage) and e-a fill it, and nothing more is read.
    assert calls[0] == [("usage_report_accounts", 2)], calls
    # A page from e-a's last row on: e-a and e-b (e-a's rows skipped), enough.
    # From e-d's last row on: e-d and e-z, then nobody after e-z, then the rest.
    assert [("usage_report_accounts", 2), ("usage_report_accounts", unowned_accounts)] in calls
    assert all(c[0][1] == 2 or c[0][1] == unowned_accounts for c in calls), calls
    calls.clear()
    unowned = [n for n, i in enumerate(whole) if i["employee"] is None]
    assert len(unowned) >= 2, whole
    mark = reports.page_fingerprint(parse(start), parse(end), keys)
    cursor = encode_cursor([mark, [whole[unowned[0]][k] for k in keys]])
    r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "2"})
    assert r.json()["items"] == whole[unowned[0] + 1 : unowned[0] + 3]
    assert calls == [[("usage_report_accounts", unowned_accounts)]]


# (from, to): nobody moves within the first; e-c (ops -> eng, 00:30 on Jan 10), e-b
# (eng -> ops, Jan 20) and e-a (eng -> zzz, Feb 15) move within the others (the rows
# split by day).
CHUNKED_PERIODS = (
    ("2026-01-10T01:00:00Z", "2026-01-20T00:00:00Z"),
    ("2026-01-10T00:20:00Z", "2026-02-11T00:05:00Z"),
    ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"),
)
CHUNKED_KEYS = (
    ("department", "employee", "day"),
    ("department", "employee", "model", "project"),
    ("day", "employee"),
    ("day", "department", "employee", "model"),
    ("month", "employee", "department"),
    ("model", "employee", "day"),
    ("project", "department", "employee"),
)


async def test_department_and_time_chunks_are_the_single_query(
    api: Api, database_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report led by the department (with the employee among its other keys) is read
    a chunk of departments at a time, one led by the day or the month a stretch of the
    period at a time: the whole answer is the single usage_report query's, row for
    row, across employees who moved department inside and outside the period, and
    their pages of two are the same rows. A department chunk keeps only its own
    departments' rows (a mover's account is read with each of its departments)."""
    await history_with_a_move(api, clock)
    # Departments without spend, first and last in byte order, and an idle employee.
    await api.department("aaa")
    await api.department("zzz")
    await api.employee("e-idle", "zzz")
    # e-a moves from eng to zzz, a department of another chunk, and spends there.
    clock.set(datetime(2026, 2, 15, 12, tzinfo=UTC))
    await api.employee("e-a", "zzz")
    await usage(api, clock, "e-a", datetime(2026, 2, 16, 9, tzinfo=UTC), "a-after")
    calls = record_parts(monkeypatch)
    for start, end in CHUNKED_PERIODS:
        for keys in CHUNKED_KEYS:
            calls.clear()
            whole = (await report(api, start, end, keys)).json()["items"]
            single = await general_path(api, database_url, parse(start), parse(end), keys)
            assert whole == single, (start, keys)
            assert len(calls) == 1, calls
            pages = await pages_of(api, start, end, keys, 2)
            assert [i for p in pages for i in p] == whole, (start, keys)
            if keys[0] == "department":
                # aaa, then eng and ops, then zzz (two asked, one left), then the
                # system's: each department's own account, and its employees'.
                assert [q for q, _ in calls[0]] == ["usage_report_accounts"] * 4, calls
                assert [n for _, n in calls[0][:3]] == [1, 5, 3], calls
            elif keys[0] in ("model", "project"):
                # The leading key's values: one, then two, then four... (null counts one).
                assert {q for q, _ in calls[0]} == {"usage_report_values"}, calls
                sizes = [len(named) + null for _, (named, null) in calls[0]]
                assert sizes[:-1] == [2**n for n in range(len(sizes) - 1)], calls
                assert 1 <= sizes[-1] <= 2 ** (len(sizes) - 1), calls
                assert [i[keys[0]] for i in whole][-1] is None, whole
            elif start == "2026-01-10T01:00:00Z":
                # One day (what is left of it), then 2, 4 and the last 3 days.
                assert (
                    [reads for _, reads in calls[0]]
                    == [
                        (parse(start), parse("2026-01-11T00:00:00Z")),
                        (parse("2026-01-11T00:00:00Z"), parse("2026-01-13T00:00:00Z")),
                        (parse("2026-01-13T00:00:00Z"), parse("2026-01-17T00:00:00Z")),
                        (parse("2026-01-17T00:00:00Z"), parse(end)),
                    ]
                    if keys[0] == "day"
                    else [(parse(start), parse(end))]
                ), calls
    # Each row under the department of its time (split by day): e-b under eng and
    # then ops, e-a under eng and then zzz; e-c under eng only (its move's day counts
    # where it ended).
    items = (await report(api, *CHUNKED_PERIODS[2], ("department", "employee", "day"))).json()
    homes = {(i["employee"], i["department"]) for i in items["items"]}
    assert {("e-b", "eng"), ("e-b", "ops"), ("e-a", "eng"), ("e-a", "zzz"), ("e-c", "eng")} <= homes

    assert ("e-c", "ops") not in homes, homes
    # Led by a tag key not declared, the report reads the events and the journal
    # themselves; nobody here sets the tag, so its one value (null) is the single
    # query's first window (_value_range_plan).
    calls.clear()
    keys = ("tag:team", "employee")
    whole = (await report(api, *CHUNKED_PERIODS[2], keys)).json()["items"]
    assert {i["tag:team"] for i in whole} == {None}, whole
    assert calls == [[("values", None), ("rows", len(whole))]], calls
    assert whole == await general_path(api, database_url, *map(parse, CHUNKED_PERIODS[2]), keys)
    # A page of a report led by the department reads its first chunk only.
    calls.clear()
    r = await paged(api, *CHUNKED_PERIODS[2], ("department", "employee", "day"), {"limit": "1"})
    assert r.json()["items"] == items["items"][:1]
    assert [len(c) for c in calls] == [2], calls  # aaa (nothing), then eng and ops
