"""Usage reports: GET /v1/reports/usage totals, groupings, CSV, validation and roles."""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from service import db as service_db
from service.reports import GROUP_KEYS, TOTALS
from tests.api.conftest import Api, problem
from tests.api.test_auth import service_key

# Every non-empty subset of the grouping keys: 63 of them.
GROUPINGS = [
    combo for n in range(1, len(GROUP_KEYS) + 1) for combo in itertools.combinations(GROUP_KEYS, n)
]
# (address, employee key, department key) of every account that uses models.
ACCOUNTS = [
    ("employee:e-a", "e-a", "eng"),
    ("employee:e-b", "e-b", "eng"),
    ("employee:e-c", "e-c", "ops"),
    ("employee:e-d", "e-d", "ops"),
    ("department:ops", None, "ops"),
]
MODELS = ("gpt-4o", "claude-x", "gpt-4o-mini")
PROJECTS = ("alpha", "beta", None)
RATES = (2_500_000, 1_250_000, 10_000_000)  # input, cached input, output per Mtok
START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 3, 1, tzinfo=UTC)
REPORT = "/v1/reports/usage"
# Usage events' tags, by event number: grouping by tag:team sees red, blue and null.
TAGS: tuple[dict[str, str], ...] = (
    {"team": "red", "cost center": "=cc-1"},
    {"team": "blue"},
    {},
)


@dataclass(frozen=True)
class Event:
    keys: dict[str, str | None]
    occurred_at: datetime
    totals: dict[str, int]


async def make_events(api: Api, database_url: str, count: int = 120) -> list[Event]:
    """Usage events inserted by SQL (each rolled up as the service does) across
    employees of two departments, a department account, models, projects, days and
    months, some near midnight."""
    for emp, dept in (("e-a", "eng"), ("e-b", "eng"), ("e-c", "ops"), ("e-d", "ops")):
        await api.employee(emp, dept)
    rng = random.Random(20260101)  # noqa: S311  # why: reproducible test data, not secrets
    events: list[Event] = []
    conn = await service_db.connect(database_url)
    try:
        prices = {}
        for model in MODELS:
            prices[model] = uuid.uuid4()
            await conn.execute(
                "INSERT INTO prices (id, model, effective_from, input_per_mtok,"
                " cached_input_per_mtok, output_per_mtok, source)"
                " VALUES ($1, $2, '2025-01-01T00:00:00Z', $3, $4, $5, 'test')",
                prices[model],
                model,
                *RATES,
            )
        for n in range(count):
            address, emp, dept = rng.choice(ACCOUNTS)
            model = rng.choice(MODELS)
            project = rng.choice(PROJECTS)
            seconds = rng.randrange(int((END - START).total_seconds()))
            if n % 5 == 0:  # right on or next to a midnight
                seconds = seconds // 86400 * 86400 + rng.choice((0, 1, 86399))
            when = START + timedelta(seconds=seconds)
            inp = rng.randrange(0, 50_000)
            cached = rng.randrange(0, inp + 1)
            out = rng.randrange(0, 5_000)
            cost = math.ceil(((inp - cached) * RATES[0] + cached * RATES[1] + out * RATES[2]) / 1e6)
            event_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id,"
                " input_tokens, cached_input_tokens, output_tokens, cost, project,"
                " occurred_at, recorded_at, tags)"
                " VALUES ($1, 'test', $2, (SELECT id FROM accounts WHERE address = $3), $4, $5,"
                " $6, $7, $8, $9, $10, $11, $11, $12)",
                event_id,
                f"evt-{n}",
                address,
                model,
                prices[model],
                inp,
                cached,
                out,
                cost,
                project,
                when,
                TAGS[n % len(TAGS)],
            )
            await conn.execute(
                "SELECT tl_usage_rollup(u) FROM usage_events u WHERE id = $1", event_id
            )
            keys = {
                "employee": emp,
                "department": dept,
                "model": model,
                "project": project,
                "day": when.strftime("%Y-%m-%d"),
                "month": when.strftime("%Y-%m"),
                "tag:team": TAGS[n % len(TAGS)].get("team"),
                "tag:cost center": TAGS[n % len(TAGS)].get("cost center"),
            }
            totals = {
                **dict.fromkeys(TOTALS, 0),
                "events": 1,
                "input_tokens": inp,
                "cached_input_tokens": cached,
                "output_tokens": out,
                "credits": cost,
                "overage": 0,
                "violations": 0,
            }
            events.append(Event(keys, when, totals))
    finally:
        await conn.close()
    return events


