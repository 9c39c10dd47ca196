"""Four-eyes approvals (API.md, Approvals).

With TOKENLEDGER_APPROVAL_THRESHOLD set, a grant of more credits than it
(single, an item of a batch, or each grant of a manual program run) is not
posted: the request is stored as a pending approval and answers 202. A
different hr or admin caller approves it, which posts it exactly once (the
approval row is locked, and must still be pending, in the transaction that
posts), or rejects it, which is final. The rules live in schema.sql
(tl_op_request_approval, tl_op_approve, tl_op_reject); this module maps HTTP
to them.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from service import errors
from service.api.common import (
    ADDRESS_NOT_FOUND,
    CursorParam,
    LimitParam,
    Memo,
    Page,
    context_of,
    object_args,
    page,
    parse_public_id,
    run_operation,
    uuid_cursor,
)
from service.auth import access
from service.journal import Database, request_hash
from service.openapi import problems
from service.programs import run_cycle

ApprovalStatus = Literal["pending", "approved", "rejected"]


class Approval(msgspec.Struct, frozen=True):
    """A request waiting for (or given) a second caller's decision. `request` is the
    grant, the batch (`{items}`) or the program run (`{program, cycle}`) as asked;
    `result` what approving posted (the grant, the batch results, or the run)."""

    id: str
    kind: Literal["grant", "grant_batch", "program_run"]
    status: ApprovalStatus
    request: dict[str, Any]
    requested_by: str
    requested_at: str
    decided_by: str | None
    decided_at: str | None
    memo: str | None
    result: dict[str, Any] | None


class ApprovalRequested(msgspec.Struct, frozen=True):
    """202: nothing was posted; the approval waits for another hr or admin caller."""

    approval: Approval


class ApprovalsPage(Page, frozen=True):
    items: list[Approval]


class DecisionIn(msgspec.Struct, forbid_unknown_fields=True):
    memo: Memo | None = None


# The 202 answer of the routes that may need an approval.
APPROVAL_RESPONSE = {
    202: ResponseSpec(
        data_container=ApprovalRequested,
        description=(
            "Above TOKENLEDGER_APPROVAL_THRESHOLD: nothing was posted; a pending approval "
            "was stored (the same request again answers the same approval)."
        ),
    )
}


def needs_approval(ledger: Database, amount: int) -> bool:
    threshold = ledger.config.approval_threshold
    return threshold is not None and amount > threshold


async def request_approval(
    request: Request[Any, Any, Any],
    ledger: Database,
    payload: Any,
    kind: str,
    body: dict[str, Any],
    *,
    dedup_key: str | None,
) -> Response[Any]:
    """Store a pending approval under the request's Idempotency-Key (single grants), or,
    with a dedup_key, once per caller and request (batches and program runs, which
    take no Idempotency-Key)."""
    args = {"kind": kind, "request": body, "dedup_key": dedup_key}
    if dedup_key is None:
        return await run_operation(
            request, ledger, "request_approval", payload, args=args, success_status=202
        )
    ctx = context_of(request)
    outcome = await ledger.execute(
        "request_approval",
        args,
        ctx=ctx,
        key=None,
        fingerprint=None,
        success_status=202,
    )
    return Response(outcome.body, status_code=202)


async def request_batch_approval(
    request: Request[Any, Any, Any], ledger: Database, items: list[dict[str, Any]]
) -> Response[Any]:
    """A pending approval of grant batch items (`{key, hash, grant}`, from
    grants:batch or a CSV import), once per caller and items: the same items
    again answer the same approval, and approving posts them under their keys."""
    digest = request_hash("POST", "/v1/grants:batch", items).hex()
    return await request_approval(
        request, ledger, None, "grant_batch", {"items": items}, dedup_key=f"batch:{digest}"
    )


class ApprovalsController(Controller):
    path = "/v1"
    tags = ["Approvals"]

    @get(
        "/approvals",
        summary="List approvals",
        opt={**access("approvals"), **problems()},
    )
    async def list_approvals(
        self,
        ledger: NamedDependency[Database],
        status: Annotated[
            ApprovalStatus | None, QueryParameter(description="Only this status.")
        ] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> ApprovalsPage:
        """Newest first. Each names who requested it and who decided it, and when: the
        audit trail of the four-eyes rule."""
        rows = await ledger.fetch("approvals_page", status, uuid_cursor(cursor), limit + 1)
        return page(rows, limit)

    @get(
        "/approvals/{approval_id:str}",
        summary="Get an approval",
        opt={**access("approvals"), **problems(errors.ApprovalNotFound)},
    )
    async def get_approval(
        self, ledger: NamedDependency[Database], approval_id: FromPath[str]
    ) -> Approval:
        uid = parse_public_id(approval_id, "apr_", errors.ApprovalNotFound)
        body = await ledger.fetchval("approval_json", uid)
        if body is None:
            raise errors.ApprovalNotFound(f"no approval {approval_id}", approval=approval_id)
        return body

    @post(
        "/approvals/{approval_id:str}/approve",
        summary="Approve and post",
        status_code=200,
        opt={
            **access("approvals"),
            **problems(
                errors.ApprovalNotFound,
                *ADDRESS_NOT_FOUND,
                errors.GrantProgramNotFound,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.NotApprovable,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def approve(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        approval_id: FromPath[str],
        data: JSONBody[DecisionIn | None] = None,
    ) -> Response[Approval]:
        """Posts the approved request exactly once, in the transaction that marks it
        approved; two approvals at once post once (the second answers 409
        `not_approvable`). The approver must be another caller than the requester (409
        `not_approvable`). A grant that cannot be posted (a closed wallet, a department
        without the credits) answers its 409 and the approval stays pending. An approved
        program run is run right after (it is exactly-once per employee by itself).
        Requires an `Idempotency-Key`."""
        payload = data or DecisionIn()
        args = object_args("approval", approval_id, "apr_", errors.ApprovalNotFound, payload)
        response = await run_operation(
            request, ledger, "approve", payload, args=args, success_status=200
        )
        body = response.content
        if (
            isinstance(body, dict)
            and body.get("kind") == "program_run"
            and body.get("result") is None
        ):
            # The run's grants carry the requester as actor, as an approved
            # grant's posting does (tl_op_approve); the approval row names the
            # approver, so the audit trail shows both.
            approver = context_of(request)
            run = await run_cycle(
                ledger,
                body["request"]["program"],
                body["request"]["cycle"],
                "api",
                dataclasses.replace(approver, actor=body["requested_by"]),
            )
            uid = uuid.UUID(args["approval_id"])
            updated = await ledger.fetchval("approval_set_result", uid, run)
            answer: Any = updated or body
            return Response(answer, status_code=200, headers=response.headers)
        return response

    @post(
        "/approvals/{approval_id:str}/reject",
        summary="Reject (final)",
        status_code=200,
        opt={
            **access("approvals"),
            **problems(errors.ApprovalNotFound, errors.NotApprovable, idempotent=True),
        },
    )
    async def reject(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        approval_id: FromPath[str],
        data: JSONBody[DecisionIn | None] = None,
    ) -> Response[Approval]:
        """Rejection is final: the request is never posted, and approving it later answers
        409 `not_approvable`. Requires an `Idempotency-Key`."""
        payload = data or DecisionIn()
        args = object_args("approval", approval_id, "apr_", errors.ApprovalNotFound, payload)
        return await run_operation(
            request, ledger, "reject", payload, args=args, success_status=200
        )
