"""The liability report: what the wallets held, received, spent and lost in
a period, by employee, department or month, with the overage spent beyond
what was held."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

from service.finance.queries import fetch_report, stream_report
from service.journal import Database

LIABILITY_GROUPS = ("department", "employee", "month")
LIABILITY_TOTALS = (
    "opening",
    "granted",
    "spent",
    "expired",
    "voided",
    "adjusted",
    "overage",
    "outstanding",
)


def _fold(
    rows: Iterable[Any], key_of: Any, overage: dict[tuple[int, Any], int]
) -> dict[Any, dict[str, Any]]:
    groups: dict[Any, dict[str, Any]] = {}
    for r in rows:
        key = key_of(r)
        g = groups.setdefault(key, dict.fromkeys(LIABILITY_TOTALS, 0))
        for name in ("opening", "granted", "spent", "expired", "voided", "adjusted", "outstanding"):
            g[name] += int(r[name])
        g["overage"] += overage.get((r["account_id"], r["starts"]), 0)
    return groups


async def _overage(
    ledger: Database, start: datetime, end: datetime, monthly: bool
) -> dict[tuple[int, Any], int]:
    rows = await fetch_report(ledger, "liability_overage", start, end, monthly)
    return {(r["account_id"], r["starts"]): int(r["overage"]) for r in rows}


async def liability(
    ledger: Database,
    start: datetime,
    end: datetime,
    group_by: str,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """The report's items and the next cursor (by employee only: the other groupings
    have one row per department or month)."""
    assert group_by in LIABILITY_GROUPS, group_by
    monthly = group_by == "month"
    overage = await _overage(ledger, start, end, monthly)
    if group_by == "employee":
        page = [r["ref"] for r in await ledger.fetch("liability_wallet_page", cursor, limit + 1)]
        more = len(page) > limit
        page = page[:limit]
        rows = (
            await fetch_report(ledger, "liability_report", start, end, False, False, page)
            if page
            else []
        )
        groups = _fold(rows, lambda r: r["employee"], overage)
        items = [{"employee": emp, **groups[emp]} for emp in page if emp in groups]
        return items, (page[-1] if more and page else None)
    # Every wallet in one call: the flows of the period are read once, and the
    # rows (one per wallet and period, bounded by the number of employees) are
    # folded into the few department or month groups here.
    rows = await fetch_report(
        ledger, "liability_report", start, end, monthly, group_by == "department", None
    )
    key_of = (
        (lambda r: r["department"])
        if group_by == "department"
        else (lambda r: r["starts"].astimezone(UTC).strftime("%Y-%m"))
    )
    totals = _fold(rows, key_of, overage)
    items = [
        {group_by: key, **totals[key]} for key in sorted(totals, key=lambda k: (k is None, k or ""))
    ]
    return items, None


async def liability_by_employee_stream(
    ledger: Database, start: datetime, end: datetime, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Liability by employee for every wallet after `after`, for a CSV export: one
    query over all the wallets (the period's flows read once), streamed from a cursor.
    Paging it as JSON pages do re-read the period for every 500 wallets."""
    overage = await _overage(ledger, start, end, False)
    async for rows in stream_report(ledger, "liability_report", start, end, False, False, None):
        groups = _fold(rows, lambda r: r["employee"], overage)
        yield [
            {"employee": emp, **totals}
            for emp, totals in groups.items()
            if after is None or emp > after
        ]
