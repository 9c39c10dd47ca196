"""Finance reports (API.md, Reports): liability, compensation, forecast and
efficiency, as JSON pages or streamed CSV (`Accept: text/csv`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Stream

from service import errors, finance, reports
from service.api.common import (
    ADDRESS_PATTERN,
    CSV_UTF8,
    REF_PATTERN,
    CursorParam,
    From,
    LimitParam,
    Page,
    To,
    page_of,
    text_cursor,
    wants_csv,
)
from service.auth import access
from service.journal import Database
from service.openapi import problems


class LiabilityItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """Credits of employee wallets over the period. `opening + granted + adjusted -
    spent - expired - voided = outstanding`, where `outstanding` is the sum of the
    wallets' balances at `to` (GET /v1/accounts/{a}/balance?at=to) and `opening` at
    `from`. `adjusted` nets transfers, reversals and rollovers; `expired` is breakage
    (credits that expired unspent); `overage` is spend charged beyond the balance
    (system:overage)."""

    opening: int
    granted: int
    spent: int
    expired: int
    voided: int
    adjusted: int
    overage: int
    outstanding: int
    department: str | None | msgspec.UnsetType = msgspec.UNSET
    employee: str | msgspec.UnsetType = msgspec.UNSET
    month: str | msgspec.UnsetType = msgspec.UNSET


class LiabilityReport(Page, frozen=True):
    items: list[LiabilityItem]


class CompensationItem(msgspec.Struct, frozen=True):
    """Credits granted to one employee in one UTC month for one reason (less reversals
    of such grants), and their money value: `credits` times TOKENLEDGER_CREDIT_VALUE,
    an exact decimal string."""

    employee: str
    month: str
    reason: str
    credits: int
    currency: str
    value: str


class CompensationReport(Page, frozen=True):
    items: list[CompensationItem]


class Expiring(msgspec.Struct, frozen=True):
    amount: int
    expires_at: str


class Forecast(msgspec.Struct, frozen=True):
    """`burn_rate_per_day` is the spend (usage, debits, captures) of the trailing 30
    days divided by 30; `depletes_at` when that rate uses up the spendable credits,
    taking them in consumption order and losing what expires first (null when nothing
    was spent); `expiring` the scheduled expiries of the spendable credits."""

    account: str
    available: int
    spent_30d: int
    burn_rate_per_day: float
    depletes_at: str | None
    expiring: list[Expiring]


class ForecastReport(Page, frozen=True):
    """One item for `account`; every open wallet of `department`, paginated."""

    items: list[Forecast]


class EfficiencyItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """Usage events of one employee or department: `cached_input_share` =
    cached_input_tokens / input_tokens; `premium_share` = credits at premium-tier models
    / credits; per-event averages. Ratios are null when their denominator is 0."""

    events: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    credits: int
    premium_credits: int
    cached_input_share: float | None
    premium_share: float | None
    credits_per_event: float | None
    tokens_per_event: float | None
    employee: str | msgspec.UnsetType = msgspec.UNSET
    department: str | msgspec.UnsetType = msgspec.UNSET


class EfficiencyReport(Page, frozen=True):
    items: list[EfficiencyItem]


Pager = Callable[[str | None, int], Awaitable[tuple[list[dict[str, Any]], str | None]]]


async def answer(
    request: Request[Any, Any, Any],
    pager: Pager,
    cursor: str | None,
    limit: int,
    columns: tuple[str, ...],
    stream: Callable[[str | None], AsyncIterator[list[dict[str, Any]]]] | None = None,
) -> Response[Any]:
    """JSON: one page. CSV: every row from `cursor` on, streamed: from one query read
    through a cursor (`stream`) where the report has one, else page by page."""
    after = text_cursor(cursor)
    as_csv = wants_csv(request)
    if as_csv and stream is not None:
        rows = stream(after)
        # Read before answering: a failing query still answers its problem.
        head: list[dict[str, Any]] = await anext(rows, [])

        async def streamed() -> AsyncIterator[list[dict[str, Any]]]:
            yield head
            async for items in rows:
                yield items

        return Stream(finance.stream_csv(columns, streamed()), media_type=CSV_UTF8)
    if as_csv:
        first = await pager(after, 500)

        async def pages() -> AsyncIterator[list[dict[str, Any]]]:
            items, nxt = first
            yield items
            while nxt is not None:
                items, nxt = await pager(nxt, 500)
                yield items

        return Stream(finance.stream_csv(columns, pages()), media_type=CSV_UTF8)
    items, nxt = await pager(after, limit)
    return Response(page_of(items, nxt))


class FinanceReportsController(Controller):
    path = "/v1"
    tags = ["Reports"]

    @get(
        "/reports/liability",
        summary="Liability: credits owed to employees",
        opt={**access("reports.read"), **problems()},
    )
    async def liability(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        from_: From,
        to: To,
        group_by: Annotated[
            Literal["department", "employee", "month"],
            QueryParameter(description="One row per department, employee, or UTC month."),
        ],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> Response[LiabilityReport]:
        """Per group over [from, to): credits granted, spent, expired (breakage), voided,
        adjusted (transfers, reversals, rollovers), overage, and the balances at `from`
        (`opening`) and `to` (`outstanding`, the company's liability: it equals the sum of
        the wallets' balances at `to`). By `department`, a wallet counts in the department
        its employee belongs to at `to` (its balance is the department's liability then);
        by `month`, each UTC month (cut to the period) has its own opening and
        outstanding. Pages by employee (`cursor`, `limit`); department and month rows are
        one page. `Accept: text/csv` streams every row as CSV."""
        reports.check_period(from_, to)
        columns = (group_by, *finance.LIABILITY_TOTALS)

        async def pager(after: str | None, size: int) -> tuple[list[dict[str, Any]], str | None]:
            return await finance.liability(ledger, from_, to, group_by, after, size)

        stream = None
        if group_by == "employee":

            def stream(after: str | None) -> AsyncIterator[list[dict[str, Any]]]:
                return finance.liability_by_employee_stream(ledger, from_, to, after)

        return await answer(request, pager, cursor, limit, columns, stream)

    @get(
        "/reports/compensation",
        summary="Compensation: credits granted as a perk, in money",
        opt={**access("reports.read"), **problems()},
    )
    async def compensation(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        from_: From,
        to: To,
        employee: Annotated[
            str | None, QueryParameter(pattern=REF_PATTERN, description="Only this employee.")
        ] = None,
        limit: Annotated[
            int, QueryParameter(ge=1, le=500, description="Employees per page, 1..500.")
        ] = 50,
        cursor: CursorParam = None,
    ) -> Response[CompensationReport]:
        """Per employee, UTC month and reason: the credits granted in [from, to) (less
        reversals of grants in the period) and their value at TOKENLEDGER_CREDIT_VALUE, a
        currency and an exact decimal. `Accept: text/csv` streams
        `employee,month,reason,credits,currency,value` for a payroll import."""
        reports.check_period(from_, to)

        async def pager(after: str | None, size: int) -> tuple[list[dict[str, Any]], str | None]:
            return await finance.compensation(ledger, from_, to, employee, after, size)

        def stream(after: str | None) -> AsyncIterator[list[dict[str, Any]]]:
            return finance.compensation_stream(ledger, from_, to, employee, after)

        return await answer(request, pager, cursor, limit, finance.COMPENSATION_COLUMNS, stream)

    @get(
        "/reports/forecast",
        summary="Forecast: when a wallet runs out",
        opt={**access("forecast.read", own="account"), **problems()},
    )
    async def forecast(
        self,
        ledger: NamedDependency[Database],
        account: Annotated[
            str | None,
            QueryParameter(
                pattern=ADDRESS_PATTERN, description="One account (`employee:` or `department:`)."
            ),
        ] = None,
        department: Annotated[
            str | None,
            QueryParameter(
                pattern=REF_PATTERN, description="Every open wallet of this department."
            ),
        ] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> ForecastReport:
        """Exactly one of `account` and `department`. Burn rate from the trailing 30 days
        of spend; the depletion date from today's spendable credits and their scheduled
        expiries (null when nothing was spent). An unknown account gives no items."""
        if (account is None) == (department is None):
            raise errors.invalid("account", "give exactly one of account and department")
        items, nxt = await finance.forecast(ledger, account, department, text_cursor(cursor), limit)
        return msgspec.convert(page_of(items, nxt), ForecastReport)

    @get(
        "/reports/efficiency",
        summary="Efficiency: cached input, premium models, per-event spend",
        opt={**access("reports.read"), **problems()},
    )
    async def efficiency(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        from_: From,
        to: To,
        group_by: Annotated[
            Literal["employee", "department"],
            QueryParameter(description="One row per employee or per department."),
        ],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> Response[EfficiencyReport]:
        """Usage events in [from, to) per employee or department: the cached share of
        input tokens, the premium-tier share of credits (tier of the model's latest price),
        and credits and tokens per event. An employee's usage counts in the department
        they belonged to that day. From the daily roll-up when `from` and `to` are UTC
        midnights. `Accept: text/csv` streams every row."""
        reports.check_period(from_, to)

        async def pager(after: str | None, size: int) -> tuple[list[dict[str, Any]], str | None]:
            return await finance.efficiency(ledger, from_, to, group_by, after, size)

        def stream(after: str | None) -> AsyncIterator[list[dict[str, Any]]]:
            return finance.efficiency_stream(ledger, from_, to, group_by, after)

        return await answer(
            request, pager, cursor, limit, (group_by, *finance.EFFICIENCY_COLUMNS), stream
        )
