"""CSV imports of employees and grants (README, Bulk import).

The service parses and format-checks each row in Python (the same msgspec
types as the JSON API, so a CSV row is refused for exactly what a JSON body
would be), then hands all the valid rows to one set-based SQL call:
tl_import_employees (one statement per kind of change) or tl_grant_batch
(the grants' fast path). Each row is idempotent by its natural key (the
employee id; the grant `key`), so uploading a file again after a timeout
changes nothing. A dry run makes the same call in a transaction that is
rolled back, so it reports exactly what a real run would do.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from service import errors
from service.api.common import Name, Ref
from service.api.grants import BatchGrantIn, grant_args
from service.journal import request_hash

Email = Annotated[str, msgspec.Meta(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]


class EmployeeRow(msgspec.Struct, forbid_unknown_fields=True):
    id: Ref
    name: Name
    email: Email
    department: Ref
    status: Literal["active"] | None = None


# A grant row is exactly an item of POST /v1/grants:batch (metadata aside,
# which a CSV cell cannot hold): the same key means the same grant.
GrantRow = BatchGrantIn


@dataclass
class Parsed:
    """The rows that passed the format checks (with their line) and the rejected ones."""

    rows: int = 0
    valid: list[tuple[int, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def _columns(kind: type[msgspec.Struct]) -> tuple[set[str], set[str]]:
    info = msgspec.structs.fields(kind)
    required = {f.name for f in info if f.required}
    return required, {f.name for f in info}


def _records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) for each non-empty record."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    last = 0
    for record in reader:
        start = last + 1
        last = reader.line_num
        if record and any(cell != "" for cell in record):
            yield start, record


def parse(text: str, kind: type[msgspec.Struct], max_rows: int) -> Parsed:
    """Check the header (every required column, no unknown or repeated one) as a
    whole-file 400, then each row: a wrong number of fields or a value the JSON API
    would refuse rejects that row (`invalid_request`, line and detail). Empty cells
    are absent fields."""
    if "\x00" in text:
        raise errors.invalid("$", "the CSV must not contain NUL characters")
    records = _records(text)
    try:
        first = next(records, None)
    except csv.Error as exc:
        raise errors.invalid("$", f"line 1: {exc}") from None
    if first is None:
        raise errors.invalid("$", "the CSV needs a header row")
    header = [name.strip() for name in first[1]]
    required, known = _columns(kind)
    unknown = [name for name in header if name not in known]
    if unknown:
        raise errors.invalid(
            "$", f"unknown column {unknown[0]!r}; columns are {', '.join(sorted(known))}"
        )
    if len(set(header)) != len(header):
        raise errors.invalid("$", "a column appears twice in the header")
    missing = sorted(required - set(header))
    if missing:
        raise errors.invalid("$", f"missing column {missing[0]!r}")
    out = Parsed()
    try:
        for line, record in records:
            out.rows += 1
            if out.rows > max_rows:
                raise errors.invalid("$", f"a CSV import takes at most {max_rows} rows")
            if len(record) != len(header):
                out.rejected.append(
                    _row_error(line, f"expected {len(header)} fields, found {len(record)}")
                )
                continue
            values = {name: cell for name, cell in zip(header, record, strict=True) if cell != ""}
            try:
                out.valid.append((line, msgspec.convert(values, kind, strict=False)))
            except msgspec.ValidationError as exc:
                out.rejected.append(_row_error(line, str(exc)))
    except csv.Error as exc:
        raise errors.invalid("$", f"malformed CSV: {exc}") from None
    return out


def employee_rows(parsed: Parsed) -> list[dict[str, Any]]:
    return [
        {"line": line, "id": r.id, "name": r.name, "email": r.email, "department": r.department}
        for line, r in parsed.valid
    ]


def grant_items(parsed: Parsed) -> list[tuple[int, dict[str, Any]]]:
    """(line, batch item) per valid row, the item as POST /v1/grants:batch makes it
    (so a key used by the batch endpoint and by an import means the same grant)."""
    items = []
    for line, row in parsed.valid:
        args = grant_args(row)
        digest = request_hash("POST", "/v1/grants", args)
        items.append((line, {"key": row.key, "hash": digest.hex(), "grant": args}))
    return items


def summary(parsed: Parsed, result: dict[str, Any]) -> dict[str, Any]:
    """The answer: counts, and every rejected row (format and database) by line."""
    rejected = sorted(parsed.rejected + list(result.get("rejected", [])), key=lambda r: r["line"])
    return {
        "rows": parsed.rows,
        "created": int(result.get("created", 0)),
        "updated": int(result.get("updated", 0)),
        "duplicate": int(result.get("duplicate", 0)),
        "rejected": rejected,
    }


def grant_result(
    items: list[tuple[int, dict[str, Any]]], results: list[dict[str, Any]]
) -> dict[str, Any]:
    """tl_grant_batch's per-key results as import counts. A key repeated in the file
    with the same values is a duplicate of its first row, with others a rejection."""
    out: dict[str, Any] = {"created": 0, "duplicate": 0, "rejected": []}
    for (line, _), res in zip(items, results, strict=True):
        if res["status"] == "created":
            out["created"] += 1
        elif res["status"] == "duplicate":
            out["duplicate"] += 1
        else:
            out["rejected"].append(
                {"line": line, "code": res.get("code"), "detail": res.get("detail")}
            )
    return out


def split_repeated_keys(
    items: list[tuple[int, dict[str, Any]]],
) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]]]:
    """The first row of each key, and the later rows repeating a key (the batch
    function takes each key once)."""
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    repeats = []
    for line, item in items:
        if item["key"] in first:
            repeats.append((line, item))
        else:
            first[item["key"]] = (line, item)
    return list(first.values()), repeats


def repeated_key_results(
    firsts: list[tuple[int, dict[str, Any]]], repeats: list[tuple[int, dict[str, Any]]]
) -> dict[str, Any]:
    by_key = {item["key"]: (line, item) for line, item in firsts}
    out: dict[str, Any] = {"created": 0, "duplicate": 0, "rejected": []}
    for line, item in repeats:
        first_line, first = by_key[item["key"]]
        if first["hash"] == item["hash"]:
            out["duplicate"] += 1
        else:
            out["rejected"].append(
                {
                    "line": line,
                    "code": "idempotency_key_reused",
                    "detail": f"key {item['key']} is on line {first_line} with other values",
                }
            )
    return out


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"created": 0, "updated": 0, "duplicate": 0, "rejected": []}
    for part in parts:
        for name in ("created", "updated", "duplicate"):
            out[name] += int(part.get(name, 0))
        out["rejected"] += part.get("rejected", [])
    return out


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


Progress = Callable[[int], None]


def _row_error(line: int, detail: str) -> dict[str, Any]:
    return {"line": line, "code": "invalid_request", "detail": detail}
