"""Usage reports: totals of usage events over a period, grouped by any of the
keys below (API.md, Metering and prices).

Each query reads the smallest table that answers it exactly (source_for).
Roll-ups hold whole UTC days: a period that does not start and end at UTC
midnights reads them over the midnights nearest to its bounds and corrects
each end with the events (and the journal's debits) between bound and
midnight, added or subtracted (usage_span); a period shorter than two days, or
with a tag key, aggregates `usage_events` itself, exact at any instant. Whole days
without an employee or department key read `usage_daily_models` (per day,
model and project, without the account, so far fewer rows); whole UTC months
without a day key read `usage_monthly_models` (per month, account and model)
when no project key is asked either, else `usage_monthly` (per month,
account, model and project); other whole days read `usage_daily` (per day
and account). tl_usage_rollup_many keeps all four in the same transaction as
each event, so every source gives the same totals. Debits and captures by
amount come from their own roll-ups (spend_daily, spend_monthly: schema.sql,
tl_spend_rollup) on the same rule, or from the journal (spend_source_for).

A report with tag keys reads the tag roll-ups when every one of its tag keys is
declared (TOKENLEDGER_REPORT_TAGS, kept in report_tag_keys: tag_source), and the
events and the journal otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import io
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from operator import itemgetter
from typing import Any, Protocol, cast

import msgspec

from service import db
from service.errors import invalid
from service.journal import Database, PlanStep

# The allow-list of grouping keys; service/sql/reports.sql has one
# expression per key and nothing else reaches the SQL but this list.
GROUP_KEYS = ("employee", "department", "model", "project", "day", "month")
TOTALS = (
    "events",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "credits",
    # Spend policy: credits charged to system:overage, and events flagged
    # model_not_allowed.
    "overage",
    "violations",
    # Debits and captures by amount (issue 16): how many, and their credits,
    # which `credits` includes. They count under their metadata's `model`,
    # `project` and `tags`, null where it has none.
    "debits",
    "debit_credits",
)
# `tag:<name>` keys: the value of that tag of a usage event (or of a debit's
# or capture's metadata `tags`), null where it has none. At most MAX_TAG_KEYS
# per report; service/sql/reports.sql has a column for each.
TAG_PREFIX = "tag:"
MAX_TAG_KEYS = 3
TAG_NAME_MAX = 64
# A report covers at most this long a period.
MAX_PERIOD = timedelta(days=400)


def parse_group_by(text: str) -> tuple[str, ...]:
    """The grouping keys of a `group_by` comma list, in the caller's order: at
    least one, each from GROUP_KEYS, none twice."""
    keys = tuple(part.strip() for part in text.split(","))
    if keys == ("",):
        raise invalid("group_by", "at least one grouping key is needed")
    for k in keys:
        if k.startswith(TAG_PREFIX):
            name = k[len(TAG_PREFIX) :]
            if not 1 <= len(name) <= TAG_NAME_MAX or name != name.strip():
                raise invalid(
                    "group_by",
                    f"a tag key is tag:<name>, the name 1 to {TAG_NAME_MAX} characters"
                    " without surrounding spaces",
                )
        elif k not in GROUP_KEYS:
            raise invalid(
                "group_by",
                f"unknown grouping key {k!r}; use {', '.join(GROUP_KEYS)} or tag:<name>",
            )
    if len(set(keys)) != len(keys):
        raise invalid("group_by", "a grouping key appears twice")
    if sum(k.startswith(TAG_PREFIX) for k in keys) > MAX_TAG_KEYS:
        raise invalid("group_by", f"at most {MAX_TAG_KEYS} tag keys")
    return keys


def _is_tag(key: str) -> bool:
    return key.startswith(TAG_PREFIX)


def tag_names(keys: tuple[str, ...]) -> list[str]:
    """The tag names of the `tag:<name>` keys, in the caller's order."""
    return [k[len(TAG_PREFIX) :] for k in keys if k.startswith(TAG_PREFIX)]


def sql_keys(keys: tuple[str, ...]) -> list[str]:
    """The keys as service/sql/reports.sql names them: `tag:<name>` keys become
    tag1, tag2, tag3 in order (the names themselves go in a parameter of their
    own, never into the SQL text)."""
    out, n = [], 0
    for k in keys:
        if k.startswith(TAG_PREFIX):
            n += 1
            out.append(f"tag{n}")
        else:
            out.append(k)
    return out


# How long start-up may take to rebuild the tag roll-ups when the declared keys
# changed (bench.reports: 27.5 s for a million events and 300,000 debits, at load 3).
REPORT_TAGS_SYNC_TIMEOUT_MS = 600_000


async def sync_report_tags(ledger: Database) -> bool:
    """Makes the declared tag keys exactly TOKENLEDGER_REPORT_TAGS (start-up): when
    they changed, the tag roll-ups are rebuilt from the events and the journal
    (tl_report_tags_sync, holding writes to usage_events and entries meanwhile);
    whether they were."""
    names = list(ledger.config.report_tag_names())
    return bool(await ledger.fetchval_long("report_tags_sync", REPORT_TAGS_SYNC_TIMEOUT_MS, names))


def check_period(start: datetime, end: datetime) -> None:
    """[start, end) is a non-empty period of at most MAX_PERIOD, with offsets."""
    for name, value in (("from", start), ("to", end)):
        if value.tzinfo is None:
            raise invalid(name, f"{name} needs a UTC offset (RFC 3339)")
    if end <= start:
        raise invalid("to", "to must be after from")
    if end - start > MAX_PERIOD:
        raise invalid("to", f"a report covers at most {MAX_PERIOD.days} days")


def at_utc_midnight(when: datetime) -> bool:
    return when.utcoffset() is not None and when.astimezone(UTC).time() == time(0)


def uses_rollup(start: datetime, end: datetime) -> bool:
    """Whole UTC days can be read from a roll-up."""
    return at_utc_midnight(start) and at_utc_midnight(end)


def at_month_start(when: datetime) -> bool:
    return at_utc_midnight(when) and when.astimezone(UTC).day == 1


# A period whose bounds are not UTC midnights is read from the roll-ups only
# when it is at least this long: the corrections at its ends read up to half a
# day of events each, so a shorter period reads about as many events whole.
MIN_CORRECTED_PERIOD = timedelta(days=2)


