"""Finance reports (README, Reports): liability, compensation, forecast and
efficiency. The SQL is in service/sql/finance.sql; this package picks the
periods and pages, folds wallet rows into groups, values credits in money
(Decimal, never float) and runs the depletion forecast.

One module a report (`liability`, `compensation`, `forecast`, `efficiency`),
`queries` for how each reads its query (a page, or a stream for CSV) and
`csv_export` for the CSV answers. Callers import from `service.finance`.
"""

from __future__ import annotations

from service.finance.compensation import (
    COMPENSATION_COLUMNS,
    CreditValue,
    compensation,
    compensation_stream,
)
from service.finance.csv_export import csv_rows, stream_csv
from service.finance.efficiency import (
    EFFICIENCY_COLUMNS,
    EFFICIENCY_GROUPS,
    efficiency,
    efficiency_stream,
)
from service.finance.forecast import FORECAST_WINDOW_DAYS, depletion, forecast, forecast_item
from service.finance.liability import (
    LIABILITY_GROUPS,
    LIABILITY_TOTALS,
    liability,
    liability_by_employee_stream,
)

__all__ = [
    "COMPENSATION_COLUMNS",
    "EFFICIENCY_COLUMNS",
    "EFFICIENCY_GROUPS",
    "FORECAST_WINDOW_DAYS",
    "LIABILITY_GROUPS",
    "LIABILITY_TOTALS",
    "CreditValue",
    "compensation",
    "compensation_stream",
    "csv_rows",
    "depletion",
    "efficiency",
    "efficiency_stream",
    "forecast",
    "forecast_item",
    "liability",
    "liability_by_employee_stream",
    "stream_csv",
]
