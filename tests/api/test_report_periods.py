"""Usage reports over periods whose bounds are not UTC midnights (issue 16, the reports'
speed): a period of at least two days reads the roll-ups of its bounds' nearest UTC
midnights and corrects each end with the events between bound and midnight, added or
subtracted (service/reports.py usage_span, service/sql/reports.sql). Each such report
equals the direct sum over the usage events and the journal, for every grouping; events
moved to the archive are still corrected for; the department of the time holds across a
move inside a corrected edge; and the events the report reads are those of the edges, not
the period's."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bench.year import sections
from service import db as service_db
from service.journal import Database
from service.reports import (
    _usage_args,
    nearest_midnight,
    parse_group_by,
    source_for,
    usage_span,
)
from tests.api.conftest import Api, FakeClock
from tests.api.test_coalescing import ledger_of
from tests.api.test_reports import GROUPINGS, expected, report
from tests.api.test_spend_rollups import build_history, journal_events, usage

# (from, to): each end corrected one way or the other.
CORRECTED = [
    # Both ends subtracted: the midnights before from (01:00) and after to (23:00).
    ("2026-01-10T01:00:00Z", "2026-02-10T23:00:00Z"),
    # Both ends added: the midnight after from (20:00) and before to (03:00).
    ("2026-01-09T20:00:00Z", "2026-02-10T03:00:00Z"),
    # Whole months but a microsecond: usage_monthly(_models), less the first microsecond.
    ("2026-01-01T00:00:00.000001Z", "2026-03-01T00:00:00Z"),
    # Offsets; added at from (Dec 31 23:00 UTC), subtracted at to (a second to midnight).
    ("2026-01-01T05:00:00+06:00", "2026-02-28T23:59:59Z"),
    # Noon is a tie, rounded down (subtracted at from, added at to).
    ("2026-01-14T12:00:00Z", "2026-01-20T12:00:00Z"),
]


async def edge_usage(api: Api, clock: FakeClock) -> None:
    """Usage events on both sides of the corrected ends above."""
    for n, when in enumerate(
        (
            datetime(2026, 1, 1, 0, 0, tzinfo=UTC),
            datetime(2026, 1, 9, 21, tzinfo=UTC),
            datetime(2026, 1, 10, 0, 10, tzinfo=UTC),
            datetime(2026, 1, 10, 0, 50, tzinfo=UTC),
            datetime(2026, 1, 10, 13, tzinfo=UTC),
            datetime(2026, 1, 14, 11, 59, tzinfo=UTC),
            datetime(2026, 1, 14, 12, 0, tzinfo=UTC),
            datetime(2026, 1, 20, 11, 0, tzinfo=UTC),
            datetime(2026, 1, 20, 12, 0, tzinfo=UTC),
            datetime(2026, 2, 10, 2, tzinfo=UTC),
            datetime(2026, 2, 10, 22, 30, tzinfo=UTC),
            datetime(2026, 2, 10, 23, 30, tzinfo=UTC),
            datetime(2026, 2, 28, 23, 59, 59, 500000, tzinfo=UTC),
        )
    ):
        emp = ("e-a", "e-b", "e-c")[n % 3]
        extra = {"project": "alpha"} if n % 2 else {}
        await usage(api, clock, emp, when, f"edge-{n}", **extra)


@pytest.mark.parametrize(
    ("when", "midnight"),
    [
        ("2026-01-10T00:00:00Z", "2026-01-10T00:00:00Z"),
        ("2026-01-10T00:00:00.000001Z", "2026-01-10T00:00:00Z"),
        ("2026-01-10T11:59:59.999999Z", "2026-01-10T00:00:00Z"),
        ("2026-01-10T12:00:00Z", "2026-01-10T00:00:00Z"),
        ("2026-01-10T12:00:00.000001Z", "2026-01-11T00:00:00Z"),
        ("2026-01-10T23:59:59.999999Z", "2026-01-11T00:00:00Z"),
        ("2026-01-10T05:00:00+06:00", "2026-01-10T00:00:00Z"),
        ("2026-01-10T02:00:00-11:00", "2026-01-11T00:00:00Z"),
    ],
)
def test_nearest_midnight(when: str, midnight: str) -> None:
    """The UTC midnight nearest to an instant, whatever its offset; noon rounds down."""
    assert nearest_midnight(datetime.fromisoformat(when)) == datetime.fromisoformat(midnight)


def test_which_periods_are_corrected() -> None:
    """Two days or more read a roll-up (the monthly one when the nearest midnights are
    month starts); shorter periods, and tag keys, read the events."""
    d = datetime.fromisoformat
    assert usage_span(d("2026-01-01T00:00Z"), d("2026-01-02T00:00Z")) == (
        d("2026-01-01T00:00Z"),
        d("2026-01-02T00:00Z"),
    )
    assert usage_span(d("2026-01-01T06:00Z"), d("2026-01-03T05:59:59Z")) is None
    assert usage_span(d("2026-01-01T06:00Z"), d("2026-01-03T06:00Z")) == (
        d("2026-01-01T00:00Z"),
        d("2026-01-03T00:00Z"),
    )
    month = (d("2026-03-01T00:00:00.000001Z"), d("2026-04-01T00:00Z"))
    assert source_for(*month, ("employee",)) == "monthly_models"
    assert source_for(*month, ("employee", "project")) == "monthly"
    assert source_for(*month, ("employee", "day")) == "daily"
    assert source_for(*month, ("model",)) == "models"
    assert source_for(*month, ("tag:team",)) == "events"
    assert source_for(*month, ("employee",), split_days=True) == "daily"


async def test_corrected_periods_equal_the_journal(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Every grouping over periods corrected at their ends (added, subtracted, months, a
    tie, offsets) equals the direct sum over the usage events and the journal, with e-b's
    spend in eng before its move (a midnight inside every period) and in ops after."""
    await build_history(api, clock)
    await edge_usage(api, clock)
    events = await journal_events(database_url)
    for start, end in CORRECTED:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        assert usage_span(lo, hi) not in (None, (lo, hi))
        assert any(not lo <= e.occurred_at < hi for e in events)
        for keys in GROUPINGS:
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, keys)


