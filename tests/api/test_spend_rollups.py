"""Debits and captures in usage reports come from their roll-ups (spend_daily,
spend_monthly; schema.sql, tl_spend_rollup), and the roll-ups are exact: whatever source a
report reads, it equals a direct sum over the journal (debits, captures, a reversed debit,
a coalesced batch) and the usage events, with each spend in the department of its time
across a department move. The roll-ups are built by a statement trigger on entries, and
rebuilt from the journal by tl_spend_rollup_rebuild (the schema's one-time backfill)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from service import db as service_db
from service import migrate
from service.journal import Database
from service.reports import TOTALS, _usage_args, parse_group_by, spend_bounds, spend_source_for
from tests.api.conftest import Api, FakeClock, assert_audit_clean, key
from tests.api.test_coalescing import item, ledger_of
from tests.api.test_reports import GROUPINGS, Event, expected, report
from tests.api.test_usage import add_price, event, recorded

MODEL = "gpt-test"
MOVE_AT = datetime(2026, 1, 20, tzinfo=UTC)  # e-b moves from eng to ops, at a UTC midnight
PERIODS = [
    # (from, to, where the debits are read)
    ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", "whole months"),
    ("2026-01-02T00:00:00Z", "2026-02-20T00:00:00Z", "whole days"),
    ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "one month, nobody moved"),
    ("2026-01-10T12:00:00Z", "2026-02-20T12:00:00.5Z", "the journal at both ends"),
    ("2026-01-20T00:00:00Z", "2026-02-14T08:00:00Z", "the journal at the end"),
    ("2026-01-03T10:30:00+01:00", "2026-01-03T23:00:00Z", "the journal within a day"),
]

# The journal's own answer: every paying (negative) entry of a debit or capture, with its
# transaction's instant and metadata, and the wallet's department at that instant.
JOURNAL_SPEND = """
SELECT a.ref AS employee, t.created_at AS at, t.metadata ->> 'model' AS model,
       t.metadata ->> 'project' AS project, -e.amount AS credits,
       tl_department_at(a.ref, t.created_at) AS department
FROM transactions t
JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
JOIN accounts a ON a.id = e.account_id
WHERE t.kind IN ('debit', 'capture')
"""
JOURNAL_USAGE = """
SELECT a.ref AS employee, u.occurred_at AS at, u.model, u.project, u.cost AS credits,
       u.input_tokens, u.cached_input_tokens, u.output_tokens,
       tl_department_at(a.ref, u.occurred_at) AS department
FROM usage_events u JOIN accounts a ON a.id = u.account_id
"""
# The roll-ups as the journal gives them, and as they are.
JOURNAL_DAILY = """
SELECT (t.created_at AT TIME ZONE 'UTC')::date AS day, e.account_id,
       t.metadata ->> 'model' AS model,
       coalesce(t.metadata ->> 'project', '') AS project, count(*) AS debits,
       -sum(e.amount) AS credits
FROM transactions t JOIN entries e ON e.transaction_id = t.id AND e.amount < 0
WHERE t.kind IN ('debit', 'capture')
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3 NULLS FIRST, 4
"""
ROLLUP_DAILY = (
    "SELECT day, account_id, model, project, debits, credits FROM spend_daily "
    "ORDER BY 1, 2, 3 NULLS FIRST, 4"
)
ROLLUP_MONTHLY = (
    "SELECT month, account_id, model, project, debits, credits FROM spend_monthly "
    "ORDER BY 1, 2, 3 NULLS FIRST, 4"
)
MONTHLY_OF_DAILY = (
    """
SELECT date_trunc('month', day)::date AS month, account_id, model, project, sum(debits) AS debits,
       sum(credits) AS credits
