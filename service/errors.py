"""The closed set of error codes, and the one place database errors become them.

Each code is a LedgerError subclass whose docstring is its default detail
(API.md, Errors). The classes are listed in precedence order: when several
checks fail, the first in this order answers. Database errors are translated
by SQLSTATE (our PL/pgSQL functions raise class TL with their own codes),
never by message text.
"""

from __future__ import annotations

import json
import re
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


# 400 ----------------------------------------------------------------------
class InvalidRequest(LedgerError):
    """The request is malformed; see `errors` for the offending fields."""

    code, status, title, sqlstate = "invalid_request", 400, "Invalid request", "TLD01"


class IdempotencyKeyRequired(LedgerError):
    """This request changes state and needs an Idempotency-Key header of 1 to 255 printable
    ASCII characters."""

    code, status, title = "idempotency_key_required", 400, "Idempotency-Key required"


# 401 / 403 ----------------------------------------------------------------
class Unauthenticated(LedgerError):
    """A valid bearer token is required."""

    code, status, title = "unauthenticated", 401, "Unauthenticated"


class Forbidden(LedgerError):
    """The caller's role may not do this."""

    # Raised by SQL for a key limited to departments (tl_require_key_scope).
    code, status, title, sqlstate = "forbidden", 403, "Forbidden", "TLD43"


class PayloadTooLarge(LedgerError):
    """The request body is larger than the configured limit."""

    code, status, title = "payload_too_large", 413, "Payload too large"


# 404 ----------------------------------------------------------------------
class AccountNotFound(LedgerError):
    """No account has that address."""

    code, status, title, sqlstate = "account_not_found", 404, "Account not found", "TLA01"


class EmployeeNotFound(LedgerError):
    """No employee has that id."""

    code, status, title, sqlstate = "employee_not_found", 404, "Employee not found", "TLA02"


class DepartmentNotFound(LedgerError):
    """No department has that id."""

    code, status, title, sqlstate = "department_not_found", 404, "Department not found", "TLA03"


class TransactionNotFound(LedgerError):
    """No transaction has that id."""

    code, status, title, sqlstate = "transaction_not_found", 404, "Transaction not found", "TLA04"


class ReservationNotFound(LedgerError):
    """No reservation has that id."""

    code, status, title, sqlstate = "reservation_not_found", 404, "Reservation not found", "TLA05"


class LotNotFound(LedgerError):
    """No lot has that id."""

    code, status, title, sqlstate = "lot_not_found", 404, "Lot not found", "TLA06"


class GrantProgramNotFound(LedgerError):
    """No grant program has that id."""

    code, status, title, sqlstate = (
        "grant_program_not_found",
        404,
        "Grant program not found",
        "TLA07",
    )


class ApprovalNotFound(LedgerError):
    """No such approval."""

    code, status, title, sqlstate = "approval_not_found", 404, "Approval not found", "TLA16"


class UnknownModel(LedgerError):
    """No price is known for that model at that time."""

    code, status, title, sqlstate = "unknown_model", 404, "Unknown model", "TLA08"


class WebhookNotFound(LedgerError):
    """No webhook (or delivery of it) has that id."""

    code, status, title, sqlstate = "webhook_not_found", 404, "Webhook not found", "TLAW1"


class NotFound(LedgerError):
    """No such route."""

    code, status, title = "not_found", 404, "Not found"


class MethodNotAllowed(LedgerError):
    """This route does not take that method."""

    code, status, title = "method_not_allowed", 405, "Method not allowed"


# 409 ----------------------------------------------------------------------
class InsufficientCredits(LedgerError):
    """The account's available credits do not cover the amount."""

    code, status, title, sqlstate = "insufficient_credits", 409, "Insufficient credits", "TLB01"


class AccountClosed(LedgerError):
    """The account is closed; it takes no more writes."""

    code, status, title, sqlstate = "account_closed", 409, "Account closed", "TLB02"


class AssetMismatch(LedgerError):
    """The accounts hold different assets."""

    code, status, title, sqlstate = "asset_mismatch", 409, "Asset mismatch", "TLB03"


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
    """The reservation is no longer active."""

    code, status, title, sqlstate = "reservation_not_active", 409, "Reservation not active", "TLB04"
    state_extra = "reservation_status"


