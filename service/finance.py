"""Finance reports (README, Reports): liability, compensation, forecast and
efficiency. The SQL is in service/sql/finance.sql; this module picks the
periods and pages, folds wallet rows into groups, values credits in money
(Decimal, never float) and runs the depletion forecast.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from service.journal import Ledger
from service.reports import csv_cell

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
EFFICIENCY_GROUPS = ("employee", "department")
FORECAST_WINDOW_DAYS = 30
# CSV exports read one query through a cursor, this many rows at a time; the
# page size that stands for "no limit" in the queries that take one.
STREAM_BATCH = 2000
ALL_ROWS = 2**31 - 1


@dataclass(frozen=True)
class CreditValue:
    """The money value of one credit (TOKENLEDGER_CREDIT_VALUE, "USD 0.000001")."""

    currency: str
    amount: Decimal

    @classmethod
    def parse(cls, text: str) -> CreditValue:
        currency, _, amount = text.partition(" ")
        return cls(currency, Decimal(amount))

    def of(self, credits: int) -> Decimal:
        return self.amount * credits


# --- liability -------------------------------------------------------------------


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
    ledger: Ledger, start: datetime, end: datetime, monthly: bool
) -> dict[tuple[int, Any], int]:
    rows = await ledger.fetch_slow(
        "liability_overage",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        monthly,
        jit=False,
    )
    return {(r["account_id"], r["starts"]): int(r["overage"]) for r in rows}


async def liability(
    ledger: Ledger,
    start: datetime,
    end: datetime,
    group_by: str,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """The report's items and the next cursor (by employee only: the other groupings
    have one row per department or month)."""
    assert group_by in LIABILITY_GROUPS, group_by
    timeout = ledger.config.report_statement_timeout_ms
    monthly = group_by == "month"
    overage = await _overage(ledger, start, end, monthly)
    if group_by == "employee":
        page = [r["ref"] for r in await ledger.fetch("liability_wallet_page", cursor, limit + 1)]
        more = len(page) > limit
        page = page[:limit]
        rows = (
            await ledger.fetch_slow(
                "liability_report", timeout, start, end, False, False, page, jit=False
            )
            if page
            else []
        )
        groups = _fold(rows, lambda r: r["employee"], overage)
        items = [{"employee": emp, **groups[emp]} for emp in page if emp in groups]
        return items, (page[-1] if more and page else None)
    # Every wallet in one call: the flows of the period are read once, and the
    # rows (one per wallet and period, bounded by the number of employees) are
    # folded into the few department or month groups here.
    rows = await ledger.fetch_slow(
        "liability_report",
        timeout,
        start,
        end,
        monthly,
        group_by == "department",
        None,
        jit=False,
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
    ledger: Ledger, start: datetime, end: datetime, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Liability by employee for every wallet after `after`, for a CSV export: one
    query over all the wallets (the period's flows read once), streamed from a cursor.
    Paging it as JSON pages do re-read the period for every 500 wallets."""
    overage = await _overage(ledger, start, end, False)
    async for rows in ledger.stream_slow(
        "liability_report",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        False,
        False,
        None,
        batch=STREAM_BATCH,
        jit=False,
    ):
        groups = _fold(rows, lambda r: r["employee"], overage)
        yield [
            {"employee": emp, **totals}
            for emp, totals in groups.items()
            if after is None or emp > after
        ]


# --- compensation ----------------------------------------------------------------

COMPENSATION_COLUMNS = ("employee", "month", "reason", "credits", "currency", "value")