FROM ("""
    + JOURNAL_DAILY.replace("ORDER BY 1, 2, 3 NULLS FIRST, 4", "")
    + """) d
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3 NULLS FIRST, 4
"""
)


async def debit(
    api: Api, clock: FakeClock, emp: str, when: datetime, amount: int, **meta: Any
) -> str:
    clock.set(when)
    extra = {"metadata": meta} if meta else {}
    r = await api.debit(f"employee:{emp}", amount, **extra)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def capture(
    api: Api, clock: FakeClock, emp: str, when: datetime, amount: int, **meta: Any
) -> None:
    """Reserved a minute earlier, captured by amount (less than held) at `when`."""
    clock.set(when - timedelta(minutes=1))
    r = await api.c.post(
        "/v1/reservations", json={"account": f"employee:{emp}", "amount": amount * 2}, headers=key()
    )
    assert r.status_code == 201, r.text
    clock.set(when)
    extra = {"metadata": meta} if meta else {}
    r = await api.c.post(
        f"/v1/reservations/{r.json()['id']}/capture",
        json={"amount": amount, **extra},
        headers=key(),
    )
    assert r.status_code == 200, r.text


async def usage(
    api: Api, clock: FakeClock, emp: str, when: datetime, event_id: str, **extra: Any
) -> None:
    clock.set(when)
    await recorded(
        api.c,
        event(event_id, account=f"employee:{emp}", occurred_at=when.isoformat(), **extra),
    )


async def build_history(api: Api, clock: FakeClock) -> None:
    """Debits (with and without a model and project), captures, usage events, a reversed
    debit, a coalesced batch of debits in one statement, around midnights and month ends,
    and a department move on the way."""
    clock.set(datetime(2025, 12, 20, tzinfo=UTC))
    await add_price(api.c, datetime(2025, 12, 1, tzinfo=UTC))
    for emp, dept in (("e-a", "eng"), ("e-b", "eng"), ("e-c", "ops")):
        await api.employee(emp, dept)
        await api.grant(emp, 1_000_000)
    await debit(
        api,
        clock,
        "e-a",
        datetime(2026, 1, 3, 10, tzinfo=UTC),
        700,
        model="gpt-4o",
        project="alpha",
    )
    await debit(
        api, clock, "e-a", datetime(2026, 1, 3, 11, tzinfo=UTC), 70, model="gpt-4o", project="alpha"
    )
    await debit(
        api, clock, "e-b", datetime(2026, 1, 19, 23, 59, 59, tzinfo=UTC), 19, model="gpt-4o"
    )
    await capture(api, clock, "e-b", datetime(2026, 1, 14, 8, tzinfo=UTC), 333, project="beta")
    await usage(api, clock, "e-b", datetime(2026, 1, 15, 9, tzinfo=UTC), "u-1", project="beta")
    clock.set(MOVE_AT)
    await api.employee("e-b", "ops")
    await debit(api, clock, "e-b", MOVE_AT, 20, model="gpt-4o")
    await usage(api, clock, "e-b", datetime(2026, 1, 25, 9, tzinfo=UTC), "u-2")
    await debit(api, clock, "e-a", datetime(2026, 1, 31, 23, 59, 59, 999999, tzinfo=UTC), 11)
    reversed_id = await debit(
        api, clock, "e-c", datetime(2026, 2, 1, tzinfo=UTC), 90, model="gpt-4o"
    )
    clock.set(datetime(2026, 2, 2, tzinfo=UTC))
    r = await api.c.post(f"/v1/transactions/{reversed_id}/reverse", json={}, headers=key())
    assert r.status_code == 201, r.text
    await capture(
        api,
        clock,
        "e-c",
        datetime(2026, 2, 14, 8, tzinfo=UTC),
        45,
        model="ledger-job",
        project="beta",
    )
    # A coalesced batch: tl_batch_fast posts the three debits' entries in one statement,
    # two of them under the same roll-up key.
    when = datetime(2026, 2, 20, 12, tzinfo=UTC)
    clock.set(when)
    items = [
        item(
            "debit",
            {"account": f"employee:{emp}", "amount": n, "metadata": {"model": "m", "project": "p"}},
            f"k-{emp}-{n}",
        )
        for emp, n in (("e-a", 5), ("e-b", 6), ("e-a", 7))
    ]
    for i in items:
        i.ctx["now"] = when.isoformat()
    results = await ledger_of(api.c)._execute_batch(items)
    assert [r["status"] for r in results] == [201, 201, 201]
    await debit(api, clock, "e-c", datetime(2026, 2, 28, 23, tzinfo=UTC), 5, note="no model")
    clock.set(datetime(2026, 3, 2, tzinfo=UTC))


async def journal_events(database_url: str) -> list[Event]:
    """The report's expected rows, straight from the journal and the usage events."""
    conn = await service_db.connect(database_url)
    try:
        spends = await conn.fetch(JOURNAL_SPEND)
        uses = await conn.fetch(JOURNAL_USAGE)
    finally:
        await conn.close()
    out = []
    for r, is_debit in [*((s, True) for s in spends), *((u, False) for u in uses)]:
        when: datetime = r["at"]
        keys = {
            "employee": r["employee"],
            "department": r["department"],
            "model": r["model"],
            "project": r["project"] or None,
            "day": when.astimezone(UTC).strftime("%Y-%m-%d"),
            "month": when.astimezone(UTC).strftime("%Y-%m"),
        }
        totals = dict.fromkeys(TOTALS, 0)
        totals["credits"] = r["credits"]
        if is_debit:
            totals["debits"], totals["debit_credits"] = 1, r["credits"]
        else:
            totals["events"] = 1
            for t in ("input_tokens", "cached_input_tokens", "output_tokens"):
                totals[t] = r[t]
        out.append(Event(keys, when, totals))
    return out


