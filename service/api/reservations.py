"""Reservations (API.md, Reservations): hold credits before a model call,
capture the real cost after it, release or let expire the rest."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from service import errors
from service.api.accounts import account_id
from service.api.common import (
    ADDRESS_NOT_FOUND,
    Amount,
    CursorParam,
    LimitParam,
    Metadata,
    Wallet,
    object_args,
    page,
    parse_public_id,
    run_operation,
    uuid_cursor,
)
from service.api.prices import Model
from service.api.resources import CaptureResult, Reservation, ReservationsPage
from service.api.usage import Tokens, UsageCounts, check_counts
from service.auth import access
from service.journal import Database
from service.openapi import problems

TtlSeconds = Annotated[
    int, msgspec.Meta(ge=1, le=86_400, description="Seconds until the hold expires, 1..86400.")
]
Status = Literal["active", "captured", "released", "expired"]


class Estimate(msgspec.Struct, forbid_unknown_fields=True):
    """Reserve by token estimate: the worst case (all input uncached,
    max_output_tokens) at the model's current price; when the wallet cannot
    cover it, as many output tokens as it can, down to min_output_tokens
    (default max_output_tokens: all or nothing)."""

    model: Model
    input_tokens: Tokens
    max_output_tokens: Tokens
    min_output_tokens: Tokens | None = None


class ReserveIn(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of `amount` and `estimate`."""

    account: Wallet
    amount: Amount | None = None
    estimate: Estimate | None = None
    ttl_seconds: TtlSeconds = 600
    metadata: Metadata | None = None


