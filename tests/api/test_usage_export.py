"""The employee,model,project export (issue 16, every report under a second): over
months of roll-ups it is answered by the `usage_export` query, whose lines PostgreSQL
writes as JSON or CSV in the answer's order. Its answer is the general path's, the CSV
byte for byte, over whole months and over periods corrected at their ends."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from service import reports
from service.journal import Database
from service.reports import EXPORT_KEYS, TOTALS, _items, _usage_args, export_span, to_csv
from tests.api.conftest import Api, FakeClock
from tests.api.test_coalescing import ledger_of
from tests.api.test_reports import Event, expected, make_events, report
from tests.api.test_reports_spend import make_spends

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
    api: Api, database_url: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """The same report by the general `usage_report` query (what answered it before)."""
    ledger: Database = ledger_of(api.c)
    args = await _usage_args(ledger, start, end, EXPORT_KEYS)
    assert args[3] == "monthly" and args[6] == "monthly", args
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(ledger.queries["usage_report"], *args)
    finally:
        await conn.close()
    return _items(EXPORT_KEYS, rows)


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
    queries: list[str] = []
    original = Database.stream_slow

    async def recording(self: Database, query: str, *args: Any, **kw: Any) -> Any:
        queries.append(query)
        async for rows in original(self, query, *args, **kw):
            yield rows

    monkeypatch.setattr(Database, "stream_slow", recording)
    want = expected(events, lo, hi, EXPORT_KEYS)
    general = await general_path(api, database_url, lo, hi)
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
    assert queries == ["usage_export", "usage_export"]

    # The list form (the bench's SQL path) is the same answer.
    assert await reports.usage_report(ledger_of(api.c), lo, hi, EXPORT_KEYS) == want


async def test_export_streams_in_batches(
    api: Api, database_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is read EXPORT_BATCH lines at a time and written as it is read: with a
    batch of 3 the answer comes in many reads and is still exactly the report; an empty
    month is a well-formed empty answer in both forms."""
    events = await make_events(api, database_url)
    monkeypatch.setattr(reports, "EXPORT_BATCH", 3)
    sizes: list[int] = []
    original = Database.stream_slow

    async def counting(self: Database, *args: Any, **kw: Any) -> Any:
        async for rows in original(self, *args, **kw):
            sizes.append(len(rows))
            yield rows

    monkeypatch.setattr(Database, "stream_slow", counting)
    lo, hi = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    want = expected(events, lo, hi, EXPORT_KEYS)
    assert len(want) > 10
    r = await report(api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", EXPORT_KEYS)
    assert "content-length" not in r.headers  # streamed, not one body
    assert r.json() == {"items": want}
    assert max(sizes) == 3 and sum(sizes) == len(want)
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


async def test_csv_cell_is_pythons(database_url: str) -> None:
    """tl_csv_cell writes a key as service/reports.py's csv writer does, for text that
    needs quoting, neutralising, both or neither, and for null."""
    values: list[str | None] = [*AWKWARD, None, '"', ",", "\n", "=", "'", "a\r\nb", "-1"]
    conn = await asyncpg.connect(database_url)
    try:
        got = await conn.fetch(
            "SELECT tl_csv_cell(v) || ',1' || E'\\r\\n' AS line"
            " FROM unnest($1::text[]) WITH ORDINALITY AS x(v, n) ORDER BY n",
            values,
        )
    finally:
        await conn.close()
    for value, row in zip(values, got, strict=True):
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerow([reports.csv_cell(value), 1])
        assert row["line"] == out.getvalue(), value
