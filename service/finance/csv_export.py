"""Finance reports as CSV: written page by page, money as numbers."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from decimal import Decimal
from typing import Any

from service.reports import csv_cell


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