async def test_reports_equal_the_journal_whichever_source(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """Every grouping over whole months (spend_monthly), whole days (spend_daily) and any
    instant (the journal) equals the direct sum over the journal and the usage events:
    debits and captures by amount, a reversed debit (still counted: reports never subtracted
    reversals), a coalesced batch, and e-b's spend in eng before the move and in ops after."""
    await build_history(api, clock)
    events = await journal_events(database_url)
    assert sum(e.totals["debits"] for e in events) == 12
    b_departments = {e.keys["department"] for e in events if e.keys["employee"] == "e-b"}
    assert b_departments == {"eng", "ops"}
    for start, end, _source in PERIODS:
        lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for keys in GROUPINGS:
            r = await report(api, start, end, keys)
            assert r.status_code == 200, r.text
            assert r.json() == {"items": expected(events, lo, hi, keys)}, (start, keys)
    await assert_audit_clean(database_url)


async def test_rollups_equal_the_journal_and_their_rebuild(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """The trigger's rows are the journal's sums, row for row; tl_spend_rollup_rebuild (the
    backfill) gives the very same rows; applying the schema again changes nothing."""
    await build_history(api, clock)
    conn = await service_db.connect(database_url)
    try:
        daily = [tuple(r) for r in await conn.fetch(ROLLUP_DAILY)]
        monthly = [tuple(r) for r in await conn.fetch(ROLLUP_MONTHLY)]
        assert daily == [tuple(r) for r in await conn.fetch(JOURNAL_DAILY)]
        assert monthly == [tuple(r) for r in await conn.fetch(MONTHLY_OF_DAILY)]
        # Two debits of e-a on Jan 3 under one key; the batch's two e-a debits under one.
        assert any(r[4] == 2 and r[5] == 770 for r in daily)
        assert any(r[4] == 2 and r[5] == 12 for r in daily)
        builds = await conn.fetchval("SELECT count(*) FROM spend_rollup_builds")
        await migrate.migrate(conn, reapply=True)
        assert await conn.fetchval("SELECT count(*) FROM spend_rollup_builds") == builds
        assert [tuple(r) for r in await conn.fetch(ROLLUP_DAILY)] == daily
        await conn.execute("SELECT tl_spend_rollup_rebuild()")
        assert [tuple(r) for r in await conn.fetch(ROLLUP_DAILY)] == daily
        assert [tuple(r) for r in await conn.fetch(ROLLUP_MONTHLY)] == monthly
    finally:
        await conn.close()


async def test_schema_backfills_a_journal_written_without_the_trigger(
    api: Api, clock: FakeClock, database_url: str
) -> None:
    """A database whose debits predate the roll-ups (the trigger did not exist: here, off)
    gets them once from the schema's backfill, and reports then count them."""
    conn = await service_db.connect(database_url)
    try:
        await conn.execute("ALTER TABLE entries DISABLE TRIGGER entries_spend_rollup")
        try:
            await build_history(api, clock)
        finally:
            await conn.execute("ALTER TABLE entries ENABLE TRIGGER entries_spend_rollup")
        assert await conn.fetchval("SELECT count(*) FROM spend_daily") == 0
        await conn.execute("DELETE FROM spend_rollup_builds")  # as before this release
        await migrate.migrate(conn, reapply=True)
        assert [tuple(r) for r in await conn.fetch(ROLLUP_DAILY)] == [
            tuple(r) for r in await conn.fetch(JOURNAL_DAILY)
        ]
    finally:
        await conn.close()
    events = await journal_events(database_url)
    start, end, _ = PERIODS[0]
    r = await report(api, start, end, ("employee", "model"))
    assert r.json() == {
        "items": expected(
            events,
            datetime.fromisoformat(start),
            datetime.fromisoformat(end),
            ("employee", "model"),
        )
    }


@pytest.mark.parametrize(
    ("start", "end", "keys", "reads_journal"),
    [
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", "employee", False),
        ("2026-01-01T00:00:00Z", "2026-03-01T00:00:00Z", "model,day", False),
        ("2026-01-02T00:00:00Z", "2026-02-20T00:00:00Z", "department,project", False),
        ("2026-01-02T00:00:00Z", "2026-02-20T00:00:00Z", "tag:team", True),
        ("2026-01-02T12:00:00Z", "2026-02-20T00:00:00Z", "employee", True),
    ],
)
async def test_whole_days_do_not_read_the_journal(
    api: Api,
    clock: FakeClock,
    database_url: str,
    start: str,
    end: str,
    keys: str,
    reads_journal: bool,
) -> None:
    """A report over whole days reads the debits' roll-ups, not the transactions and entries
    (which cost seconds for a month at scale); a tag key or a period inside a day still
    reads the journal. Counted with the tables' own scan statistics."""
    await build_history(api, clock)
    conn = await service_db.connect(database_url)
    try:

        async def scans() -> int:
            await conn.execute("SELECT pg_stat_force_next_flush()")
            return int(
                await conn.fetchval(
                    "SELECT sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)) "
                    "FROM pg_stat_user_tables WHERE relname IN ('transactions', 'entries')"
                )
            )

        before = await scans()
        # The report's own query, on a connection of its own whose statistics are flushed
        # at its end.
        reader = await asyncpg.connect(database_url)
        try:
            ledger: Database = ledger_of(api.c)
            args = await _usage_args(
                ledger,
                datetime.fromisoformat(start),
                datetime.fromisoformat(end),
                parse_group_by(keys),
            )
            await reader.fetch(ledger.queries["usage_report"], *args)
            await reader.execute("SELECT pg_stat_force_next_flush()")
        finally:
            await reader.close()
        after = await scans()
    finally:
        await conn.close()
    assert (after > before) == reads_journal, (before, after)


@pytest.mark.parametrize(
    ("start", "end", "keys", "source", "bounds"),
    [
        ("2026-01-01T00:00Z", "2026-03-01T00:00Z", ("employee",), "monthly", None),
        ("2026-01-01T00:00Z", "2026-03-01T00:00Z", ("employee", "day"), "daily", None),
        ("2026-01-02T00:00Z", "2026-03-01T00:00Z", ("model",), "daily", None),
        ("2026-01-01T00:00Z", "2026-03-01T00:00Z", ("tag:team",), "journal", None),
        (
            "2026-01-01T00:00:00.000001Z",
            "2026-03-01T00:00Z",
            ("employee",),
            "monthly",
            ("2026-01-01T00:00Z", "2026-03-01T00:00Z"),
        ),
        (
            "2026-01-01T06:00+07:00",
            "2026-01-03T01:00+01:00",
            ("model",),
            "daily",
            ("2026-01-01T00:00Z", "2026-01-03T00:00Z"),
        ),
        ("2026-01-01T01:00Z", "2026-01-01T23:00Z", ("model",), "journal", None),
        ("2026-01-01T01:00Z", "2026-01-02T01:00Z", ("model",), "journal", None),
    ],
)
def test_spend_source_and_bounds(
    start: str, end: str, keys: tuple[str, ...], source: str, bounds: tuple[str, str] | None
) -> None:
    """Which source answers the debits, and for `edges` the whole days between the ends
    (UTC midnights, whatever the offsets)."""
    lo, hi = datetime.fromisoformat(start), datetime.fromisoformat(end)
    assert spend_source_for(lo, hi, keys) == source
    if bounds is not None:
        assert spend_bounds(lo, hi, source) == tuple(datetime.fromisoformat(b) for b in bounds)
