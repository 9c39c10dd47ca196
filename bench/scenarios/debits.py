"""Concurrent 1-credit debits, from one shared wallet or spread over many, and
concurrent balance reads spread the same way.
"""

from __future__ import annotations

from collections import Counter

from bench.driver import (
    Context,
    Prepared,
    Request,
    debits_known,
    drive,
    split,
    wallet_postings,
)
from bench.stats import Stats


async def prepare_debits(
    ctx: Context, name: str, shared: bool, default_count: int, policy: bool = False
) -> Prepared:
    """Workers debiting 1 credit at a time: all from one wallet (shared), or
    spread over ctx.wallets() wallets, worker w's i-th debit on wallet
    (i * workers + w) mod wallets, so that the workers, each at about the
    same i, sweep the wallets side by side and rarely meet on one. With
    `policy`, every wallet has a spend policy (Api.policies)."""
    workers = ctx.workers(32)
    total = ctx.count(default_count)
    per_worker = split(total, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 201)
    prefix = name.replace("_", "-")
    if shared:
        wallets = [f"{prefix}-0"]

        def pick(w: int, i: int) -> int:
            return 0
    else:
        wallets = [f"{prefix}-{k}" for k in range(ctx.wallets())]

        def pick(w: int, i: int) -> int:
            return (i * workers + w) % len(wallets)

    planned = Counter(pick(w, i) for w, n in enumerate(per_worker) for i in range(n))
    funding = {wallet: planned[k] + 100 for k, wallet in enumerate(wallets)}
    await ctx.api.employees(wallets)
    await ctx.api.grants(funding)
    if policy:
        await ctx.api.policies(wallets, funding)
    elif not shared:
        ctx.spread_wallets = wallets

    def make(w: int, i: int) -> Request:
        body = {"account": f"employee:{wallets[pick(w, i)]}", "amount": 1}
        return "POST", "/v1/debits", body, ctx.key(name, w, i)

    async def run_share(share: list[int], first: list[int]) -> None:
        await drive(ctx, stats, share, make, first)

    async def finish() -> None:
        known = debits_known(stats)
        ctx.debited[name] = known
        if known is None:
            stats.check = {"passed": True, "skipped": "a transport error left some outcome unknown"}
            return
        posted = await wallet_postings(ctx, wallets)
        expected_total = sum(funding.values()) - known
        stats.check = {
            "wallets": len(wallets),
            "expected_posted_sum": expected_total,
            "posted_sum": sum(posted),
            "passed": sum(posted) == expected_total,
        }

    return Prepared(stats, per_worker, run_share, finish)


async def _debits(
    ctx: Context, name: str, shared: bool, default_count: int, policy: bool = False
) -> Stats:
    prepared = await prepare_debits(ctx, name, shared, default_count, policy)
    return await prepared.run_all()


async def debit_spread(ctx: Context) -> Stats:
    """32 workers debiting 1 credit at a time, spread over 1,000 wallets (--wallets)."""
    return await _debits(ctx, "debit_spread_32", shared=False, default_count=5000)


async def debit_spread_policy(ctx: Context) -> Stats:
    """debit_spread_32 on wallets that each have a spend policy (limits and model
    rules checked in every debit's database call), to compare in the same run."""
    return await _debits(
        ctx, "debit_spread_32_policy", shared=False, default_count=5000, policy=True
    )


async def debit_shared(ctx: Context) -> Stats:
    """32 workers, all debiting 1 credit at a time from one shared wallet."""
    return await _debits(ctx, "debit_shared_32", shared=True, default_count=800)


async def read_spread(ctx: Context) -> Stats:
    """32 workers reading balances (GET /v1/accounts/employee:...) spread
    over 1,000 funded wallets: those of debit_spread_32 when it ran, else as
    many of their own, funded here."""
    name = "read_32"
    workers = ctx.workers(32)
    total = ctx.count(5000)
    per_worker = split(total, workers)
    stats = Stats(name, workers, total, 90 * ctx.opts.time_cap_scale, 200)
    wallets = ctx.spread_wallets
    if not wallets:
        wallets = [f"read-32-{k}" for k in range(ctx.wallets())]
        await ctx.api.employees(wallets)
        await ctx.api.grants({w: 1000 for w in wallets})
    paths = [f"/v1/accounts/employee:{w}" for w in wallets]

    def make(w: int, i: int) -> Request:
        return "GET", paths[(i * workers + w) % len(paths)], None, None

    await drive(ctx, stats, per_worker, make)
    return stats
