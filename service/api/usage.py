"""Usage events (API.md, Metering and prices): metered model calls, priced
at the version in effect when they occurred and charged exactly once per
(source, event_id)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from service import errors
from service.api.common import (
    ADDRESS_NOT_FOUND,
    MAX_BATCH,
    Timestamp,
    Wallet,
    context_of,
    parse_public_id,
)
from service.api.prices import Model
from service.api.resources import UsageBatchResponse, UsageRecorded
from service.auth import access
from service.journal import Database
from service.openapi import problems, statuses
from service.pricing import MAX_TOKENS

Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS, description="0..10^9 tokens.")]
Source = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[a-z0-9][a-z0-9._:-]{0,63}$",
        description="The metering source; `reservation` is the service's own and refused.",
        examples=["gateway-eu"],
    ),
]
EventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="The source's id of the event; (source, event_id) is unique.",
    ),
]
Project = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Tags = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
        Annotated[str, msgspec.Meta(max_length=200)],
    ],
    msgspec.Meta(max_length=20, description="At most 20 string tags, for reports."),
]


class UsageCounts(msgspec.Struct, forbid_unknown_fields=True):
    """Token counts of one model call. `input_tokens` counts every prompt token,
    cached ones included; `output_tokens` includes reasoning tokens."""

    model: Model
    input_tokens: Tokens
    output_tokens: Tokens
    cached_input_tokens: Tokens = 0


class UsageIn(UsageCounts, kw_only=True, forbid_unknown_fields=True):
    source: Source
    event_id: EventId
    account: Wallet
    occurred_at: Timestamp | None = None
    reservation: str | None = None
    project: Project | None = None
    tags: Tags | None = None


class UsageBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    # Items are checked one by one (a malformed one is rejected alone).
    events: Annotated[list[Any], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


def check_counts(counts: UsageCounts, path: str = "$") -> None:
    if counts.cached_input_tokens > counts.input_tokens:
        raise errors.invalid(
            f"{path}.cached_input_tokens",
            "more than input_tokens",
            "cached_input_tokens cannot exceed input_tokens",
        )


# The source under which the service itself records a capture by usage
# (event id: the reservation's id). A meter may not use it: an event posted
# there first would make the capture a "duplicate" that charges nothing.
SERVICE_SOURCE = "reservation"


def usage_args(event: UsageIn, ledger: Database) -> dict[str, Any]:
    check_counts(event)
    if event.source == SERVICE_SOURCE:
        message = f'source "{SERVICE_SOURCE}" is the service\'s own (captures by usage)'
        raise errors.invalid("$.source", message)
    if event.occurred_at is not None:
        now = ledger.now() or datetime.now(UTC)
        config = ledger.config
        earliest = now - timedelta(seconds=config.usage_max_age_seconds)
        latest = now + timedelta(seconds=config.usage_max_ahead_seconds)
        if not earliest <= event.occurred_at <= latest:
            message = (
                f"occurred_at must lie between {config.usage_max_age_seconds} s before and "
                f"{config.usage_max_ahead_seconds} s after now"
            )
            raise errors.invalid("$.occurred_at", message)
    args: dict[str, Any] = msgspec.to_builtins(event)
    if event.reservation is not None:
        args["reservation_id"] = str(
            parse_public_id(event.reservation, "rsv_", errors.ReservationNotFound)
        )
    return args


class UsageController(Controller):
    path = "/v1"
    tags = ["Metering"]

    @post(
        "/usage",
        summary="Record a usage event",
        status_code=201,
        opt={
            **access("spend"),
            **problems(
                *ADDRESS_NOT_FOUND,
                errors.UnknownModel,
                errors.ReservationNotFound,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.ReservationNotActive,
                errors.BalanceLimitExceeded,
                errors.LimitExceeded,
                errors.KeyRateLimited,
                errors.IdempotencyKeyReused,
            ),
            **statuses(200),
        },
    )
    async def record(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[UsageIn],
    ) -> Response[UsageRecorded]:
        """Prices the event at the version in effect at `occurred_at` (default now) and
        charges the account in the same database transaction (a `usage` transaction),
        or, with `reservation`, captures that reservation with the cost. (source,
        event_id) is the idempotency key: the same pair again answers 200 with the
        stored result and `status: "duplicate"`, whatever the body, and charges nothing.
        404 `unknown_model` records nothing (never a zero charge). An event the wallet
        cannot cover is recorded all the same (the call happened): the wallet pays what
        it holds, then down to `-overdraft_limit`, and the rest is charged to
        `system:overage` and answered as `shortfall`. A model outside the spend policy
        is recorded and flagged `violation: "model_not_allowed"`."""
        request.state.principal.check_scope(data.account, data.source)
        ctx = context_of(request)
        result = await ledger.record_usage(usage_args(data, ledger), ctx)
        ledger.metrics.operations.labels(
            "usage", "ok" if result["status"] == 201 else "duplicate"
        ).inc()
        if result["status"] == 201 and result["body"].get("shortfall"):
            ledger.metrics.overage_credits.inc(int(result["body"]["shortfall"]))
        return Response(result["body"], status_code=int(result["status"]))

    @post(
        "/usage:batch",
        summary="Record usage events in a batch",
        status_code=200,
        opt={**access("spend"), **problems()},
    )
    async def record_batch(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[UsageBatchIn],
    ) -> UsageBatchResponse:
        """Up to 1000 events in one database transaction, set-based: each answers
        `recorded`, `duplicate` or `rejected` with its error `code`, in input order,
        and one bad event never rejects the others. Each account is charged once, in
        one `usage` transaction for all its accepted events; events its available
        credits cannot cover (in batch order), and those of accounts under a spend
        policy, are recorded one by one like single events, with their `shortfall`."""
        valid: list[dict[str, Any]] = []
        early: dict[int, dict[str, Any]] = {}
        principal = request.state.principal
        for i, raw in enumerate(data.events):
            try:
                event = msgspec.convert(raw, UsageIn, strict=True)
                principal.check_scope(event.account, event.source)
                valid.append(usage_args(event, ledger))
            except (msgspec.ValidationError, errors.LedgerError) as exc:
                code = exc.code if isinstance(exc, errors.LedgerError) else "invalid_request"
                event_id = raw.get("event_id") if isinstance(raw, dict) else None
                early[i] = {
                    "event_id": event_id,
                    "status": "rejected",
                    "code": code,
                    "detail": str(exc),
                }
        ctx = context_of(request)
        recorded = (
            await ledger.fetchval("record_usage_batch", valid, ledger.context_json(ctx))
            if valid
            else {"results": []}
        )
        shortfall = sum(
            int(r.get("shortfall") or 0)
            for r in recorded["results"] or []
            if r.get("status") == "recorded"
        )
        if shortfall:
            ledger.metrics.overage_credits.inc(shortfall)
        answers = iter(recorded["results"] or [])
        results = [early[i] if i in early else next(answers) for i in range(len(data.events))]
        return UsageBatchResponse(results=results)  # type: ignore[arg-type]  # why: dicts encode the same
