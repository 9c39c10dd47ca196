"""Grants and lot voids (API.md, Grants)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from service import errors
from service.api.approvals import (
    APPROVAL_RESPONSE,
    needs_approval,
    request_approval,
    request_batch_approval,
)
from service.api.common import (
    ADDRESS_NOT_FOUND,
    MAX_BATCH,
    Amount,
    Funder,
    Memo,
    Metadata,
    Ref,
    Timestamp,
    context_of,
    object_args,
    run_operation,
)
from service.api.resources import BatchGrantResponse, GrantResult, Transaction
from service.auth import access
from service.journal import Database, request_hash
from service.openapi import problems

Reason = Literal["signing_bonus", "monthly_allotment", "spot_bonus", "adjustment"]
Priority = Annotated[
    int, msgspec.Meta(ge=0, le=1000, description="Lower is spent first; default 100.")
]


class GrantIn(msgspec.Struct, forbid_unknown_fields=True):
    employee: Ref
    amount: Amount
    reason: Reason
    expires_at: Timestamp | None = None
    effective_at: Timestamp | None = None
    priority: Priority = 100
    funded_by: Funder = "system:issuance"
    memo: Memo | None = None
    metadata: Metadata | None = None


class BatchGrantIn(GrantIn, kw_only=True, forbid_unknown_fields=True):
    key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=200,
            pattern=r"^[\x20-\x7e]+$",
            description="The item's idempotency key, scoped to the caller.",
        ),
    ]


class GrantBatchIn(msgspec.Struct, forbid_unknown_fields=True):
    grants: Annotated[list[BatchGrantIn], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class VoidIn(msgspec.Struct, forbid_unknown_fields=True):
    memo: Memo | None = None


def grant_args(data: JSONBody[GrantIn]) -> dict[str, Any]:
    args = msgspec.to_builtins(data)
    args.pop("key", None)
    return args


class GrantsController(Controller):
    path = "/v1"
    tags = ["Grants"]

    @post(
        "/grants",
        summary="Grant credits to an employee",
        status_code=201,
        responses=APPROVAL_RESPONSE,
        opt={
            **access("grants.write"),
            **problems(
                *ADDRESS_NOT_FOUND,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def grant(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[GrantIn],
    ) -> Response[GrantResult]:
        """Creates a lot in the employee's wallet, funded by `system:issuance` or a
        department (which cannot grant more than it holds; a department-funded lot never
        outlives the department credits it came from). A future `effective_at` makes a
        pending lot that counts from that instant. Requires an `Idempotency-Key`. Above
        TOKENLEDGER_APPROVAL_THRESHOLD (when set) nothing is posted: 202 with a pending
        approval that another hr or admin caller must approve."""
        if needs_approval(ledger, data.amount):
            return await request_approval(
                request, ledger, data, "grant", grant_args(data), dedup_key=None
            )
        return await run_operation(
            request, ledger, "grant", data, args=grant_args(data), success_status=201
        )

    @post(
        "/grants:batch",
        summary="Grant credits in a batch",
        status_code=200,
        responses=APPROVAL_RESPONSE,
        opt={**access("grants.write"), **problems()},
    )
    async def grant_batch(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[GrantBatchIn],
    ) -> Response[BatchGrantResponse]:
        """Up to 1000 grants in one database transaction. Each item is idempotent by its
        own `key` (so no `Idempotency-Key` header is needed): the same key and body again
        answers `duplicate`; the same key with a different body, or a failing check,
        answers `rejected` with the error `code` and touches nothing else. If any item is
        above TOKENLEDGER_APPROVAL_THRESHOLD (when set), nothing is posted: the whole batch
        answers 202 with one pending approval (the same batch again answers the same
        approval); approving it posts the batch under the same item keys."""
        keys = [g.key for g in data.grants]
        if len(set(keys)) != len(keys):
            raise errors.InvalidRequest(
                "keys must be unique within a batch", errors=[{"path": "$.grants"}]
            )
        items = []
        for g in data.grants:
            args = grant_args(g)
            digest = request_hash("POST", "/v1/grants", args)
            items.append({"key": g.key, "hash": digest.hex(), "grant": args})
        if any(needs_approval(ledger, g.amount) for g in data.grants):
            return await request_batch_approval(request, ledger, items)
        ctx = context_of(request)
        results = await ledger.fetchval("grant_batch", ctx.caller, items, ledger.context_json(ctx))
        return Response(results)

    @post(
        "/lots/{lot_id:str}/void",
        summary="Void the rest of a lot",
        status_code=200,
        opt={
            **access("grants.write"),
            **problems(
                errors.LotNotFound,
                errors.LotNotActive,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def void_lot(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        lot_id: FromPath[str],
        data: JSONBody[VoidIn | None] = None,
    ) -> Response[Transaction]:
        """The unspent, unreserved remainder goes back to the funding account, in a
        `void` transaction. A lot with nothing left (spent, expired or already voided)
        answers 409 `lot_not_active`. Requires an `Idempotency-Key`."""
        payload = data or VoidIn()
        args = object_args("lot", lot_id, "lot_", errors.LotNotFound, payload)
        return await run_operation(
            request, ledger, "void_lot", payload, args=args, success_status=200
        )
