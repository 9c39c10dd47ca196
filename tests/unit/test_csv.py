"""CSV answers cannot carry spreadsheet formulas (OWASP CSV injection)."""

from __future__ import annotations

import csv
import io

from service.reports import TOTALS, to_csv


def test_cells_that_start_a_formula_are_neutralised() -> None:
    """A text cell starting with =, +, -, @, tab or carriage return gets a
    leading apostrophe, so a spreadsheet shows it as text; other text and
    numbers are written as they are."""
    dangerous = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    items = [{"project": p, **{t: 1 for t in TOTALS}} for p in [*dangerous, "plain", "a=b"]]
    rows = list(csv.reader(io.StringIO(to_csv(("project",), items)), strict=True))
    cells = [row[0] for row in rows[1:]]
    assert cells == [f"'{p}" for p in dangerous] + ["plain", "a=b"]
    assert all(row[1:] == ["1"] * len(TOTALS) for row in rows[1:])
