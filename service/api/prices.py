"""Model prices (API.md, Metering and prices): versions, never edited."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, QueryParameter

from service.api.accounts import require_tz
from service.api.common import (
    CursorParam,
    LimitParam,
    Timestamp,
    decode_cursor,
    invalid_cursor,
    page,
    run_operation,
    text_cursor,
)
from service.api.resources import Price, PricesPage, Tier
from service.auth import access
from service.journal import Database
from service.openapi import problems
from service.pricing import MAX_RATE_PER_MTOK, MODEL_PATTERN

Model = Annotated[
    str,
    msgspec.Meta(
        pattern=MODEL_PATTERN,
        description="A model name, `[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}`.",
        examples=["gpt-4o", "anthropic/claude-3-5-sonnet-20241022"],
    ),
]
RatePerMtok = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=MAX_RATE_PER_MTOK,
        description="Credits per million tokens, 0..10^9.",
        examples=[2_500_000],
    ),
]


class PriceIn(msgspec.Struct, forbid_unknown_fields=True):
    model: Model
    effective_from: Timestamp
    input_per_mtok: RatePerMtok
    cached_input_per_mtok: RatePerMtok
    output_per_mtok: RatePerMtok
    tier: Tier = "standard"


class PricesController(Controller):
    path = "/v1"
    tags = ["Prices"]

    @post(
        "/prices",
        summary="Add a price version",
        status_code=201,
        opt={**access("prices.write"), **problems(idempotent=True)},
    )
    async def add_price(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[PriceIn],
    ) -> Response[Price]:
        """Adds a version of a model's price, in effect from `effective_from` until the
        model's next version. Prices are never edited: the same `model` and
        `effective_from` with the same tier and rates answers the existing version;
        with different ones, 400 `invalid_request` (add a version with a later
        `effective_from` instead). Requires an `Idempotency-Key`."""
        args = {**msgspec.to_builtins(data), "source": "api"}
        return await run_operation(
            request, ledger, "add_price", data, args=args, success_status=201
        )

    @get(
        "/prices",
        summary="Price versions, or the versions in effect at an instant",
        opt={**access("prices.read"), **problems()},
    )
    async def list_prices(
        self,
        ledger: NamedDependency[Database],
        model: Annotated[
            str | None,
            QueryParameter(pattern=MODEL_PATTERN, description="Only this model's prices."),
        ] = None,
        at: FromQuery[datetime | None] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> PricesPage:
        """Without `at`: every version (of `model`, or of all models), newest
        `effective_from` first. With `at`: per model, the version in effect at that
        instant (the latest with `effective_from <= at`), by model name; models
        without a price then are left out."""
        require_tz(at, "at")
        if at is not None:
            rows = await ledger.fetch("prices_at", model, at, text_cursor(cursor), limit + 1)
            return page(rows, limit)
        after_at: datetime | None = None
        after_id: uuid.UUID | None = None
        after = decode_cursor(cursor)
        if after is not None:
            try:
                after_at = datetime.fromisoformat(after[0])
                after_id = uuid.UUID(after[1])
            except (ValueError, TypeError, KeyError, IndexError):
                raise invalid_cursor() from None
        rows = await ledger.fetch("prices_versions", model, after_at, after_id, limit + 1)
        return page(rows, limit)
