"""Alerts and webhooks (API.md, "Alerts and webhooks").

Subscriptions, their delivery log and manual retries, and the alert
settings of an account. The events themselves are written by the database
(schema.sql) and sent by service/webhooks.py.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from service import errors
from service.api.common import (
    ADDRESS_NOT_FOUND,
    Amount,
    CursorParam,
    LimitParam,
    Page,
    check_address,
    context_of,
    idempotency_key,
    operation_outcome,
    page,
    parse_public_id,
    replay_response,
    run_operation,
    uuid_cursor,
)
from service.auth import access
from service.journal import Database
from service.openapi import problems
from service.webhooks import SecretBox, check_url, new_secret

EventType = Literal[
    "balance.low",
    "credits.expiring",
    "grant.created",
    "limit.reached",
    "program.run.completed",
    "reservation.expired",
]


class WebhookIn(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=2000,
            description="An https URL to a public address (http and private addresses too "
            "when TOKENLEDGER_WEBHOOK_ALLOW_PRIVATE is set).",
            examples=["https://hooks.example.com/tokenledger"],
        ),
    ]
    events: Annotated[
        list[EventType],
        msgspec.Meta(min_length=1, max_length=6, description="The event types to receive."),
    ]
    description: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class Webhook(msgspec.Struct, frozen=True):
    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: str


class WebhookCreated(Webhook, frozen=True):
    """The new webhook and its signing secret (`whsec_…`), which is shown only in
    this answer (and in its idempotent replay)."""

    secret: str


class WebhooksPage(Page, frozen=True):
    items: list[Webhook]


class Attempt(msgspec.Struct, frozen=True):
    """One attempt: `status_code` and `error` are null while it is in flight, and
    stay so when its replica died mid-send."""

    attempt: int
    started_at: str
    finished_at: str | None
    status_code: int | None
    latency_seconds: float | None
    error: str | None


class Delivery(msgspec.Struct, frozen=True):
    """One event for one webhook: `pending` until a 2xx answer (`delivered`) or
    until its retry window is over (`failed`)."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: str
    completed_at: str | None
    attempt_log: list[Attempt]


class DeliveriesPage(Page, frozen=True):
    items: list[Delivery]


class AlertsIn(msgspec.Struct, forbid_unknown_fields=True):
    """Replaces the account's alert settings; a field left out is cleared."""

    low_balance: (
        Annotated[
            list[Amount],
            msgspec.Meta(
                max_length=10,
                description="Thresholds: `balance.low` fires once when the available balance "
                "falls to or below one, and re-arms when it rises above it again.",
            ),
        ]
        | None
    ) = None
    expiring_within_days: (
        Annotated[
            int,
            msgspec.Meta(
                ge=1,
                le=90,
                description="`credits.expiring` fires once per lot this many days before it "
                "expires.",
            ),
        ]
        | None
    ) = None


class Alerts(msgspec.Struct, frozen=True):
    address: str
    low_balance: list[int]
    expiring_within_days: int | None
    updated_at: str


