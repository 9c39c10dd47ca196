"""Wire types and request plumbing shared by the controllers.

Limits live on the types (STYLE.md habit 7), so the OpenAPI schema states
them and msgspec enforces them before any handler runs.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
import zoneinfo
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.datastructures import State
from litestar.params import QueryParameter

from service import errors
from service.journal import Context, Database, Outcome, request_hash

MAX_AMOUNT = 2**53
REF_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
ADDRESS_PATTERN = r"^(employee|department|system):[a-z0-9][a-z0-9._-]{0,63}$"
WALLET_PATTERN = r"^(employee|department):[a-z0-9][a-z0-9._-]{0,63}$"

Amount = Annotated[
    int,
    msgspec.Meta(
        gt=0,
        le=MAX_AMOUNT,
        description="Credits: a positive integer no larger than 2^53.",
        examples=[1000],
    ),
]
Ref = Annotated[
    str,
    msgspec.Meta(
        pattern=REF_PATTERN, description="`[a-z0-9][a-z0-9._-]{0,63}`", examples=["e-1042"]
    ),
]
Address = Annotated[
    str,
    msgspec.Meta(
        pattern=ADDRESS_PATTERN,
        description="An account address `type:ref`.",
        examples=["employee:e-1042", "department:eng", "system:issuance"],
    ),
]
# What debits, reservations and usage draw on: a wallet or a department
# account, never a system account.
Wallet = Annotated[
    str,
    msgspec.Meta(
        pattern=WALLET_PATTERN,
        description="A wallet or a department account `employee:ref` or `department:ref`.",
        examples=["employee:e-1042", "department:eng"],
    ),
]
# What grants and grant programs are funded by.
FUNDER_PATTERN = r"^(system:issuance|department:[a-z0-9][a-z0-9._-]{0,63})$"
Funder = Annotated[
    str,
    msgspec.Meta(
        pattern=FUNDER_PATTERN,
        description="`system:issuance` or a department account `department:ref`.",
        examples=["system:issuance", "department:eng"],
    ),
]
Memo = Annotated[str, msgspec.Meta(max_length=500)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
MetadataValue = str | int | float | bool | None
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(min_length=1, max_length=64)], MetadataValue],
    msgspec.Meta(max_length=50, description="Free-form key/values, at most 50 keys."),
]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True, description="RFC 3339 with offset.")]

# A report's period, [from, to): the query parameters every report and the
# wallet's spend take (the 400-day bound is checked by each report).
From = Annotated[
    datetime, QueryParameter(name="from", description="Start, included (RFC 3339 with offset).")
]
To = Annotated[datetime, QueryParameter(description="End, excluded; at most 400 days on.")]

# The query parameters of every paginated list: its page size and the
# opaque cursor of its previous page (`next_cursor`).
LimitParam = Annotated[int, QueryParameter(ge=1, le=500, description="Page size, 1..500.")]
CursorParam = Annotated[str | None, QueryParameter(description="Opaque cursor from next_cursor.")]

# Items per batch request (grants:batch, usage:batch): bounded work per
# database transaction.
MAX_BATCH = 1000

# What a route that names an account may answer when there is none: the
# address's type decides which (errors.not_found_for).
ADDRESS_NOT_FOUND = (errors.AccountNotFound, errors.EmployeeNotFound, errors.DepartmentNotFound)

# Reports answer JSON, or CSV to a caller whose Accept prefers it; imports
# take CSV.
CSV = "text/csv"
JSON = "application/json"
CSV_UTF8 = f"{CSV}; charset=utf-8"

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255


def wants_csv(request: Request[Any, Any, Any]) -> bool:
    """Whether the caller's Accept prefers CSV to JSON (JSON when it says neither)."""
    return request.accept.best_match([JSON, CSV], default=JSON) == CSV


def ledger_of(state: State) -> Database:
    ledger: Database = state.ledger
    return ledger


async def provide_ledger(state: State) -> Database:
    return ledger_of(state)


def context_of(request: Request[Any, Any, Any]) -> Context:
    principal = request.state.principal
    return Context(
        caller=principal.id,
        actor=principal.id,
        request_id=request.state.request_id,
        admin="admin" in principal.roles,
        departments=principal.departments,
        rate_limit=principal.rate_limit,
    )


def idempotency_key(request: Request[Any, Any, Any], *, required: bool = True) -> str | None:
    """The caller's Idempotency-Key: 1..255 printable ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        if required:
            raise errors.IdempotencyKeyRequired()
        return None
    if not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY) or not all(0x20 <= ord(c) <= 0x7E for c in key):
        raise errors.IdempotencyKeyRequired(
            "Idempotency-Key must be 1 to 255 printable ASCII characters."
        )
    return key


def parse_public_id(value: str, prefix: str, not_found: type[errors.LedgerError]) -> uuid.UUID:
    """`txn_<32 hex>` to a UUID; anything else is simply not found."""
    if not value.startswith(prefix):
        raise not_found(f"no {prefix.rstrip('_')} {value}")
    try:
        return uuid.UUID(hex=value[len(prefix) :])
    except ValueError:
        raise not_found(f"no {prefix.rstrip('_')} {value}") from None


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(value)).decode().rstrip("=")


# What a cursor may hold once decoded: the queries take these as bigint
# (ids, offsets), text or a timestamp with an id. Anything else, a number
# beyond a bigint above all, is an invalid cursor rather than a database error.
CursorId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
CursorValue = CursorId | str | list[str] | None


def invalid_cursor() -> errors.InvalidRequest:
    """What every list answers to a cursor it did not hand out."""
    return errors.InvalidRequest("cursor is not valid", errors=[{"path": "cursor"}])


def decode_cursor(cursor: str | None, shape: Any = CursorValue) -> Any:
    """What encode_cursor encoded, checked against `shape` (a msgspec type); anything
    else is 400 invalid_request."""
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return msgspec.json.decode(base64.urlsafe_b64decode(padded), type=shape)
    except (binascii.Error, msgspec.DecodeError, ValueError, RecursionError):
        raise invalid_cursor() from None


def text_cursor(cursor: str | None) -> str | None:
    """A cursor that carries the last item's text key (an id, a name)."""
    after = decode_cursor(cursor)
    if after is not None and not isinstance(after, str):
        raise invalid_cursor()
    return after


