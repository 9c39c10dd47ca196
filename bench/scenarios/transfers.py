"""Concurrent transfers between random pairs of wallets."""

from __future__ import annotations

import random

from bench.driver import Context, Request, drive, split
from bench.stats import Stats


async def transfer_pairs(ctx: Context) -> Stats:
    """16 workers transferring 1..5 credits between random pairs of 32 wallets."""
    workers = ctx.workers(16)
    n_wallets = 2 * workers
    total = ctx.count(640)
    per_worker = split(total, workers)
    stats = Stats(
        "transfer_pairs",
        workers,
        total,
        90 * ctx.opts.time_cap_scale,
        201,
        allowed=frozenset({409}),
    )
    wallets = [f"pair-{k}" for k in range(n_wallets)]
    funding = {w: 10_000 for w in wallets}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    rngs = [random.Random(ctx.opts.seed * 1000 + w) for w in range(workers)]  # noqa: S311  # why: load shape, not security

    def make(w: int, i: int) -> Request:
        a, b = rngs[w].sample(range(n_wallets), 2)
        body = {
            "from": f"employee:{wallets[a]}",
            "to": f"employee:{wallets[b]}",
            "amount": rngs[w].randint(1, 5),
        }
        return "POST", "/v1/transfers", body, ctx.key(stats.name, w, i)

    await drive(ctx, stats, per_worker, make)
    # Transfers move credits between these wallets only: their sum never changes.
    posted = [await ctx.api.posted(f"employee:{w}") for w in wallets]
    stats.check = {
        "wallets": n_wallets,
        "expected_posted_sum": sum(funding.values()),
        "posted_sum": sum(posted),
        "min_posted": min(posted),
        "passed": sum(posted) == sum(funding.values()) and min(posted) >= 0,
    }
    return stats
