"""Usage reports by declared tag keys (issue 16, tags16): with TOKENLEDGER_REPORT_TAGS
declared, the usage and spend write paths keep tag roll-ups (schema.sql, "Tag roll-ups")
and a report whose tag keys are all declared reads them, over whole days and months and,
corrected at the ends, over periods between other instants. Whatever it reads, it equals
the direct sum over the usage events (archived ones too) and the journal: a key declared
and one not, two keys together, a department move, rejected events of a batch, a
reversed debit, a coalesced batch; the rows the write paths keep are those a rebuild
makes; declaring a key backfills its roll-ups; and a declared month report reads neither
usage_events' rows nor the journal."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from bench.year import sections
from service import db as service_db
from service import reports
from service.api.common import encode_cursor
from service.config import Config
from service.journal import Database
from service.reports import TOTALS, _usage_args, parse_group_by, sync_report_tags, tag_source
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key
from tests.api.test_coalescing import item, ledger_of
from tests.api.test_report_periods import CORRECTED, archive_before, edge_usage
from tests.api.test_reports import Event, expected, report
from tests.api.test_spend_rollups import MOVE_AT, build_history, capture, debit, usage
from tests.api.test_usage import batch, event, recorded
from tests.api.test_usage_export import paged, pages_of, record_parts

DECLARED = "team,cost center"
TAG_KEYS = ("team", "cost center", "batch")  # "batch" is never declared
# Groupings: by the roll-up without the account (tag_daily), by the one per month and
# account (tag_monthly), and ones that still read the events and the journal (an account
# key with a model, a key not declared).
GROUPINGS: list[tuple[str, ...]] = [
    ("tag:team",),
    ("tag:team", "model"),
    ("tag:cost center", "project", "day"),
    ("month", "tag:team", "tag:cost center"),
    ("department", "tag:team"),
    ("employee", "tag:cost center"),
    ("employee", "department", "month", "tag:team", "tag:cost center"),
    ("employee", "tag:team", "model"),
    ("tag:batch",),
    ("tag:team", "tag:batch"),
    # Led by a tag key with the employee: a chunk of the tag's values at a time
    # (service/reports.py, _value_pages), from the roll-ups' slots or the events.
    ("tag:team", "employee", "month"),
    ("tag:cost center", "employee", "project"),
    ("tag:batch", "employee"),
]
PERIODS = [
    ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"),  # whole months; e-b moved in January
    ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),  # a whole month, nobody moved
    ("2026-01-02T00:00:00Z", "2026-02-20T00:00:00Z"),  # whole days
    ("2026-02-01T00:00:00.000001Z", "2026-03-01T00:00:00Z"),  # a month less a microsecond
    ("2026-01-03T10:30:00+01:00", "2026-01-03T23:00:00Z"),  # inside a day: the events
    *CORRECTED,
]

# Every spend with its tags, straight from the usage events (the archive's too) and the
# journal's paying entries of debits and captures (what the report counts); a department's
# own wallet spends under that department, without an employee.
DIRECT = """
SELECT CASE a.type WHEN 'employee' THEN a.ref END AS employee, u.occurred_at AS at, u.model,
       u.project, u.cost AS credits, u.input_tokens, u.cached_input_tokens, u.output_tokens,
       u.tags, CASE a.type WHEN 'employee' THEN tl_department_at(a.ref, u.occurred_at)
                           WHEN 'department' THEN a.ref END AS department, false AS is_debit
FROM (SELECT account_id, occurred_at, model, project, cost, input_tokens, cached_input_tokens,
             output_tokens, tags FROM usage_events
      UNION ALL
      SELECT account_id, occurred_at, model, project, cost, input_tokens, cached_input_tokens,
             output_tokens, tags FROM usage_events_archive) u
JOIN accounts a ON a.id = u.account_id
UNION ALL
SELECT CASE a.type WHEN 'employee' THEN a.ref END, t.created_at, t.metadata ->> 'model',
       t.metadata ->> 'project', -e.amount, 0, 0, 0, t.metadata,
       CASE a.type WHEN 'employee' THEN tl_department_at(a.ref, t.created_at)
                   WHEN 'department' THEN a.ref END, true
