"""The forecast report: when each wallet runs out at its last 30 days' burn
rate, and what expires before then."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from service.finance.queries import fetch_report
from service.journal import Database

FORECAST_WINDOW_DAYS = 30


def depletion(
    now: datetime, burn_per_day: Decimal, lots: Sequence[tuple[int, datetime | None]]
) -> datetime | None:
    """When spending `burn_per_day` uses up the lots (free amount, expiry), taken in
    consumption order: a lot is spent from the moment the earlier ones are used up
    until it is used up too or expires (what is left of it then is lost). None when
    nothing is spent."""
    if burn_per_day <= 0:
        return None
    at = now
    for amount, expires_at in lots:
        if expires_at is not None and expires_at <= at:
            continue  # expired before spending reached it
        days = Decimal(amount) / burn_per_day
        finish = at + timedelta(seconds=float(days * 86400))
        at = min(finish, expires_at) if expires_at is not None else finish
    return at


def forecast_item(
    now: datetime, address: str, spent_30d: int, lots: list[dict[str, Any]]
) -> dict[str, Any]:
    burn = Decimal(spent_30d) / FORECAST_WINDOW_DAYS
    parsed = [
        (
            int(lot["amount"]),
            datetime.fromisoformat(lot["expires_at"]) if lot["expires_at"] else None,
        )
        for lot in lots
    ]
    expiring: dict[datetime, int] = {}
    for amount, expires_at in parsed:
        if expires_at is not None:
            expiring[expires_at] = expiring.get(expires_at, 0) + amount
    depletes = depletion(now, burn, parsed)
    return {
        "account": address,
        "available": sum(a for a, _ in parsed),
        "spent_30d": spent_30d,
        "burn_rate_per_day": float(burn.quantize(Decimal("0.01"))),
        "depletes_at": _ts(depletes) if depletes is not None else None,
        "expiring": [{"amount": a, "expires_at": _ts(t)} for t, a in sorted(expiring.items())],
    }


async def forecast(
    ledger: Database, account: str | None, department: str | None, cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    now = ledger.now() or datetime.now(UTC)
    accounts = await ledger.fetch("forecast_accounts", account, department, cursor, limit + 1)
    more = len(accounts) > limit
    accounts = accounts[:limit]
    if not accounts:
        return [], None
    ids = [a["id"] for a in accounts]
    if account is not None:
        # One wallet (the wallet page asks this on its first render): one
        # account's 30 days fit the pool's statement timeout, and one round
        # trip instead of fetch_slow's five (its own transaction and
        # settings) keeps the answer from queueing behind other requests
        # between each of them.
        inputs = await ledger.fetch("forecast_inputs", ids, now)
    else:
        inputs = await fetch_report(ledger, "forecast_inputs", ids, now)
    by_id = {r["id"]: r for r in inputs}
    items = [
        forecast_item(now, a["address"], int(by_id[a["id"]]["spent_30d"]), by_id[a["id"]]["lots"])
        for a in accounts
    ]
    return items, (accounts[-1]["address"] if more else None)


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
