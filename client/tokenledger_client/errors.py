"""One exception class per error code of the API (API.md, Errors).

Every class carries the problem's fields (`status`, `code`, `title`,
`detail`) and its machine-readable extras, both as `extras` and as typed
attributes where the contract names them (`available`, `remaining`,
`resets_at` ...). A code this client does not know yet becomes the class of
its HTTP status family (`ConflictError` for an unknown 409), so new codes
never crash a gateway. tests/client/test_contract.py checks that every code
the service can answer has a class here.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "TokenledgerError",
    "LedgerUnreachable",
    "error_from_problem",
    "ERROR_CLASSES",
]


class TokenledgerError(Exception):
    """An error answer of the service (an RFC 9457 problem)."""

    code: ClassVar[str] = "unknown"
    # Extras this code carries, by the contract; set as attributes (None when absent).
    extra_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        status: int,
        problem: dict[str, Any],
        *,
        request_id: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        self.status = status
        self.problem = problem
        self.code_received = str(problem.get("code", self.code))
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        self.request_id = request_id
        self.retry_after_seconds = retry_after_seconds
        standard = {"type", "title", "status", "detail", "code", "instance"}
        self.extras: dict[str, Any] = {k: v for k, v in problem.items() if k not in standard}
        # Services before issue 11 sent the state of reservation_not_active and
        # lot_not_active as `status` (now `reservation_status`, `lot_status`).
        if isinstance(problem.get("status"), str):
            self.extras["resource_status"] = problem["status"]
        for name in self.extra_names:
            setattr(self, name, self.extras.get(name))
        super().__init__(f"{status} {self.code_received}: {self.detail or self.title}")


# Families: what a code unknown to this client becomes, by HTTP status.
class BadRequestError(TokenledgerError):
    code = "bad_request"


class AuthError(TokenledgerError):
    code = "auth"


class NotFoundError(TokenledgerError):
    code = "not_found"


class ConflictError(TokenledgerError):
    """A business rejection (409): stored with the idempotency key, never retried."""

    code = "conflict"


class RetryableError(TokenledgerError):
    """429 and 503: the client retries these itself within its time budget."""

    code = "retryable"


class ServerError(TokenledgerError):
    """A 500: a bug in the service; never retried."""

    code = "internal"


# 400
class InvalidRequest(BadRequestError):
    code = "invalid_request"
    extra_names = ("errors",)
    errors: list[dict[str, Any]] | None


class IdempotencyKeyRequired(BadRequestError):
    code = "idempotency_key_required"


class PayloadTooLarge(BadRequestError):
    code = "payload_too_large"


# 401 / 403
class Unauthenticated(AuthError):
    code = "unauthenticated"


class Forbidden(AuthError):
    code = "forbidden"


# 404
class AccountNotFound(NotFoundError):
    code = "account_not_found"


class EmployeeNotFound(NotFoundError):
    code = "employee_not_found"


class DepartmentNotFound(NotFoundError):
    code = "department_not_found"


class TransactionNotFound(NotFoundError):
    code = "transaction_not_found"


class ReservationNotFound(NotFoundError):
    code = "reservation_not_found"


class LotNotFound(NotFoundError):
    code = "lot_not_found"


class GrantProgramNotFound(NotFoundError):
    code = "grant_program_not_found"


class UnknownModel(NotFoundError):
    code = "unknown_model"
    extra_names = ("model",)
    model: str | None


class WebhookNotFound(NotFoundError):
    code = "webhook_not_found"


class ApprovalNotFound(NotFoundError):
    code = "approval_not_found"


class RouteNotFound(NotFoundError):
    code = "not_found"


class MethodNotAllowed(BadRequestError):
    code = "method_not_allowed"


# 409
class InsufficientCredits(ConflictError):
    code = "insufficient_credits"
    extra_names = ("available", "requested")
    available: int | None
    requested: int | None


class AccountClosed(ConflictError):
    code = "account_closed"


class AssetMismatch(ConflictError):
    code = "asset_mismatch"


class ReservationNotActive(ConflictError):
    code = "reservation_not_active"
    extra_names = ("reservation_status",)
    reservation_status: str | None

    def __init__(self, status: int, problem: dict[str, Any], **kw: Any) -> None:
        super().__init__(status, problem, **kw)
        # The service sends `reservation_status`; one before issue 11 sent
        # the state as `status`. Accept either.
        if self.reservation_status is None:
            self.reservation_status = self.extras.get("resource_status")


class LotNotActive(ConflictError):
    code = "lot_not_active"
    extra_names = ("lot_status",)
    lot_status: str | None

    def __init__(self, status: int, problem: dict[str, Any], **kw: Any) -> None:
        super().__init__(status, problem, **kw)
        if self.lot_status is None:
            self.lot_status = self.extras.get("resource_status")


class AlreadyReversed(ConflictError):
    code = "already_reversed"
    extra_names = ("reversed_by",)
    reversed_by: str | None


class BalanceLimitExceeded(ConflictError):
    """The write would take a balance past ±2^62 credits; nothing was written."""

    code = "balance_limit_exceeded"


class IdempotencyKeyInProgress(ConflictError):
    code = "idempotency_key_in_progress"


class LimitExceeded(ConflictError):
    code = "limit_exceeded"
    extra_names = ("window", "limit", "spent", "remaining", "resets_at")
    window: str | None
    limit: int | None
    spent: int | None
    remaining: int | None
    resets_at: str | None


class ModelNotAllowed(ConflictError):
    code = "model_not_allowed"
    extra_names = ("model",)
    model: str | None


class ApprovalRequired(ConflictError):
    code = "approval_required"
    extra_names = ("approval",)
    approval: dict[str, Any] | None


class NotApprovable(ConflictError):
    code = "not_approvable"


# 422
class IdempotencyKeyReused(TokenledgerError):
    code = "idempotency_key_reused"


# 429 / 503
class RateLimited(RetryableError):
    code = "rate_limited"


class KeyRateLimited(RateLimited):
    """The key's spend rate cap (credits per minute) is used up until the minute ends
    (`Retry-After`); a RateLimited, so callers that handle that handle this too."""

    code = "key_rate_limited"
    extra_names = ("limit", "spent", "requested")
    limit: int | None
    spent: int | None
    requested: int | None


class Unavailable(RetryableError):
    code = "unavailable"


class LedgerUnreachable(Exception):
    """No answer from the service within the client's retry budget: connection
    errors, timeouts, or 429/503 until the budget ran out. `last_error` is the
    last transport error or error answer. A gateway decides here between
    failing closed and failing open."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