FROM transactions t
JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
JOIN accounts a ON a.id = e.account_id
WHERE t.kind IN ('debit', 'capture')
"""


@pytest.fixture
def config(config: Config) -> Config:
    """The app of these tests declares two tag keys (synced at its start-up)."""
    return msgspec.structs.replace(config, report_tags=DECLARED)


async def direct_events(database_url: str) -> list[Event]:
    conn = await service_db.connect(database_url)
    try:
        rows = await conn.fetch(DIRECT)
    finally:
        await conn.close()
    out = []
    for r in rows:
        when: datetime = r["at"]
        tags = msgspec.json.decode(r["tags"]) if isinstance(r["tags"], str) else r["tags"]
        keys: dict[str, str | None] = {
            "employee": r["employee"],
            "department": r["department"],
            "model": r["model"],
            "project": r["project"] or None,
            "day": when.astimezone(UTC).strftime("%Y-%m-%d"),
            "month": when.astimezone(UTC).strftime("%Y-%m"),
        }
        for name in TAG_KEYS:
            value = tags.get(name)
            # A metadata number is read as its JSON text, as `->>` reads it.
            keys[f"tag:{name}"] = None if value is None else str(value)
        totals = dict.fromkeys(TOTALS, 0)
        totals["credits"] = r["credits"]
        if r["is_debit"]:
            totals["debits"], totals["debit_credits"] = 1, r["credits"]
        else:
            totals["events"] = 1
            for t in ("input_tokens", "cached_input_tokens", "output_tokens"):
                totals[t] = r[t]
        out.append(Event(keys, when, totals))
    return out


async def tagged_history(api: Api, clock: FakeClock) -> None:
    """build_history's debits, captures, usage events, reversal, coalesced batch and
    department move, the edge events of the corrected periods, and tagged spend on top:
    single usage events, a usage batch whose events of a closed account are rejected (their
    tags must count nowhere), tagged debits and captures (a number among the values), and
    a coalesced batch of tagged debits."""
    # e-z is hired and leaves before the periods (a hire within one is a move).
    clock.set(datetime(2025, 12, 19, tzinfo=UTC))
    await api.employee("e-z", "ops")
    r = await api.c.post("/v1/employees/e-z/offboard", json={}, headers=key())
    assert r.status_code == 200, r.text
    await build_history(api, clock)
    await edge_usage(api, clock)
    red, blue = {"team": "red", "batch": "b1"}, {"team": "blue", "cost center": "=cc-1"}
    for n, (emp, when, tags) in enumerate(
        [
            ("e-a", datetime(2026, 1, 5, 9, tzinfo=UTC), red),
            ("e-b", datetime(2026, 1, 10, 0, 30, tzinfo=UTC), blue),
            ("e-b", datetime(2026, 1, 25, 23, 30, tzinfo=UTC), red),
            ("e-c", datetime(2026, 2, 10, 22, 30, tzinfo=UTC), {"cost center": "cc-2"}),
            ("e-c", datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), blue),
        ]
    ):
        await usage(api, clock, emp, when, f"tagged-{n}", tags=tags)
    when = datetime(2026, 2, 1, 0, 0, 0, 1, tzinfo=UTC)
    clock.set(when)
    events = [
        event(
            f"b-{n}",
            account=f"employee:{emp}",
            occurred_at=when.isoformat(),
            tags={"team": team} if team else None,
            project="alpha" if n % 2 else None,
        )
        for n, (emp, team) in enumerate(
            [("e-a", "red"), ("e-z", "ghost"), ("e-c", "blue"), ("e-z", "ghost"), ("e-b", None)]
        )
    ]
    results = await batch(api.c, events)
    assert [r["status"] for r in results] == [
        "recorded",
        "rejected",
        "recorded",
        "rejected",
        "recorded",
    ]
    await debit(
        api, clock, "e-a", datetime(2026, 1, 9, 21, tzinfo=UTC), 40, team="red", project="alpha"
    )
    await debit(api, clock, "e-b", datetime(2026, 1, 19, 12, tzinfo=UTC), 30, team="blue")
    await debit(api, clock, "e-c", datetime(2026, 2, 10, 2, tzinfo=UTC), 25, **{"cost center": 7})
    await capture(
        api, clock, "e-a", datetime(2026, 2, 28, 23, 59, 59, 500000, tzinfo=UTC), 9, team="red"
    )
    when = datetime(2026, 2, 21, 12, tzinfo=UTC)
    clock.set(when)
    items = [
        item(
            "debit",
            {"account": f"employee:{emp}", "amount": n, "metadata": {"team": team}},
            f"tagged-{emp}-{n}",
        )
        for emp, n, team in (("e-a", 3, "red"), ("e-b", 4, "red"), ("e-c", 6, "blue"))
    ]
    for i in items:
        i.ctx["now"] = when.isoformat()
    assert [r["status"] for r in await ledger_of(api.c)._execute_batch(items)] == [201] * 3
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))


async def sources(api: Api, start: str, end: str, keys: tuple[str, ...]) -> tuple[str, str]:
    """The usage and spend sources the report picks."""
    args = await _usage_args(
        ledger_of(api.c), datetime.fromisoformat(start), datetime.fromisoformat(end), keys
    )
    return args[3], args[6]


async def test_tag_reports_equal_the_events_and_the_journal(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Every tag grouping over whole months, whole days, a day's hours and periods
    corrected at either end equals the direct sum over the events and the journal, with
    the department of the time, a key not declared, and rejected events counted nowhere;
    the tag roll-ups are what answered the declared groupings."""
    await tagged_history(api, clock)
    events = await direct_events(database_url)
    assert "ghost" not in {e.keys["tag:team"] for e in events}
    assert {e.keys["tag:cost center"] for e in events} >= {"=cc-1", "cc-2", "7"}
    used: set[str] = set()
    for start, end in PERIODS:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in GROUPINGS:
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, end, keys)
            used.update(await sources(api, start, end, keys))
    assert used == {"tag_daily", "tag_monthly", "events", "journal"}
    assert await sources(api, *PERIODS[1], ("department", "tag:team")) == (
        "tag_monthly",
        "tag_monthly",
    )
    assert await sources(api, *PERIODS[0], ("department", "tag:team")) == ("events", "journal")
    assert await sources(api, *PERIODS[3], ("tag:team", "model")) == ("tag_daily", "tag_daily")
    assert await sources(api, *PERIODS[1], ("tag:batch",)) == ("events", "journal")
    await assert_audit_clean(database_url)


