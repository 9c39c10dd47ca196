"""Single-client latency: sequential grants, debits and balance reads."""

from __future__ import annotations

from bench.driver import Context, Request, balance_check, debits_known, drive
from bench.stats import Stats


async def grant_latency(ctx: Context) -> Stats:
    """Single client, sequential POST /v1/grants of 1 credit."""
    n = ctx.count(300)
    stats = Stats("grant_latency", 1, n, 60 * ctx.opts.time_cap_scale, 201)
    emp = "lat-grant"
    await ctx.api.employees([emp])

    def make(w: int, i: int) -> Request:
        body = {"employee": emp, "amount": 1, "reason": "spot_bonus"}
        return "POST", "/v1/grants", body, ctx.key(stats.name, w, i)

    await drive(ctx, stats, [n], make)
    expected = stats.ok if not stats.transport else None
    stats.check = await balance_check(ctx, f"employee:{emp}", expected)
    return stats


async def debit_latency(ctx: Context) -> Stats:
    """Single client, sequential POST /v1/debits of 1 credit from one funded wallet."""
    n = ctx.count(300)
    stats = Stats("debit_latency", 1, n, 60 * ctx.opts.time_cap_scale, 201)
    emp, funded = "lat-debit", n + 100
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: funded})
    address = f"employee:{emp}"

    def make(w: int, i: int) -> Request:
        return "POST", "/v1/debits", {"account": address, "amount": 1}, ctx.key(stats.name, w, i)

    await drive(ctx, stats, [n], make)
    known = debits_known(stats)
    ctx.debited[stats.name] = known
    stats.check = await balance_check(ctx, address, None if known is None else funded - known)
    return stats


async def read_latency(ctx: Context) -> Stats:
    """Single client, sequential GET /v1/accounts/employee:... of a funded wallet."""
    n = ctx.count(300)
    stats = Stats("read_latency", 1, n, 60 * ctx.opts.time_cap_scale, 200)
    emp = "lat-read"
    await ctx.api.employees([emp])
    await ctx.api.grants({emp: 1000})
    path = f"/v1/accounts/employee:{emp}"
    await drive(ctx, stats, [n], lambda w, i: ("GET", path, None, None))
    return stats