async def history_with_a_move(api: Api, clock: FakeClock) -> None:
    """build_history and edge_usage, then e-c's usage on either side of its move from
    ops to eng at 00:30 on January 10th."""
    await build_history(api, clock)
    await edge_usage(api, clock)
    await usage(api, clock, "e-c", datetime(2026, 1, 10, 0, 5, tzinfo=UTC), "c-before")
    clock.set(datetime(2026, 1, 10, 0, 30, tzinfo=UTC))
    await api.employee("e-c", "eng")
    await usage(api, clock, "e-c", datetime(2026, 1, 10, 4, tzinfo=UTC), "c-after")


async def test_a_move_inside_a_subtracted_edge(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """e-c moves from ops to eng at 00:30 on a day whose first hour a period subtracts: the
    roll-up's day and the subtracted events cancel in the same department, and the period's
    own spend is in eng (nobody moved within the period, so no day split); a period that
    contains the move splits by day."""
    await history_with_a_move(api, clock)
    events = await journal_events(database_url)
    for start, end in (
        ("2026-01-10T01:00:00Z", "2026-02-10T23:00:00Z"),
        ("2026-01-10T00:20:00Z", "2026-02-11T00:05:00Z"),
    ):
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in (("department",), ("employee", "department"), ("department", "day")):
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, keys)
    r = await report(
        api, "2026-01-10T01:00:00Z", "2026-02-10T23:00:00Z", ("employee", "department")
    )
    assert {"employee": "e-c", "department": "ops"} not in [
        {"employee": i["employee"], "department": i["department"]} for i in r.json()["items"]
    ]


async def archive_before(conn: asyncpg.Connection, day: str) -> int:
    """Moves the usage events that occurred before `day` to usage_events_archive, as
    the retention job does (tl_archive_usage_events, which also waits for the
    events' recorded_at: the real clock here, not the tests' one); answers how many."""
    moved = await conn.execute(
        "WITH a AS (DELETE FROM usage_events WHERE occurred_at < $1::text::date RETURNING *)"
        " INSERT INTO usage_events_archive (id, source, event_id, account_id, model,"
        " price_id, input_tokens, cached_input_tokens, output_tokens, cost,"
        " transaction_id, reservation_id, project, tags, occurred_at, recorded_at, result,"
        " shortfall, violation)"
        " SELECT id, source, event_id, account_id, model, price_id, input_tokens,"
        " cached_input_tokens, output_tokens, cost, transaction_id, reservation_id,"
        " project, tags, occurred_at, recorded_at, result, shortfall, violation FROM a",
        day,
    )
    return int(moved.split()[-1])