def expected(
    events: list[Event], start: datetime, end: datetime, keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The report computed in Python: sums per group, ordered by the keys, null last."""
    groups: dict[tuple[str | None, ...], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(TOTALS, 0)
    )
    for e in events:
        if start <= e.occurred_at < end:
            sums = groups[tuple(e.keys[k] for k in keys)]
            for t in TOTALS:
                sums[t] += e.totals[t]
    ordered = sorted(groups.items(), key=lambda kv: [(v is None, v or "") for v in kv[0]])
    return [{**dict(zip(keys, group, strict=True)), **sums} for group, sums in ordered]


async def report(api: Api, start: str, end: str, keys: tuple[str, ...], **kw: Any) -> Any:
    return await api.c.get(
        REPORT, params={"from": start, "to": end, "group_by": ",".join(keys)}, **kw
    )


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", id="whole-month-rollups"),
        pytest.param("2026-01-02T00:00:00Z", "2026-02-15T00:00:00Z", id="midnights-rollup"),
        pytest.param("2026-01-15T01:00:00+01:00", "2026-02-10T00:00:00Z", id="offset-midnights"),
        pytest.param("2026-01-10T12:00:00Z", "2026-02-10T06:30:00.5Z", id="raw-events"),
        pytest.param("2026-01-31T23:59:59+02:00", "2026-02-01T00:00:01Z", id="raw-short"),
    ],
)
async def test_every_grouping_sums_the_events(
    api: Api, database_url: str, start: str, end: str
) -> None:
    """Every one of the 63 groupings answers exactly the sums of the events in the period,
    whichever roll-up (monthly, per-day without account, daily) or the events it reads."""
    events = await make_events(api, database_url)
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    assert any(not lo <= e.occurred_at < hi for e in events)  # the period really filters
    for keys in GROUPINGS:
        r = await report(api, start, end, keys)
        assert r.status_code == 200, r.text
        assert r.json() == {"items": expected(events, lo, hi, keys)}, keys


async def test_key_order_follows_group_by(api: Api, database_url: str) -> None:
    """Items carry the keys in group_by's order and are sorted by them in that order."""
    events = await make_events(api, database_url, count=40)
    keys = ("month", "project", "employee")
    r = await report(api, "2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", keys)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert items == expected(events, START, END, keys)
    assert list(items[0]) == [*keys, *TOTALS]
    assert {i["employee"] for i in items} >= {None, "e-a"}
    assert {i["project"] for i in items} == {"alpha", "beta", None}


async def test_csv_parses_back_to_the_same_numbers(api: Api, database_url: str) -> None:
    """With Accept: text/csv every grouping answers a header row and the same rows as JSON."""
    events = await make_events(api, database_url, count=60)
    for start, end in (
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-01-03T08:00:00Z", "2026-02-20T17:00:00Z"),
    ):
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in GROUPINGS:
            r = await report(api, start, end, keys, headers={"Accept": "text/csv"})
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/csv")
            rows = list(csv.reader(io.StringIO(r.text)))
            assert rows[0] == [*keys, *TOTALS]
            want = expected(events, lo, hi, keys)
            got = [
                {
                    **{k: v or None for k, v in zip(keys, row, strict=False)},
                    **{t: int(v) for t, v in zip(TOTALS, row[len(keys) :], strict=True)},
                }
                for row in rows[1:]
            ]
            assert got == want, keys


async def test_midnights_read_the_rollup_and_other_instants_the_events(
    api: Api, database_url: str
) -> None:
    """A period between UTC midnights is read from usage_daily, any other from usage_events."""
    await make_events(api, database_url, count=10)
    conn = await service_db.connect(database_url)
    try:
        # An event that was never rolled up: only the raw path sees it.
        await conn.execute(
            "INSERT INTO usage_events (id, source, event_id, account_id, model, price_id,"
            " input_tokens, cached_input_tokens, output_tokens, cost, occurred_at, recorded_at)"
            " SELECT gen_random_uuid(), 'test', 'not-rolled-up', a.id, 'zz-model', p.id,"
            " 1, 0, 1, 7, '2026-01-05T10:00:00Z', '2026-01-05T10:00:00Z'"
            " FROM accounts a, prices p WHERE a.address = 'employee:e-a' LIMIT 1"
        )
    finally:
        await conn.close()
    models = {}
    for start in ("2026-01-05T00:00:00Z", "2026-01-04T23:59:59.999999Z"):
        r = await report(api, start, "2026-01-06T00:00:00Z", ("model",))
        assert r.status_code == 200, r.text
        models[start] = {i["model"] for i in r.json()["items"]}
    assert "zz-model" not in models["2026-01-05T00:00:00Z"]
    assert "zz-model" in models["2026-01-04T23:59:59.999999Z"]


async def test_an_empty_period_has_no_items(api: Api) -> None:
    """A period without usage answers no items, and a CSV of only the header."""
    r = await report(api, "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", ("employee", "day"))
    assert r.status_code == 200 and r.json() == {"items": []}
    r = await report(
        api,
        "2026-01-01T00:00:00Z",
        "2026-01-02T00:00:00Z",
        ("day",),
        headers={"Accept": "text/csv"},
    )
    assert r.text == (
        "day,events,input_tokens,cached_input_tokens,output_tokens,credits,overage,violations,"
        "debits,debit_credits\r\n"
    )


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"from": None}, id="no-from"),
        pytest.param({"to": None}, id="no-to"),
        pytest.param({"group_by": None}, id="no-group"),
        pytest.param({"group_by": ""}, id="empty-group"),
        pytest.param({"group_by": "day,"}, id="trailing-comma"),
        pytest.param({"group_by": "week"}, id="unknown-key"),
        pytest.param({"group_by": "model;drop table x"}, id="injection"),
        pytest.param({"group_by": "day,model,day"}, id="repeated-key"),
        pytest.param({"from": "2026-01-01T00:00:00"}, id="from-without-offset"),
        pytest.param({"to": "2026-01-02T00:00:00"}, id="to-without-offset"),
        pytest.param({"from": "yesterday"}, id="bad-from"),
        pytest.param({"to": "2026-01-01T00:00:00Z"}, id="empty-period"),
        pytest.param({"to": "2025-12-01T00:00:00Z"}, id="to-before-from"),
        pytest.param({"to": "2027-02-05T00:00:01Z"}, id="over-400-days"),
    ],
)
async def test_invalid_requests(api: Api, params: dict[str, str | None]) -> None:
    """A missing or malformed from, to or group_by, or a bad period, answers 400."""
    query: dict[str, str | None] = {
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-02T00:00:00Z",
        "group_by": "day",
    }
    query.update(params)
    r = await api.c.get(REPORT, params={k: v for k, v in query.items() if v is not None})
    problem(r, 400, "invalid_request")