def uuid7() -> uuid.UUID:
    """A time-ordered id (RFC 9562 version 7), like the database's tl_uuid7,
    so lists ordered by id are newest first."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return uuid.UUID(int=value)


def secret_box(state: State) -> SecretBox:
    box: SecretBox | None = state.webhook_box
    if box is None:
        raise errors.Unavailable(
            "webhooks are not configured on this service (TOKENLEDGER_WEBHOOK_SECRET_KEY)"
        )
    return box


def webhook_uuid(value: str) -> uuid.UUID:
    return parse_public_id(value, "wh_", errors.WebhookNotFound)


class WebhooksController(Controller):
    path = "/v1"
    tags = ["Webhooks"]

    @post(
        "/webhooks",
        summary="Subscribe a URL to events",
        status_code=201,
        opt={**access("webhooks"), **problems(errors.Unavailable, idempotent=True)},
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        state: State,
        data: JSONBody[WebhookIn],
    ) -> Response[WebhookCreated]:
        """Deliveries are signed with the returned `secret` (Standard Webhooks), which is
        kept encrypted and shown only here. The URL must be `https` and resolve to public
        addresses only. Requires an `Idempotency-Key`."""
        # In the order of the error table: the 400s first, then the 503.
        key = idempotency_key(request)
        await check_url(data.url, ledger.config.webhook_allow_private)
        box = secret_box(state)
        webhook_id = uuid7()
        secret = new_secret()
        args = {
            "id": str(webhook_id),
            "url": data.url,
            "events": list(data.events),
            "description": data.description,
            "secret_encrypted": base64.b64encode(box.seal(webhook_id, secret)).decode(),
        }
        outcome = await operation_outcome(
            request, ledger, "create_webhook", data, key=key, args=args, success_status=201
        )
        body = dict(outcome.body)
        if outcome.replayed:
            stored_id = webhook_uuid(body["id"])
            sealed = await ledger.fetchval("webhook_secret", stored_id)
            secret = box.open(stored_id, bytes(sealed))
        body["secret"] = secret
        return replay_response(dataclasses.replace(outcome, body=body))

    @get("/webhooks", summary="Webhooks, newest first", opt={**access("webhooks"), **problems()})
    async def list_webhooks(
        self, ledger: NamedDependency[Database], limit: LimitParam = 50, cursor: CursorParam = None
    ) -> WebhooksPage:
        rows = await ledger.fetch("webhook_list", uuid_cursor(cursor), limit + 1)
        return page(rows, limit)

    @get(
        "/webhooks/{webhook_id:str}",
        summary="A webhook",
        opt={**access("webhooks"), **problems(errors.WebhookNotFound)},
    )
    async def get_webhook(
        self, ledger: NamedDependency[Database], webhook_id: FromPath[str]
    ) -> Webhook:
        body = await ledger.fetchval("webhook_get", webhook_uuid(webhook_id))
        if body is None:
            raise errors.WebhookNotFound(f"no webhook {webhook_id}")
        return body

    @delete(
        "/webhooks/{webhook_id:str}",
        summary="Delete a webhook",
        status_code=204,
        opt={**access("webhooks"), **problems(errors.WebhookNotFound)},
    )
    async def delete_webhook(
        self, ledger: NamedDependency[Database], webhook_id: FromPath[str]
    ) -> None:
        """No more events are delivered to it; its pending deliveries are marked failed."""
        if not await ledger.fetchval("webhook_delete", webhook_uuid(webhook_id)):
            raise errors.WebhookNotFound(f"no webhook {webhook_id}")

    @get(
        "/webhooks/{webhook_id:str}/deliveries",
        summary="A webhook's deliveries and their attempts, newest first",
        opt={**access("webhooks"), **problems(errors.WebhookNotFound)},
    )
    async def deliveries(
        self,
        ledger: NamedDependency[Database],
        webhook_id: FromPath[str],
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> DeliveriesPage:
        """Every attempt is listed with its status code (or error) and latency."""
        hook = webhook_uuid(webhook_id)
        after = uuid_cursor(cursor)
        if await ledger.fetchval("webhook_get", hook) is None:
            raise errors.WebhookNotFound(f"no webhook {webhook_id}")
        rows = await ledger.fetch("webhook_deliveries", hook, after, limit + 1)
        return page(rows, limit)

    @post(
        "/webhooks/{webhook_id:str}/deliveries/{delivery_id:str}/retry",
        summary="Send a delivery again now",
        status_code=200,
        opt={**access("webhooks"), **problems(errors.WebhookNotFound, idempotent=True)},
    )
    async def retry(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        webhook_id: FromPath[str],
        delivery_id: FromPath[str],
    ) -> Response[Delivery]:
        """Makes the delivery due at once, whatever its status (receivers deduplicate by
        `webhook-id`); a failed one gets one more attempt. Requires an `Idempotency-Key`."""
        hook = webhook_uuid(webhook_id)
        delivery = parse_public_id(delivery_id, "dlv_", errors.WebhookNotFound)
        args = {"webhook": str(hook), "delivery": str(delivery)}
        return await run_operation(
            request, ledger, "retry_delivery", args, args=args, success_status=200
        )

    @put(
        "/accounts/{address:str}/alerts",
        summary="Set an account's alerts",
        tags=["Accounts"],
        opt={
            **access("alerts.write", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def put_alerts(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        address: FromPath[str],
        data: JSONBody[AlertsIn],
    ) -> Alerts:
        """Low-balance thresholds and the expiring-credits window of a wallet or a
        department account; employees may set their own. A threshold already above the
        balance fires at its next crossing, not now."""
        check_address(address)
        args = {
            "address": address,
            "low_balance": data.low_balance or [],
            "expiring_within_days": data.expiring_within_days,
        }
        return await ledger.call("put_alerts", args, context_of(request))

    @get(
        "/accounts/{address:str}/alerts",
        summary="An account's alerts",
        tags=["Accounts"],
        opt={
            **access("alerts.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def get_alerts(self, ledger: NamedDependency[Database], address: FromPath[str]) -> Alerts:
        check_address(address)
        body = await ledger.fetchval("get_alerts", address)
        if body is None:
            raise errors.not_found_for(address)
        return body
