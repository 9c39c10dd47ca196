"""Debits, transfers and transactions (API.md, Debits, transfers, transactions)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from service import errors
from service.api.accounts import account_id
from service.api.common import (
    ADDRESS_NOT_FOUND,
    Address,
    Amount,
    CursorParam,
    LimitParam,
    Memo,
    Metadata,
    Wallet,
    object_args,
    page,
    parse_public_id,
    run_operation,
    uuid_cursor,
)
from service.api.resources import Transaction, TransactionKind, TransactionsPage
from service.auth import access
from service.journal import Database
from service.openapi import problems
from service.roles import grants


class DebitIn(msgspec.Struct, forbid_unknown_fields=True):
    account: Wallet
    amount: Amount
    memo: Memo | None = None
    metadata: Metadata | None = None


class TransferIn(msgspec.Struct, forbid_unknown_fields=True):
    from_: Address = msgspec.field(name="from")
    to: Address = msgspec.field()
    amount: Amount = msgspec.field()
    memo: Memo | None = None
    metadata: Metadata | None = None


class ReverseIn(msgspec.Struct, forbid_unknown_fields=True):
    memo: Memo | None = None


class TransactionsController(Controller):
    path = "/v1"
    tags = ["Transactions"]

    @post(
        "/debits",
        summary="Debit credits from a wallet",
        status_code=201,
        opt={
            **access("spend"),
            **problems(
                *ADDRESS_NOT_FOUND,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.BalanceLimitExceeded,
                errors.LimitExceeded,
                errors.ModelNotAllowed,
                errors.KeyRateLimited,
                idempotent=True,
            ),
        },
    )
    async def debit(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[DebitIn],
    ) -> Response[Transaction]:
        """Consumes live lots in consumption order (priority, soonest expiry, oldest
        first) and moves the credits to `system:usage`. 409 `insufficient_credits` with
        `available` and `requested` when the live lots cannot cover it. Requires an
        `Idempotency-Key`. A key scoped to other account types answers 403."""
        request.state.principal.check_scope(data.account)
        return await run_operation(request, ledger, "debit", data, success_status=201)

    @post(
        "/transfers",
        summary="Transfer credits between accounts",
        status_code=201,
        opt={
            **access("transfers", "departments.fund"),
            **problems(
                *ADDRESS_NOT_FOUND,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.AssetMismatch,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def transfer(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        data: JSONBody[TransferIn],
    ) -> Response[Transaction]:
        """Moves credits between wallets and department accounts (or to and from
        `system:issuance`, which is how finance funds departments). Credits carry their
        expiry and priority with them: moving credits never extends their life.
        Requires an `Idempotency-Key`. Finance without `hr` may only fund a department:
        from `system:issuance` to a `department:` account (`service.roles`)."""
        principal = request.state.principal
        if not grants(principal.roles, "transfers") and not (
            data.from_ == "system:issuance" and data.to.startswith("department:")
        ):
            raise errors.Forbidden(
                "finance may transfer only from system:issuance to a department account"
            )
        return await run_operation(request, ledger, "transfer", data, success_status=201)

    @get(
        "/transactions/{transaction_id:str}",
        summary="Get a transaction",
        opt={**access("transactions.read"), **problems(errors.TransactionNotFound)},
    )
    async def get_transaction(
        self, ledger: NamedDependency[Database], transaction_id: FromPath[str]
    ) -> Transaction:
        txn = parse_public_id(transaction_id, "txn_", errors.TransactionNotFound)
        body = await ledger.fetchval("transaction_json", txn)
        if body is None:
            raise errors.TransactionNotFound(
                f"no transaction {transaction_id}", transaction=transaction_id
            )
        return body

    @get(
        "/transactions",
        summary="List transactions, newest first",
        opt={
            **access("transactions.read"),
            **problems(*ADDRESS_NOT_FOUND),
        },
    )
    async def list_transactions(
        self,
        ledger: NamedDependency[Database],
        account: Annotated[
            str | None, QueryParameter(description="Only those touching this account.")
        ] = None,
        kind: FromQuery[TransactionKind | None] = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> TransactionsPage:
        acc = await account_id(ledger, account) if account is not None else None
        rows = await ledger.fetch("transactions_page", acc, kind, uuid_cursor(cursor), limit + 1)
        return page(rows, limit, cursor_of=str)

    @post(
        "/transactions/{transaction_id:str}/reverse",
        summary="Reverse a transaction",
        status_code=201,
        opt={
            **access("reversals"),
            **problems(
                errors.TransactionNotFound,
                errors.InsufficientCredits,
                errors.AccountClosed,
                errors.AlreadyReversed,
                errors.LotNotActive,
                errors.BalanceLimitExceeded,
                idempotent=True,
            ),
        },
    )
    async def reverse(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        transaction_id: FromPath[str],
        data: JSONBody[ReverseIn | None] = None,
    ) -> Response[Transaction]:
        """Writes a `reversal` that negates every entry and lot movement of a grant,
        debit or transfer: consumed lots get their credits back (and expire again at once
        if they have expired meanwhile). A transaction is reversed at most once: 409
        `already_reversed`. Reversing credits the receiver has already spent answers 409
        `insufficient_credits`. Requires an `Idempotency-Key`."""
        payload = data or ReverseIn()
        args = object_args(
            "transaction", transaction_id, "txn_", errors.TransactionNotFound, payload
        )
        return await run_operation(
            request, ledger, "reverse", payload, args=args, success_status=201
        )
