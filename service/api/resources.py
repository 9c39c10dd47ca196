"""Response shapes, for the OpenAPI schema.

The bodies themselves are built in SQL (schema.sql, tl_*_json) so that a
stored idempotent response and a fresh one are the same bytes; these
Structs document them and are checked against real responses in tests.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from service.api.common import Page

# A model's price tier: a price version's, and what a spend policy allows.
Tier = Literal["standard", "premium"]

# What a transaction is: the `kind` of its record, and a filter of the list.
TransactionKind = Literal[
    "grant", "debit", "usage", "transfer", "capture", "expiry", "void", "reversal", "rollover"
]


class EntryLeg(msgspec.Struct, frozen=True):
    account: str
    amount: int
    balance_after: int
    version: int
    asset: str


class LotMovement(msgspec.Struct, frozen=True):
    lot_id: str
    amount: int


class Transaction(msgspec.Struct, frozen=True):
    """An immutable journal record. `lots` lists the lot movements it made,
    so a reversal can restore exactly those lots."""

    id: str
    kind: TransactionKind
    entries: list[EntryLeg]
    lots: list[LotMovement]
    memo: str | None
    metadata: dict[str, Any]
    details: dict[str, Any]
    actor: str | None
    request_id: str | None
    reverses: str | None
    reversed_by: str | None
    created_at: str


class Lot(msgspec.Struct, frozen=True):
    id: str
    account: str
    amount: int
    remaining: int
    reserved: int
    priority: int
    effective_at: str
    expires_at: str | None
    status: Literal["active", "voided"]
    funded_by: str
    grant_transaction_id: str


class Expiring(msgspec.Struct, frozen=True):
    amount: int
    expires_at: str


class Account(msgspec.Struct, frozen=True):
    """Balances as of now. `posted` already excludes credits that expired
    before now even if the sweeper has not yet written their expiry;
    `pending` counts credits granted with a future `effective_at`;
    `available = posted - reserved - pending`."""

    address: str
    type: Literal["employee", "department", "system"]
    asset: str
    posted: int
    reserved: int
    pending: int
    available: int | None
    overdraft_limit: int | None
    status: Literal["open", "closed"]
    version: int
    expiring: list[Expiring]
    updated_at: str


class Entry(msgspec.Struct, frozen=True):
    transaction_id: str
    kind: str
    amount: int
    balance_after: int
    version: int
    shard: int
    created_at: str
    metadata: dict[str, Any]


class Department(msgspec.Struct, frozen=True):
    id: str
    name: str
    parent: str | None
    account: str
    created_at: str
    updated_at: str


class EmployeeListItem(msgspec.Struct, frozen=True):
    id: str
    name: str
    email: str
    department: str
    status: Literal["active", "offboarded"]
    offboarded_at: str | None
    created_at: str
    updated_at: str


# An employee with their wallet; a list item has no wallet. (No docstring:
# the schema shows none for either.)
class Employee(EmployeeListItem, frozen=True):
    wallet: Account


class GrantResult(msgspec.Struct, frozen=True):
    transaction: Transaction
    lot: Lot


class BatchGrantResult(msgspec.Struct, frozen=True):
    key: str
    status: Literal["created", "duplicate", "rejected"]
    code: str | None = None
    detail: str | None = None
    transaction_id: str | None = None
    lot_id: str | None = None


class BatchGrantResponse(msgspec.Struct, frozen=True):
    results: list[BatchGrantResult]


class Balance(msgspec.Struct, frozen=True):
    address: str
    at: str
    posted: int


class SeriesPoint(msgspec.Struct, frozen=True):
    at: str
    posted: int


class Series(msgspec.Struct, frozen=True):
    address: str
    interval: Literal["day", "hour"]
    items: list[SeriesPoint]


class EntriesPage(Page, frozen=True):
    items: list[Entry]


class TransactionsPage(Page, frozen=True):
    items: list[Transaction]


class LotsPage(Page, frozen=True):
    items: list[Lot]


class Problem(msgspec.Struct, frozen=True):
    """RFC 9457 problem details; `code` is one of the stable error codes (see the
    table in the API description). Extras such as `available` and `requested` are
    machine-readable; for invalid_request, `errors` lists each bad field's JSON path.
    `status` is the HTTP status; for reservation_not_active and lot_not_active the
    resource's state is `reservation_status` or `lot_status`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None
    reservation_status: Literal["active", "captured", "released", "expired"] | None = None
    lot_status: Literal["active", "voided", "expired", "depleted"] | None = None