async def archived_history(api: Api, clock: FakeClock, database_url: str) -> list[Any]:
    """build_history and edge_usage, with January's events then moved to the archive;
    answers every event (the journal's view, archived ones included)."""
    await build_history(api, clock)
    await edge_usage(api, clock)
    events = await journal_events(database_url)
    conn = await service_db.connect(database_url)
    try:
        assert await archive_before(conn, "2026-02-01") > 5
    finally:
        await conn.close()
    return events


async def test_archived_events_are_corrected_for(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Events moved to usage_events_archive stay in the roll-ups; the corrections read the
    archive too, so a corrected period over archived days still equals every event's sum
    (the events themselves, read whole, would miss them)."""
    events = await archived_history(api, clock, database_url)
    for start, end in CORRECTED[:2]:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in (("employee",), ("model", "project"), ("department", "day")):
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, keys)


async def test_short_periods_over_archived_days_read_the_archive(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A period shorter than two days is summed from the events themselves (source
    'events'): over days whose events the retention job moved to usage_events_archive,
    it reads the archive too, so it still equals every event's sum (it used to answer
    nothing for them, silently)."""
    events = await archived_history(api, clock, database_url)
    for start, end in (
        ("2026-01-09T20:00:00Z", "2026-01-10T23:00:00Z"),
        ("2026-01-14T11:00:00Z", "2026-01-15T20:00:00Z"),
        ("2026-01-31T12:00:00Z", "2026-02-01T12:00:00Z"),
    ):
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        assert source_for(lo, hi, ("employee",)) == "events"
        for keys in (("employee",), ("model", "project"), ("department", "day")):
            want = expected(events, lo, hi, keys)
            assert want, (start, keys)  # the period has archived events to miss
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": want}, (start, keys)


BENCH_SQL = sections(Path(__file__).parents[2] / "bench" / "reports.sql")


@pytest.mark.parametrize(
    ("start", "keys", "source"),
    [
        (datetime(2026, 3, 1, 3, tzinfo=UTC), "employee", "monthly_models"),
        (datetime(2026, 3, 1, 2, 0, 0, 1, tzinfo=UTC), "department,project", "monthly"),
        (datetime(2026, 3, 1, 6, tzinfo=UTC), "model,day", "models"),
        (datetime(2026, 3, 1, 18, tzinfo=UTC), "employee,day", "daily"),
    ],
)
async def test_a_corrected_month_reads_only_its_edges_events(
    api: Api, database_url: str, start: datetime, keys: str, source: str
) -> None:
    """On 20,000 events over March (bench/reports.sql at a small scale), a month's report
    whose start is not a midnight reads the roll-up and fetches only the events of its edge
    from usage_events (by its index, no sequential scan): counted with the table's own
    statistics. Its answer equals the events read whole (source 'events')."""
    end = datetime(2026, 4, 1, tzinfo=UTC)
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
        await conn.execute("ANALYZE")
        edge = int(
            await conn.fetchval(
                "SELECT count(*) FROM usage_events WHERE occurred_at >= least($1::timestamptz, $2)"
                " AND occurred_at < greatest($1::timestamptz, $2)",
                start,
                nearest_midnight(start),
            )
        )

        async def fetched() -> tuple[int, int]:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            row = await conn.fetchrow(
                "SELECT coalesce(seq_scan, 0) AS seq, coalesce(idx_tup_fetch, 0) AS fetched"
                " FROM pg_stat_user_tables WHERE relname = 'usage_events'"
            )
            assert row is not None
            return int(row["seq"]), int(row["fetched"])

        ledger: Database = ledger_of(api.c)
        args = await _usage_args(ledger, start, end, parse_group_by(keys))
        assert args[3] == source
        before = await fetched()
        reader = await asyncpg.connect(database_url)
        try:
            rows = await reader.fetch(ledger.queries["usage_report"], *args)
            await reader.execute("SELECT pg_stat_force_next_flush()")
        finally:
            await reader.close()
        after = await fetched()
        whole = await conn.fetch(ledger.queries["usage_report"], *args[:3], "events", *args[4:])
    finally:
        await conn.close()
    assert len(rows) > 1
    assert [tuple(r) for r in rows] == [tuple(r) for r in whole]
    # No sequential scan of the events, and about the edge's events fetched (none here
    # has a policy mark, which the report reads apart; the statistics count a few more
    # than the edge holds): well under a day's, where the period holds 20,000.
    assert after[0] == before[0]
    assert 0 < edge < 20_000 / 31 / 2
    assert after[1] - before[1] <= 2 * edge, (before, after, edge)