async def compensation(
    ledger: Ledger,
    start: datetime,
    end: datetime,
    employee: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of up to `limit` employees (all their months and reasons), and the next
    cursor. Money values are exact decimal strings."""
    value = CreditValue.parse(ledger.config.credit_value)
    rows = await ledger.fetch_slow(
        "compensation_report",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        employee,
        value.amount,
        cursor,
        limit + 1,
        jit=False,
    )
    employees: list[str] = []
    for r in rows:
        if not employees or employees[-1] != r["employee"]:
            employees.append(r["employee"])
    more = len(employees) > limit
    keep = set(employees[:limit])
    items = _compensation_items(value, (r for r in rows if r["employee"] in keep))
    return items, (employees[limit - 1] if more else None)


def _compensation_items(value: CreditValue, rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [
        {
            "employee": r["employee"],
            "month": r["month"],
            "reason": r["reason"],
            "credits": int(r["credits"]),
            "currency": value.currency,
            "value": str(Decimal(r["value"]).normalize()) if Decimal(r["value"]) != 0 else "0",
        }
        for r in rows
    ]


async def compensation_stream(
    ledger: Ledger, start: datetime, end: datetime, employee: str | None, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every row after the employee `after`, for a CSV export: the grants of the
    period read once, streamed from a cursor (paging re-read them for every page, so
    the export grew with the square of the employees)."""
    value = CreditValue.parse(ledger.config.credit_value)
    async for rows in ledger.stream_slow(
        "compensation_report",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        employee,
        value.amount,
        after,
        ALL_ROWS,
        batch=STREAM_BATCH,
        jit=False,
    ):
        yield _compensation_items(value, rows)


# --- forecast --------------------------------------------------------------------


def depletion(
    now: datetime, burn_per_day: Decimal, lots: Sequence[tuple[int, datetime | None]]
) -> datetime | None:
    """When spending `burn_per_day` uses up the lots (free amount, expiry), taken in
    consumption order: a lot is spent from the moment the earlier ones are used up
    until it is used up too or expires (what is left of it then is lost). None when
    nothing is spent."""
    if burn_per_day <= 0:
        return None
    at = now
    for amount, expires_at in lots:
        if expires_at is not None and expires_at <= at:
            continue  # expired before spending reached it
        days = Decimal(amount) / burn_per_day
        finish = at + timedelta(seconds=float(days * 86400))
        at = min(finish, expires_at) if expires_at is not None else finish
    return at


def forecast_item(
    now: datetime, address: str, spent_30d: int, lots: list[dict[str, Any]]
) -> dict[str, Any]:
    burn = Decimal(spent_30d) / FORECAST_WINDOW_DAYS
    parsed = [
        (
            int(lot["amount"]),
            datetime.fromisoformat(lot["expires_at"]) if lot["expires_at"] else None,
        )
        for lot in lots
    ]
    expiring: dict[datetime, int] = {}
    for amount, expires_at in parsed:
        if expires_at is not None:
            expiring[expires_at] = expiring.get(expires_at, 0) + amount
    depletes = depletion(now, burn, parsed)
    return {
        "account": address,
        "available": sum(a for a, _ in parsed),
        "spent_30d": spent_30d,
        "burn_rate_per_day": float(burn.quantize(Decimal("0.01"))),
        "depletes_at": _ts(depletes) if depletes is not None else None,
        "expiring": [{"amount": a, "expires_at": _ts(t)} for t, a in sorted(expiring.items())],
    }


async def forecast(
    ledger: Ledger, account: str | None, department: str | None, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    now = ledger.now() or datetime.now(UTC)
    accounts = await ledger.fetch("forecast_accounts", account, department, cursor, limit + 1)
    more = len(accounts) > limit
    accounts = accounts[:limit]
    if not accounts:
        return [], None
    ids = [a["id"] for a in accounts]
    if account is not None:
        # One wallet (the wallet page asks this on its first render): one
        # account's 30 days fit the pool's statement timeout, and one round
        # trip instead of fetch_slow's five (its own transaction and
        # settings) keeps the answer from queueing behind other requests
        # between each of them.
        inputs = await ledger.fetch("forecast_inputs", ids, now)
    else:
        inputs = await ledger.fetch_slow(
            "forecast_inputs", ledger.config.report_statement_timeout_ms, ids, now, jit=False
        )
    by_id = {r["id"]: r for r in inputs}
    items = [
        forecast_item(now, a["address"], int(by_id[a["id"]]["spent_30d"]), by_id[a["id"]]["lots"])
        for a in accounts
    ]
    return items, (accounts[-1]["address"] if more else None)


# --- efficiency ------------------------------------------------------------------

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
    ledger: Ledger, start: datetime, end: datetime, group_by: str, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    assert group_by in EFFICIENCY_GROUPS, group_by
    rows = await ledger.fetch_slow(
        "efficiency_report",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        group_by,
        await _efficiency_source(ledger, start, end, group_by),
        cursor,
        limit + 1,
        jit=False,
    )
    more = len(rows) > limit
    return _efficiency_items(group_by, rows[:limit]), (rows[limit - 1]["key"] if more else None)


async def efficiency_stream(
    ledger: Ledger, start: datetime, end: datetime, group_by: str, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every group after `after`, for a CSV export: one query, streamed from a cursor."""
    assert group_by in EFFICIENCY_GROUPS, group_by
    async for rows in ledger.stream_slow(
        "efficiency_report",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        group_by,
        await _efficiency_source(ledger, start, end, group_by),
        after,
        ALL_ROWS,
        batch=STREAM_BATCH,
        jit=False,
    ):
        yield _efficiency_items(group_by, rows)


async def _efficiency_source(ledger: Ledger, start: datetime, end: datetime, group_by: str) -> str:
    from service.reports import at_month_start, uses_rollup

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


# --- CSV -------------------------------------------------------------------------


def csv_rows(columns: Sequence[str], items: Iterable[dict[str, Any]], header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(columns)
    for item in items:
        writer.writerow([csv_cell(_cell(c, item.get(c))) for c in columns])
    return out.getvalue()


def _cell(column: str, value: Any) -> Any:
    """Money travels as a decimal string in JSON; in CSV it is a number (a spreadsheet
    must read "-5.0625" as minus five, not neutralise it as a formula)."""
    if column == "value" and isinstance(value, str):
        return Decimal(value)
    return value


async def stream_csv(
    columns: Sequence[str], pages: AsyncIterator[list[dict[str, Any]]]
) -> AsyncIterator[bytes]:
    """A CSV answer written page by page: never the whole report in memory."""
    yield csv_rows(columns, (), header=True).encode()
    async for items in pages:
        yield csv_rows(columns, items, header=False).encode()


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