class Hold(msgspec.Struct, frozen=True):
    lot_id: str
    amount: int


class Reservation(msgspec.Struct, frozen=True):
    """A hold on a wallet. `status` reads `expired` from the instant of
    `expires_at`, whether or not the sweeper has run. `available_after` is
    returned by the create call only."""

    id: str
    account: str
    amount: int
    captured: int | None
    status: Literal["active", "captured", "released", "expired"]
    expires_at: str
    metadata: dict[str, Any]
    capture_transaction_id: str | None
    holds: list[Hold]
    actor: str | None
    created_at: str
    resolved_at: str | None
    available_after: int | None = None
    # Only on the answer to a reservation by estimate: the output tokens the
    # held amount covers, for the gateway to cap max_tokens with.
    max_output_tokens_allowed: int | None = None


class CaptureResult(msgspec.Struct, frozen=True):
    """A capture. By `usage`, also the usage event it recorded, and no
    transaction when the usage cost nothing."""

    reservation: Reservation
    transaction: Transaction | None
    usage: UsageRecorded | None = None


class ReservationsPage(Page, frozen=True):
    items: list[Reservation]


class Price(msgspec.Struct, frozen=True):
    """A price version: a model's rates in credits per million tokens from
    `effective_from` until the model's next version. Never edited."""

    id: str
    model: str
    tier: Tier
    effective_from: str
    input_per_mtok: int
    cached_input_per_mtok: int
    output_per_mtok: int
    source: str
    created_at: str


class PricesPage(Page, frozen=True):
    items: list[Price]


class UsageRecorded(msgspec.Struct, frozen=True):
    """A recorded usage event. `status` is `recorded` the first time and
    `duplicate` when the same (source, event_id) comes again."""

    id: str
    source: str
    event_id: str
    account: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost: int
    price_id: str
    transaction_id: str | None
    reservation_id: str | None
    project: str | None
    tags: dict[str, str]
    occurred_at: str
    status: Literal["recorded", "duplicate"]
    # Spend policy: the part of `cost` no wallet could cover (down to
    # -overdraft_limit), charged to system:overage; present only when not 0.
    shortfall: int | None = None
    # Spend policy: set when the event's model is outside the account's
    # policy; the event is recorded all the same (the call happened).
    violation: Literal["model_not_allowed"] | None = None


class UsageBatchResult(msgspec.Struct, frozen=True):
    event_id: str | None
    status: Literal["recorded", "duplicate", "rejected"]
    code: str | None = None
    detail: str | None = None
    cost: int | None = None
    id: str | None = None
    transaction_id: str | None = None
    # Spend policy: the part of `cost` charged to system:overage, when not 0.
    shortfall: int | None = None


class UsageBatchResponse(msgspec.Struct, frozen=True):
    results: list[UsageBatchResult]


class ProgramCycle(msgspec.Struct, frozen=True):
    cycle: str
    starts_at: str
    ends_at: str


class ProgramCadence(msgspec.Struct, frozen=True):
    every: Literal["month"]
    day: int


class Program(msgspec.Struct, frozen=True):
    """A grant program. `audience` is `{all: true}`, `{departments}` or
    `{employees}`; `expiry` is `{at: "end_of_cycle"}`, `{after_days}` or null
    (never)."""

    id: str
    amount: int
    reason: str
    cadence: ProgramCadence
    time_zone: str
    audience: dict[str, Any]
    expiry: dict[str, Any] | None
    rollover_max: int | None
    funded_by: str
    starts_on: str
    ends_on: str | None
    active: bool
    prorate: bool
    activated_at: str | None
    version: int
    current_cycle: ProgramCycle | None
    next_cycle: ProgramCycle | None
    created_at: str
    updated_at: str


class ProgramsPage(Page, frozen=True):
    items: list[Program]


class SkippedEmployee(msgspec.Struct, frozen=True):
    employee: str
    reason: Literal["offboarded", "insufficient_budget", "prorated_to_zero"]


class ProgramRun(msgspec.Struct, frozen=True):
    """One run of a cycle: `issued` grants totalling `credits`; `skipped`
    counts members left out by reason (`already_granted`, `offboarded`,
    `insufficient_budget`, `prorated_to_zero`)."""

    id: str
    program: str
    cycle: str
    trigger: Literal["api", "scheduler", "onboarding"]
    issued: int
    credits: int
    skipped: dict[str, int]
    skipped_employees: list[SkippedEmployee]
    actor: str | None
    ran_at: str
    completed_at: str | None


class ProgramRunsPage(Page, frozen=True):
    items: list[ProgramRun]