class CaptureIn(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of `amount` and `usage` (priced at the reservation's price,
    recorded as a usage event)."""

    amount: Amount | None = None
    usage: UsageCounts | None = None
    metadata: Metadata | None = None


def exactly_one(first: str, second: str, a: Any, b: Any) -> None:
    if (a is None) == (b is None):
        raise errors.invalid(
            f"$.{first}",
            f"exactly one of {first} and {second}",
            f"give exactly one of {first} and {second}",
        )


class ReleaseIn(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ExtendIn(msgspec.Struct, forbid_unknown_fields=True):
    ttl_seconds: TtlSeconds


def count(ledger: Database, response: Response[Any], outcome: str) -> None:
    """Reservations by outcome; a replay changes nothing and is counted apart."""
    replayed = response.headers.get("Idempotent-Replayed") == "true"
    ledger.metrics.reservations.labels("replayed" if replayed else outcome).inc()


def reservation_uuid(reservation_id: str) -> uuid.UUID:
    return parse_public_id(reservation_id, "rsv_", errors.ReservationNotFound)


class ReservationsController(Controller):
    path = "/v1"
    tags = ["Reservations"]

    async def _op(
        self,
        request: Request[Any, Any, Any],
        ledger: Database,
        op: str,
        reservation_id: str,
        payload: msgspec.Struct,
        **extra: Any,
    ) -> Response[Any]:
        args = object_args(
            "reservation", reservation_id, "rsv_", errors.ReservationNotFound, payload
        )
        return await run_operation(
            request, ledger, op, payload, args={**args, **extra}, success_status=200
        )

    @post(
        "/reservations",
        summary="Reserve credits",
        status_code=201,
        opt={
            **access("spend"),
            **problems(
                *ADDRESS_NOT_FOUND,
                errors.UnknownModel,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.LimitExceeded,
                errors.ModelNotAllowed,
                errors.KeyRateLimited,
                idempotent=True,
            ),
        },
    )
    async def reserve(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[ReserveIn],
    ) -> Response[Reservation]:
        """Holds `amount` credits of a wallet or department account for `ttl_seconds`
        (default 600): `available` drops at once and `reserved` rises. The hold earmarks
        lots in consumption order. 409 `insufficient_credits` (with `available` and
        `requested`) when available credits cannot cover it. Requires an
        `Idempotency-Key`. With `estimate` instead of `amount` the amount is priced from
        the model's current price and `max_output_tokens_allowed` tells how many output
        tokens the held amount covers."""
        exactly_one("amount", "estimate", data.amount, data.estimate)
        request.state.principal.check_scope(data.account)
        if data.estimate is not None:
            lo, hi = data.estimate.min_output_tokens, data.estimate.max_output_tokens
            if lo is not None and lo > hi:
                raise errors.invalid(
                    "$.estimate.min_output_tokens",
                    "above max",
                    "min_output_tokens cannot exceed max_output_tokens",
                )
        response = await run_operation(request, ledger, "reserve", data, success_status=201)
        count(ledger, response, "created")
        return response

    @post(
        "/reservations/{reservation_id:str}/capture",
        summary="Capture a reservation",
        status_code=200,
        opt={
            **access("spend"),
            **problems(
                errors.ReservationNotFound,
                errors.UnknownModel,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.ReservationNotActive,
                errors.BalanceLimitExceeded,
                errors.LimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def capture(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        reservation_id: FromPath[str],
        data: JSONBody[CaptureIn],
    ) -> Response[CaptureResult]:
        """Debits `amount` in one `capture` transaction, drawn from the reservation's
        held lots first (even lots that expired since it was made). Less than held
        releases the rest; more debits the excess from available credits, or answers 409
        `insufficient_credits` and leaves the reservation active. A reservation that is
        not active answers 409 `reservation_not_active` with its `status`. Requires an
        `Idempotency-Key`. With `usage` instead of `amount` the amount is the usage
        priced at the price the reservation was made with, and a usage event (source
        `reservation`, event id the reservation's id) is recorded."""
        exactly_one("amount", "usage", data.amount, data.usage)
        if data.usage is not None:
            check_counts(data.usage, "$.usage")
        response = await self._op(request, ledger, "capture", reservation_id, data)
        count(ledger, response, "captured")
        return response

    @post(
        "/reservations/{reservation_id:str}/release",
        summary="Release a reservation",
        status_code=200,
        opt={
            **access("spend"),
            **problems(errors.ReservationNotFound, errors.ReservationNotActive, idempotent=True),
        },
    )
    async def release(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        reservation_id: FromPath[str],
        data: JSONBody[ReleaseIn | None] = None,
    ) -> Response[Reservation]:
        """Frees the held credits (credits of a lot that has expired meanwhile expire at
        once). Requires an `Idempotency-Key`."""
        response = await self._op(request, ledger, "release", reservation_id, data or ReleaseIn())
        count(ledger, response, "released")
        return response

    @post(
        "/reservations/{reservation_id:str}/extend",
        summary="Extend a reservation",
        status_code=200,
        opt={
            **access("spend"),
            **problems(errors.ReservationNotFound, errors.ReservationNotActive, idempotent=True),
        },
    )
    async def extend(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        reservation_id: FromPath[str],
        data: JSONBody[ExtendIn],
    ) -> Response[Reservation]:
        """Sets the reservation to expire `ttl_seconds` from now, but never later than
        its `created_at` plus the service's maximum lifetime (24 h by default,
        `TOKENLEDGER_RESERVATION_MAX_LIFETIME_SECONDS`). Requires an `Idempotency-Key`."""
        return await self._op(
            request,
            ledger,
            "extend",
            reservation_id,
            data,
            max_lifetime_seconds=ledger.config.reservation_max_lifetime_seconds,
        )

    @get(
        "/reservations/{reservation_id:str}",
        summary="Get a reservation",
        opt={
            **access("reservations.read", own="reservation_id"),
            **problems(errors.ReservationNotFound),
        },
    )
    async def get_reservation(
        self, ledger: NamedDependency[Database], reservation_id: FromPath[str]
    ) -> Reservation:
        body = await ledger.fetchval(
            "reservation_json", reservation_uuid(reservation_id), ledger.now()
        )
        if body is None:
            raise errors.ReservationNotFound(
                f"no reservation {reservation_id}", reservation=reservation_id
            )
        return body

    @get(
        "/accounts/{address:str}/reservations",
        summary="Reservations of an account, newest first",
        opt={
            **access("reservations.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def account_reservations(
        self,
        ledger: NamedDependency[Database],
        address: FromPath[str],
        status: FromQuery[Status | None] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> ReservationsPage:
        acc = await account_id(ledger, address)
        rows = await ledger.fetch(
            "account_reservations", acc, status, uuid_cursor(cursor), limit + 1, ledger.now()
        )
        return page(rows, limit, cursor_of=str)
