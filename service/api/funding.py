"""Each department's funding against its spend (issue 15: the finance page).

The finance page shows, per department, what was funded in the chosen
period beside what was spent in it. The department's account balance
says neither (it is what is left of all funding ever, less what the
department handed on), so the page asks this one question: one query
(`funding_report` in service/sql/funding.sql), as JSON or CSV.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency

from service import reports
from service.api.common import CSV_UTF8, From, To, wants_csv
from service.auth import access
from service.journal import Database
from service.openapi import problems

COLUMNS = ("department", "funded", "spent")


class FundingItem(msgspec.Struct, frozen=True):
    """One department over the period. `funded`: credits transferred or granted
    into its account, less reversals of those. `spent`: credits that debits,
    usage and captures took from its account and its employees' wallets (each
    employee in the department of the end of the spend's UTC day), less
    reversals of those."""

    department: str
    funded: int
    spent: int


class FundingReport(msgspec.Struct, frozen=True):
    items: list[FundingItem]


def to_csv(items: list[FundingItem]) -> str:
    """A header row and one row per department, as the JSON items."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for item in items:
        writer.writerow([reports.csv_cell(getattr(item, c)) for c in COLUMNS])
    return out.getvalue()


class FundingController(Controller):
    path = "/v1"
    tags = ["Reports"]

    @get(
        "/reports/funding",
        summary="Each department's funding against its spend over a period",
        opt={**access("reports.read"), **problems()},
    )
    async def funding(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        from_: From,
        to: To,
    ) -> Response[FundingReport]:
        """Every department, in id order: credits funded into its account in
        `[from, to)` (transfers and grants to it, less their reversals) and credits
        spent in it (debits, usage and captures of its account and of its
        employees' wallets, less their reversals), by when the journal recorded
        them. With `Accept: text/csv` the answer is CSV: `department,funded,spent`
        and one row per department."""
        reports.check_period(from_, to)
        rows = await ledger.fetch_slow(
            "funding_report", ledger.config.report_statement_timeout_ms, from_, to, jit=False
        )
        items = [FundingItem(r["department"], int(r["funded"]), int(r["spent"])) for r in rows]
        if wants_csv(request):
            # The CSV form of the same report.
            return Response(to_csv(items), media_type=CSV_UTF8)  # type: ignore[arg-type]  # why: CSV text, not the JSON struct
        return Response(FundingReport(items=items))
