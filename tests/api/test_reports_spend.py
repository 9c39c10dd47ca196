"""Usage reports count every kind of spend and group by tags (issue 16, API.md "Reports"):
debits and captures by amount count under their metadata's model and project (null when
they have none), beside the usage events; `group_by` takes `tag:<name>`, a usage event's
tag or a debit's or capture's metadata key of that name."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.reports import TOTALS
from tests.api.conftest import Api, FakeClock, key, problem
from tests.api.test_reports import GROUPINGS, Event, expected, make_events, report

# (employee, at, amount, metadata, by): debits and captures by amount, some with a
# model, project and tags in their metadata, some without.
SPENDS: list[tuple[str, datetime, int, dict[str, Any] | None, str]] = [
    ("e-a", datetime(2026, 1, 3, 10, tzinfo=UTC), 700, {"model": "gpt-4o"}, "debit"),
    (
        "e-a",
        datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC),
        11,
        {"model": "gpt-4o", "project": "alpha", "team": "red"},
        "debit",
    ),
    ("e-b", datetime(2026, 2, 1, tzinfo=UTC), 90, None, "debit"),
    ("e-c", datetime(2026, 2, 14, 8, tzinfo=UTC), 333, {"team": "blue", "batch": 7}, "capture"),
    (
        "e-d",
        datetime(2026, 2, 20, 12, tzinfo=UTC),
        45,
        {"model": "ledger-job", "project": "beta", "cost center": "=cc-1"},
        "capture",
    ),
    ("e-c", datetime(2026, 2, 28, 23, 0, tzinfo=UTC), 5, {"note": "no model"}, "debit"),
]
DEPARTMENTS = {"e-a": "eng", "e-b": "eng", "e-c": "ops", "e-d": "ops"}
TAG_GROUPINGS = [
    ("tag:team",),
    ("tag:team", "model"),
    ("employee", "tag:team", "month"),
    ("tag:cost center", "tag:team"),
    ("department", "tag:team", "project", "day"),
]


async def make_spends(api: Api, clock: FakeClock) -> list[Event]:
    """The SPENDS posted through the API at their instants, as report events."""
    clock.set(datetime(2025, 12, 1, tzinfo=UTC))
    for emp in DEPARTMENTS:
        await api.grant(emp, 100_000)
    out = []
    for emp, at, amount, metadata, by in SPENDS:
        clock.set(at)
        extra = {"metadata": metadata} if metadata is not None else {}
        if by == "debit":
            r = await api.debit(f"employee:{emp}", amount, **extra)
            assert r.status_code == 201, r.text
        else:
            # Reserved a minute earlier, captured (by amount, less than held) at `at`.
            clock.set(at - timedelta(minutes=1))
            r = await api.c.post(
                "/v1/reservations",
                json={"account": f"employee:{emp}", "amount": amount * 2},
                headers=key(),
            )
            assert r.status_code == 201, r.text
            clock.set(at)
            r = await api.c.post(
                f"/v1/reservations/{r.json()['id']}/capture",
                json={"amount": amount, **extra},
                headers=key(),
            )
            assert r.status_code == 200, r.text
        meta = metadata or {}
        keys = {
            "employee": emp,
            "department": DEPARTMENTS[emp],
            "model": meta.get("model"),
            "project": meta.get("project"),
            "day": at.strftime("%Y-%m-%d"),
            "month": at.strftime("%Y-%m"),
            "tag:team": meta.get("team"),
            "tag:cost center": meta.get("cost center"),
        }
        totals = {**dict.fromkeys(TOTALS, 0), "credits": amount, "debits": 1}
        totals["debit_credits"] = amount
        out.append(Event(keys, at, totals))
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))
    return out


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", id="whole-months"),
        pytest.param("2026-01-02T00:00:00Z", "2026-02-20T00:00:00Z", id="midnights"),
        pytest.param("2026-01-10T12:00:00Z", "2026-02-20T12:00:00Z", id="raw-events"),
    ],
)
async def test_debits_and_captures_count_in_every_grouping(
    api: Api, database_url: str, clock: FakeClock, start: str, end: str
) -> None:
    """Every grouping, whichever source it reads, sums the usage events and the debits and
    captures by amount in the period; a debit without a model, project or tag counts under
    null."""
    events = await make_events(api, database_url, count=60)
    events += await make_spends(api, clock)
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    for keys in [*GROUPINGS, *TAG_GROUPINGS]:
        r = await report(api, start, end, keys)
        assert r.status_code == 200, r.text
        assert r.json() == {"items": expected(events, lo, hi, keys)}, keys
    # Something of each kind was counted.
    r = await report(api, start, end, ("model",))
    items = r.json()["items"]
    assert sum(i["debits"] for i in items) > 0
    assert any(i["model"] is None for i in items)


async def test_tag_groupings_as_csv(api: Api, database_url: str, clock: FakeClock) -> None:
    """A tag key's column is named `tag:<name>`; a tag value that would start a spreadsheet
    formula is neutralised like any text cell."""
    events = await make_events(api, database_url, count=30)
    events += await make_spends(api, clock)
    keys = ("tag:cost center", "tag:team")
    r = await report(
        api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", keys, headers={"Accept": "text/csv"}
    )
    assert r.status_code == 200, r.text
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == [*keys, *TOTALS]
    assert {row[0] for row in rows[1:]} == {"'=cc-1", ""}
    want = expected(
        events, datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC), keys
    )
    assert [int(row[len(keys) + TOTALS.index("credits")]) for row in rows[1:]] == [
        w["credits"] for w in want
    ]


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        ("tag:", "tag"),
        ("tag:a,tag:a", "twice"),
        ("tag:a,tag:b,tag:c,tag:d", "at most"),
        ("tags:a", "unknown"),
        ("tag:" + "x" * 65, "tag"),
        ("tag: x", "tag"),
    ],
)
async def test_bad_tag_keys(api: Api, group_by: str, message: str) -> None:
    r = await api.c.get(
        "/v1/reports/usage",
        params={"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "group_by": group_by},
    )
    body = problem(r, 400, "invalid_request")
    assert message in body["detail"], body


async def test_large_reports_stream_in_batches(
    api: Api, database_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usage report is read through a cursor STREAM_BATCH rows at a time and written as
    it is read, JSON and CSV alike: never the whole answer in memory. The streamed answer is
    exactly the report."""
    from service import reports
    from service.journal import Database

    events = await make_events(api, database_url, count=60)
    events += await make_spends(api, clock)
    monkeypatch.setattr(reports, "STREAM_BATCH", 4)
    sizes: list[int] = []

    def counting(original: Any) -> Any:
        async def counted(self: Database, *args: Any, **kw: Any) -> Any:
            async for rows in original(self, *args, **kw):
                sizes.append(len(rows))
                yield rows

        return counted

    # A report led by the employee is read in parts of one snapshot (its chunks of
    # employees, stream_parts_slow), each through a cursor like stream_slow's.
    for method in ("stream_slow", "stream_parts_slow"):
        monkeypatch.setattr(Database, method, counting(getattr(Database, method)))
    keys = ("employee", "day")
    lo, hi = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    want = expected(events, lo, hi, keys)
    assert len(want) > 20
    r = await report(api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", keys)
    assert r.status_code == 200, r.text
    assert "content-length" not in r.headers  # streamed, not one body
    assert r.json() == {"items": want}
    assert max(sizes) == 4 and sum(sizes) == len(want)
    sizes.clear()
    r = await report(
        api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", keys, headers={"Accept": "text/csv"}
    )
    rows = list(csv.reader(io.StringIO(r.text)))
    assert len(rows) == len(want) + 1 and max(sizes) == 4
    # An empty report is still well-formed.
    r = await report(api, "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", keys)
    assert r.json() == {"items": []}
