"""Wire shapes of the tokenledger HTTP API (v1), as msgspec Structs.

Requests are strict (`forbid_unknown_fields`, so a typo fails here rather
than as a 400); responses ignore fields they do not know, so that the service
can add fields without breaking a deployed gateway. tests/client/test_contract.py
holds every Struct here against the OpenAPI schema the service serves.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

MetadataValue = str | int | float | bool | None

# --- requests ------------------------------------------------------------------


class UsageCounts(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Token counts of one model call, in the service's convention:
    `input_tokens` counts every prompt token, cached ones included;
    `cached_input_tokens <= input_tokens` are billed at the cached rate;
    `output_tokens` includes reasoning tokens."""

    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0

    def __post_init__(self) -> None:
        if min(self.input_tokens, self.output_tokens, self.cached_input_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        if self.cached_input_tokens > self.input_tokens:
            raise ValueError("cached_input_tokens cannot exceed input_tokens")


class Estimate(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Reserve the worst case of a call (all input uncached, `max_output_tokens`),
    or as many output tokens as the wallet covers down to `min_output_tokens`."""

    model: str
    input_tokens: int
    max_output_tokens: int
    min_output_tokens: int | None = None


class ReserveRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    account: str
    amount: int | None = None
    estimate: Estimate | None = None
    ttl_seconds: int = 600
    metadata: dict[str, MetadataValue] | None = None


class CaptureRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    amount: int | None = None
    usage: UsageCounts | None = None
    metadata: dict[str, MetadataValue] | None = None


class ExtendRequest(msgspec.Struct, forbid_unknown_fields=True):
    ttl_seconds: int


class DebitRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    account: str
    amount: int
    metadata: dict[str, MetadataValue] | None = None


class UsageEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """One usage event. `(source, event_id)` is its idempotency key: send the
    same event again (same body) and it is charged once."""

    source: str
    event_id: str
    account: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    occurred_at: str | None = None
    reservation: str | None = None
    project: str | None = None
    tags: dict[str, str] | None = None


class UsageBatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    events: list[UsageEvent]


# --- responses -----------------------------------------------------------------


class Hold(msgspec.Struct, frozen=True):
    lot_id: str
    amount: int


class Reservation(msgspec.Struct, frozen=True):
    id: str
    account: str
    amount: int
    status: Literal["active", "captured", "released", "expired"]
    expires_at: str
    captured: int | None = None
    metadata: dict[str, Any] = {}
    capture_transaction_id: str | None = None
    holds: list[Hold] = []
    actor: str | None = None
    created_at: str | None = None
    resolved_at: str | None = None
    # Only on the answer to a create call.
    available_after: int | None = None
    # Only on the answer to a reservation by estimate.
    max_output_tokens_allowed: int | None = None


class EntryLeg(msgspec.Struct, frozen=True):
    account: str
    amount: int
    balance_after: int
    version: int
    asset: str


class Transaction(msgspec.Struct, frozen=True):
    id: str
    kind: str
    entries: list[EntryLeg]
    metadata: dict[str, Any] = {}
    details: dict[str, Any] = {}
    memo: str | None = None
    actor: str | None = None
    request_id: str | None = None
    created_at: str | None = None


class CaptureResult(msgspec.Struct, frozen=True):
    """A capture: the reservation, the transaction (none when it charged 0),
    and with a capture by usage the usage event it recorded."""

    reservation: Reservation
    transaction: Transaction | None = None
    usage: UsageRecorded | None = None

    @property
    def cost(self) -> int:
        """Credits the capture charged."""
        if self.usage is not None:
            return self.usage.cost
        return self.reservation.captured or 0


class Expiring(msgspec.Struct, frozen=True):
    amount: int
    expires_at: str


class Account(msgspec.Struct, frozen=True):
    address: str
    type: str
    asset: str
    posted: int
    reserved: int
    available: int | None
    status: Literal["open", "closed"]
    version: int
    pending: int = 0
    overdraft_limit: int | None = None
    expiring: list[Expiring] = []
    updated_at: str | None = None


class UsageRecorded(msgspec.Struct, frozen=True):
    id: str
    source: str
    event_id: str
    account: str
    model: str
    cost: int
    price_id: str
    status: Literal["recorded", "duplicate"]
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    transaction_id: str | None = None
    reservation_id: str | None = None
    occurred_at: str | None = None


class UsageBatchResult(msgspec.Struct, frozen=True):
    event_id: str | None
    status: Literal["recorded", "duplicate", "rejected"]
    code: str | None = None
    detail: str | None = None
    cost: int | None = None
    id: str | None = None
    transaction_id: str | None = None


class UsageBatchResponse(msgspec.Struct, frozen=True):
    results: list[UsageBatchResult]


class Problem(msgspec.Struct, frozen=True):
    """An RFC 9457 problem body; extras are kept apart by the error classes."""

    code: str
    title: str = ""
    detail: str = ""
    type: str = "about:blank"