async def test_by_department_from_the_events_each_account_is_read_under_its_home(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A report by department without the employee, read from the events and the journal
    (a key not declared, a period inside a day), reads each account's spend under its
    department at `from` (usage_report's `folds`), but for those who moved within the
    period, whose spend is under the department of each day: e-b's before the move counts
    under eng, where e-b was at `from`, not under ops, where e-b is today, and after it
    under ops; the department's own wallet (an account of no employee, read under its own
    id) counts under its department."""
    await tagged_history(api, clock)
    # Spend on the department's own wallet, funded from system:issuance.
    clock.set(datetime(2026, 1, 12, 8, tzinfo=UTC))
    r = await api.transfer("system:issuance", "department:eng", 10_000)
    assert r.status_code == 201, r.text
    r = await api.debit("department:eng", 7, metadata={"batch": "b2", "model": "m"})
    assert r.status_code == 201, r.text
    await recorded(api.c, event("dept-1", account="department:eng", tags={"batch": "b2"}))
    events = await direct_events(database_url)
    # Until e-b's move (since = to: not a move within the period), a whole February, and
    # hours of a day; then with the move inside: two months, and hours around it.
    periods = [
        ("2026-01-02T00:00:00Z", MOVE_AT.isoformat()),
        PERIODS[1],
        ("2026-01-12T00:00:00Z", "2026-01-12T12:00:00Z"),
        PERIODS[0],
        ("2026-01-19T08:00:00Z", "2026-01-20T12:00:00Z"),
    ]
    moved = {PERIODS[0], periods[-1]}
    groupings: list[tuple[str, ...]] = [
        ("department",),
        ("department", "tag:batch"),
        ("department", "model", "tag:batch"),
        ("month", "department", "project", "tag:team", "tag:batch"),
        ("department", "day", "tag:cost center", "tag:batch"),
    ]
    under_eng = 0
    for start, end in periods:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in groupings:
            args = await _usage_args(ledger_of(api.c), lo, hi, keys)
            if keys != ("department",) or hi - lo < timedelta(days=2):
                assert (args[3], args[4]) == ("events", (start, end) in moved), (start, end, keys)
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            want = expected(events, lo, hi, keys)
            assert r.json() == {"items": want}, (start, end, keys)
            under_eng += sum(i["department"] == "eng" for i in want)
    # e-b's spend before the move is under eng in the first period: not nothing to check.
    before = [
        e
        for e in events
        if e.keys["employee"] == "e-b"
        and datetime(2026, 1, 2, tzinfo=UTC) <= e.occurred_at < MOVE_AT
    ]
    assert before and {e.keys["department"] for e in before} == {"eng"}
    assert under_eng


async def test_reports_from_the_events_read_a_window_then_the_rest(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A report read from the events and the journal themselves (a key not declared, a
    period inside a day) reads its first WINDOW rows with one plain query, and only when
    there are more, the rest through a cursor over the same query from there on, in one
    snapshot: whole answers and pages of two equal the direct sum, whichever side of the
    window's edge they fall on."""
    await tagged_history(api, clock)
    events = await direct_events(database_url)
    monkeypatch.setattr(reports, "WINDOW", 3)
    steps = record_parts(monkeypatch)
    continued = short = 0
    for start, end in (PERIODS[0], PERIODS[4]):
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in (("tag:batch",), ("tag:team", "tag:batch"), ("model", "tag:batch")):
            assert (await sources(api, start, end, keys))[0] == "events"
            want = expected(events, lo, hi, keys)
            steps.clear()
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": want}, (start, end, keys)
            rest = [("usage_report_window", (None, 3))] if len(want) > 3 else []
            continued, short = continued + bool(rest), short + (not rest)
            assert steps == [[("rows", min(len(want), 3)), *rest]], (start, end, keys, len(want))
            pages = await pages_of(api, start, end, keys, 2)
            assert [i for p in pages for i in p] == want, (start, end, keys)
    assert continued and short, (continued, short)


async def stretch_history(api: Api, clock: FakeClock) -> None:
    """tagged_history, and `batch` tags in byte order that another collation orders
    otherwise (`B` before `a`, `été` after `j-only`), the empty string, a value only
    the journal has (`j-only`) and a number in a debit's metadata."""
    await tagged_history(api, clock)
    for n, (emp, when, batch_tag) in enumerate(
        [
            ("e-a", datetime(2026, 1, 3, 12, tzinfo=UTC), "B"),
            ("e-b", datetime(2026, 1, 3, 13, tzinfo=UTC), "a"),
            ("e-c", datetime(2026, 1, 3, 14, tzinfo=UTC), "\u00e9t\u00e9"),
            ("e-a", datetime(2026, 1, 3, 15, tzinfo=UTC), ""),
            ("e-c", datetime(2026, 1, 3, 16, tzinfo=UTC), "B"),
            ("e-b", datetime(2026, 2, 3, 1, tzinfo=UTC), "a"),
        ]
    ):
        project = ("Zeta", "beta", None)[n % 3]
        tags = {"batch": batch_tag}
        await usage(api, clock, emp, when, f"stretch-{n}", tags=tags, project=project)
    await debit(api, clock, "e-b", datetime(2026, 1, 3, 17, tzinfo=UTC), 5, batch="j-only")
    await debit(api, clock, "e-c", datetime(2026, 1, 3, 18, tzinfo=UTC), 6, batch=7)


async def test_reports_led_by_a_key_from_the_events_read_stretches_of_its_values(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A report led by a tag key not declared (or, over a short period, the model or
    the project) with the employee reads the events and the journal themselves a
    stretch of the key's values at a time (service/reports.py, _value_range_plan), in
    one snapshot. Whole answers and pages of one, two and five equal the direct sum,
    across values in byte order that another collation would order otherwise, the
    empty string, a value only the journal has, a number in a debit's metadata and
    null (last), with the values listed two at a time and a window of three rows. The
    whole answer reads the first value with a plain query, then the others through one
    cursor; a page reads one value first, and a page after a cursor the cursor's own
    value, listing no values when that fills it; a key nobody sets (one value, null)
    is the single query."""
    await stretch_history(api, clock)
    # A tag set once, before the period that is asked for it below.
    await usage(
        api, clock, "e-a", datetime(2026, 1, 3, 1, tzinfo=UTC), "phase", tags={"phase": "p0"}
    )
    events = await direct_events(database_url)
    monkeypatch.setattr(reports, "WINDOW", 3)
    monkeypatch.setattr(reports, "LEAD_VALUES_MAX", 2)
    steps = record_parts(monkeypatch)
    day = ("2026-01-03T09:00:00Z", "2026-01-03T23:30:00Z")
    cases = [
        (PERIODS[0], ("tag:batch", "employee")),
        (PERIODS[0], ("tag:batch", "employee", "model")),
        (PERIODS[4], ("tag:batch", "employee")),
        (CORRECTED[3], ("tag:batch", "employee", "project")),
        (day, ("model", "employee")),
        (day, ("project", "employee", "model")),
    ]
    for (start, end), keys in cases:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        assert (await sources(api, start, end, keys))[0] == "events", keys
        want = expected(events, lo, hi, keys)
        values = list(dict.fromkeys(i[keys[0]] for i in want))
        assert len(values) >= 3 and values[-1] is None, (keys, values)
        steps.clear()
        r = await report(api, start, end, keys)
        assert r.status_code == 200, r.text
        assert r.json() == {"items": want}, (start, end, keys)
        first = sum(i[keys[0]] == values[0] for i in want)
        head: list[tuple[str, Any]] = [("values", None), ("rows", min(first, 3))]
        if first > 3:
            head.append(("usage_report_range", (values[0], values[0], False, None, 3)))
        rest = ("usage_report_range", (values[1], None, True, None, 0))
        assert steps == [[*head, rest]], (keys, values, steps)
        for size in (1, 2, 5):
            pages = await pages_of(api, start, end, keys, size)
            assert [i for p in pages for i in p] == want, (start, end, keys, size)
        # The first page of one (two rows: one, and whether more follow): the first
        # value's rows, and the next value's when the first has only one.
        steps.clear()
        r = await paged(api, start, end, keys, {"limit": "1"})
        assert r.json()["items"] == want[:1]
        assert steps[0][:2] == [("values", None), ("rows", min(first, 3))], steps
        assert len(steps[0]) == (2 if first > 1 else 3), (first, steps)
        # After a cursor on the second value's first row, when that value has another.
        mark = reports.page_fingerprint(lo, hi, keys)
        at = next(n for n, i in enumerate(want) if i[keys[0]] == values[1])
        if at + 1 < len(want) and want[at + 1][keys[0]] == values[1]:
            steps.clear()
            cursor = encode_cursor([mark, [want[at][k] for k in keys]])
            r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "1"})
            assert r.json()["items"] == want[at + 1 : at + 2]
            # The values after it are listed only for the next page, when its rows
            # left after the page's last item (known when they are all in the first
            # plain read, of three rows) are fewer than a page and one (two).
            count = sum(i[keys[0]] == values[1] for i in want)
            listed = [("values", values[1])] if count <= 3 else []
            assert [s for s in steps[0] if s[0] == "values"] == listed, (count, steps)
            assert steps[0][len(listed)][0] == "rows", steps
        # A cursor among the rows of null (last) reads only theirs.
        nulls = [n for n, i in enumerate(want) if i[keys[0]] is None]
        steps.clear()
        cursor = encode_cursor([mark, [want[nulls[0]][k] for k in keys]])
        r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "500"})
        assert r.json()["items"] == want[nulls[0] + 1 :]
        # (The values listed first for a report whose only tag key leads it: none
        # but null would make it the report without the key.)
        listed = [("values", None)] if keys[0].startswith("tag:") else []
        reads = [s for s in steps[0] if s[0] != "rows"]
        null = ("usage_report_range", (None, None, True, None, 3))
        assert reads in (listed, [*listed, null]), steps
    # A key nobody set in the period: its one value (null) is the single query, in
    # windows, without the key (the roll-ups of the period, corrected at its ends,
    # where the events that correct its start are tagged).
    windows: list[tuple[str, str]] = []
    window_plan = reports._window_plan

    def recorded_window(ledger: Database, args: tuple[Any, ...]) -> Any:
        windows.append((args[3], args[6]))
        return window_plan(ledger, args)

    monkeypatch.setattr(reports, "_window_plan", recorded_window)
    monkeypatch.setattr(reports, "WINDOW", 2)
    for (start, end), tag, source in (
        (PERIODS[0], "tag:nobody", ("monthly_models", "monthly")),
        (("2026-01-03T03:00:00Z", "2026-01-05T05:00:00Z"), "tag:phase", ("daily", "daily")),
        (PERIODS[4], "tag:phase", ("events", "journal")),
    ):
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        keys = (tag, "employee")
        want = [{tag: None, **i} for i in expected(events, lo, hi, ("employee",))]
        assert len(want) == 3
        windows.clear()
        steps.clear()
        assert (await report(api, start, end, keys)).json() == {"items": want}, (start, tag)
        assert steps == [[("values", None), ("rows", 2), ("usage_report_window", (None, 2))]]
        assert windows == [source], windows
        # A page among the rows of null lists the values too, and reads the same.
        mark = reports.page_fingerprint(lo, hi, keys)
        cursor = encode_cursor([mark, [want[0][k] for k in keys]])
        r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "1"})
        assert r.json()["items"] == want[1:2]
        assert len(windows) == 2 and windows[0] == windows[1], windows
    # With the tag set in the period: p0's row, then the rows of null, a stretch of
    # their own, the same sums in all.
    start, end = PERIODS[0]
    keys = ("tag:phase", "employee")
    steps.clear()
    items = (await report(api, start, end, keys)).json()["items"]
    assert [(i["tag:phase"], i["employee"]) for i in items[:2]] == [("p0", "e-a"), (None, "e-a")]
    by_employee = expected(events, *map(datetime.fromisoformat, PERIODS[0]), ("employee",))
    assert sum(i["events"] for i in items) == sum(i["events"] for i in by_employee)
    assert steps == [
        [("values", None), ("rows", 1), ("usage_report_range", (None, None, True, None, 0))]
    ]


ROLLUPS = {
    "usage_tag_daily": "SELECT day, model, project, tag_values, sum(events), sum(input_tokens),"
    " sum(cached_input_tokens), sum(output_tokens), sum(credits) FROM usage_tag_daily"
    " GROUP BY 1, 2, 3, 4 HAVING sum(events) <> 0 ORDER BY 1, 2, 3, 4",
    "usage_tag_monthly": "SELECT month, account_id, tag_values, events, input_tokens,"
    " cached_input_tokens, output_tokens, credits FROM usage_tag_monthly ORDER BY 1, 2, 3",
    "spend_tag_daily": "SELECT day, model, project, tag_values, sum(debits), sum(credits)"
    " FROM spend_tag_daily GROUP BY 1, 2, 3, 4 ORDER BY 1, 2 NULLS FIRST, 3, 4",
    "spend_tag_monthly": "SELECT month, account_id, tag_values, debits, credits"
    " FROM spend_tag_monthly ORDER BY 1, 2, 3",
}


async def rollup_rows(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in ROLLUPS.items()}


async def test_write_paths_keep_what_a_rebuild_makes(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """The rows the usage write paths (single events, a batch with rejected events) and the
    spend trigger (debits, captures, a coalesced batch, a reversal) keep are exactly those
    tl_report_tags_rebuild makes from the events and the journal; archived events stay."""
    await tagged_history(api, clock)
    conn = await service_db.connect(database_url)
    try:
        kept = await rollup_rows(conn)
        assert all(kept.values()), kept
        await conn.execute("SELECT tl_report_tags_rebuild()")
        assert await rollup_rows(conn) == kept
        # Archived events stay in the roll-ups and in their rebuild.
        moved = await archive_before(conn, "2026-02-01")
        assert moved > 5
        await conn.execute("SELECT tl_report_tags_rebuild()")
        assert await rollup_rows(conn) == kept
    finally:
        await conn.close()
    # Reports the tag roll-ups answer (the events alone, read whole, miss archived
    # events: a tag key not declared, or a period shorter than two days).
    events = await direct_events(database_url)
    for (start, end), keys in (
        (PERIODS[0], ("tag:team",)),
        (PERIODS[0], ("employee", "tag:cost center")),
        (PERIODS[2], ("tag:team", "day")),
        (CORRECTED[0], ("tag:team", "project")),
        (CORRECTED[3], ("employee", "month", "tag:team")),
    ):
        assert (await sources(api, start, end, keys))[0].startswith("tag_"), (start, keys)
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        r = await report(api, start, end, keys)
        assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, keys)


async def test_declaring_a_key_backfills_its_rollups(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """History written with no key declared has no tag roll-ups; declaring `batch` then
    (start-up's sync) rebuilds them from the events and the journal, and reports by it read
    them and stay exact; syncing the same keys again rebuilds nothing; declaring none
    empties them and reports read the events again, still exact."""
    ledger = ledger_of(api.c)
    declared = ledger.config
    try:
        ledger.config = msgspec.structs.replace(declared, report_tags="")
        assert await sync_report_tags(ledger)
        await tagged_history(api, clock)
        conn = await service_db.connect(database_url)
        try:
            assert not any((await rollup_rows(conn)).values())
            ledger.config = msgspec.structs.replace(declared, report_tags="batch,team")
            assert await sync_report_tags(ledger)
            assert not await sync_report_tags(ledger)
            assert all((await rollup_rows(conn)).values())
            events = await direct_events(database_url)
            month = PERIODS[1]
            for keys in (("tag:batch",), ("tag:team", "tag:batch"), ("employee", "tag:batch")):
                assert (await sources(api, *month, keys))[0].startswith("tag_"), keys
                r = await report(api, *month, keys)
                lo, hi = (datetime.fromisoformat(b) for b in month)
                assert r.json() == {"items": expected(events, lo, hi, keys)}, keys
            ledger.config = msgspec.structs.replace(declared, report_tags="")
            assert await sync_report_tags(ledger)
            assert not any((await rollup_rows(conn)).values())
            assert await sources(api, *month, ("tag:team",)) == ("events", "journal")
            r = await report(api, *month, ("tag:team",))
            assert r.json() == {"items": expected(events, lo, hi, ("tag:team",))}
        finally:
            await conn.close()
    finally:
        ledger.config = declared


def test_which_tag_reports_read_the_rollups() -> None:
    """Declared keys only; without an account key any span of two days or more; with
    one, whole months (usage_span's) by employee, department and month, nobody moved."""
    d = datetime.fromisoformat
    month = (d("2026-03-01T00:00Z"), d("2026-04-01T00:00Z"))
    hours = (d("2026-03-01T06:00Z"), d("2026-03-31T18:00Z"))
    team = frozenset({"team"})
    assert tag_source(*month, ("tag:team",), declared=team) == "tag_daily"
    assert tag_source(*hours, ("tag:team", "model", "project", "day"), declared=team) == (
        "tag_daily"
    )
    assert tag_source(*hours, ("department", "tag:team"), declared=team) == "tag_monthly"
    assert tag_source(*month, ("employee", "month", "tag:team"), declared=team) == "tag_monthly"
    assert tag_source(*month, ("department", "tag:team"), True, team) is None  # a move
    assert tag_source(*month, ("employee", "tag:team", "day"), declared=team) is None
    assert tag_source(*month, ("employee", "tag:team", "project"), declared=team) is None
    assert (
        tag_source(d("2026-03-02T00:00Z"), month[1], ("employee", "tag:team"), False, team) is None
    )
    assert tag_source(*month, ("tag:team",)) is None  # not declared
    assert tag_source(*month, ("tag:team", "tag:x"), declared=team) is None
    assert (
        tag_source(d("2026-03-01T06:00Z"), d("2026-03-02T06:00Z"), ("tag:team",), False, team)
        is None
    )
    assert tag_source(*month, ("employee",), declared=team) is None


@pytest.mark.parametrize(
    "value",
    ["a,,b", "a, b ,a", "x" * 65, "a,b,c,d,e,f,g,h,i"],
)
def test_bad_report_tags(value: str) -> None:
    """TOKENLEDGER_REPORT_TAGS is at most 8 names of 1 to 64 characters, none twice."""
    with pytest.raises(msgspec.ValidationError, match="report_tags"):
        Config.from_env({"TOKENLEDGER_REPORT_TAGS": value})


def test_report_tags_setting() -> None:
    """Names are trimmed; empty declares none."""
    assert Config.from_env(
        {"TOKENLEDGER_REPORT_TAGS": " team , cost center"}
    ).report_tag_names() == (
        "team",
        "cost center",
    )
    assert Config.from_env({}).report_tag_names() == ()


BENCH_SQL = sections(Path(__file__).parents[2] / "bench" / "reports.sql")


@pytest.mark.parametrize("keys", ["tag:team", "department,tag:team", "tag:team,project,day"])
async def test_a_declared_month_reads_no_events_nor_journal(
    api: Api, database_url: str, keys: str
) -> None:
    """On 20,000 events and 3,000 debits over March (bench/reports.sql at a small scale),
    a month's report by the declared `team` (shifted by a microsecond, so corrected at
    its start) reads the tag roll-ups: no sequential scan of usage_events and only the
    edge's events fetched, and of the journal only its index probe of the edge (which holds
    no debit), never the month's 3,000 debits a tag report read before. Its answer equals
    the events and the journal read whole."""
    start, end = datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    conn = await service_db.connect(database_url)
    try:
        await conn.execute(BENCH_SQL["setup"].format(departments=5, employees=100))
        await conn.execute(
            BENCH_SQL["events"].format(departments=5, employees=100),
            datetime(2026, 3, 1, tzinfo=UTC),
            end,
            1,
            20_000,
        )
        await conn.execute(BENCH_SQL["rollup"])
        await conn.execute(
            BENCH_SQL["journal"].format(
                grant=100_000, debits=30, debit=100, start="2026-03-01T00:00:00+00:00", end=end
            )
        )
        await conn.execute("SELECT tl_spend_rollup_rebuild()")
        await conn.execute("SELECT tl_report_tags_rebuild()")
        await conn.execute("ANALYZE")

        async def counters() -> dict[str, tuple[int, int, int]]:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            rows = await conn.fetch(
                "SELECT relname, coalesce(seq_scan, 0) AS seq, coalesce(idx_scan, 0) AS idx,"
                " coalesce(idx_tup_fetch, 0) AS fetched FROM pg_stat_user_tables"
                " WHERE relname IN ('usage_events', 'transactions', 'entries')"
            )
            return {r["relname"]: (r["seq"], r["idx"], r["fetched"]) for r in rows}

        ledger: Database = ledger_of(api.c)
        args = await _usage_args(ledger, start, end, parse_group_by(keys))
        assert args[3] == args[6] and args[3].startswith("tag_")
        before = await counters()
        reader = await asyncpg.connect(database_url)
        try:
            rows = await reader.fetch(ledger.queries["usage_report"], *args)
            await reader.execute("SELECT pg_stat_force_next_flush()")
        finally:
            await reader.close()
        after = await counters()
        whole = await conn.fetch(
            ledger.queries["usage_report"], *args[:3], "events", *args[4:6], "journal", end, end
        )
    finally:
        await conn.close()
    assert len(rows) > 1
    assert [tuple(r) for r in rows] == [tuple(r) for r in whole]
    assert after["usage_events"][0] == before["usage_events"][0]
    assert after["usage_events"][2] - before["usage_events"][2] <= 10
    # The journal's edge is probed by its index (a few tuples), never the month's 3,000.
    for table in ("transactions", "entries"):
        assert after[table][0] == before[table][0], table
        assert after[table][2] - before[table][2] <= 10, (table, before, after)


async def test_app_role_syncs_and_keeps_the_tag_rollups(
    config: Config, admin_key: str, clock: FakeClock, database_url: str
) -> None:
    """Run as tokenledger_app, start-up declares the keys (tl_report_tags_sync locks the
    journal as its owner), the write paths keep the tag roll-ups and reports read them."""
    import httpx

    from service.app import create_app
    from tests.api.conftest import running

    cfg = msgspec.structs.replace(config, db_role="tokenledger_app", report_tags="team")
    app = create_app(cfg, clock=clock)
    async with (
        running(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver.local",
            timeout=30,
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c,
    ):
        c.app = app  # type: ignore[attr-defined]  # why: ledger_of reaches the app's state
        api = Api(c)
        await build_history(api, clock)
        await usage(api, clock, "e-a", datetime(2026, 2, 3, tzinfo=UTC), "r-1", tags={"team": "x"})
        await debit(api, clock, "e-c", datetime(2026, 2, 4, tzinfo=UTC), 8, team="x")
        assert await sources(api, *PERIODS[1], ("department", "tag:team")) == (
            "tag_monthly",
            "tag_monthly",
        )
        events = await direct_events(database_url)
        lo, hi = (datetime.fromisoformat(b) for b in PERIODS[1])
        for keys in (("department", "tag:team"), ("tag:team", "day")):
            r = await report(api, *PERIODS[1], keys)
            assert r.json() == {"items": expected(events, lo, hi, keys)}, keys
            assert {i["tag:team"] for i in r.json()["items"]} >= {"x"}


def cursor_items(cursor: str) -> list[Any]:
    """What a report page's cursor holds (service/api/reports.py, _PageCursor)."""
    return msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


async def test_a_page_cursor_carries_what_its_page_learnt_of_the_values_ahead(
    api: Api, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """A page of a report read a stretch of values at a time hands the next page, in
    its cursor, how many rows of its last item's value follow it and the values after
    that one (listed then, when those rows fall short of a page). The next page reads
    its cursor's value and the values after it in one stretch, without listing them
    (the bench month's `tag:team,employee` page across two values: 1.1 to 1.5 s when
    it read one, listed, and read the other). The values only bound the stretch, so
    values added since, and a cursor whose values are wrong, still read every row."""
    await stretch_history(api, clock)
    steps = record_parts(monkeypatch)
    start, end = PERIODS[0]
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    keys = ("tag:batch", "employee")
    lead = keys[0]
    want = expected(await direct_events(database_url), lo, hi, keys)
    values = list(dict.fromkeys(i[lead] for i in want))
    assert len(values) >= 6 and values[-1] is None, values
    mark = reports.page_fingerprint(lo, hi, keys)

    def position(after: list[Any]) -> int:
        return next(n for n, i in enumerate(want) if [i[k] for k in keys] == after)

    # Walks of pages of one, two and three: every cursor that says what follows its
    # item says it exactly; and a page after one that names the values ahead, where
    # its value has fewer rows left than the page needs, reads one stretch and lists
    # nothing after the cursor's value.
    # (Their rows read whole: the narrowing to the cursor's employee on is below.)
    monkeypatch.setattr(reports, "RESTRICT_SHARE", 0.0)
    carried = stretched = nulls = 0
    walked: list[str] = []
    for limit in (1, 2, 3):
        cursor: str | None = None
        got: list[dict[str, Any]] = []
        while True:
            params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            steps.clear()
            r = await paged(api, start, end, keys, params)
            assert r.status_code == 200, r.text
            body = r.json()
            got += body["items"]
            if cursor is not None and len(cursor_items(cursor)) == 5:
                _, after, left, _, ahead = cursor_items(cursor)
                if after[0] is None:
                    # Among the rows of null, from a page read in stretches: values
                    # were set, so theirs are read without listing the values again.
                    nulls += 1
                    assert steps[0] == [("rows", sum(i[lead] is None for i in want))], steps
                if ahead and left < limit + 1:
                    stretched += 1
                    # Its first read holds more than the cursor's value, and no
                    # values were listed after that one.
                    first = next(s for s in steps[0] if s[0] == "rows")
                    assert first[1] > sum(i[lead] == after[0] for i in want), steps
                    assert ("values", after[0]) not in steps[0], steps
            cursor = body["next_cursor"]
            if cursor is None:
                break
            walked.append(cursor)
            held = cursor_items(cursor)
            assert held[:2] == [mark, [got[-1][k] for k in keys]]
            if len(held) == 5:
                carried += 1
                _, after, left, per, ahead = held
                at = position(after)
                value = want[at][lead]
                assert left == sum(1 for i in want[at + 1 :] if i[lead] == value), held
                assert per >= 1
                later = [v for v in values if reports.order_key([v]) > reports.order_key([value])]
                assert ahead in ([], later[: reports.AHEAD_MAX]), (held, later)
                if left < limit + 1:
                    assert ahead == later[: reports.AHEAD_MAX], (held, later)
        assert got == want, limit
    assert carried > 10 and stretched > 5 and nulls > 2, (carried, stretched, nulls)

    # Cursors whose values ahead are wrong (a value skipped, out of order, null
    # early, one that has no rows) read the same rows as the plain cursor.
    for at in range(len(want) - 1):
        after = [want[at][k] for k in keys]
        later = [v for v in values if reports.order_key([v]) > reports.order_key([after[0]])]
        wrong = [[later[-1]], later[::-1][:8], [None], ["~none~"]] if later else [["x"]]
        for ahead in wrong:
            for left in (0, 3):
                held = encode_cursor([mark, after, left, 1, ahead])
                r = await paged(api, start, end, keys, {"cursor": held, "limit": "4"})
                assert r.json()["items"] == want[at + 1 : at + 5], (after, ahead, left)

    # A page that reads its cursor's value alone (a cursor made of its keys alone
    # here) reads only the rows of the employees from the cursor's on, and those
    # without an employee, when they are few enough: every one of them here.
    monkeypatch.setattr(reports, "RESTRICT_SHARE", 1.0)
    restricted = 0
    for at in range(len(want) - 1):
        after = [want[at][k] for k in keys]
        steps.clear()
        held = encode_cursor([mark, after])
        r = await paged(api, start, end, keys, {"cursor": held, "limit": "2"})
        assert r.json()["items"] == want[at + 1 : at + 3], after
        first = next(s for s in steps[0] if s[0] == "rows")
        of_value = [i for i in want if i[lead] == after[0]]
        if after[1] is None:  # (the rows without an employee: no narrowing)
            assert first == ("rows", len(of_value)), (after, steps)
            continue
        theirs = [i for i in of_value if i["employee"] is None or i["employee"] >= after[1]]
        assert first == ("rows", len(theirs)), (after, steps)
        restricted += len(theirs) < len(of_value)
    assert restricted >= 3, restricted
    # Over the share, the value's rows are read whole.
    monkeypatch.setattr(reports, "RESTRICT_SHARE", 0.0)
    at = max(n for n, i in enumerate(want[:-1]) if i["employee"] is not None)
    after = [want[at][k] for k in keys]
    steps.clear()
    r = await paged(api, start, end, keys, {"cursor": encode_cursor([mark, after]), "limit": "1"})
    assert r.json()["items"] == want[at + 1 : at + 2]
    first = next(s for s in steps[0] if s[0] == "rows")
    assert first == ("rows", sum(i[lead] == after[0] for i in want)), steps

    # Values added after the cursors were handed out, between the values they name
    # and after them: each cursor's walk to the end reads them.
    when = datetime(2026, 1, 20, 9, tzinfo=UTC)
    for n, added in enumerate(("0", "C", "b", "k", "zz", "\u00ff")):
        await usage(
            api, clock, ("e-a", "e-b", "e-c")[n % 3], when, f"late-{n}", tags={"batch": added}
        )
    now = expected(await direct_events(database_url), lo, hi, keys)
    assert len(now) == len(want) + 6
    for cursor in walked[::3]:
        after = cursor_items(cursor)[1]
        rest = [
            i for i in now if reports.order_key([i[k] for k in keys]) > reports.order_key(after)
        ]
        got = []
        page: str | None = cursor
        while page is not None:
            body = (await paged(api, start, end, keys, {"cursor": page, "limit": "3"})).json()
            got += body["items"]
            page = body["next_cursor"]
        assert got == rest, after


@pytest.mark.parametrize(
    "extra",
    [
        [-1, 1, []],  # rows left below zero
        [0, 0, []],  # no rows per value
        [0, 1, ["a"] * 9],  # more values than a cursor holds
        [0, 1, [], 4],  # an item too many
        [0, 1, [5]],  # a value that is not text
        ["0", 1, []],
    ],
)
async def test_a_page_cursor_with_a_bad_lookahead_is_refused(api: Api, extra: list[Any]) -> None:
    start, end = PERIODS[0]
    keys = ("tag:batch", "employee")
    mark = reports.page_fingerprint(
        datetime.fromisoformat(start), datetime.fromisoformat(end), keys
    )
    cursor = encode_cursor([mark, ["a", "e-a"], *extra])
    r = await paged(api, start, end, keys, {"cursor": cursor, "limit": "2"})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request"
    assert r.json()["errors"] == [{"path": "cursor"}]
