"""Usage reports (API.md, Metering and prices): usage totals over a period,
grouped, as JSON or CSV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Stream

from service import reports
from service.api.common import (
    CSV_UTF8,
    JSON,
    CursorParam,
    From,
    To,
    decode_cursor,
    encode_cursor,
    invalid_cursor,
    wants_csv,
)
from service.auth import access
from service.journal import Database
from service.openapi import problems


class UsageReportItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """One group: the asked grouping keys (only those; a `tag:<name>` key is a property
    of that name, a string or null), then the totals."""

    events: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    credits: int
    # Spend policy: of `credits`, what no wallet could cover (charged to
    # system:overage); and the events whose model was outside the policy.
    overage: int
    violations: int
    # Debits and captures by amount: how many, and their credits (in `credits`).
    debits: int
    debit_credits: int
    employee: str | None | msgspec.UnsetType = msgspec.UNSET
    department: str | None | msgspec.UnsetType = msgspec.UNSET
    model: str | None | msgspec.UnsetType = msgspec.UNSET
    project: str | None | msgspec.UnsetType = msgspec.UNSET
    day: str | None | msgspec.UnsetType = msgspec.UNSET
    month: str | None | msgspec.UnsetType = msgspec.UNSET


class UsageReport(msgspec.Struct, frozen=True, omit_defaults=True):
    items: list[UsageReportItem]
    # Only on a page (`limit` or `cursor` given): the next page's cursor, null on
    # the last page.
    next_cursor: str | None | msgspec.UnsetType = msgspec.UNSET


# A page's size when `cursor` is given without `limit` (the lists' default).
PAGE_DEFAULT = 50


class _PageCursor(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A report page's cursor: its report's fingerprint and the keys of the page's
    last item, then (a report read a stretch of values at a time) what the page
    learnt of the rows after it (reports.Lookahead). A cursor of two items is one
    handed out before the last three were added, still good."""

    mark: str
    after: list[str | None]
    left: Annotated[int, msgspec.Meta(ge=0, le=2**31)] | None = None
    per: Annotated[int, msgspec.Meta(ge=1, le=2**31)] | None = None
    ahead: Annotated[list[str | None], msgspec.Meta(max_length=reports.AHEAD_MAX)] = []


def _page_cursor(
    cursor: str | None, start: datetime, end: datetime, keys: tuple[str, ...]
) -> tuple[list[str | None] | None, reports.Lookahead | None]:
    """The keys of the last item of the page before (None: from the first item), and
    what that page learnt of the rows after it. A cursor names its report (period
    and keys): one from another report is refused."""
    decoded = decode_cursor(cursor, _PageCursor)
    if decoded is None:
        return None, None
    if decoded.mark != reports.page_fingerprint(start, end, keys) or len(decoded.after) != len(
        keys
    ):
        raise invalid_cursor()
    known = None
    if decoded.left is not None:
        known = reports.Lookahead(decoded.left, decoded.per, list(decoded.ahead))
    return decoded.after, known


def _next_cursor(
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    found: reports.Lookahead | None,
) -> str | None:
    """The cursor of the page after the one whose last item's keys are `after`."""
    if after is None:
        return None
    mark = reports.page_fingerprint(start, end, keys)
    if found is None:
        return encode_cursor([mark, after])
    return encode_cursor([mark, after, found.left, found.per, found.values])


