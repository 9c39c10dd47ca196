"""Spend policy (API.md, Spend policy): period limits, model rules and the
overdraft of a wallet or a department.

The policy is stored and enforced in PostgreSQL (schema.sql, "Spend
policy"): the hot functions check it inside the same database call as the
operation they belong to. This module only validates and routes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from service import errors
from service.api.common import (
    ADDRESS_NOT_FOUND,
    MAX_AMOUNT,
    WALLET_PATTERN,
    Amount,
    check_address,
    check_time_zone,
    context_of,
)
from service.api.prices import Model
from service.api.resources import Tier
from service.auth import access
from service.journal import Database
from service.openapi import problems

# Bounded work per check: every limit is a window row to write per spend.
MAX_LIMITS = 16
MAX_MODELS = 200

Period = Literal["day", "week", "month"]
Mode = Literal["hard", "soft"]
TimeZone = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=64,
        description="An IANA time zone; windows start at local midnight in it.",
        examples=["Europe/Paris"],
    ),
]


class LimitIn(msgspec.Struct, forbid_unknown_fields=True):
    """At most `amount` credits of spend per calendar `window` in `time_zone`.
    `hard` refuses what would pass it (409 `limit_exceeded`); `soft` never
    refuses and raises `limit.reached` at 80 % and 100 %."""

    window: Period
    amount: Amount
    mode: Mode = "hard"
    time_zone: TimeZone = "UTC"


class ModelsIn(msgspec.Struct, forbid_unknown_fields=True):
    """A model must be of a listed tier (when `tiers` is set), listed in `allow`
    (when set), and not listed in `deny`."""

    tiers: Annotated[list[Tier], msgspec.Meta(min_length=1, max_length=2)] | None = None
    allow: Annotated[list[Model], msgspec.Meta(max_length=MAX_MODELS)] | None = None
    deny: Annotated[list[Model], msgspec.Meta(max_length=MAX_MODELS)] | None = None


class PolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    """The whole policy: what is left out is not part of it (no limits, no model
    rules, overdraft 0)."""

    limits: Annotated[list[LimitIn], msgspec.Meta(max_length=MAX_LIMITS)] | None = None
    models: ModelsIn | None = None
    overdraft_limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)] | None = None


class LimitWindow(msgspec.Struct, frozen=True):
    """A limit and its current window, computed at the instant of the request:
    `spent` counts debits, captures, usage and active reservations in
    [`starts_at`, `resets_at`) (a department's: all its members')."""

    window: Period
    amount: int
    mode: Mode
    time_zone: str
    spent: int
    remaining: int
    starts_at: str
    resets_at: str


class Models(msgspec.Struct, frozen=True):
    tiers: list[Tier] | None = None
    allow: list[str] | None = None
    deny: list[str] | None = None


class Policy(msgspec.Struct, frozen=True):
    account: str
    limits: list[LimitWindow]
    models: Models
    overdraft_limit: int
    updated_at: str


def policy_args(address: str, data: PolicyIn) -> dict[str, Any]:
    """The policy in its stored form, after the checks a schema cannot express."""
    for i, limit in enumerate(data.limits or []):
        check_time_zone(limit.time_zone, f"$.limits[{i}].time_zone")
    models = (
        {k: v for k, v in msgspec.to_builtins(data.models).items() if v is not None}
        if data.models is not None
        else {}
    )
    return {
        "account": address,
        "limits": msgspec.to_builtins(data.limits or []),
        "models": models,
        "overdraft_limit": data.overdraft_limit,
    }


def check_policy_address(address: str) -> None:
    check_address(address)
    if re.match(WALLET_PATTERN, address) is None:
        raise errors.invalid(
            "address",
            "not employee:ref or department:ref",
            "a spend policy belongs to an employee wallet or a department",
        )


class PolicyController(Controller):
    path = "/v1"
    tags = ["Spend policy"]

    @put(
        "/accounts/{address:str}/policy",
        summary="Set the spend policy of a wallet or department",
        opt={
            **access("policy.write"),
            **problems(*ADDRESS_NOT_FOUND),
            "path_patterns": {"address": WALLET_PATTERN},
        },
    )
    async def put_policy(
        self,
        request: Request[Any, Any, Any],
        ledger: NamedDependency[Database],
        address: FromPath[str],
        data: JSONBody[PolicyIn],
    ) -> Policy:
        """Replaces the policy. A department's binds every member too: a member's spend
        must pass the member's own rules and every rule of the department, whose limits
        count the summed spend of all members. A limit set mid-window counts what was
        spent in the window already. `overdraft_limit` lets usage without a reservation
        take the account down to `-overdraft_limit` before the rest goes to
        `system:overage`; it cannot be set below what the account has overdrawn (400)."""
        check_policy_address(address)
        args = policy_args(address, data)
        return await ledger.call("put_policy", args, context_of(request))

    @get(
        "/accounts/{address:str}/policy",
        summary="The spend policy of a wallet or department, with its current windows",
        opt={
            **access("policy.read", own="address"),
            **problems(*ADDRESS_NOT_FOUND),
            "path_patterns": {"address": WALLET_PATTERN},
        },
    )
    async def get_policy(self, ledger: NamedDependency[Database], address: FromPath[str]) -> Policy:
        """Each limit with its current window at the instant of the request: `spent`,
        `remaining`, `starts_at` and `resets_at` (the next local midnight of the window's
        end in its time zone, exact on daylight-saving days). Employees may read their own."""
        check_policy_address(address)
        body = await ledger.fetchval("policy_json", address, ledger.now())
        if body is None:
            raise errors.not_found_for(address)
        return body