ERROR_CLASSES: dict[str, type[TokenledgerError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        IdempotencyKeyRequired,
        PayloadTooLarge,
        Unauthenticated,
        Forbidden,
        AccountNotFound,
        EmployeeNotFound,
        DepartmentNotFound,
        TransactionNotFound,
        ReservationNotFound,
        LotNotFound,
        GrantProgramNotFound,
        UnknownModel,
        WebhookNotFound,
        ApprovalNotFound,
        RouteNotFound,
        MethodNotAllowed,
        InsufficientCredits,
        AccountClosed,
        AssetMismatch,
        ReservationNotActive,
        LotNotActive,
        AlreadyReversed,
        BalanceLimitExceeded,
        IdempotencyKeyInProgress,
        LimitExceeded,
        ModelNotAllowed,
        ApprovalRequired,
        NotApprovable,
        IdempotencyKeyReused,
        RateLimited,
        KeyRateLimited,
        Unavailable,
    )
}

_FAMILIES: dict[int, type[TokenledgerError]] = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    429: RetryableError,
    503: RetryableError,
}


def error_from_problem(
    status: int,
    problem: dict[str, Any],
    *,
    request_id: str | None = None,
    retry_after_seconds: float | None = None,
) -> TokenledgerError:
    """The exception for an error answer: by its code, else by its status."""
    cls = ERROR_CLASSES.get(str(problem.get("code")))
    if cls is None:
        cls = _FAMILIES.get(status, ServerError if status >= 500 else BadRequestError)
    return cls(status, problem, request_id=request_id, retry_after_seconds=retry_after_seconds)


# Re-export every class by name for `from tokenledger_client.errors import X`.
__all__ += [cls.__name__ for cls in ERROR_CLASSES.values()]
__all__ += [
    "BadRequestError",
    "AuthError",
    "NotFoundError",
    "ConflictError",
    "RetryableError",
    "ServerError",
]
