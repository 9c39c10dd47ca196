"""The scenarios of `python -m bench`, by name, in the order they run; one module each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bench.driver import Context, Request, drive
from bench.scenarios.debits import debit_shared, debit_spread, debit_spread_policy, read_spread
from bench.scenarios.grants_batch import grants_batch
from bench.scenarios.latency import debit_latency, grant_latency, read_latency
from bench.scenarios.reservations import (
    reserve_capture_shared,
    reserve_capture_spread,
    reserve_capture_spread_policy,
)
from bench.scenarios.transfers import transfer_pairs
from bench.scenarios.usage import usage_batch, usage_batch_c16, usage_single
from bench.stats import Stats

SCENARIOS: dict[str, Callable[[Context], Awaitable[Stats]]] = {
    "grant_latency": grant_latency,
    "debit_latency": debit_latency,
    "read_latency": read_latency,
    "debit_spread_32": debit_spread,
    "debit_spread_32_policy": debit_spread_policy,
    "read_32": read_spread,
    "debit_shared_32": debit_shared,
    "transfer_pairs": transfer_pairs,
    "reserve_capture_spread_32": reserve_capture_spread,
    "reserve_capture_spread_32_policy": reserve_capture_spread_policy,
    "reserve_capture_shared_32": reserve_capture_shared,
    "usage_single": usage_single,
    "usage_batch_500": usage_batch,
    "usage_batch_500_c16": usage_batch_c16,
    "grants_batch_1000": grants_batch,
}

# Ratios of ops/s, shared over spread, reported when both scenarios ran.
RATIOS = {
    "shared_over_spread": ("debit_spread_32", "debit_shared_32"),
    "reserve_capture_shared_over_spread": (
        "reserve_capture_spread_32",
        "reserve_capture_shared_32",
    ),
    # Spend policy (issue 12): with a policy on every wallet over without, same run.
    "debit_policy_over_plain": ("debit_spread_32", "debit_spread_32_policy"),
    "reserve_capture_policy_over_plain": (
        "reserve_capture_spread_32",
        "reserve_capture_spread_32_policy",
    ),
    # Events per second, batch over single.
    "usage_batch_over_single": ("usage_single", "usage_batch_500"),
}


async def warm_up(ctx: Context, concurrency: int) -> dict[str, Any]:
    """Untimed: open the client's connections and the service's pool, and let
    PostgreSQL plan the functions once per connection."""
    emp = "warm-up"
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: 10 * concurrency + 100})
    stats = Stats("warm_up", concurrency, 2 * concurrency, 60, 201)

    def make(w: int, i: int) -> Request:
        if i == 0:
            return (
                "POST",
                "/v1/debits",
                {"account": f"employee:{emp}", "amount": 1},
                ctx.key("warm", w, i),
            )
        return "GET", f"/v1/accounts/employee:{emp}", None, None

    await drive(ctx, stats, [2] * concurrency, make)
    debits_ok = stats.statuses[201]
    ctx.debited["warm_up"] = debits_ok if not stats.transport else None
    return {
        "requests": stats.requests,
        "statuses": {str(k): v for k, v in stats.statuses.items()},
        "seconds": round(stats.elapsed, 2),
    }