class ReportsController(Controller):
    path = "/v1"
    tags = ["Reports"]

    @get(
        "/reports/usage",
        summary="Usage totals over a period, grouped",
        opt={**access("reports.read"), **problems()},
    )
    async def usage(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        from_: From,
        to: To,
        group_by: Annotated[
            str,
            QueryParameter(
                description=(
                    "A comma list of employee, department, model, project, day, month and "
                    "up to 3 tag:<name> keys."
                ),
            ),
        ],
        limit: Annotated[
            int | None,
            QueryParameter(
                ge=1,
                le=500,
                description=(
                    "JSON only: answer one page of this many items (1..500) with "
                    "`next_cursor`. Without it (and without `cursor`) the whole report."
                ),
            ),
        ] = None,
        cursor: CursorParam = None,
    ) -> Response[UsageReport]:
        """Every kind of spend in the period, summed per group of the `group_by` keys (in
        that order, which is also the order of the items; null last): usage events with
        `from <= occurred_at < to`, and debits and captures by amount made in it (their
        count in `debits`, their credits in `debit_credits` and in `credits`). A debit or
        capture counts under its metadata's `model` and `project`, null when it has none.
        `tag:<name>` groups by a usage event's tag of that name, or a debit's or
        capture's metadata key of that name (null when it has none); a report whose tag
        keys are all declared in TOKENLEDGER_REPORT_TAGS reads their roll-ups when they
        answer it (tags with model, project, day and month; with employee, department
        and month over whole months), any other reads the events themselves, slower.
        `employee` is null for spend charged to a department account;
        `department` is the department the employee belonged to when the usage
        happened (at the end of its UTC day when someone moved within the period; a
        department account's own id for its usage); `project` is null for usage
        without one; `day` and `month` are
        UTC (`YYYY-MM-DD`, `YYYY-MM`). When `from` and `to` are both UTC midnights
        the report reads the roll-ups (fast); over two days or more between other
        instants it reads the roll-ups of the nearest UTC midnights and corrects each
        end with the spend between bound and midnight (as fast, and exact); a shorter
        period aggregates the events themselves (exact at any instant). With
        `Accept: text/csv` the answer is CSV: a header row of the keys then the
        totals, and one row per item (null is empty). Either form is streamed as the
        rows are read, a few thousand at a time, so a large report is never whole in
        memory. With `limit` (or `cursor`) the JSON answer is one page, `{items,
        next_cursor}`, in the same order; the CSV answer with `cursor` streams every
        row after it."""
        keys = reports.parse_group_by(group_by)
        reports.check_period(from_, to)
        after, known = _page_cursor(cursor, from_, to, keys)
        if not wants_csv(request) and (limit is not None or cursor is not None):
            items, nxt, found = await reports.usage_report_page(
                ledger, from_, to, keys, after, limit or PAGE_DEFAULT, known
            )
            body = {"items": items, "next_cursor": _next_cursor(from_, to, keys, nxt, found)}
            return Response(body)  # type: ignore[arg-type]  # why: the items as UsageReport has them, built as report item structs (reports._item_type)
        if after is not None:
            # CSV from a cursor on: the rows after it, streamed.
            rest = reports.usage_report_after(ledger, from_, to, keys, after)
            head: list[reports.Item] = await anext(rest, [])
            return Stream(  # type: ignore[return-value]  # why: CSV text, not the JSON struct
                _csv_chunks(keys, head, rest), media_type=CSV_UTF8
            )
        span = reports.export_span(from_, to, keys)
        if span is not None:
            # employee,model,project over months of roll-ups: bytes PostgreSQL writes.
            return await _export(request, ledger, from_, to, keys, span)
        pages = reports.usage_report_pages(ledger, from_, to, keys)
        # The first rows are read before answering, so that a failing query
        # still answers its problem (503 and the like) instead of a cut body.
        first: list[reports.Item] = await anext(pages, [])
        if wants_csv(request):
            # The CSV form of the same report.
            return Stream(  # type: ignore[return-value]  # why: CSV text, not the JSON struct
                _csv_chunks(keys, first, pages), media_type=CSV_UTF8
            )
        return Stream(_json_chunks(first, pages), media_type=JSON)  # type: ignore[return-value]  # why: the same JSON, written page by page


async def _export(
    request: Request[Any, Any, Any],
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    span: tuple[datetime, datetime],
) -> Response[UsageReport]:
    """The same answer as the general path (the CSV byte for byte) from the bytes
    PostgreSQL's COPY writes: the service decodes no row. As there, the first chunk is
    read before answering, so a failing query still answers its problem."""
    form = "csv" if wants_csv(request) else "json"
    chunks = reports.usage_export_chunks(ledger, start, end, span, form)
    first = await anext(chunks, b"")
    if form == "csv":
        return Stream(  # type: ignore[return-value]  # why: CSV text, not the JSON struct
            _csv_export(reports.to_csv(keys, []).encode() + first, chunks), media_type=CSV_UTF8
        )
    return Stream(_json_export(first, chunks), media_type=JSON)  # type: ignore[return-value]  # why: the same JSON, written chunk by chunk


async def _csv_export(first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in chunks:
        yield chunk


async def _json_export(first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`{"items": [...]}` around the items' comma-separated objects, chunk by chunk."""
    yield b'{"items":[' + first
    sep = bool(first)
    async for chunk in chunks:
        yield (b"," if sep else b"") + chunk
        sep = True
    yield b"]}"


async def _csv_chunks(
    keys: tuple[str, ...], first: list[reports.Item], pages: AsyncIterator[list[reports.Item]]
) -> AsyncIterator[bytes]:
    yield reports.to_csv(keys, first).encode()
    async for items in pages:
        yield reports.to_csv(keys, items, header=False).encode()


async def _json_chunks(
    first: list[reports.Item], pages: AsyncIterator[list[reports.Item]]
) -> AsyncIterator[bytes]:
    """`{"items": [...]}` written page by page: never the whole report in memory."""
    yield b'{"items":['
    yield _encoder.encode(first)[1:-1]
    sep = bool(first)
    async for items in pages:
        if items:
            yield (b"," if sep else b"") + _encoder.encode(items)[1:-1]
            sep = True
    yield b"]}"


_encoder = msgspec.json.Encoder()
