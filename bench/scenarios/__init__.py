"""The scenarios of `python -m bench`, by name, in the order they run; one module each."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench.driver import Context, Prepared, Request, drive, run_workers, send, split
from bench.scenarios.debits import (
    debit_shared,
    debit_spread,
    debit_spread_policy,
    prepare_debits,
    read_spread,
)
from bench.scenarios.grants_batch import grants_batch
from bench.scenarios.latency import debit_latency, grant_latency, read_latency
from bench.scenarios.reservations import (
    prepare_reserve_capture,
    reserve_capture_gateway,
    reserve_capture_shared,
    reserve_capture_spread,
    reserve_capture_spread_policy,
)
from bench.scenarios.transfers import transfer_pairs
from bench.scenarios.usage import (
    USAGE_MODEL,
    usage_batch,
    usage_batch_c16,
    usage_price,
    usage_single,
    usage_single_32,
)
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
    "reserve_capture_gateway_32": reserve_capture_gateway,
    "usage_single": usage_single,
    "usage_single_32": usage_single_32,
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
    # Pairs per second, the LiteLLM hook's (by estimate and usage) over by amount.
    "reserve_capture_gateway_over_amounts": (
        "reserve_capture_spread_32",
        "reserve_capture_gateway_32",
    ),
    # Events per second, batch over single.
    "usage_batch_over_single": ("usage_single", "usage_batch_500"),
}
# Spend policy (issue 12): with a policy on every wallet over without, same
# run (interleaved: INTERLEAVED), as ops/s and as CPU per op.
POLICY_RATIOS = {
    "debit_policy_over_plain": ("debit_spread_32", "debit_spread_32_policy"),
    "reserve_capture_policy_over_plain": (
        "reserve_capture_spread_32",
        "reserve_capture_spread_32_policy",
    ),
}
RATIOS.update(POLICY_RATIOS)


# Pairs compared with each other (RATIOS) that run interleaved when both are
# selected: both are set up first, then their timed requests alternate in
# INTERLEAVED_ROUNDS rounds (first, second, first, ...), each round a share
# of every worker's requests. Run one after the other, the two met different
# machines on this shared 2-core box (other tenants' load, the background
# work the first one's writes left behind), and their ops/s ratio moved
# between 0.58 and 1.34 across runs of the same code; alternating puts both
# under the same drift. The service's background loop still lands in some
# rounds and not others (every 5 s it chains the transactions of 5 s, about
# a second of one core at these rates), so the pairs run longer than the
# other scenarios (INTERLEAVED_COUNTS, four times debit_spread_32's 5,000
# and five times reserve_capture_spread_32's 800 when run alone) in 20
# rounds, and the bench also reports the median of the rounds' ratios, which
# a round with the chainer in it does not move (harness, POLICY_RATIOS).
INTERLEAVED_ROUNDS = 20
INTERLEAVED_COUNTS = {"debits": 20_000, "pairs": 4_000}
PREPARED: dict[str, Callable[[Context], Awaitable[Prepared]]] = {
    "debit_spread_32": lambda ctx: prepare_debits(
        ctx, "debit_spread_32", shared=False, default_count=INTERLEAVED_COUNTS["debits"]
    ),
    "debit_spread_32_policy": lambda ctx: prepare_debits(
        ctx,
        "debit_spread_32_policy",
        shared=False,
        default_count=INTERLEAVED_COUNTS["debits"],
        policy=True,
    ),
    "reserve_capture_spread_32": lambda ctx: prepare_reserve_capture(
        ctx, "reserve_capture_spread_32", shared=False, default_count=INTERLEAVED_COUNTS["pairs"]
    ),
    "reserve_capture_spread_32_policy": lambda ctx: prepare_reserve_capture(
        ctx,
        "reserve_capture_spread_32_policy",
        shared=False,
        policy=True,
        default_count=INTERLEAVED_COUNTS["pairs"],
    ),
}
INTERLEAVED = (
    ("debit_spread_32", "debit_spread_32_policy"),
    ("reserve_capture_spread_32", "reserve_capture_spread_32_policy"),
)


def interleaved_partner(name: str, names: Sequence[str]) -> str | None:
    """The scenario `name` runs interleaved with (it comes first), if both run."""
    for first, second in INTERLEAVED:
        if name == first and second in names:
            return second
    return None


def interleaved_later(name: str, names: Sequence[str]) -> bool:
    """Whether `name` already ran, interleaved with a scenario before it."""
    return any(name == second and first in names for first, second in INTERLEAVED)


async def run_interleaved(ctx: Context, first: str, second: str) -> tuple[Stats, Stats]:
    """Both scenarios set up, then their requests in alternating rounds (each
    worker's count split over INTERLEAVED_ROUNDS), then both checked. Each
    Stats adds up its own rounds: time, CPU, latencies."""
    a = await PREPARED[first](ctx)
    b = await PREPARED[second](ctx)
    shares = {
        id(p): list(zip(*(split(n, INTERLEAVED_ROUNDS) for n in p.per_worker), strict=True))
        for p in (a, b)
    }
    for k in range(INTERLEAVED_ROUNDS):
        for p in (a, b):
            await p.run(list(shares[id(p)][k]))
    await a.finish()
    await b.finish()
    return a.stats, b.stats


async def warm_up(ctx: Context, concurrency: int) -> dict[str, Any]:
    """Untimed: open the client's connections and the service's pool, and let
    PostgreSQL plan the functions once per connection.

    The usage batch function too: `concurrency` concurrent POST
    /v1/usage:batch of two charged events each, all on one wallet, so each
    waits for the others on its lock and every pool connection they hold
    runs the whole path (lock, charge, roll-ups). A backend's first batch
    costs about 20 ms more PostgreSQL CPU than the next (its plans), and
    without this usage_batch_500_c16's 16 batches met up to 16 cold
    backends in their first round: its p99, the maximum of 64 batches,
    measured that first round."""
    emp = "warm-up"
    await ctx.api.employees([emp])
    # One credit per debit and per event (10 input and 1 output tokens at
    # USAGE_RATES cost one credit, rounded up), and a margin.
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
    await usage_price(ctx)
    batches = Stats("warm_up_usage", concurrency, concurrency, 60, 200)
    recorded = 0

    async def batch(w: int, i: int) -> None:
        nonlocal recorded
        events = [
            {
                "source": "warm-up",
                "event_id": f"warm-{w}-{k}",
                "account": f"employee:{emp}",
                "model": USAGE_MODEL,
                "input_tokens": 10,
                "output_tokens": 1,
            }
            for k in range(2)
        ]
        r = await send(ctx, batches, ("POST", "/v1/usage:batch", {"events": events}, None))
        if r is not None and r.status_code == 200:
            results = r.json().get("results") or []
            recorded += sum(1 for x in results if x.get("status") == "recorded")

    await run_workers(ctx, batches, [1] * concurrency, batch)
    ctx.debited["warm_up"] = debits_ok if not stats.transport else None
    return {
        "requests": stats.requests,
        "usage_batches": {str(k): v for k, v in batches.statuses.items()},
        "usage_events_recorded": recorded,
        "statuses": {str(k): v for k, v in stats.statuses.items()},
        "seconds": round(stats.elapsed, 2),
    }
