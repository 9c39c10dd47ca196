"""The closed set of error codes, and the one place database errors become them.

Each code is a LedgerError subclass whose docstring is its default detail.
One table (TABLE) states every code once, in precedence order (when several
checks fail, the first in this order answers): the classes take their code,
status, title, SQLSTATE and detail from it, and the OpenAPI document's and the
README's tables of error codes are made from it (`python -m service.errors`
prints the README's). Database errors are translated by SQLSTATE (our
PL/pgSQL functions raise class TL with their own codes), never by message
text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import asyncpg


class LedgerError(Exception):
    """An expected, operating error: logged without a traceback."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    # The SQLSTATE our SQL functions raise for this code, if any.
    sqlstate: ClassVar[str | None] = None
    headers: dict[str, str]

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or (self.__doc__ or self.title).strip()
        self.extra = extra
        self.headers = {}
        super().__init__(self.detail)

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem+json body."""
        body: dict[str, Any] = {
            "type": f"https://tokenledger.internal/problems/{self.code.replace('_', '-')}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        for key, value in self.extra.items():
            # `status` is the HTTP status only (RFC 9457); no extra can
            # override a standard member.
            if key not in body:
                body[key] = value
        return body


# The classes of the codes. Each takes its code, status, title, SQLSTATE and
# default detail (its docstring) from its row in TABLE below; they are named
# here so that raising, catching and annotating them is type-checked, one a
# line (a list of names), those with behaviour of their own after them.
# fmt: off
class InvalidRequest(LedgerError): ...
class IdempotencyKeyRequired(LedgerError): ...
class Unauthenticated(LedgerError): ...
class Forbidden(LedgerError): ...
class PayloadTooLarge(LedgerError): ...
class AccountNotFound(LedgerError): ...
class EmployeeNotFound(LedgerError): ...
class DepartmentNotFound(LedgerError): ...
class TransactionNotFound(LedgerError): ...
class ReservationNotFound(LedgerError): ...
class LotNotFound(LedgerError): ...
class GrantProgramNotFound(LedgerError): ...
class ApprovalNotFound(LedgerError): ...
class UnknownModel(LedgerError): ...
class WebhookNotFound(LedgerError): ...
class InsufficientCredits(LedgerError): ...
class AccountClosed(LedgerError): ...
class AssetMismatch(LedgerError): ...
class AlreadyReversed(LedgerError): ...
class ApprovalRequired(LedgerError): ...
class NotApprovable(LedgerError): ...
class BalanceLimitExceeded(LedgerError): ...
class IdempotencyKeyInProgress(LedgerError): ...
class LimitExceeded(LedgerError): ...
class ModelNotAllowed(LedgerError): ...
class IdempotencyKeyReused(LedgerError): ...
class RateLimited(LedgerError): ...
class Unavailable(LedgerError): ...
# fmt: on


class NotFound(LedgerError):
    """No such route."""

    # Litestar's own 404 for an unknown route (service/problems.py): not one
    # of the codes an operation answers, so not in TABLE.
    code, status, title = "not_found", 404, "Not found"


class MethodNotAllowed(LedgerError):
    """This route does not take that method."""

    code, status, title = "method_not_allowed", 405, "Method not allowed"


class ResourceNotActive(LedgerError):
    """A resource whose state forbids the operation; its state is the extra
    `<resource>_status` (the SQL functions, and 409s stored before this
    name, call it `status`, which is the HTTP status in a problem)."""

    state_extra: ClassVar[str]

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        if "status" in extra:
            extra.setdefault(self.state_extra, extra.pop("status"))
        super().__init__(detail, **extra)


class ReservationNotActive(ResourceNotActive):
    state_extra = "reservation_status"


class LotNotActive(ResourceNotActive):
    state_extra = "lot_status"


class KeyRateLimited(LedgerError):
    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        # The SQL answers when the key's minute ends (extra.retry_after).
        self.headers["Retry-After"] = str(extra.get("retry_after", 60))


@dataclass(frozen=True)
class Code:
    """One error code: its class, the `code` and HTTP `status` it answers
    with, its problem `title`, the SQLSTATE our SQL functions raise for it
    (class TL, if any), its default `detail`, and `when` it answers (the
    README's table, Errors)."""

    cls: type[LedgerError]
    code: str
    status: int
    title: str
    sqlstate: str | None
    detail: str
    when: str


# The closed set of codes in precedence order: when several checks fail, the
# first answers. The classes, the OpenAPI document's error table
# (service.openapi) and the README's (markdown_table) come from it.
# fmt: off
TABLE: tuple[Code, ...] = (
    Code(InvalidRequest, "invalid_request", 400, "Invalid request", "TLD01",
         "The request is malformed; see `errors` for the offending fields.",
         "malformed body, unknown field, bad amount, bad id or address; `errors: [{path, "
         "message}]` names the JSON path"),
    Code(IdempotencyKeyRequired, "idempotency_key_required", 400, "Idempotency-Key required", None,
         # Kept as served since it was a docstring, wrapped mid-sentence.
         "This request changes state and needs an Idempotency-Key header of 1 to 255 printable"
         "\n    ASCII characters.",
         "a state-changing `POST` without a valid `Idempotency-Key`"),
    Code(Unauthenticated, "unauthenticated", 401, "Unauthenticated", None,
         "A valid bearer token is required.",
         "missing, unknown, revoked or invalid token; with `WWW-Authenticate`"),
    Code(Forbidden, "forbidden", 403, "Forbidden", "TLD43",
         "The caller's role may not do this.",
         "the caller's role may not use this route, or a service key charges outside its scopes "
         "(sources, account types, departments)"),
    Code(PayloadTooLarge, "payload_too_large", 413, "Payload too large", None,
         "The request body is larger than the configured limit.",
         "body over `TOKENLEDGER_MAX_BODY_BYTES`"),
    Code(AccountNotFound, "account_not_found", 404, "Account not found", "TLA01",
         "No account has that address.",
         "no account at that address"),
    Code(EmployeeNotFound, "employee_not_found", 404, "Employee not found", "TLA02",
         "No employee has that id.",
         "no such employee (also for `employee:` addresses)"),
    Code(DepartmentNotFound, "department_not_found", 404, "Department not found", "TLA03",
         "No department has that id.",
         "no such department (also for `department:` addresses)"),
    Code(TransactionNotFound, "transaction_not_found", 404, "Transaction not found", "TLA04",
         "No transaction has that id.",
         "no such transaction"),
    Code(ReservationNotFound, "reservation_not_found", 404, "Reservation not found", "TLA05",
         "No reservation has that id.",
         "no such reservation"),
    Code(LotNotFound, "lot_not_found", 404, "Lot not found", "TLA06",
         "No lot has that id.",
         "no such lot"),
    Code(GrantProgramNotFound, "grant_program_not_found", 404, "Grant program not found", "TLA07",
         "No grant program has that id.",
         "no such grant program"),
    Code(ApprovalNotFound, "approval_not_found", 404, "Approval not found", "TLA16",
         "No such approval.",
         "no such approval"),
    Code(UnknownModel, "unknown_model", 404, "Unknown model", "TLA08",
         "No price is known for that model at that time.",
         "no price for that model"),
    Code(WebhookNotFound, "webhook_not_found", 404, "Webhook not found", "TLAW1",
         "No webhook (or delivery of it) has that id.",
         "no such webhook, or no such delivery of it"),
    Code(InsufficientCredits, "insufficient_credits", 409, "Insufficient credits", "TLB01",
         "The account's available credits do not cover the amount.",
         "available credits do not cover the amount; extras `available`, `requested`"),
    Code(AccountClosed, "account_closed", 409, "Account closed", "TLB02",
         "The account is closed; it takes no more writes.",
         "the wallet was closed by offboarding"),
    Code(AssetMismatch, "asset_mismatch", 409, "Asset mismatch", "TLB03",
         "The accounts hold different assets.",
         "the accounts hold different assets"),
    Code(ReservationNotActive, "reservation_not_active", 409, "Reservation not active", "TLB04",
         "The reservation is no longer active.",
         "capture, release or extend of a reservation that is captured, released or expired; "
         "extra `reservation_status`"),
    Code(LotNotActive, "lot_not_active", 409, "Lot not active", "TLB05",
         "The lot has nothing left to act on.",
         "the lot is spent, expired or voided; extra `lot_status` (`depleted`, `expired`, "
         "`voided`)"),
    Code(AlreadyReversed, "already_reversed", 409, "Already reversed", "TLB06",
         "The transaction was already reversed.",
         "the transaction was reversed before; extra `reversed_by`"),
    Code(ApprovalRequired, "approval_required", 409, "Approval required", None,
         "The grant is above the approval threshold: it waits for another caller's approval.",
         "(a CSV import row) the grant is above `TOKENLEDGER_APPROVAL_THRESHOLD` and waits in a "
         "pending approval; extra `approval`"),
    Code(NotApprovable, "not_approvable", 409, "Not approvable", "TLB16",
         "The approval is already decided, or the caller requested it (another caller must "
         "decide).",
         "the approval is already approved or rejected (extra `approval_status`), or the caller "
         "requested it: another caller must decide"),
    Code(BalanceLimitExceeded, "balance_limit_exceeded", 409, "Balance limit exceeded", None,
         "The write would take an account's balance past ±2^62 (sums could overflow).",
         "the write would take an account's balance past ±2^62 credits, where sums of balances "
         "could overflow; nothing is written"),
    Code(IdempotencyKeyInProgress, "idempotency_key_in_progress", 409,
         "Idempotency key in progress", "TLB07",
         "A request with this Idempotency-Key is still being processed; retry shortly.",
         "a request with the same key is still running past `lock_timeout`"),
    Code(LimitExceeded, "limit_exceeded", 409, "Limit exceeded", "TLB08",
         "The operation would pass a hard spend limit of the account or its department.",
         "the reservation, debit or capture would pass a hard spend limit of the account or its "
         "department; extras `account` (whose policy), `window`, `time_zone`, `limit`, `spent`, "
         "`remaining`, `requested`, `starts_at`, `resets_at`"),
    Code(ModelNotAllowed, "model_not_allowed", 409, "Model not allowed", "TLB09",
         "The spend policy of the account or its department does not allow this model.",
         "the spend policy of the account or its department does not allow the model (of an "
         "estimate, or named in `metadata.model`); extras `model`, `tier`"),
    Code(IdempotencyKeyReused, "idempotency_key_reused", 422, "Idempotency key reused", "TLC01",
         "This Idempotency-Key was used with a different request; nothing was changed.",
         "the key was used with a different request (method, path or body)"),
    Code(RateLimited, "rate_limited", 429, "Rate limited", None,
         "Too many requests from this caller; retry after the given seconds.",
         "over the caller's rate; with `Retry-After`"),
    Code(KeyRateLimited, "key_rate_limited", 429, "Key rate limited", "TLD29",
         "This key has spent its credits for the minute; retry after the given seconds.",
         "the service key's spend rate cap (`keys scope --rate-limit`, credits per minute) would "
         "be passed; with `Retry-After` (to the next minute) and extras `limit`, `spent`, "
         "`requested`; nothing is written"),
    Code(Unavailable, "unavailable", 503, "Service unavailable", None,
         "The service is overloaded or its database is unreachable; retry after the given "
         "seconds.",
         "pool exhausted, database unreachable or timing out; with `Retry-After`"),
)
# fmt: on


def _give_rows(table: tuple[Code, ...]) -> tuple[type[LedgerError], ...]:
    """Give each class its row; check that the table names each class of this
    module once (a class without a row would answer as `internal`)."""
    for row in table:
        row.cls.code, row.cls.status, row.cls.title = row.code, row.status, row.title
        row.cls.sqlstate = row.sqlstate
        row.cls.__doc__ = row.detail
    classes = tuple(row.cls for row in table)
    declared = {
        value
        for value in globals().values()
        if isinstance(value, type) and issubclass(value, LedgerError)
    } - {LedgerError, ResourceNotActive, NotFound, MethodNotAllowed}
    assert len(set(classes)) == len(classes), "a class has two rows in TABLE"
    assert set(classes) == declared, f"no row in TABLE for {declared - set(classes)}"
    return classes


ERRORS: tuple[type[LedgerError], ...] = _give_rows(TABLE)
BY_CODE: dict[str, type[LedgerError]] = {cls.code: cls for cls in ERRORS}
BY_SQLSTATE: dict[str, type[LedgerError]] = {cls.sqlstate: cls for cls in ERRORS if cls.sqlstate}

# Check constraints that keep balances within the limit (schema.sql).
_BALANCE_LIMIT_CONSTRAINTS = frozenset(
    {"accounts_posted_within_limit", "account_shards_posted_within_limit"}
)

# SQLSTATEs that mean "the database is overloaded or going away": answer 503
# so callers back off and retry, never a misleading 4xx.
_UNAVAILABLE_SQLSTATES = frozenset(
    {
        "57014",  # query_canceled (statement_timeout)
        "55P03",  # lock_not_available (lock_timeout)
        "53300",  # too_many_connections
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "08000",
        "08003",
        "08006",
        "08001",
        "08004",
        "40001",  # serialization_failure, after our bounded retries
        "40P01",  # deadlock_detected, after our bounded retries
    }
)


def not_found_for(address: str) -> LedgerError:
    """The 404 for an account address, by its type."""
    kind, _, ref = address.partition(":")
    if kind == "employee":
        return EmployeeNotFound(f"no employee {ref}", employee=ref)
    if kind == "department":
        return DepartmentNotFound(f"no department {ref}", department=ref)
    return AccountNotFound(f"no account {address}", account=address)


def from_stored(code: str, detail: str | None, extra: dict[str, Any]) -> LedgerError:
    """Rebuild the error a stored idempotent 409 described."""
    return BY_CODE[code](detail, **extra)


def _account_of(exc: asyncpg.PostgresError) -> str:
    """The account whose row failed the check: its address is in the row that
    PostgreSQL reports, for accounts; a shard row names the account by id."""
    detail = getattr(exc, "detail", None) or ""
    match = re.search(r"(employee|department|system):[a-z0-9][a-z0-9._-]*", detail)
    if match:
        return match.group(0)
    if getattr(exc, "table_name", None) == "account_shards":
        shard = re.search(r"\((\d+), (\d+),", detail)
        return (
            f"system account {shard.group(1)} (shard {shard.group(2)})"
            if shard
            else "a system account"
        )
    return "an account"


def translate(exc: BaseException) -> LedgerError | None:
    """Turn a database error into the LedgerError it stands for, or None when
    it is not an operating error (then it is a bug: 500 with a traceback)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        cls = BY_SQLSTATE.get(state)
        if cls is not None:
            extra: dict[str, Any] = {}
            hint = getattr(exc, "hint", None)
            if hint:
                try:
                    extra = json.loads(hint)
                except ValueError:
                    extra = {}
            return cls(getattr(exc, "detail", None), **extra)
        if state in _UNAVAILABLE_SQLSTATES:
            return Unavailable()
        constraint = getattr(exc, "constraint_name", None)
        if state == "23514" and constraint in _BALANCE_LIMIT_CONSTRAINTS:
            return BalanceLimitExceeded(
                f"{_account_of(exc)} would pass the balance limit of ±2^62 credits"
            )
        return None
    if isinstance(exc, (asyncpg.InternalClientError, OSError, TimeoutError)) or (
        isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg.DataError)
    ):
        # Pool acquire timeouts and connections lost or broken mid-statement:
        # whether the statement committed is unknown, so the caller retries
        # with the same Idempotency-Key and gets the one outcome.
        return Unavailable()
    return None


def invalid(path: str, message: str, detail: str | None = None) -> InvalidRequest:
    """The 400 for one offending field: `path` (a JSON path such as
    `$.grants[3].amount`, or a parameter's name) and what is wrong with it."""
    return InvalidRequest(detail or message, errors=[{"path": path, "message": message}])


def markdown_table() -> str:
    """The README's table of error codes (Errors), from TABLE."""
    rows = [f"| {row.status} | `{row.code}` | {row.when} |" for row in TABLE]
    return "\n".join(["| status | code | when |", "|---|---|---|", *rows])


if __name__ == "__main__":
    print(markdown_table())