class LotNotActive(ResourceNotActive):
    """The lot has nothing left to act on."""

    code, status, title, sqlstate = "lot_not_active", 409, "Lot not active", "TLB05"
    state_extra = "lot_status"


class AlreadyReversed(LedgerError):
    """The transaction was already reversed."""

    code, status, title, sqlstate = "already_reversed", 409, "Already reversed", "TLB06"


class ApprovalRequired(LedgerError):
    """The grant is above the approval threshold: it waits for another caller's approval."""

    code, status, title = "approval_required", 409, "Approval required"


class NotApprovable(LedgerError):
    """The approval is already decided, or the caller requested it (another caller must decide)."""

    code, status, title, sqlstate = "not_approvable", 409, "Not approvable", "TLB16"


class BalanceLimitExceeded(LedgerError):
    """The write would take an account's balance past ±2^62 (sums could overflow)."""

    code, status, title = "balance_limit_exceeded", 409, "Balance limit exceeded"


# Check constraints that keep balances within the limit (schema.sql).
_BALANCE_LIMIT_CONSTRAINTS = frozenset(
    {"accounts_posted_within_limit", "account_shards_posted_within_limit"}
)


class IdempotencyKeyInProgress(LedgerError):
    """A request with this Idempotency-Key is still being processed; retry shortly."""

    code, status, title, sqlstate = (
        "idempotency_key_in_progress",
        409,
        "Idempotency key in progress",
        "TLB07",
    )


class LimitExceeded(LedgerError):
    """The operation would pass a hard spend limit of the account or its department."""

    code, status, title, sqlstate = "limit_exceeded", 409, "Limit exceeded", "TLB08"


class ModelNotAllowed(LedgerError):
    """The spend policy of the account or its department does not allow this model."""

    code, status, title, sqlstate = "model_not_allowed", 409, "Model not allowed", "TLB09"


# 422 ----------------------------------------------------------------------
class IdempotencyKeyReused(LedgerError):
    """This Idempotency-Key was used with a different request; nothing was changed."""

    code, status, title, sqlstate = (
        "idempotency_key_reused",
        422,
        "Idempotency key reused",
        "TLC01",
    )


# 429 / 503 ----------------------------------------------------------------
class RateLimited(LedgerError):
    """Too many requests from this caller; retry after the given seconds."""

    code, status, title = "rate_limited", 429, "Rate limited"


class KeyRateLimited(LedgerError):
    """This key has spent its credits for the minute; retry after the given seconds."""

    code, status, title, sqlstate = "key_rate_limited", 429, "Key rate limited", "TLD29"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        # The SQL answers when the key's minute ends (extra.retry_after).
        self.headers["Retry-After"] = str(extra.get("retry_after", 60))


class Unavailable(LedgerError):
    """The service is overloaded or its database is unreachable; retry after the given seconds."""

    code, status, title = "unavailable", 503, "Service unavailable"


# In precedence order; the README's error table is generated from this list.
ERRORS: tuple[type[LedgerError], ...] = (
    InvalidRequest,
    IdempotencyKeyRequired,
    Unauthenticated,
    Forbidden,
    PayloadTooLarge,
    AccountNotFound,
    EmployeeNotFound,
    DepartmentNotFound,
    TransactionNotFound,
    ReservationNotFound,
    LotNotFound,
    GrantProgramNotFound,
    ApprovalNotFound,
    UnknownModel,
    WebhookNotFound,
    InsufficientCredits,
    AccountClosed,
    AssetMismatch,
    ReservationNotActive,
    LotNotActive,
    AlreadyReversed,
    ApprovalRequired,
    NotApprovable,
    BalanceLimitExceeded,
    IdempotencyKeyInProgress,
    LimitExceeded,
    ModelNotAllowed,
    IdempotencyKeyReused,
    RateLimited,
    KeyRateLimited,
    Unavailable,
)

BY_CODE: dict[str, type[LedgerError]] = {cls.code: cls for cls in ERRORS}
BY_SQLSTATE: dict[str, type[LedgerError]] = {cls.sqlstate: cls for cls in ERRORS if cls.sqlstate}

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