def int_cursor(cursor: str | None) -> int | None:
    """A cursor that carries the last item's bigint id."""
    after = decode_cursor(cursor)
    if after is not None and not isinstance(after, int):
        raise invalid_cursor()
    return after


def uuid_cursor(cursor: str | None) -> uuid.UUID | None:
    """A cursor that carries the last item's UUID."""
    after = decode_cursor(cursor)
    try:
        return uuid.UUID(after) if after is not None else None
    except (ValueError, TypeError, AttributeError):
        raise invalid_cursor() from None


class Page(msgspec.Struct, frozen=True):
    # The shape of every paginated list: a subclass narrows `items` (msgspec
    # keeps a redefined field in its place, so `next_cursor` stays second).
    # No docstring: a subclass would show it as its own description.
    items: list[Any]
    next_cursor: str | None


def page(rows: list[Any], limit: int, cursor_of: Any = None) -> Any:
    """{items, next_cursor} from rows fetched with LIMIT limit+1, each an
    `item` and its `cursor`. Typed Any: a route returns it as its Page
    struct, which documents the rows' JSON built in SQL."""
    more = len(rows) > limit
    rows = rows[:limit]
    items = [row["item"] for row in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]["cursor"]
        next_cursor = encode_cursor(cursor_of(last) if cursor_of else last)
    return {"items": items, "next_cursor": next_cursor}


def page_of(items: list[Any], next_key: Any) -> Any:
    """{items, next_cursor} of a page whose query gave the next page's key
    (None: the last page). Typed Any, as page()."""
    return {
        "items": items,
        "next_cursor": encode_cursor(next_key) if next_key is not None else None,
    }


_REF = re.compile(REF_PATTERN)


def check_ref(value: str, name: str) -> None:
    """Path parameters get the same format check as body fields."""
    if not _REF.match(value):
        raise errors.invalid(name, f"must match {REF_PATTERN}", f"{name} must match {REF_PATTERN}")


def check_time_zone(name: str, path: str) -> None:
    """A time zone the service knows (IANA), which a schema cannot check."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        message = f"unknown IANA time zone {name!r}"
        raise errors.invalid(path, message) from None


def check_address(value: str, name: str = "address") -> None:
    if not re.match(ADDRESS_PATTERN, value):
        raise errors.invalid(
            name, f"must match {ADDRESS_PATTERN}", f"{name} must be an account address type:ref"
        )


async def run_operation(
    request: Request[Any, Any, Any],
    ledger: Database,
    op: str,
    payload: Any,
    *,
    args: dict[str, Any] | None = None,
    success_status: int,
) -> Response[Any]:
    """The one way a state-changing request reaches the ledger: its
    Idempotency-Key, the fingerprint of its body, one SQL call, and the
    stored-or-fresh answer. `args` defaults to the decoded body."""
    key = idempotency_key(request)
    outcome = await operation_outcome(
        request, ledger, op, payload, key=key, args=args, success_status=success_status
    )
    return replay_response(outcome)


async def operation_outcome(
    request: Request[Any, Any, Any],
    ledger: Database,
    op: str,
    payload: Any,
    *,
    key: str | None,
    args: dict[str, Any] | None = None,
    success_status: int,
) -> Outcome:
    """run_operation's SQL call, for a route that reads its Idempotency-Key
    before other checks (`key`) or adds to the stored answer."""
    # The body's builtin form, made once: the fingerprint's and the SQL's.
    body = msgspec.to_builtins(payload)
    return await ledger.execute(
        op,
        body if args is None else args,
        ctx=context_of(request),
        key=key,
        fingerprint=request_hash(request.method, request.url.path, body),
        success_status=success_status,
    )


def object_args(
    name: str,
    public_id: str,
    prefix: str,
    not_found: type[errors.LedgerError],
    payload: Any,
) -> dict[str, Any]:
    """The arguments of an operation on the object a path names: its public
    id as given (`name`, for answers and errors), its UUID (`name_id`, for
    the lookup; another form is simply not found) and the body's fields."""
    uid = parse_public_id(public_id, prefix, not_found)
    return {name: public_id, f"{name}_id": str(uid), **msgspec.to_builtins(payload)}


def put_response(result: dict[str, Any]) -> Response[Any]:
    """A create-or-update's answer (PUT): 201 when the call created the object,
    200 when it updated it."""
    return Response(result["body"], status_code=201 if result["created"] else 200)


def replay_response(outcome: Outcome) -> Response[Any]:
    """The operation's stored or fresh response, marked when replayed."""
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else {}
    return Response(outcome.body, status_code=outcome.status, headers=headers)