async def test_exactly_400_days_is_allowed(api: Api) -> None:
    """A period of exactly 400 days is the longest one allowed."""
    r = await report(api, "2026-01-01T00:00:00Z", "2027-02-05T00:00:00Z", ("month",))
    assert r.status_code == 200, r.text


async def test_roles(api: Api, database_url: str) -> None:
    """Finance and hr may read reports; meter may not."""
    for role, status in (("finance", 200), ("hr", 200), ("meter", 403)):
        secret = await service_key(database_url, role)
        r = await report(
            api,
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            ("department",),
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert r.status_code == status, (role, r.text)


async def test_reports_have_their_own_statement_timeout(
    api: Api, client: Any, database_url: str
) -> None:
    """A report runs under TOKENLEDGER_REPORT_STATEMENT_TIMEOUT_MS (here 1 ms: the
    query does not even finish planning, so 503), set for its own transaction
    only: the pool's connections keep the usual statement timeout."""
    await make_events(api, database_url, count=200)
    ledger = client.app.state.ledger
    normal = ledger.config
    ledger.config = msgspec.structs.replace(normal, report_statement_timeout_ms=1)
    r = await report(api, "2026-01-10T12:00:00Z", "2026-02-10T06:30:00.5Z", ("employee", "model"))
    problem(r, 503, "unavailable")
    ledger.config = normal
    r = await report(api, "2026-01-10T12:00:00Z", "2026-02-10T06:30:00.5Z", ("employee", "model"))
    assert r.status_code == 200, r.text
    async with ledger.pool.acquire() as conn:
        setting = await conn.fetchval(
            "SELECT setting FROM pg_settings WHERE name = 'statement_timeout'"
        )
        assert int(setting) == normal.statement_timeout_ms


async def test_report_timeout_outlasts_the_pool_command_timeout(
    config: Any, clock: Any, admin_key: str
) -> None:
    """A report allowed longer than the usual statement timeout (and so longer
    than the pool's client-side command timeout, twice that) runs to its end
    instead of being cut off as unavailable."""
    import msgspec

    from service.app import create_app
    from tests.api.conftest import running

    slow = msgspec.structs.replace(
        config,
        statement_timeout_ms=400,
        report_statement_timeout_ms=5_000,
        chain_settle_seconds=1.0,
    )
    app = create_app(slow, clock=clock)
    async with running(app):
        ledger = app.state.ledger
        # A report query that takes 1.5 s: past the pool's 1 s command timeout,
        # well within the report's 5 s.
        ledger.queries["usage_report"] = (
            "SELECT 1 FROM (SELECT $1::timestamptz, $2::timestamptz, $3::text[], $4::text,"
            " $5::boolean, $6::text[], $7::text, $8::timestamptz, $9::timestamptz) AS a"
            " WHERE (SELECT count(*) FROM pg_sleep(1.5)) = 0"
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t.local") as c:
            r = await c.get(
                "/v1/reports/usage",
                params={
                    "from": "2026-01-01T00:00:00Z",
                    "to": "2026-02-01T00:00:00Z",
                    "group_by": "employee",
                },
                headers={"Authorization": f"Bearer {admin_key}"},
            )
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []
