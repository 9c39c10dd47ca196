"""The efficiency report: tokens and credits per usage event, the share of
cached input and of premium models, by employee or department."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

from service.finance.queries import ALL_ROWS, fetch_report, stream_report
from service.journal import Database
from service.reports import at_month_start, uses_rollup

EFFICIENCY_GROUPS = ("employee", "department")
EFFICIENCY_COLUMNS = (
    "events",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "credits",
    "premium_credits",
    "cached_input_share",
    "premium_share",
    "credits_per_event",
    "tokens_per_event",
)


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


async def efficiency(
    ledger: Database, start: datetime, end: datetime, group_by: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    assert group_by in EFFICIENCY_GROUPS, group_by
    source = await _efficiency_source(ledger, start, end, group_by)
    rows = await fetch_report(
        ledger, "efficiency_report", start, end, group_by, source, cursor, limit + 1
    )
    more = len(rows) > limit
    return _efficiency_items(group_by, rows[:limit]), (rows[limit - 1]["key"] if more else None)


async def efficiency_stream(
    ledger: Database, start: datetime, end: datetime, group_by: str, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every group after `after`, for a CSV export: one query, streamed from a cursor."""
    assert group_by in EFFICIENCY_GROUPS, group_by
    source = await _efficiency_source(ledger, start, end, group_by)
    async for rows in stream_report(
        ledger, "efficiency_report", start, end, group_by, source, after, ALL_ROWS
    ):
        yield _efficiency_items(group_by, rows)


async def _efficiency_source(
    ledger: Database, start: datetime, end: datetime, group_by: str
) -> str:
    source = "daily" if uses_rollup(start, end) else "events"
    if at_month_start(start) and at_month_start(end):
        # The monthly roll-up has no day to find a department by: only when
        # no employee moved in the period (or no department is asked).
        if group_by == "employee" or not await ledger.fetchval("departments_moved", start, end):
            source = "monthly"
    return source


def _efficiency_items(group_by: str, rows: Iterable[Any]) -> list[dict[str, Any]]:
    items = []
    for r in rows:
        events, credits = int(r["events"]), int(r["credits"])
        tokens = int(r["input_tokens"]) + int(r["output_tokens"])
        items.append(
            {
                group_by: r["key"],
                "events": events,
                "input_tokens": int(r["input_tokens"]),
                "cached_input_tokens": int(r["cached_input_tokens"]),
                "output_tokens": int(r["output_tokens"]),
                "credits": credits,
                "premium_credits": int(r["premium_credits"]),
                "cached_input_share": _ratio(int(r["cached_input_tokens"]), int(r["input_tokens"])),
                "premium_share": _ratio(int(r["premium_credits"]), credits),
                "credits_per_event": _ratio(credits, events),
                "tokens_per_event": _ratio(tokens, events),
            }
        )
    return items