def nearest_midnight(when: datetime) -> datetime:
    """The UTC midnight nearest to `when`, a tie (noon) rounding down: the end of a
    corrected period is then at most half a day of events from its roll-up."""
    floor = datetime.combine(when.astimezone(UTC).date(), time(0), UTC)
    ceil = floor + timedelta(days=1)
    return floor if when - floor <= ceil - when else ceil


def usage_span(start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The UTC midnights over which a roll-up answers the usage events of [start,
    end): the bounds themselves when both are midnights; else, for a period of at
    least MIN_CORRECTED_PERIOD, their nearest midnights (the report's SQL corrects
    each end with the events between bound and midnight, added or subtracted); else
    None (the events themselves)."""
    if uses_rollup(start, end):
        return start, end
    if end - start < MIN_CORRECTED_PERIOD:
        return None
    return nearest_midnight(start), nearest_midnight(end)


# What a report with tag keys may group by besides them and still read the tag
# roll-ups: without an account key, per day, model and project (tag_daily);
# with one, per month and account only (tag_monthly).
_TAG_DAILY_KEYS = frozenset({"model", "project", "day", "month"})
_TAG_MONTHLY_KEYS = frozenset({"employee", "department", "month"})


def tag_source(
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    split_days: bool = False,
    declared: frozenset[str] = frozenset(),
) -> str | None:
    """The tag roll-up that answers a report with tag keys, all of them declared,
    over usage_span's midnights (corrected at the ends like the other roll-ups):
    'tag_daily' without an employee or department key, 'tag_monthly' for whole UTC
    months by employee, department or month when nobody moved department; None
    when none does (a key not declared, a short period, another combination)."""
    names = tag_names(keys)
    span = usage_span(start, end)
    if not names or span is None or not set(names) <= declared:
        return None
    others = {k for k in keys if not _is_tag(k)}
    if others <= _TAG_DAILY_KEYS:
        return "tag_daily"
    if others <= _TAG_MONTHLY_KEYS and not split_days and all(map(at_month_start, span)):
        return "tag_monthly"
    return None


def source_for(
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    split_days: bool = False,
    declared: frozenset[str] = frozenset(),
) -> str:
    """The smallest table that answers exactly: a month-per-account roll-up
    for whole UTC months without a day key (without the project when no
    project key is asked), a per-day roll-up without the
    account when no employee or department key is asked, the daily roll-up
    for other whole days, and the events themselves for a period shorter than
    MIN_CORRECTED_PERIOD or with a tag key that no tag roll-up answers
    (tag_source: `declared`, the declared tag keys). The months and days are
    those of usage_span: a longer period whose bounds are not midnights reads the
    roll-up of its nearest midnights, corrected at its ends."""
    span = usage_span(start, end)
    if any(map(_is_tag, keys)):
        # Only the tag roll-ups keep tags.
        return tag_source(start, end, keys, split_days, declared) or "events"
    if span is None:
        return "events"
    start, end = span
    if not {"employee", "department"} & set(keys):
        return "models"
    if "day" not in keys and not split_days and at_month_start(start) and at_month_start(end):
        return "monthly" if "project" in keys else "monthly_models"
    return "daily"


def spend_source_for(
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    split_days: bool = False,
    declared: frozenset[str] = frozenset(),
) -> str:
    """Where the debits and captures by amount are read: their monthly roll-up
    (spend_monthly) when usage_span's midnights are month starts, without a day
    key and when nobody moved department, their daily roll-up (spend_daily) for
    other spans, either corrected at the ends from the journal like the usage
    events; and the journal alone for a period that usage_span does not read from
    roll-ups or with a tag key (the roll-ups keep no metadata but the model and
    project), unless the tag roll-ups answer it (tag_source, as for the usage
    events). Every choice gives the same sums."""
    span = usage_span(start, end)
    if any(map(_is_tag, keys)):
        return tag_source(start, end, keys, split_days, declared) or "journal"
    if span is None:
        return "journal"
    start, end = span
    if "day" not in keys and not split_days and at_month_start(start) and at_month_start(end):
        return "monthly"
    return "daily"


def spend_bounds(start: datetime, end: datetime, source: str) -> tuple[datetime, datetime]:
    """$8 and $9 of usage_report: the UTC days [$8, $9) the roll-ups answer (usage_span),
    the journal and the events correcting the ends between $1 and $8 and between $9 and
    $2 (added where the midnight lies outside [start, end), subtracted where inside).
    The journal alone answers with $8 = $9 = end: [start, end) added."""
    span = usage_span(start, end)
    if source == "journal" or span is None:
        return end, end
    return span


# Rows per read of a streamed report (usage_report_pages): what one step of
# the answer holds in memory.
STREAM_BATCH = 2000
# work_mem of a usage report's transaction: hashing a month's debits (hundreds
# of thousands of rows) spilled to disk in batches at the default 4 MB.
REPORT_WORK_MEM_MB = 64


async def declared_tags(ledger: Database, keys: tuple[str, ...]) -> frozenset[str]:
    """The declared tag keys, as the database has them (report_tag_keys), for a
    report with tag keys; none for one without (it reads no tag roll-up)."""
    return frozenset(await ledger.fetchval("report_tag_keys") if any(map(_is_tag, keys)) else ())


async def _usage_args(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    declared: frozenset[str] | None = None,
) -> tuple[Any, ...]:
    assert keys and all(k in GROUP_KEYS or k.startswith(TAG_PREFIX) for k in keys), keys
    # `department` is the department of the time of the spend: when someone
    # moved within the period, the rows are split by day (issue 16).
    split = "department" in keys and bool(await ledger.fetchval("departments_moved", start, end))
    if declared is None:
        declared = await declared_tags(ledger, keys)
    return usage_args(start, end, keys, split, declared)


def usage_args(
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    split: bool,
    declared: frozenset[str],
) -> tuple[Any, ...]:
    """usage_report's arguments, given whether someone moved department in the
    period (`split`) and the declared tag keys."""
    spend = spend_source_for(start, end, keys, split, declared)
    # One span for both: the usage events read a roll-up exactly when the debits do
    # (usage_span, and no tag key), over the same days $8..$9.
    return (
        start,
        end,
        sql_keys(keys),
        source_for(start, end, keys, split, declared),
        split,
        tag_names(keys),
        spend,
        *spend_bounds(start, end, spend),
    )


class Item(Protocol):
    """A report's item as the code reads it: its value of a key or total by name
    (item["department"]). The items a report streams are _item_type's structs."""

    def __getitem__(self, name: str) -> Any: ...


@lru_cache(maxsize=256)
def _item_type(columns: tuple[str, ...]) -> Callable[..., Item]:
    """The struct of a report's items with these columns (the asked keys in the
    caller's order, then TOTALS): msgspec writes it as the JSON object of those
    names, in that order, as it writes a dict of them, byte for byte. Built from a
    row's values with one call: a dict per item (dict(zip(...))) cost about 0.6 s of
    a third of a million rows, the struct about 0.15 s, and its JSON less too. Its
    fields are f0, f1, ... (a tag key's name is no identifier), each renamed to its
    column; item[name] reads one by its column's name."""
    fields = tuple(f"f{n}" for n in range(len(columns)))
    by_name = dict(zip(columns, fields, strict=True))

    def value(self: msgspec.Struct, name: str) -> Any:
        return getattr(self, by_name[name])

    # (mypy sees a plain Struct type; its __getitem__ is the namespace's.)
    return cast(
        "Callable[..., Item]",
        msgspec.defstruct(
            "ReportItem",
            [(f, Any) for f in fields],
            rename=dict(zip(fields, columns, strict=True)),
            namespace={"__getitem__": value},
        ),
    )


def _items(keys: tuple[str, ...], rows: Any) -> list[dict[str, Any]]:
    """The rows as dicts: the asked keys in the caller's order (by their SQL names),
    then TOTALS (bigints in the SQL, so ints already), for callers that keep the
    answer whole (usage_report). One itemgetter per batch: at a third of a million
    rows, building each item key by key cost about a second."""
    get = itemgetter(*sql_keys(keys), *TOTALS)
    columns = (*keys, *TOTALS)
    return [dict(zip(columns, get(r), strict=True)) for r in rows]


def _streamed(keys: tuple[str, ...], rows: Any) -> list[Item]:
    """The rows as the items a report streams and pages (_item_type): the same
    columns as _items, in the same order."""
    get = itemgetter(*sql_keys(keys), *TOTALS)
    make = _item_type((*keys, *TOTALS))
    return [make(*get(r)) for r in rows]


async def usage_report(
    ledger: Database, start: datetime, end: datetime, keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The report's rows, all in one list: the asked keys in the caller's order, then
    TOTALS. For callers that know the answer is small (the bench, the pages); the
    HTTP answer streams (usage_report_pages)."""
    span = export_span(start, end, keys)
    args: tuple[Any, ...]
    if span is not None:
        # employee,model,project over months of roll-ups: the same rows, in the same order.
        query, args = "usage_export_rows", (start, end, *span)
    else:
        query, args = "usage_report", await _usage_args(ledger, start, end, keys)
    rows = await ledger.fetch_slow(
        query,
        ledger.config.report_statement_timeout_ms,
        *args,
        # The month's debits and captures make the estimate large enough for
        # PostgreSQL to JIT-compile the query, which costs more than it saves.
        jit=False,
        work_mem_mb=REPORT_WORK_MEM_MB,
    )
    return _items(keys, rows)


async def usage_report_pages(
    ledger: Database, start: datetime, end: datetime, keys: tuple[str, ...]
) -> AsyncIterator[list[Item]]:
    """The same rows, STREAM_BATCH at a time from a server-side cursor: a report of
    a third of a million groups is never whole in the service's memory. (A report
    read from the usage events themselves: its first WINDOW rows with one plain
    query, _window_plan.)"""
    chunked = _chunked(ledger, start, end, keys, None, 0)
    if chunked is not None:
        async for items in chunked:
            yield items
        return
    args = await _usage_args(ledger, start, end, keys)
    if args[3] == "events":  # $4, the usage source
        rows = ledger.stream_parts_slow(
            ledger.config.report_statement_timeout_ms,
            _window_plan(ledger, args),
            batch=STREAM_BATCH,
            jit=False,
            work_mem_mb=REPORT_WORK_MEM_MB,
        )
        async for part in rows:
            yield _streamed(keys, part)
        return
    async for items in _stream_items(ledger, keys, "usage_report", *args):
        yield items


# Rows of a report read from the usage events themselves (a tag key that is not
# declared, a period under two days) read with one plain query, at most this many:
# about 12 MB of rows (580 bytes each). A report with more reads the events again,
# through a cursor, for the rest: at 5,000, `department,day,tag:team` over a month
# (5,348 rows) took 1.9 to 2.4 s whole instead of about 1 s.
WINDOW = 20_000


def _window_plan(
    ledger: Database, args: tuple[Any, ...]
) -> Callable[[Any], AsyncIterator[PlanStep]]:
    """A report read from the usage events themselves aggregates all of the
    period's events before its first row. Read through a cursor, PostgreSQL runs it
    on one core (a cursor's query never gets parallel workers); so its first WINDOW
    rows are read with one plain query (usage_report_window), which may get them
    (`tag:team` over a month of a million events: 0.8 -> 0.5-0.7 s), and only if there
    are more, the rest through a cursor over the same query from there on, which
    reads the events again (both in the stream's snapshot)."""

    async def plan(conn: Any) -> AsyncIterator[PlanStep]:
        timeout = db.client_timeout(ledger.config.report_statement_timeout_ms)
        rows = await conn.fetch(
            ledger.queries["usage_report_window"], *args, WINDOW + 1, 0, timeout=timeout
        )
        yield rows[:WINDOW]
        if len(rows) > WINDOW:
            yield "usage_report_window", (*args, None, WINDOW)

    return plan


async def _stream_items(
    ledger: Database, keys: tuple[str, ...], query: str, *args: Any
) -> AsyncIterator[list[Item]]:
    """A report query's rows as items, STREAM_BATCH at a time from a server-side cursor,
    under the report statement timeout and work_mem (and without JIT: the month's
    debits and captures make the estimate large enough for PostgreSQL to compile the
    query, which costs more than it saves)."""
    async for rows in ledger.stream_slow(
        query,
        ledger.config.report_statement_timeout_ms,
        *args,
        batch=STREAM_BATCH,
        jit=False,
        work_mem_mb=REPORT_WORK_MEM_MB,
    ):
        yield _streamed(keys, rows)


def order_key(values: Any) -> tuple[tuple[bool, str], ...]:
    """A row's place in the report's order from its key values in the caller's order:
    byte order, null last (usage_report's ORDER BY; Python compares str by code point,
    which is the byte order of their UTF-8)."""
    return tuple((v is None, v or "") for v in values)


def page_fingerprint(start: datetime, end: datetime, keys: tuple[str, ...]) -> str:
    """What a page cursor names its report by, so that it is refused for another one."""
    text = f"{start.isoformat()}|{end.isoformat()}|{','.join(keys)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def usage_report_after(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    first_chunk: int = 0,
    known: Lookahead | None = None,
    found: Lookahead | None = None,
) -> AsyncGenerator[list[Item], None]:
    """The report's items after the item whose keys are `after` (all of them when
    None), a batch at a time: the rows are read in the answer's order (the export's
    query for its keys, else usage_report) and those up to `after` skipped, so a page
    deep in a large report costs the rows before it, not their memory. A report led
    by the employee and another key is read a chunk of employees at a time from the
    cursor's (_employee_pages), the first chunk `first_chunk` employees (a page's
    size and one more; FIRST_CHUNK when 0); one led by the department, the day, the
    month, the model, the project or a tag key with the employee among its keys, a
    chunk of departments, of the period or of values at a time from the cursor's
    (_chunked)."""
    span = export_span(start, end, keys)
    pages: AsyncIterator[list[Item]]
    if span is not None:
        pages = _export_pages(ledger, start, end, keys, span, after)
    else:
        pages = _chunked(
            ledger, start, end, keys, after, first_chunk, known, found
        ) or usage_report_pages(ledger, start, end, keys)
    if after is None:
        async for items in pages:
            yield items
        return
    bound = order_key(after)
    async for items in pages:
        if items and order_key(items[-1][k] for k in keys) <= bound:
            continue
        yield [i for i in items if order_key(i[k] for k in keys) > bound]
        break
    async for items in pages:
        yield items


async def _export_pages(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    span: tuple[datetime, datetime],
    after: list[str | None] | None = None,
) -> AsyncIterator[list[Item]]:
    """The export's rows as items (usage_export_rows). After a
    cursor: from its employee on (an index range of the employee walk, so a page deep
    in the export costs its own rows, not those before it), then the rows without an
    employee (last); only those when the cursor is among them."""
    base = (start, end, *span)
    parts: list[tuple[str, tuple[Any, ...]]] = [("usage_export_rows", base)]
    if after is not None and after[0] is not None:
        parts = [("usage_export_rows_from", (*base, after[0])), ("usage_export_rows_unowned", base)]
    elif after is not None:
        parts = [("usage_export_rows_unowned", base)]
    for query, args in parts:
        async for items in _stream_items(ledger, keys, query, *args):
            yield items


# Reports led by the employee and another key (issue 16: a month's
# `employee,day` is a third of a million groups, which the general query
# aggregates and sorts whole, 4 to 5 s, before its first row) are read a
# chunk of employees at a time, in the report's order: the employee accounts
# in byte order of their ids (accounts_employee_ref_idx), then the report over
# a chunk's accounts alone (usage_report_accounts: the same query, the
# accounts a condition of its first aggregation), the first chunk the page's
# size and one more employees (a whole answer: FIRST_CHUNK), each next one
# twice as large, and the accounts without an employee (null, last) at the
# end. All of it in one REPEATABLE READ transaction (stream_parts_slow), so
# the chunks read one snapshot, as the single query did. A chunk costs one
# read of the period's roll-up rows (the condition is not on their indexes'
# leading column): a page costs about that read, and a whole answer's first
# rows come after it instead of after the whole sort.
FIRST_CHUNK = 500
EMPLOYEE_CHUNK_MAX = 8000


def by_employee(keys: tuple[str, ...]) -> bool:
    """Whether a report is read a chunk of employees at a time (above)."""
    return len(keys) > 1 and keys[0] == "employee"


async def _employee_pages(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    first_chunk: int,
) -> AsyncIterator[list[Item]]:
    """The report's items from the cursor's employee on (all of them when `after`
    is None; only the rows without an employee when the cursor is among them), a
    chunk of employees at a time, each chunk's rows streamed."""
    args = await _usage_args(ledger, start, end, keys)

    async def plan(conn: Any) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        # Each chunk's accounts read when the chunk before is done: only one
        # chunk's ids are ever in memory, and a page that is full reads no more.
        if after is None or after[0] is not None:
            query = ledger.queries["report_employee_accounts"]
            start_at = (after or [""])[0] or ""
            async for chunk in _keyed_chunks(
                conn, query, start_at, "ref", first_chunk, EMPLOYEE_CHUNK_MAX
            ):
                yield "usage_report_accounts", (*args, [row["id"] for row in chunk])
        unowned = await conn.fetch(ledger.queries["report_unowned_accounts"])
        yield "usage_report_accounts", (*args, [row["id"] for row in unowned])

    async for items in _parts_items(ledger, keys, plan):
        yield items


async def _keyed_chunks(
    conn: Any, query: str, key: str, column: str, size: int, cap: int | None
) -> AsyncIterator[list[Any]]:
    """The rows of `query` (arguments: the key to start from, whether it is
    included, how many) from `key` on, a chunk at a time: `size` rows first, then
    twice as many each time (up to `cap`), each chunk fetched when the one before
    is done, the next starting after the last row's `column`."""
    inclusive = True
    while True:
        rows = await conn.fetch(query, key, inclusive, size)
        if rows:
            yield rows
        if len(rows) < size:
            return
        key, inclusive = rows[-1][column], False
        size = 2 * size if cap is None else min(2 * size, cap)


async def _parts_items(
    ledger: Database,
    keys: tuple[str, ...],
    plan: Callable[[Any], AsyncIterator[PlanStep]],
    keep: Callable[[Item], bool] | None = None,
) -> AsyncIterator[list[Item]]:
    """The rows of a chunked report's parts as items, in one snapshot
    (Database.stream_parts_slow), those `keep` refuses left out. A part's rows come
    in batches of their own, each yielded before the plan is asked for the next
    part, so `keep` may follow the part being read."""
    async for rows in ledger.stream_parts_slow(
        ledger.config.report_statement_timeout_ms,
        plan,
        batch=STREAM_BATCH,
        jit=False,
        work_mem_mb=REPORT_WORK_MEM_MB,
    ):
        items = _streamed(keys, rows)
        if keep is not None:
            items = [i for i in items if keep(i)]
        if items:
            yield items


def _chunked(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    first_chunk: int,
    known: Lookahead | None = None,
    found: Lookahead | None = None,
) -> AsyncIterator[list[Item]] | None:
    """The report's items after `after` read a chunk at a time when its keys are
    chunked (by the employee, the department, the day or month, or the model,
    project or tag that lead them), else None (one query). `first_chunk`: the rows
    a page needs (its size and one more), 0 for the whole answer from `after` on."""
    if by_employee(keys):
        return _employee_pages(ledger, start, end, keys, after, first_chunk or FIRST_CHUNK)
    if by_department(keys):
        return _department_pages(ledger, start, end, keys, after)
    if by_time(keys):
        return _time_pages(ledger, start, end, keys, after)
    if by_value(keys):
        return _value_pages(ledger, start, end, keys, after, first_chunk, known, found)
    return None


# Reports led by the department with the employee among their other keys
# (`department,employee,day`: a third of a million rows a month) are read a
# chunk of departments at a time, in byte order of their ids: one department
# first (a page's worth, usually), then twice as many each time, without a
# cap (each chunk reads the period's roll-up rows once, so a thousand
# departments cost eleven reads; the rows stream whatever the chunk's size),
# then the accounts of no department (null, last). A chunk reads the report over
# the accounts whose spend can count under its departments
# (report_department_accounts: theirs, and those of everyone who is or was in
# one of them) and keeps the rows of its departments: an employee who moved
# has rows under other departments too, read again with theirs. Like the
# employee's chunks, in one REPEATABLE READ transaction.


def by_department(keys: tuple[str, ...]) -> bool:
    """Whether a report is read a chunk of departments at a time (above). With
    the department and the employee alone, the single query answers its few rows
    per employee faster than chunks that each read the period's roll-ups."""
    return len(keys) > 2 and keys[0] == "department" and "employee" in keys


async def _department_pages(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
) -> AsyncIterator[list[Item]]:
    """The report's items from the cursor's department on (all of them when
    `after` is None; only the rows without a department when the cursor is among
    them), a chunk of departments at a time."""
    args = await _usage_args(ledger, start, end, keys)
    # The departments of the part being read (None: the rows without one).
    kept: frozenset[str | None] = frozenset()

    async def plan(conn: Any) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        nonlocal kept
        if after is None or after[0] is not None:
            query = ledger.queries["report_departments"]
            start_at = (after or [""])[0] or ""
            async for rows in _keyed_chunks(conn, query, start_at, "id", 1, None):
                chunk = [row["id"] for row in rows]
                accounts = await conn.fetch(ledger.queries["report_department_accounts"], chunk)
                kept = frozenset(chunk)
                yield "usage_report_accounts", (*args, [row["id"] for row in accounts])
        system = await conn.fetch(ledger.queries["report_system_accounts"])
        kept = frozenset([None])
        yield "usage_report_accounts", (*args, [row["id"] for row in system])

    async for items in _parts_items(ledger, keys, plan, lambda i: i["department"] in kept):
        yield items


# Reports led by the day or the month with the employee among their other
# keys (`day,employee`: a third of a million rows a month) are read a chunk of
# the period at a time, each part the same report over its own stretch of
# UTC days or months: the first one day or month (or what is left of it after
# `from`), then twice as many each time up to TIME_CHUNK_MAX. A day's (or a
# month's) rows are those of the report over that day alone, sums being
# additive; each part reads only its own days of the roll-ups, so the whole
# answer costs about what the single query did, and its first rows come after
# one day's. In one REPEATABLE READ transaction, like the other chunks.
TIME_CHUNK_MAX = 8


def by_time(keys: tuple[str, ...]) -> bool:
    """Whether a report is read a stretch of days or months at a time (above)."""
    return len(keys) > 1 and keys[0] in ("day", "month") and "employee" in keys


def bucket_start(key: str, unit: str) -> datetime:
    """The UTC instant a `day` (YYYY-MM-DD) or `month` (YYYY-MM) key starts at."""
    text = key if unit == "day" else f"{key}-01"
    return datetime.combine(date.fromisoformat(text), time(0), UTC)


def next_bucket(when: datetime, unit: str, count: int) -> datetime:
    """The start of the `count`-th UTC day (or month) after the one holding `when`."""
    day = when.astimezone(UTC).date()
    if unit == "day":
        return datetime.combine(day + timedelta(days=count), time(0), UTC)
    months = day.year * 12 + day.month - 1 + count
    return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)


async def _time_pages(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
) -> AsyncIterator[list[Item]]:
    """The report's items from the cursor's day (or month) on, all of them when
    `after` is None, a stretch of the period at a time."""
    unit = keys[0]
    lo = start if after is None else max(start, bucket_start(str(after[0]), unit))
    declared = await declared_tags(ledger, keys)

    async def plan(conn: Any) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        part, size = lo, 1
        while part < end:
            part_end = min(end, next_bucket(part, unit, size))
            # Whether someone moved department within this part (the rows of a
            # part nobody moved in take the department at its start: the same).
            split = "department" in keys and bool(
                await conn.fetchval(ledger.queries["departments_moved"], part, part_end)
            )
            yield "usage_report", usage_args(part, part_end, keys, split, declared)
            part, size = part_end, min(2 * size, TIME_CHUNK_MAX)

    async for items in _parts_items(ledger, keys, plan):
        yield items


# Reports led by the model, the project or a tag key with the employee among
# their other keys (`project,employee`: ninety thousand rows a month;
# `tag:team,employee` a hundred thousand) are read a chunk of the leading
# key's values at a time: the values are those of the same report
# by that key alone (a group of the whole report has spend exactly when its
# value's total has), one value first, then twice as many each time without
# a cap, each chunk the report over the sources' rows of its values
# (usage_report_values), null last. A chunk reads the period's roll-up rows
# once: a declared tag of a hundred thousand values costs seventeen reads.
# In one REPEATABLE READ transaction, like the other chunks.
#
# A report read from the events and the journal themselves (a tag key not
# declared, a short period) has no roll-up to read its values from: they are
# read by report_lead_values (about 0.25 s for a month of a million events),
# and each chunk is a contiguous stretch of them, the rows whose value lies
# between its first and its last (usage_report_range), read with a plain query,
# which may get parallel workers where a cursor never does. The single query,
# read through a cursor, took 2.3 to 2.7 s to the first page of a month's
# `tag:team,employee` (100,000 rows). A chunk's rows are read whole, so a chunk
# is sized to about WINDOW rows from the rows per value of the chunk before
# (one value first, at most twice as many each time), and a chunk of more
# reads its rest through a cursor (as _window_plan does). The values are
# listed LEAD_VALUES_MAX at a time (a tag of a million values is not a
# million strings in memory).
LEAD_VALUES_MAX = 10_000


def by_value(keys: tuple[str, ...]) -> bool:
    """Whether a report is read a chunk of model, project or tag values at a time."""
    lead = keys[0] in ("model", "project") or _is_tag(keys[0])
    return len(keys) > 1 and lead and "employee" in keys


async def _value_pages(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    need: int = 0,
    known: Lookahead | None = None,
    found: Lookahead | None = None,
) -> AsyncIterator[list[Item]]:
    """The report's items from the cursor's model, project or tag value on (all of
    them when `after` is None), a chunk of values at a time; `need`: the rows a
    page needs, 0 for the whole answer; `known` and `found`: what the cursor knew
    of the values ahead, and what the next one should (_value_range_plan)."""
    lead = keys[0]
    declared = await declared_tags(ledger, keys)
    args = await _usage_args(ledger, start, end, keys, declared)
    if args[3] == "events":  # (and the journal: spend_source_for)
        # A report whose one tag key leads it: without that key, it may read the
        # roll-ups (when nobody set the tag in the period, _value_range_plan).
        untagged = None
        if [k for k in keys if _is_tag(k)] == [lead]:
            reduced = tuple(k for k in keys if k != lead)
            plain = usage_args(start, end, reduced, args[4], declared)
            untagged = (*plain[:2], args[2], *plain[3:])
        ranges = _value_range_plan(
            ledger, start, end, keys, args, after, need, untagged, known, found
        )
        async for items in _parts_items(ledger, keys, ranges):
            yield items
        return
    alone = usage_args(start, end, (lead,), False, declared)
    column, kind = sql_keys((lead,))[0], "tag" if _is_tag(lead) else lead

    async def plan(conn: Any) -> AsyncIterator[tuple[str, tuple[Any, ...]]]:
        rows = await conn.fetch(ledger.queries["usage_report"], *alone)
        values: list[str | None] = [row[column] for row in rows]
        if after is not None:
            values = [v for v in values if order_key([v]) >= order_key([after[0]])]
        size = 1
        while values:
            chunk, values = values[:size], values[size:]
            named = [v for v in chunk if v is not None]
            yield "usage_report_values", (*args, named, None in chunk, kind)
            size *= 2

    async for items in _parts_items(ledger, keys, plan):
        yield items


@dataclass
class Lookahead:
    """What a page of a report read a stretch of values at a time
    (_value_range_plan) learnt of the rows after its last item, handed to the next
    page in its cursor so that it need not learn it again: `left`, how many rows of
    the last item's value follow it (None: not known), `per`, the rows per value
    of the stretches it read, and `values`, values known to follow that one in the
    report's order (null last), at most AHEAD_MAX. They only size and bound the
    next page's first stretch, which reads every value between its ends in its own
    snapshot (and, when it reaches null, every value after its first): a value
    added since is read all the same, and a wrong count only costs time."""

    left: int | None = None
    per: int | None = None
    values: list[str | None] = field(default_factory=list)
    # (The value the page's last item has, as the plan counted: not in a cursor,
    # whose `after` has it; usage_report_page checks that the two agree.)
    value: str | None = None


# A page that reads its cursor's value alone reads only the rows of the employees
# from the cursor's on when they are at most this share of all employees. On the
# bench month (`tag:team,employee`, a value of 10,000 rows) the read took 0.46 to
# 0.51 s whole, 0.35 s over the second half of the employees, 0.26 s over the last
# tenth, and 0.60 s over all of them (the list of accounts costs its own).
RESTRICT_SHARE = 0.7

# At most this many values, of this many characters in all, ride in a page cursor
# (a tag of long values does not make a URL of kilobytes).
AHEAD_MAX = 8
AHEAD_CHARS = 512


def _value_range_plan(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    args: tuple[Any, ...],
    after: list[str | None] | None,
    need: int,
    untagged: tuple[Any, ...] | None = None,
    known: Lookahead | None = None,
    found: Lookahead | None = None,
) -> Callable[[Any], AsyncIterator[PlanStep]]:
    """The chunks of a report led by the model, the project or a tag key with the
    employee, read from the events and the journal themselves (above), from the
    cursor's value on, null last, each a stretch of values from one to another
    (a stretch that reaches null: from its first value on, without an end).

    A page (`need`: the rows it needs): the cursor's value first (its rows need no
    list of values), and with it the values after it that `known` (from the
    cursor) names, as many as its rows left and the rows per value call for; else
    the first value; then as many values as the rows still needed call for at the
    rows per value seen so far (at most twice as many each time, and about WINDOW
    rows), each chunk with a plain query. `found` gets what the next page needs to
    know (Lookahead): when the page's last item's value has fewer rows left than
    a page and the values after it are not known yet, they are listed now, so
    that the next page reads its two values in one stretch, where it would read
    the first, list the values and read the second (`tag:team,employee` over the
    bench month: 1.1 to 1.5 s).

    The whole answer (`need` 0): the first value with a plain query, then all the
    others through one cursor, which reads the events once more where chunks would
    each read them all again. A period with a single value is the single query
    (_window_plan), planned without a condition on the values; when that value is
    null (nobody set the tag in the period) and the tag is the report's only tag
    key, the same query over `untagged`, the arguments of the report without it
    (the roll-ups, for a period long enough) but for its column, null in every row
    (a tag key misspelt: 0.85 s from the events, 0.05 s from a month's roll-ups).
    Exact in this snapshot, where the list of values found none; the tag's name is
    not given to it, so the events read to correct its ends count under null
    too."""
    lead = keys[0]
    kind = "tag" if _is_tag(lead) else lead
    name = lead.removeprefix(TAG_PREFIX) if kind == "tag" else None
    columns = sql_keys(keys)
    column = columns[0]

    def row_key(row: Any) -> tuple[tuple[bool, str], ...]:
        return order_key(row[c] for c in columns)

    def part(lo: str | None, hi: str | None, null: bool) -> tuple[Any, ...]:
        # (lo None: no named value; hi None: no end.)
        return (*args, lo, hi, null, kind)

    def chunk_part(chunk: list[str | None]) -> tuple[Any, ...]:
        named = [v for v in chunk if v is not None]
        if None in chunk:
            # Null is last: a stretch that reaches it has no end (the values
            # listed in this snapshot have none between; those of a cursor
            # may, from rows added since).
            return part(named[0] if named else None, None, True)
        return part(named[0], named[-1], False)

    def after_value(values: list[str | None], value: str | None) -> list[str | None]:
        """Those of `values` (in order) after `value`, as many as ride in a cursor."""
        out: list[str | None] = []
        chars = 0
        for v in values:
            if order_key([v]) <= order_key([value]):
                continue
            chars += len(v or "")
            if len(out) == AHEAD_MAX or chars > AHEAD_CHARS:
                break
            out.append(v)
        return out

    async def plan(conn: Any) -> AsyncIterator[PlanStep]:
        timeout = db.client_timeout(ledger.config.report_statement_timeout_ms)

        async def listing(past: str | None, limit: int) -> tuple[list[str | None], bool]:
            """Up to `limit` values after `past` (from the first when None), and
            whether more follow."""
            rows = await conn.fetch(
                ledger.queries["report_lead_values"],
                *(start, end, kind, name, limit + 1, past),
                timeout=timeout,
            )
            return [row["v"] for row in rows[:limit]], len(rows) > limit

        # Rows after the cursor read so far (None once a chunk overflowed its
        # plain read: its rest comes through a cursor this plan does not count).
        got: int | None = 0
        previous: Any = None  # the lead value of the last row read

        async def read(
            chunk: list[str | None], accounts: list[int] | None = None, share: float = 1.0
        ) -> AsyncIterator[PlanStep]:
            """The chunk's rows (over `accounts` only, `share` of the employees,
            when given)."""
            nonlocal got
            extra: tuple[Any, ...]
            name, extra = "usage_report_range", ()
            if accounts is not None:
                name, extra = "usage_report_range_accounts", (accounts,)
            rows = await conn.fetch(
                ledger.queries[name], *chunk_part(chunk), WINDOW + 1, 0, *extra, timeout=timeout
            )
            # (As many rows as the whole value would have, for the rows per value.)
            counted.append((round(len(rows) / share), len(chunk)))
            head = rows[:WINDOW]
            if found is not None and got is not None and need:
                await learn(head, len(rows) > WINDOW)
            yield head
            if len(rows) > WINDOW:
                yield name, (*chunk_part(chunk), None, WINDOW, *extra)

        async def learn(head: list[Any], overflow: bool) -> None:
            """Count the chunk's rows after the cursor, and when the page ends in
            them (its last item and the one after it read), fill `found`."""
            nonlocal got, previous
            assert found is not None and got is not None
            skip = 0
            if after is not None and not counted[:-1]:
                bound = order_key(after)
                skip = bisect_right(head, bound, key=row_key)
            new = len(head) - skip
            if got + new < need:
                got = None if overflow else got + new
                if head:
                    previous = head[-1][column]
                return
            last = skip + need - 2 - got  # the page's last item, in head
            if last < skip:  # the last of the chunk before: its value's last row
                found.left, value = 0, previous
            else:
                value = head[last][column]
                end = last + 1
                while end < len(head) and head[end][column] == value:
                    end += 1
                if overflow and end == len(head):
                    # Its rows go on past the plain read: how many, not known.
                    got = None
                    return
                found.left = end - last - 1
            found.value = value
            rows, values = sum(n for n, _ in counted), sum(v for _, v in counted)
            found.per = max(1, -(-rows // values))
            found.values = after_value(known_values, value)
            if not found.values and found.left < need and value is not None and not listed_all:
                ahead, _ = await listing(value, AHEAD_MAX)
                found.values = after_value(ahead, value)
            got = None

        counted: list[tuple[int, int]] = []  # each chunk's rows and values
        # The values known in the report's order from the cursor's on, and
        # whether they run to the report's end.
        known_values: list[str | None] = []
        listed_all: bool = False
        # (A cursor among the rows of null that carries a Lookahead comes from a
        # page read in stretches, so values were set: the rows of null are read
        # as a stretch without listing them again, 0.25 s a page.)
        if after is None or (after[0] is None and untagged is not None and known is None):
            values, more = await listing(None, LEAD_VALUES_MAX if need else 2)
            if values == [None] and untagged is not None:
                async for step in _window_plan(ledger, untagged)(conn):
                    yield step
                return
            if after is not None:  # among the rows of null: theirs alone
                values, more = [None], False
            elif len(values) <= 1 and not more:
                async for step in _window_plan(ledger, args)(conn):
                    yield step
                return
        else:
            # The cursor's value, then (found when needed) those after it; none
            # after null (last).
            values, more = [after[0]], after[0] is not None
        known_values, listed_all = list(values), not more
        if not need:
            first, rest = values[0], values[1:]
            async for step in read([first]):
                yield step
            if first is not None and not rest and more:
                rest, _ = await listing(first, 1)
            if rest:
                lo = rest[0]
                yield "usage_report_range", (*part(lo, None, True), None, 0)
            return
        size = 1
        if after is not None and after[0] is not None and known is not None and known.values:
            # The cursor's value and, when its rows left fall short of the page,
            # the values after it the cursor names, as many as the rows per value
            # call for: one stretch. Those after it are listed afresh (the stretch
            # ends at a value; the next starts after it, in this snapshot).
            hinted = after_value(known.values, after[0])
            known_values = [after[0], *hinted]
            left = known.left if known.left is not None else 0
            per = max(1, known.per or 1)
            while size <= len(hinted) and left + (size - 1) * per < need:
                size += 1
            values = known_values[:size]
        # A page that reads its cursor's value alone, led by that value and then the
        # employee, reads the rows of the employees from the cursor's on when they
        # are few enough (RESTRICT_SHARE): all of the value's events are read all
        # the same, but only theirs summed.
        accounts: list[int] | None = None
        share = 1.0
        if size == 1 and after is not None and keys[1] == "employee" and after[1] is not None:
            row = await conn.fetchrow(
                ledger.queries["report_accounts_after"], after[1], timeout=timeout
            )
            if row["employees"] and row["after"] <= RESTRICT_SHARE * row["employees"]:
                accounts = list(row["ids"] or [])
                share = max(row["after"], 1) / row["employees"]
        # The last value listed (named whenever more follow: null is last).
        past = values[-1]
        while values or more:
            if not values:
                values, more = await listing(past, LEAD_VALUES_MAX)
                if not values:
                    return
                known_values = [v for v in known_values if order_key([v]) <= order_key([past])]
                known_values += values
                listed_all = not more
                past = values[-1]
            chunk, values = values[:size], values[size:]
            async for step in read(chunk, accounts, share):
                yield step
            accounts, share = None, 1.0
            if None in chunk:  # (read to the end)
                return
            rows, _ = counted[-1]
            per_value = max(1, -(-rows // len(chunk)))
            wanted = -(-max(1, need - sum(n for n, _ in counted)) // per_value)
            size = max(1, min(2 * size, wanted, WINDOW // per_value))

    return plan


async def usage_report_page(
    ledger: Database,
    start: datetime,
    end: datetime,
    keys: tuple[str, ...],
    after: list[str | None] | None,
    limit: int,
    known: Lookahead | None = None,
) -> tuple[list[Item], list[str | None] | None, Lookahead | None]:
    """One JSON page: at most `limit` items after `after`, the keys of its last item
    when more follow (the next page's `after`), else None, and what the page learnt
    of the rows after it for the next one, when it did (a report read a stretch of
    values at a time: Lookahead, from the cursor's `known`). The read stops at the
    item after the page (its query is closed)."""
    out: list[Item] = []
    found = Lookahead()
    pages = usage_report_after(
        ledger, start, end, keys, after, first_chunk=limit + 1, known=known, found=found
    )
    try:
        async for items in pages:
            out.extend(items[: limit + 1 - len(out)])
            if len(out) > limit:
                break
    finally:
        await pages.aclose()
    if len(out) <= limit:
        return out, None, None
    last = out[limit - 1]
    learnt = found.left is not None and found.value == last[keys[0]]
    return out[:limit], [last[k] for k in keys], found if learnt else None


# The export (issue 16, the employee,model,project report under a second): the
# keys it answers, in this order, over whole months of roll-ups.
EXPORT_KEYS = ("employee", "model", "project")


def export_span(
    start: datetime, end: datetime, keys: tuple[str, ...]
) -> tuple[datetime, datetime] | None:
    """The month starts whose roll-ups answer [start, end) when the `usage_export`
    query answers this report (service/sql/usage_export.sql: the rows walked in the
    answer's order and written by PostgreSQL as JSON or CSV lines), else None (the
    general usage_report). It answers exactly the EXPORT_KEYS when both the usage and
    the debits read their monthly roll-ups: whole UTC months, or a longer period whose
    nearest midnights are month starts (corrected at its ends)."""
    if keys != EXPORT_KEYS:
        return None
    if source_for(start, end, keys) != "monthly" or spend_source_for(start, end, keys) != "monthly":
        return None
    return usage_span(start, end)


async def usage_export_chunks(
    ledger: Database, start: datetime, end: datetime, span: tuple[datetime, datetime], form: str
) -> AsyncIterator[bytes]:
    """The export's body as PostgreSQL writes it, chunk by chunk in the answer's order
    (Database.copy_slow: the service decodes no row). `form` 'csv': the CSV rows after
    the header, byte for byte what to_csv writes (usage_export_csv, COPY's CSV with CRLF
    line ends); 'json': the items' JSON objects, comma-separated within a chunk (the
    caller puts the commas between chunks and the brackets around)."""
    assert form in ("json", "csv"), form
    chunks = ledger.copy_slow(
        f"usage_export_{form}",
        ledger.config.report_statement_timeout_ms,
        start,
        end,
        *span,
        form="csv" if form == "csv" else "text",
        jit=False,
        work_mem_mb=REPORT_WORK_MEM_MB,
    )
    async for chunk in chunks:
        if chunk:
            yield csv_line_ends(chunk) if form == "csv" else json_lines(chunk)


def csv_line_ends(chunk: bytes) -> bytes:
    """COPY's CSV rows (whole rows, each ending in LF) with the CRLF row ends of
    Python's csv writer. A line feed inside a quoted cell stays as it is: only one
    outside quotes (an even number of double quotes before it in its row, doubled
    quotes counting two) ends a row."""
    if b'"' not in chunk:
        return chunk.replace(b"\n", b"\r\n")
    out, quoted = [], False
    parts = chunk.split(b"\n")
    for part in parts[:-1]:
        quoted ^= part.count(b'"') % 2 == 1
        out.append(part + (b"\n" if quoted else b"\r\n"))
    assert not quoted and parts[-1] == b"", "COPY sends whole rows"
    return b"".join(out)


def json_lines(chunk: bytes) -> bytes:
    """COPY's text rows of JSON objects (whole rows, each ending in LF) as the objects
    comma-separated. COPY's text format escapes a backslash as two and the control
    characters, which a JSON text holds only escaped (so as backslashes)."""
    assert chunk.endswith(b"\n"), "COPY sends whole rows"
    if b"\\" in chunk:
        chunk = chunk.replace(b"\\\\", b"\\")
    return chunk[:-1].replace(b"\n", b",")


# A spreadsheet reads a cell starting with one of these as a formula
# (OWASP, CSV injection): such text cells get a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: null is empty, text that would start a formula
    is neutralised, numbers are written as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(
    keys: tuple[str, ...], items: list[Item] | list[dict[str, Any]], header: bool = True
) -> str:
    """A header row (keys, then TOTALS) and one row per item; null is empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    columns = (*keys, *TOTALS)
    if header:
        writer.writerow(columns)
    # An item's values in its columns' order (the keys, then TOTALS), read at once:
    # a streamed item's (a struct) by astuple, a dict's (_items) by name.
    n = len(keys)
    rows: Any
    if items and isinstance(items[0], dict):
        rows = map(itemgetter(*columns), items)
    else:
        rows = map(msgspec.structs.astuple, items)  # type: ignore[arg-type]  # why: streamed items are _item_type's structs
    # Only the keys are text that may need neutralising; the totals are ints.
    if n == 1:
        writer.writerows([csv_cell(r[0]), *r[1:]] for r in rows)
    else:
        writer.writerows([*map(csv_cell, r[:n]), *r[n:]] for r in rows)
    return out.getvalue()
