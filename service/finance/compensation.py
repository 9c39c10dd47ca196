"""The compensation report: the credits each employee was granted, by month
and reason, valued in money (Decimal, never float) for payroll."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from service.finance.queries import ALL_ROWS, fetch_report, stream_report
from service.journal import Database

COMPENSATION_COLUMNS = ("employee", "month", "reason", "credits", "currency", "value")


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


async def compensation(
    ledger: Database,
    start: datetime,
    end: datetime,
    employee: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of up to `limit` employees (all their months and reasons), and the next
    cursor. Money values are exact decimal strings."""
    value = CreditValue.parse(ledger.config.credit_value)
    rows = await fetch_report(
        ledger, "compensation_report", start, end, employee, value.amount, cursor, limit + 1
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
    ledger: Database, start: datetime, end: datetime, employee: str | None, after: str | None
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every row after the employee `after`, for a CSV export: the grants of the
    period read once, streamed from a cursor (paging re-read them for every page, so
    the export grew with the square of the employees)."""
    value = CreditValue.parse(ledger.config.credit_value)
    async for rows in stream_report(
        ledger, "compensation_report", start, end, employee, value.amount, after, ALL_ROWS
    ):
        yield _compensation_items(value, rows)
